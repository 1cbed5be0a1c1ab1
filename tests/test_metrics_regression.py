"""Regression metrics for MC samples, against direct numpy/scipy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from dropkit.metrics.regression import (
    MCRegressionAccumulator,
    calibration_curve,
    gaussian_log_likelihood,
    interval_coverage,
    mc_rmse,
    mixture_log_likelihood,
    predictive_mean,
    predictive_variance,
)


def _data(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0 + 1.0
    target = torch.randn(*shape[1:], generator=g, dtype=torch.float64) * 3.0
    return samples, target


def _mixture_ll_direct(s: np.ndarray, y: np.ndarray, tau: float) -> np.ndarray:
    t = s.shape[0]
    sq = (y[None] - s) ** 2
    if s.ndim == 3:
        sq = sq.sum(-1)
    d = 1 if s.ndim == 2 else s.shape[2]
    return (
        logsumexp(-0.5 * tau * sq, axis=0) - np.log(t) - 0.5 * d * np.log(2 * np.pi) + 0.5 * d * np.log(tau)
    )


@pytest.mark.parametrize("shape", [(50, 7), (13, 5, 3), (1, 4)])
@pytest.mark.parametrize("tau", [0.1, 2.5])
def test_mixture_log_likelihood_matches_direct(shape: tuple[int, ...], tau: float) -> None:
    s, y = _data(shape)
    expected = _mixture_ll_direct(s.numpy(), y.numpy(), tau)
    got = mixture_log_likelihood(s, y, tau, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert mixture_log_likelihood(s, y, tau).item() == pytest.approx(expected.mean(), rel=1e-12)


def test_mixture_log_likelihood_far_target_does_not_underflow() -> None:
    s = torch.zeros(10, 2)
    y = torch.tensor([1e3, -1e3])
    ll = mixture_log_likelihood(s, y, 1.0, reduction="none")
    expected = -0.5 * 1e6 - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(ll.numpy(), [expected, expected], rtol=1e-12)


def test_single_sample_mixture_is_gaussian() -> None:
    s, y = _data((1, 6))
    tau = 0.7
    expected = stats.norm.logpdf(y.numpy(), loc=s[0].numpy(), scale=1 / math.sqrt(tau))
    np.testing.assert_allclose(
        mixture_log_likelihood(s, y, tau, reduction="none").numpy(), expected, rtol=1e-12
    )


@pytest.mark.parametrize("shape", [(40, 9), (17, 4, 2)])
def test_moments_rmse_and_gaussian_ll(shape: tuple[int, ...]) -> None:
    s, y = _data(shape, seed=1)
    sn, yn = s.numpy(), y.numpy()
    tau = 1.3
    np.testing.assert_allclose(predictive_mean(s).numpy(), sn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(predictive_variance(s).numpy(), sn.var(0), rtol=1e-12)
    np.testing.assert_allclose(predictive_variance(s, tau).numpy(), sn.var(0) + 1 / tau, rtol=1e-12)
    assert mc_rmse(s, y).item() == pytest.approx(np.sqrt(((yn - sn.mean(0)) ** 2).mean()), rel=1e-12)
    lp = stats.norm.logpdf(yn, loc=sn.mean(0), scale=np.sqrt(sn.var(0) + 1 / tau))
    if lp.ndim == 2:
        lp = lp.sum(-1)
    np.testing.assert_allclose(gaussian_log_likelihood(s, y, tau, reduction="none").numpy(), lp, rtol=1e-12)
    assert gaussian_log_likelihood(s, y, tau).item() == pytest.approx(lp.mean(), rel=1e-12)


def test_mixture_beats_moment_matching_on_bimodal_samples() -> None:
    s = torch.cat([torch.full((50, 1), -3.0), torch.full((50, 1), 3.0)])
    y = torch.tensor([3.0])
    assert mixture_log_likelihood(s, y, 4.0) > gaussian_log_likelihood(s, y, 4.0)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95])
def test_gaussian_interval_against_scipy(level: float) -> None:
    s, y = _data((30, 200), seed=2)
    sn, yn = s.numpy(), y.numpy()
    tau = 0.5
    sd = np.sqrt(sn.var(0) + 1 / tau)
    z = stats.norm.ppf(0.5 + level / 2)
    lo, hi = sn.mean(0) - z * sd, sn.mean(0) + z * sd
    picp, mpiw = interval_coverage(s, y, level, "gaussian", tau)
    assert picp.item() == pytest.approx(((yn >= lo) & (yn <= hi)).mean(), abs=1e-12)
    assert mpiw.item() == pytest.approx((hi - lo).mean(), rel=1e-10)


def test_quantile_interval_against_numpy() -> None:
    s, y = _data((31, 100), seed=3)
    sn, yn = s.numpy(), y.numpy()
    lo, hi = np.quantile(sn, [0.05, 0.95], axis=0)
    picp, mpiw = interval_coverage(s, y, 0.9, "quantile")
    assert picp.item() == pytest.approx(((yn >= lo) & (yn <= hi)).mean(), abs=1e-12)
    assert mpiw.item() == pytest.approx((hi - lo).mean(), rel=1e-12)


def test_calibration_curve_is_coverage_per_level() -> None:
    s, y = _data((25, 80), seed=4)
    levels = [0.2, 0.5, 0.8]
    expected, observed = calibration_curve(s, y, levels, method="gaussian", tau=1.0)
    assert expected.tolist() == levels
    for level, obs in zip(levels, observed, strict=True):
        assert obs.item() == interval_coverage(s, y, level, "gaussian", 1.0)[0].item()


def test_calibrated_gaussian_model_is_calibrated() -> None:
    # Samples from the true predictive distribution: coverage close to nominal (n = 20000,
    # binomial sd <= 0.0036; the margin is 6 sd).
    g = torch.Generator().manual_seed(5)
    n = 20000
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    s = mu + 0.5 * torch.randn(200, n, generator=g, dtype=torch.float64)
    tau = 4.0  # noise sd 0.5
    y = mu + math.sqrt(0.25 + 1 / tau) * torch.randn(n, generator=g, dtype=torch.float64)
    expected, observed = calibration_curve(s, y, [0.5, 0.9], tau=tau)
    assert (observed - expected).abs().max().item() < 0.022


@pytest.mark.parametrize("shape", [(37, 6), (23, 5, 2)])
def test_accumulator_in_chunks_equals_full(shape: tuple[int, ...]) -> None:
    s, y = _data(shape, seed=6)
    taus = [0.3, 2.0]
    acc = MCRegressionAccumulator(y, taus)
    for chunk in torch.split(s, [1, 10, 5, s.shape[0] - 16]):
        acc.update(chunk)
    assert acc.count == s.shape[0]
    torch.testing.assert_close(acc.mean(), predictive_mean(s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.variance(), predictive_variance(s), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(acc.rmse(), mc_rmse(s, y), rtol=1e-12, atol=1e-12)
    expected = torch.stack([mixture_log_likelihood(s, y, t) for t in taus])
    torch.testing.assert_close(acc.mixture_log_likelihood(), expected, rtol=1e-12, atol=1e-12)
    per_point = torch.stack([mixture_log_likelihood(s, y, t, reduction="none") for t in taus])
    torch.testing.assert_close(acc.mixture_log_likelihood("none"), per_point, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        acc.gaussian_log_likelihood(0.3), gaussian_log_likelihood(s, y, 0.3), rtol=1e-10, atol=1e-12
    )
    picp, mpiw = acc.interval_coverage(0.9, tau=0.3)
    ref = interval_coverage(s, y, 0.9, "gaussian", 0.3)
    assert picp.item() == ref[0].item()
    assert mpiw.item() == pytest.approx(ref[1].item(), rel=1e-10)


def test_accumulator_requires_samples() -> None:
    acc = MCRegressionAccumulator(torch.zeros(3))
    with pytest.raises(ValueError, match="no samples"):
        acc.mean()
    with pytest.raises(ValueError, match="target must have shape"):
        acc.update(torch.zeros(2, 4))


def test_bad_inputs() -> None:
    s, y = _data((5, 4))
    with pytest.raises(TypeError, match=r"samples must be a torch\.Tensor"):
        mc_rmse(s.numpy(), y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"samples must have shape \(T, N\)"):
        mc_rmse(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        mc_rmse(s, torch.zeros(5))
    with pytest.raises(ValueError, match=r"tau must be a finite float > 0, got 0.0"):
        mixture_log_likelihood(s, y, 0.0)
    with pytest.raises(TypeError, match="tau must be a float"):
        mixture_log_likelihood(s, y, "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction must be"):
        mixture_log_likelihood(s, y, 1.0, reduction="sum")
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\), got 1.0"):
        interval_coverage(s, y, 1.0)
    with pytest.raises(ValueError, match="method must be"):
        interval_coverage(s, y, 0.9, method="bootstrap")
    with pytest.raises(ValueError, match="tau applies to method='gaussian' only"):
        interval_coverage(s, y, 0.9, method="quantile", tau=1.0)
    with pytest.raises(ValueError, match="levels must not be empty"):
        calibration_curve(s, y, [])
