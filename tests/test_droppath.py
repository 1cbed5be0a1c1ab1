"""DropPath / stochastic depth, StochasticDepth residual wrapper, LayerDrop and rate schedules."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

import dropkit
from dropkit.engine import streams
from dropkit.functional.droppath import drop_path, stochastic_depth_rates
from dropkit.nn.droppath import DropPath, LayerDrop, StochasticDepth


def _rows_dropped(y: torch.Tensor, x: torch.Tensor, p: float, batch_dim: int = 0) -> torch.Tensor:
    """Per-sample flags (True = dropped), asserting every sample is all zero or exactly x / q."""
    y_rows = y.movedim(batch_dim, 0).flatten(1)
    expected = (x / (1.0 - p)).movedim(batch_dim, 0).flatten(1)
    dropped = (y_rows == 0).all(1)
    kept = torch.isclose(y_rows, expected, rtol=1e-6, atol=0.0).all(1)
    assert bool((dropped ^ kept).all()), "each sample must be all zero or all x / q"
    return dropped


# --- functional -------------------------------------------------------------------------------


def test_batch_mode_on_a_scalar() -> None:
    x = torch.tensor(2.0)
    outs = {float(drop_path(x, 0.5, mode="batch", seed=s)) for s in range(64)}
    assert outs == {0.0, 4.0}


@pytest.mark.parametrize("batch_dim", [1, -2])
def test_batch_dim_other_than_zero(batch_dim: int) -> None:
    x = torch.rand(5, 64, 3) + 0.5  # time-first (T, N, E)
    y = drop_path(x, 0.5, batch_dim=batch_dim, seed=4)
    dropped = _rows_dropped(y, x, 0.5, batch_dim=1)
    assert 0 < int(dropped.sum()) < 64
    assert torch.equal(y, drop_path(x, 0.5, batch_dim=1, seed=4))


@pytest.mark.parametrize(("mode", "batch_dim"), [("row", 0), ("row", 1), ("batch", 0)])
def test_functional_equals_module(mode: str, batch_dim: int) -> None:
    x = torch.randn(8, 8, 3)
    m = DropPath(0.5, mode=mode, batch_dim=batch_dim)
    assert torch.equal(m(x, seed=7), drop_path(x, 0.5, mode=mode, batch_dim=batch_dim, seed=7))
    # The module's own draws use its stream and step: key [seed, stream, step].
    for step in range(3):
        key = dropkit.make_key(1234, m.rng_stream, step)
        assert torch.equal(m(x), drop_path(x, 0.5, mode=mode, batch_dim=batch_dim, seed=key))
    assert m.eval()(x) is x


def test_module_repr() -> None:
    assert repr(DropPath(0.2)) == "DropPath(p=0.2, inplace=False)"
    assert repr(DropPath(0.2, mode="batch", batch_dim=1)) == (
        "DropPath(p=0.2, inplace=False, mode='batch', batch_dim=1)"
    )
    assert "p=0.3, mode='batch'" in repr(StochasticDepth(nn.Identity(), 0.3, mode="batch"))
    assert "p=0.1" in repr(LayerDrop([nn.Identity()], 0.1))


# --- StochasticDepth --------------------------------------------------------------------------


class _Counting(nn.Module):
    """A residual branch that counts its calls."""

    def __init__(self, features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def test_stochastic_depth_batch_mode_skips_dropped_branches() -> None:
    branch = _Counting()
    sd = StochasticDepth(branch, 0.5, mode="batch")
    x = torch.randn(3, 4)
    kept = 0
    for seed in range(200):
        x_ = x.clone().requires_grad_(True)
        y = sd(x_, seed=seed)
        x_ref = x.clone().requires_grad_(True)
        with torch.no_grad():
            branch_out = branch.linear(x)
        is_kept = not bool((drop_path(branch_out, 0.5, mode="batch", seed=seed) == 0).all())
        kept += is_kept
        assert branch.calls == kept, "the branch must run exactly when it is kept"
        ref = x_ref + drop_path(branch.linear(x_ref), 0.5, mode="batch", seed=seed)
        assert torch.equal(y, ref)
        y.sum().backward()
        ref.sum().backward()
        assert x_.grad is not None
        assert x_ref.grad is not None
        assert torch.equal(x_.grad, x_ref.grad)
    assert 50 < kept < 150


def test_stochastic_depth_module_keys_match_computed_path() -> None:
    branch = _Counting()
    sd = StochasticDepth(branch, 0.5, mode="batch")
    x = torch.randn(3, 4)
    for step in range(40):
        key = dropkit.make_key(1234, sd.rng_stream, step)
        with torch.no_grad():
            expected = x + drop_path(branch.linear(x), 0.5, mode="batch", seed=key)
            assert torch.equal(sd(x), expected)
    assert int(sd.rng_step) == 40, "a skipped branch still advances the step"
    assert 0 < branch.calls < 40


def test_stochastic_depth_defaults_and_state_dict() -> None:
    sd = StochasticDepth(nn.Linear(4, 4))
    assert sd.p == DropPath().p == 0.1  # the module pair agrees on the default rate
    assert set(sd.state_dict()) == {"module.weight", "module.bias"}


def test_stochastic_depth_state_dict_saved_under_the_former_block_prefix_loads() -> None:
    # Checkpoints written before the branch was renamed `block` -> `module`, nested too.
    source = nn.Sequential(StochasticDepth(nn.Linear(4, 4), 0.2))
    old = {key.replace(".module.", ".block."): value for key, value in source.state_dict().items()}
    assert set(old) == {"0.block.weight", "0.block.bias"}
    target = nn.Sequential(StochasticDepth(nn.Linear(4, 4), 0.2))
    target.load_state_dict(old)  # strict: no missing or unexpected keys
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_stochastic_depth_pickled_whole_under_the_former_block_name_loads() -> None:
    sd = StochasticDepth(nn.Linear(4, 4), 0.2)
    sd._modules = {"block": sd.module}  # what such a pickle holds: no `module`, no load hook
    sd._load_state_dict_pre_hooks.clear()
    old = pickle.loads(pickle.dumps(sd))
    assert list(old._modules) == ["module"]
    x = torch.randn(3, 4)
    assert torch.equal(old.eval()(x), x + old.module(x))
    old.load_state_dict({"block.weight": torch.ones(4, 4), "block.bias": torch.zeros(4)})
    assert torch.equal(old.module.weight, torch.ones(4, 4))


# --- LayerDrop --------------------------------------------------------------------------------


class _AddOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + 1


def test_layerdrop_decisions_follow_the_key() -> None:
    stack = LayerDrop([_AddOne() for _ in range(6)], 0.5)
    x = torch.zeros(1)
    assert torch.equal(stack(x, seed=3), stack(x, seed=3))
    keys = [dropkit.make_key(1234, stack.rng_stream, step) for step in range(4)]
    expected = [stack.kept_layers(x, seed=key) for key in keys]
    assert int(stack.rng_step) == 0, "explicit seeds do not advance the step"
    for kept in expected:
        assert torch.equal(stack(x), torch.full((1,), float(sum(kept))))
    assert int(stack.rng_step) == 4


def test_layerdrop_decisions_ignore_the_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = LayerDrop([_AddOne() for _ in range(16)], 0.5)
    x = torch.zeros(1)
    rank0 = [stack.kept_layers(x) for _ in range(4)]
    rank0_seed = streams.effective_seed()
    monkeypatch.setattr(streams, "_distributed_rank", lambda: 3)
    assert streams.effective_seed() != rank0_seed, "the patch must make this process look like rank 3"
    stack.reset_rng_step()
    assert [stack.kept_layers(x) for _ in range(4)] == rank0


def test_layerdrop_accepts_module_list_and_sequential() -> None:
    for container in (nn.ModuleList([_AddOne(), _AddOne()]), nn.Sequential(_AddOne(), _AddOne())):
        stack = LayerDrop(container, 0.0)
        assert torch.equal(stack(torch.zeros(1)), torch.full((1,), 2.0))


# --- schedules --------------------------------------------------------------------------------


def test_stochastic_depth_rates() -> None:
    assert stochastic_depth_rates(4, 0.5) == [0.125, 0.25, 0.375, 0.5]
    # Huang et al.: ResNet-110 (54 blocks) with p_L = 0.5: first block 0.5 / 54, last 0.5.
    huang = stochastic_depth_rates(54, 0.5)
    assert math.isclose(huang[0], 0.5 / 54)
    assert huang[-1] == 0.5
    assert stochastic_depth_rates(5, 0.2, rule="linear_from_zero") == pytest.approx(
        [0.0, 0.05, 0.1, 0.15, 0.2]
    )
    assert stochastic_depth_rates(12, 0.1, rule="linear_from_zero") == pytest.approx(
        torch.linspace(0, 0.1, 12).tolist()
    )
    assert stochastic_depth_rates(1, 0.3) == [0.3]
    assert stochastic_depth_rates(1, 0.3, rule="linear_from_zero") == [0.0]
    assert stochastic_depth_rates(3, 0.2, rule="uniform") == [0.2, 0.2, 0.2]
    assert stochastic_depth_rates(3, 0.0) == [0.0, 0.0, 0.0]


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "col"}, ValueError, "'col'"),
        ({"mode": 3}, ValueError, "mode"),
        ({"batch_dim": 2}, ValueError, "batch_dim"),
        ({"batch_dim": -3}, ValueError, "batch_dim"),
        ({"batch_dim": True}, TypeError, "batch_dim"),
        ({"batch_dim": 0.0}, TypeError, "batch_dim"),
        ({"inplace": None}, TypeError, "inplace"),
    ],
)
def test_drop_path_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        drop_path(torch.randn(4, 3), **kwargs)  # type: ignore[arg-type]


def test_drop_path_bad_input() -> None:
    with pytest.raises(ValueError, match="0-D"):
        drop_path(torch.tensor(1.0))


def test_module_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'col'"):
        DropPath(0.1, mode="col")
    with pytest.raises(TypeError, match="batch_dim"):
        DropPath(0.1, batch_dim="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_dim"):
        DropPath(0.1, batch_dim=5)(torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        StochasticDepth(lambda x: x, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'sample'"):
        StochasticDepth(nn.Identity(), 0.1, mode="sample")
    with pytest.raises(ValueError, match="at least one"):
        LayerDrop([], 0.1)
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        LayerDrop([nn.Identity(), "relu"], 0.1)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="single Linear"):
        LayerDrop(nn.Linear(2, 2), 0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0, 0.1), {}, ValueError, "num_blocks must be >= 1"),
        ((1.5, 0.1), {}, TypeError, "num_blocks must be an int"),
        ((True, 0.1), {}, TypeError, "num_blocks must be an int"),
        ((4, -0.1), {}, ValueError, "max_rate"),
        ((4, 2), {}, ValueError, "max_rate"),
        ((4, None), {}, TypeError, "max_rate"),
        ((4, 0.1), {"rule": "cosine"}, ValueError, "'cosine'"),
    ],
)
def test_stochastic_depth_rates_bad_arguments(
    args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        stochastic_depth_rates(*args, **kwargs)  # type: ignore[arg-type]


def _skips_and_keeps(stack: LayerDrop, x: torch.Tensor) -> list[bool]:
    """Find a seed whose draw skips some layers and keeps others; return the decisions."""
    for seed in range(100):
        kept = stack.kept_layers(x, seed=seed)
        if 0 < sum(kept) < len(kept):
            return [seed, *kept]  # type: ignore[list-item]
    raise AssertionError("no mixed draw in 100 seeds")


@pytest.mark.parametrize("zero_grad_skipped", [True, False])
def test_layerdrop_gradients_of_skipped_layers(zero_grad_skipped: bool) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 5) for _ in range(6)]
    stack = LayerDrop(layers, 0.5, zero_grad_skipped=zero_grad_skipped)
    x = torch.randn(3, 5)
    seed, *kept = _skips_and_keeps(stack, x)
    out = stack(x, seed=seed)
    expected = x
    for layer, keep in zip(layers, kept, strict=True):
        if keep:
            expected = layer(expected)
    assert torch.equal(out, expected), "the anchor must not change the output"
    out.square().sum().backward()
    for layer, keep in zip(layers, kept, strict=True):
        for param in layer.parameters():
            if keep:
                assert param.grad is not None
                assert param.grad.abs().sum() > 0
            elif zero_grad_skipped:
                assert param.grad is not None
                assert torch.equal(param.grad, torch.zeros_like(param))
            else:
                assert param.grad is None


def test_layerdrop_anchor_never_reads_skipped_weights() -> None:
    layers = [nn.Linear(4, 4) for _ in range(8)]
    stack = LayerDrop(layers, 0.5)
    x = torch.randn(2, 4)
    seed, *kept = _skips_and_keeps(stack, x)
    with torch.no_grad():
        for layer, keep in zip(layers, kept, strict=True):
            if not keep:
                layer.weight.fill_(float("inf"))
    out = stack(x, seed=seed)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for layer, keep in zip(layers, kept, strict=True):
        if not keep:
            assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    # The anchor is added out of place: in-place ops on the output stay legal (a view returned
    # by an autograd.Function would raise here).
    stack(x, seed=seed).relu_()
