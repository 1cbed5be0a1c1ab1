"""Property-based tests (hypothesis) of every public functional op and every random layer.

Valid arguments (shapes with empty and odd dims, 0-d where an op takes it, non-contiguous
layouts, every floating dtype, rates at the edges 0, 1, tiny and 1 - tiny) give a finite output
of the right shape and dtype for finite input (and finite gradients), the documented eval
result, and on the fused kernels the reference engine's bits.  Invalid arguments (rates below 0,
above 1, NaN or infinite, arguments of the wrong type, bad seeds) raise only the documented
errors: a ValueError (bad value) or a TypeError (bad type) whose message names the argument.

Inputs hold values in ``[-2, 2]``: a kept unit is scaled by at most ``1 / (1 - p)``, so that
rates up to ``1 - 2**-14`` stay finite in float16; closer to 1 the rates drawn are those that
realise as 1 (every unit dropped), since a larger true output would overflow float16 itself.

The functional ops come from ``dropkit.functional.__all__`` (``test_every_public_op_is_covered``
fails for a new one) and the layers from the registry of tests/layer_specs.py, which
tests/test_registry.py keeps complete.  Hypothesis runs derandomized under the ``ci`` profile
(tests/conftest.py); ``HYPOTHESIS_PROFILE=thorough`` runs many more examples locally.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import dropkit
from dropkit import functional as F
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import inverted_scale
from dropkit.nn._base import RateAttribute
from tests.layer_specs import SPECS, LayerSpec

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TINY = 1e-6
NAN, INF = math.nan, math.inf
# Rates that realise as 1 (p >= 1 - 2**-17 rounds to the full threshold) or keep units at a scale
# below 2**14, which [-2, 2] inputs survive in float16.
PROBABILITY_EDGES = (0.0, 1.0, TINY, 1.0 - TINY, 2.0**-17, 0.5, 1.0 - 2.0**-14)
probabilities = st.one_of(st.sampled_from(PROBABILITY_EDGES), st.floats(0.0, 1.0 - 2.0**-14))
stds = st.one_of(st.sampled_from((0.0, TINY, 1.0, 10.0)), st.floats(0.0, 10.0))
seeds = st.integers(0, 2**31 - 1)

#: Library bugs this suite found outside the files its authors may change: (test, case) -> reason.
#: Each is a strict xfail, so that the fix flips it.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def params(test: str, names: Sequence[str]) -> list[Any]:
    """``names`` as pytest params, the known bugs of ``test`` marked strict xfail."""
    out = []
    for name in names:
        reason = KNOWN_BUGS.get((test, name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


# --- values ---------------------------------------------------------------------------------------


def values(shape: Sequence[int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Uniform values in ``[-2, 2]`` with some exact zeros, of ``shape`` and ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(shape), generator=g, dtype=torch.float64) * 4.0 - 2.0
    x[torch.rand(tuple(shape), generator=g) < 0.1] = 0.0
    return x.to(dtype)


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` with the same values in another memory layout (``"contiguous"``, ``"transposed"``:
    dims reversed in memory, ``"strided"``: every other element of a larger buffer)."""
    if layout == "transposed" and x.dim() >= 2:
        return x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
    if layout == "strided" and x.dim() >= 1:
        buffer = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        strided = buffer[..., ::2]
        strided.copy_(x)
        return strided
    return x


@st.composite
def shapes(draw: st.DrawFn, min_rank: int = 0, max_rank: int = 4, max_size: int = 5) -> tuple[int, ...]:
    rank = draw(st.integers(min_rank, max_rank))
    return tuple(draw(st.lists(st.integers(0, max_size), min_size=rank, max_size=rank)))


def tensor(data: st.DataObject, dtype: torch.dtype, min_rank: int = 0, max_rank: int = 4) -> torch.Tensor:
    shape = data.draw(shapes(min_rank, max_rank), label="shape")
    layout = data.draw(st.sampled_from(("contiguous", "transposed", "strided")), label="layout")
    return laid_out(values(shape, dtype, data.draw(seeds, label="values")), layout)


def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_of(item)]
    return []


def structure(value: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in tensors_of(value)]


def assert_finite(value: Any, what: str = "output") -> None:
    for t in tensors_of(value):
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), f"{what} is not finite: {t}"


def assert_gradient(grad: torch.Tensor, what: str = "gradient") -> None:
    """Finite in float32 and float64; never NaN.  A gradient sums over a batch, so in float16 it
    may overflow (to inf) where the outputs do not: e.g. a weight kept at 1 / (1 - p) = 2**14
    read by 16 examples, whose true gradient exceeds float16's range."""
    if grad.dtype in (torch.float32, torch.float64):
        assert_finite(grad, what)
    else:
        assert not bool(grad.isnan().any()), f"{what} holds NaN: {grad}"


