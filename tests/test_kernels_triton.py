"""The Triton kernels against the reference engine, bit for bit, on the CPU via Triton's interpreter.

How the interpreted checks are isolated: Triton reads ``TRITON_INTERPRET`` when ``@triton.jit``
decorates a function, i.e. when ``triton.language`` (``tl.philox`` is itself a jit function) and
:mod:`dropkit.kernels.triton_gpu` are first imported.  This pytest process may already hold a
compiled-mode triton (``torch.compile`` imports it), and setting the variable here would turn
every other test's Triton kernels into interpreted ones.  So this process never imports triton:
the checks in ``CASES`` run in a child Python started with ``TRITON_INTERPRET=1``, which runs
this file as a module, executes every case with warnings as errors and writes a JSON report;
each parametrized ``test_interpreted`` reports its own case, with the child's traceback.  A
second child, in compiled mode, builds the kernels for sm_90 without a GPU and checks the PTX
(``COMPILE_CASES``).  The two run side by side, each paying the torch and triton import once
(the harness: :mod:`tests.triton_workers`).  To debug directly, from the repository root::

    TRITON_INTERPRET=1 python -m tests.test_kernels_triton interpret /tmp/report.json [CASE ...]
    python -m tests.test_kernels_triton compile /tmp/report.json [CASE ...]
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dropkit.engine import reference
from dropkit.engine.masks import threshold_keep_mask
from dropkit.engine.numerics import compute_dtype, drop_threshold, inverted_scale
from dropkit.engine.philox import MASK32, philox4x32
from tests import triton_workers as workers

HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PS = [0.0, 1.0, 1e-5, 0.5, 0.999]
SHAPES: list[tuple[int, ...]] = [(0,), (2, 0, 3), (), (1,), (7,), (1037,), (3, 5, 67)]

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors):
# counter words, key words, output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

CASES = workers.CaseRegistry()
case = CASES.case


# ---------------------------------------------------------------------------------------------
# Helpers (run in the child)
# ---------------------------------------------------------------------------------------------


def _int64(value: int) -> int:
    """The int64 with the low 64 bits of ``value``."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _key(seed: int, stream: int, step: int) -> torch.Tensor:
    return torch.tensor([_int64(seed), stream, step], dtype=torch.int64)


# A negative seed, a stream in the top half of 32 bits and a step past 2**32 (only its low word
# enters Philox): the corners where signed int64 and unsigned 32-bit words part ways.
KEYS = [_key(0x0123456789ABCDEF, 7, 3), _key(-0x5EED, 0xFFFFFFF0, (1 << 32) + 11)]
# The kernels take the rate as its integer drop threshold (dropkit.engine.numerics).
HALF = drop_threshold(0.5)


def _triton_gpu() -> Any:
    from dropkit.kernels import triton_gpu

    return triton_gpu


def _data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 3.0
    flat = values.view(-1)
    # Signed zeros: kept -0.0 must stay -0.0 (no stray "+ 0.0") and dropped ones take drop_value.
    flat[::5] = -0.0
    return values.to(dtype)


def _affine_params(p: float) -> list[tuple[float, float, float]]:
    inverted = (inverted_scale(p), 0.0, 0.0)
    # Constants that are not float32-representable, as alpha dropout's are: they must be rounded
    # once to the compute dtype, like the reference does.
    alpha = (1.0507009873554805 * 0.77, 0.1234567891, -1.7580993408473766)
    negative = (-0.5, 0.0, -0.0)
    # Short-mantissa scale: products of bfloat16/float16 inputs often fall exactly halfway
    # between two outputs, which tells round-to-nearest-even from other roundings.
    ties = (1.5, 0.0, 0.0)
    return [inverted, alpha, negative, ties]


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.stride() == expected.stride(), f"{what}: strides {actual.stride()} != {expected.stride()}"
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a = actual.contiguous().view(as_int)
    e = expected.contiguous().view(as_int)
    if not torch.equal(a, e):
        wrong = (a != e).nonzero()
        first = tuple(wrong[0].tolist())
        raise AssertionError(
            f"{what}: {len(wrong)} of {a.numel()} elements differ; first at {first}: "
            f"{actual[first].item()!r} != {expected[first].item()!r}"
        )


