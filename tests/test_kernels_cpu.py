"""The numba CPU kernels against the reference engine: bits, layouts, dtypes, threads, the fused
bias-dropout-add op, gradients, and the fallback and forcing switches of the dispatcher."""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytest
import torch

import dropkit
from dropkit import ops
from dropkit.engine import reference
from dropkit.engine.numerics import AFFINE_FORMULAS, drop_threshold, inverted_scale
from dropkit.kernels import cpu, dispatch
from dropkit.kernels.dispatch import KernelFallbackWarning, backend_for, use_reference_engine

P_VALUES = [0.0, 1.0, 1e-5, 0.5, 0.999]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KEY = dropkit.make_key(0x1234_5678_9ABC, stream=3, step=5)
HALF = drop_threshold(0.5)  # the kernels take the rate as its integer drop threshold


def _values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values with specials sprinkled in: NaN, +-inf, -0.0 and values that overflow
    float16 once scaled, so the rounding and special-value paths are all exercised."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    flat = values.view(-1)
    for position, special in enumerate([float("nan"), float("inf"), -float("inf"), -0.0, 6e4, 1e-6]):
        if flat.numel() > 2 * position + 1:
            flat[2 * position + 1] = special
    return values.to(dtype)


# Each layout builds a tensor of the dtype; together they cover every path of the planner:
# one contiguous run, rows with strided operands, 64x128 tiles (channels-last), strided rows
# (channels-last with few channels), zero strides, storage offsets and the parallel driver.
LAYOUTS: dict[str, Callable[[torch.dtype], torch.Tensor]] = {
    "empty": lambda dt: _values((0, 5), dt),
    "scalar": lambda dt: _values((), dt),
    "odd": lambda dt: _values((7, 13, 3), dt),
    "parallel": lambda dt: _values((3, 40_001), dt),
    "sliced": lambda dt: _values((40, 61), dt)[:, ::3],
    "transposed": lambda dt: _values((50, 300), dt).t(),
    "offset": lambda dt: _values((100, 100), dt)[3:, 5:],
    "expanded": lambda dt: _values((1, 333), dt).expand(5, 333),
    "permuted": lambda dt: _values((20, 30, 40), dt).permute(2, 0, 1),
    "channels_last": lambda dt: _values((2, 32, 9, 11), dt).contiguous(memory_format=torch.channels_last),
    "channels_last_parallel": lambda dt: _values((4, 80, 13, 11), dt).contiguous(
        memory_format=torch.channels_last
    ),
    "channels_last_rgb": lambda dt: _values((2, 3, 17, 19), dt).contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda dt: _values((2, 20, 3, 4, 5), dt).contiguous(
        memory_format=torch.channels_last_3d
    ),
    # Channel masks over contiguous maps: one draw per run of H * W elements.
    "nchw": lambda dt: _values((3, 5, 9, 11), dt),
    "nchw_parallel": lambda dt: _values((4, 16, 32, 33), dt),
}


def assert_bit_identical(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype and strides, and the same bits everywhere except inside NaNs (whose
    payload PyTorch itself does not pin down across its own conversion paths)."""
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    assert got.stride() == expected.stride()
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    assert torch.equal(got.view(as_int)[~nan], expected.view(as_int)[~nan])


@pytest.fixture
def threads() -> Iterator[None]:
    """Restore PyTorch's and numba's thread counts after a test changes them."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba_threads)


@pytest.fixture
def fresh_backends() -> Iterator[None]:
    """Forget the loaded backend before and after a test that breaks it on purpose."""
    dispatch._reset_backends()
    yield
    dispatch._reset_backends()


def _thread_counts() -> list[int]:
    return sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})


def test_cpu_runs_on_the_numba_backend() -> None:
    assert backend_for("cpu") == dispatch.NUMBA
    assert backend_for(torch.device("meta")) == dispatch.REFERENCE


