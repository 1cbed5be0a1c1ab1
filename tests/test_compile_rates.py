"""Rates held in tensors: every rate-bearing layer changes its rate under ``torch.compile`` without
recompiling, and the compiled masks, outputs and gradients are the eager ones.

Cheap checks first (eager: each tensor-rate variant and custom op against the float path,
errors, holders, opcheck); then few, focused compiles: one model holding every covered layer
(inductor), one of the sequence layers (aot_eager), and the documented exceptions (dynamo only).
"""

from __future__ import annotations

import copy
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
from dropkit.functional._tensor_rate import TENSOR_RATE_VARIANTS, rate_constants_op
from dropkit.functional.alpha import alpha_dropout_tensor_rate_op
from dropkit.functional.dropblock import drop_block_tensor_rate_op
from dropkit.functional.dropout import dropout_tensor_rate_op
from dropkit.functional.fused import bias_dropout_add_tensor_rate_op
from dropkit.functional.gaussian import gaussian_dropout_tensor_rate_op, gaussian_noise_tensor_rate_op
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


def key() -> torch.Tensor:
    return dropkit.make_key(5, stream=1, step=2)


# --- eager: each variant equals its float functional -------------------------------------------

X = torch.randn(2, 3, 6, 5)
Q, K, V = torch.randn(3, 2, 2, 4, 3).unbind(0)
BIAS = torch.randn(5)
IDS = torch.tensor([[0, 1, 5], [3, 3, 2]])
RESIDUAL = torch.randn(2, 3, 6, 5)

# functional -> call(fn, rate, training): one call of fn with the given rate (float or tensor).
VARIANT_CALLS: dict[Callable[..., Any], Callable[[Callable[..., Any], Any, bool], Any]] = {
    F.dropout: lambda fn, p, t: fn(X, p, t, broadcast_dims=1, inverted=False, seed=5),
    F.dropout1d: lambda fn, p, t: fn(X[0], p, t, seed=5),
    F.dropout2d: lambda fn, p, t: fn(X, p, t, channels_last=True, seed=5),
    F.dropout3d: lambda fn, p, t: fn(X, p, t, seed=5),
    F.alpha_dropout: lambda fn, p, t: fn(X, p, t, broadcast_dims=-1, seed=5),
    F.feature_alpha_dropout: lambda fn, p, t: fn(X, p, t, channels_last=True, seed=5),
    F.gaussian_dropout: lambda fn, p, t: fn(X, p, t, seed=5),
    F.gaussian_noise: lambda fn, p, t: fn(X, 2.0 * p, t, seed=5),
    F.drop_block: lambda fn, p, t: fn(X[0], p, t, block_size=2, spatial_rank=1, seed=5),
    F.drop_block1d: lambda fn, p, t: fn(X[0], p, t, block_size=3, shared_channels=True, seed=5),
    F.drop_block2d: lambda fn, p, t: fn(X, p, t, block_size=3, exact_rate=True, seed=5),
    F.drop_block3d: lambda fn, p, t: fn(X, p, t, block_size=2, per_sample_renorm=True, seed=5),
    F.drop_path: lambda fn, p, t: fn(X, p, t, mode="row", batch_dim=1, seed=5),
    F.bias_dropout_add: lambda fn, p, t: fn(X, BIAS, RESIDUAL, p, t, seed=5),
    F.residual_dropout: lambda fn, p, t: fn(X, RESIDUAL, p, t, bias=BIAS, seed=5),
    F.scaled_dot_product_attention: lambda fn, p, t: fn(Q, K, V, None, p, True, training=t, seed=5),
    F.locked_dropout: lambda fn, p, t: fn(X, p, t, batch_first=True, seed=5),
    F.embedding_dropout: lambda fn, p, t: fn(IDS, X[0, 0], p, t, padding_idx=1, seed=5),
    F.zoneout_states: lambda fn, p, t: torch.cat(fn((X, RESIDUAL), (RESIDUAL, X), (p, 1 - p), t, seed=5)),
}


