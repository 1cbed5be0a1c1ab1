"""Streaming statistics over Monte Carlo samples: no ``T x N x C`` tensor is ever held.

:class:`RunningMoments` keeps the count, mean and sum of squared deviations (``M2``) of a stream
of samples and merges a new batch of samples with Chan et al.'s parallel update (Welford's
update for a batch of one); :class:`MCSummary` adds the running sums that classification
uncertainty needs (mean per-sample entropy, votes of the per-sample argmax).  Accumulation is
in float64; results are returned in the dtype of the samples.
"""

from __future__ import annotations

import torch

__all__ = ["MCSummary", "RunningMoments"]


def _check_samples(samples: object, name: str = "samples") -> torch.Tensor:
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(samples).__name__}")
    if samples.dim() < 1:
        raise ValueError(f"{name} must have a leading sample dim, got shape {tuple(samples.shape)}")
    if not (samples.is_floating_point() or samples.is_complex()):
        raise TypeError(f"{name} must be floating point, got dtype {samples.dtype}")
    return samples


class RunningMoments:
    r"""Running mean and variance over the leading (sample) dim of a stream of tensors.

    ``update(batch)`` merges ``k`` new samples (a tensor of shape ``(k, *shape)``) by Chan's
    formula: with counts :math:`n_a, n_b`, means :math:`\mu_a, \mu_b` and sums of squared
    deviations :math:`M_a, M_b`, :math:`\delta = \mu_b - \mu_a`, the merged values are
    :math:`n = n_a + n_b`, :math:`\mu = \mu_a + \delta n_b / n` and
    :math:`M = M_a + M_b + \delta^2 n_a n_b / n`.  The result does not depend on how the stream
    was split, up to float64 rounding.

    Examples::

        >>> from dropkit.mc.streaming import RunningMoments
        >>> samples = torch.tensor([[1.0], [2.0], [4.0], [9.0]])
        >>> moments = RunningMoments()
        >>> moments.update(samples[:1]).update(samples[1:])
        RunningMoments(count=4, shape=(1,))
        >>> moments.mean, moments.variance, moments.sample_variance
        (tensor([4.]), tensor([9.5000]), tensor([12.6667]))
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        shape = None if self._mean is None else tuple(self._mean.shape)
        return f"RunningMoments(count={self.count}, shape={shape})"

    def update(self, samples: torch.Tensor) -> RunningMoments:
        """Merge the samples stacked along dim 0 of ``samples``; returns ``self``.

        Args:
            samples: a floating tensor of shape ``(k, *shape)``, ``k >= 1``; ``shape`` must be
                the same in every update.

        Returns:
            This object, updated.
        """
        samples = _check_samples(samples)
        if samples.shape[0] == 0:
            return self
        wide = torch.complex128 if samples.is_complex() else torch.float64
        batch = samples.detach().to(wide)
        count = batch.shape[0]
        mean = batch.mean(dim=0)
        m2 = (batch - mean).abs().square().sum(dim=0)
        return self._merge(count, mean, m2, samples.dtype)

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Merge the statistics of ``other`` (another stream of samples) into this one.

        Args:
            other: a :class:`RunningMoments` of samples of the same shape.

        Returns:
            This object, updated.
        """
        if not isinstance(other, RunningMoments):
            raise TypeError(f"other must be a RunningMoments, got {type(other).__name__}")
        if other.count == 0 or other._mean is None or other._m2 is None or other._dtype is None:
            return self
        return self._merge(other.count, other._mean, other._m2, other._dtype)

    def _merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype) -> RunningMoments:
        if self._mean is None or self._m2 is None:
            self.count, self._mean, self._m2, self._dtype = count, mean.clone(), m2.clone(), dtype
            return self
        if mean.shape != self._mean.shape:
            raise ValueError(
                f"samples must keep the shape {tuple(self._mean.shape)} of the earlier ones, "
                f"got {tuple(mean.shape)}"
            )
        total = self.count + count
        delta = mean.to(self._mean.device) - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2.to(self._m2.device) + delta.abs().square() * (self.count * count / total)
        self.count = total
        return self

    def _result(self, value: torch.Tensor | None) -> torch.Tensor:
        if value is None or self._dtype is None:
            raise RuntimeError("RunningMoments has seen no samples yet")
        return value.to(self._dtype) if value.is_complex() == self._dtype.is_complex else value

    @property
    def mean(self) -> torch.Tensor:
        """Mean over the samples seen."""
        return self._result(self._mean)

    @property
    def m2(self) -> torch.Tensor:
        """Sum of squared deviations from the mean (float64)."""
        if self._m2 is None:
            raise RuntimeError("RunningMoments has seen no samples yet")
        return self._m2

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (``ddof = 0``): ``mean_t y_t² - ŷ²``, the MC predictive variance."""
        return self._result(self.m2 / self.count).real

    @property
    def sample_variance(self) -> torch.Tensor:
        """Unbiased variance (``ddof = 1``); NaN for a single sample."""
        denominator = self.count - 1
        if denominator == 0:
            return self._result(torch.full_like(self.m2.real, float("nan")))
        return self._result(self.m2 / denominator).real

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation (``ddof = 0``)."""
        return self.variance.sqrt()


