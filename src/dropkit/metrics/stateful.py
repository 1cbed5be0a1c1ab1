"""Thin stateful shells over the functional metrics, for accumulating over batches.

Each class follows the torchmetrics pattern: ``update(...)`` validates a batch and stores the
minimal state, ``compute()`` returns the same value the functional metric gives on the
concatenation of every batch seen since construction or the last ``reset()``, and ``reset()``
clears the state. ``compute()`` before any ``update()`` raises ``RuntimeError``. State lives on
the CPU, detached from autograd; these classes are for evaluation, not for losses.

* :class:`NegativeLogLikelihood`, :class:`BrierScore`, :class:`Accuracy` — ``update(probs (N, C),
  labels (N,))``; ``compute()`` equals :func:`~dropkit.metrics.classification.nll`,
  :func:`~dropkit.metrics.classification.brier_score`, :func:`~dropkit.metrics.classification.accuracy`
  (mean reduction) as a 0-d float64 tensor.
* :class:`CalibrationMetric` — ``update(probs (N, C), labels (N,))``; ``compute()`` is the ECE,
  with ``max_calibration_error()`` and ``reliability_diagram_data()`` alongside.
* :class:`MCUncertainty` — ``update(probs (T, N, C), labels (N,) optional)``; ``compute()`` equals
  :func:`~dropkit.metrics.classification.uncertainty_scores` on the inputs concatenated along ``N``.
"""

from __future__ import annotations

import torch

from dropkit.metrics.calibration import (
    CalibrationError,
    ReliabilityData,
    _calibration_compute,
    _calibration_update,
    _check_binning,
    _reliability_compute,
)
from dropkit.metrics.classification import (
    UncertaintyScores,
    _check_labels,
    _check_mean_probs,
    _check_samples,
    _uncertainty_scores,
    brier_score,
    nll,
)

__all__ = [
    "Accuracy",
    "BrierScore",
    "CalibrationMetric",
    "MCUncertainty",
    "NegativeLogLikelihood",
]


class _Metric:
    """Shared ``reset``/``compute`` guard; subclasses define ``_reset`` and ``_compute``."""

    def __init__(self) -> None:
        self._n_classes: int | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._n_classes = None
        self._reset()

    def _reset(self) -> None:
        raise NotImplementedError

    def _check_classes(self, n_classes: int) -> None:
        if self._n_classes is None:
            self._n_classes = n_classes
        elif n_classes != self._n_classes:
            raise ValueError(
                f"{type(self).__name__}: probs has {n_classes} classes, "
                f"but earlier batches had {self._n_classes}"
            )

    def _require_data(self, seen: int) -> None:
        if seen == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


