"""The contract every random layer and op of tests/layer_specs.py must meet (STYLE.md checklist).

Each check runs on the specs whose flags say it applies.  Statistical checks use fixed seeds and
tolerances derived from the number of independent draws, at SIGMAS (>= 5) standard deviations;
every check first asserts that what it compares is non-trivial (both kept and dropped units).
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import dropkit
from dropkit.nn._base import _RandomLayer
from tests.conftest import SIGMAS, binomial_tolerance
from tests.layer_specs import SPECS, Args, LayerSpec, Observation, identity_eval, signed, where

F32 = torch.float32
# Draws per statistical check (n_eff * calls), and the most calls a check makes to get them.
DRAWS = 20_000
MAX_CALLS = 1_000


# --- helpers ----------------------------------------------------------------------------------

#: Library bugs found by this battery: (test, spec) -> reason.  Each such case is a strict xfail.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def cases(test: str, predicate: Any = None, **flags: Any) -> list[Any]:
    """The specs a check applies to (layer_specs.where), known library bugs marked xfail."""
    params = []
    for spec in where(predicate, **flags):
        reason = KNOWN_BUGS.get((test, spec.name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(spec, id=spec.name, marks=marks))
    return params


def for_specs(test: str, *, predicate: Any = None, **flags: Any) -> Any:
    return pytest.mark.parametrize("spec", cases(test, predicate, **flags))


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors(item)]
    raise TypeError(f"not a tensor or a sequence of tensors: {type(value).__name__}")


def same(a: Any, b: Any, exact: bool = True) -> bool:
    left, right = tensors(a), tensors(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if exact and not torch.equal(x, y):
            return False
        if not exact and not torch.allclose(x, y, rtol=1e-5, atol=1e-6):
            return False
    return True


def assert_same(a: Any, b: Any, exact: bool = True) -> None:
    left, right = tensors(a), tensors(b)
    assert len(left) == len(right)
    for x, y in zip(left, right, strict=True):
        if exact:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=False)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def random_layers(module: nn.Module) -> list[_RandomLayer]:
    return [m for m in module.modules() if isinstance(m, _RandomLayer)]


def steps(module: nn.Module) -> int:
    """Training draws made so far by the module and its random sub-layers."""
    return sum(int(layer.rng_step.sum()) for layer in random_layers(module))


def run(spec: LayerSpec, module: nn.Module, args: Args, seed: int | None = None) -> Any:
    """One call with a fixed seed: ``seed=`` for layers that take it, else ``manual_seed`` first."""
    if seed is not None and not spec.seeded:
        dropkit.manual_seed(seed)
    return module(*args, **spec.rng(seed=seed))


def map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(item, fn) for item in value)
    return value


def probe(
    spec: LayerSpec, module: nn.Module, p: float, dtype: torch.dtype = F32, seed: int | None = None
) -> Observation:
    assert spec.probe is not None
    if seed is not None and not spec.seeded:
        dropkit.manual_seed(seed)
    return spec.probe(module, p, dtype, **spec.rng(seed=seed))


def grad_of(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad


def shared_groups(shape: torch.Size, shared_dims: tuple[int, ...]) -> int:
    """Independent draws per call: elements over the size of a shared slice."""
    return math.prod(shape) // math.prod(shape[d] for d in shared_dims)


# --- exact identities -------------------------------------------------------------------------


@for_specs("test_eval_is_the_documented_result_and_draws_nothing", eval_output=...)
def test_eval_is_the_documented_result_and_draws_nothing(spec: LayerSpec) -> None:
    args = spec.inputs(F32, False)
    layer = spec.make(spec.rate).eval()
    out = layer(*args)
    expected = spec.eval_output(layer, args)
    assert_same(out, expected)
    if spec.eval_output is identity_eval:
        assert out is args[0], "eval returns the input itself"
    assert steps(layer) == 0, "eval calls must not consume draws"
    if spec.functional is not None and spec.functional.training:
        assert_same(spec.functional(layer, args, spec.rate, training=False), expected)


@for_specs("test_zero_rate_gives_the_eval_result", settable=True)
def test_zero_rate_gives_the_eval_result(spec: LayerSpec) -> None:
    args = spec.inputs(F32, False)
    layer = spec.make(0.0)
    reference = spec.zero_output or spec.eval_output
    assert reference is not None
    expected = reference(layer, args)
    assert_same(run(spec, layer, args, seed=3), expected, spec.exact_zero)
    if spec.functional is not None and spec.functional.rate_name is not None:
        for rate in (0.0, torch.zeros(1, dtype=torch.float64)):
            assert_same(spec.functional(layer, args, rate, seed=3), expected, spec.exact_zero)
        if spec.unary:
            assert spec.functional(layer, args, 0.0) is args[0], "a float rate 0 returns the input itself"


@for_specs("test_rate_one_is_exact_and_never_nan_even_for_inf", one=...)
def test_rate_one_is_exact_and_never_nan_even_for_inf(spec: LayerSpec) -> None:
    assert spec.one is not None
    layer = spec.make(1.0)
    one = spec.one(layer, spec.inputs(F32, False))
    out = run(spec, layer, one.args, seed=5)
    for t in tensors(out):
        assert not t.isnan().any()
    assert_same(out, one.output)
    outputs = [t for t in tensors(out) if t.requires_grad]
    assert outputs, "the check needs a differentiable output"
    fill = math.inf if one.inf_grad else 1.0
    torch.autograd.backward(outputs, [torch.full_like(t, fill) for t in outputs])
    grads = one.zero_grads()
    assert grads
    for grad in grads:
        if grad is None:
            assert one.skips, "a dropped tensor must get an exact zero gradient"
            continue
        assert not grad.isnan().any()
        assert torch.equal(grad, torch.zeros_like(grad))
    for arg in tensors([a for a in one.args if isinstance(a, (torch.Tensor, tuple))]):
        if arg.grad is not None:
            assert not arg.grad.isnan().any()


# --- value sets, recovered masks, structure and backward --------------------------------------


def observe_both(
    spec: LayerSpec, layer: nn.Module, p: float, dtype: torch.dtype = F32
) -> Iterator[Observation]:
    """Seeded observations until both kept and dropped units were seen (one call, unless the
    layer makes a single draw per call)."""
    kept = dropped = False
    for seed in range(21, 21 + 64):
        obs = probe(spec, layer, p, dtype, seed=seed)
        assert obs.keep is not None
        kept |= bool(obs.keep.any())
        dropped |= not bool(obs.keep.all())
        yield obs
        if kept and dropped:
            return
    raise AssertionError("64 calls never showed both a kept and a dropped unit")


@for_specs(
    "test_value_set_mask_structure_and_backward",
    probe=...,
    predicate=lambda s: s.kind in ("bernoulli", "structured"),
)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_value_set_mask_structure_and_backward(spec: LayerSpec, p: float) -> None:
    layer = spec.make(p)
    for obs in observe_both(spec, layer, p):
        assert obs.keep is not None
        assert obs.expected is not None
        if not spec.single_draw:
            assert 0 < int(obs.keep.sum()) < obs.keep.numel(), "needs both kept and dropped units"
        # Every output is the kept value or the dropped one: the output recovers the mask.
        assert_same(obs.output.detach(), obs.expected)
        for dim in spec.shared_dims:
            assert torch.equal(obs.keep.amax(dim), obs.keep.amin(dim)), f"mask varies along shared dim {dim}"
        if obs.leaf is not None:
            assert obs.leaf_grad is not None
            # Multiples of 2**-7: the sums a lookup's backward makes are exact in any order.
            g = signed(obs.output.shape, obs.output.dtype)
            obs.leaf.grad = None  # a parameter leaf is shared by the calls
            if obs.output.requires_grad:
                obs.output.backward(g)
            else:  # a skipped branch: nothing reaches the leaf
                assert not obs.keep.any()
            # Backward regenerates the forward's mask: the gradient is masked and scaled alike.
            assert_same(grad_of(obs.leaf), obs.leaf_grad(g), obs.grad_exact)


@for_specs(
    "test_backward_uses_the_forward_noise", probe=..., kind="gaussian", predicate=lambda s: s.differentiable
)
def test_backward_uses_the_forward_noise(spec: LayerSpec) -> None:
    layer = spec.make(spec.rate)
    obs = probe(spec, layer, spec.rate, seed=21)
    assert obs.leaf is not None
    assert obs.leaf_grad is not None
    g = torch.randn(obs.output.shape, dtype=torch.float64).to(obs.output.dtype)
    obs.output.backward(g)
    assert_same(grad_of(obs.leaf), obs.leaf_grad(g), obs.grad_exact)


@for_specs("test_drop_rate_matches_p", probe=..., predicate=lambda s: s.kind in ("bernoulli", "structured"))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_drop_rate_matches_p(spec: LayerSpec, p: float) -> None:
    # Fresh draws of the layer's own stream; n_eff counts independent draws only.
    layer = spec.make(p)
    with torch.no_grad():
        first = probe(spec, layer, p)
        assert first.keep is not None
        n_eff = shared_groups(first.keep.shape, spec.shared_dims)
        if spec.rate_sd is not None:  # correlated units: as many draws as that sd is worth
            n_eff = max(1, int(p * (1.0 - p) / spec.rate_sd(p, first.keep.shape) ** 2))
        calls = max(1, min(MAX_CALLS, math.ceil(DRAWS / n_eff)))
        dropped = 1.0 - first.keep.double().mean().item()
        for _ in range(calls - 1):
            keep = probe(spec, layer, p).keep
            assert keep is not None
            dropped += 1.0 - keep.double().mean().item()
    rate = dropped / calls
    if spec.rate_sd is None:
        target = dropkit.realised_drop_probability(p)
        tolerance = binomial_tolerance(target, n_eff * calls)
    else:
        assert spec.rate_slack is not None
        assert spec.rate_target is not None
        target = spec.rate_target(p, first.keep.shape)
        tolerance = SIGMAS * spec.rate_sd(p, first.keep.shape) / math.sqrt(calls) + spec.rate_slack
    assert abs(rate - target) <= tolerance, f"drop rate {rate:.5f}, expected {target:.5f} +- {tolerance:.5f}"


def with_rates(test: str, rates: tuple[float, ...], **flags: Any) -> Any:
    """(spec, p) for every rate, or once for a layer whose rate is learned (p is then unused)."""
    params = []
    for param in cases(test, **flags):
        spec = param.values[0]
        for p in rates if spec.rate_name is not None else rates[:1]:
            params.append(pytest.param(spec, p, id=f"{spec.name}-{p}", marks=param.marks))
    return pytest.mark.parametrize(("spec", "p"), params)


@with_rates("test_expectation_of_outputs_and_gradients", (0.25, 0.6), expectation=True)
def test_expectation_of_outputs_and_gradients(spec: LayerSpec, p: float) -> None:
    """The mean over calls of every output element is its expectation (the eval result of a
    scale-preserving layer); the same for the gradient of the gated leaf with output gradient 1.

    The standard deviation of the mean over elements is bounded by the sum of the element sds
    within a shared slice (perfect correlation), slices independent: sd(mean) <= ||slice sums||/n.
    """
    layer = spec.make(p)
    error = variance = grad_error = grad_variance = 0.0
    scale = 0.0
    calls = None
    call = 0
    while calls is None or call < calls:
        obs = probe(spec, layer, p)
        assert obs.mean is not None
        assert obs.sd is not None
        n = obs.output.numel()
        groups = shared_groups(obs.output.shape, spec.shared_dims)
        if calls is None:
            calls = max(1, min(MAX_CALLS, math.ceil(DRAWS / groups)))
        slice_sd = obs.sd.sum(dim=spec.shared_dims) if spec.shared_dims else obs.sd
        error += (obs.output.detach().double() - obs.mean).sum().item() / n
        variance += slice_sd.square().sum().item() / n**2
        scale += obs.mean.abs().mean().item()
        if obs.leaf is not None and obs.grad_mean is not None:
            assert obs.grad_sd is not None
            obs.leaf.grad = None  # a parameter leaf is shared by the calls
            if obs.output.requires_grad:  # else a skipped branch: a zero gradient
                obs.output.backward(torch.ones_like(obs.output))
            grad = grad_of(obs.leaf)
            assert grad.numel() == n
            grad_error += grad.double().mean().item() - obs.grad_mean
            grad_variance += obs.grad_sd**2 / groups
        call += 1
    assert calls is not None
    float_slack = 1e-6 * (scale / calls + 1.0)
    assert variance > 0.0, "the check needs random outputs"
    tolerance = SIGMAS * math.sqrt(variance) / calls + float_slack
    assert abs(error / calls) <= tolerance, (
        f"output mean off by {error / calls:.3g} (tolerance {tolerance:.3g})"
    )
    if grad_variance or grad_error:
        grad_tolerance = SIGMAS * math.sqrt(grad_variance) / calls + 1e-6
        assert abs(grad_error / calls) <= grad_tolerance, (
            f"gradient mean off by {grad_error / calls:.3g} (tolerance {grad_tolerance:.3g})"
        )


# --- RNG discipline ---------------------------------------------------------------------------


@for_specs("test_successive_calls_draw_fresh_masks_and_manual_seed_replays_them")
def test_successive_calls_draw_fresh_masks_and_manual_seed_replays_them(spec: LayerSpec) -> None:
    args = spec.inputs(F32, False)
    # A single draw per call (a whole-batch decision) repeats with probability 1/2 at p = 1/2.
    count, rate = (16, 0.5) if spec.single_draw else (2, spec.rate)
    layer = spec.make(rate)
    dropkit.manual_seed(99)
    outputs = [layer(*args) for _ in range(count)]
    assert any(not same(outputs[0], other) for other in outputs[1:]), "calls must draw fresh masks"
    assert steps(layer) == count * spec.steps_per_call
    dropkit.manual_seed(99)
    for expected in outputs:
        assert_same(layer(*args), expected)


@for_specs("test_functional_matches_module_for_the_same_seed", functional=..., seeded=True)
def test_functional_matches_module_for_the_same_seed(spec: LayerSpec) -> None:
    assert spec.functional is not None
    args = spec.inputs(F32, False)
    layer = spec.make(spec.rate)
    by_module = layer(*args, seed=77)
    assert_same(by_module, spec.functional(layer, args, spec.rate, seed=77))
    others = [spec.functional(layer, args, spec.rate, seed=seed) for seed in range(78, 78 + 16)]
    assert any(not same(by_module, other) for other in others), "another seed must give another mask"
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert_same(layer(*args, generator=g1), spec.functional(layer, args, spec.rate, generator=g2))
    assert steps(layer) == 0, "explicit randomness must not consume the layer's draws"


@for_specs(
    "test_rate_as_a_tensor_equals_the_float",
    seeded=True,
    predicate=lambda s: s.functional is not None and s.functional.rate_name is not None,
)
def test_rate_as_a_tensor_equals_the_float(spec: LayerSpec) -> None:
    assert spec.functional is not None
    args = spec.inputs(F32, False)
    layer = spec.make(spec.rate)
    for p in (0.0, spec.rate, 1.0) if spec.rate_check == "probability" else (0.0, spec.rate):
        expected = spec.functional(layer, args, p, seed=7)
        exact = spec.exact_zero or p != 0.0
        for holder in (torch.tensor([p], dtype=torch.float64), torch.tensor(p, dtype=torch.float64)):
            assert_same(spec.functional(layer, args, holder, seed=7), expected, exact)


@for_specs("test_module_holds_its_rates_in_tensors", holds_rate_tensor=True)
def test_module_holds_its_rates_in_tensors(spec: LayerSpec) -> None:
    layer = spec.make(spec.rate)
    assert spec.rate_name is not None
    for name in (spec.rate_name, *spec.extra_rate_names):
        holder = layer.rate_tensor(name)
        assert holder.dtype == torch.float64
        assert holder.tolist() == [spec.rate]
        setattr(layer, name, 0.25)
        assert layer.rate_tensor(name) is holder, "filled in place"
        assert holder.tolist() == [0.25]


@for_specs("test_inplace_matches_out_of_place", inplace=True)
def test_inplace_matches_out_of_place(spec: LayerSpec) -> None:
    assert spec.functional is not None
    (x,) = spec.inputs(F32, False)
    layer = spec.make(spec.rate)
    expected = spec.functional(layer, (x,), spec.rate, seed=4)
    target = x.clone()
    assert spec.make(spec.rate, inplace=True)(target, seed=4) is target
    assert torch.equal(target, expected)
    target = x.clone()
    assert spec.functional(layer, (target,), spec.rate, inplace=True, seed=4) is target
    assert torch.equal(target, expected)


# --- layouts and dtypes -----------------------------------------------------------------------


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() >= 2 else t


def channels_last(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


@for_specs("test_non_contiguous_and_channels_last_inputs_give_the_logical_result")
def test_non_contiguous_and_channels_last_inputs_give_the_logical_result(spec: LayerSpec) -> None:
    args = spec.inputs(F32, False)
    layer = spec.make(spec.rate)
    reference = run(spec, layer, args, seed=8)
    strided = map_tensors(args, non_contiguous)
    assert any(not t.is_contiguous() for t in tensors(list(strided))), "the check needs a strided input"
    out = run(spec, layer, strided, seed=8)
    assert_same(out, reference, spec.exact_layouts)
    if spec.unary and spec.keeps_layout:
        assert out.stride() == strided[0].stride(), "the output keeps the input's memory layout"
    if any(t.dim() in (4, 5) and t.is_floating_point() for t in tensors(list(args))):
        last = map_tensors(args, channels_last)
        out = run(spec, layer, last, seed=8)
        assert_same(out, reference, spec.exact_layouts)
        if spec.unary and spec.keeps_layout:
            assert out.stride() == last[0].stride(), "the output keeps the input's memory format"


def with_dtypes(test: str, **flags: Any) -> Any:
    params = [
        pytest.param(param.values[0], dtype, id=f"{param.values[0].name}-{str(dtype)[6:]}", marks=param.marks)
        for param in cases(test, **flags)
        for dtype in param.values[0].dtypes
    ]
    return pytest.mark.parametrize(("spec", "dtype"), params)


@with_dtypes("test_reduced_and_double_precision_compute_in_float32", probe=...)
def test_reduced_and_double_precision_compute_in_float32(spec: LayerSpec, dtype: torch.dtype) -> None:
    layer = spec.make(spec.rate).to(dtype)
    twin = copy.deepcopy(layer).float()  # the same (rounded) parameters in float32
    torch.manual_seed(12)
    obs = probe(spec, layer, spec.rate, dtype, seed=12)
    torch.manual_seed(12)
    reference = probe(spec, twin, spec.rate, F32, seed=12)  # the same values, exact in every dtype
    assert obs.output.dtype == dtype
    if obs.keep is not None:
        assert reference.keep is not None
        assert obs.expected is not None
        readable = torch.ones_like(obs.keep)
        for ambiguous in (obs.ambiguous, reference.ambiguous):
            if ambiguous is not None:
                readable &= ~ambiguous
        assert torch.equal(obs.keep[readable], reference.keep[readable]), (
            "the mask does not depend on the dtype"
        )
        assert_same(obs.output.detach(), obs.expected)  # kept values computed in float32, rounded once
    if dtype == torch.float64:  # computed in float64: the float32 result to its rounding
        assert_same(obs.output.detach().float(), reference.output.detach(), exact=False)
    elif spec.rounds_once:
        assert_same(obs.output.detach(), reference.output.detach().to(dtype))


@for_specs("test_empty_input", unary=True)
def test_empty_input(spec: LayerSpec) -> None:
    (x,) = spec.inputs(F32, False)
    empty = torch.empty((0, *x.shape[1:]))
    assert spec.make(spec.rate)(empty).shape == empty.shape


# --- gradients --------------------------------------------------------------------------------


@for_specs("test_gradcheck_float64", differentiable=True)
def test_gradcheck_float64(spec: LayerSpec) -> None:
    layer = spec.make(spec.rate).double()
    args = spec.inputs(torch.float64, True)
    float_args = [
        t for t in tensors([a for a in args if isinstance(a, (torch.Tensor, tuple))]) if t.is_floating_point()
    ]
    params = {name: dict(layer.named_parameters())[name] for name in spec.grad_params}
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in [*float_args, *params.values()])
    assert inputs, "the check needs a differentiable input"

    def rebuild(value: Any, supply: Iterator[torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            return next(supply) if value.is_floating_point() else value
        if isinstance(value, tuple):
            return tuple(rebuild(item, supply) for item in value)
        return value

    def fn(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        supply = iter(flat[: len(float_args)])
        call_args = rebuild(args, supply)
        replaced = dict(zip(params, flat[len(float_args) :], strict=True))
        if not spec.seeded:
            dropkit.manual_seed(31)
        out = functional_call(layer, replaced, call_args, spec.rng(seed=31))
        return tuple(tensors(out))

    # fast_mode: Jacobian-vector products along random directions instead of whole Jacobians.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    if spec.gradgrad:
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@for_specs("test_backward_keeps_no_per_element_memory", keyed_backward=True)
def test_backward_keeps_no_per_element_memory(spec: LayerSpec) -> None:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    args = tuple(t.requires_grad_(True) if t.is_floating_point() else t for t in spec.inputs(F32, False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = spec.make(spec.rate)(*args)
    y.sum().backward()
    assert sum(saved) <= 24 + 8, f"saved {saved} bytes: only the 3-word key and the rate may be kept"


# --- module API -------------------------------------------------------------------------------


@for_specs("test_repr_copies_and_state_dict_round_trip")
def test_repr_copies_and_state_dict_round_trip(spec: LayerSpec) -> None:
    layer = spec.make(spec.rate)
    if spec.rate_name is not None:
        shown = "std" if spec.rate_name == "std" else "p"
        assert f"{shown}={spec.rate}" in repr(layer)
    if spec.unary:
        assert layer.state_dict() == {}, "no persistent state: checkpoints stay compatible with torch.nn"
    args = spec.inputs(F32, False)
    layer(*args)  # a step taken: cloned copies carry the stream and the step
    expected = run(spec, layer, args, seed=13)
    streams = [m.rng_stream for m in random_layers(layer)]
    # By default a copy draws its own masks (a stream of its own); dropkit.clone_masks() keeps
    # the original's stream and step.  An explicit seed gives the same output either way.
    for copy_of in (copy.deepcopy, lambda module: pickle.loads(pickle.dumps(module))):
        fresh = copy_of(layer)
        assert repr(fresh) == repr(layer)
        assert all(a != b for a, b in zip((m.rng_stream for m in random_layers(fresh)), streams, strict=True))
        if spec.seeded:  # a composite derives its sub-layers' keys from their streams
            assert_same(run(spec, fresh, args, seed=13), expected)
        with dropkit.clone_masks():
            clone = copy_of(layer)
        assert [m.rng_stream for m in random_layers(clone)] == streams
        assert_same(run(spec, clone, args, seed=13), expected)
    restored = spec.make(spec.rate)
    restored.load_state_dict(layer.state_dict())
    if spec.seeded:
        assert_same(run(spec, restored, args, seed=13), expected)
    else:  # a new composite gets new streams: its weights are compared in eval
        assert_same(restored.eval()(*args), layer.eval()(*args))


# --- bad input --------------------------------------------------------------------------------

BAD_RATES = {
    "probability": [(-0.1, "-0.1"), (1.5, "1.5"), (math.nan, "NaN")],
    "nonnegative": [(-0.1, "-0.1"), (math.inf, "inf"), (math.nan, "NaN")],
    "open": [(0.0, "0.0"), (1.0, "1.0"), (-0.2, "-0.2"), (1.5, "1.5"), (math.nan, "NaN")],
}
BAD_TYPES = [("0.5", "str"), (None, "NoneType"), (True, "bool")]


@for_specs("test_bad_rate_is_rejected_naming_it", predicate=lambda s: s.rate_name is not None)
def test_bad_rate_is_rejected_naming_it(spec: LayerSpec) -> None:
    assert spec.rate_name is not None
    args = spec.inputs(F32, False)
    layer = spec.make(spec.rate)
    for value, shown in BAD_RATES[spec.rate_check]:
        for name in (spec.rate_name, *spec.extra_rate_names):
            extra = {} if name == spec.rate_name else {name: value}
            rate = value if name == spec.rate_name else spec.rate
            with pytest.raises(ValueError, match=f"{re.escape(name)}.*{shown}"):
                spec.make(rate, **extra)
        if spec.holds_rate_tensor:
            with pytest.raises(ValueError, match=f"{re.escape(spec.rate_name)}.*{shown}"):
                setattr(layer, spec.rate_name, value)
            assert getattr(layer, spec.rate_name) == spec.rate, "a refused rate leaves the old one"
        if spec.functional is not None and spec.functional.rate_name is not None:
            with pytest.raises(ValueError, match=f"{re.escape(spec.functional.rate_name)}.*{shown}"):
                spec.functional(layer, args, value, seed=1)
    for value, shown in BAD_TYPES:
        with pytest.raises(TypeError, match=f"{re.escape(spec.rate_name)}.*{shown}"):
            spec.make(value)
        if spec.functional is not None and spec.functional.rate_name is not None:
            with pytest.raises(TypeError, match=f"{re.escape(spec.functional.rate_name)}.*{shown}"):
                spec.functional(layer, args, value, seed=1)


def bad_tensor_rates(spec: LayerSpec) -> list[tuple[torch.Tensor, str]]:
    values = (
        [(1.5, "1.5"), (-0.1, "-0.1")]
        if spec.rate_check == "probability"
        else [(-0.1, "-0.1"), (math.inf, "inf")]
    )
    return [(torch.tensor([value], dtype=torch.float64), shown) for value, shown in values]


@for_specs(
    "test_bad_rate_tensor_is_rejected_when_read",
    predicate=lambda s: s.functional is not None and s.functional.rate_name is not None,
)
def test_bad_rate_tensor_is_rejected_when_read(spec: LayerSpec) -> None:
    assert_bad_rate_tensors_raise(spec, seed=1)


@for_specs("test_bad_rate_tensor_is_rejected_when_read_in_eval", eval_reads_rate=True)
def test_bad_rate_tensor_is_rejected_when_read_in_eval(spec: LayerSpec) -> None:
    assert_bad_rate_tensors_raise(spec, training=False)


def assert_bad_rate_tensors_raise(spec: LayerSpec, **call: Any) -> None:
    assert spec.functional is not None
    assert spec.functional.rate_name is not None
    args = spec.inputs(F32, False)
    layer = spec.make(spec.rate)
    for holder, shown in bad_tensor_rates(spec):
        with pytest.raises(ValueError, match=f"{re.escape(spec.functional.rate_name)}.*{shown}"):
            spec.functional(layer, args, holder, **call)


@for_specs("test_bad_tensor_and_flags_are_rejected", unary=True)
def test_bad_tensor_and_flags_are_rejected(spec: LayerSpec) -> None:
    assert spec.functional is not None
    rate = spec.rate
    layer = spec.make(rate)
    (x,) = spec.inputs(F32, False)
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(x.shape, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got list"):
        spec.functional(layer, ([1.0, 2.0],), rate)
    with pytest.raises(TypeError, match="training must be a bool, got int"):
        spec.functional(layer, (x,), rate, training=1)
    with pytest.raises(TypeError, match="inplace must be a bool, got str"):
        spec.make(rate, inplace="yes")
    with pytest.raises(ValueError, match="at most one of seed and generator"):
        spec.functional(layer, (x,), rate, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"key \[seed, stream, step\] of shape \(3,\)"):
        spec.functional(layer, (x,), rate, seed=torch.zeros(2, dtype=torch.int64))


def test_every_spec_name_is_unique() -> None:
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names))


def test_signed_values_are_exact_in_every_dtype() -> None:
    x = signed((1000,))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(x.to(dtype).float(), x)
    assert bool((x.abs() >= 0.5).all())
