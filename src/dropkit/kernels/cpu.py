"""Fused, multi-threaded CPU kernels (numba) for dropkit's mask ops, bit for bit the reference.

The bits follow the contract of :mod:`dropkit.engine.masks`: element ``j`` of the mask shape reads
the 16-bit half ``j % 2`` of Philox4x32-10 output word ``(j // 2) % 4`` at counter ``j // 8``.
Arithmetic follows :func:`dropkit.engine.reference.masked_affine`: float32 (float64 for
float64 inputs), constants rounded once to that dtype, no fused multiply-add, one rounding to the
output dtype.  bfloat16 and float16 travel as ``uint16`` / ``int16`` bit patterns (numba has no
CPU half types) and are converted with exact round-to-nearest-even integer code.

How the work is laid out:

* Work is split into *tasks*, each owning whole Philox counters of a run of mask elements, so the
  bits never depend on how tasks are spread over threads: any thread count gives the same output.
* Dims are first coalesced (adjacent dims that are contiguous in the input, output, bias,
  residual *and* mask merge), so a contiguous tensor is a single run and a channels-last one is a
  batch of 2-D transposes ``(C, H*W)`` stored as ``(H*W, C)``.
* *Row mode*: when the output's innermost memory dim is the logical innermost dim, a task is a
  run of up to 8192 elements; it writes the Philox words of its counters into a 16 KiB buffer
  whose little-endian ``uint16`` view is exactly the element order, then applies the mask in one
  pass.  Both loops vectorize (AVX-512 on this hardware).
* *Tile mode* (channels-last and other permuted layouts): a task is a tile of 64 memory-inner by
  128 logical-inner elements; the bits of each logical run are generated, transposed into memory
  order in an L1-resident buffer and applied with unit-stride loads and stores.
* Broadcast (channel, time-tied, token) masks are small: their bits are generated once into a
  table of ``mask numel`` 16-bit draws and gathered through the mask strides.

Compiled code is cached on disk (``cache=True``) so only the first process on a machine pays the
compile; :func:`_configure_cache_dir` picks a writable location first.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dropkit.engine.masks import mask_shape
from dropkit.engine.numerics import THRESHOLD_SCALE
from dropkit.kernels.dispatch import KernelArgumentError


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError:
        return False
    return True


def _private_dir(directory: Path) -> bool:
    """Whether ``directory`` is safe to load numba's cache from, creating it (mode 0700) if missing.

    numba's cache index is a pickle: loading a directory that another local user can write (or
    planted before us at a predictable name, ``/tmp/dropkit-numba-<uid>``) would run their code.
    Safe means: a real directory, not a symlink, owned by the current user, not writable by the
    group or others, and writable by us.  Where the platform has no uids (Windows) the per-user
    locations are private already, and only writability is checked.
    """
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        info = os.lstat(directory)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    getuid = getattr(os, "getuid", None)
    if getuid is not None and (info.st_uid != getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        return False
    return _writable(directory)


def _configure_cache_dir() -> None:
    """Point numba's cache at a writable directory before any ``cache=True`` function is built.

    numba caches next to the source (``__pycache__``); in a read-only install (site-packages owned
    by root, a container image) it would fail to cache, and every process would recompile.  The
    fallbacks, ``$XDG_CACHE_HOME/dropkit/numba`` then ``<tmp>/dropkit-numba-<uid>``, are used only
    when :func:`_private_dir` accepts them; with neither, numba's own default applies.  An
    explicit ``NUMBA_CACHE_DIR`` from the user always wins.
    """
    import numba

    if os.environ.get("NUMBA_CACHE_DIR") or _writable(Path(__file__).parent / "__pycache__"):
        return
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    getuid = getattr(os, "getuid", None)
    candidates = [
        Path(base) / "dropkit" / "numba",
        Path(tempfile.gettempdir()) / f"dropkit-numba-{getuid() if getuid is not None else 'user'}",
    ]
    for candidate in candidates:
        if _private_dir(candidate):
            numba.config.CACHE_DIR = str(candidate)  # type: ignore[attr-defined]
            return
    # Neither is private: leave numba's own locators to decide (its per-user cache directory);
    # a predictable shared path is never used just because it happens to be writable.


_configure_cache_dir()

import numba  # noqa: E402  (after the cache directory is chosen)
from numba import prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

__all__ = ["SUPPORTED_DTYPES", "bias_dropout_add", "masked_affine", "name", "philox_words", "run_parallel"]

name = "numba"

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Philox4x32 constants (Random123 / Triton) as uint64: numba promotes mixed signed/unsigned
# 64-bit integer arithmetic to float64, so every operand of the bit twiddling stays unsigned.
_M32 = np.uint64(0xFFFFFFFF)
_S16 = np.uint64(16)
_S32 = np.uint64(32)
_PM0 = np.uint64(0xD2511F53)
_PM1 = np.uint64(0xCD9E8D57)
_PW0 = np.uint64(0x9E3779B9)
_PW1 = np.uint64(0xBB67AE85)
_UNIFORM_SCALE = 2.0**-24  # Box-Muller uniforms: the top 24 bits of a word, centred
_THRESHOLD_SCALE = THRESHOLD_SCALE

# Row mode: 8192 elements = 1024 counters a task; the word buffer (16 KiB) stays in L1.
_ROW_ELEMENTS = 8192
# Tile mode: 64 memory-inner x 128 logical-inner elements; bits and transposed bits ~ 35 KiB.
_TILE_INNER = 64
_TILE_RUN = 128
# A memory-inner dim shorter than this is not worth a tile: rows with a strided store win.
_MIN_TILE_INNER = 16
# Below this many elements a thread launch costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 15

# Layout of the int64 parameter vector handed to the kernels (the layout of a call, cached; the
# rate's threshold and constants are run-time arguments, so a rate schedule re-plans nothing).
_P_TILE_INNER, _P_TILE_RUN, _P_USE_TABLE = 0, 1, 2
_P_HAS_BIAS, _P_HAS_RESIDUAL, _P_TASKS, _P_PARTS = 3, 4, 5, 6
# Then the spans (elements from the first to the last one touched) of x, bias, residual, output.
_P_SPANS = 7
# Columns of the per-dim geometry rows: size, then strides of x, bias, residual, output, mask.
_SIZE, _XS, _BS, _RS, _YS, _MS = 0, 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------------------------
# Scalar conversions between storage and compute types.  ``_widen`` / ``_narrow`` are resolved by
# type at compile time (numba ``overload``), so one kernel source serves every dtype.


@numba.njit(cache=True)
def _bf16_to_f32(v: Any) -> Any:
    return np.uint32(np.uint64(v) << _S16).view(np.float32)


@numba.njit(cache=True)
def _f32_to_bf16(v: Any) -> Any:
    u = np.uint64(np.float32(v).view(np.uint32))
    if (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000):
        # NaN: keep sign and top payload bits, force quiet (round-to-nearest could carry into inf).
        return np.uint16((u >> _S16) | np.uint64(0x0040))
    return np.uint16((u + np.uint64(0x7FFF) + ((u >> _S16) & np.uint64(1))) >> _S16)


@numba.njit(cache=True)
def _f16_to_f32(v: Any) -> Any:
    h = np.uint64(v) & np.uint64(0xFFFF)
    sign = (h & np.uint64(0x8000)) << _S16
    exponent = (h >> np.uint64(10)) & np.uint64(0x1F)
    mantissa = h & np.uint64(0x3FF)
    if exponent == np.uint64(0):
        # Subnormal half: mantissa * 2**-24 is exact in float32.
        magnitude = np.float32(mantissa) * np.float32(2.0**-24)
        bits = np.uint64(np.float32(magnitude).view(np.uint32)) | sign
    elif exponent == np.uint64(0x1F):
        bits = sign | np.uint64(0x7F800000) | (mantissa << np.uint64(13))
    else:
        bits = sign | ((exponent + np.uint64(112)) << np.uint64(23)) | (mantissa << np.uint64(13))
    return np.uint32(bits).view(np.float32)


@numba.njit(cache=True)
def _f32_to_f16(v: Any) -> Any:
    # Round-to-nearest-even float32 -> binary16 on the bit pattern (the algorithm of NumPy's
    # npy_floatbits_to_halfbits), exact for normals, subnormals, overflow, inf and NaN.
    f = np.uint64(np.float32(v).view(np.uint32))
    sign = (f & np.uint64(0x80000000)) >> _S16
    f_exp = f & np.uint64(0x7F800000)
    f_sig = f & np.uint64(0x007FFFFF)
    if f_exp >= np.uint64(0x47800000):
        if f_exp == np.uint64(0x7F800000) and f_sig != np.uint64(0):
            # NaN: quiet, keep the top payload bits (what the hardware vcvtps2ph does).
            return np.int16(sign | np.uint64(0x7E00) | (f_sig >> np.uint64(13)))
        return np.int16(sign | np.uint64(0x7C00))  # inf, or overflow to inf
    if f_exp <= np.uint64(0x38000000):
        if f_exp < np.uint64(0x33000000):
            return np.int16(sign)  # below half the smallest subnormal: signed zero
        shift = np.uint64(113) - (f_exp >> np.uint64(23))
        sig = (np.uint64(0x00800000) + f_sig) >> shift
        # Ties to even: the bits shifted out by ``shift`` and the 13 below the half mantissa.
        if ((sig & np.uint64(0x3FFF)) != np.uint64(0x1000)) or (
            (f_sig & ((np.uint64(1) << shift) - np.uint64(1))) != np.uint64(0)
        ):
            sig = sig + np.uint64(0x1000)
        return np.int16(sign | (sig >> np.uint64(13)))
    h_exp = (f_exp - np.uint64(0x38000000)) >> np.uint64(13)
    sig = f_sig
    if (sig & np.uint64(0x3FFF)) != np.uint64(0x1000):
        sig = sig + np.uint64(0x1000)
    # A carry out of the mantissa bumps the exponent, possibly to inf: the correct rounding.
    return np.int16(sign | (h_exp + (sig >> np.uint64(13))))


def _widen(v: Any) -> Any:
    """Storage scalar -> compute scalar (float32, or float64 for float64); numba-only."""
    raise NotImplementedError("_widen is resolved by numba at compile time")


def _narrow(v: Any, like: Any) -> Any:
    """Compute scalar -> storage scalar of the array ``like``, one rounding; numba-only."""
    raise NotImplementedError("_narrow is resolved by numba at compile time")


@overload(_widen)
def _widen_overload(v: Any) -> Any:
    # The implementations repeat the stub's annotated signature: numba checks that they match.
    if v in (types.float32, types.float64):

        def same(v: Any) -> Any:
            return v

        return same
    if v == types.uint16:

        def from_bf16(v: Any) -> Any:
            return _bf16_to_f32(v)

        return from_bf16
    if v == types.int16:

        def from_f16(v: Any) -> Any:
            return _f16_to_f32(v)

        return from_f16
    return None


def _in_compute(v: Any, like: Any) -> Any:
    """A float64 constant rounded once to the compute type of the array ``like``; numba-only."""
    raise NotImplementedError("_in_compute is resolved by numba at compile time")


@overload(_in_compute)
def _in_compute_overload(v: Any, like: Any) -> Any:
    if like.dtype == types.float64:

        def as_float64(v: Any, like: Any) -> Any:
            return np.float64(v)

        return as_float64

    def as_float32(v: Any, like: Any) -> Any:
        return np.float32(v)

    return as_float32


@overload(_narrow)
def _narrow_overload(v: Any, like: Any) -> Any:
    dtype = like.dtype
    if dtype in (types.float32, types.float64):

        def same(v: Any, like: Any) -> Any:
            return v

        return same
    if dtype == types.uint16:

        def to_bf16(v: Any, like: Any) -> Any:
            return _f32_to_bf16(v)

        return to_bf16
    if dtype == types.int16:

        def to_f16(v: Any, like: Any) -> Any:
            return _f32_to_f16(v)

        return to_f16
    return None


# ----------------------------------------------------------------------------------------------
# Kernels.


@numba.njit(cache=True, nogil=True)
def philox_words(words: Any, start: int, first_counter: int, count: int, key: Any) -> None:
    """Philox4x32-10 of counters ``first_counter ..`` into ``words[start + 4*j + w]`` (a numba
    function: call it from other numba kernels that need the engine's bits, as the UCI
    experiment's fused kernels do).

    ``key`` is the int64 key ``[seed, stream, step]``: Philox key ``(seed lo, seed hi)``, counter
    words 2 and 3 ``stream`` and ``step`` (the int64 -> uint64 casts keep the bits of a negative
    seed, as the reference's ``& 0xFFFFFFFF`` does)."""
    out = words[start : start + 4 * count]
    seed = np.uint64(key[0])
    # Masking tells LLVM the words fit in 32 bits, so every multiply is a 32x32->64 vpmuludq.
    k0 = seed & _M32
    k1 = (seed >> _S32) & _M32
    c2 = np.uint64(key[1]) & _M32
    c3 = np.uint64(key[2]) & _M32
    for j in range(count):
        counter = np.uint64(first_counter + j)
        a0 = counter & _M32
        a1 = counter >> _S32
        a2 = c2
        a3 = c3
        r0 = k0
        r1 = k1
        for _ in range(10):
            p0 = a0 * _PM0
            p1 = a2 * _PM1
            a0, a1, a2, a3 = (p1 >> _S32) ^ a1 ^ r0, p1 & _M32, (p0 >> _S32) ^ a3 ^ r1, p0 & _M32
            r0 = (r0 + _PW0) & _M32
            r1 = (r1 + _PW1) & _M32
        out[4 * j] = np.uint32(a0)
        out[4 * j + 1] = np.uint32(a1)
        out[4 * j + 2] = np.uint32(a2)
        out[4 * j + 3] = np.uint32(a3)


@numba.njit(cache=True, nogil=True)
def box_muller_uniforms(for_radius: Any, for_angle: Any, first_counter: int, count: int, key: Any) -> None:
    """The engine's Box-Muller uniforms ``((w >> 8) + 0.5) * 2**-24`` of counters
    ``first_counter ..``: words 0 and 2 into ``for_radius[2j], [2j + 1]``, words 1 and 3 into
    ``for_angle`` (float32 or float64 arrays of ``2 * count``).  Computed in float64, where it is
    exact, and rounded once when stored: the bits of the tensor ops' float32 arithmetic."""
    words = np.empty(4 * count, np.uint32)
    philox_words(words, 0, first_counter, count, key)
    for j in range(count):
        for pair in range(2):
            for_radius[2 * j + pair] = (np.float64(words[4 * j + 2 * pair] >> 8) + 0.5) * _UNIFORM_SCALE
            for_angle[2 * j + pair] = (np.float64(words[4 * j + 2 * pair + 1] >> 8) + 0.5) * _UNIFORM_SCALE


@numba.njit(cache=True, nogil=True)
def _apply(
    x: Any,
    xo: int,
    xs: int,
    b: Any,
    bo: int,
    bs: int,
    r: Any,
    ro: int,
    rs: int,
    y: Any,
    yo: int,
    ys: int,
    n: int,
    bits: Any,
    ko: int,
    ks: int,
    threshold: int,
    scale: Any,
    shift: Any,
    drop: Any,
    has_shift: bool,
    has_bias: bool,
    has_residual: bool,
) -> None:
    """``y = [r +] where(bits >= threshold, ([x + b]) * scale [+ shift], drop)`` on ``n`` elements."""
    if xs == 1 and ys == 1 and ks == 1 and not has_bias and not has_residual:
        # Slices give the loop zero-based indices that LLVM can prove non-negative: it vectorizes.
        xv = x[xo : xo + n]
        yv = y[yo : yo + n]
        kv = bits[ko : ko + n]
        for e in range(n):
            v = _widen(xv[e]) * scale
            if has_shift:
                v = v + shift
            if kv[e] < threshold:
                v = drop
            yv[e] = _narrow(v, yv)
    elif xs == 1 and ys == 1 and ks == 0 and not has_bias and not has_residual:
        # One draw for the whole run (a channel mask broadcast over a feature map): the branch
        # leaves the loop, and each side is a plain vectorized fill or scale.
        xv = x[xo : xo + n]
        yv = y[yo : yo + n]
        if bits[ko] < threshold:
            dropped = _narrow(drop, yv)
            for e in range(n):
                yv[e] = dropped
        else:
            for e in range(n):
                v = _widen(xv[e]) * scale
                if has_shift:
                    v = v + shift
                yv[e] = _narrow(v, yv)
    elif xs == 1 and ys == 1 and ks == 1 and bs == 1 and rs == 1 and has_bias and has_residual:
        xv = x[xo : xo + n]
        bv = b[bo : bo + n]
        rv = r[ro : ro + n]
        yv = y[yo : yo + n]
        kv = bits[ko : ko + n]
        for e in range(n):
            v = (_widen(xv[e]) + _widen(bv[e])) * scale
            if has_shift:
                v = v + shift
            if kv[e] < threshold:
                v = drop
            yv[e] = _narrow(_widen(rv[e]) + v, yv)
    else:
        for e in range(n):
            v = _widen(x[xo + e * xs])
            if has_bias:
                v = v + _widen(b[bo + e * bs])
            v = v * scale
            if has_shift:
                v = v + shift
            if bits[ko + e * ks] < threshold:
                v = drop
            if has_residual:
                v = _widen(r[ro + e * rs]) + v
            y[yo + e * ys] = _narrow(v, y)


@numba.njit(cache=True, nogil=True)
def _run_part(
    x: Any,
    b: Any,
    r: Any,
    y: Any,
    table: Any,
    outer: Any,
    plane: Any,
    params: Any,
    key: Any,
    scale: Any,
    shift: Any,
    drop: Any,
    threshold: int,
    has_shift: bool,
    part: int,
    parts: int,
) -> None:
    """Run tasks ``[part * tasks // parts, (part + 1) * tasks // parts)``; see the module docs."""
    # The constants arrive as Python floats (cheap to pass) and are rounded once, here.
    scale = _in_compute(scale, y)
    shift = _in_compute(shift, y)
    drop = _in_compute(drop, y)
    tile_inner = params[_P_TILE_INNER]
    tile_run = params[_P_TILE_RUN]
    use_table = params[_P_USE_TABLE] != 0
    has_bias = params[_P_HAS_BIAS] != 0
    has_residual = params[_P_HAS_RESIDUAL] != 0
    tasks = params[_P_TASKS]
    # At p = 0 and p = 1 the comparison does not depend on the bits: skip generating them.
    need_bits = 0 < threshold < _THRESHOLD_SCALE
    tile_mode = tile_inner > 1

    n_inner = plane[0, _SIZE]
    n_run = plane[1, _SIZE]
    inner_tiles = (n_inner + tile_inner - 1) // tile_inner
    run_tiles = (n_run + tile_run - 1) // tile_run
    capacity = tile_run // 8 + 2  # counters touched by a run of tile_run elements, any alignment
    words = np.zeros(tile_inner * capacity * 4, np.uint32)
    words16 = words.view(np.uint16)
    transposed = np.zeros(tile_inner * tile_run if tile_mode else 1, np.uint16)
    n_outer = outer.shape[0]

    for task in range(part * tasks // parts, (part + 1) * tasks // parts):
        inner_tile = task % inner_tiles
        rest = task // inner_tiles
        run_tile = rest % run_tiles
        rest = rest // run_tiles
        i0 = inner_tile * tile_inner
        l0 = run_tile * tile_run
        ni = min(tile_inner, n_inner - i0)
        nl = min(tile_run, n_run - l0)
        xo = i0 * plane[0, _XS] + l0 * plane[1, _XS]
        bo = i0 * plane[0, _BS] + l0 * plane[1, _BS]
        ro = i0 * plane[0, _RS] + l0 * plane[1, _RS]
        yo = i0 * plane[0, _YS] + l0 * plane[1, _YS]
        mo = i0 * plane[0, _MS] + l0 * plane[1, _MS]
        for d in range(n_outer - 1, -1, -1):
            index = rest % outer[d, _SIZE]
            rest = rest // outer[d, _SIZE]
            xo += index * outer[d, _XS]
            bo += index * outer[d, _BS]
            ro += index * outer[d, _RS]
            yo += index * outer[d, _YS]
            mo += index * outer[d, _MS]

        if not tile_mode:
            if not need_bits:
                # The comparison ignores the (stale) buffer; unit stride keeps the fast loop.
                source, ko, ks = words16, 0, 1
            elif use_table:
                source, ko, ks = table, mo, plane[1, _MS]
            else:
                first = mo >> 3
                philox_words(words, 0, first, ((mo + nl - 1) >> 3) - first + 1, key)
                source, ko, ks = words16, mo - 8 * first, 1
            _apply(
                x, xo, plane[1, _XS], b, bo, plane[1, _BS], r, ro, plane[1, _RS], y, yo, plane[1, _YS],
                nl, source, ko, ks, threshold, scale, shift, drop, has_shift, has_bias, has_residual,
            )  # fmt: skip
            continue

        if not need_bits:
            source, k_base, k_inner, k_run = transposed, 0, 1, tile_inner
        elif use_table:
            source, k_base, k_inner, k_run = table, mo, plane[0, _MS], plane[1, _MS]
        else:
            for ii in range(ni):
                m0 = mo + ii * plane[0, _MS]
                first = m0 >> 3
                philox_words(words, ii * capacity * 4, first, ((m0 + nl - 1) >> 3) - first + 1, key)
                run = words16[ii * capacity * 8 + m0 - 8 * first : ii * capacity * 8 + m0 - 8 * first + nl]
                for ll in range(nl):
                    transposed[ll * tile_inner + ii] = run[ll]
            source, k_base, k_inner, k_run = transposed, 0, 1, tile_inner
        for ll in range(nl):
            _apply(
                x, xo + ll * plane[1, _XS], plane[0, _XS], b, bo + ll * plane[1, _BS], plane[0, _BS],
                r, ro + ll * plane[1, _RS], plane[0, _RS], y, yo + ll * plane[1, _YS], plane[0, _YS],
                ni, source, k_base + ll * k_run, k_inner, threshold, scale, shift, drop,
                has_shift, has_bias, has_residual,
            )  # fmt: skip


def _pointer_typing(typingctx: Any, address: Any, like: Any) -> Any:
    """``_pointer(address, like)``: the integer ``address`` as a pointer to elements of the dtype
    of the array ``like`` (a numba intrinsic: callable from numba code only)."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


_pointer: Any = intrinsic(_pointer_typing)


_KEY_LIKE = np.empty(0, dtype=np.int64)


@numba.njit(cache=True, nogil=True)
def _arrays(x_at: int, b_at: int, r_at: int, y_at: int, like: Any, params: Any, key_at: int) -> Any:
    """The tensors of a launch as arrays over their memory: the host passes data pointers, which
    cost a tenth of a NumPy view each (the tensors stay alive in the host's frame meanwhile)."""
    return (
        numba.carray(_pointer(x_at, like), params[_P_SPANS]),
        numba.carray(_pointer(b_at, like), params[_P_SPANS + 1]),
        numba.carray(_pointer(r_at, like), params[_P_SPANS + 2]),
        numba.carray(_pointer(y_at, like), params[_P_SPANS + 3]),
        numba.carray(_pointer(key_at, _KEY_LIKE), 3),
    )


# The serial and parallel drivers are two functions, not one source jitted twice: numba's cache
# index does not include the ``parallel`` flag, so one source would share (and mix up) entries.
# They take the data pointers of x, bias, residual, output and key, and ``like``, an empty array
# of the storage type of the first four (bfloat16 and float16 as their bit patterns).


@numba.njit(cache=True, nogil=True, parallel=True)
def _launch_parallel(
    x_at: int,
    b_at: int,
    r_at: int,
    y_at: int,
    like: Any,
    table: Any,
    outer: Any,
    plane: Any,
    params: Any,
    key_at: int,
    scale: Any,
    shift: Any,
    drop: Any,
    threshold: int,
    has_shift: bool,
) -> None:
    x, b, r, y, key = _arrays(x_at, b_at, r_at, y_at, like, params, key_at)
    parts = params[_P_PARTS]
    if params[_P_USE_TABLE] != 0 and 0 < threshold < _THRESHOLD_SCALE:
        counters = table.shape[0] // 4
        for part in prange(parts):
            first = part * counters // parts
            philox_words(table, 4 * first, first, (part + 1) * counters // parts - first, key)
    table16 = table.view(np.uint16)
    for part in prange(parts):
        _run_part(
            x, b, r, y, table16, outer, plane, params, key, scale, shift, drop, threshold, has_shift,
            part, parts,
        )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _launch_serial(
    x_at: int,
    b_at: int,
    r_at: int,
    y_at: int,
    like: Any,
    table: Any,
    outer: Any,
    plane: Any,
    params: Any,
    key_at: int,
    scale: Any,
    shift: Any,
    drop: Any,
    threshold: int,
    has_shift: bool,
) -> None:
    x, b, r, y, key = _arrays(x_at, b_at, r_at, y_at, like, params, key_at)
    if params[_P_USE_TABLE] != 0 and 0 < threshold < _THRESHOLD_SCALE:
        philox_words(table, 0, 0, table.shape[0] // 4, key)
    _run_part(
        x, b, r, y, table.view(np.uint16), outer, plane, params, key, scale, shift, drop,
        threshold, has_shift, 0, 1,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Host side: layout planning, data pointers, thread control.

# Empty arrays of the element type the drivers read each dtype's storage as (numba has no CPU
# half types: bfloat16 and float16 travel as uint16 / int16 bit patterns).  Writable: numba types
# a read-only array differently, which would double the compiles.
_STORAGE_LIKE: dict[torch.dtype, np.ndarray] = {
    torch.float32: np.empty(0, dtype=np.float32),
    torch.float64: np.empty(0, dtype=np.float64),
    torch.bfloat16: np.empty(0, dtype=np.uint16),
    torch.float16: np.empty(0, dtype=np.int16),
}
_launch_lock = threading.Lock()
# Process that first started numba's thread pool: GNU OpenMP cannot be used again in a forked
# child of it (numba aborts the process), so children run the serial driver.
_pool_pid: int | None = None


def _span(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Elements of storage that a non-empty view touches, from its first element to its last."""
    return 1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))


def _in_memory(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or its values materialized where its memory does not hold them: a lazy
    negation (``z.conj().imag``) or a ZeroTensor (no storage: a null data pointer)."""
    if t.is_neg():
        return t.resolve_neg()
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype)
    return t


def _row_major_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * max(int(shape[d + 1]), 1)
    return strides


class _Recipe(NamedTuple):
    """Everything about a call but its tensors: models repeat the same calls, so it is cached."""

    outer: np.ndarray  # (k, 6) int64 rows: size, strides of x, bias, residual, output, mask
    plane: np.ndarray  # (2, 6): the memory-inner dim (a dummy in row mode) and the run dim
    params: np.ndarray  # the _P_* vector; read-only once built, so threads may share it
    table_words: int  # uint32 words of the bits table of a broadcast mask (0: element mask)
    parallel: bool
    threads: int


def _make_recipe(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    dims: Sequence[int],
    threads: int,
) -> _Recipe:
    shape = list(x.shape)
    keep_shape = mask_shape(shape, dims)
    row_major = _row_major_strides(keep_shape)
    mask_strides = [
        0 if kept != size else s for kept, size, s in zip(keep_shape, shape, row_major, strict=True)
    ]
    y_strides = torch.empty_like(x).stride()  # the output's layout, as the reference allocates it
    strides = [
        x.stride(),
        bias.stride() if bias is not None else x.stride(),
        residual.stride() if residual is not None else x.stride(),
        y_strides,
        mask_strides,
    ]
    outer, plane, tile_inner, tile_run, tasks = _make_plan(shape, strides)
    mask_numel = math.prod(keep_shape)
    use_table = mask_numel != x.numel()
    parallel = threads > 1 and x.numel() >= _PARALLEL_MIN_ELEMENTS
    params = np.array(
        [
            tile_inner,
            tile_run,
            use_table,
            bias is not None,
            residual is not None,
            tasks,
            min(threads, tasks) if parallel else 1,
            *(_span(shape, s) for s in strides[:4]),  # x, bias, residual, output
        ],
        dtype=np.int64,
    )
    params.flags.writeable = False
    table_words = 4 * -(-mask_numel // 8) if use_table else 0
    return _Recipe(outer, plane, params, table_words, parallel, threads)


def _make_plan(
    shape: Sequence[int], strides: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Coalesce dims and choose row or tile mode (see the module docs).

    ``strides`` are the element strides of x, bias, residual, output and mask, in that order
    (0 along broadcast dims).  Returns ``(outer rows, plane rows, tile_inner, tile_run, tasks)``.
    """
    dims: list[list[int]] = []
    for d, size in enumerate(shape):
        if size == 1:
            continue
        row = [int(size), *(int(s[d]) for s in strides)]
        previous = dims[-1] if dims else None
        if previous is not None and all(previous[f] == row[f] * size for f in range(1, 6)):
            previous[0] *= size
            previous[1:] = row[1:]
        else:
            dims.append(row)
    if not dims:
        dims = [[1, 0, 0, 0, 0, 0]]
    run = len(dims) - 1  # logical innermost dim: consecutive mask elements along it
    inner = min(range(len(dims)), key=lambda d: (dims[d][_YS], d != run))  # memory innermost
    if inner != run and dims[inner][_SIZE] < _MIN_TILE_INNER:
        inner = run
    if inner == run:
        plane = [[1, 0, 0, 0, 0, 0], dims[run]]
        tile_inner, tile_run = 1, min(_ROW_ELEMENTS, dims[run][_SIZE])
    else:
        plane = [dims[inner], dims[run]]
        tile_inner, tile_run = min(_TILE_INNER, dims[inner][_SIZE]), min(_TILE_RUN, dims[run][_SIZE])
    # Outer dims in memory order of the output, so consecutive tasks write neighbouring memory.
    outer = sorted((dims[d] for d in range(len(dims)) if d not in (inner, run)), key=lambda row: -row[_YS])
    tasks = math.prod(row[_SIZE] for row in outer) * -(-plane[0][_SIZE] // tile_inner)
    tasks *= -(-plane[1][_SIZE] // tile_run)
    outer_array = np.array(outer, dtype=np.int64).reshape(-1, 6)
    plane_array = np.array(plane, dtype=np.int64)
    outer_array.flags.writeable = plane_array.flags.writeable = False
    return outer_array, plane_array, tile_inner, tile_run, tasks


_recipes: dict[tuple[object, ...], _Recipe] = {}
_MAX_RECIPES = 1024


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore PyTorch's intra-op thread count after a parallel numba launch.

    numba's OpenMP threading layer and PyTorch can share one OpenMP runtime, and a launch resets
    its thread count: measured here, ``torch.set_num_threads(1)`` became 2 after one launch (and 3
    became 2), and on a loaded 2-core machine the following torch ops then ran 24x slower.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _threads() -> int:
    """Threads to use: PyTorch's intra-op setting, capped by numba's pool size."""
    return max(1, min(torch.get_num_threads(), _NUMBA_THREADS))


# Stays writable: numba types a read-only array differently, which would double the compiles.
_NO_TABLE = np.zeros(4, dtype=np.uint32)
# numba's pool size: fixed once numba is imported.
_NUMBA_THREADS: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]


def _launch(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    key: torch.Tensor,
    threshold: int,
    broadcast_dims: Sequence[int],
    keep_scale: float,
    keep_shift: float,
    drop_value: float,
) -> torch.Tensor:
    # Kept lean: in a training step this runs with caches cold from the matmuls around it,
    # where every Python-level operation costs several times its warm price.
    dtype = x.dtype
    like = _STORAGE_LIKE.get(dtype)
    if like is None:
        raise TypeError(f"x must be float32, float64, bfloat16 or float16, got dtype {dtype}")
    # The dispatcher leaves the key's checks to this backend: a KernelArgumentError sends the
    # call to the reference engine and leaves the kernels on.
    if not (x.is_cpu and key.is_cpu):
        raise KernelArgumentError(f"x and key must be CPU tensors, got devices {x.device} and {key.device}")
    if key.dtype != torch.int64 or key.shape != (3,):
        raise KernelArgumentError(
            f"key must be an int64 tensor of shape (3,), got {key.dtype} {tuple(key.shape)}"
        )
    x_at = x.data_ptr()
    if not x_at or x.is_neg():  # values not in memory: a ZeroTensor (null pointer), a lazy negation
        x = _in_memory(x)
        x_at = x.data_ptr()
    y = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return y
    if bias is not None:
        bias = _in_memory(bias).expand(x.shape)
    if residual is not None:
        residual = _in_memory(residual)
    # Small calls run serially whatever the thread count: one recipe serves them all.
    threads = _threads() if numel >= _PARALLEL_MIN_ELEMENTS else 1
    cache_key = (  # a recipe counts elements, whatever their dtype
        x.shape,
        x.stride(),
        None if bias is None else bias.stride(),
        None if residual is None else residual.stride(),
        tuple(broadcast_dims) if broadcast_dims else (),
        threads,
    )
    recipe = _recipes.get(cache_key)
    if recipe is None:
        recipe = _make_recipe(x, bias, residual, broadcast_dims, threads)
        if len(_recipes) >= _MAX_RECIPES:
            _recipes.clear()
        _recipes[cache_key] = recipe
    if not key.is_contiguous():
        key = key.contiguous()
    key_at = key.data_ptr()
    if not key_at:  # a ZeroTensor: no storage to read
        raise KernelArgumentError("key must be a tensor with storage, got a ZeroTensor")
    # Data pointers, not NumPy views: x, bias, residual, y and key stay referenced by this frame
    # until the kernel returns, and the recipe's spans bound what it touches.
    args = (
        x_at,
        bias.data_ptr() if bias is not None else x_at,
        residual.data_ptr() if residual is not None else x_at,
        y.data_ptr(),
        like,
        np.empty(recipe.table_words, dtype=np.uint32) if recipe.table_words else _NO_TABLE,
        recipe.outer,
        recipe.plane,
        recipe.params,
        key_at,
        float(keep_scale),
        float(keep_shift),
        float(drop_value),
        int(threshold),
        keep_shift != 0.0,
    )
    if not recipe.parallel or not run_parallel(_launch_parallel, args, threads):
        serial = _SERIAL_ENTRIES.get(dtype)
        if serial is None:
            _launch_serial(*args)
            _remember_serial_entry(dtype, args)
        else:
            serial(*args)
    return y


# The compiled serial driver per dtype, called directly: numba's dispatcher types all fifteen
# arguments on every call (~0.5 us), though only the storage type (``like``) ever varies: _launch
# passes the others with fixed types (Python ints and floats, a bool, the recipe's read-only
# int64 arrays, a writable uint32 table), which the compiled entry point converts as numba would.
_SERIAL_ENTRIES: dict[torch.dtype, Any] = {}


def _remember_serial_entry(dtype: torch.dtype, args: tuple[Any, ...]) -> None:
    signature = tuple(_launch_serial.typeof_pyval(arg) for arg in args)
    compiled = _launch_serial.overloads.get(signature)
    if compiled is not None:
        _SERIAL_ENTRIES[dtype] = compiled.entry_point  # type: ignore[attr-defined]


def run_parallel(kernel: Any, args: tuple[Any, ...], threads: int | None = None) -> bool:
    """Run the ``parallel=True`` numba ``kernel(*args)`` on ``threads`` threads (default: PyTorch's
    intra-op setting, capped by numba's pool), as every dropkit CPU kernel runs.

    One launch at a time: numba's workqueue layer (used when neither TBB nor OpenMP is available)
    aborts on concurrent launches, and two launches would only share the cores.  PyTorch's thread
    count is restored afterwards (:func:`keep_torch_threads`).  Returns ``False`` without running
    anything in a forked child of the process that started numba's pool, where GNU OpenMP would
    abort: the caller runs a serial form of the kernel instead.
    """
    global _pool_pid
    if _pool_pid not in (None, os.getpid()):
        return False
    threads = _threads() if threads is None else threads
    with _launch_lock, keep_torch_threads():
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        _pool_pid = os.getpid()
        kernel(*args)
    return True


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
    (``keep``: the 16-bit draw is at least ``threshold``)."""
    return _launch(x, None, None, key, threshold, broadcast_dims, keep_scale, keep_shift, drop_value)


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    keep_scale: float,
) -> torch.Tensor:
    """``residual + where(keep, (x + bias) * keep_scale, 0)`` with one rounding to ``x.dtype``.

    ``bias`` broadcasts to ``x`` (for example ``(x.shape[-1],)``), ``residual`` has ``x``'s shape;
    both have ``x``'s dtype.  The mask is the full-size element mask of ``x``.
    """
    if bias.dtype != x.dtype or residual.dtype != x.dtype:
        raise TypeError(
            f"bias and residual must have x's dtype {x.dtype}, got {bias.dtype} and {residual.dtype}"
        )
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not (bias.is_cpu and residual.is_cpu):  # the kernel reads them through data pointers
        raise KernelArgumentError(
            f"bias and residual must be CPU tensors, got devices {bias.device} and {residual.device}"
        )
    return _launch(x, bias, residual, key, threshold, (), keep_scale, 0.0, 0.0)
