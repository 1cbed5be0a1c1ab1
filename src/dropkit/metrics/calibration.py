"""Calibration of predictive probabilities: ECE, MCE and reliability-diagram data.

Every function scores the *top-label* confidence ``conf_i = max_c p̄_ic`` against the correctness
``acc_i = [argmax_c p̄_ic = y_i]`` (ties in the argmax: the lowest class index), as in Guo et al.
(2017, *On Calibration of Modern Neural Networks*). The inputs are bucketed into bins ``B_b``:

.. math::

    \\mathrm{ECE} = \\sum_b \\frac{|B_b|}{N} \\, \\bigl| \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\bigr|,
    \\qquad
    \\mathrm{MCE} = \\max_{b : |B_b| > 0} \\bigl| \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\bigr|,

with ``acc(B_b)`` and ``conf(B_b)`` the mean correctness and mean confidence in the bin.

Binning (``binning=``):

* ``"uniform"`` — ``n_bins`` equal-width bins with edges ``linspace(0, 1, n_bins + 1)``, closed on
  the right: bin ``b`` holds ``edges[b] < conf <= edges[b+1]`` (the first bin also holds 0).
  Empty bins contribute nothing; the returned ``n_bins`` is the number requested.
* ``"adaptive"`` — equal-mass bins (Nguyen & O'Connor 2015; "ACE"-style): the sorted confidences
  are split into ``min(n_bins, N)`` groups whose sizes differ by at most one, and each group's
  largest confidence becomes a right-closed edge. Equal confidences always share a bin: a run of
  ties that straddles a group boundary goes wholly into the lower bin, which merges bins (e.g.
  confidences ``[.55, .9, .9, .9]`` in 2 bins give one bin of 4). With ``N < n_bins`` there are at
  most ``N`` bins. The returned ``n_bins`` is the number of (non-empty) bins actually used, which
  can be smaller than requested.

For MC dropout, pass the predictive mean :func:`dropkit.metrics.classification.predictive_mean`.
Inputs may live on any device; the binning runs on the CPU (two numbers per input) and the
results are CPU tensors in the compute dtype (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dropkit._validation import check_int
from dropkit.metrics.classification import _check_labels, _check_mean_probs

__all__ = [
    "CalibrationError",
    "ReliabilityData",
    "expected_calibration_error",
    "max_calibration_error",
    "reliability_diagram_data",
]

_BINNINGS = ("uniform", "adaptive")


class CalibrationError(NamedTuple):
    """A calibration error and the number of bins it used."""

    #: 0-d tensor, in ``[0, 1]``.
    value: torch.Tensor
    #: Bins used (``n_bins`` for uniform binning, the non-empty merged bins for adaptive binning).
    n_bins: int


class ReliabilityData(NamedTuple):
    """Per-bin statistics for a reliability diagram (``B`` = bins used)."""

    #: Bin edges, shape ``(B + 1,)``, from 0 to 1; bin ``b`` is ``(edges[b], edges[b+1]]``.
    edges: torch.Tensor
    #: Mean confidence per bin, shape ``(B,)``; NaN for an empty bin.
    confidence: torch.Tensor
    #: Accuracy (mean correctness) per bin, shape ``(B,)``; NaN for an empty bin.
    accuracy: torch.Tensor
    #: Number of inputs per bin, shape ``(B,)``, int64; sums to ``N``.
    counts: torch.Tensor


# --------------------------------------------------------------------------------------------
# update / compute split (the stateful classes reuse these on accumulated data)
# --------------------------------------------------------------------------------------------


def _calibration_update(probs: object, labels: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated top-label confidences and correctness (0/1 in the compute dtype), each (N,), on the CPU."""
    mean_probs = _check_mean_probs(probs).detach()
    targets = _check_labels(labels, mean_probs.shape[0], mean_probs.shape[1], device=mean_probs.device)
    confidence, predicted = mean_probs.max(dim=1)
    return confidence.cpu(), (predicted == targets).to(mean_probs.dtype).cpu()


def _check_binning(n_bins: object, binning: object) -> tuple[int, str]:
    bins = check_int(n_bins, "n_bins", 1)
    if binning not in _BINNINGS:
        raise ValueError(f"binning must be one of {_BINNINGS}, got {binning!r}")
    return bins, str(binning)


def _bin_edges(confidence: torch.Tensor, n_bins: int, binning: str) -> torch.Tensor:
    dtype = confidence.dtype
    if binning == "uniform":
        return torch.linspace(0.0, 1.0, n_bins + 1, dtype=dtype)
    ordered = confidence.sort().values
    groups = min(n_bins, ordered.numel())
    # Group g ends at index floor((g + 1) * N / groups) - 1 (sizes differ by at most one).
    ends = (torch.arange(1, groups) * ordered.numel()) // groups - 1
    inner = torch.unique(ordered[ends])  # ties across a boundary merge bins
    inner = inner[inner < ordered[-1]]  # the last bin must not be empty
    zero, one = torch.zeros(1, dtype=dtype), torch.ones(1, dtype=dtype)
    return torch.cat([zero, inner, one])


