"""DropConnect: weight masks, per-example masks, wrapped-layer settings and moment matching."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import dropkit
from dropkit.engine.masks import keep_mask
from dropkit.functional.dropconnect import (
    drop_connect_linear_moments,
    drop_connect_weight,
    example_keep_masks,
    moment_matching_linear,
)
from dropkit.nn.dropconnect import DropConnect
from tests.conftest import SIGMAS
from tests.layer_specs import realised


def with_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """An independent reference: a copy of ``layer`` whose weight is ``weight``."""
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.weight.copy_(weight)  # type: ignore[operator]
    return reference


# ---------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize(("start", "stop"), [(0, 6), (0, 1), (1, 4), (3, 6), (5, 6), (2, 2)])
def test_example_masks_are_rows_of_the_batch_mask(start: int, stop: int) -> None:
    key = dropkit.make_key(11, stream=3, step=2)
    full = keep_mask(key, 0.4, (6, 5, 7))  # 35 elements per row: rows straddle counters
    assert torch.equal(example_keep_masks(key, 0.4, (5, 7), start, stop), full[start:stop])


def test_masked_weight_is_the_engine_mask_of_the_weight_shape() -> None:
    weight = torch.randn(40, 30)
    kept = drop_connect_weight(weight, 0.25, seed=7) != 0
    assert torch.equal(kept, keep_mask(dropkit.make_key(7), 0.25, weight.shape))


def test_zero_rate_returns_the_weight_itself() -> None:
    weight = torch.tensor([[1.0, float("inf")], [-2.0, 3.0]])
    assert drop_connect_weight(weight, 0.0, seed=1) is weight


# ----------------------------------------------------------------------------- distribution


def test_pre_activation_moments_match_monte_carlo_of_training() -> None:
    p, n = 0.3, 10000
    layer = nn.Linear(16, 4).double()
    v = torch.randn(16, dtype=torch.float64)
    m = DropConnect(layer, p, per_example=True, chunk_size=5000)
    with torch.no_grad():
        u = m(v.expand(n, 16), seed=3)  # n independent masks of the same input
        mean, variance = drop_connect_linear_moments(v, layer.weight, layer.bias, p)
    sample_mean = u.mean(0)
    sample_variance = u.var(0)
    assert ((sample_mean - mean).abs() <= SIGMAS * (variance / n).sqrt()).all()
    # Standard error of a sample variance: sqrt((m4 - sigma^4) / n), m4 the fourth central moment.
    fourth = ((u - sample_mean) ** 4).mean(0)
    tolerance = SIGMAS * ((fourth - sample_variance**2).clamp_min(0) / n).sqrt()
    assert ((sample_variance - variance).abs() <= tolerance).all()


def test_moment_matching_relu_matches_the_gaussian_closed_form() -> None:
    p, samples = 0.5, 4096
    weight, bias = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    v = torch.randn(2, 10, dtype=torch.float64)
    out = moment_matching_linear(v, weight, bias, p, torch.relu, samples=samples, seed=4)
    mu, variance = drop_connect_linear_moments(v, weight, bias, p)
    sigma = variance.sqrt()
    normal = torch.distributions.Normal(0.0, 1.0)
    z = mu / sigma
    expected = mu * normal.cdf(z) + sigma * normal.log_prob(z).exp()
    # Var[relu(u)] <= E[u^2] = mu^2 + sigma^2.
    assert ((out - expected).abs() <= SIGMAS * ((mu**2 + variance) / samples).sqrt()).all()


def test_conv_moment_matching_matches_monte_carlo_of_training() -> None:
    p, n, samples = 0.3, 4000, 4096
    # float32: PyTorch's CPU grouped convolution (one group per example) is very slow in float64.
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect")
    v = torch.randn(2, 5, 5)
    with torch.no_grad():
        u = DropConnect(conv, p, per_example=True, chunk_size=1000)(v.expand(n, 2, 5, 5), seed=3)
        mean = conv(v)
        padded_square = nn.functional.pad(v.square().unsqueeze(0), (1, 1, 1, 1), mode="reflect")
        variance = p / (1 - p) * nn.functional.conv2d(padded_square, conv.weight.square(), stride=2)[0]
        matched = DropConnect(conv, p, inference="moment_matching", samples=samples).eval()(v, seed=5)
    sample_mean, sample_variance = u.mean(0), u.var(0)
    assert ((sample_mean - mean).abs() <= SIGMAS * (variance / n).sqrt()).all()
    fourth = ((u - sample_mean) ** 4).mean(0)
    tolerance = SIGMAS * ((fourth - sample_variance**2).clamp_min(0) / n).sqrt()
    assert ((sample_variance - variance).abs() <= tolerance).all()
    # Identity activation: the matched output is the mean of `samples` Gaussian draws.
    assert ((matched - mean).abs() <= SIGMAS * (variance / samples).sqrt()).all()


# ------------------------------------------------------------------------------- per example


def test_per_example_masks_differ_and_ignore_chunk_size() -> None:
    layer = nn.Linear(12, 8).double()
    x = torch.randn(12, dtype=torch.float64).expand(7, 12)
    outputs = [DropConnect(layer, 0.5, per_example=True, chunk_size=c)(x, seed=2) for c in (1, 3, 7, 64)]
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-12, atol=1e-12)
    assert all(not torch.equal(outputs[0][i], outputs[0][0]) for i in range(1, 7))
    # Example 0 reads the first row of the (N, *W) mask: the per-batch mask.
    torch.testing.assert_close(outputs[0][0], DropConnect(layer, 0.5)(x[:1], seed=2)[0])


def test_per_example_linear_with_extra_dims_matches_a_reference() -> None:
    layer = nn.Linear(5, 3).double()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    key = dropkit.make_key(8)
    out = DropConnect(layer, 0.4, per_example=True, chunk_size=3)(x, seed=key)
    keep = example_keep_masks(key, 0.4, layer.weight.shape, 0, 4)
    for i in range(4):
        reference = with_weight(layer, torch.where(keep[i], layer.weight / (1 - realised(0.4)), 0.0))
        torch.testing.assert_close(out[i], reference(x[i]))


# --------------------------------------------------------------------------- wrapped convs

CONVS: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), (3, 4, 11)),
    (lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, groups=2, padding_mode="reflect"), (3, 4, 7, 6)),
    (lambda: nn.Conv2d(4, 6, (3, 2), dilation=(1, 2), padding="same", padding_mode="circular", bias=False),
     (3, 4, 6, 6)),
    (lambda: nn.Conv3d(4, 4, 2, stride=2, padding=1, groups=4, padding_mode="replicate"), (3, 4, 4, 5, 4)),
    (lambda: nn.Conv1d(2, 4, 4, padding="same", dilation=2, bias=False), (3, 2, 9)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)),  # unbatched input
]  # fmt: skip


@pytest.mark.parametrize(("make", "shape"), CONVS)
def test_conv_settings_are_preserved(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    conv = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    p, key = 0.4, dropkit.make_key(6)
    m = DropConnect(conv, p, per_example=False)
    with torch.no_grad():
        trained = m(x, seed=key)
        expected = with_weight(conv, drop_connect_weight(conv.weight, p, seed=key))(x)  # type: ignore[arg-type]
        torch.testing.assert_close(trained, expected)
        assert torch.equal(m.eval()(x), conv(x))

        per_example = DropConnect(conv, p, per_example=True, chunk_size=2)(x, seed=key)
        batched = x if x.dim() == conv.weight.dim() else x.unsqueeze(0)  # type: ignore[union-attr]
        keep = example_keep_masks(key, p, conv.weight.shape, 0, batched.shape[0])  # type: ignore[union-attr]
        rows = [
            with_weight(conv, torch.where(keep[i], conv.weight / (1 - realised(p)), 0.0))(batched[i : i + 1])  # type: ignore[operator]
            for i in range(batched.shape[0])
        ]
        torch.testing.assert_close(per_example, torch.cat(rows).reshape(per_example.shape))


# -------------------------------------------------------------------------- module contract


@pytest.mark.parametrize("per_example", [False, True])
def test_gradcheck_of_the_conv_training_path(per_example: bool) -> None:
    conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect").double()
    xc = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    mc = DropConnect(conv, 0.4, per_example=per_example)
    assert torch.autograd.gradcheck(lambda inp: mc(inp, seed=3), (xc,), fast_mode=True)


def test_state_dict_keys_are_the_wrapped_layers() -> None:
    layer = nn.Linear(3, 2)
    m = DropConnect(layer, 0.5, activation=nn.ReLU())
    assert sorted(m.state_dict()) == ["module.bias", "module.weight"]
    fresh = DropConnect(nn.Linear(3, 2), 0.5)
    fresh.load_state_dict({f"module.{k}": v for k, v in layer.state_dict().items()})
    assert torch.equal(fresh.module.weight, layer.weight)
    assert m.module is layer
    assert isinstance(m.module.weight, nn.Parameter)


def test_activation_is_applied_in_every_mode() -> None:
    m = DropConnect(nn.Linear(6, 5), 0.3, activation=torch.relu)
    x = torch.randn(4, 6)
    assert (m(x) >= 0).all()
    assert torch.equal(m.eval()(x), torch.relu(m.module(x)))


@pytest.mark.slow
def test_compiled_per_batch_linear_matches_eager_without_recompiling() -> None:
    torch._dynamo.reset()
    dropkit.manual_seed(0)
    m = DropConnect(nn.Linear(8, 4), 0.5)
    x = torch.randn(3, 8)
    dropkit.manual_seed(1)
    eager = [m(x) for _ in range(3)]
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    dropkit.manual_seed(1)
    for expected in eager:
        torch.testing.assert_close(compiled(x), expected)
    assert counter.frame_count == 1


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"per_example": 1}, TypeError, "per_example"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"samples": 0}, ValueError, "samples"),
    ({"inference": "sample"}, ValueError, "inference"),
    ({"activation": 3}, TypeError, "activation"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        DropConnect(nn.Linear(2, 2), **kwargs)


def test_bad_modules_and_inputs() -> None:
    with pytest.raises(TypeError, match="got LSTM"):
        DropConnect(nn.LSTM(2, 2))
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        drop_connect_weight(torch.ones(2, 2, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="at most one of seed and generator"):
        drop_connect_weight(torch.ones(2, 2), 0.5, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="samples"):
        moment_matching_linear(torch.ones(2), torch.ones(2, 2), None, 0.5, samples=0)
    with pytest.raises(ValueError, match="start <= stop"):
        example_keep_masks(dropkit.make_key(0), 0.5, (2,), 3, 1)
