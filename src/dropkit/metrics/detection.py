"""Threshold-free detection metrics for uncertainty scores: AUROC and AUPR (average precision).

Convention: a **higher score means "more likely positive"**. Uncertainty scores (predictive
entropy, mutual information, variation ratio, ...) are used as they are, so the positives are the
inputs the uncertainty should flag:

* misclassification detection (:func:`misclassification_detection`): positive = misclassified;
* out-of-distribution detection (:func:`ood_detection`): positive = out-of-distribution.

A confidence score (e.g. the max probability) must be negated first. Both metrics are computed on
the CPU in float64 (inputs may live on any device) and equal ``sklearn.metrics.roc_auc_score`` and
``sklearn.metrics.average_precision_score``, including ties. AUROC is 0.5 for an uninformative
score; AUPR's chance level is the positive rate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dropkit._validation import check_floating_tensor

__all__ = [
    "DetectionResult",
    "auroc",
    "average_precision",
    "misclassification_detection",
    "ood_detection",
]


class DetectionResult(NamedTuple):
    """AUROC and AUPR (average precision, positives as defined by the caller), 0-d float64 tensors."""

    auroc: torch.Tensor
    aupr: torch.Tensor


def _check_scores(scores: object, name: str) -> torch.Tensor:
    tensor = check_floating_tensor(scores, name)
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(tensor)).sum())} NaN/inf entries")
    return tensor.detach().cpu().to(torch.float64)


def _check_binary(targets: object, n: int, name: str) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of 0/1 or bool, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{name} must be a bool or integer tensor of 0/1, got dtype {targets.dtype}")
    if targets.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the scores, got {tuple(targets.shape)}")
    as_long = targets.detach().cpu().long()
    if bool(((as_long != 0) & (as_long != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1, got values {torch.unique(as_long).tolist()}")
    return as_long.bool()


def _check_both_classes(positive: torch.Tensor, name: str) -> tuple[int, int]:
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{name} must contain both classes, got {n_pos} positives and {n_neg} negatives "
            "(AUROC/AUPR are undefined otherwise)"
        )
    return n_pos, n_neg


def _auroc(scores: torch.Tensor, positive: torch.Tensor, n_pos: int, n_neg: int) -> torch.Tensor:
    # Mann-Whitney U with average ranks for ties: AUROC = (R+ - n+(n+ + 1)/2) / (n+ n-).
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.to(torch.float64)
    mean_rank = counts.cumsum(0) - (counts - 1.0) / 2.0  # 1-based ranks averaged over each tie group
    rank_sum = mean_rank[inverse][positive].sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _average_precision(scores: torch.Tensor, positive: torch.Tensor, n_pos: int) -> torch.Tensor:
    # Thresholds at the distinct scores, descending: AP = sum_k (R_k - R_{k-1}) P_k.
    _, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    groups = int(inverse.max()) + 1
    pos_per_group = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, positive.double())
    all_per_group = torch.bincount(inverse, minlength=groups).to(torch.float64)
    true_pos = pos_per_group.flip(0).cumsum(0)  # highest threshold first
    predicted_pos = all_per_group.flip(0).cumsum(0)
    precision = true_pos / predicted_pos
    recall_step = pos_per_group.flip(0) / n_pos
    return (recall_step * precision).sum()


def auroc(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of ``scores`` separating ``targets == 1`` from ``targets == 0``.

    Computed exactly from average ranks (Mann-Whitney U), so tied scores count one half:

    .. math::

        \\mathrm{AUROC} = P(s^+ > s^-) + \\tfrac12 P(s^+ = s^-)
        = \\frac{R_+ - n_+ (n_+ + 1) / 2}{n_+ \\, n_-},

    with ``R_+`` the sum of the (average, 1-based) ranks of the positives. Equals
    ``sklearn.metrics.roc_auc_score(targets, scores)``.

    Args:
        scores: finite floating scores, shape ``(N,)``; higher means more likely positive.
        targets: bool or integer 0/1, shape ``(N,)``, with at least one positive and one negative.

    Returns:
        0-d float64 tensor in ``[0, 1]``.

    Examples::

        >>> from dropkit.metrics.detection import auroc
        >>> auroc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor(0.8750, dtype=torch.float64)
    """
    values = _check_scores(scores, "scores")
    positive = _check_binary(targets, values.numel(), "targets")
    n_pos, n_neg = _check_both_classes(positive, "targets")
    return _auroc(values, positive, n_pos, n_neg)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Area under the precision-recall curve as average precision (AUPR).

    .. math::

        \\mathrm{AP} = \\sum_k (R_k - R_{k-1}) \\, P_k,

    over the thresholds ``s >= t_k`` at the distinct scores in decreasing order, with ``P_k`` and
    ``R_k`` the precision and recall there (``R_0 = 0``). No interpolation: equals
    ``sklearn.metrics.average_precision_score(targets, scores)``, tied scores forming one step.

    Args:
        scores: finite floating scores, shape ``(N,)``; higher means more likely positive.
        targets: bool or integer 0/1, shape ``(N,)``, with at least one positive and one negative.

    Returns:
        0-d float64 tensor in ``(0, 1]``.

    Examples::

        >>> from dropkit.metrics.detection import average_precision
        >>> average_precision(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor(0.8333, dtype=torch.float64)
    """
    values = _check_scores(scores, "scores")
    positive = _check_binary(targets, values.numel(), "targets")
    n_pos, _ = _check_both_classes(positive, "targets")
    return _average_precision(values, positive, n_pos)


def misclassification_detection(uncertainty: torch.Tensor, correct: torch.Tensor) -> DetectionResult:
    """How well an uncertainty score flags the model's own mistakes.

    Positive = misclassified (``correct == False``), score = the uncertainty (higher = more
    likely wrong). ``aupr`` is the average precision with the errors as the positive class
    ("AUPR-Error"); its chance level is the error rate.

    Args:
        uncertainty: per-input uncertainty, shape ``(N,)``, e.g.
            :func:`dropkit.metrics.classification.predictive_entropy`.
        correct: bool (or 0/1 integer) tensor, shape ``(N,)``, whether the prediction was right,
            e.g. ``predictive_mean(probs).argmax(1) == labels``. Needs at least one right and one
            wrong prediction.

    Returns:
        :class:`DetectionResult` ``(auroc, aupr)``.

    Examples::

        >>> from dropkit.metrics.detection import misclassification_detection
        >>> entropy = torch.tensor([0.1, 0.2, 0.9, 0.3])
        >>> result = misclassification_detection(entropy, torch.tensor([True, True, False, True]))
        >>> float(result.auroc), float(result.aupr)
        (1.0, 1.0)
    """
    values = _check_scores(uncertainty, "uncertainty")
    positive = ~_check_binary(correct, values.numel(), "correct")
    n_pos, n_neg = _check_both_classes(positive, "correct")
    return DetectionResult(
        _auroc(values, positive, n_pos, n_neg), _average_precision(values, positive, n_pos)
    )


def ood_detection(uncertainty_in: torch.Tensor, uncertainty_out: torch.Tensor) -> DetectionResult:
    """How well an uncertainty score separates out-of-distribution from in-distribution inputs.

    Positive = out-of-distribution, score = the uncertainty (higher = more likely OOD). ``aupr``
    is the average precision with OOD as the positive class ("AUPR-Out"); its chance level is
    ``N_out / (N_in + N_out)``. For "AUPR-In" call :func:`average_precision` on the negated
    scores with in-distribution as positive.

    Args:
        uncertainty_in: scores of the in-distribution inputs, shape ``(N_in,)``, ``N_in >= 1``.
        uncertainty_out: scores of the OOD inputs, shape ``(N_out,)``, ``N_out >= 1``.

    Returns:
        :class:`DetectionResult` ``(auroc, aupr)``.

    Examples::

        >>> from dropkit.metrics.detection import ood_detection
        >>> result = ood_detection(torch.tensor([0.1, 0.5]), torch.tensor([0.5, 0.9]))
        >>> float(result.auroc)  # 3 of 4 pairs ordered, 1 tied
        0.875
    """
    scores_in = _check_scores(uncertainty_in, "uncertainty_in")
    scores_out = _check_scores(uncertainty_out, "uncertainty_out")
    for name, values in (("uncertainty_in", scores_in), ("uncertainty_out", scores_out)):
        if values.numel() == 0:
            raise ValueError(f"{name} must hold at least one score, got shape {tuple(values.shape)}")
    scores = torch.cat([scores_in, scores_out])
    positive = torch.cat(
        [torch.zeros(scores_in.numel(), dtype=torch.bool), torch.ones(scores_out.numel(), dtype=torch.bool)]
    )
    n_pos, n_neg = scores_out.numel(), scores_in.numel()
    return DetectionResult(
        _auroc(scores, positive, n_pos, n_neg), _average_precision(scores, positive, n_pos)
    )