def test_every_tensor_rate_variant_equals_its_float_functional() -> None:
    assert set(TENSOR_RATE_VARIANTS) == set(VARIANT_CALLS)  # a new variant must be listed here
    for functional, call in VARIANT_CALLS.items():
        variant = TENSOR_RATE_VARIANTS[functional]
        for p in EDGES:
            for training in (True, False):
                expected = call(functional, p, training)
                for holder in (rate(p), rate(p).reshape(())):
                    got = call(variant, holder, training)
                    assert torch.equal(got, expected), f"{functional.__name__}, p={p}, training={training}"


# --- eager: each custom op (forward and its registered backward) equals the float path ---------


def _alpha(x: torch.Tensor, p: Any) -> torch.Tensor:
    if isinstance(p, float):
        return F.alpha_dropout(x, p, broadcast_dims=[2, 3], seed=key())
    return alpha_dropout_tensor_rate_op(x, key(), p, [2, 3])


def _gaussian(x: torch.Tensor, p: Any) -> torch.Tensor:
    if isinstance(p, float):
        return F.gaussian_dropout(x, p, seed=key())
    return gaussian_dropout_tensor_rate_op(x, key(), p, [])


def _noise(x: torch.Tensor, p: Any) -> torch.Tensor:
    if isinstance(p, float):
        return F.gaussian_noise(x, 3.0 * p, broadcast_dims=1, seed=key())
    return gaussian_noise_tensor_rate_op(x, key(), 3.0 * p, [1])


def _block(options: dict[str, Any]) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def block(x: torch.Tensor, p: Any) -> torch.Tensor:
        if isinstance(p, float):
            return F.drop_block(x, p, seed=key(), **options)
        return drop_block_tensor_rate_op(x, key(), p, *options.values())

    return block


def _bias_dropout_add(x: torch.Tensor, p: Any) -> torch.Tensor:
    bias, residual = _BDA_OPERANDS
    if isinstance(p, float):
        return F.bias_dropout_add(x, bias, residual, p, seed=key())
    return bias_dropout_add_tensor_rate_op(x, bias, residual, key(), p)


_BDA_OPERANDS = (torch.randn(5, requires_grad=True), torch.randn(2, 3, 6, 5, requires_grad=True))
_BLOCK = {"block_size": 3, "spatial_rank": 2, "channels_last": False, "shared_channels": False}
OP_CASES = {
    "alpha": _alpha,
    "gaussian": _gaussian,
    "noise": _noise,
    "drop_block": _block({**_BLOCK, "per_sample_renorm": False, "exact_rate": False}),
    "drop_block_exact": _block({**_BLOCK, "per_sample_renorm": True, "exact_rate": True}),
    "drop_block_1d_channels_last": _block(
        {"block_size": 2, "spatial_rank": 1, "channels_last": True, "shared_channels": True}
        | {"per_sample_renorm": False, "exact_rate": False}
    ),
    "bias_dropout_add": _bias_dropout_add,
}


@pytest.mark.parametrize("case", OP_CASES)
def test_each_tensor_rate_op_and_its_backward_equal_the_float_path(case: str) -> None:
    apply = OP_CASES[case]
    shape = (2, 6, 5) if case == "drop_block_1d_channels_last" else (2, 3, 6, 5)
    x = torch.randn(shape)
    x[0, 0, 0] = float("inf")  # dropped units stay exact zeros (alpha: its drop value), never NaN
    grad = torch.randn(shape)
    for p in EDGES:
        grads = []
        for holder in (p, rate(p).reshape(())):
            leaves = [x.clone().requires_grad_(), *(_BDA_OPERANDS if case == "bias_dropout_add" else ())]
            for leaf in leaves:
                leaf.grad = None
            y = apply(leaves[0], holder)
            y.backward(grad)
            grads.append((y.detach(), *[leaf.grad.clone() for leaf in leaves]))  # type: ignore[union-attr]
        for got, expected in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"{case}, p={p}")


