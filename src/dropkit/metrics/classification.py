"""Uncertainty summaries of Monte Carlo class probabilities, and proper scoring rules.

Conventions shared by the classification metrics (this module, :mod:`~dropkit.metrics.calibration`,
:mod:`~dropkit.metrics.detection`, :mod:`~dropkit.metrics.stateful`):

* **Sample axis first.** ``T`` Monte Carlo passes of a classifier over ``N`` inputs with ``C``
  classes are a tensor ``probs`` of shape ``(T, N, C)`` holding *probabilities* (softmax outputs,
  not logits). The predictive distribution is their mean ``p̄ = mean_t p_t`` of shape ``(N, C)``
  (:func:`predictive_mean`).
* **Natural logarithms.** Entropies, mutual information and the NLL are in nats.
* **Signs.** The NLL is a positive loss (lower is better); no function returns a log-likelihood.
* **Validation.** Probabilities must be finite, in ``[0, 1]`` and sum to 1 over the class axis
  within ``sqrt(eps)`` of the dtype (about ``3.5e-4`` in float32, ``1.5e-8`` in float64; see
  :data:`SUM_TOLERANCE`). Labels are integer class indices in ``[0, C)``.
* **Precision.** float16 and bfloat16 inputs are computed in float32; float32 and float64 inputs
  in their own dtype. Results are tensors of that dtype (detection metrics: float64; stateful
  accumulators: float64 sums).
* **Shapes of results.** Uncertainty summaries are per input, shape ``(N,)`` (use them as
  scores for :mod:`~dropkit.metrics.detection`); scoring rules are 0-d tensors (mean over ``N``).

The decomposition of predictive uncertainty follows Gal (2016, *Uncertainty in Deep Learning*,
§3.3) and Houlsby et al. (2011, BALD):

.. math::

    \\underbrace{H[\\bar p]}_{\\text{total}}
    = \\underbrace{\\mathbb{E}_t H[p_t]}_{\\text{aleatoric}}
    + \\underbrace{H[\\bar p] - \\mathbb{E}_t H[p_t]}_{\\text{epistemic (mutual information)}}
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from dropkit._validation import check_floating_tensor

__all__ = [
    "SUM_TOLERANCE",
    "UncertaintyScores",
    "accuracy",
    "brier_score",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "nll",
    "predictive_entropy",
    "predictive_mean",
    "uncertainty_scores",
    "variation_ratio",
]

#: Allowed deviation of ``sum_c p_c`` from 1, as a function of the dtype: ``sqrt(finfo(dtype).eps)``.
SUM_TOLERANCE = {
    dtype: math.sqrt(torch.finfo(dtype).eps)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# validation (shared with calibration.py, detection.py and stateful.py)
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_distribution(probs: torch.Tensor, name: str) -> torch.Tensor:
    """Finite values in [0, 1] summing to 1 over the last axis; returned in the compute dtype."""
    if probs.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(probs.shape)}")
    values = probs.detach()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(values)).sum())} NaN/inf entries")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in [{low:.6g}, {high:.6g}] "
            "(pass softmax outputs, not logits)"
        )
    tolerance = SUM_TOLERANCE[probs.dtype]
    deviation = float((values.sum(dim=-1, dtype=torch.float64) - 1.0).abs().max())
    if deviation > tolerance:
        raise ValueError(
            f"{name} must sum to 1 over the class axis (last dim) within {tolerance:.2g}, "
            f"got a maximum deviation of {deviation:.3g}"
        )
    return probs.to(_compute_dtype(probs.dtype))


def _check_samples(probs: object, name: str = "probs") -> torch.Tensor:
    """MC samples of class probabilities, shape (T, N, C) with T, N, C >= 1."""
    tensor = check_floating_tensor(probs, name)
    if tensor.dim() != 3:
        raise ValueError(
            f"{name} must be 3-D MC samples of shape (T, N, C) (sample axis first), "
            f"got {tensor.dim()}-D tensor of shape {tuple(tensor.shape)}"
        )
    if tensor.shape[0] < 1:
        raise ValueError(f"{name} needs T >= 1 Monte Carlo samples, got T = {tensor.shape[0]}")
    return _check_distribution(tensor, name)


def _check_mean_probs(probs: object, name: str = "probs") -> torch.Tensor:
    """Predictive probabilities, shape (N, C) with N, C >= 1."""
    tensor = check_floating_tensor(probs, name)
    if tensor.dim() != 2:
        hint = " (average MC samples first with predictive_mean)" if tensor.dim() == 3 else ""
        raise ValueError(
            f"{name} must be 2-D predictive probabilities of shape (N, C), "
            f"got {tensor.dim()}-D tensor of shape {tuple(tensor.shape)}{hint}"
        )
    return _check_distribution(tensor, name)


def _check_labels(
    labels: object, n: int, n_classes: int, name: str = "labels", device: torch.device | None = None
) -> torch.Tensor:
    """Integer class indices of shape (n,) in [0, n_classes), as int64 on ``device``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the predictions, got {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"{name} must be class indices in [0, {n_classes - 1}], got values in [{low}, {high}]"
        )
    return labels.to(device=device, dtype=torch.long)


