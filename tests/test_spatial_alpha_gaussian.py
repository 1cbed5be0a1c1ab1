"""Variant-specific behaviour: channel layouts and ranks, original dropout, alpha dropout's
moments, Gaussian dropout's variance."""

from __future__ import annotations

import math

import pytest
import torch

import dropkit
from dropkit import functional as F
from dropkit.functional.alpha import SELU_ALPHA_PRIME, alpha_dropout_coefficients
from tests.layer_specs import realised

SIGMAS = 6.0


@pytest.mark.parametrize(
    ("fn", "shape"),
    [(F.dropout1d, (6, 10, 7)), (F.dropout2d, (6, 10, 4, 5)), (F.dropout3d, (6, 10, 2, 3, 4))],
)
def test_channels_last_layout_and_memory_format_draw_the_channels_first_mask(fn, shape) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(shape)
    first = fn(x, 0.5, seed=3)
    last = fn(x.movedim(1, -1), 0.5, channels_last=True, seed=3)
    assert torch.equal(last, first.movedim(1, -1))
    unbatched = fn(x[0], 0.5, seed=3)
    keep_batched = fn(x[:1], 0.5, seed=3)[0] != 0
    assert torch.equal(unbatched != 0, keep_batched), "unbatched input draws like a batch of one"
    if len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        y = fn(x.contiguous(memory_format=fmt), 0.5, seed=3)
        assert torch.equal(y, first)
        assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize(
    ("layer", "bad_shape", "message"),
    [
        (dropkit.nn.Dropout1d, (2, 3, 4, 5), r"dropout1d expects 3-D or 2-D input \(N, C, L\).*got 4-D"),
        (dropkit.nn.Dropout2d, (2, 3), r"dropout2d expects 4-D or 3-D input \(N, C, H, W\).*got 2-D"),
        (dropkit.nn.Dropout2d, (2, 3, 4, 5, 6), r"dropout2d expects 4-D or 3-D .*got 5-D"),
        (dropkit.nn.Dropout3d, (2, 3, 4), r"dropout3d expects 5-D or 4-D .*got 3-D input of shape"),
        (dropkit.nn.FeatureAlphaDropout, (5,), r"feature_alpha_dropout expects at least 2-D input"),
    ],
)
def test_wrong_rank_is_an_error_not_a_reinterpretation(layer, bad_shape, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        layer(0.5)(torch.ones(bad_shape))


def test_original_dropout_repr_and_in_place_eval_scaling() -> None:
    assert "inverted=False" in repr(dropkit.nn.Dropout(0.25, inverted=False))
    x = torch.randn(200, 50)
    inplace_target = x.clone()
    F.dropout(inplace_target, 0.25, training=False, inplace=True, inverted=False)
    assert torch.equal(inplace_target, x * 0.75)


def test_broadcast_dims_ties_masks_over_time_and_tokens() -> None:
    x = torch.randn(9, 4, 16)  # (T, N, H)
    tied = F.dropout(x, 0.5, broadcast_dims=0, seed=1) != 0
    assert torch.equal(tied.amax(0), tied.amin(0))
    tokens = F.dropout(x, 0.5, broadcast_dims=-1, seed=1) != 0
    assert torch.equal(tokens.amax(-1), tokens.amin(-1))
    with pytest.raises(ValueError, match="broadcast_dims entry 3 is out of range for a 3-D input"):
        F.dropout(x, 0.5, broadcast_dims=3)
    with pytest.raises(TypeError, match=r"broadcast_dims must contain ints, got 0.5"):
        F.dropout(x, 0.5, broadcast_dims=[0.5])  # type: ignore[list-item]


@pytest.mark.parametrize(("p", "a", "b"), [(0.05, 0.954844, 0.083936), (0.1, 0.921285, 0.161971)])
def test_alpha_coefficients_match_the_paper(p: float, a: float, b: float) -> None:
    got_a, got_b = alpha_dropout_coefficients(p)
    assert got_a == pytest.approx(a, abs=1e-6)
    assert got_b == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_alpha_dropout_keeps_standard_normal_input_standard(p: float) -> None:
    n = 1 << 20
    x = torch.randn(n, dtype=torch.float64)
    y = F.alpha_dropout(x, p, seed=2)
    # y is a mixture with variance 1 and bounded fourth moment (< 10 for these p), so
    # Var(mean) = 1/n and Var(sample variance) <= 10/n.
    assert abs(y.mean().item()) <= SIGMAS / math.sqrt(n)
    assert abs(y.var().item() - 1.0) <= SIGMAS * math.sqrt(10.0 / n)
    a, b = alpha_dropout_coefficients(realised(p))  # the coefficients of the rate drawn
    dropped_value = a * SELU_ALPHA_PRIME + b
    rate = (y == dropped_value).double().mean().item()
    assert abs(rate - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_gaussian_dropout_variance_is_p_over_q(p: float) -> None:
    n = 1 << 20
    y = F.gaussian_dropout(torch.ones(n, dtype=torch.float64), p, seed=5)
    variance = p / (1 - p)
    assert abs(y.mean().item() - 1.0) <= SIGMAS * math.sqrt(variance / n)
    assert abs(y.var().item() - variance) <= SIGMAS * math.sqrt(2.0 / n) * variance


@pytest.mark.parametrize("std", [0.01, 1.0, 30.0])
def test_gaussian_noise_has_the_requested_std_and_identity_gradient(std: float) -> None:
    n = 1 << 20
    x = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    y = F.gaussian_noise(x, std, seed=6)
    assert abs(y.mean().item()) <= SIGMAS * std / math.sqrt(n)
    assert abs(y.std().item() - std) <= SIGMAS * std / math.sqrt(2 * n)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
