"""Regression metrics for Monte Carlo (MC) dropout samples (Gal & Ghahramani 2016).

Conventions (shared by every function here):

* ``samples`` holds ``T`` stochastic forward passes with the **sample axis first**: shape
  ``(T, N)`` for one output or ``(T, N, D)`` for ``D`` outputs; ``target`` has shape ``(N,)`` or
  ``(N, D)``.  Everything is computed in float64.
* ``tau`` is the model precision (inverse observation-noise variance) in the units of
  ``target``; the observation noise is isotropic over the ``D`` outputs.
* Log-likelihoods are log-densities (higher is better), not NLLs.  ``reduction="mean"``
  averages over the ``N`` points; ``"none"`` returns one value per point.
* Spreads are standard deviations of the predictive distribution, not standard errors.

With ``ŷ_t`` the ``T`` samples and ``ȳ = mean_t ŷ_t``:

* MC RMSE: ``sqrt(mean_i (y_i - ȳ_i)²)``;
* predictive variance: ``1/τ + mean_t ŷ_t² - ȳ²``;
* mixture log-likelihood (the exact log-density of the equal-weight ``T``-component Gaussian
  mixture): ``LL_i = logsumexp_t(-τ/2 ||y_i - ŷ_{t,i}||²) - log T - D/2 log 2π + D/2 log τ``;
* moment-matched Gaussian log-likelihood: the log-density of ``N(ȳ, 1/τ + var_t ŷ)``.

For large ``T`` (the benchmark uses ``T = 10,000``) feed chunks of samples to
:class:`MCRegressionAccumulator`, which keeps running moments and a running log-sum-exp and
never holds ``T x N`` values at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "MCRegressionAccumulator",
    "calibration_curve",
    "gaussian_log_likelihood",
    "interval_coverage",
    "mc_rmse",
    "mixture_log_likelihood",
    "predictive_mean",
    "predictive_variance",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _check_samples(samples: object, target: object | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
    if samples.dim() not in (2, 3):
        raise ValueError(
            "samples must have shape (T, N) or (T, N, D) (sample axis first), "
            f"got shape {tuple(samples.shape)}"
        )
    if samples.shape[0] < 1:
        raise ValueError(f"samples must hold at least one sample (T >= 1), got shape {tuple(samples.shape)}")
    s = samples.to(torch.float64)
    if target is None:
        return s, None
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if tuple(target.shape) != tuple(samples.shape[1:]):
        raise ValueError(
            f"target must have shape {tuple(samples.shape[1:])} (samples without the sample axis), "
            f"got {tuple(target.shape)}"
        )
    return s, target.to(torch.float64)


def _check_pair(samples: object, target: object) -> tuple[torch.Tensor, torch.Tensor]:
    s, y = _check_samples(samples, target)
    if y is None:  # unreachable: _check_samples checked target
        raise TypeError("target must be a torch.Tensor, got None")
    return s, y


def _check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__} ({tau!r})")
    value = float(tau)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"tau must be a finite float > 0, got {tau!r}")
    return value


def _check_level(level: object, name: str = "level") -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(level).__name__} ({level!r})")
    value = float(level)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {level!r}")
    return value


def _z_score(level: float) -> float:
    """``Φ⁻¹((1 + level) / 2)``: half-width of the central ``level`` interval in standard deviations."""
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(level, dtype=torch.float64)))


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _point_sum(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Sum over the output axis D when present (``ndim`` is the rank of ``samples``)."""
    return x.sum(-1) if ndim == 3 else x


def predictive_mean(samples: torch.Tensor) -> torch.Tensor:
    """The MC predictive mean ``ȳ = mean_t ŷ_t``, shape ``samples.shape[1:]``, float64.

    Example:
        >>> predictive_mean(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([2., 4.], dtype=torch.float64)
    """
    s, _ = _check_samples(samples)
    return s.mean(0)