class MCSummary:
    """Streaming summary of Monte Carlo samples of shape ``(T, *shape)``.

    Always keeps :class:`RunningMoments` (``count``, ``mean``, ``variance``, ``std``,
    ``sample_variance``).  With ``probabilities=True`` the samples are probability vectors along
    the last dim and it also keeps the running sums that classification uncertainty needs:

    * ``mean_entropy``: :math:`\\frac1T\\sum_t H[p_t]` (natural log; :math:`0 \\log 0 = 0`),
      the expected (aleatoric) entropy; with ``mean`` (:math:`\\bar p`) it gives predictive
      entropy :math:`H[\\bar p]` and mutual information (BALD) in :mod:`dropkit.metrics`;
    * ``votes``: int64 counts, over the samples, of each class being the per-sample argmax
      (variation ratio = 1 - max votes / T).

    Args:
        probabilities: also keep ``mean_entropy`` and ``votes``.

    Examples::

        >>> from dropkit.mc.streaming import MCSummary
        >>> probs = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])  # T = 2 samples, N = 1, C = 2
        >>> summary = MCSummary(probabilities=True).update(probs)
        >>> summary.mean, summary.votes
        (tensor([[0.7500, 0.2500]]), tensor([[2, 0]]))
        >>> round(float(summary.mean_entropy[0]), 6)  # (ln 2 + 0) / 2
        0.346574
    """

    def __init__(self, probabilities: bool = False) -> None:
        if not isinstance(probabilities, bool):
            raise TypeError(f"probabilities must be a bool, got {type(probabilities).__name__}")
        self.probabilities = probabilities
        self.moments = RunningMoments()
        self._entropy_sum: torch.Tensor | None = None
        self._votes: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"MCSummary(count={self.count}, probabilities={self.probabilities})"

    def update(self, samples: torch.Tensor) -> MCSummary:
        """Merge the samples stacked along dim 0 of ``samples`` (shape ``(k, *shape)``).

        Args:
            samples: a floating tensor; with ``probabilities=True`` at least 2-D, with the
                classes on the last dim.

        Returns:
            This object, updated.
        """
        samples = _check_samples(samples)
        self.moments.update(samples)
        if self.probabilities:
            if samples.dim() < 2:
                raise ValueError(f"probability samples need shape (k, *, C), got {tuple(samples.shape)}")
            wide = samples.detach().to(torch.float64)
            entropy = torch.special.entr(wide).sum(dim=-1).sum(dim=0)
            votes = torch.nn.functional.one_hot(wide.argmax(dim=-1), wide.shape[-1]).sum(dim=0)
            self._entropy_sum = entropy if self._entropy_sum is None else self._entropy_sum + entropy
            self._votes = votes if self._votes is None else self._votes + votes
        return self

    def merge(self, other: MCSummary) -> MCSummary:
        """Merge the summary of another stream of samples (another rank's share of ``T``) into
        this one: moments by Chan's formula, entropy sums and votes added.

        Args:
            other: an :class:`MCSummary` with the same ``probabilities`` setting, of samples of
                the same shape.

        Returns:
            This object, updated.
        """
        if not isinstance(other, MCSummary):
            raise TypeError(f"other must be an MCSummary, got {type(other).__name__}")
        if other.probabilities != self.probabilities:
            raise ValueError(
                f"other must have probabilities={self.probabilities} like this summary, got "
                f"probabilities={other.probabilities}"
            )
        self.moments.merge(other.moments)
        for name in ("_entropy_sum", "_votes"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs is not None:
                setattr(self, name, theirs.clone() if mine is None else mine + theirs.to(mine.device))
        return self

    @property
    def count(self) -> int:
        """Number of samples seen (T)."""
        return self.moments.count

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the samples (the mean probabilities with ``probabilities=True``)."""
        return self.moments.mean

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over the samples (``ddof = 0``)."""
        return self.moments.variance

    @property
    def sample_variance(self) -> torch.Tensor:
        """Unbiased variance over the samples (``ddof = 1``)."""
        return self.moments.sample_variance

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation over the samples."""
        return self.moments.std

    @property
    def mean_entropy(self) -> torch.Tensor:
        """Mean over the samples of each sample's entropy (natural log), shape ``shape[:-1]``."""
        if self._entropy_sum is None:
            raise RuntimeError("mean_entropy needs probabilities=True and at least one update")
        return self._entropy_sum.div(self.count).to(self.mean.dtype)

    @property
    def votes(self) -> torch.Tensor:
        """How many samples voted for each class (per-sample argmax), int64."""
        if self._votes is None:
            raise RuntimeError("votes needs probabilities=True and at least one update")
        return self._votes