def _check_masked_affine(
    x: torch.Tensor,
    key: torch.Tensor,
    p: float,
    broadcast_dims: list[int],
    what: str,
    all_affine: bool = True,
) -> None:
    """Bits of the Triton op and the reference; ``all_affine=False`` checks only the alpha-dropout
    parameters (for cases about indexing, the arithmetic being covered elsewhere)."""
    tg = _triton_gpu()
    params = _affine_params(p)
    for scale, shift, drop in params if all_affine else params[1:2]:
        args = (x, key, drop_threshold(p), broadcast_dims, scale, shift, drop)
        label = f"{what} p={p} bd={broadcast_dims} affine=({scale}, {shift}, {drop})"
        assert_bits_equal(tg.masked_affine(*args), reference.masked_affine(*args), label)


def bias_dropout_add_reference(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    keep_scale: float,
) -> torch.Tensor:
    """The composition the fused kernel replaces, one eager op (one rounding) at a time."""
    compute = compute_dtype(x.dtype)
    keep = threshold_keep_mask(key, threshold, x.shape)
    scale = torch.tensor(keep_scale, dtype=compute)
    kept = (x.to(compute) + bias.to(compute)) * scale
    values = residual.to(compute) + torch.where(keep, kept, torch.zeros((), dtype=compute))
    out = torch.empty_like(x)
    out.copy_(values)
    return out


# ---------------------------------------------------------------------------------------------
# Cases (run in the child, under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------


@case("interpreter-active")
def _interpreter_active() -> None:
    import triton

    # Without this, every other case could silently test nothing interpreted (or fail to launch).
    assert triton.knobs.runtime.interpret, "the worker must run with TRITON_INTERPRET=1"
    assert _triton_gpu()._masked_affine_kernel.__class__.__name__ == "InterpretedFunction"


@case("philox-known-answers")
def _philox_known_answers() -> None:
    tg = _triton_gpu()
    for (c0, c1, c2, c3), (k0, k1), expected in KAT:
        # Through our key model: seed carries the Philox key, stream and step counter words 2
        # and 3, the element counter words 0 and 1.
        key = _key(k1 << 32 | k0, c2, c3)
        words = tg.philox_block(key, _int64(c1 << 32 | c0), 1)
        assert words[0].tolist() == list(expected), f"KAT {c0:#x}...: {[hex(w) for w in words[0].tolist()]}"


@case("philox-vs-reference")
def _philox_vs_reference() -> None:
    tg = _triton_gpu()
    # Ranges that cross the 2**32 counter boundary (word 1 changes) and odd, non-power-of-two counts.
    for key in KEYS:
        for first, count in ((0, 37), ((1 << 32) - 5, 10), (_int64(-3), 6)):
            words = tg.philox_block(key, first, count)
            counters = torch.arange(first, first + count, dtype=torch.int64)
            seed, stream, step = key
            reference = philox4x32(
                counters & MASK32, (counters >> 32) & MASK32, stream & MASK32, step & MASK32,
                seed & MASK32, (seed >> 32) & MASK32,
            )  # fmt: skip
            assert torch.equal(words, torch.stack(reference, dim=1)), f"key {key.tolist()} first {first}"


def _register_masked_affine_cases() -> None:
    for dtype in DTYPES:

        def check(dtype: torch.dtype = dtype) -> None:
            for shape in SHAPES:
                x = _data(shape, dtype)
                for p in PS:
                    _check_masked_affine(x, KEYS[0], p, [], f"{dtype} {shape}")
            # The other key on one shape: stream and step words differ.
            _check_masked_affine(_data((1037,), dtype, seed=1), KEYS[1], 0.5, [], f"{dtype} key 1")

        case(f"masked-affine-{str(dtype).removeprefix('torch.')}")(check)


_register_masked_affine_cases()