class _SumMetric(_Metric):
    """Running sum of a per-input score and the number of inputs (for mean reductions)."""

    def _reset(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = 0

    def _add(self, probs: torch.Tensor, per_input_sum: torch.Tensor) -> None:
        self._check_classes(probs.shape[1])
        self.total = self.total + per_input_sum.detach().cpu().double()
        self.count += probs.shape[0]

    def compute(self) -> torch.Tensor:
        """The mean over every input seen, as a 0-d float64 tensor."""
        self._require_data(self.count)
        return self.total / self.count


class NegativeLogLikelihood(_SumMetric):
    """Mean NLL over batches; see :func:`dropkit.metrics.classification.nll` (positive, nats).

    Args:
        eps: lower clamp of ``p̄_y``; ``None`` for ``finfo(dtype).eps`` of each batch.

    Examples::

        >>> from dropkit.metrics.stateful import NegativeLogLikelihood
        >>> metric = NegativeLogLikelihood()
        >>> metric.update(torch.tensor([[0.8, 0.2]]), torch.tensor([0]))
        >>> metric.update(torch.tensor([[0.4, 0.6]]), torch.tensor([0]))
        >>> round(float(metric.compute()), 4)
        0.5697
    """

    def __init__(self, eps: float | None = None) -> None:
        self.eps = eps
        super().__init__()

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predictive probabilities ``(N, C)`` and class indices ``(N,)``."""
        self._add(probs, nll(probs, labels, eps=self.eps, reduction="sum"))

    def extra_repr(self) -> str:
        return f"eps={self.eps!r}"


class BrierScore(_SumMetric):
    """Mean multiclass Brier score over batches; see :func:`dropkit.metrics.classification.brier_score`.

    Examples::

        >>> from dropkit.metrics.stateful import BrierScore
        >>> metric = BrierScore()
        >>> metric.update(torch.tensor([[0.8, 0.2], [0.4, 0.6]]), torch.tensor([0, 0]))
        >>> round(float(metric.compute()), 4)
        0.4
    """

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predictive probabilities ``(N, C)`` and class indices ``(N,)``."""
        self._add(probs, brier_score(probs, labels, reduction="sum"))


class Accuracy(_SumMetric):
    """Top-1 accuracy over batches; see :func:`dropkit.metrics.classification.accuracy`.

    Examples::

        >>> from dropkit.metrics.stateful import Accuracy
        >>> metric = Accuracy()
        >>> metric.update(torch.tensor([[0.8, 0.2], [0.4, 0.6]]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([[0.1, 0.9]]), torch.tensor([1]))
        >>> round(float(metric.compute()), 4)
        0.6667
    """

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predictive probabilities ``(N, C)`` and class indices ``(N,)``."""
        mean_probs = _check_mean_probs(probs)
        targets = _check_labels(labels, mean_probs.shape[0], mean_probs.shape[1], device=mean_probs.device)
        self._add(mean_probs, (mean_probs.argmax(dim=1) == targets).sum())  # an exact count


class CalibrationMetric(_Metric):
    """ECE, MCE and reliability-diagram data accumulated over batches.

    Keeps every top-label confidence and correctness (two floats per input), because adaptive
    bins depend on all confidences. See :mod:`dropkit.metrics.calibration` for the bins.

    Args:
        n_bins: number of bins requested, ``>= 1``.
        binning: ``"uniform"`` or ``"adaptive"``.

    Examples::

        >>> from dropkit.metrics.stateful import CalibrationMetric
        >>> metric = CalibrationMetric(n_bins=4)
        >>> metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2]], dtype=torch.float64), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([[0.3, 0.7], [0.4, 0.6]], dtype=torch.float64), torch.tensor([1, 1]))
        >>> ece, used = metric.compute()
        >>> round(float(ece), 4), used
        (0.35, 4)
        >>> round(float(metric.max_calibration_error().value), 4)
        0.35
    """

    def __init__(self, n_bins: int = 15, binning: str = "uniform") -> None:
        self.n_bins, self.binning = _check_binning(n_bins, binning)
        super().__init__()

    def _reset(self) -> None:
        self._confidence: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predictive probabilities ``(N, C)`` and class indices ``(N,)``."""
        confidence, correct = _calibration_update(probs, labels)
        self._check_classes(probs.shape[1])
        self._confidence.append(confidence.cpu().double())
        self._correct.append(correct.cpu().double())

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(len(self._confidence))
        return torch.cat(self._confidence), torch.cat(self._correct)

    def compute(self) -> CalibrationError:
        """Expected calibration error, as :func:`~dropkit.metrics.calibration.expected_calibration_error`."""
        return _calibration_compute(*self._state(), self.n_bins, self.binning, "l1")

    def max_calibration_error(self) -> CalibrationError:
        """As :func:`~dropkit.metrics.calibration.max_calibration_error` on every batch seen."""
        return _calibration_compute(*self._state(), self.n_bins, self.binning, "max")

    def reliability_diagram_data(self) -> ReliabilityData:
        """As :func:`~dropkit.metrics.calibration.reliability_diagram_data` on every batch seen."""
        return _reliability_compute(*self._state(), self.n_bins, self.binning)

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}, binning={self.binning!r}"


class MCUncertainty(_Metric):
    """Per-input MC uncertainty summaries accumulated over batches of ``(T, N, C)`` samples.

    ``compute()`` returns :class:`~dropkit.metrics.classification.UncertaintyScores` for all inputs
    seen, concatenated in order along ``N``, and :meth:`correct` the matching correctness of the
    predictive mean when labels were passed (for
    :func:`~dropkit.metrics.detection.misclassification_detection`).
    ``T`` may differ between batches; ``C`` may not.

    Examples::

        >>> from dropkit.metrics.stateful import MCUncertainty
        >>> metric = MCUncertainty()
        >>> metric.update(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64))
        >>> metric.update(torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]], dtype=torch.float64))
        >>> metric.compute().mutual_information
        tensor([0.6931, 0.0000], dtype=torch.float64)
    """

    def _reset(self) -> None:
        self._scores: list[UncertaintyScores] = []
        self._correct: list[torch.Tensor] = []

    def update(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add MC samples ``(T, N, C)``; optionally the labels ``(N,)`` (all batches or none)."""
        samples = _check_samples(probs)
        if labels is not None:
            targets = _check_labels(labels, samples.shape[1], samples.shape[2])
        if self._scores and (labels is None) != (not self._correct):
            raise ValueError("labels must be passed to every update() or to none")
        self._check_classes(samples.shape[2])
        scores = _uncertainty_scores(samples.detach())
        self._scores.append(UncertaintyScores(*(score.cpu() for score in scores)))
        if labels is not None:
            self._correct.append((samples.mean(dim=0).argmax(dim=1) == targets).cpu())

    def compute(self) -> UncertaintyScores:
        """The four ``(N_total,)`` summaries of every input seen, in order."""
        self._require_data(len(self._scores))
        return UncertaintyScores(*(torch.cat(column) for column in zip(*self._scores, strict=True)))

    def correct(self) -> torch.Tensor:
        """Bool ``(N_total,)``: whether the predictive mean's argmax equals the label."""
        self._require_data(len(self._scores))
        if not self._correct:
            raise RuntimeError("MCUncertainty.correct() needs labels passed to update()")
        return torch.cat(self._correct)