def predictive_variance(samples: torch.Tensor, tau: float | None = None) -> torch.Tensor:
    """Predictive variance ``1/τ + mean_t ŷ_t² - ȳ²`` (the sample variance with ddof 0, plus the
    observation noise ``1/τ`` when ``tau`` is given).

    Args:
        samples: ``(T, N)`` or ``(T, N, D)``.
        tau: model precision; ``None`` gives the epistemic part only.

    Returns:
        Shape ``samples.shape[1:]``, float64.

    Example:
        >>> predictive_variance(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), tau=2.0)
        tensor([1.5000, 4.5000], dtype=torch.float64)
    """
    s, _ = _check_samples(samples)
    var = s.var(0, correction=0)
    return var if tau is None else var + 1.0 / _check_tau(tau)


def mc_rmse(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MC RMSE ``sqrt(mean_i (y_i - mean_t ŷ_{t,i})²)`` (mean over points and outputs), a scalar.

    Example:
        >>> mc_rmse(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), torch.tensor([2.0, 1.0]))
        tensor(2.1213, dtype=torch.float64)
    """
    s, y = _check_pair(samples, target)
    return (y - s.mean(0)).square().mean().sqrt()


def mixture_log_likelihood(
    samples: torch.Tensor, target: torch.Tensor, tau: float, reduction: str = "mean"
) -> torch.Tensor:
    """Log-density of the equal-weight Gaussian mixture of the MC samples (Gal & Ghahramani 2016).

    ``LL_i = logsumexp_t(-τ/2 ||y_i - ŷ_{t,i}||²) - log T - D/2 log 2π + D/2 log τ``

    Computed with a log-sum-exp, so it never underflows however far the target lies from the
    samples.  This is the test log-likelihood of the UCI benchmark.

    Args:
        samples: ``(T, N)`` or ``(T, N, D)``.
        target: ``(N,)`` or ``(N, D)``.
        tau: model precision, in the units of ``target``.
        reduction: ``"mean"`` (over points) or ``"none"`` (shape ``(N,)``).

    Example:
        >>> ll = mixture_log_likelihood(torch.zeros(3, 2), torch.zeros(2), tau=1.0)
        >>> round(ll.item(), 6) == round(-0.5 * math.log(2 * math.pi), 6)
        True
    """
    s, y = _check_pair(samples, target)
    t = _check_tau(tau)
    d = 1 if s.dim() == 2 else s.shape[2]
    sq = _point_sum((y.unsqueeze(0) - s).square(), s.dim())
    ll = torch.logsumexp(-0.5 * t * sq, dim=0) - math.log(s.shape[0]) + 0.5 * d * (math.log(t) - _LOG_2PI)
    return _reduce(ll, reduction)


def gaussian_log_likelihood(
    samples: torch.Tensor, target: torch.Tensor, tau: float, reduction: str = "mean"
) -> torch.Tensor:
    """Log-density of the moment-matched Gaussian ``N(ȳ, 1/τ + var_t ŷ)`` (independent outputs).

    ``LL_i = Σ_d [-½ log 2π - ½ log sigma²_{i,d} - (y_{i,d} - ȳ_{i,d})² / (2 sigma²_{i,d})]`` with
    ``sigma² = 1/τ + mean_t ŷ_t² - ȳ²``.  Slightly below :func:`mixture_log_likelihood` in general.

    Example:
        >>> ll = gaussian_log_likelihood(torch.zeros(3, 2), torch.zeros(2), tau=1.0)
        >>> round(ll.item(), 6) == round(-0.5 * math.log(2 * math.pi), 6)
        True
    """
    s, y = _check_pair(samples, target)
    var = s.var(0, correction=0) + 1.0 / _check_tau(tau)
    lp = -0.5 * (_LOG_2PI + var.log() + (y - s.mean(0)).square() / var)
    return _reduce(_point_sum(lp, s.dim()), reduction)


def _interval(
    samples: torch.Tensor, level: float, method: str, tau: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "gaussian":
        mean = samples.mean(0)
        var = samples.var(0, correction=0) + (0.0 if tau is None else 1.0 / _check_tau(tau))
        z = _z_score(level)
        half = z * var.sqrt()
        return mean - half, mean + half
    if method == "quantile":
        if tau is not None:
            raise ValueError("tau applies to method='gaussian' only; the quantile interval uses the samples")
        alpha = 0.5 * (1.0 - level)
        q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
        bounds = torch.quantile(samples, q, dim=0)
        return bounds[0], bounds[1]
    raise ValueError(f"method must be 'gaussian' or 'quantile', got {method!r}")


def interval_coverage(
    samples: torch.Tensor,
    target: torch.Tensor,
    level: float = 0.95,
    method: str = "gaussian",
    tau: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage (PICP) and mean width (MPIW) of central predictive intervals.

    * ``method="gaussian"``: ``ȳ ± z sigma`` with ``z = Φ⁻¹((1 + level)/2)`` and ``sigma² = var_t ŷ``
      (+ ``1/τ`` when ``tau`` is given: the full predictive variance);
    * ``method="quantile"``: the empirical ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of
      the samples (linear interpolation, as ``numpy.quantile``); epistemic only.

    Args:
        samples: ``(T, N)`` or ``(T, N, D)``.
        target: ``(N,)`` or ``(N, D)``.
        level: nominal coverage in (0, 1).
        method: ``"gaussian"`` or ``"quantile"``.
        tau: model precision (gaussian only).

    Returns:
        ``(picp, mpiw)``: the fraction of targets inside their interval and the mean width, over
        all points and outputs (float64 scalars).

    Example:
        >>> s = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
        >>> picp, mpiw = interval_coverage(s, torch.tensor([1.0, 5.0]), level=0.5, method="quantile")
        >>> picp.item(), mpiw.item()
        (0.5, 1.0)
    """
    s, y = _check_pair(samples, target)
    lower, upper = _interval(s, _check_level(level), method, tau)
    inside = (y >= lower) & (y <= upper)
    return inside.to(torch.float64).mean(), (upper - lower).mean()