def assert_bits_equal(a: Any, b: Any, what: str = "the fused kernels and the reference engine") -> None:
    left, right = tensors_of(a), tensors_of(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        assert (x.dtype, x.shape) == (y.dtype, y.shape), f"{what} differ in dtype or shape"
        assert torch.equal(x, y), f"{what} differ"


# --- the functional ops ---------------------------------------------------------------------------


@dataclass
class Call:
    """One drawn call of an op: ``fn(input, rate, training, **rng)`` on the drawn ``input`` (the
    op's first tensor argument) and the drawn options; what it must return."""

    fn: Callable[..., Any]
    input: Any
    shape: tuple[int, ...] | None  # of the output (None: zoneout_states' tuple, like its states)
    dtype: torch.dtype | None
    eval_identity: bool = True  # eval returns ``input`` itself

    def run(self, rate: Any, training: bool, **rng: Any) -> Any:
        return self.fn(self.input, rate, training, **rng)


@dataclass(frozen=True)
class Op:
    build: Callable[[st.DataObject, torch.dtype], Call]
    rate_name: str | None = "p"  # None: concrete_dropout's logit tensor
    rate_kind: str = "probability"  # "probability" | "nonnegative" | "logit"
    training: bool = True  # takes training=
    input_name: str = "input"  # the tensor argument a wrong type is passed as
    identity_at_zero: bool = True  # the float rate 0 returns the input itself


def _unary(
    op: Callable[..., Any], min_rank: int = 0, max_rank: int = 4, **draw_options: st.SearchStrategy[Any]
) -> Callable[[st.DataObject, torch.dtype], Call]:
    def build(data: st.DataObject, dtype: torch.dtype) -> Call:
        x = tensor(data, dtype, min_rank, max_rank)
        options = {name: data.draw(strategy, label=name) for name, strategy in draw_options.items()}
        return Call(lambda x, p, t, **rng: op(x, p, t, **options, **rng), x, tuple(x.shape), dtype)

    return build


def _with_dims(op: Callable[..., Any], **fixed: Any) -> Callable[[st.DataObject, torch.dtype], Call]:
    """A unary op with ``broadcast_dims`` drawn from the input's dims (negative ones too)."""

    def build(data: st.DataObject, dtype: torch.dtype) -> Call:
        x = tensor(data, dtype)
        rank = x.dim()
        dims = data.draw(st.lists(st.integers(-rank, rank - 1), max_size=rank), label="dims") if rank else []
        options = {name: data.draw(value, label=name) for name, value in fixed.items()}
        identity = options.get("inverted", True)
        return Call(
            lambda x, p, t, **rng: op(x, p, t, broadcast_dims=dims, **options, **rng),
            x,
            tuple(x.shape),
            dtype,
            identity,
        )

    return build


def _channel(op: Callable[..., Any], rank: int) -> Callable[[st.DataObject, torch.dtype], Call]:
    return _unary(op, rank + 1, rank + 2, channels_last=st.booleans())


def _drop_block(op: Callable[..., Any], rank: int | None) -> Callable[[st.DataObject, torch.dtype], Call]:
    def build(data: st.DataObject, dtype: torch.dtype) -> Call:
        spatial = data.draw(st.integers(1, 3), label="spatial_rank") if rank is None else rank
        x = tensor(data, dtype, spatial + 1, spatial + 2)
        options: dict[str, Any] = {
            name: data.draw(st.booleans(), label=name)
            for name in ("channels_last", "shared_channels", "per_sample_renorm", "exact_rate")
        }
        options["block_size"] = data.draw(st.integers(1, 4), label="block_size")
        if rank is None:
            options["spatial_rank"] = spatial
        return Call(lambda x, p, t, **rng: op(x, p, t, **options, **rng), x, tuple(x.shape), dtype)

    return build


def _drop_connect_weight(data: st.DataObject, dtype: torch.dtype) -> Call:
    w = tensor(data, dtype, 0, 3)
    return Call(lambda w, p, t, **rng: F.drop_connect_weight(w, p, **rng), w, tuple(w.shape), dtype, False)


ACTIVATIONS = (None, torch.relu, torch.tanh)


def _moment_matching(data: st.DataObject, dtype: torch.dtype) -> Call:
    batch = data.draw(shapes(0, 2), label="batch")
    inputs, outputs = data.draw(st.integers(1, 5), label="in"), data.draw(st.integers(1, 5), label="out")
    x = laid_out(
        values((*batch, inputs), dtype, data.draw(seeds)),
        data.draw(st.sampled_from(("contiguous", "strided"))),
    )
    w = values((outputs, inputs), dtype, data.draw(seeds))
    b = values((outputs,), dtype, data.draw(seeds)) if data.draw(st.booleans(), label="bias") else None
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    samples = data.draw(st.integers(1, 8), label="samples")
    return Call(
        lambda x, p, t, **rng: F.moment_matching_linear(x, w, b, p, activation, samples=samples, **rng),
        x,
        (*batch, outputs),
        dtype,
        False,
    )


def _drop_path(data: st.DataObject, dtype: torch.dtype) -> Call:
    mode = data.draw(st.sampled_from(("row", "batch")), label="mode")
    x = tensor(data, dtype, 1 if mode == "row" else 0)
    batch_dim = data.draw(st.integers(-x.dim(), x.dim() - 1), label="batch_dim") if x.dim() else 0
    return Call(
        lambda x, p, t, **rng: F.drop_path(x, p, t, mode=mode, batch_dim=batch_dim, **rng),
        x,
        tuple(x.shape),
        dtype,
    )


def _vocabulary(data: st.DataObject) -> tuple[torch.Tensor, int, int | None, int | None]:
    """Ids of any shape, the vocabulary size, and a padding and an UNK index (distinct)."""
    vocabulary = data.draw(st.integers(1, 6), label="vocabulary")
    shape = data.draw(shapes(0, 3), label="ids shape")
    g = torch.Generator().manual_seed(data.draw(seeds))
    ids = torch.randint(0, vocabulary, shape, generator=g)
    padding = data.draw(st.none() | st.integers(-vocabulary, vocabulary - 1), label="padding_idx")
    unk = data.draw(st.none() | st.integers(0, vocabulary - 1), label="unk_idx")
    if unk is not None and padding is not None and unk == padding % vocabulary:
        unk = None
    return ids, vocabulary, padding, unk


def _embedding_dropout(data: st.DataObject, dtype: torch.dtype) -> Call:
    ids, vocabulary, padding, unk = _vocabulary(data)
    width = data.draw(st.integers(0, 4), label="width")
    weight = values((vocabulary, width), dtype, data.draw(seeds))
    per_token = data.draw(st.booleans(), label="per_token")
    scale = None if unk is not None else data.draw(st.sampled_from((None, True, False)), label="scale")
    return Call(
        lambda weight, p, t, **rng: F.embedding_dropout(
            ids, weight, p, t, per_token=per_token, scale=scale, unk_idx=unk, padding_idx=padding, **rng
        ),
        weight,
        (*ids.shape, width),
        dtype,
        False,
    )


def _word_dropout(data: st.DataObject, dtype: torch.dtype) -> Call:
    ids, vocabulary, padding, unk = _vocabulary(data)
    if unk is None:
        unk = next(i for i in range(vocabulary + 1) if padding is None or i != padding % vocabulary)
        if unk == vocabulary:  # a one-word vocabulary that is padding: no room for an UNK
            padding = None
            unk = 0
    per_token = data.draw(st.booleans(), label="per_token")
    return Call(
        lambda ids, p, t, **rng: F.word_dropout(
            ids, p, t, unk_idx=unk, num_embeddings=vocabulary, per_token=per_token, padding_idx=padding, **rng
        ),
        ids,
        tuple(ids.shape),
        ids.dtype,
    )


def _residual(data: st.DataObject, dtype: torch.dtype, deprecated: bool = False) -> Call:
    x = tensor(data, dtype, 1 if deprecated else 0)
    residual = values(x.shape, dtype, data.draw(seeds))
    with_bias = deprecated or (x.dim() > 0 and data.draw(st.booleans(), label="bias"))
    bias: Any = values(x.shape[-1:], dtype, data.draw(seeds)) if with_bias else None

    def run(x: Any, p: Any, t: bool, **rng: Any) -> Any:
        if deprecated:
            with pytest.warns(DeprecationWarning, match="deprecated"):
                return F.bias_dropout_add(x, bias, residual, p, t, **rng)
        return F.residual_dropout(x, residual, p, t, bias=bias, **rng)

    return Call(run, x, tuple(x.shape), dtype, False)


def _attention(data: st.DataObject, dtype: torch.dtype) -> Call:
    batch = data.draw(shapes(0, 2, 3), label="batch")
    length, source = data.draw(st.integers(0, 4), label="L"), data.draw(st.integers(1, 4), label="S")
    embed, value_embed = data.draw(st.integers(1, 4), label="E"), data.draw(st.integers(1, 4), label="Ev")
    q = values((*batch, length, embed), dtype, data.draw(seeds))
    k = values((*batch, source, embed), dtype, data.draw(seeds))
    v = laid_out(values((*batch, source, value_embed), dtype, data.draw(seeds)), "transposed")
    mask_kind = data.draw(st.sampled_from(("none", "bool", "float", "causal")), label="mask")
    g = torch.Generator().manual_seed(data.draw(seeds))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(length, source, generator=g) < 0.7
    elif mask_kind == "float":
        mask = values((length, source), dtype, data.draw(seeds))
    causal = mask_kind == "causal"
    return Call(
        lambda q, p, t, **rng: F.scaled_dot_product_attention(q, k, v, mask, p, causal, training=t, **rng),
        q,
        (*batch, length, value_embed),
        dtype,
        False,
    )


def _locked(data: st.DataObject, dtype: torch.dtype) -> Call:
    x = tensor(data, dtype, 2, 4)
    batch_first = data.draw(st.booleans(), label="batch_first")
    return Call(
        lambda x, p, t, **rng: F.locked_dropout(x, p, t, batch_first=batch_first, **rng),
        x,
        tuple(x.shape),
        dtype,
    )


def _zoneout(data: st.DataObject, dtype: torch.dtype) -> Call:
    prev = tensor(data, dtype)
    new = values(prev.shape, dtype, data.draw(seeds))
    return Call(
        lambda prev, p, t, **rng: F.zoneout(prev, new, p, t, **rng), prev, tuple(prev.shape), dtype, False
    )


def _zoneout_states(data: st.DataObject, dtype: torch.dtype) -> Call:
    first, second = tensor(data, dtype), tensor(data, dtype)
    news = (values(first.shape, dtype, data.draw(seeds)), values(second.shape, dtype, data.draw(seeds)))
    other = data.draw(probabilities, label="second rate")

    def run(first: Any, p: Any, t: bool, **rng: Any) -> Any:
        return F.zoneout_states((first, second), news, (p, other), t, **rng)

    return Call(run, first, None, None, False)


def _concrete(data: st.DataObject, dtype: torch.dtype) -> Call:
    x = tensor(data, dtype)
    rank = x.dim()
    dims = data.draw(st.lists(st.integers(-rank, rank - 1), max_size=rank), label="dims") if rank else []
    temperature = data.draw(st.sampled_from((0.1, 1.0)) | st.floats(1e-3, 1.0), label="temperature")

    def run(x: Any, logit: Any, t: bool, **rng: Any) -> Any:
        return F.concrete_dropout(x, logit, t, temperature=temperature, broadcast_dims=dims, **rng)

    return Call(run, x, tuple(x.shape), dtype)


OPS: dict[str, Op] = {
    "dropout": Op(_with_dims(F.dropout, inverted=st.booleans())),
    "dropout1d": Op(_channel(F.dropout1d, 1)),
    "dropout2d": Op(_channel(F.dropout2d, 2)),
    "dropout3d": Op(_channel(F.dropout3d, 3)),
    "alpha_dropout": Op(_with_dims(F.alpha_dropout)),
    "feature_alpha_dropout": Op(_unary(F.feature_alpha_dropout, 2, 4, channels_last=st.booleans())),
    "gaussian_dropout": Op(_with_dims(F.gaussian_dropout)),
    "gaussian_noise": Op(_with_dims(F.gaussian_noise), "std", "nonnegative"),
    "drop_block": Op(_drop_block(F.drop_block, None)),
    "drop_block1d": Op(_drop_block(F.drop_block1d, 1)),
    "drop_block2d": Op(_drop_block(F.drop_block2d, 2)),
    "drop_block3d": Op(_drop_block(F.drop_block3d, 3)),
    "drop_connect_weight": Op(_drop_connect_weight, training=False, input_name="weight"),
    "moment_matching_linear": Op(_moment_matching, training=False, identity_at_zero=False),
    "drop_path": Op(_drop_path),
    "embedding_dropout": Op(_embedding_dropout, input_name="weight", identity_at_zero=False),
    "word_dropout": Op(_word_dropout),
    "bias_dropout_add": Op(lambda data, dtype: _residual(data, dtype, True), identity_at_zero=False),
    "residual_dropout": Op(_residual, identity_at_zero=False),
    "scaled_dot_product_attention": Op(_attention, "dropout_p", input_name="query", identity_at_zero=False),
    "locked_dropout": Op(_locked),
    "zoneout": Op(_zoneout, input_name="prev", identity_at_zero=False),
    "zoneout_states": Op(_zoneout_states, "rates[0]", input_name="prev[0]", identity_at_zero=False),
    "concrete_dropout": Op(_concrete, None, "logit", identity_at_zero=False),
}
#: Public ops that draw nothing (pure functions of a rate): tested by their own properties below.
PURE = ("alpha_dropout_coefficients", "gaussian_dropout_std", "stochastic_depth_rates")


def test_every_public_op_is_covered() -> None:
    assert sorted([*OPS, *PURE]) == sorted(F.__all__)


def rate_strategy(op: Op, dtype: torch.dtype) -> st.SearchStrategy[Any]:
    if op.rate_kind == "nonnegative":
        return stds
    if op.rate_kind == "logit":
        # Any finite logit keeps the scale below 1 + 2**25 for t <= 1; a scale up to 2**14 keeps
        # [-2, 2] inputs finite in float16 (1 - p >= 2**-14: logits up to ~9.7).
        high = 9.5 if dtype == torch.float16 else 1e30  # below float16's and bfloat16's maximum
        edges = st.sampled_from((0.0, -30.0, -1e30, 9.5, 30.0, 89.0, 710.0, 1e30))
        low = -65504.0 if dtype == torch.float16 else -1e30
        logits = st.one_of(edges, st.floats(low, high), st.floats(-40.0, 40.0)).filter(
            lambda v: low <= v <= high
        )
        return logits.map(lambda v: torch.tensor(v, dtype=dtype))
    return probabilities


def as_tensor_rate(rate: float) -> torch.Tensor:
    return torch.tensor([rate], dtype=torch.float64)


@pytest.mark.parametrize("name", list(OPS))
@given(data=st.data())
def test_valid_call_is_finite_shaped_and_engine_exact(name: str, data: st.DataObject) -> None:
    op = OPS[name]
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    call = op.build(data, dtype)
    rate = data.draw(rate_strategy(op, dtype), label="rate")
    if op.rate_name is not None and data.draw(st.booleans(), label="rate as a tensor"):
        rate = as_tensor_rate(rate)  # what a layer passes: read when the op runs
    seed = data.draw(seeds, label="seed")
    training = not op.training or data.draw(st.booleans(), label="training")
    out = call.run(rate, training, seed=seed)
    note(f"output structure {structure(out)}")
    if isinstance(rate, float) and op.rate_name is not None:
        held = call.run(as_tensor_rate(rate), training, seed=seed)
        # SDPA at the float 0 keeps torch's kernel; a tensor rate takes the explicit path.
        if not (name == "scaled_dot_product_attention" and rate == 0.0 and training):
            assert_bits_equal(held, out, "a rate held in a tensor and the float")
    if call.shape is not None:
        assert isinstance(out, torch.Tensor)
        assert (tuple(out.shape), out.dtype) == (call.shape, call.dtype)
    else:  # the states of zoneout_states: each like its previous state
        assert structure(out[:1]) == structure(call.input)
    assert_finite(out)
    with dropkit.use_reference_engine():
        assert_bits_equal(call.run(rate, training, seed=seed), out)
    if op.training and call.eval_identity and not training:
        assert out is call.input, "eval returns the input itself"
    if op.identity_at_zero and training and isinstance(rate, float) and rate == 0.0:
        assert out is call.input, "the rate 0 returns the input itself"


@pytest.mark.parametrize("name", [n for n in OPS if n != "concrete_dropout"])
@given(data=st.data())
def test_valid_call_has_finite_gradients(name: str, data: st.DataObject) -> None:
    op = OPS[name]
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    call = op.build(data, dtype)
    leaves = [t for t in tensors_of(call.input) if t.is_floating_point()]
    if not leaves or name == "moment_matching_linear":  # not meant for backpropagation (documented)
        return
    for leaf in leaves:
        leaf.requires_grad_(True)
    out = call.run(data.draw(rate_strategy(op, dtype), label="rate"), True, seed=data.draw(seeds))
    total = sum(t.double().sum() for t in tensors_of(out) if t.requires_grad)
    if not isinstance(total, torch.Tensor):
        return  # nothing depends on the leaves (every state zoned out at rate 1)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    for grad in grads:
        if grad is not None:
            assert_gradient(grad)


@given(data=st.data())
def test_concrete_dropout_is_finite_for_any_finite_logit(data: st.DataObject) -> None:
    """For t <= 1 every finite logit gives a finite output and finite gradients, both arguments."""
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    call = OPS["concrete_dropout"].build(data, dtype)
    logit = data.draw(rate_strategy(OPS["concrete_dropout"], dtype), label="logit").requires_grad_(True)
    x = call.input.detach().requires_grad_(True)
    out = call.fn(x, logit, True, seed=data.draw(seeds))
    assert_finite(out)
    grad_x, grad_logit = torch.autograd.grad(out.double().sum(), (x, logit))
    assert_finite(grad_x, "input gradient")
    assert_finite(grad_logit, "logit gradient")


# --- invalid arguments of the functional ops ------------------------------------------------------

# A bad value (out of range, NaN, inf): ValueError; a bad type: TypeError.
bad_probabilities = st.one_of(
    st.sampled_from((-TINY, -1.0, 1.0 + 1e-12, 1.5, 7.0, NAN, INF, -INF, 2, -1)),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not 0.0 <= v <= 1.0),
)
bad_stds = st.one_of(
    st.sampled_from((-TINY, -1.0, NAN, INF, -INF, -3)),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (math.isfinite(v) and v >= 0.0)),
)
BAD_TYPES = ("0.5", None, True, False, 0.5j, [0.5], b"0")


