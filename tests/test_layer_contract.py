"""The contract every random layer in tests/layer_specs.py must meet (STYLE.md checklist)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import dropkit
from dropkit.engine.numerics import compute_dtype
from tests.conftest import binomial_tolerance
from tests.layer_specs import ALL_SPECS, BERNOULLI_SPECS, GAUSSIAN_SPECS, LayerSpec, affine, ids

RATE = {"p": 0.3, "std": 0.7}


def rate_of(spec: LayerSpec) -> float:
    return RATE[spec.rate_arg]


def sample(spec: LayerSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Values away from 0 so that a kept unit is never mistaken for a dropped one.
    x = torch.rand(spec.shape, dtype=torch.float64) + 0.5
    signs = torch.where(torch.rand(spec.shape) < 0.5, -1.0, 1.0).to(torch.float64)
    return (x * signs).to(dtype)


def keep_of(spec: LayerSpec, y: torch.Tensor, p: float) -> torch.Tensor:
    _, _, drop_value = affine(spec, p)
    # The dropped value rounded once to y's dtype, as the op stores it.
    return y != torch.tensor(drop_value, dtype=compute_dtype(y.dtype)).to(y.dtype)


# --- exact identities -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_eval_mode_is_exact_identity(spec: LayerSpec) -> None:
    x = sample(spec)
    layer = spec.make(rate_of(spec)).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(spec.call(x, rate_of(spec), training=False), x)
    assert int(layer.rng_step) == 0, "eval calls must not consume draws"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_zero_rate_is_identity(spec: LayerSpec) -> None:
    x = sample(spec)
    assert torch.equal(spec.make(0.0)(x), x)
    assert torch.equal(spec.call(x, 0.0), x)


@pytest.mark.parametrize(
    "spec", BERNOULLI_SPECS + GAUSSIAN_SPECS[:1], ids=ids(BERNOULLI_SPECS + GAUSSIAN_SPECS[:1])
)
def test_rate_one_gives_zeros_never_nan_even_for_inf(spec: LayerSpec) -> None:
    x = sample(spec)
    x.view(-1)[:5] = torch.tensor([math.inf, -math.inf, 0.0, 1e38, -1e38])
    x.requires_grad_(True)
    y = spec.make(1.0)(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.backward(torch.full_like(y, math.inf))
    assert x.grad is not None
    assert not x.grad.isnan().any()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


@pytest.mark.parametrize("spec", BERNOULLI_SPECS, ids=ids(BERNOULLI_SPECS))
def test_inf_inputs_stay_inf_or_dropped_never_nan(spec: LayerSpec) -> None:
    x = torch.full(spec.shape, math.inf)
    y = spec.call(x, 0.5, seed=3)
    assert not y.isnan().any()
    keep = keep_of(spec, y, 0.5)
    assert 0 < int(keep.sum()) < keep.numel()
    assert bool((y[keep] == math.inf).all())


# --- value set, mask structure and backward ---------------------------------------------------


@pytest.mark.parametrize("spec", BERNOULLI_SPECS, ids=ids(BERNOULLI_SPECS))
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_value_set_structure_and_backward_mask(spec: LayerSpec, p: float) -> None:
    x = sample(spec).requires_grad_(True)
    y = spec.call(x, p, seed=21)
    keep_scale, keep_shift, drop_value = affine(spec, p)
    keep = keep_of(spec, y, p)
    assert 0 < int(keep.sum()) < keep.numel(), "the check below needs both kept and dropped units"
    kept = x.detach() * torch.tensor(keep_scale) + (torch.tensor(keep_shift) if keep_shift else 0.0)
    assert torch.equal(y.detach(), torch.where(keep, kept, torch.tensor(drop_value)))
    for dim in spec.shared_dims:
        assert torch.equal(keep.amax(dim), keep.amin(dim)), f"mask varies along shared dim {dim}"
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert torch.equal(x.grad, torch.where(keep, grad_out * torch.tensor(keep_scale), torch.tensor(0.0)))


@pytest.mark.parametrize("spec", BERNOULLI_SPECS, ids=ids(BERNOULLI_SPECS))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_drop_rate_matches_p(spec: LayerSpec, p: float) -> None:
    # Several calls on fresh steps: n_eff counts independent draws only (one per shared block).
    x = sample(spec)
    layer = spec.make(p)
    draws_per_call = x.numel() // math.prod(spec.shape[d] for d in spec.shared_dims)
    calls = max(1, 20_000 // draws_per_call)
    dropped = 0.0
    for _ in range(calls):
        keep = keep_of(spec, layer(x), p)
        dropped += 1.0 - keep.float().mean().item()
    rate = dropped / calls
    assert abs(rate - p) <= binomial_tolerance(p, draws_per_call * calls)


SCALE_SPECS = [s for s in BERNOULLI_SPECS if "Alpha" not in s.name]


@pytest.mark.parametrize("spec", SCALE_SPECS, ids=ids(SCALE_SPECS))
@pytest.mark.parametrize("p", [0.25, 0.6])
def test_expectation_preserved_for_outputs_and_gradients(spec: LayerSpec, p: float) -> None:
    # Fill with q: every output is exactly 0 or 1, so the mean is a keep frequency with mean q.
    q = 1.0 - p
    layer = spec.make(p)
    n_eff = math.prod(s for d, s in enumerate(spec.shape) if d not in spec.shared_dims)
    calls = max(1, 20_000 // n_eff)
    out_mean = grad_mean = 0.0
    for _ in range(calls):
        x = torch.full(spec.shape, q, requires_grad=True)
        y = layer(x)
        y.backward(torch.full_like(y, q))
        out_mean += y.mean().item() / calls
        grad_mean += x.grad.mean().item() / calls
    tolerance = binomial_tolerance(q, n_eff * calls) + 1e-6
    assert abs(out_mean - q) <= tolerance
    assert abs(grad_mean - q) <= tolerance


# --- RNG discipline ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_successive_calls_draw_fresh_masks_and_manual_seed_replays_them(spec: LayerSpec) -> None:
    x = sample(spec)
    layer = spec.make(rate_of(spec))
    dropkit.manual_seed(99)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    assert int(layer.rng_step) == 2
    dropkit.manual_seed(99)
    assert torch.equal(layer(x), first)
    assert torch.equal(layer(x), second)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_functional_and_module_agree_for_the_same_seed(spec: LayerSpec) -> None:
    x = sample(spec)
    layer = spec.make(rate_of(spec))
    by_module = layer(x, seed=77)
    assert torch.equal(by_module, spec.call(x, rate_of(spec), seed=77))
    assert not torch.equal(by_module, spec.call(x, rate_of(spec), seed=78))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(layer(x, generator=g1), spec.call(x, rate_of(spec), generator=g2))
    assert int(layer.rng_step) == 0, "explicit randomness must not consume the layer's draws"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_inplace_matches_out_of_place(spec: LayerSpec) -> None:
    x = sample(spec)
    expected = spec.call(x, rate_of(spec), seed=4)
    target = x.clone()
    result = spec.make(rate_of(spec), inplace=True)(target, seed=4)
    assert result is target
    assert torch.equal(target, expected)


# --- layouts and dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_non_contiguous_input_gives_the_logical_result(spec: LayerSpec) -> None:
    x = sample(spec)
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)
    assert not strided.is_contiguous()
    y = spec.call(strided, rate_of(spec), seed=8)
    assert torch.equal(y, spec.call(x, rate_of(spec), seed=8))
    assert y.stride() == strided.stride(), "output keeps the input's memory layout"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_reduced_and_double_precision_use_the_float32_mask(spec: LayerSpec, dtype: torch.dtype) -> None:
    x = sample(spec, dtype)
    y = spec.call(x, rate_of(spec), seed=12)
    assert y.dtype == dtype
    reference = spec.call(x.float(), rate_of(spec), seed=12)
    if spec.kind == "bernoulli":
        # Same mask whatever the dtype; values computed in float32 and rounded once.
        p = rate_of(spec)
        assert torch.equal(keep_of(spec, y, p), keep_of(spec, reference, p))
        if dtype != torch.float64:
            assert torch.equal(y, reference.to(dtype))
    else:
        tolerance = 1e-2 if dtype != torch.float64 else 1e-5
        assert torch.allclose(y.float(), reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_empty_input(spec: LayerSpec) -> None:
    x = torch.empty((0, *spec.shape[1:]))
    assert spec.make(rate_of(spec))(x).shape == x.shape


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_gradcheck_float64(spec: LayerSpec) -> None:
    shape = tuple(min(s, 4) for s in spec.shape)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    layer = spec.make(rate_of(spec))

    def fn(inp: torch.Tensor) -> torch.Tensor:
        return layer(inp, seed=31)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_backward_keeps_no_per_element_memory(spec: LayerSpec) -> None:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    x = sample(spec).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = spec.make(rate_of(spec))(x)
    y.sum().backward()
    assert sum(saved) <= 24, f"saved {saved} bytes: only the 3-word key may be kept"


# --- module API -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_repr_state_dict_pickle_and_deepcopy(spec: LayerSpec) -> None:
    layer = spec.make(rate_of(spec))
    assert f"{spec.rate_arg}={rate_of(spec)}" in repr(layer)
    assert layer.state_dict() == {}, "no persistent state: checkpoints stay compatible with torch.nn"
    x = sample(spec)
    layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert repr(clone) == repr(layer)
        assert clone.rng_stream == layer.rng_stream
        assert torch.equal(clone(x), copy.deepcopy(layer)(x))
    restored = spec.make(rate_of(spec))
    restored.load_state_dict(layer.state_dict())


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
@pytest.mark.parametrize(
    ("rate", "error", "match"),
    [
        (-0.1, ValueError, "-0.1"),
        (float("nan"), ValueError, "NaN"),
        ("0.5", TypeError, "str"),
        (None, TypeError, "NoneType"),
        (True, TypeError, "bool"),
        (torch.tensor(0.5), TypeError, "Tensor"),
    ],
)
def test_bad_rate_is_rejected_in_constructor_and_functional(
    spec: LayerSpec, rate: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=f"{spec.rate_arg}.*{match}"):
        spec.make(rate)  # type: ignore[arg-type]
    with pytest.raises(error, match=f"{spec.rate_arg}.*{match}"):
        spec.call(sample(spec), rate)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=ids(ALL_SPECS))
def test_bad_tensor_and_flags_are_rejected(spec: LayerSpec) -> None:
    rate = rate_of(spec)
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch.int64"):
        spec.make(rate)(torch.ones(spec.shape, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"input must be a torch\.Tensor, got list"):
        spec.call([1.0, 2.0], rate)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="training must be a bool, got int"):
        spec.call(sample(spec), rate, training=1)
    with pytest.raises(TypeError, match="inplace must be a bool, got str"):
        spec.make(rate, inplace="yes")
    with pytest.raises(ValueError, match="at most one of seed and generator"):
        spec.call(sample(spec), rate, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"key \[seed, stream, step\] of shape \(3,\)"):
        spec.call(sample(spec), rate, seed=torch.zeros(2, dtype=torch.int64))


def test_upper_bounds_of_rates() -> None:
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        dropkit.nn.Dropout(1.5)
    with pytest.raises(ValueError, match=r"std must be a finite float >= 0, got inf"):
        dropkit.nn.GaussianNoise(math.inf)