def _reliability_compute(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int, binning: str
) -> ReliabilityData:
    edges = _bin_edges(confidence, n_bins, binning)
    used = edges.numel() - 1
    # right=False: edges[b] < conf <= edges[b+1] goes to bin b; conf <= edges[1] to bin 0.
    index = torch.bucketize(confidence, edges[1:-1].contiguous(), right=False)
    count = torch.bincount(index, minlength=used)
    sum_conf = torch.zeros(used, dtype=confidence.dtype).index_add_(0, index, confidence)
    sum_acc = torch.zeros(used, dtype=confidence.dtype).index_add_(0, index, correct)
    denominator = count.to(confidence.dtype)
    nan = torch.full_like(denominator, float("nan"))
    filled = count > 0
    return ReliabilityData(
        edges=edges,
        confidence=torch.where(filled, sum_conf / denominator.clamp_min(1.0), nan),
        accuracy=torch.where(filled, sum_acc / denominator.clamp_min(1.0), nan),
        counts=count,
    )


def _calibration_compute(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int, binning: str, norm: str
) -> CalibrationError:
    data = _reliability_compute(confidence, correct, n_bins, binning)
    filled = data.counts > 0
    gaps = (data.accuracy[filled] - data.confidence[filled]).abs()
    if norm == "max":
        value = gaps.max()
    else:
        weights = data.counts[filled].to(gaps.dtype) / confidence.numel()
        value = (weights * gaps).sum()
    used = int(filled.sum()) if binning == "adaptive" else n_bins
    return CalibrationError(value=value, n_bins=used)


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, binning: str = "uniform"
) -> CalibrationError:
    """Expected calibration error (ECE) of the top-label confidence.

    .. math::

        \\mathrm{ECE} = \\sum_b \\frac{|B_b|}{N} \\, \\bigl| \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\bigr|

    See the module docstring for the bins: ``"uniform"`` equal-width (Guo et al. 2017, 15 bins
    by default) or ``"adaptive"`` equal-mass, whose bin count may shrink when ``N`` is small or
    confidences tie.

    Args:
        probs: predictive probabilities, shape ``(N, C)`` (the MC predictive mean for MC dropout).
        labels: integer class indices, shape ``(N,)``, in ``[0, C)``.
        n_bins: number of bins requested, ``>= 1``.
        binning: ``"uniform"`` or ``"adaptive"``.

    Returns:
        :class:`CalibrationError` ``(value, n_bins)``: the ECE as a 0-d tensor in ``[0, 1]`` and the
        number of bins used.

    Examples::

        >>> from dropkit.metrics.calibration import expected_calibration_error
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
        >>> labels = torch.tensor([0, 1, 1, 1])
        >>> ece, used = expected_calibration_error(probs, labels, n_bins=2)
        >>> round(float(ece), 4), used  # bin (0.5, 1]: conf 0.75, acc 0.75
        (0.0, 2)
        >>> ece, used = expected_calibration_error(probs, labels, n_bins=4)
        >>> round(float(ece), 4), used  # (0.75, 1]: |0.5 - 0.85|, (0.5, 0.75]: |1 - 0.65|
        (0.35, 4)
        >>> ece, used = expected_calibration_error(probs, labels, n_bins=10, binning="adaptive")
        >>> round(float(ece), 4), used  # N = 4 < 10: one input per bin, (0.1 + 0.8 + 0.3 + 0.4) / 4
        (0.4, 4)
    """
    bins, binning = _check_binning(n_bins, binning)
    confidence, correct = _calibration_update(probs, labels)
    return _calibration_compute(confidence, correct, bins, binning, "l1")


def max_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, binning: str = "uniform"
) -> CalibrationError:
    """Maximum calibration error (MCE): the largest ``|acc(B_b) - conf(B_b)|`` over non-empty bins.

    .. math::

        \\mathrm{MCE} = \\max_{b : |B_b| > 0} \\bigl| \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\bigr|

    Arguments and bins as in :func:`expected_calibration_error`. Sensitive to sparsely populated
    bins: with uniform bins a single input in a bin can set it.

    Returns:
        :class:`CalibrationError` ``(value, n_bins)``.

    Examples::

        >>> from dropkit.metrics.calibration import max_calibration_error
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
        >>> mce, used = max_calibration_error(probs, torch.tensor([0, 1, 1, 1]), n_bins=4)
        >>> round(float(mce), 4), used  # bin (0.75, 1]: |0.5 - 0.85|
        (0.35, 4)
    """
    bins, binning = _check_binning(n_bins, binning)
    confidence, correct = _calibration_update(probs, labels)
    return _calibration_compute(confidence, correct, bins, binning, "max")


def reliability_diagram_data(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, binning: str = "uniform"
) -> ReliabilityData:
    """Per-bin mean confidence, accuracy and count: the data behind a reliability diagram.

    Arguments and bins as in :func:`expected_calibration_error`. Uniform binning returns every
    requested bin, empty ones with ``counts = 0`` and NaN confidence/accuracy; adaptive binning
    returns only the bins used (all non-empty). The ECE is
    ``nansum(counts / N * |accuracy - confidence|)``. Plot it with
    :func:`dropkit.metrics.plots.plot_reliability_diagram`.

    Returns:
        :class:`ReliabilityData` ``(edges, confidence, accuracy, counts)``.

    Examples::

        >>> from dropkit.metrics.calibration import reliability_diagram_data
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
        >>> data = reliability_diagram_data(probs, torch.tensor([0, 1, 1, 1]), n_bins=4)
        >>> data.edges.tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
        >>> data.counts.tolist(), data.accuracy.tolist()
        ([0, 0, 2, 2], [nan, nan, 1.0, 0.5])
    """
    bins, binning = _check_binning(n_bins, binning)
    confidence, correct = _calibration_update(probs, labels)
    return _reliability_compute(confidence, correct, bins, binning)