@case("masked-affine-many-programs")
def _masked_affine_many_programs() -> None:
    tg = _triton_gpu()
    # Blocks of 4 counters (32 elements): 19 programs take the mask-free path and the last one
    # the masked path, with every dtype's tile width (16 bytes of elements).
    with tg.launch_overrides(block_counters=4):
        for dtype in DTYPES:
            _check_masked_affine(_data((611,), dtype), KEYS[1], 0.5, [], f"{dtype} block 4")
            _check_masked_affine(_data((6, 4, 5, 3), dtype), KEYS[0], 0.5, [2, 3], f"{dtype} block 4 channel")
    # Every tile width, with loads hoisted above the stores or interleaved with them: the launch
    # shape must never change the bits.
    for hoist in (True, False):
        for width in (2, 4, 8):
            with tg.launch_overrides(block_counters=4, hoist_loads=hoist, tile_width=width):
                for dtype in DTYPES:
                    label = f"{dtype} hoist={hoist} width={width}"
                    _check_masked_affine(_data((611,), dtype), KEYS[1], 0.5, [], label, all_affine=False)


def _layouts(dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    yield "transposed", _data((13, 17), dtype).t()
    yield "strided slice", _data((6, 22), dtype)[:, ::2]
    yield "offset slice", _data((40,), dtype)[3:]
    yield "expanded", _data((5, 1), dtype).expand(5, 9)
    yield "channels_last", _data((2, 3, 5, 7), dtype).to(memory_format=torch.channels_last)
    yield "channels_last_3d", _data((2, 3, 2, 3, 4), dtype).to(memory_format=torch.channels_last_3d)


@case("masked-affine-layouts")
def _masked_affine_layouts() -> None:
    # The mask indexes logical (row-major) positions whatever the strides, and the output takes
    # the layout of empty_like(x): both checked, values and strides.
    for dtype in DTYPES:
        for name, x in _layouts(dtype):
            for p in (0.0, 0.5):
                _check_masked_affine(x, KEYS[1], p, [], f"{dtype} {name}", all_affine=False)
        x = _data((2, 3, 5, 7), dtype).to(memory_format=torch.channels_last)
        _check_masked_affine(x, KEYS[0], 0.5, [2, 3], f"{dtype} channels_last channel mask", all_affine=False)


BROADCASTS: list[tuple[tuple[int, ...], list[int]]] = [
    ((2, 3, 5, 7), [2, 3]),  # channel mask (N, C, 1, 1): one kept run, no wrap-around
    ((3, 4, 9, 9), [2, 3]),  # inner size 81, not a multiple of 8
    ((2, 3, 5, 7), [3]),
    ((2, 3, 5, 7), [1]),  # (N, 1, H, W): kept, broadcast, kept
    ((2, 3, 5, 7), [0]),  # (1, C, H, W): the single kept run wraps around
    ((2, 3, 5, 7), [0, 2, 3]),  # (1, C, 1, 1)
    ((2, 3, 5, 7), [0, 2]),  # two kept runs after a broadcast one
    ((2, 3, 5, 7), [1, 3]),  # two kept runs ending in a broadcast one
    ((2, 3, 5, 7), [0, 1, 2, 3]),  # a single draw for everything
    ((2, 3, 2, 3, 2), [1, 3]),  # three kept runs: the expand-with-torch fallback
    ((2, 1, 5, 1, 3), [1, 3]),  # broadcast dims of size 1: really the full mask
    ((2, 1, 5, 4, 3), [3]),  # size-1 dim between runs
    ((4, 0, 3), [2]),  # empty
    ((1037,), [0]),
]


@case("masked-affine-broadcast")
def _masked_affine_broadcast() -> None:
    tg = _triton_gpu()
    for dtype, ps in ((torch.float32, (0.0, 0.5, 1.0)), (torch.bfloat16, (0.5,)), (torch.float64, (0.5,))):
        for shape, dims in BROADCASTS:
            x = _data(shape, dtype)
            for p in ps:
                _check_masked_affine(x, KEYS[0], p, dims, f"{dtype} {shape}", all_affine=False)
    # The int64 index path and small blocks, on the gather kernel.
    with tg.launch_overrides(block_counters=2, force_wide_index=True):
        for shape, dims in BROADCASTS:
            _check_masked_affine(
                _data(shape, torch.float32), KEYS[1], 0.5, dims, f"wide {shape}", all_affine=False
            )


@case("backward-equals-reference-gradient")
def _backward() -> None:
    tg = _triton_gpu()
    # The gradient of the op is the op on the gradient with shift and drop value zero.  The
    # reference gradient is autograd through the reference engine's own torch ops, so it does
    # not depend on which kernel the dispatcher would pick.
    for dtype in DTYPES:
        cases = [((5, 3, 7), [], KEYS[1]), ((2, 3, 5, 7), [2, 3], KEYS[0]), ((9, 13), [0], KEYS[1])]
        for shape, dims, key in cases:
            for p in (0.0, 0.5, 0.999):
                threshold, scale, shift, drop = drop_threshold(p), inverted_scale(p), 0.25, -1.5
                x = _data(shape, dtype).requires_grad_(True)
                grad = _data(shape, dtype, seed=2)
                reference.masked_affine(x, key, threshold, dims, scale, shift, drop).backward(grad)
                assert x.grad is not None
                ours = tg.masked_affine(grad, key, threshold, dims, scale, 0.0, 0.0)
                assert_bits_equal(ours, x.grad, f"backward {dtype} {shape} bd={dims} p={p}")
        # Gradients arrive non-contiguous too (e.g. through a transpose).
        grad_t = _data((7, 5), dtype, seed=3).t()
        x = _data((5, 7), dtype).requires_grad_(True)
        reference.masked_affine(x, KEYS[0], HALF, [], 2.0, 0.0, 0.0).backward(grad_t)
        assert x.grad is not None
        ours = tg.masked_affine(grad_t, KEYS[0], HALF, [], 2.0, 0.0, 0.0)
        assert_bits_equal(ours.contiguous(), x.grad.contiguous(), f"backward {dtype} transposed grad")


@case("bias-dropout-add")
def _bias_dropout_add() -> None:
    tg = _triton_gpu()
    for dtype in DTYPES:
        for shape in ((4, 33), (2, 3, 16), (1037,), (1,), (0, 8), (3, 5, 67)):
            x = _data(shape, dtype)
            bias = _data(shape[-1:], dtype, seed=4)
            residual = _data(shape, dtype, seed=5)
            for p in PS:
                threshold, scale = drop_threshold(p), inverted_scale(p)
                for key in KEYS if p == 0.5 else KEYS[:1]:
                    args = (x, bias, residual, key, threshold, scale)
                    what = f"bias_dropout_add {dtype} {shape} p={p}"
                    expected = bias_dropout_add_reference(*args)
                    assert_bits_equal(tg.bias_dropout_add(*args), expected, what)
                    # The reference backend (what the dispatcher falls back to) agrees.
                    assert_bits_equal(reference.bias_dropout_add(*args), expected, f"{what} reference")
        # Non-contiguous x and residual; many programs (mask-free and masked), int64 columns.
        x = _data((33, 12), dtype).t()
        residual = _data((12, 66), dtype, seed=5)[:, ::2]
        bias = _data((33,), dtype, seed=4)
        for overrides in ({"block_counters": 4}, {"block_counters": 2, "force_wide_index": True}):
            with tg.launch_overrides(**overrides):
                for args in (
                    (x, bias, residual, KEYS[0], HALF, 2.0),
                    (residual, bias, x, KEYS[1], drop_threshold(0.3), inverted_scale(0.3)),
                ):
                    expected = bias_dropout_add_reference(*args)
                    assert_bits_equal(tg.bias_dropout_add(*args), expected, f"{dtype} strided {overrides}")


@case("bias-dropout-add-mixed")
def _bias_dropout_add_mixed() -> None:
    tg = _triton_gpu()
    # What the reference accepts must work here (the dispatcher takes an exception for a broken
    # backend): a residual that broadcasts, bias and residual in other float dtypes.
    x = _data((6, 40), torch.bfloat16)
    for bias_dtype, residual_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float16)):
        bias = _data((40,), bias_dtype, seed=4)
        for residual_shape in ((6, 40), (40,), (6, 1), ()):
            residual = _data(residual_shape, residual_dtype, seed=5)
            args = (x, bias, residual, KEYS[1], HALF, 2.0)
            what = f"bias {bias_dtype} residual {residual_dtype} {residual_shape}"
            assert_bits_equal(tg.bias_dropout_add(*args), bias_dropout_add_reference(*args), what)
    x64 = _data((3, 40), torch.float64)
    args = (
        x64,
        _data((40,), torch.bfloat16),
        _data((3, 40), torch.float32),
        KEYS[0],
        drop_threshold(0.25),
        4 / 3,
    )
    assert_bits_equal(tg.bias_dropout_add(*args), bias_dropout_add_reference(*args), "float64 x")