def _check_reduction(reduction: object) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return str(reduction)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


# --------------------------------------------------------------------------------------------
# MC uncertainty summaries: probs (T, N, C) -> (N,)
# --------------------------------------------------------------------------------------------


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``H[p] = -sum_c p_c log p_c`` in nats over the last axis, with ``0 log 0 = 0``.

    No validation beyond the tensor type: a building block for the functions below, usable on any
    shape ``(..., C)``. Equals ``scipy.stats.entropy(p, axis=-1)`` for normalized ``p``.

    Examples::

        >>> from dropkit.metrics.classification import entropy
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64))
        tensor([0.6931, 0.0000], dtype=torch.float64)
    """
    check_floating_tensor(probs, "probs")
    return 0.0 - torch.special.xlogy(probs, probs).sum(dim=-1)  # 0.0 - x: no -0.0 for certain rows


def predictive_mean(probs: torch.Tensor) -> torch.Tensor:
    """Predictive distribution ``p̄ = (1/T) sum_t p_t`` of MC samples.

    Args:
        probs: class probabilities of ``T`` stochastic passes, shape ``(T, N, C)``.

    Returns:
        Tensor of shape ``(N, C)``.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]])
        >>> M.predictive_mean(probs)
        tensor([[0.7000, 0.3000]])
    """
    return _check_samples(probs).mean(dim=0)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the predictive distribution, ``H[p̄] = -sum_c p̄_c log p̄_c`` (total uncertainty).

    In nats, in ``[0, log C]``.

    Args:
        probs: class probabilities of ``T`` stochastic passes, shape ``(T, N, C)``.

    Returns:
        Tensor of shape ``(N,)``.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
        >>> M.predictive_entropy(probs)  # p̄ = (0.5, 0.5): log 2
        tensor([0.6931], dtype=torch.float64)
    """
    return entropy(_check_samples(probs).mean(dim=0))