def raises_naming(error: type[Exception], name: str, call: Callable[[], Any]) -> None:
    """``call`` raises ``error`` (ValueError or TypeError) and its message names ``name``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # of bias_dropout_add, deprecated
        with pytest.raises((ValueError, TypeError)) as info:
            call()
    assert isinstance(info.value, error), f"{type(info.value).__name__} where {error.__name__}: {info.value}"
    assert re.search(rf"(^|\W){re.escape(name)}(\W|$)", str(info.value)), f"{name!r} not named: {info.value}"


@pytest.mark.parametrize("name", [n for n in OPS if OPS[n].rate_name is not None])
@given(data=st.data())
def test_bad_rate_is_refused_naming_it(name: str, data: st.DataObject) -> None:
    op = OPS[name]
    assert op.rate_name is not None
    call = op.build(data, data.draw(st.sampled_from(DTYPES), label="dtype"))
    training = not op.training or data.draw(st.booleans(), label="training")
    kind = data.draw(st.sampled_from(("value", "type", "tensor")), label="kind")
    if kind == "type":
        bad = data.draw(st.sampled_from(BAD_TYPES), label="rate")
        raises_naming(TypeError, op.rate_name, lambda: call.run(bad, training, seed=0))
        return
    bad = data.draw(bad_stds if op.rate_kind == "nonnegative" else bad_probabilities, label="rate")
    if kind == "value":
        raises_naming(ValueError, op.rate_name, lambda: call.run(bad, training, seed=0))
    elif training and math.isfinite(bad):  # a tensor's value is read when the op runs (training)
        raises_naming(ValueError, op.rate_name, lambda: call.run(as_tensor_rate(bad), True, seed=0))
        wrong = data.draw(
            st.sampled_from(
                (torch.tensor([1]), torch.tensor([0.1, 0.2]), torch.tensor([0.1], requires_grad=True))
            )
        )
        error = TypeError if not wrong.is_floating_point() else ValueError
        raises_naming(error, op.rate_name, lambda: call.run(wrong, True, seed=0))


@given(data=st.data())
def test_bad_logit_or_temperature_of_concrete_dropout_is_refused(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    x = tensor(data, dtype)
    logit = torch.tensor(data.draw(st.sampled_from((NAN, INF, -INF))), dtype=dtype)
    raises_naming(ValueError, "p_logit", lambda: F.concrete_dropout(x, logit, seed=0))
    not_a_tensor: Any = data.draw(st.sampled_from((0.5, None, "0")), label="p_logit")
    raises_naming(TypeError, "p_logit", lambda: F.concrete_dropout(x, not_a_tensor))
    raises_naming(TypeError, "p_logit", lambda: F.concrete_dropout(x, torch.tensor(1)))
    bad_t = data.draw(st.sampled_from((0.0, -1.0, NAN, INF, 1e-300)), label="temperature")
    raises_naming(
        ValueError, "temperature", lambda: F.concrete_dropout(x, torch.tensor(0.0), temperature=bad_t)
    )


@pytest.mark.parametrize("name", list(OPS))
@given(data=st.data())
def test_input_of_a_wrong_type_is_refused_naming_it(name: str, data: st.DataObject) -> None:
    op = OPS[name]
    call = op.build(data, torch.float32)
    bad = data.draw(st.sampled_from(([1.0, 2.0], 1.0, None, "x")), label="input")
    training = not op.training or data.draw(st.booleans(), label="training")
    raises_naming(
        TypeError, op.input_name, lambda: call.fn(bad, valid_rate(op, torch.float32), training, seed=0)
    )


# Seeds of a wrong type (TypeError) or value (ValueError), and generators of a wrong type.
BAD_SEEDS: tuple[tuple[Any, type[Exception], str], ...] = (
    ("x", TypeError, "seed"),
    (1.5, TypeError, "seed"),
    (True, TypeError, "seed"),
    (2**64, ValueError, "seed"),
    (-(2**63) - 1, ValueError, "seed"),
    (torch.zeros(2, dtype=torch.int64), ValueError, "seed"),
    (torch.zeros(3), ValueError, "seed"),
)


def bad_rng(data: st.DataObject) -> tuple[dict[str, Any], type[Exception], str]:
    kind = data.draw(st.sampled_from(("seed", "generator", "both")), label="bad rng")
    if kind == "generator":
        return {"generator": data.draw(st.sampled_from((3, "g", object())))}, TypeError, "generator"
    if kind == "both":
        return {"seed": 1, "generator": torch.Generator()}, ValueError, "seed"
    seed, error, name = data.draw(st.sampled_from(BAD_SEEDS), label="seed")
    return {"seed": seed}, error, name


def valid_rate(op: Op, dtype: torch.dtype) -> Any:
    return torch.tensor(0.0, dtype=dtype) if op.rate_kind == "logit" else 0.3


@pytest.mark.parametrize("name", list(OPS))
@given(data=st.data())
def test_bad_seed_is_refused_where_the_call_draws(name: str, data: st.DataObject) -> None:
    op = OPS[name]
    call = op.build(data, torch.float32)
    rng, error, argument = bad_rng(data)
    raises_naming(error, argument, lambda: call.run(valid_rate(op, torch.float32), True, **rng))


@pytest.mark.parametrize("name", params("test_bad_seed_is_refused_where_nothing_is_drawn", list(OPS)))
@given(data=st.data())
def test_bad_seed_is_refused_where_nothing_is_drawn(name: str, data: st.DataObject) -> None:
    """Eval, or the rate 0: nothing is drawn, and a bad seed is an error all the same."""
    op = OPS[name]
    call = op.build(data, torch.float32)
    rng, error, argument = bad_rng(data)
    if op.training and (op.rate_kind == "logit" or data.draw(st.booleans(), label="eval")):
        raises_naming(error, argument, lambda: call.run(valid_rate(op, torch.float32), False, **rng))
    else:
        raises_naming(error, argument, lambda: call.run(0.0, True, **rng))


# --- the pure functions of a rate -----------------------------------------------------------------


@given(p=probabilities)
def test_rate_constants_are_finite_below_one(p: float) -> None:
    if p == 1.0:
        raises_naming(ValueError, "p", lambda: F.alpha_dropout_coefficients(p))
        raises_naming(ValueError, "p", lambda: F.gaussian_dropout_std(p))
        return
    a, b = F.alpha_dropout_coefficients(p)
    assert math.isfinite(b)
    assert 0.0 < a < math.inf
    assert 0.0 <= F.gaussian_dropout_std(p) < math.inf


@given(bad=bad_probabilities | st.sampled_from(BAD_TYPES))
def test_rate_constants_refuse_bad_rates(bad: Any) -> None:
    error = ValueError if isinstance(bad, (int, float)) and not isinstance(bad, bool) else TypeError
    raises_naming(error, "p", lambda: F.alpha_dropout_coefficients(bad))
    raises_naming(error, "p", lambda: F.gaussian_dropout_std(bad))
    raises_naming(error, "max_rate", lambda: F.stochastic_depth_rates(3, bad))


@given(
    blocks=st.integers(1, 50),
    rate=probabilities,
    rule=st.sampled_from(("linear", "linear_from_zero", "uniform")),
)
def test_stochastic_depth_rates_are_rates_up_to_the_maximum(blocks: int, rate: float, rule: str) -> None:
    rates = F.stochastic_depth_rates(blocks, rate, rule=rule)
    assert len(rates) == blocks
    assert all(0.0 <= r <= rate for r in rates)
    assert rates[-1] == (0.0 if rule == "linear_from_zero" and blocks == 1 else rate)


@given(blocks=st.sampled_from((0, -1, 1.5, "3", None, True)))
def test_stochastic_depth_rates_refuse_bad_block_counts(blocks: Any) -> None:
    error = ValueError if isinstance(blocks, int) and not isinstance(blocks, bool) else TypeError
    raises_naming(error, "num_blocks", lambda: F.stochastic_depth_rates(blocks, 0.1))


# --- the layers -----------------------------------------------------------------------------------


def module_rates(spec: LayerSpec) -> st.SearchStrategy[float]:
    if spec.rate_check == "nonnegative":
        return stds
    if spec.rate_check == "open":  # a learned rate's initial value, in (0, 1)
        return st.one_of(st.sampled_from((TINY, 0.5, 1.0 - TINY)), st.floats(TINY, 1.0 - TINY))
    return probabilities


def build(spec: LayerSpec, rate: float, dtype: torch.dtype, seed: int, training: bool) -> tuple[Any, Any]:
    """The layer (its parameters in ``dtype``) and its inputs, from fixed seeds."""
    dropkit.manual_seed(seed)
    torch.manual_seed(seed)
    layer = spec.make(rate).to(dtype).train(training)
    args = spec.inputs(dtype, False)
    return layer, args


def spec_params(test: str) -> list[Any]:
    return [
        pytest.param(
            spec, id=spec.name, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[test, spec.name])]
        )
        if (test, spec.name) in KNOWN_BUGS
        else pytest.param(spec, id=spec.name)
        for spec in SPECS
    ]


@pytest.mark.parametrize("spec", spec_params("test_layer_is_finite_shaped_and_engine_exact"))
@given(data=st.data())
def test_layer_is_finite_shaped_and_engine_exact(spec: LayerSpec, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    rate = spec.rate if spec.rate_name is None else data.draw(module_rates(spec), label="rate")
    seed = data.draw(seeds, label="seed")
    layout = data.draw(st.sampled_from(("contiguous", "transposed", "strided")), label="layout")
    layer, args = build(spec, rate, dtype, seed, True)
    args = tuple(
        laid_out(a, layout) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    leaves = [a.requires_grad_(True) for a in tensors_of(args) if a.is_floating_point()]
    out = layer(*args)
    assert_finite(out)
    total = sum(t.double().sum() for t in tensors_of(out) if t.requires_grad)
    if isinstance(total, torch.Tensor):
        total.backward()
        grads = [(f"gradient of {name}", param.grad) for name, param in layer.named_parameters()]
        for what, grad in [*grads, *(("input gradient", leaf.grad) for leaf in leaves)]:
            if grad is not None:
                assert_gradient(grad, what)
    with torch.no_grad():
        expected = layer.eval()(*args)
    assert structure(out) == structure(expected), "training and eval outputs differ in shape or dtype"
    if spec.eval_output is not None and spec.name != "TransformerEncoderBlock":
        assert structure(expected) == structure(spec.eval_output(layer, args))
    twin, twin_args = build(spec, rate, dtype, seed, True)
    twin_args = tuple(
        laid_out(a, layout) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in twin_args
    )
    with dropkit.use_reference_engine():
        reference = twin(*twin_args)
    assert_bits_equal(
        tuple(t.detach() for t in tensors_of(reference)), tuple(t.detach() for t in tensors_of(out))
    )


def _rate_attribute(layer: Any, name: str) -> bool:
    """Whether ``name`` of the layer is a validated, assignable rate (a RateAttribute or property)."""
    return isinstance(getattr(type(layer), name, None), (RateAttribute, property))


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS if s.rate_name is not None])
@given(data=st.data())
def test_bad_layer_rate_is_refused_naming_it(spec: LayerSpec, data: st.DataObject) -> None:
    assert spec.rate_name is not None
    name = data.draw(st.sampled_from((spec.rate_name, *spec.extra_rate_names)), label="rate name")
    bad: Any
    error: type[Exception]
    if data.draw(st.booleans(), label="a wrong type"):
        # None is the documented default of the further rates: "the same as the first".
        wrong = BAD_TYPES if name == spec.rate_name else tuple(t for t in BAD_TYPES if t is not None)
        bad, error = data.draw(st.sampled_from(wrong), label="rate"), TypeError
    elif spec.rate_check == "nonnegative":
        bad, error = data.draw(bad_stds, label="rate"), ValueError
    elif spec.rate_check == "open":
        bad, error = data.draw(bad_probabilities | st.sampled_from((0.0, 1.0)), label="rate"), ValueError
    else:
        bad, error = data.draw(bad_probabilities, label="rate"), ValueError
    extra = {} if name == spec.rate_name else {name: bad}
    raises_naming(error, name, lambda: spec.make(bad if name == spec.rate_name else spec.rate, **extra))
    layer = spec.make(spec.rate)
    if not _rate_attribute(layer, name):
        return  # set at construction only
    before = getattr(layer, name)
    raises_naming(error, name, lambda: setattr(layer, name, bad))
    assert getattr(layer, name) == before, "a refused rate leaves the layer's rate as it was"


@given(rate=probabilities, built=st.sampled_from((0.0, 0.3)))
def test_assigned_rates_reach_layer_drop_and_the_embedding_dropout(rate: float, built: float) -> None:
    """LayerDrop and TokenAndPositionEmbedding take an assigned p (validated as above) and use it,
    the embedding layer also when it was built with p = 0 (an nn.Identity then)."""
    stack = dropkit.nn.LayerDrop([torch.nn.Linear(2, 2) for _ in range(8)], built)
    stack.p = rate
    assert stack.p == rate
    expected_kept = stack.kept_layers(torch.ones(2), seed=3)
    assert expected_kept == keep_mask(dropkit.make_key(3), rate, [8]).tolist(), "the decisions use p"
    embed = dropkit.nn.TokenAndPositionEmbedding(5, 4, 3, p=built)
    embed.p = rate
    assert embed.p == rate
    assert isinstance(embed.dropout, dropkit.nn.Dropout if rate > 0.0 else torch.nn.Module)
    tokens = torch.randint(0, 5, (2, 3))
    with torch.no_grad():
        undropped = embed.eval()(tokens)
        dropped = embed.train()(tokens)
    kept = dropped != 0
    # Kept units are scaled by the engine's inverted scale (1 / q) of the rate assigned.
    torch.testing.assert_close(dropped[kept], undropped[kept] * inverted_scale(rate))
    if rate >= 1.0 - 2.0**-17:  # realised as 1: everything dropped
        assert not bool(kept.any())
    if rate < 2.0**-17:  # realised as 0: nothing dropped
        assert torch.equal(kept, undropped != 0)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS if s.seeded])
@given(data=st.data())
def test_bad_layer_seed_is_refused(spec: LayerSpec, data: st.DataObject) -> None:
    training = data.draw(st.booleans(), label="training")
    settable = spec.rate_name is not None and spec.rate_check != "open"
    rate = data.draw(st.sampled_from((0.0, spec.rate)), label="rate") if settable else spec.rate
    layer, args = build(spec, rate, torch.float32, 0, training)
    rng, error, argument = bad_rng(data)
    raises_naming(error, argument, lambda: layer(*args, **rng))


#: Wrappers of arbitrary modules: the wrapped module decides which input dtypes it takes.
ANY_MODULE_WRAPPERS = ("WeightDrop", "StochasticDepth", "LayerDrop")


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(s, id=s.name)
        for s in SPECS
        if s.inputs(torch.float32, True)[0].is_floating_point() and not s.name.startswith(ANY_MODULE_WRAPPERS)
    ],
)
@given(dtype=st.sampled_from((torch.int64, torch.int32, torch.bool)))
def test_layer_input_of_a_non_floating_dtype_is_refused_naming_it(
    spec: LayerSpec, dtype: torch.dtype
) -> None:
    layer = spec.make(spec.rate)
    args = spec.inputs(torch.float32, True)
    bad = (args[0].to(dtype), *args[1:])
    with pytest.raises(TypeError) as info:
        layer(*bad)
    assert str(dtype) in str(info.value), f"the dtype is not named: {info.value}"
    assert re.search(r"\b(input|query|hx|x)\b", str(info.value)), f"the argument is not named: {info.value}"


def test_every_random_layer_is_covered() -> None:
    classes = {type(spec.make(spec.rate)).__name__ for spec in SPECS}
    random = {
        name
        for name in dropkit.nn.__all__
        if isinstance(getattr(dropkit.nn, name), type)
        and issubclass(getattr(dropkit.nn, name), torch.nn.Module)
        and name not in ("KLWarmup", "BiasDropoutAdd")
    }
    assert random <= classes, sorted(random - classes)