def calibration_curve(
    samples: torch.Tensor,
    target: torch.Tensor,
    levels: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    method: str = "gaussian",
    tau: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected vs observed coverage of central intervals at several levels.

    A calibrated model has ``observed ≈ expected``; ``observed < expected`` is over-confidence.

    Returns:
        ``(expected, observed)``, two float64 tensors of shape ``(len(levels),)``; ``observed[k]``
        is the PICP of :func:`interval_coverage` at ``levels[k]``.

    Example:
        >>> s = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
        >>> calibration_curve(s, torch.tensor([1.0, 5.0]), levels=[0.5], method="quantile")
        (tensor([0.5000], dtype=torch.float64), tensor([0.5000], dtype=torch.float64))
    """
    s, y = _check_pair(samples, target)
    checked = [_check_level(level, "levels entry") for level in levels]
    if not checked:
        raise ValueError("levels must not be empty")
    observed = []
    for level in checked:
        lower, upper = _interval(s, level, method, tau)
        observed.append(((y >= lower) & (y <= upper)).to(torch.float64).mean())
    return torch.tensor(checked, dtype=torch.float64), torch.stack(observed)


class MCRegressionAccumulator:
    """Streaming MC regression metrics: feed samples in chunks along the sample axis.

    Keeps, per point, the running mean and sum of squared deviations (Chan et al.'s parallel
    update, stable for any chunk size) and, for every precision in ``taus``, a running
    log-sum-exp of ``-τ/2 ||y - ŷ_t||²``.  Memory is ``O(N · (D + len(taus)))`` whatever ``T``;
    results equal the functions of this module on the concatenated samples (to rounding).

    Args:
        target: ``(N,)`` or ``(N, D)``; the samples of :meth:`update` must match it.
        taus: precisions for which the mixture log-likelihood is tracked (may be empty).

    Example:
        >>> acc = MCRegressionAccumulator(torch.tensor([0.0, 1.0]), taus=[1.0])
        >>> acc.update(torch.tensor([[0.0, 1.0]]))
        >>> acc.update(torch.tensor([[2.0, 1.0]]))
        >>> acc.count, acc.mean()
        (2, tensor([1., 1.], dtype=torch.float64))
        >>> acc.rmse()
        tensor(0.7071, dtype=torch.float64)
    """

    def __init__(self, target: torch.Tensor, taus: Sequence[float] = ()) -> None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
        if target.dim() not in (1, 2):
            raise ValueError(f"target must have shape (N,) or (N, D), got {tuple(target.shape)}")
        self.target = target.detach().to(torch.float64)
        self.taus = torch.tensor([_check_tau(t) for t in taus], dtype=torch.float64)
        self.count = 0
        self._mean = torch.zeros_like(self.target)
        self._m2 = torch.zeros_like(self.target)
        n = self.target.shape[0]
        self._lse = torch.full((len(self.taus), n), -math.inf, dtype=torch.float64)

    def update(self, samples: torch.Tensor) -> None:
        """Add a chunk ``(t, N)`` or ``(t, N, D)`` of samples (sample axis first)."""
        s, _ = _check_samples(samples.detach(), self.target)
        t = s.shape[0]
        chunk_mean = s.mean(0)
        chunk_m2 = (s - chunk_mean).square().sum(0)
        total = self.count + t
        delta = chunk_mean - self._mean
        self._m2 = self._m2 + chunk_m2 + delta.square() * (self.count * t / total)
        self._mean = self._mean + delta * (t / total)
        self.count = total
        if len(self.taus):
            sq = _point_sum((self.target.unsqueeze(0) - s).square(), s.dim())  # (t, N)
            terms = -0.5 * self.taus.view(-1, 1, 1) * sq.unsqueeze(0)  # (K, t, N)
            self._lse = torch.logaddexp(self._lse, torch.logsumexp(terms, dim=1))

    def _require(self) -> None:
        if self.count == 0:
            raise ValueError("no samples yet: call update() first")

    def mean(self) -> torch.Tensor:
        """Predictive mean, shape of ``target``."""
        self._require()
        return self._mean.clone()

    def variance(self, tau: float | None = None) -> torch.Tensor:
        """Predictive variance (ddof 0), plus ``1/τ`` when ``tau`` is given."""
        self._require()
        var = self._m2 / self.count
        return var if tau is None else var + 1.0 / _check_tau(tau)

    def rmse(self) -> torch.Tensor:
        """MC RMSE of the samples so far."""
        self._require()
        return (self.target - self._mean).square().mean().sqrt()

    def mixture_log_likelihood(self, reduction: str = "mean") -> torch.Tensor:
        """Mixture log-likelihood for every tracked ``tau``: shape ``(K,)`` (mean) or ``(K, N)``."""
        self._require()
        d = 1 if self.target.dim() == 1 else self.target.shape[1]
        ll = self._lse - math.log(self.count) + 0.5 * d * (self.taus.log() - _LOG_2PI).unsqueeze(1)
        if reduction == "mean":
            return ll.mean(1)
        return _reduce(ll, reduction)

    def gaussian_log_likelihood(self, tau: float, reduction: str = "mean") -> torch.Tensor:
        """Moment-matched Gaussian log-likelihood (see :func:`gaussian_log_likelihood`)."""
        var = self.variance(tau)
        lp = -0.5 * (_LOG_2PI + var.log() + (self.target - self._mean).square() / var)
        return _reduce(_point_sum(lp, self.target.dim() + 1), reduction)

    def interval_coverage(
        self, level: float = 0.95, tau: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PICP and MPIW of the Gaussian central interval (see :func:`interval_coverage`)."""
        z = (
            math.sqrt(2.0)
            * torch.special.erfinv(torch.tensor(_check_level(level), dtype=torch.float64)).item()
        )
        half = z * self.variance(tau).sqrt()
        inside = (self.target >= self._mean - half) & (self.target <= self._mean + half)
        return inside.to(torch.float64).mean(), (2.0 * half).mean()
