"""Rates are data: every functional takes its rate as a float or a one-element tensor through one
code path, and every rate-bearing layer passes its holder tensor, so a ``torch.compile``-d model
changes rates without recompiling, with the eager masks, outputs and gradients bit for bit.

Cheap checks first (eager: every functional with a tensor rate against the float, gradients
included; errors; holders; opcheck); then few, focused compiles: one model holding every covered
layer (inductor), one of the sequence layers (aot_eager), and the documented exceptions.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo.testing
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import dropkit
from dropkit import functional as F
from dropkit import schedules as S
from dropkit.nn.attention import ResidualDropout, ScaledDotProductAttention
from dropkit.nn.dropblock import DropBlock2d
from dropkit.nn.dropconnect import DropConnect
from dropkit.nn.droppath import DropPath, LayerDrop, StochasticDepth
from dropkit.nn.embedding import EmbeddingDropout
from dropkit.nn.locked import LockedDropout
from dropkit.nn.weight_drop import WeightDrop
from dropkit.nn.zoneout import ZoneoutCell

RATES = (0.1, 0.3, 0.5)  # what the compiled models run, one graph for all
EDGES = (0.0, 0.3, 1.0)  # what the eager checks run: the ends take their own branches


def rate(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


# --- eager: a tensor rate gives the float's bits, forward and backward --------------------------

X = torch.randn(2, 3, 6, 5)
X[0, 0, 0, 0] = float("inf")  # dropped units stay exact zeros (alpha: its drop value), never NaN
Q, K, V = torch.randn(3, 2, 2, 4, 3).unbind(0)
BIAS = torch.randn(5)
IDS = torch.tensor([[0, 1, 5], [3, 3, 2]])
RESIDUAL = torch.randn(2, 3, 6, 5)
WEIGHT = torch.randn(4, 5)

# functional -> call(fn, x, rate, training): one call with the given rate (float or tensor) whose
# result is differentiable in x (the leaf whose gradient is compared).
RATE_CALLS: dict[Callable[..., Any], tuple[torch.Tensor, Callable[..., Any]]] = {
    F.dropout: (X, lambda fn, x, p, t: fn(x, p, t, broadcast_dims=1, inverted=False, seed=5)),
    F.dropout1d: (X[0], lambda fn, x, p, t: fn(x, p, t, seed=5)),
    F.dropout2d: (X, lambda fn, x, p, t: fn(x, p, t, channels_last=True, seed=5)),
    F.dropout3d: (X, lambda fn, x, p, t: fn(x, p, t, seed=5)),
    F.alpha_dropout: (X, lambda fn, x, p, t: fn(x, p, t, broadcast_dims=-1, seed=5)),
    F.feature_alpha_dropout: (X, lambda fn, x, p, t: fn(x, p, t, channels_last=True, seed=5)),
    F.gaussian_dropout: (X, lambda fn, x, p, t: fn(x, p, t, seed=5)),
    F.gaussian_noise: (X, lambda fn, x, p, t: fn(x, 2.0 * p, t, broadcast_dims=1, seed=5)),
    F.drop_block: (X[0], lambda fn, x, p, t: fn(x, p, t, block_size=2, spatial_rank=1, seed=5)),
    F.drop_block1d: (X[0], lambda fn, x, p, t: fn(x, p, t, block_size=3, shared_channels=True, seed=5)),
    F.drop_block2d: (X, lambda fn, x, p, t: fn(x, p, t, block_size=3, exact_rate=True, seed=5)),
    F.drop_block3d: (X, lambda fn, x, p, t: fn(x, p, t, block_size=2, per_sample_renorm=True, seed=5)),
    F.drop_path: (X, lambda fn, x, p, t: fn(x, p, t, mode="row", batch_dim=1, seed=5)),
    F.residual_dropout: (X, lambda fn, x, p, t: fn(x, RESIDUAL, p, t, bias=BIAS, seed=5)),
    F.scaled_dot_product_attention: (Q, lambda fn, x, p, t: fn(x, K, V, None, p, True, training=t, seed=5)),
    F.locked_dropout: (X, lambda fn, x, p, t: fn(x, p, t, batch_first=True, seed=5)),
    F.embedding_dropout: (X[0, 0], lambda fn, x, p, t: fn(IDS, x, p, t, padding_idx=1, seed=5)),
    F.word_dropout: (
        X,
        lambda fn, x, p, t: fn(IDS, p, t, unk_idx=0, num_embeddings=6, seed=5).float() * x[0, 0, 0, 0:3],
    ),
    F.zoneout: (X, lambda fn, x, p, t: fn(x, RESIDUAL, p, t, seed=5)),
    F.zoneout_states: (
        X,
        lambda fn, x, p, t: torch.cat(fn((x, RESIDUAL), (RESIDUAL, x), (p, 1 - p), t, seed=5)),
    ),
    F.drop_connect_weight: (WEIGHT, lambda fn, x, p, t: fn(x, p, seed=5)),
    F.moment_matching_linear: (X, lambda fn, x, p, t: fn(x, WEIGHT, None, p, torch.tanh, samples=8, seed=5)),
}
# Deprecated aliases take rates too (they call the functions above).
ALIASES = {F.bias_dropout_add}
NOT_RATES = {
    "alpha_dropout_coefficients",
    "gaussian_dropout_std",
    "stochastic_depth_rates",
    "concrete_dropout",
}


def test_every_functional_with_a_rate_is_covered() -> None:
    for name in F.__all__:
        function = getattr(F, name)
        if name in NOT_RATES or function in ALIASES:
            continue
        assert function in RATE_CALLS, f"dropkit.functional.{name} takes a rate: add it to RATE_CALLS"
        parameters = inspect.signature(function).parameters
        rate_names = [n for n in ("p", "std", "dropout_p", "rates") if n in parameters]
        assert rate_names, f"{name} has no rate argument"


@pytest.mark.parametrize("functional", list(RATE_CALLS), ids=lambda f: f.__name__)
def test_a_tensor_rate_gives_the_float_bits_forward_and_backward(functional: Callable[..., Any]) -> None:
    x, call = RATE_CALLS[functional]
    for p in EDGES:
        for training in (True, False):
            results = []
            for holder in (p, rate(p), rate(p).reshape(())):
                leaf = x.clone().requires_grad_()
                y = call(functional, leaf, holder, training)
                grad = None
                if y.requires_grad:  # zoneout at p = 1 in eval returns prev itself, free of x
                    grad = torch.autograd.grad(y, leaf, torch.ones_like(y), allow_unused=True)[0]
                results.append((y.detach(), torch.zeros_like(leaf) if grad is None else grad))
            # SDPA at p = 0 with a tensor rate takes the explicit path where the float takes
            # torch's kernel (a compiled graph cannot branch on the rate): equal to float rounding.
            exact = not (functional is F.scaled_dot_product_attention and p == 0.0 and training)
            for got in results[1:]:
                for a, b in zip(got, results[0], strict=True):
                    torch.testing.assert_close(
                        a,
                        b,
                        **({"rtol": 0, "atol": 0} if exact else {}),
                        equal_nan=True,
                        msg=f"{functional.__name__} p={p} training={training}",
                    )


def key() -> torch.Tensor:
    return dropkit.make_key(5, stream=1, step=2)


OPCHECK_CASES = {
    "checked_rate": (torch.ops.dropkit.checked_rate, lambda x: (rate(0.3).reshape(()), "p", True)),
    "masked_affine[alpha]": (
        torch.ops.dropkit.masked_affine,
        lambda x: (x, key(), rate(0.3).reshape(()), [1], "alpha", "p"),
    ),
    "drop_block": (
        torch.ops.dropkit.drop_block,
        lambda x: (x, key(), rate(0.3).reshape(()), 2, 1, False, False, False, True, "p"),
    ),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case: str) -> None:
    op, args = OPCHECK_CASES[case]
    torch.library.opcheck(op, args(torch.randn(3, 5, requires_grad=True)))


def test_a_bad_rate_tensor_raises_a_value_error_naming_the_argument_when_read() -> None:
    x = torch.randn(2, 3, 6, 5)
    bad = rate(1.5)
    for call in (
        lambda: F.dropout(x, bad),
        lambda: F.alpha_dropout(x, bad),
        lambda: F.gaussian_dropout(x, bad),
        lambda: F.drop_block2d(x, bad, block_size=3),
        lambda: F.residual_dropout(x, RESIDUAL, bad, bias=BIAS),
        lambda: F.drop_path(x, bad),
    ):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
            call()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        F.scaled_dot_product_attention(Q, K, V, None, bad)
    for value in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="std must be a finite float >= 0, got"):
            F.gaussian_noise(x, rate(value))
    with pytest.raises(ValueError, match=r"dropout_p given as a tensor must have shape \(\) or \(1,\)"):
        F.scaled_dot_product_attention(Q, K, V, None, torch.zeros(2))
    with pytest.raises(TypeError, match="p given as a tensor must be floating point"):
        F.dropout(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="not require grad"):
        F.dropout(x, rate(0.5).requires_grad_())
    with pytest.raises(ValueError, match="needs use_engine=True"):
        F.scaled_dot_product_attention(Q, K, V, None, rate(0.1), use_engine=False)


def test_a_rate_schedule_grows_no_cache() -> None:
    from dropkit.functional import dropblock
    from dropkit.kernels import cpu

    x = torch.randn(2, 3, 8, 8)
    layers = [
        dropkit.nn.Dropout(0.1),
        dropkit.nn.AlphaDropout(0.1),
        DropBlock2d(0.1, block_size=3, exact_rate=True),
    ]
    for layer in layers:
        layer(x)
    sizes = len(cpu._recipes), len(dropblock._EXACT_SEED_RATES)
    for step in range(30):
        for layer in layers:
            layer.p = 0.05 + 0.01 * step  # type: ignore[assignment]
            layer(x)
    assert (len(cpu._recipes), len(dropblock._EXACT_SEED_RATES)) == sizes


# --- the modules' holders -----------------------------------------------------------------------


def holder_layers() -> list[tuple[nn.Module, str]]:
    return [
        (dropkit.nn.AlphaDropout(0.2), "p"),
        (dropkit.nn.FeatureAlphaDropout(0.2), "p"),
        (dropkit.nn.GaussianDropout(0.2), "p"),
        (dropkit.nn.GaussianNoise(0.2), "std"),
        (DropBlock2d(0.2), "p"),
        (DropPath(0.2), "p"),
        (StochasticDepth(nn.Linear(3, 3), 0.2), "p"),
        (ResidualDropout(0.2), "p"),
        (ScaledDotProductAttention(0.2), "p"),
        (LockedDropout(0.2), "p"),
        (EmbeddingDropout(nn.Embedding(4, 2), 0.2), "p"),
        (WeightDrop(nn.Linear(2, 2), 0.2, weights="weight"), "p"),
        (ZoneoutCell(nn.LSTMCell(2, 2), 0.2, cell_p=0.2), "p"),
        (ZoneoutCell(nn.LSTMCell(2, 2), 0.2, cell_p=0.2), "cell_p"),
        (DropConnect(nn.Linear(2, 2), 0.2), "p"),
    ]


def test_rates_are_validated_and_mirrored_in_place_and_stay_out_of_state_dict() -> None:
    for layer, name in holder_layers():
        holder = getattr(layer, f"{name}_tensor")
        keys = list(layer.state_dict())
        setattr(layer, name, 0.75)
        assert getattr(layer, name) == 0.75
        assert getattr(layer, f"{name}_tensor") is holder  # filled in place: a graph input stays valid
        assert holder.dtype == torch.float64
        assert holder.tolist() == [0.75]
        with pytest.raises(ValueError, match=f"{name} must be"):
            setattr(layer, name, -0.5)
        assert getattr(layer, name) == 0.75
        assert list(layer.state_dict()) == keys
        assert f"{name}_tensor" not in keys
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert getattr(twin, name) == 0.75
            twin_holder = getattr(twin, f"{name}_tensor")
            assert twin_holder is not holder
            assert twin_holder.tolist() == [0.75]
            setattr(twin, name, 0.5)
            assert holder.tolist() == [0.75]  # copies do not share the holder
        # A layer pickled when the rate was a plain attribute loads with a fresh holder.
        state = dict(layer.__dict__)
        state[name] = state.pop(f"_{name}")
        del state[f"{name}_tensor"]
        old = type(layer).__new__(type(layer))
        old.__setstate__(state)
        assert getattr(old, name) == 0.75
        assert getattr(old, f"{name}_tensor").tolist() == [0.75]
    assert repr(dropkit.nn.GaussianNoise(0.5)) == "GaussianNoise(std=0.5, inplace=False)"


@pytest.mark.parametrize(
    ("layer", "rate", "expected"),
    [
        (lambda: dropkit.nn.Dropout(0.3), "p", float),
        (lambda: dropkit.nn.GaussianNoise(0.2), "std", float),
        (lambda: DropPath(0.3), "p", float),
        (lambda: DropPath(0.0), "p", torch.Tensor),  # computes at 0: only torch's family passes through
    ],
)
def test_an_eager_layer_hands_its_op_the_float_its_holder_mirrors(
    layer: Callable[[], nn.Module], rate: str, expected: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = layer()
    seen: list[object] = []
    functional = type(module)._functional

    def spy(input: torch.Tensor, given: object, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(given)
        return functional(input, given, *args, **kwargs)

    monkeypatch.setattr(type(module), "_functional", staticmethod(spy))
    x = torch.randn(4, 8)
    module(x, seed=5)
    (given,) = seen
    assert isinstance(given, expected)
    if expected is float:
        assert given == getattr(module, rate)
    else:
        assert given is getattr(module, f"{rate}_tensor")


def test_under_a_function_mode_a_layer_hands_its_op_the_holder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the op would be traced rather than run eagerly (a torch function mode here), the layer
    passes the holder, as a compiled graph reads it: the same predicate decides both."""
    from torch.overrides import TorchFunctionMode

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            return func(*args, **(kwargs or {}))

    layer = dropkit.nn.Dropout(0.3)
    seen: list[object] = []
    functional = type(layer)._functional

    def spy(input: torch.Tensor, given: object, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(given)
        return functional(input, given, *args, **kwargs)

    monkeypatch.setattr(type(layer), "_functional", staticmethod(spy))
    x = torch.randn(4, 8)
    with PassThrough():
        traced = layer(x, seed=5)
    assert seen == [layer.p_tensor]
    assert torch.equal(traced, layer(x, seed=5))
    assert seen[-1] == 0.3


def test_a_make_fx_trace_reads_the_holder_so_a_new_rate_takes_effect() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    layer = dropkit.nn.Dropout(0.5)
    x = torch.ones(4, 64)
    traced = make_fx(lambda t: layer(t, seed=3))(x)
    before = traced(x)
    assert torch.equal(before, layer(x, seed=3))
    layer.p = 0.25
    after = traced(x)
    assert not torch.equal(after, before)  # the rate is read from the holder when the trace runs
    assert torch.equal(after, layer(x, seed=3))


def test_attaching_to_a_compiled_model_warns_only_about_rates_it_would_recompile_for() -> None:
    covered = nn.ModuleList([layer for layer, _ in holder_layers()])
    constant = nn.ModuleList(
        [ScaledDotProductAttention(0.1, use_engine=False), LayerDrop([nn.Identity()], 0.1), nn.Dropout(0.1)]
    )
    compiled = torch.compile(nn.ModuleDict({"covered": covered, "constant": constant}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index, (_, name) in enumerate(holder_layers()):
            rates = S.attach(compiled, S.Constant(0.1), names=f"covered.{index}", attribute=name)
            assert rates.attachments[0].names == [f"covered.{index}"]
    with pytest.warns(
        UserWarning, match=r"treats 'p' of 'constant.0', 'constant.1', 'constant.2' as a constant"
    ):
        S.attach(compiled, S.Constant(0.1), names=re.compile(r"constant\.\d+"))


# --- compiled: one graph for every rate ---------------------------------------------------------


class RateModel(nn.Module):
    """Every layer whose rate a compiled graph reads as an input, in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = dropkit.nn.Dropout(0.1)
        self.original = dropkit.nn.Dropout(0.1, inverted=False)
        self.spatial = dropkit.nn.Dropout2d(0.1)
        self.alpha = dropkit.nn.AlphaDropout(0.1)
        self.feature_alpha = dropkit.nn.FeatureAlphaDropout(0.1, channels_last=True)
        self.gaussian = dropkit.nn.GaussianDropout(0.1)
        self.noise = dropkit.nn.GaussianNoise(0.1)
        self.block = DropBlock2d(0.1, block_size=3)
        self.block_exact = DropBlock2d(0.1, block_size=2, exact_rate=True)
        self.path = DropPath(0.1)
        self.path_batch = DropPath(0.1, mode="batch")
        self.depth = StochasticDepth(nn.Identity(), 0.1)
        self.residual = ResidualDropout(0.1)
        self.fused = ResidualDropout(0.1)
        self.attention = ScaledDotProductAttention(0.1)
        self.locked = LockedDropout(0.1, batch_first=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.spatial(self.original(self.dropout(x)))
        h = self.feature_alpha(self.alpha(h))
        h = self.noise(self.gaussian(h))
        h = self.block(h) + self.block_exact(h)
        h = self.depth(self.path_batch(self.path(h)))
        h = self.residual(h, residual)
        h = self.fused(h, residual, bias)
        q = h.flatten(2)  # (N, C, H * W): C queries of H * W features
        h = self.attention(q, q, q, is_causal=True)
        return self.locked(h)

    def set_rate(self, value: float) -> None:
        for module in self.modules():
            if isinstance(module, dropkit.nn.GaussianNoise):
                module.std = value
            elif hasattr(module, "p_tensor"):
                module.p = value


@pytest.mark.slow
def test_compiled_rate_changes_run_one_graph_with_the_eager_masks_and_gradients() -> None:
    torch._dynamo.reset()
    model = RateModel()
    x, residual, bias = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5), torch.randn(5)

    def run(fn: Callable[..., torch.Tensor], p: float) -> tuple[torch.Tensor, ...]:
        model.set_rate(p)
        dropkit.manual_seed(3)  # every layer draws its own stream's key: the same in both runs
        inputs = x.clone().requires_grad_(), residual.clone().requires_grad_(), bias.clone().requires_grad_()
        y = fn(*inputs)
        y.square().sum().backward()
        return y.detach(), inputs[0].grad, inputs[1].grad, inputs[2].grad  # type: ignore[return-value]

    # aot_eager: dynamo and AOTAutograd (the backward included) on eager kernels.  Inductor's
    # generated code for the plain tensor maths around the ops (attention, residual sums) may
    # round in another order; the mask ops themselves are opaque to it (see the test below).
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    outputs = []
    for index, p in enumerate(RATES):
        expected = run(model, p)
        if index == 0:
            got = run(compiled, p)
            assert counter.frame_count == 1
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                got = run(compiled, p)
        assert torch.equal(got[0], expected[0]), f"output at p={p}"
        assert torch.equal(got[1], expected[1]), f"input gradient at p={p}"
        # The residual and bias gradients are sums over two paths / the batch dims: inductor may
        # add in another order (x reaches the output by one path only, so its gradient is exact).
        torch.testing.assert_close(got[2], expected[2])
        torch.testing.assert_close(got[3], expected[3])
        outputs.append(got[0])
    assert counter.frame_count == 1
    assert not torch.equal(outputs[0], outputs[-1])  # the new rates took effect
    model.alpha.p_tensor.fill_(1.5)  # past the setter: the op validates what it reads
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        compiled(x, residual, bias)


@pytest.mark.slow
def test_inductor_runs_the_mask_ops_with_the_eager_bits_across_rate_changes() -> None:
    torch._dynamo.reset()
    model = nn.Sequential(
        dropkit.nn.Dropout(0.1),
        dropkit.nn.AlphaDropout(0.1),
        dropkit.nn.GaussianDropout(0.1),
        DropPath(0.1),
        LockedDropout(0.1, batch_first=True),
    )
    x = torch.randn(4, 6, 8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for index, p in enumerate(RATES):
        for module in model:
            module.p = p  # type: ignore[union-attr]
        results = []
        for fn in (model, compiled):
            dropkit.manual_seed(11)
            leaf = x.clone().requires_grad_()
            y = fn(leaf)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), leaf.grad))
        for got, expected in zip(results[1], results[0], strict=True):
            assert torch.equal(got, expected), f"p={p}"
        assert counter.frame_count == 1, f"recompiled at rate index {index}"


class SequenceModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = EmbeddingDropout(nn.Embedding(10, 4, padding_idx=0), 0.2)
        self.locked = LockedDropout(0.1)
        self.cell = ZoneoutCell(nn.LSTMCell(4, 4), p=0.1, cell_p=0.5)
        self.weight_drop = WeightDrop(nn.Linear(4, 3), 0.25, weights="weight")
        self.weight_drop_original = WeightDrop(nn.Linear(3, 3), 0.25, weights="weight", inverted=False)

    def set_rate(self, p: float) -> None:
        self.embedding.p = self.locked.p = self.weight_drop.p = self.weight_drop_original.p = p
        self.cell.p, self.cell.cell_p = p, 1 - p

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.locked(self.embedding(ids))  # (T, B, 4)
        state = None
        outputs = []
        for step in range(h.shape[0]):
            state = self.cell(h[step], state)
            outputs.append(state[0])
        return self.weight_drop_original(self.weight_drop(torch.stack(outputs)))


@pytest.mark.slow
def test_compiled_sequence_layers_match_eager_over_training_steps() -> None:
    # aot_eager: dynamo and AOTAutograd (fullgraph, the backward included) without inductor's
    # code generation, whose decomposed LSTM cell differs from eager's fused one in the last bits.
    torch._dynamo.reset()
    model = SequenceModel()
    ids = torch.randint(0, 10, (4, 2))

    def steps(fn: Callable[..., torch.Tensor]) -> list[list[torch.Tensor]]:
        dropkit.manual_seed(7)
        results = []
        for p in RATES:  # every rate changes every step
            model.set_rate(p)
            model.zero_grad()
            y = fn(ids)
            y.square().sum().backward()
            results.append([y.detach()] + [param.grad.clone() for param in model.parameters()])  # type: ignore[union-attr]
        return results

    expected = steps(model)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    got = steps(compiled)
    assert counter.frame_count == 1
    for step, (g, e) in enumerate(zip(got, expected, strict=True)):
        for a, b in zip(g, e, strict=True):
            assert torch.equal(a, b), f"step {step}"
    # Eval uses the rates too (zoneout's expectation, the original weight drop's q W): the
    # training flag is guarded, so eval traces its own graph once, then no more.
    model.eval()
    for p in RATES:
        model.set_rate(p)
        assert torch.equal(compiled(ids), model(ids)), f"eval at p={p}"
    assert counter.frame_count == 2


@pytest.mark.slow
def test_compiled_drop_connect_reads_its_rate_at_run_time() -> None:
    torch._dynamo.reset()
    x = torch.randn(5, 4)
    layers = [
        DropConnect(nn.Linear(4, 3), 0.1),
        DropConnect(nn.Linear(4, 3), 0.1, per_example=True, chunk_size=2),
        DropConnect(nn.Linear(4, 3), 0.1, inference="moment_matching", activation=torch.tanh).eval(),
    ]
    for layer in layers:
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, backend=counter, fullgraph=True)
        for p in RATES:
            layer.p = p
            results = []
            for fn in (layer, compiled):
                inputs = x.clone().requires_grad_()
                y = fn(inputs, seed=3)
                y.sum().backward()
                results.append((y, inputs.grad))
            for got, expected in zip(results[1], results[0], strict=True):
                assert torch.equal(got, expected), f"{layer!r} at p={p}"
        assert counter.frame_count == 1, repr(layer)


@pytest.mark.slow
def test_documented_exceptions_recompile_or_break_as_documented() -> None:
    torch._dynamo.reset()
    # SDPA on torch's kernel: dropout_p is a float argument of torch's op, a graph constant, so a
    # new rate compiles again (where dynamo then tries a symbolic float, which the rate check
    # breaks the graph on: hence no fullgraph here).
    attention = ScaledDotProductAttention(0.1, use_engine=False)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(attention, backend=counter)
    compiled(Q, K, V)
    assert counter.frame_count == 1
    attention.p = 0.3
    compiled(Q, K, V)
    assert counter.frame_count > 1
    # LayerDrop: the kept layers are a Python branch on drawn values.
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(LayerDrop([nn.Identity()], 0.5), backend="eager", fullgraph=True)(X)
    # LockedDropout on a PackedSequence graph-breaks (fullgraph=False) and still draws the eager masks.
    locked = LockedDropout(0.3)
    packed = pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    expected = locked(packed, seed=11).data
    assert torch.equal(torch.compile(locked, backend="eager")(packed, seed=11).data, expected)