def expected_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the individual passes, ``E_t H[p_t] = (1/T) sum_t H[p_t]`` (aleatoric part).

    In nats, in ``[0, log C]`` and never above :func:`predictive_entropy` (concavity of ``H``).

    Args:
        probs: class probabilities of ``T`` stochastic passes, shape ``(T, N, C)``.

    Returns:
        Tensor of shape ``(N,)``.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
        >>> M.expected_entropy(probs)  # every pass is certain
        tensor([0.], dtype=torch.float64)
    """
    return entropy(_check_samples(probs)).mean(dim=0)


def _mutual_information_from(total: torch.Tensor, aleatoric: torch.Tensor, n_samples: int) -> torch.Tensor:
    # Cancellation error of H[p̄] - E_t H[p_t] is a few eps·max(1, H[p̄]), growing like log T
    # (the means over T); differences within the tolerance below are rounding noise and become 0.
    eps = torch.finfo(total.dtype).eps
    tolerance = 4.0 * (1.0 + math.log2(n_samples)) * eps * total.clamp_min(1.0)
    difference = total - aleatoric
    return torch.where(difference > tolerance, difference, torch.zeros_like(difference))


def _mutual_information(samples: torch.Tensor) -> torch.Tensor:
    total = entropy(samples.mean(dim=0))
    return _mutual_information_from(total, entropy(samples).mean(dim=0), samples.shape[0])


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """BALD mutual information between the prediction and the weights (epistemic uncertainty).

    .. math::

        I[y; \\omega] = H[\\bar p] - \\mathbb{E}_t H[p_t],

    estimated from the ``T`` passes, in nats, in ``[0, log min(C, T)]``. The difference is
    mathematically ``>= 0``, but the cancellation of two nearly equal entropies leaves a rounding
    error of a few ``eps · max(1, H[p̄])`` (measured: at most ``5 eps`` for ``T <= 100``). Every
    difference at or below the tolerance

    .. math::

        \\mathrm{tol} = 4 \\, (1 + \\log_2 T) \\; \\epsilon_{\\text{dtype}} \\; \\max(1, H[\\bar p])

    (about ``2e-6`` nats in float32 and ``4e-15`` in float64 for ``T = 10``, ``C = 2``) is set to
    exactly 0, so identical passes give exactly 0 and the result is never negative.

    Args:
        probs: class probabilities of ``T`` stochastic passes, shape ``(T, N, C)``.

    Returns:
        Tensor of shape ``(N,)``; zero for ``T = 1`` or when every pass agrees.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
        ...                       [[0.0, 1.0], [0.5, 0.5]]], dtype=torch.float64)
        >>> M.mutual_information(probs)  # confident disagreement vs. agreeing doubt
        tensor([0.6931, 0.0000], dtype=torch.float64)
    """
    return _mutual_information(_check_samples(probs))


def _variation_ratio(samples: torch.Tensor) -> torch.Tensor:
    n_samples, _, n_classes = samples.shape
    votes = torch.nn.functional.one_hot(samples.argmax(dim=-1), n_classes).sum(dim=0)
    return 1.0 - votes.max(dim=-1).values.to(samples.dtype) / n_samples


def variation_ratio(probs: torch.Tensor) -> torch.Tensor:
    """Variation ratio ``1 - f_mode / T``, with ``f_mode`` the number of passes voting for the modal class.

    Each pass votes for its ``argmax`` class; a pass whose largest probability is shared by
    several classes votes for the lowest such class index (``torch.argmax``). A tie between modal
    classes does not matter: ``f_mode`` is the same whichever is chosen. Values lie in
    ``[0, 1 - 1/min(C, T)]`` on the grid ``{0, 1/T, 2/T, ...}``.

    Args:
        probs: class probabilities of ``T`` stochastic passes, shape ``(T, N, C)``.

    Returns:
        Tensor of shape ``(N,)``.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]], [[0.6, 0.4]]])
        >>> M.variation_ratio(probs)  # 3 of 4 passes vote for class 0
        tensor([0.2500])
    """
    return _variation_ratio(_check_samples(probs))


class UncertaintyScores(NamedTuple):
    """Per-input uncertainty summaries of MC samples, each of shape ``(N,)``, in nats."""

    predictive_entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    variation_ratio: torch.Tensor


def _uncertainty_scores(samples: torch.Tensor) -> UncertaintyScores:
    total = entropy(samples.mean(dim=0))
    aleatoric = entropy(samples).mean(dim=0)
    return UncertaintyScores(
        predictive_entropy=total,
        expected_entropy=aleatoric,
        mutual_information=_mutual_information_from(total, aleatoric, samples.shape[0]),
        variation_ratio=_variation_ratio(samples),
    )


def uncertainty_scores(probs: torch.Tensor) -> UncertaintyScores:
    """All four summaries at once (one validation pass): :func:`predictive_entropy`,
    :func:`expected_entropy`, :func:`mutual_information` and :func:`variation_ratio`.

    Args:
        probs: class probabilities of ``T`` stochastic passes, shape ``(T, N, C)``.

    Returns:
        :class:`UncertaintyScores` of four ``(N,)`` tensors.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
        >>> scores = M.uncertainty_scores(probs)
        >>> [round(float(v), 4) for v in scores]
        [0.6931, 0.0, 0.6931, 0.5]
    """
    return _uncertainty_scores(_check_samples(probs))


# --------------------------------------------------------------------------------------------
# scoring rules and accuracy: mean probs (N, C) and labels (N,)
# --------------------------------------------------------------------------------------------


def nll(
    probs: torch.Tensor, labels: torch.Tensor, eps: float | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Negative log-likelihood (log loss) of the true class, a positive loss in nats.

    .. math::

        \\mathrm{NLL} = -\\frac{1}{N} \\sum_{i=1}^N \\log \\max(\\bar p_{i, y_i}, \\epsilon)

    The clamp keeps a zero probability finite; the default ``eps`` is ``finfo(dtype).eps`` of the
    compute dtype (``2.2e-16`` in float64, ``1.2e-7`` in float32), the same clip as
    ``sklearn.metrics.log_loss``, so one hard mistake costs at most ``-log eps`` (36.0 / 15.9 nats).
    For MC dropout pass the predictive mean (:func:`predictive_mean`), not the per-pass samples.

    Args:
        probs: predictive probabilities, shape ``(N, C)``.
        labels: integer class indices, shape ``(N,)``, in ``[0, C)``.
        eps: lower clamp of ``p̄_y``, in ``(0, 1)``; ``None`` for ``finfo(dtype).eps``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-input, shape ``(N,)``).

    Returns:
        0-d tensor (or ``(N,)`` for ``reduction="none"``). Differentiable with respect to ``probs``.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
        >>> M.nll(probs, torch.tensor([0, 0]))  # (-log 0.8 - log 0.4) / 2
        tensor(0.5697, dtype=torch.float64)
    """
    mean_probs = _check_mean_probs(probs)
    targets = _check_labels(labels, mean_probs.shape[0], mean_probs.shape[1], device=mean_probs.device)
    reduction = _check_reduction(reduction)
    if eps is None:
        eps = torch.finfo(mean_probs.dtype).eps
    elif isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be a float in (0, 1) or None, got {eps!r}")
    picked = mean_probs.gather(1, targets[:, None]).squeeze(1)
    return _reduce(-picked.clamp_min(float(eps)).log(), reduction)


