"""Inverted dropout preserves the expectation exactly at every rate, near p = 1 included.

The engine drops element j when its 16-bit draw is below ``t = round(p 2**16)``, so the realised
keep probability is ``q = (2**16 - t) / 2**16``, not ``1 - p``.  Scaling kept units by
``1 / (1 - p)`` gave ``E[y] / x = (1 - t / 2**16) / (1 - p)``: 1.526 at p = 0.99999, 1.068 at
0.9999.  dropkit scales by ``1 / q``: every kept unit is exactly ``x * 2**16 / (2**16 - t)``, so
``E[y] = x`` up to float rounding, on both engines, and the sample mean is within its binomial
bound of ``x``.
"""

from __future__ import annotations

import math

import pytest
import torch

import dropkit
from dropkit import functional as F
from tests.conftest import SIGMAS

N = 1 << 24
RATES = [0.5, 0.9, 0.999, 0.9999, 0.99999]


def _keep_probability(p: float) -> float:
    return (2**16 - round(p * 2**16)) / 2**16


def _check_exact_expectation(y: torch.Tensor, p: float) -> None:
    q = _keep_probability(p)
    scale = 1.0 / q
    values = torch.unique(y)
    assert set(values.tolist()) <= {0.0, scale}, "every output is 0 or x / q, q the realised keep rate"
    # The mean of N independent {0, 1/q} draws: expectation 1, variance (1 - q) / (q N).
    bound = SIGMAS * math.sqrt((1.0 - q) / (q * y.numel()))
    assert abs(y.mean().item() - 1.0) <= bound


@pytest.mark.parametrize("p", RATES)
def test_the_mean_of_inverted_dropout_is_the_input_at_every_rate(p: float) -> None:
    x = torch.ones(N, dtype=torch.float64, requires_grad=True)
    y = F.dropout(x, p, seed=dropkit.make_key(21))
    _check_exact_expectation(y.detach(), p)
    (grad,) = torch.autograd.grad(y.sum(), x)
    _check_exact_expectation(grad, p)  # the gradient goes through the same mask and scale


def test_the_bound_rejects_the_unrealised_scale_near_one() -> None:
    # At p = 0.99999 the old 1 / (1 - p) scale gives a mean of 1.526: outside the bound.
    p = 0.99999
    q = _keep_probability(p)
    old_mean = q / (1.0 - p)
    assert abs(old_mean - 1.0) > SIGMAS * math.sqrt((1.0 - q) / (q * N))


@pytest.mark.parametrize("p", [0.3, 0.99999])
def test_the_reference_engine_draws_the_same_exact_expectation(p: float) -> None:
    x = torch.ones(1 << 20, dtype=torch.float64)
    fast = F.dropout(x, p, seed=dropkit.make_key(22))
    with dropkit.use_reference_engine():
        reference = F.dropout(x, p, seed=dropkit.make_key(22))
    assert torch.equal(fast, reference)
    assert set(torch.unique(fast).tolist()) <= {0.0, 1.0 / _keep_probability(p)}


@pytest.mark.parametrize("p", [0.3, 0.999])
def test_original_dropout_scales_eval_by_the_realised_keep_rate(p: float) -> None:
    # Unscaled training keeps x with probability q; eval multiplies by the same q.
    x = torch.ones(N, dtype=torch.float64)
    train = F.dropout(x, p, seed=dropkit.make_key(23), inverted=False)
    q = _keep_probability(p)
    assert torch.equal(F.dropout(x, p, training=False, inverted=False), x * q)
    bound = SIGMAS * math.sqrt(q * (1.0 - q) / N)
    assert abs(train.mean().item() - q) <= bound


def test_a_tensor_rate_gives_the_float_rates_scale_exactly() -> None:
    for p in [*RATES, 0.3, 1.0 - 2**-18]:
        x = torch.ones(4096)
        key = dropkit.make_key(24)
        from_tensor = F.dropout(x, torch.tensor([p], dtype=torch.float64), seed=key)
        assert torch.equal(from_tensor, F.dropout(x, p, seed=key)), p