@case("input-validation")
def _input_validation() -> None:
    tg = _triton_gpu()
    x = torch.ones(8)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        tg.masked_affine(torch.ones(8, dtype=torch.int32), KEYS[0], HALF, [], 2.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="int64 tensor"):
        tg.masked_affine(x, KEYS[0].to(torch.int32), HALF, [], 2.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"shape \(x.shape\[-1\],\)"):
        tg.bias_dropout_add(torch.ones(4, 8), torch.ones(4), torch.ones(4, 8), KEYS[0], HALF, 2.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        tg.bias_dropout_add(torch.ones(4, 8), torch.ones(8), torch.ones(3, 8), KEYS[0], HALF, 2.0)
    with pytest.raises(TypeError, match="bias must be float16"):
        tg.bias_dropout_add(x, x.int(), x, KEYS[0], HALF, 2.0)
    with pytest.raises(ValueError, match="power of two"), tg.launch_overrides(block_counters=3):
        pass


# ---------------------------------------------------------------------------------------------
# Offline compilation for a GPU (run in a second child, in compiled mode)
# ---------------------------------------------------------------------------------------------
#
# The interpreter runs the kernels' Python, not Triton's compiler, which is stricter about types
# and is where fused multiply-adds could appear.  Triton compiles for a GPU it does not have
# (with its bundled ptxas), so the kernels are also built for sm_90 here, as the host code would
# launch them, and the PTX is checked: no FMA (it would skip a rounding the reference does) and
# 16-byte accesses on the mask-free path.

# (kernel, data dtype, variant): the launches the host code makes.
COMPILE_CASES: list[tuple[str, str, str]] = [
    *[("masked_affine", dtype, "shift") for dtype in ("float32", "float64", "float16", "bfloat16")],
    ("masked_affine", "float32", "no-shift"),
    ("gather", "float32", "2 runs"),
    ("gather", "bfloat16", "2 runs, int64 index"),
    ("bias_dropout_add", "float32", "same dtypes"),
    ("bias_dropout_add", "bfloat16", "fp64 bias, fp16 residual, int64 columns"),
    ("keep_bytes", "int8", ""),
    ("philox_block", "int64", ""),
]


def _compile_case_id(kernel: str, dtype: str, variant: str) -> str:
    return "-".join(filter(None, [kernel, dtype, variant.replace(" ", "").replace(",", "+")]))


def _compile_for_sm90(kernel: str, dtype: str, variant: str) -> None:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tg = _triton_gpu()
    torch_dtype = getattr(torch, dtype)
    ty = {
        "float32": "fp32",
        "float64": "fp64",
        "float16": "fp16",
        "bfloat16": "bf16",
        "int8": "i8",
        "int64": "i64",
    }
    t = ty[dtype]
    compute = tl.float64 if dtype == "float64" else tl.float32
    affine = {"scale_bits": "i64", "shift_bits": "i64", "drop_bits": "i64"}
    if kernel == "masked_affine":
        fn = tg._masked_affine_kernel
        signature = {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "key_ptr": "*i64", "n": "i64", "threshold": "i32"}
        signature |= affine
        constants = {"HAS_SHIFT": variant == "shift", "COMPUTE": compute, "BLOCK_C": 256}
        constants["WIDTH"] = tg._tile_width(torch_dtype)
        constants["HOIST"] = tg._config.hoist_loads
    elif kernel == "gather":
        fn = tg._masked_affine_gather_kernel
        signature = {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "keep_ptr": "*i8", "n": "i64"}
        signature |= {name: "i32" for name in ("div1", "size1", "stride1", "div2", "size2", "stride2")}
        signature |= affine
        constants = {"NUM_RUNS": 2, "WRAP1": True, "WIDE": "int64" in variant, "HAS_SHIFT": False}
        constants |= {"COMPUTE": compute, "BLOCK": 2048}
    elif kernel == "bias_dropout_add":
        fn = tg._bias_dropout_add_kernel
        bias_t, residual_t = ("fp64", "fp16") if "fp64 bias" in variant else (t, t)
        signature = {"x_ptr": f"*{t}", "bias_ptr": f"*{bias_t}", "residual_ptr": f"*{residual_t}"}
        signature |= {"out_ptr": f"*{t}", "key_ptr": "*i64", "n": "i64", "hidden": "i64", "threshold": "i32"}
        signature |= {"scale_bits": "i64"}
        constants = {"COMPUTE": compute, "BLOCK_C": 256, "WIDTH": tg._group_width(torch_dtype)}
        constants |= {"WIDE_COLUMN": "int64" in variant}
    elif kernel == "keep_bytes":
        fn = tg._keep_bytes_kernel
        signature = {"key_ptr": "*i64", "keep_ptr": "*i8", "n": "i64", "threshold": "i32"}
        constants = {"BLOCK_C": 256}
    else:
        fn = tg._philox_block_kernel
        signature = {"key_ptr": "*i64", "out_ptr": "*i64", "first": "i64", "count": "i64"}
        constants = {"BLOCK": 64}
    signature |= dict.fromkeys(constants, "constexpr")
    # torch's allocations are 16-byte aligned, which Triton specializes pointers on.
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, ty_ in enumerate(signature.values()) if ty_.startswith("*")
    }
    source = ASTSource(fn, signature, constants, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=tg._launch_options())
    ptx = compiled.asm["ptx"]
    assert "fma." not in ptx, "fused multiply-add in the PTX: results would differ from the reference"
    if kernel in ("masked_affine", "bias_dropout_add"):
        vector = "ld.global.v2.b64" if dtype == "float64" else "ld.global.v4.b32"
        assert vector in ptx, f"no 16-byte loads ({vector}) on the mask-free path"


