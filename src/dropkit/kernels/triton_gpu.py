# Triton convention: compile-time (constexpr) kernel parameters are UPPER_CASE.
# ruff: noqa: N803
"""Triton kernels for dropkit's mask ops, bit for bit the same as the reference engine.

The bits follow the contract of :mod:`dropkit.engine.masks`: element ``j`` of the mask shape reads
the 16-bit half ``j % 2`` of Philox output word ``(j // 2) % 4`` at counter ``j // 8``, with the
Philox key ``(seed lo, seed hi)`` and counter words ``(n lo, n hi, stream, step)``.  Triton's
``tl.philox`` is the same Philox4x32-10 (same round multipliers, Weyl increments, word order and
key split of a 64-bit seed), but its ``tl.randint4x`` front end fixes counter words 2 and 3 at
zero, so the kernels call ``tl.philox`` directly with ``stream`` and ``step`` in those words.

Each program owns a block of counters and produces all 8 elements of each (4 words x 2 halves),
in tiles whose row-major order is the element order (see "Device code" below for the tile width).  The key is
read in-kernel from its int64 tensor and the drop threshold and affine constants are runtime
arguments: advancing the step neither syncs with the host nor recompiles.

Arithmetic matches :func:`dropkit.engine.reference.masked_affine`: float32 (float64 for
float64 inputs), constants rounded once from Python floats to that dtype, one rounding to the
output dtype.  The kernels are launched with ``enable_fp_fusion=False`` because a fused
multiply-add would skip the intermediate rounding that the reference performs.

Layouts: contiguous inputs are processed in place; other inputs are made contiguous (logical
row-major order, which is what the mask indexes) and the result is copied into
``torch.empty_like(x)`` so that its strides match the reference's.  Masks broadcast over some
dims (channel masks) are generated at mask size and gathered by an index computed in-kernel for
up to two runs of kept dims (which covers ``(N, C, 1, 1)``, ``(N, 1, L)``, ``(1, C, 1, 1)``, ...);
rarer patterns expand the small mask to the input's shape with torch first (one extra byte per
element), which changes the cost but not the bits.
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised in a test that hides triton
    raise ImportError(
        "dropkit.kernels.triton_gpu needs the 'triton' package (shipped with CUDA builds of PyTorch, "
        "or `pip install triton`); without it dropkit runs its reference engine"
    ) from exc

from dropkit.engine.masks import mask_shape
from dropkit.engine.numerics import compute_dtype

__all__ = [
    "bias_dropout_add",
    "launch_overrides",
    "launch_unchecked",
    "masked_affine",
    "name",
    "philox_block",
    "vector_width",
]

name = "triton"

_ELEMENTS_PER_COUNTER = 8
# The same constant for device code, which may read module globals only as constexprs.
_PER_COUNTER: tl.constexpr = tl.constexpr(_ELEMENTS_PER_COUNTER)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Triton integer division is emulated and far cheaper in 32 bits, so int64 indexing is used only
# when an index can pass 2**31.
_INT32_LIMIT = 2**31 - 1

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


class _LaunchConfig:
    # 256 counters = 2048 elements a program: enough bytes in flight per SM for a streaming
    # kernel, small enough that the tail wave stays short.  Tuned later with benchmarks/.
    block_counters = 256
    num_warps = 4
    force_wide_index = False
    # Loads issued before Philox and stores (see _masked_affine_block).
    hoist_loads = True
    # Elements per tile row of _masked_affine_kernel; None = the default (_tile_width).
    tile_width: int | None = None


_config = _LaunchConfig()


@contextlib.contextmanager
def launch_overrides(
    block_counters: int | None = None,
    num_warps: int | None = None,
    force_wide_index: bool = False,
    *,
    hoist_loads: bool | None = None,
    tile_width: int | None = None,
) -> Iterator[None]:
    """Override the launch shape inside the block; the bits never change.

    For tests (small blocks give many programs on small tensors, ``force_wide_index`` takes the
    int64 index paths) and for tuning with ``benchmarks/bench_triton.py``.  Process-wide, not
    thread-safe.
    """
    for name, value in (("block_counters", block_counters), ("num_warps", num_warps)):
        if value is not None and (value < 1 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two, got {value}")
    if tile_width is not None and tile_width not in (2, 4, 8):
        # The hoisted path unrolls at most 4 groups of a counter's 8 elements.
        raise ValueError(f"tile_width must be 2, 4 or 8, got {tile_width}")
    previous = (
        _config.block_counters,
        _config.num_warps,
        _config.force_wide_index,
        _config.hoist_loads,
        _config.tile_width,
    )
    if block_counters is not None:
        _config.block_counters = block_counters
    if num_warps is not None:
        _config.num_warps = num_warps
    _config.force_wide_index = force_wide_index
    if hoist_loads is not None:
        _config.hoist_loads = hoist_loads
    if tile_width is not None:
        _config.tile_width = tile_width
    try:
        yield
    finally:
        (
            _config.block_counters,
            _config.num_warps,
            _config.force_wide_index,
            _config.hoist_loads,
            _config.tile_width,
        ) = previous


# ---------------------------------------------------------------------------------------------
# Device code
# ---------------------------------------------------------------------------------------------
#
# Tiles: a program owns BLOCK_C counters, i.e. 8 * BLOCK_C consecutive elements, processed as
# 8 // WIDTH tiles of shape [BLOCK_C, WIDTH].  WIDTH = 8 (whole counters, the default up to
# 4-byte dtypes) makes each tile row 8 contiguous elements; for float32 Triton then splits a
# row over two threads (16-byte accesses) and both run Philox for it, which costs ALU time but
# measured far faster on an H100 than 16-byte half-row tiles (WIDTH = 4), whose accesses cover
# every 32-byte sector twice.  WIDTH = 16 bytes (float64, or launch_overrides) gives a thread
# whole rows, so no counter is computed twice.  Programs whose elements are all in bounds take a
# mask-free path: a mask that may change inside a vector stops Triton from vectorizing, and the
# element count is deliberately not specialized on.


@triton.jit
def _philox_words(
    key_ptr: tl.tensor, counters: tl.tensor
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    seed = tl.load(key_ptr)
    stream = tl.load(key_ptr + 1)
    step = tl.load(key_ptr + 2)
    # Mask before narrowing: the reference masks int64 words, and a counter or step past 2**32
    # must keep only its low word, whatever the sign of the int64.
    c0 = (counters & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counters >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + (stream & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + (step & 0xFFFFFFFF).to(tl.uint32)
    # tl.philox splits the 64-bit seed into the key (seed lo, seed hi), as the reference does.
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _draws16(
    w0: tl.tensor, w1: tl.tensor, w2: tl.tensor, w3: tl.tensor, FIRST: tl.constexpr, WIDTH: tl.constexpr
) -> tl.tensor:
    """The 16-bit draws of elements FIRST .. FIRST + WIDTH - 1 of each counter: [BLOCK_C, WIDTH]."""
    element = FIRST + tl.arange(0, WIDTH)[None, :]
    word_index = element // 2
    word = tl.where(
        word_index == 0,
        w0[:, None],
        tl.where(word_index == 1, w1[:, None], tl.where(word_index == 2, w2[:, None], w3[:, None])),
    )
    shift = ((element % 2) * 16).to(tl.uint32)
    return ((word >> shift) & 0xFFFF).to(tl.int32)


@triton.jit
def _group_offsets(BLOCK_C: tl.constexpr, FIRST: tl.constexpr, WIDTH: tl.constexpr) -> tl.tensor:
    return tl.arange(0, BLOCK_C)[:, None] * _PER_COUNTER + FIRST + tl.arange(0, WIDTH)[None, :]


@triton.jit
def _widen(x: tl.tensor, COMPUTE: tl.constexpr) -> tl.tensor:
    if x.dtype == tl.bfloat16:
        # Exact by construction; spelled out because the interpreter's own bfloat16 conversions
        # are not IEEE-faithful (see _store_rounded).
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(COMPUTE)
    else:
        return x.to(COMPUTE)


@triton.jit
def _store_rounded(ptr: tl.tensor, y: tl.tensor, mask: tl.tensor) -> None:
    if ptr.dtype.element_ty == tl.bfloat16:
        # float32 -> bfloat16 round-to-nearest-even in integer ops, as the hardware conversion
        # and torch do: Triton's interpreter truncates instead, which would make CPU checks of
        # these kernels meaningless for bfloat16.  NaN becomes the canonical 0x7FFF of the GPU.
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FFF, rounded)
        tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _from_bits(bits: tl.tensor, COMPUTE: tl.constexpr) -> tl.tensor:
    # Float constants travel as their float64 bit patterns: a float kernel argument would be
    # float32 in compiled Triton, and the interpreter rounds float constants through float32.
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def _affine(
    x: tl.tensor,
    keep: tl.tensor,
    scale_bits: tl.tensor,
    shift_bits: tl.tensor,
    drop_bits: tl.tensor,
    HAS_SHIFT: tl.constexpr,
    COMPUTE: tl.constexpr,
) -> tl.tensor:
    kept = _widen(x, COMPUTE) * _from_bits(scale_bits, COMPUTE)
    # Adding a zero shift would turn -0.0 into +0.0: the reference skips it, so must we.
    if HAS_SHIFT:
        kept = kept + _from_bits(shift_bits, COMPUTE)
    return tl.where(keep, kept, _from_bits(drop_bits, COMPUTE))


@triton.jit
def _masked_affine_group(
    x: tl.tensor,
    out_ptr: tl.tensor,
    w0: tl.tensor,
    w1: tl.tensor,
    w2: tl.tensor,
    w3: tl.tensor,
    remaining: tl.tensor,
    threshold: tl.tensor,
    scale_bits: tl.tensor,
    shift_bits: tl.tensor,
    drop_bits: tl.tensor,
    GROUP: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WIDTH: tl.constexpr,
) -> None:
    local = _group_offsets(BLOCK_C, GROUP * WIDTH, WIDTH)
    keep = _draws16(w0, w1, w2, w3, GROUP * WIDTH, WIDTH) >= threshold
    mask = local < remaining if MASKED else None
    y = _affine(x, keep, scale_bits, shift_bits, drop_bits, HAS_SHIFT, COMPUTE)
    _store_rounded(out_ptr + local, y, mask)


@triton.jit
def _load_group(
    x_ptr: tl.tensor, remaining: tl.tensor, GROUP: tl.constexpr, MASKED: tl.constexpr, BLOCK_C: tl.constexpr,
    WIDTH: tl.constexpr,
) -> tl.tensor:  # fmt: skip
    local = _group_offsets(BLOCK_C, GROUP * WIDTH, WIDTH)
    return tl.load(x_ptr + local, mask=local < remaining if MASKED else None)


@triton.jit
def _masked_affine_block(
    x_ptr: tl.tensor,
    out_ptr: tl.tensor,
    key_ptr: tl.tensor,
    counters: tl.tensor,
    remaining: tl.tensor,
    threshold: tl.tensor,
    scale_bits: tl.tensor,
    shift_bits: tl.tensor,
    drop_bits: tl.tensor,
    MASKED: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WIDTH: tl.constexpr,
    HOIST: tl.constexpr,
) -> None:
    if HOIST:
        # Every load is issued before Philox runs and before any store: a store may alias a
        # later load (in-place dropout), so the compiler cannot move loads above stores itself,
        # and a thread would otherwise have one group's bytes in flight at a time.
        x0 = _load_group(x_ptr, remaining, 0, MASKED, BLOCK_C, WIDTH)
        if _PER_COUNTER // WIDTH > 1:
            x1 = _load_group(x_ptr, remaining, 1, MASKED, BLOCK_C, WIDTH)
        if _PER_COUNTER // WIDTH > 2:
            x2 = _load_group(x_ptr, remaining, 2, MASKED, BLOCK_C, WIDTH)
            x3 = _load_group(x_ptr, remaining, 3, MASKED, BLOCK_C, WIDTH)
        w0, w1, w2, w3 = _philox_words(key_ptr, counters)
        _masked_affine_group(
            x0, out_ptr, w0, w1, w2, w3, remaining, threshold, scale_bits, shift_bits, drop_bits,
            0, MASKED, HAS_SHIFT, COMPUTE, BLOCK_C, WIDTH,
        )  # fmt: skip
        if _PER_COUNTER // WIDTH > 1:
            _masked_affine_group(
                x1, out_ptr, w0, w1, w2, w3, remaining, threshold, scale_bits, shift_bits, drop_bits,
                1, MASKED, HAS_SHIFT, COMPUTE, BLOCK_C, WIDTH,
            )  # fmt: skip
        if _PER_COUNTER // WIDTH > 2:
            _masked_affine_group(
                x2, out_ptr, w0, w1, w2, w3, remaining, threshold, scale_bits, shift_bits, drop_bits,
                2, MASKED, HAS_SHIFT, COMPUTE, BLOCK_C, WIDTH,
            )  # fmt: skip
            _masked_affine_group(
                x3, out_ptr, w0, w1, w2, w3, remaining, threshold, scale_bits, shift_bits, drop_bits,
                3, MASKED, HAS_SHIFT, COMPUTE, BLOCK_C, WIDTH,
            )  # fmt: skip
    else:
        w0, w1, w2, w3 = _philox_words(key_ptr, counters)
        for group in tl.static_range(_PER_COUNTER // WIDTH):
            x = _load_group(x_ptr, remaining, group, MASKED, BLOCK_C, WIDTH)
            _masked_affine_group(
                x, out_ptr, w0, w1, w2, w3, remaining, threshold, scale_bits, shift_bits, drop_bits,
                group, MASKED, HAS_SHIFT, COMPUTE, BLOCK_C, WIDTH,
            )  # fmt: skip


@triton.jit(do_not_specialize=["n", "threshold"])
def _masked_affine_kernel(
    x_ptr: tl.tensor,
    out_ptr: tl.tensor,
    key_ptr: tl.tensor,
    n: tl.int64,
    threshold: tl.int32,
    scale_bits: tl.int64,
    shift_bits: tl.int64,
    drop_bits: tl.int64,
    HAS_SHIFT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WIDTH: tl.constexpr,
    HOIST: tl.constexpr,
) -> None:
    first_counter = tl.program_id(0).to(tl.int64) * BLOCK_C
    counters = first_counter + tl.arange(0, BLOCK_C)
    base = first_counter * _PER_COUNTER
    remaining = n - base
    x_ptr += base
    out_ptr += base
    if remaining >= BLOCK_C * _PER_COUNTER:
        _masked_affine_block(
            x_ptr, out_ptr, key_ptr, counters, remaining, threshold, scale_bits, shift_bits, drop_bits,
            False, HAS_SHIFT, COMPUTE, BLOCK_C, WIDTH, HOIST,
        )  # fmt: skip
    else:
        _masked_affine_block(
            x_ptr, out_ptr, key_ptr, counters, remaining, threshold, scale_bits, shift_bits, drop_bits,
            True, HAS_SHIFT, COMPUTE, BLOCK_C, WIDTH, HOIST,
        )  # fmt: skip


@triton.jit(do_not_specialize=["n", "threshold"])
def _keep_bytes_kernel(
    key_ptr: tl.tensor, keep_ptr: tl.tensor, n: tl.int64, threshold: tl.int32, BLOCK_C: tl.constexpr
) -> None:
    first_counter = tl.program_id(0).to(tl.int64) * BLOCK_C
    w0, w1, w2, w3 = _philox_words(key_ptr, first_counter + tl.arange(0, BLOCK_C))
    keep = (_draws16(w0, w1, w2, w3, 0, _PER_COUNTER) >= threshold).to(tl.int8)
    base = first_counter * _PER_COUNTER
    local = _group_offsets(BLOCK_C, 0, _PER_COUNTER)
    if base + BLOCK_C * _PER_COUNTER <= n:
        tl.store(keep_ptr + base + local, keep)
    else:
        tl.store(keep_ptr + base + local, keep, mask=local < n - base)


@triton.jit
def _mask_index(
    j: tl.tensor,
    div1: tl.tensor,
    size1: tl.tensor,
    stride1: tl.tensor,
    div2: tl.tensor,
    size2: tl.tensor,
    stride2: tl.tensor,
    NUM_RUNS: tl.constexpr,
    WRAP1: tl.constexpr,
) -> tl.tensor:
    # Each run of kept dims contributes its coordinate times its stride in the mask; runs of
    # broadcast dims contribute nothing.
    if NUM_RUNS == 0:
        m = j
    else:
        m = j // div1
        if WRAP1:
            m = m % size1
        m = m * stride1
        if NUM_RUNS == 2:
            m = m + (j // div2) % size2 * stride2
    return m


@triton.jit(do_not_specialize=["n"])
def _masked_affine_gather_kernel(
    x_ptr: tl.tensor,
    out_ptr: tl.tensor,
    keep_ptr: tl.tensor,
    n: tl.int64,
    div1: tl.tensor,
    size1: tl.tensor,
    stride1: tl.tensor,
    div2: tl.tensor,
    size2: tl.tensor,
    stride2: tl.tensor,
    scale_bits: tl.int64,
    shift_bits: tl.int64,
    drop_bits: tl.int64,
    NUM_RUNS: tl.constexpr,
    WRAP1: tl.constexpr,
    WIDE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
) -> None:
    if WIDE:
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = _mask_index(j, div1, size1, stride1, div2, size2, stride2, NUM_RUNS, WRAP1)
    if tl.program_id(0).to(tl.int64) * BLOCK + BLOCK <= n:
        keep = tl.load(keep_ptr + m) != 0
        y = _affine(tl.load(x_ptr + j), keep, scale_bits, shift_bits, drop_bits, HAS_SHIFT, COMPUTE)
        _store_rounded(out_ptr + j, y, None)
    else:
        in_bounds = j < n
        keep = tl.load(keep_ptr + m, mask=in_bounds, other=0) != 0
        x = tl.load(x_ptr + j, mask=in_bounds)
        y = _affine(x, keep, scale_bits, shift_bits, drop_bits, HAS_SHIFT, COMPUTE)
        _store_rounded(out_ptr + j, y, in_bounds)


@triton.jit
def _bias_dropout_add_block(
    x_ptr: tl.tensor,
    bias_ptr: tl.tensor,
    residual_ptr: tl.tensor,
    out_ptr: tl.tensor,
    w0: tl.tensor,
    w1: tl.tensor,
    w2: tl.tensor,
    w3: tl.tensor,
    remaining: tl.tensor,
    base_column: tl.tensor,
    columns: tl.tensor,
    threshold: tl.tensor,
    scale: tl.tensor,
    MASKED: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WIDTH: tl.constexpr,
) -> None:
    for group in tl.static_range(_PER_COUNTER // WIDTH):
        local = _group_offsets(BLOCK_C, group * WIDTH, WIDTH)
        keep = _draws16(w0, w1, w2, w3, group * WIDTH, WIDTH) >= threshold
        mask = local < remaining if MASKED else None
        x = _widen(tl.load(x_ptr + local, mask=mask), COMPUTE)
        bias = _widen(tl.load(bias_ptr + (base_column + local) % columns, mask=mask), COMPUTE)
        residual = _widen(tl.load(residual_ptr + local, mask=mask), COMPUTE)
        _store_rounded(out_ptr + local, residual + tl.where(keep, (x + bias) * scale, 0.0), mask)


@triton.jit(do_not_specialize=["n", "threshold"])
def _bias_dropout_add_kernel(
    x_ptr: tl.tensor,
    bias_ptr: tl.tensor,
    residual_ptr: tl.tensor,
    out_ptr: tl.tensor,
    key_ptr: tl.tensor,
    n: tl.int64,
    hidden: tl.int64,
    threshold: tl.int32,
    scale_bits: tl.int64,
    COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WIDTH: tl.constexpr,
    WIDE_COLUMN: tl.constexpr,
) -> None:
    first_counter = tl.program_id(0).to(tl.int64) * BLOCK_C
    w0, w1, w2, w3 = _philox_words(key_ptr, first_counter + tl.arange(0, BLOCK_C))
    base = first_counter * _PER_COUNTER
    remaining = n - base
    # One int64 modulo per program, then 32-bit ones unless the last dim is too long for them.
    if WIDE_COLUMN:
        base_column = base % hidden
        columns = hidden
    else:
        base_column = (base % hidden).to(tl.int32)
        columns = hidden.to(tl.int32)
    scale = _from_bits(scale_bits, COMPUTE)
    x_ptr += base
    residual_ptr += base
    out_ptr += base
    if remaining >= BLOCK_C * _PER_COUNTER:
        _bias_dropout_add_block(
            x_ptr, bias_ptr, residual_ptr, out_ptr, w0, w1, w2, w3, remaining, base_column, columns,
            threshold, scale, False, COMPUTE, BLOCK_C, WIDTH,
        )  # fmt: skip
    else:
        _bias_dropout_add_block(
            x_ptr, bias_ptr, residual_ptr, out_ptr, w0, w1, w2, w3, remaining, base_column, columns,
            threshold, scale, True, COMPUTE, BLOCK_C, WIDTH,
        )  # fmt: skip


@triton.jit
def _philox_block_kernel(
    key_ptr: tl.tensor, out_ptr: tl.tensor, first: tl.int64, count: tl.int64, BLOCK: tl.constexpr
) -> None:
    offsets = tl.arange(0, BLOCK)
    w0, w1, w2, w3 = _philox_words(key_ptr, first.to(tl.int64) + offsets)
    valid = offsets < count
    # Stored as int64 in [0, 2**32), the reference's representation of a word.
    tl.store(out_ptr + offsets * 4, w0.to(tl.int64), mask=valid)
    tl.store(out_ptr + offsets * 4 + 1, w1.to(tl.int64), mask=valid)
    tl.store(out_ptr + offsets * 4 + 2, w2.to(tl.int64), mask=valid)
    tl.store(out_ptr + offsets * 4 + 3, w3.to(tl.int64), mask=valid)


# ---------------------------------------------------------------------------------------------
# Host code
# ---------------------------------------------------------------------------------------------


def _programs(numel: int, block_counters: int) -> int:
    """Programs of ``block_counters`` counters (8 elements each) that cover ``numel`` elements.

    Plain integer arithmetic: ``triton.cdiv`` is a jit function, and calling one from the host
    goes through Triton's launcher machinery (microseconds per call on every dropout call).
    """
    return -(-numel // (_ELEMENTS_PER_COUNTER * block_counters))


def _float_bits(value: float) -> int:
    """The float64 bit pattern of ``value`` as a signed int64."""
    (bits,) = struct.unpack("<q", struct.pack("<d", float(value)))
    return int(bits)


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    # Triton launches on the current CUDA device, not on the tensors' device.  Switching costs
    # a few microseconds per call, so only when the tensors live on another device.
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_key(key: torch.Tensor, device: torch.device) -> torch.Tensor:
    if key.dtype != torch.int64 or key.numel() != 3:
        raise ValueError(
            f"key must be an int64 tensor [seed, stream, step], got {key.dtype} {tuple(key.shape)}"
        )
    if key.device != device:
        raise ValueError(f"key is on {key.device} but the input is on {device}")
    return key.reshape(3).contiguous()


def _check_dtype(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _group_width(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in one 16-byte vector access (the widest a thread issues)."""
    return min(_ELEMENTS_PER_COUNTER, 16 // dtype.itemsize)


def vector_width(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in one 16-byte vector access (the widest tile row a tuning run
    should compare against; see ``launch_overrides(tile_width=)``)."""
    return _group_width(dtype)


def launch_unchecked(
    x: torch.Tensor, out: torch.Tensor, key: torch.Tensor, threshold: int, keep_scale: float
) -> None:
    """The bare launch of the element-mask kernel on contiguous ``x`` into ``out``: no argument
    checks, no device guard, no output allocation.  For measuring launch overhead only
    (``benchmarks/bench_triton.py``); use :func:`masked_affine` everywhere else."""
    numel = x.numel()
    block_c = _config.block_counters
    _masked_affine_kernel[(_programs(numel, block_c),)](
        x, out, key, numel, threshold, _float_bits(keep_scale), _float_bits(0.0), _float_bits(0.0),
        HAS_SHIFT=False, COMPUTE=_compute(x.dtype), BLOCK_C=block_c, WIDTH=_tile_width(x.dtype),
        HOIST=_config.hoist_loads, **_launch_options(),
    )  # fmt: skip


def _tile_width(dtype: torch.dtype) -> int:
    """Default tile row of _masked_affine_kernel: a whole counter (8 elements) up to 4-byte dtypes.

    Measured on an H100 (benchmarks/RESULTS.md): for float32, full rows reach ~89 % of copy
    bandwidth at 256M elements against ~60 % for two tiles of 16-byte half rows.  float64 keeps
    16-byte rows (4 groups): not measured.
    """
    return _ELEMENTS_PER_COUNTER if dtype.itemsize <= 4 else _group_width(dtype)


def _launch_options() -> dict[str, Any]:
    return {"num_warps": _config.num_warps, "enable_fp_fusion": False}


def _compute(dtype: torch.dtype) -> Any:
    return _TRITON_DTYPES[compute_dtype(dtype)]


def _finish(x: torch.Tensor, flat_out: torch.Tensor) -> torch.Tensor:
    """``flat_out`` (logical row-major values of ``x``'s shape) laid out like ``empty_like(x)``."""
    if x.is_contiguous():
        return flat_out.view(x.shape)
    out = torch.empty_like(x)
    out.copy_(flat_out.view(x.shape))
    return out


def _kept_runs(shape: Sequence[int], keep_shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(div, size, stride)`` of each run of kept dims, outermost first.

    Size-1 dims are dropped and adjacent dims of the same kind merged; a kept run at element
    index ``j`` has coordinate ``(j // div) % size`` and stride ``stride`` in the mask.
    """
    runs: list[list[Any]] = []  # [size, kept]
    for size, mask_size in zip(shape, keep_shape, strict=True):
        if size == 1:
            continue
        kept = mask_size != 1
        if runs and runs[-1][1] == kept:
            runs[-1][0] *= size
        else:
            runs.append([size, kept])
    result: list[tuple[int, int, int]] = []
    div = stride = 1
    for size, kept in reversed(runs):
        if kept:
            result.append((div, size, stride))
            stride *= size
        div *= size
    result.reverse()
    return result


def philox_block(key: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Triton's Philox words for counters ``first .. first + count - 1``: int64 ``[count, 4]``.

    A probe of the bit source the kernels share, to compare with the reference ``philox4x32``
    (one program: meant for small counts).  ``first`` is an int64 (a negative one is the
    counter with the same low 64 bits).
    """
    key = _check_key(key, key.device)
    out = torch.empty(count, 4, dtype=torch.int64, device=key.device)
    if count == 0:
        return out
    block = triton.next_power_of_2(count)
    with _device_guard(key.device):
        _philox_block_kernel[(1,)](key, out, first, count, BLOCK=block)
    return out


def masked_affine(
    x: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    broadcast_dims: Sequence[int],
    keep_scale: float,
    keep_shift: float,
    drop_value: float,
) -> torch.Tensor:
    """``where(keep, x * keep_scale [+ keep_shift], drop_value)``, the bits of the reference op
    (``keep``: the 16-bit draw is at least ``threshold``, a run-time kernel argument).

    The backward of the op is this function on the gradient with ``keep_shift = drop_value = 0``.
    """
    _check_dtype(x)
    key = _check_key(key, x.device)
    n = x.numel()
    if n == 0:
        return torch.empty_like(x)
    keep_shape = mask_shape(x.shape, list(broadcast_dims))
    flat = x.contiguous().view(-1)
    flat_out = torch.empty_like(flat)
    affine = {
        "scale_bits": _float_bits(keep_scale),
        "shift_bits": _float_bits(keep_shift),
        "drop_bits": _float_bits(drop_value),
        "HAS_SHIFT": keep_shift != 0.0,
        "COMPUTE": _compute(x.dtype),
    }
    block_c = _config.block_counters
    with _device_guard(x.device):
        if math.prod(keep_shape) == n:
            grid = (_programs(n, block_c),)
            _masked_affine_kernel[grid](
                flat,
                flat_out,
                key,
                n,
                threshold,
                **affine,
                BLOCK_C=block_c,
                WIDTH=_config.tile_width or _tile_width(x.dtype),
                HOIST=_config.hoist_loads,
                **_launch_options(),
            )
        else:
            _gather_apply(flat, flat_out, key, threshold, x.shape, keep_shape, affine)
    return _finish(x, flat_out)


def _gather_apply(
    flat: torch.Tensor,
    flat_out: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    shape: Sequence[int],
    keep_shape: Sequence[int],
    affine: dict[str, Any],
) -> None:
    # The mask is drawn once at its own (smaller) size, then read per element: drawing it per
    # element would cost a full Philox block for every element instead of one per 8 mask entries.
    n = flat.numel()
    keep_numel = math.prod(keep_shape)
    block_c = _config.block_counters
    keep = torch.empty(keep_numel, dtype=torch.int8, device=flat.device)
    grid = (_programs(keep_numel, block_c),)
    _keep_bytes_kernel[grid](key, keep, keep_numel, threshold, BLOCK_C=block_c, num_warps=_config.num_warps)
    runs = _kept_runs(shape, keep_shape)
    if not runs:
        # Every dim broadcast: a single draw, read through a zero stride.
        runs = [(1, 1, 0)]
    if len(runs) > 2:
        # Three or more separate runs of kept dims: expand with torch and read one flag per element.
        keep = keep.view(tuple(keep_shape)).expand(tuple(shape)).contiguous().view(-1)
        runs = []
    (div1, size1, stride1), (div2, size2, stride2) = (runs + [(1, 1, 0)] * 2)[:2]
    block = block_c * _ELEMENTS_PER_COUNTER
    _masked_affine_gather_kernel[(-(-n // block),)](
        flat,
        flat_out,
        keep,
        n,
        div1,
        size1,
        stride1,
        div2,
        size2,
        stride2,
        **affine,
        NUM_RUNS=len(runs),
        # The outermost run needs no wrap-around unless broadcast dims lie outside it.
        WRAP1=bool(runs) and div1 * size1 != n,
        WIDE=_config.force_wide_index or n + block > _INT32_LIMIT,
        BLOCK=block,
        **_launch_options(),
    )


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    keep_scale: float,
) -> torch.Tensor:
    """``residual + where(keep, (x + bias) * keep_scale, 0)`` with one rounding to ``x.dtype``.

    ``bias`` has shape ``(x.shape[-1],)`` and ``residual`` broadcasts to ``x``'s shape; either may
    have any supported float dtype (each is converted exactly, or rounded once for float64 into
    float32, as the reference's ``.to(compute)``).  The mask is the full-size mask of ``x``.
    Arithmetic is float32, or float64 for float64 ``x``.  Inputs the reference engine accepts
    must not raise here: the dispatcher treats an exception as a broken backend.
    """
    for name, tensor in (("x", x), ("bias", bias), ("residual", residual)):
        _check_dtype(tensor, name)
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if x.dim() == 0 or tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(
            f"bias must have shape (x.shape[-1],), got {tuple(bias.shape)} for x {tuple(x.shape)}"
        )
    if residual.shape != x.shape:
        try:
            residual = residual.expand(x.shape)
        except RuntimeError as error:
            raise ValueError(
                f"residual shape {tuple(residual.shape)} does not broadcast to x shape {tuple(x.shape)}"
            ) from error
    key = _check_key(key, x.device)
    n = x.numel()
    if n == 0:
        return torch.empty_like(x)
    block_c = _config.block_counters
    hidden = x.shape[-1]
    flat = x.contiguous().view(-1)
    flat_out = torch.empty_like(flat)
    grid = (_programs(n, block_c),)
    with _device_guard(x.device):
        _bias_dropout_add_kernel[grid](
            flat,
            bias.contiguous(),
            residual.contiguous().view(-1),
            flat_out,
            key,
            n,
            hidden,
            threshold,
            _float_bits(keep_scale),
            COMPUTE=_compute(x.dtype),
            BLOCK_C=block_c,
            WIDTH=_group_width(x.dtype),
            WIDE_COLUMN=_config.force_wide_index or hidden + block_c * _ELEMENTS_PER_COUNTER > _INT32_LIMIT,
            **_launch_options(),
        )
    return _finish(x, flat_out)