def brier_score(probs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Multiclass Brier score (Brier 1950): squared error against the one-hot label, summed over classes.

    .. math::

        \\mathrm{BS} = \\frac{1}{N} \\sum_{i=1}^N \\sum_{c=1}^C (\\bar p_{ic} - [y_i = c])^2
        \\quad \\in [0, 2]

    This is the original multiclass form (sum over classes, mean over inputs), equal to
    ``sklearn.metrics.brier_score_loss(y, probs, scale_by_half=False)``. For ``C = 2`` it is
    **twice** the binary ``brier_score_loss(y, probs[:, 1])``, which only scores the positive class.

    Args:
        probs: predictive probabilities, shape ``(N, C)``.
        labels: integer class indices, shape ``(N,)``, in ``[0, C)``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-input, shape ``(N,)``).

    Returns:
        0-d tensor (or ``(N,)`` for ``reduction="none"``). Differentiable with respect to ``probs``.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
        >>> M.brier_score(probs, torch.tensor([0, 0]))  # ((0.04 + 0.04) + (0.36 + 0.36)) / 2
        tensor(0.4000, dtype=torch.float64)
    """
    mean_probs = _check_mean_probs(probs)
    targets = _check_labels(labels, mean_probs.shape[0], mean_probs.shape[1], device=mean_probs.device)
    reduction = _check_reduction(reduction)
    one_hot = torch.nn.functional.one_hot(targets, mean_probs.shape[1]).to(mean_probs.dtype)
    return _reduce((mean_probs - one_hot).square().sum(dim=1), reduction)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of inputs whose ``argmax`` class equals the label (ties: the lowest class index).

    Args:
        probs: predictive probabilities, shape ``(N, C)``.
        labels: integer class indices, shape ``(N,)``, in ``[0, C)``.

    Returns:
        0-d tensor in ``[0, 1]`` of the compute dtype.

    Examples::

        >>> from dropkit.metrics import classification as M
        >>> probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
        >>> M.accuracy(probs, torch.tensor([0, 0, 0]))
        tensor(0.6667)
    """
    mean_probs = _check_mean_probs(probs)
    targets = _check_labels(labels, mean_probs.shape[0], mean_probs.shape[1], device=mean_probs.device)
    return (mean_probs.argmax(dim=1) == targets).to(mean_probs.dtype).mean()