def test_ops_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the reference engine ran although a kernel was available")

    monkeypatch.setattr(reference, "masked_affine", refuse)
    monkeypatch.setattr(reference, "bias_dropout_add", refuse)
    x = torch.ones(64)
    dropkit.functional.dropout(x, 0.5, seed=1)
    dropkit.functional.residual_dropout(x, x, 0.5, bias=torch.zeros(64), seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_masked_affine_bit_identical(layout: str, dtype: torch.dtype, threads: None) -> None:
    x = LAYOUTS[layout](dtype)
    # Inverted dropout, and an alpha-dropout-like affine (shift and drop value in play).
    for p in P_VALUES:
        threshold, scale = drop_threshold(p), inverted_scale(p)
        expected = reference.masked_affine(x, KEY, threshold, [], scale, 0.0, 0.0)
        affine = reference.masked_affine(x, KEY, threshold, [], 0.9, 0.13, -1.7)
        for count in _thread_counts():
            torch.set_num_threads(count)
            assert_bit_identical(cpu.masked_affine(x, KEY, threshold, [], scale, 0.0, 0.0), expected)
            assert_bit_identical(cpu.masked_affine(x, KEY, threshold, [], 0.9, 0.13, -1.7), affine)


BROADCAST_CASES = [
    ("odd", [1]),
    ("odd", [0, 2]),
    ("parallel", [0]),
    ("permuted", [1]),
    ("sliced", [1]),
    ("channels_last", [2, 3]),
    ("channels_last_parallel", [2, 3]),
    ("channels_last_rgb", [2, 3]),
    ("channels_last_3d", [2, 3, 4]),
    ("nchw", [2, 3]),
    ("nchw_parallel", [2, 3]),
    ("nchw", [1, 2, 3]),
    ("scalar", []),
    ("empty", [1]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize(("layout", "dims"), BROADCAST_CASES)
def test_broadcast_masks_bit_identical(
    layout: str, dims: list[int], dtype: torch.dtype, threads: None
) -> None:
    # Inverted dropout's constants, and an affine map with a drop value (feature alpha dropout).
    x = LAYOUTS[layout](dtype)
    for p in [1e-5, 0.5, 0.999]:
        threshold = drop_threshold(p)
        for constants in [(2.0, 0.0, 0.0), (1.7, 0.3, -1.2)]:
            expected = reference.masked_affine(x, KEY, threshold, dims, *constants)
            for count in _thread_counts():
                torch.set_num_threads(count)
                assert_bit_identical(cpu.masked_affine(x, KEY, threshold, dims, *constants), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_half_bit_pattern_rounds_like_pytorch(dtype: torch.dtype) -> None:
    # All 65536 inputs through scales that produce normals, subnormals, ties and overflow.
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    for scale, shift in [(1.0, 0.0), (0.3, 0.0), (1.0009765625, 0.0), (3e-5, 0.0), (1 / 3, -0.5), (7e4, 0.0)]:
        expected = reference.masked_affine(x, KEY, HALF, [], scale, shift, 0.0)
        assert_bit_identical(cpu.masked_affine(x, KEY, HALF, [], scale, shift, 0.0), expected)


def test_masks_do_not_depend_on_thread_count(threads: None) -> None:
    x = torch.ones(5, 70_001)
    outputs = []
    for count in _thread_counts():
        torch.set_num_threads(count)
        outputs.append(dropkit.functional.dropout(x, 0.3, seed=11))
        numba.set_num_threads(1)  # the kernel follows PyTorch's setting, not numba's
        outputs.append(dropkit.functional.dropout(x, 0.3, seed=11))
    assert all(torch.equal(output, outputs[0]) for output in outputs)


def test_parallel_launch_keeps_torch_thread_count(threads: None) -> None:
    # numba's OpenMP layer can share PyTorch's OpenMP runtime and reset its thread count.
    x = torch.ones(4, 70_001)
    for count in (1, numba.config.NUMBA_NUM_THREADS + 1, *_thread_counts()):
        torch.set_num_threads(count)
        dropkit.functional.dropout(x, 0.3, seed=11)
        assert torch.get_num_threads() == count


def test_keys_with_high_bits_and_negative_seeds() -> None:
    x = torch.ones(1000)
    for key in [
        dropkit.make_key(-1, stream=2**32 - 1, step=2**32 - 1),
        dropkit.make_key(2**63 + 5, stream=9),
    ]:
        expected = reference.masked_affine(x, key, HALF, [], 2.0, 0.0, 0.0)
        assert_bit_identical(cpu.masked_affine(x, key, HALF, [], 2.0, 0.0, 0.0), expected)


# ---- bias + dropout + residual add ------------------------------------------------------------

FUSED_CASES: dict[str, Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "rows": lambda dt: (_values((6, 50, 33), dt), _values((33,), dt, 1), _values((6, 50, 33), dt, 2)),
    "parallel": lambda dt: (_values((64, 1024), dt), _values((1024,), dt, 1), _values((64, 1024), dt, 2)),
    "bias_2d": lambda dt: (_values((4, 50, 6), dt), _values((50, 1), dt, 1), _values((4, 50, 6), dt, 2)),
    "strided": lambda dt: (
        _values((33, 50, 6), dt).permute(2, 1, 0),
        _values((33,), dt, 1),
        _values((6, 50, 66), dt, 2)[..., ::2],
    ),
    "channels_last": lambda dt: (
        _values((2, 32, 5, 7), dt).contiguous(memory_format=torch.channels_last),
        _values((32, 1, 1), dt, 1),
        _values((2, 32, 5, 7), dt, 2),
    ),
    "scalar": lambda dt: (_values((), dt), _values((), dt, 1), _values((), dt, 2)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_bias_dropout_add_bit_identical(case: str, dtype: torch.dtype, threads: None) -> None:
    x, bias, residual = FUSED_CASES[case](dtype)
    for p in P_VALUES:
        threshold, scale = drop_threshold(p), inverted_scale(p)
        expected = reference.bias_dropout_add(x, bias, residual, KEY, threshold, scale)
        for count in _thread_counts():
            torch.set_num_threads(count)
            assert_bit_identical(cpu.bias_dropout_add(x, bias, residual, KEY, threshold, scale), expected)
            # The op (rate as a float or a tensor) dispatches to the kernel: the same bits.
            assert_bit_identical(ops.bias_dropout_add(x, bias, residual, KEY, p), expected)
            rate = torch.tensor(p, dtype=torch.float64)
            assert_bit_identical(ops.bias_dropout_add(x, bias, residual, KEY, rate), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_dropout_add_matches_the_unfused_composition(dtype: torch.dtype) -> None:
    x, bias, residual = (torch.randn(8, 40, 24, dtype=dtype) for _ in range(3))
    bias = bias[0, 0]
    fused = dropkit.functional.residual_dropout(x, residual, 0.3, bias=bias, seed=KEY)
    unfused = residual + dropkit.functional.dropout(x + bias, 0.3, seed=KEY)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(fused, unfused)  # no intermediate rounding to skip: the same bits
    else:
        # The unfused path rounds three times to the half dtype, the fused one once.
        torch.testing.assert_close(fused, unfused, atol=0.1, rtol=0.02)


def test_bias_dropout_add_gradients_use_the_forward_mask() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    bias = torch.randn(32, requires_grad=True)
    residual = torch.randn(16, 32, requires_grad=True)
    y = dropkit.functional.residual_dropout(x, residual, 0.25, bias=bias, seed=KEY)
    grad = torch.randn(16, 32)
    y.backward(grad)
    keep = dropkit.functional.dropout(torch.ones(16, 32), 0.25, seed=KEY) != 0
    expected_x = torch.where(keep, grad * torch.tensor(1 / 0.75), 0.0)
    assert x.grad is not None
    assert bias.grad is not None
    assert residual.grad is not None
    assert torch.equal(x.grad, expected_x)
    torch.testing.assert_close(bias.grad, expected_x.sum(0))
    assert torch.equal(residual.grad, grad)
    # Only the bias needs a gradient: the masked gradient is still formed, and summed.
    (grad_bias,) = torch.autograd.grad(
        dropkit.functional.residual_dropout(x.detach(), residual.detach(), 0.25, bias=bias, seed=KEY),
        bias,
        grad,
    )
    torch.testing.assert_close(grad_bias, expected_x.sum(0))


def test_gradcheck_through_the_fast_path() -> None:
    assert backend_for("cpu") == dispatch.NUMBA
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    image = torch.randn(2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    image.requires_grad_(True)
    functional = dropkit.functional
    assert torch.autograd.gradcheck(lambda x: functional.dropout(x, 0.3, seed=5), (x,))
    assert torch.autograd.gradcheck(lambda x: functional.alpha_dropout(x, 0.2, seed=5), (x,))
    assert torch.autograd.gradcheck(lambda x: functional.dropout2d(x, 0.5, seed=5), (image,))
    assert torch.autograd.gradcheck(
        lambda x, b, r: functional.residual_dropout(x, r, 0.3, bias=b, seed=5), (x, bias, residual)
    )
    assert torch.autograd.gradgradcheck(
        lambda x, b, r: functional.residual_dropout(x, r, 0.3, bias=b, seed=5), (x, bias, residual)
    )


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_backward_keeps_only_the_key() -> None:
    x = torch.randn(256, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    residual = torch.randn(256, 64, requires_grad=True)
    key_bytes = 3 * 8
    assert _saved_bytes(lambda: dropkit.functional.dropout(x, 0.5, seed=1)) == key_bytes
    assert (
        _saved_bytes(lambda: dropkit.functional.residual_dropout(x, residual, 0.5, bias=bias, seed=1))
        == key_bytes
    )
    # A tensor rate is kept too: one element, still nothing per element.
    rate = torch.tensor(0.5, dtype=torch.float64)
    assert _saved_bytes(lambda: dropkit.functional.dropout(x, rate, seed=1)) == key_bytes + 8
    assert _saved_bytes(lambda: ops.bias_dropout_add(x, bias, residual, KEY, rate)) == key_bytes + 8


RATE_OPS = ["masked_affine", "gaussian_dropout", "gaussian_noise", "bias_dropout_add"]


@pytest.mark.parametrize("name", RATE_OPS)
def test_custom_op_takes_the_rate_as_a_tensor(name: str) -> None:
    # A rate that compiled code reads at run time is a tensor input of the op, never a float
    # baked into the graph.
    schema = getattr(torch.ops.dropkit, name).default._schema
    (rate,) = (argument for argument in schema.arguments if argument.name == "rate")
    assert str(rate.type) == "Tensor"


def test_custom_op_registration() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    bias, residual = torch.randn(8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    rate = torch.tensor(0.4, dtype=torch.float64)
    dropkit_ops = torch.ops.dropkit
    for formula in AFFINE_FORMULAS:
        torch.library.opcheck(dropkit_ops.masked_affine.default, (x, KEY, rate, [], formula, "p"))
    torch.library.opcheck(dropkit_ops.masked_affine.default, (x, KEY, rate, [1], "inverted", "p"))
    torch.library.opcheck(dropkit_ops.gaussian_dropout.default, (x, KEY, rate, [], "p"))
    torch.library.opcheck(dropkit_ops.gaussian_dropout.default, (x, KEY, rate, [0], "p"))
    torch.library.opcheck(dropkit_ops.gaussian_noise.default, (x, KEY, rate, [], "std"))
    torch.library.opcheck(dropkit_ops.bias_dropout_add.default, (x, bias, residual, KEY, rate))


_Arguments = Callable[[float | torch.Tensor], tuple[Any, ...]]  # an op's arguments at a rate


def test_eager_fast_path_equals_the_custom_ops_forward_and_backward() -> None:
    # The eager autograd.Function must be indistinguishable from the registered op, whether it
    # is given the rate as a float or as a tensor (the op always takes a float64 tensor).
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(6, 10, dtype=torch.float64)
    dropkit_ops = torch.ops.dropkit
    cases: list[tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], _Arguments]] = [
        # alpha: a shift and a drop value in play, and a gradient formula of its own.
        (ops.masked_affine, dropkit_ops.masked_affine.default, lambda r: (x, KEY, r, [1], "alpha", "p")),
        (ops.masked_affine, dropkit_ops.masked_affine.default, lambda r: (x, KEY, r, [], "inverted", "p")),
        (ops.gaussian_dropout, dropkit_ops.gaussian_dropout.default, lambda r: (x, KEY, r, [0], "p")),
        (ops.gaussian_noise, dropkit_ops.gaussian_noise.default, lambda r: (x, KEY, r, [], "std")),
        (ops.bias_dropout_add, dropkit_ops.bias_dropout_add.default, lambda r: (x, bias, residual, KEY, r)),
    ]
    rate = torch.tensor(0.4, dtype=torch.float64)
    for fast, op, arguments in cases:
        assert ops.eager_fast_path(x)
        results = []
        for fn, args in ((fast, arguments(0.4)), (fast, arguments(rate)), (op, arguments(rate))):
            out = fn(*args)
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            results.append((out, torch.autograd.grad(out, leaves, grad)))
        (out_op, grads_op) = results[-1]
        assert "dropkit" in type(out_op.grad_fn).__name__
        for out_fast, grads_fast in results[:-1]:
            assert out_fast.grad_fn is not None
            assert "dropkit" not in type(out_fast.grad_fn).__name__
            assert torch.equal(out_fast, out_op)
            for a, b in zip(grads_fast, grads_op, strict=True):
                assert torch.equal(a, b)
        assert torch.autograd.gradcheck(fast, arguments(0.4))
        assert torch.autograd.gradcheck(fast, arguments(rate))


def test_a_rate_schedule_does_not_grow_the_recipe_cache() -> None:
    # The threshold and the constants are run-time kernel arguments, not part of the cached
    # layout recipe: 50 rates on one shape add at most one recipe (the first call's), and every
    # output is still the reference engine's, bit for bit.
    assert backend_for("cpu") == dispatch.NUMBA
    x = _values((37, 129), torch.float32)
    before = set(cpu._recipes)
    rates = [i / 51 for i in range(1, 51)]
    assert len({drop_threshold(p) for p in rates}) == len(rates)
    for i, p in enumerate(rates):
        for rate in (p, torch.tensor(p, dtype=torch.float64)):
            fast = dropkit.functional.dropout(x, rate, seed=100 + i)
            with use_reference_engine():
                expected = dropkit.functional.dropout(x, rate, seed=100 + i)
            assert_bit_identical(fast, expected)
    assert len(set(cpu._recipes) - before) <= 1


# ---- API of the fused op -------------------------------------------------------------------------


def test_bias_dropout_add_eval_and_p_zero_add_without_a_mask() -> None:
    x, bias, residual = torch.randn(3, 5), torch.randn(5), torch.randn(3, 5)
    expected = residual + (x + bias)
    residual_dropout = dropkit.functional.residual_dropout
    assert torch.equal(residual_dropout(x, residual, 0.5, training=False, bias=bias), expected)
    assert torch.equal(residual_dropout(x, residual, 0.0, bias=bias), expected)
    p_one = residual_dropout(x, residual, 1.0, bias=bias, seed=1)
    assert torch.equal(p_one, residual)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input": [1.0]}, TypeError, "input must be a torch.Tensor"),
        ({"bias": torch.zeros(5, dtype=torch.float64)}, TypeError, "bias must have the input's dtype"),
        ({"residual": torch.zeros(3, 5, dtype=torch.int64)}, TypeError, "residual must be a floating-point"),
        ({"bias": torch.zeros(4)}, ValueError, r"bias of shape \(4,\) does not broadcast"),
        ({"bias": torch.zeros(2, 3, 5)}, ValueError, "does not broadcast"),
        ({"residual": torch.zeros(5)}, ValueError, r"residual must have the input's shape \(3, 5\)"),
        ({"p": 1.5}, ValueError, r"p must be in \[0, 1\], got 1.5"),
        ({"training": 1}, TypeError, "training must be a bool"),
    ],
)
def test_bias_dropout_add_rejects_bad_arguments(kwargs: dict[str, object], error: type, match: str) -> None:
    arguments: dict[str, object] = {
        "input": torch.zeros(3, 5),
        "bias": torch.zeros(5),
        "residual": torch.zeros(3, 5),
        "p": 0.5,
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        dropkit.functional.residual_dropout(**arguments)  # type: ignore[arg-type]


def test_bias_dropout_add_module() -> None:
    m = dropkit.nn.ResidualDropout(p=0.4)
    assert repr(m) == "ResidualDropout(p=0.4)"
    x, bias, residual = torch.randn(8, 64), torch.randn(64), torch.randn(8, 64)
    first, second = m(x, residual, bias), m(x, residual, bias)
    assert not torch.equal(first, second)  # the step advances: fresh masks
    fixed = m(x, residual, bias, seed=9)
    assert torch.equal(fixed, dropkit.functional.residual_dropout(x, residual, 0.4, bias=bias, seed=9))
    m.eval()
    assert torch.equal(m(x, residual, bias), residual + (x + bias))
    with pytest.raises(ValueError, match="p must be in"):
        dropkit.nn.ResidualDropout(p=-0.1)


# ---- dispatch: forcing and fallback ----------------------------------------------------------


def test_context_manager_forces_the_reference_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(100, 10)
    fast = dropkit.functional.dropout(x, 0.5, seed=3)

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("kernel called while the reference engine is forced")

    monkeypatch.setattr(cpu, "masked_affine", refuse)
    with dropkit.use_reference_engine():
        assert backend_for("cpu") == dispatch.REFERENCE
        assert torch.equal(dropkit.functional.dropout(x, 0.5, seed=3), fast)
        with use_reference_engine(False):
            assert backend_for("cpu") == dispatch.NUMBA
        assert backend_for("cpu") == dispatch.REFERENCE
    assert backend_for("cpu") == dispatch.NUMBA
    with pytest.raises(TypeError, match="enabled must be a bool"), use_reference_engine("yes"):  # type: ignore[arg-type]
        pass


def _expect_one_fallback_warning(record: list[warnings.WarningMessage], match: str) -> None:
    messages = [str(w.message) for w in record if issubclass(w.category, KernelFallbackWarning)]
    assert len(messages) == 1, messages
    assert match in messages[0]


def test_broken_kernel_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, fresh_backends: None
) -> None:
    x = torch.randn(50, 20)
    expected = reference.masked_affine(x, KEY, HALF, [], 2.0, 0.0, 0.0)
    assert backend_for("cpu") == dispatch.NUMBA  # loaded and self-checked

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("simulated compiler crash")

    monkeypatch.setattr(cpu, "_launch", broken)

    def several_calls() -> None:
        for _ in range(3):
            assert_bit_identical(ops.masked_affine(x, KEY, 0.5, [], "inverted", "p"), expected)
        dropkit.functional.residual_dropout(x, x, 0.5, bias=torch.zeros(20), seed=KEY)

    with pytest.warns(KernelFallbackWarning) as record:
        several_calls()
    _expect_one_fallback_warning(record.list, "simulated compiler crash")
    assert backend_for("cpu") == dispatch.REFERENCE


def test_missing_backend_warns_once(monkeypatch: pytest.MonkeyPatch, fresh_backends: None) -> None:
    monkeypatch.setattr(dispatch._BACKENDS["cpu"], "module_name", "dropkit.kernels._not_there")
    x = torch.randn(40)
    with pytest.warns(KernelFallbackWarning) as record:
        outputs = [dropkit.functional.dropout(x, 0.5, seed=2) for _ in range(3)]
    _expect_one_fallback_warning(record.list, "ModuleNotFoundError")
    assert backend_for("cpu") == dispatch.REFERENCE
    expected = reference.masked_affine(x, dropkit.make_key(2), HALF, [], 2.0, 0.0, 0.0)
    for output in outputs:
        assert torch.equal(output, expected)


def test_kernel_failing_its_self_check_is_not_used(
    monkeypatch: pytest.MonkeyPatch, fresh_backends: None
) -> None:
    monkeypatch.setattr(cpu, "masked_affine", lambda x, *args: torch.zeros_like(x))
    with pytest.warns(KernelFallbackWarning, match="self-check failed"):
        assert backend_for("cpu") == dispatch.REFERENCE
    x = torch.ones(64)
    assert dropkit.functional.dropout(x, 0.5, seed=4).sum() > 0


def test_a_bad_key_does_not_switch_the_backend_off() -> None:
    x = torch.ones(16)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        ops.masked_affine(x, torch.tensor([1, 2], dtype=torch.int64), 0.5, [], "inverted", "p")
    assert backend_for("cpu") == dispatch.NUMBA


def test_cache_dir_falls_back_when_the_package_dir_is_read_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    writable = cpu._writable
    monkeypatch.setattr(cpu, "_writable", lambda d: d.name != "__pycache__" and writable(d))
    cpu._configure_cache_dir()
    chosen = numba.config.CACHE_DIR
    assert chosen == os.path.join(str(tmp_path), "dropkit", "numba")


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
@pytest.mark.parametrize("planted", ["world-writable", "group-writable", "other-owner", "symlink", "file"])
def test_cache_dir_refuses_a_directory_planted_in_the_temp_dir(
    planted: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Another local user can create /tmp/dropkit-numba-<uid> before us; numba's cache index is
    # a pickle, so loading it would run their code.  Ownership is simulated by changing what
    # os.getuid says, which works as root too.
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the first fallback cannot be created
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    sentinel = str(tmp_path / "unchanged")
    monkeypatch.setattr(numba.config, "CACHE_DIR", sentinel)
    writable = cpu._writable
    monkeypatch.setattr(cpu, "_writable", lambda d: d.name != "__pycache__" and writable(d))
    uid = os.getuid()
    if planted == "other-owner":
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # we now "are" another user
    target = temp / f"dropkit-numba-{os.getuid()}"
    if planted == "symlink":
        elsewhere = tmp_path / "attacker"
        elsewhere.mkdir(mode=0o700)
        target.symlink_to(elsewhere, target_is_directory=True)
    elif planted == "file":
        target.write_text("")
    else:
        target.mkdir()
        target.chmod({"world-writable": 0o777, "group-writable": 0o770, "other-owner": 0o700}[planted])
    cpu._configure_cache_dir()
    chosen = numba.config.CACHE_DIR
    assert chosen == sentinel


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
def test_cache_dir_in_the_temp_dir_is_created_private(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    writable = cpu._writable
    monkeypatch.setattr(cpu, "_writable", lambda d: d.name != "__pycache__" and writable(d))
    cpu._configure_cache_dir()
    expected = tmp_path / f"dropkit-numba-{os.getuid()}"
    chosen = numba.config.CACHE_DIR
    assert chosen == str(expected)
    info = expected.lstat()
    assert info.st_uid == os.getuid()
    assert info.st_mode & 0o077 == 0  # created 0700: nobody else can read or plant files
    # An existing private directory of ours is reused (the cache survives across processes).
    monkeypatch.setattr(numba.config, "CACHE_DIR", "other")
    cpu._configure_cache_dir()
    reused = numba.config.CACHE_DIR
    assert reused == str(expected)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_kernels_serially(threads: None) -> None:
    # numba terminates a forked child that launches GNU OpenMP work after its parent did (for
    # example a DataLoader worker); the kernels must notice and run serially there.
    torch.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    x = torch.randn(200_000)
    expected = reference.masked_affine(x, KEY, HALF, [], 2.0, 0.0, 0.0).numpy()
    cpu.masked_affine(x, KEY, HALF, [], 2.0, 0.0, 0.0)  # the parent starts the thread pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12 on fork with threads
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        faulthandler.dump_traceback_later(30, exit=True)
        same = np.array_equal(cpu.masked_affine(x, KEY, HALF, [], 2.0, 0.0, 0.0).numpy(), expected)
        os._exit(0 if same else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "DROPKIT_FORCE_REFERENCE"} | env
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )


@pytest.mark.slow
def test_environment_variable_forces_the_reference_engine() -> None:
    forced = _run_python(
        """
        import dropkit
        from dropkit.kernels import backend_for
        print(backend_for("cpu"))
        with dropkit.use_reference_engine(False):
            print(backend_for("cpu"))
        """,
        DROPKIT_FORCE_REFERENCE="1",
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.split() == ["reference", "numba"]
    invalid = _run_python("import dropkit", DROPKIT_FORCE_REFERENCE="maybe")
    assert invalid.returncode != 0
    assert "DROPKIT_FORCE_REFERENCE must be 0/1/true/false, got 'maybe'" in invalid.stderr


@pytest.mark.slow
def test_compiled_kernels_are_cached_across_processes() -> None:
    code = """
        import torch, dropkit
        from dropkit.kernels import cpu
        torch.set_num_threads(2)
        for n in (100, 100_000):
            dropkit.functional.dropout(torch.ones(n), 0.5, seed=1)
        drivers = [cpu._launch_serial] + ([cpu._launch_parallel] if torch.get_num_threads() > 1 else [])
        misses = sum(sum(d.stats.cache_misses.values()) for d in drivers)
        print(misses, sum(sum(d.stats.cache_hits.values()) for d in drivers))
    """
    _run_python(code)  # the first process may compile (and fill the cache) ...
    second = _run_python(code)  # ... the next one must load everything from disk
    assert second.returncode == 0, second.stderr
    misses, hits = (int(v) for v in second.stdout.split())
    assert misses == 0
    assert hits >= 1