# ---------------------------------------------------------------------------------------------
# The pytest side (this process never imports triton)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def worker_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, workers.Report]:
    """Both children, run side by side: ``{"interpret": {case: result}, "compile": {...}}``."""
    root = tmp_path_factory.mktemp("triton_workers")
    return workers.run_workers("tests.test_kernels_triton", ("interpret", "compile"), root, timeout=600)


@pytest.mark.slow
@requires_triton
@pytest.mark.parametrize("name", list(CASES))
def test_interpreted(name: str, worker_reports: dict[str, workers.Report]) -> None:
    workers.report_case(worker_reports, "interpret", name)


@pytest.mark.slow
@requires_triton
@pytest.mark.parametrize("case", COMPILE_CASES, ids=[_compile_case_id(*c) for c in COMPILE_CASES])
def test_compiles_for_sm90(case: tuple[str, str, str], worker_reports: dict[str, workers.Report]) -> None:
    workers.report_case(worker_reports, "compile", _compile_case_id(*case))


def test_import_without_triton_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if triton were not installed.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delitem(sys.modules, "dropkit.kernels.triton_gpu", raising=False)
    with pytest.raises(ImportError, match="needs the 'triton' package"):
        importlib.import_module("dropkit.kernels.triton_gpu")


if __name__ == "__main__":
    compile_cases = {_compile_case_id(*c): functools.partial(_compile_for_sm90, *c) for c in COMPILE_CASES}
    modes = {
        "interpret": workers.Mode(CASES.cases),
        "compile": workers.Mode(compile_cases, skip_all=workers.offline_compile_unavailable),
    }
    sys.exit(workers.main(sys.argv[1:], modes))