OPCHECK_CASES = {
    "dropout": (dropout_tensor_rate_op, lambda x: (x, key(), rate(0.3).reshape(()), [1], True)),
    "alpha": (alpha_dropout_tensor_rate_op, lambda x: (x, key(), rate(0.3).reshape(()), [])),
    "gaussian": (gaussian_dropout_tensor_rate_op, lambda x: (x, key(), rate(0.3).reshape(()), [])),
    "noise": (gaussian_noise_tensor_rate_op, lambda x: (x, key(), rate(0.5).reshape(()), [])),
    "drop_block": (
        drop_block_tensor_rate_op,
        lambda x: (x, key(), rate(0.3).reshape(()), 2, 1, False, False, False, True),
    ),
    "rate_constants": (rate_constants_op, lambda x: (rate(0.3).reshape(()), "p")),
    "bias_dropout_add": (
        bias_dropout_add_tensor_rate_op,
        lambda x: (x, torch.randn(5, requires_grad=True), torch.randn(3, 5), key(), rate(0.3).reshape(())),
    ),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case: str) -> None:
    op, args = OPCHECK_CASES[case]
    torch.library.opcheck(op, args(torch.randn(3, 5, requires_grad=True)))


def test_a_bad_rate_tensor_raises_a_value_error_naming_the_argument_when_read() -> None:
    x = torch.randn(2, 3, 6, 5)
    bad = rate(1.5).reshape(())
    for call in (
        lambda: alpha_dropout_tensor_rate_op(x, key(), bad, []),
        lambda: gaussian_dropout_tensor_rate_op(x, key(), bad, []),
        lambda: drop_block_tensor_rate_op(x, key(), bad, 3, 2, False, False, False, False),
        lambda: bias_dropout_add_tensor_rate_op(x, BIAS, RESIDUAL, key(), bad),
        lambda: rate_constants_op(bad, "p"),
        lambda: TENSOR_RATE_VARIANTS[F.drop_path](x, bad),  # eager variants read it too
    ):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
            call()
    for value in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="std must be a finite float >= 0, got"):
            gaussian_noise_tensor_rate_op(x, key(), rate(value).reshape(()), [])
    with pytest.raises(ValueError, match=r"dropout_p given as a tensor must have shape \(\) or \(1,\)"):
        TENSOR_RATE_VARIANTS[F.scaled_dot_product_attention](Q, K, V, None, torch.zeros(2))
    with pytest.raises(ValueError, match="needs use_engine=True"):
        TENSOR_RATE_VARIANTS[F.scaled_dot_product_attention](Q, K, V, None, rate(0.1), use_engine=False)


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
        (dropkit.nn.BiasDropoutAdd(0.2), "p"),
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
        self.bias_dropout_add = dropkit.nn.BiasDropoutAdd(0.1)
        self.attention = ScaledDotProductAttention(0.1)
        self.locked = LockedDropout(0.1, batch_first=True)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.feature_alpha(self.alpha(x))
        h = self.noise(self.gaussian(h))
        h = self.block(h) + self.block_exact(h)
        h = self.depth(self.path_batch(self.path(h)))
        h = self.residual(h, x)
        h = self.fused(h, x, bias)
        h = self.bias_dropout_add(h, bias, x)
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
    x, bias = torch.randn(2, 3, 5, 5), torch.randn(5)

    def run(fn: Callable[..., torch.Tensor], p: float) -> tuple[torch.Tensor, ...]:
        model.set_rate(p)
        dropkit.manual_seed(3)  # every layer draws its own stream's key: the same in both runs
        inputs = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = fn(*inputs)
        y.square().sum().backward()
        return y.detach(), inputs[0].grad, inputs[1].grad  # type: ignore[return-value]

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
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
        # The bias gradient is a sum over the batch dims: inductor may add in another order.
        torch.testing.assert_close(got[2], expected[2])
        outputs.append(got[0])
    assert counter.frame_count == 1
    assert not torch.equal(outputs[0], outputs[-1])  # the new rates took effect
    model.alpha.p_tensor.fill_(1.5)  # past the setter: the op validates what it reads
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        compiled(x, bias)


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
