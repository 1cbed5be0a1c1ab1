"""Regressions of issue 14 (found by fuzzing; tests/test_properties.py keeps fuzzing): NaN from
finite input, validation gaps, and an empty per-example batch, each checked in every floating
dtype, gradients included, with the ordinary results left as they were."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import nn

import dropkit
from dropkit import functional as F
from dropkit.nn.variational import plus_eps

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def finite(*tensors: torch.Tensor | None) -> bool:
    return all(t is not None and bool(torch.isfinite(t).all()) for t in tensors)


# --- concrete dropout: 1 - p underflows for a large logit ---------------------------------------


@dtypes
@pytest.mark.parametrize("logit", [89.0, 200.0, 1e4, 3e4], ids=str)
def test_concrete_dropout_of_a_large_logit_drops_everything_finitely(
    dtype: torch.dtype, logit: float
) -> None:
    # Before: sigmoid(-89) = 0 in float32, and (1 - z) / (1 - p) was 0 / 0 = NaN.  At the default
    # temperature every unit is dropped: z = 1 exactly, the output exact zeros.
    x = torch.ones(3, dtype=dtype, requires_grad=True)
    p_logit = torch.tensor(min(logit, torch.finfo(dtype).max), dtype=dtype, requires_grad=True)
    y = F.concrete_dropout(x, p_logit, seed=0)
    assert torch.equal(y, torch.zeros(3, dtype=dtype))
    y.sum().backward()
    assert finite(x.grad, p_logit.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_concrete_dropout_scale_is_continuous_where_it_moves_to_log_space(dtype: torch.dtype) -> None:
    """Near the logit where 1 - p gets too small to divide by (~44 in float32, ~354 in float64)
    the log-space scale matches the direct one to rounding: the two formulas agree there."""
    limit = math.sqrt(torch.finfo(dtype).tiny)
    switch = -math.log(limit)  # sigmoid(-logit) = limit
    x = torch.ones(4096, dtype=dtype)
    for temperature in (1.0, 2.0):  # scales of normal size (t < 1 makes them subnormal there)
        below = F.concrete_dropout(
            x, torch.tensor(switch - 1e-3, dtype=dtype), temperature=temperature, seed=1
        )
        above = F.concrete_dropout(
            x, torch.tensor(switch + 1e-3, dtype=dtype), temperature=temperature, seed=1
        )
        assert bool((below > 0).any()), "the check needs kept units"
        # The scales differ by the logit step (relative ~1e-3 * (1 - 1/t)) and rounding only.
        torch.testing.assert_close(above, below, rtol=2e-3, atol=0.0)


@dtypes
def test_concrete_dropout_refuses_a_non_finite_logit(dtype: torch.dtype) -> None:
    x = torch.ones(2, dtype=dtype)
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"p_logit must be finite, got a p_logit holding {bad}"):
            F.concrete_dropout(x, torch.tensor([0.0, bad], dtype=dtype), seed=0)
    assert F.concrete_dropout(x, torch.tensor(math.nan), False) is x, "eval reads no rate"


def test_concrete_dropout_refuses_a_temperature_below_the_compute_dtype() -> None:
    x = torch.ones(2)
    with pytest.raises(ValueError, match=r"temperature must be at least 1\.17.*e-38 .*got 1e-40"):
        F.concrete_dropout(x, torch.tensor(0.0), temperature=1e-40, seed=0)
    y = F.concrete_dropout(x.double(), torch.tensor(0.0), temperature=1e-40, seed=0)  # float64: fine
    assert finite(y)


# --- variational layers: VARIANCE_EPS = 1e-8 is 0 in float16 ------------------------------------

VARIATIONAL = [
    (dropkit.nn.VariationalLinear, (4, 3), (2, 4)),
    (dropkit.nn.VariationalConv1d, (2, 3, 3), (2, 2, 5)),
    (dropkit.nn.SparseVariationalLinear, (4, 3), (2, 4)),
    (dropkit.nn.SparseVariationalConv2d, (2, 3, 3), (2, 2, 4, 4)),
]


@dtypes
@pytest.mark.parametrize(("cls", "args", "shape"), VARIATIONAL, ids=[c.__name__ for c, _, _ in VARIATIONAL])
def test_variational_layer_gradients_are_finite_for_a_zero_input_row(
    cls: type[nn.Module], args: tuple[int, ...], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    # Before: in float16 an all-zero example had variance 0 + 0, and sqrt's infinite gradient
    # times 0 was NaN in the input, weight and log-alpha gradients.
    torch.manual_seed(0)
    layer: Any = cls(*args).to(dtype)
    with torch.no_grad():
        layer.weight[0].zero_()  # and zero weights: log(theta**2 + 1e-8) of the sparse layers
    x = torch.randn(shape).to(dtype)
    x[0] = 0.0
    x.requires_grad_(True)
    y = layer(x, seed=0)
    (y.double().sum() + layer.kl().double()).backward()
    assert finite(y, x.grad, *(p.grad for p in layer.parameters()))


def test_plus_eps_changes_only_an_exact_float16_zero() -> None:
    values = torch.tensor([0.0, 2.0**-24, 2.0**-14, 1e-3, 1.0])
    for dtype in DTYPES:
        v = values.to(dtype)
        shifted = plus_eps(v, 1e-8)
        if dtype == torch.float16:  # 1e-8 rounds to 0: only the exact 0 moves, to 2**-24
            assert shifted.tolist() == [2.0**-24, *v[1:].tolist()]
        else:
            assert torch.equal(shifted, v + 1e-8)


# --- moment matching: inf * 0 at p = 0 ------------------------------------------------------------


@dtypes
@pytest.mark.parametrize("p", [0.0, 1.0], ids=str)
def test_moment_matching_at_the_end_rates_is_the_activation_of_the_mean(dtype: torch.dtype, p: float) -> None:
    # Before: in float16 the squared weight 300**2 overflowed, and inf * (p / q = 0) was NaN.
    x = torch.ones(2, 3, dtype=dtype)
    w = torch.full((2, 3), 300.0, dtype=dtype)
    b = torch.tensor([1.0, -1.0], dtype=dtype)
    mean = (x.double() @ w.double().T + b.double()).to(dtype)
    for rate in (p, torch.tensor([p], dtype=torch.float64)):
        y = F.moment_matching_linear(x, w, b, rate, torch.relu, samples=4, seed=0)
        assert torch.equal(y, torch.relu(mean))
    layer = nn.Linear(3, 2).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    module = dropkit.nn.DropConnect(layer, p, inference="moment_matching", activation=torch.relu).eval()
    assert torch.equal(module(x, seed=0), torch.relu(layer(x)))


@dtypes
def test_moment_matching_variance_of_large_float16_weights_is_computed_in_float32(dtype: torch.dtype) -> None:
    # Squares of float16 weights above 256 overflow: moments computed in float32, rounded once.
    x = torch.full((1, 3), 0.25, dtype=dtype)
    w = torch.full((1, 3), 300.0, dtype=dtype)
    mean, variance = dropkit.functional.dropconnect.drop_connect_linear_moments(x, w, None, 0.5)
    assert mean.dtype == variance.dtype == dtype
    # 3 * 75**2 = 16875 rounded once (before: inf in float16)
    assert variance.item() == torch.tensor(16875.0).to(dtype).item()
    y = F.moment_matching_linear(x, w, None, 0.5, samples=64, seed=0)
    assert finite(y)


BAD_LINEAR_ARGS: list[tuple[Any, Any, type[Exception], str]] = [
    ("w", None, TypeError, r"weight must be a torch\.Tensor, got str"),
    (torch.ones(2, 3, dtype=torch.int64), None, TypeError, r"weight must be a floating-point tensor"),
    (
        torch.ones(2, 3, dtype=torch.float64),
        None,
        TypeError,
        r"weight must have the input's dtype torch\.float32",
    ),
    (torch.ones(2, 4), None, ValueError, r"weight must have shape \(out_features, 3\) .* got \(2, 4\)"),
    (torch.ones(3), None, ValueError, r"weight must have shape \(out_features, 3\) .* got \(3,\)"),
    (torch.ones(2, 3), torch.ones(3), ValueError, r"bias must have shape \(2,\) or be None, got \(3,\)"),
    (torch.ones(2, 3), [1.0, 2.0], TypeError, r"bias must be a torch\.Tensor, got list"),
    (torch.ones(2, 3), torch.ones(2, dtype=torch.float16), TypeError, r"bias must have the input's dtype"),
]


@pytest.mark.parametrize(("weight", "bias", "error", "message"), BAD_LINEAR_ARGS)
def test_moment_matching_checks_its_weight_and_bias(
    weight: Any, bias: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        F.moment_matching_linear(torch.ones(4, 3), weight, bias, 0.5, seed=0)
    with pytest.raises(ValueError, match=r"input must have at least one dim"):
        F.moment_matching_linear(torch.tensor(1.0), torch.ones(2, 1), None, 0.5, seed=0)


# --- DropConnect: an empty per-example batch ------------------------------------------------------


@dtypes
@pytest.mark.parametrize(
    ("layer", "shape", "out"),
    [
        (nn.Linear(4, 2), (0, 4), (0, 2)),
        (nn.Linear(4, 2), (0, 5, 4), (0, 5, 2)),
        (nn.Conv2d(3, 2, 3), (0, 3, 5, 5), (0, 2, 3, 3)),
    ],
    ids=["linear", "linear-3d", "conv2d"],
)
def test_per_example_drop_connect_of_an_empty_batch_is_empty(
    layer: nn.Module, shape: tuple[int, ...], out: tuple[int, ...], dtype: torch.dtype
) -> None:
    # Before: torch.cat() of no chunk raised "expected a non-empty list of Tensors".
    module = dropkit.nn.DropConnect(layer, 0.5, per_example=True).to(dtype)
    x = torch.zeros(shape, dtype=dtype, requires_grad=True)
    y = module(x, seed=0)
    assert (y.shape, y.dtype) == (torch.Size(out), dtype)
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.shape == x.shape
    weight = module.module.weight
    assert weight.grad is not None
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_drop_connect_refuses_an_integer_input() -> None:
    module = dropkit.nn.DropConnect(nn.Linear(4, 2), 0.5)
    for training in (True, False):
        with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch\.int64"):
            module.train(training)(torch.ones(2, 4, dtype=torch.int64))


# --- rates: LayerDrop and TokenAndPositionEmbedding -----------------------------------------------

BAD_RATES: list[tuple[Any, type[Exception], str]] = [
    (7.0, ValueError, r"p must be in \[0, 1\], got 7\.0"),
    (-0.1, ValueError, r"p must be in \[0, 1\], got -0\.1"),
    (math.inf, ValueError, r"p must be in \[0, 1\], got inf"),
    (math.nan, ValueError, r"p must not be NaN, got nan"),
    ("0.5", TypeError, r"p must be a float, got str"),
    (None, TypeError, r"p must be a float, got NoneType"),
]


@pytest.mark.parametrize(("bad", "error", "message"), BAD_RATES)
def test_layer_drop_validates_p_on_every_assignment(bad: Any, error: type[Exception], message: str) -> None:
    # Before: LayerDrop.p = 7.0 was accepted (every layer then skipped) and inf overflowed.
    with pytest.raises(error, match=message):
        dropkit.nn.LayerDrop([nn.Identity()], bad)
    stack = dropkit.nn.LayerDrop([nn.Identity()], 0.25)
    with pytest.raises(error, match=message):
        stack.p = bad
    assert stack.p == 0.25
    assert type(stack.p) is float, "documented: a plain float"


def test_layer_drop_p_stays_a_compile_time_constant() -> None:
    layer = dropkit.nn.LayerDrop([nn.Identity()], 0.25)
    assert not layer._rate_is_graph_input("p")
    compiled: Any = torch.compile(nn.Sequential(layer))
    with pytest.warns(UserWarning, match=r"treats 'p' of '0' as a constant"):
        dropkit.schedules.attach(compiled, dropkit.schedules.Constant(0.1), modules=dropkit.nn.LayerDrop)
    assert layer.p == 0.1


@pytest.mark.parametrize(("bad", "error", "message"), BAD_RATES)
@pytest.mark.parametrize("built", [0.0, 0.1], ids=["built-with-0", "built-with-0.1"])
def test_token_embedding_validates_p(bad: Any, error: type[Exception], message: str, built: float) -> None:
    with pytest.raises(error, match=message):
        dropkit.nn.TokenAndPositionEmbedding(5, 4, 3, p=bad)
    embed = dropkit.nn.TokenAndPositionEmbedding(5, 4, 3, p=built)
    with pytest.raises(error, match=message):
        embed.p = bad
    assert embed.p == built


def test_token_embedding_built_with_p_0_takes_a_rate_later() -> None:
    # Before: p was a plain attribute, ignored after construction; at p = 0 there was no dropout
    # to give a rate to.
    embed = dropkit.nn.TokenAndPositionEmbedding(5, 4, 3, p=0.0)
    assert isinstance(embed.dropout, nn.Identity)
    tokens = torch.arange(5).repeat(40, 1)[:, :3]
    plain = embed(tokens)
    embed.p = 0.5
    assert isinstance(embed.dropout, dropkit.nn.Dropout)
    assert embed.dropout.p == 0.5
    assert embed.p == 0.5
    dropped = embed(tokens)
    kept = dropped != 0
    assert 0 < int(kept.sum()) < kept.numel()
    torch.testing.assert_close(dropped[kept], plain[kept] * 2.0)
    embed.p = 0.0  # the Dropout stays, at rate 0: the identity
    assert embed.p == 0.0
    assert torch.equal(embed(tokens), plain)
    assert sorted(embed.state_dict()) == ["token.weight"], "no new state"


# --- integer and bool inputs: clear TypeErrors ----------------------------------------------------


def test_transformer_block_refuses_an_integer_input() -> None:
    block = dropkit.nn.TransformerEncoderBlock(8, 2, 16)
    for training in (True, False):
        with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch\.int64"):
            block.train(training)(torch.ones(1, 3, 8, dtype=torch.int64))


@pytest.mark.parametrize("cell", [nn.GRUCell(3, 4), nn.LSTMCell(3, 4)], ids=["gru", "lstm"])
def test_zoneout_cell_refuses_bool_inputs_and_states(cell: nn.Module) -> None:
    module = dropkit.nn.ZoneoutCell(cell, 0.5)
    x, h = torch.ones(2, 3), torch.zeros(2, 4)
    hx: Any = (h, h) if isinstance(cell, nn.LSTMCell) else h
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch\.bool"):
        module(x.bool(), hx)
    bad = (h.bool(), h) if isinstance(cell, nn.LSTMCell) else h.bool()
    name = "hx[0]" if isinstance(cell, nn.LSTMCell) else "hx"
    with pytest.raises(
        TypeError, match=rf"^{re.escape(name)} must be a floating-point tensor, got dtype torch\.bool"
    ):
        module(x, bad)
    assert int(module.rng_step) == 0, "a refused call draws nothing"


def test_zoneout_errors_name_p() -> None:
    # Before: "rates[0] must be in [0, 1]" for zoneout's argument p.
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\], got 2\.0"):
        F.zoneout(torch.ones(3), torch.ones(3), 2.0)
    wrong: Any = "0.1"
    with pytest.raises(TypeError, match=r"^p must be a float, got str"):
        F.zoneout(torch.ones(3), torch.ones(3), wrong)
    with pytest.raises(TypeError, match=r"^prev must be a floating-point tensor"):
        F.zoneout(torch.ones(3, dtype=torch.int64), torch.ones(3), 0.1)
    with pytest.raises(ValueError, match=r"^rates\[0\] must be in \[0, 1\], got 2\.0"):
        F.zoneout_states((torch.ones(3),), (torch.ones(3),), (2.0,))
    not_a_sequence: Any = torch.ones(3)
    with pytest.raises(TypeError, match=r"^prev must be a sequence"):
        F.zoneout_states(not_a_sequence, (torch.ones(3),), (0.1,))


# --- seeds: validated where nothing is drawn too --------------------------------------------------


def test_a_bad_seed_is_refused_in_eval_and_at_rate_0() -> None:
    # Before: seed="x" raised in training but was ignored in eval and at p = 0.
    x = torch.ones(2, 3)
    calls = [
        lambda seed: F.gaussian_dropout(x, 0.3, False, seed=seed),
        lambda seed: F.gaussian_noise(x, 0.0, seed=seed),
        lambda seed: F.drop_path(x, 0.3, False, seed=seed),
        lambda seed: F.drop_connect_weight(x, 0.0, seed=seed),
        lambda seed: F.concrete_dropout(x, torch.tensor(0.0), False, seed=seed),
        lambda seed: F.zoneout(x, x, 0.3, False, seed=seed),
        lambda seed: F.residual_dropout(x, x, 0.3, False, seed=seed),
        lambda seed: dropkit.nn.Dropout(0.3).eval()(x, seed=seed),
        lambda seed: dropkit.nn.Dropout(0.0)(x, seed=seed),
        lambda seed: dropkit.nn.DropConnect(nn.Linear(3, 2)).eval()(x, seed=seed),
        lambda seed: dropkit.nn.VariationalLinear(3, 2).eval()(x, seed=seed),
        lambda seed: dropkit.nn.ConcreteDropout(nn.Linear(3, 2)).eval()(x, seed=seed),
        lambda seed: dropkit.nn.StochasticDepth(nn.Identity(), 0.3).eval()(x, seed=seed),
        lambda seed: dropkit.nn.LayerDrop([nn.Identity()], 0.3).eval()(x, seed=seed),
        lambda seed: dropkit.nn.ZoneoutCell(nn.GRUCell(3, 3)).eval().sequence(x, seed=seed),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"seed must be an int, got str \('x'\)"):
            call("x")
        with pytest.raises(
            ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"
        ):
            call(2**64)
        call(7)  # a good seed is fine


# --- 0-d inputs with a rate held in a tensor ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_tensor_rate_keeps_the_dtype_and_bits_of_0d_input(dtype: torch.dtype) -> None:
    # Before: a 0-d state or weight times the 0-d float32 factor promoted to float32.
    held = torch.tensor([0.1], dtype=torch.float64)
    a, b = torch.tensor(0.7, dtype=dtype), torch.tensor(-1.3, dtype=dtype)
    for training in (False, True):
        out = F.zoneout(a, b, held, training, seed=0)
        assert out.dtype == dtype
        assert torch.equal(out, F.zoneout(a, b, 0.1, training, seed=0))
    out = F.drop_connect_weight(a, held, seed=0)
    assert out.dtype == dtype
    assert torch.equal(out, F.drop_connect_weight(a, 0.1, seed=0))


def test_stochastic_depth_rates_never_pass_the_maximum() -> None:
    # Before: 0.9344663714942474 * 19 / 19 rounded one ulp above the maximum.
    for rule in ("linear", "linear_from_zero"):
        rates = F.stochastic_depth_rates(19, 0.9344663714942474, rule=rule)
        assert rates[-1] == 0.9344663714942474
        assert max(rates) == 0.9344663714942474
