"""numba kernel of :func:`dropkit.kernels.attention.drop_rows`: the dropout of a block of attention
weights, bit for bit the reference engine's mask of the whole weights.

A block of weights is a matrix whose row ``r`` is one contiguous run of mask elements starting
at ``starts[r]`` (see :mod:`dropkit.kernels.attention`).  Work is split into tasks of up to 8192
elements of one run; a task writes the Philox words of its
counters (:func:`dropkit.kernels.cpu.philox_words`, the generator of every dropkit CPU kernel)
into an L1-resident buffer whose little-endian ``uint16`` view is the element order, and applies
the mask in one vectorized pass, as the row mode of :mod:`dropkit.kernels.cpu` does.  Tasks own
whole runs of elements, so the thread count never changes the bits.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from numba import prange

# Imported before any function below is jitted: it points numba's cache at a writable directory.
from dropkit.kernels.cpu import philox_words, run_parallel

__all__ = ["drop_rows", "name"]

name = "numba"

_RUN = 8192  # elements a task: 1024 counters, a 16 KiB word buffer
_PARALLEL_MIN_ELEMENTS = 1 << 15


@numba.njit(cache=True, nogil=True)
def _drop_part(
    w: Any, y: Any, key: Any, starts: Any, threshold: int, scale: Any, zero: Any, part: int, parts: int
) -> None:
    count = w.shape[1]
    runs = (count + _RUN - 1) // _RUN
    tasks = starts.shape[0] * runs
    words = np.zeros(4 * (_RUN // 8 + 2), np.uint32)
    bits = words.view(np.uint16)
    for task in range(part * tasks // parts, (part + 1) * tasks // parts):
        b = task // runs
        c0 = (task % runs) * _RUN
        n = min(_RUN, count - c0)
        m0 = starts[b] + c0
        first = m0 >> 3
        philox_words(words, 0, first, ((m0 + n - 1) >> 3) - first + 1, key)
        offset = m0 - 8 * first
        # Slices give zero-based indices that LLVM can prove non-negative: the loop vectorizes.
        kv = bits[offset : offset + n]
        wv = w[b, c0 : c0 + n]
        yv = y[b, c0 : c0 + n]
        for e in range(n):
            v = wv[e] * scale
            if kv[e] < threshold:
                v = zero
            yv[e] = v


# Two drivers, not one source jitted twice: numba's cache index does not include ``parallel``.


@numba.njit(cache=True, nogil=True, parallel=True)
def _drop_parallel(
    w: Any, y: Any, key: Any, starts: Any, threshold: int, scale: Any, zero: Any, parts: int
) -> None:
    for part in prange(parts):
        _drop_part(w, y, key, starts, threshold, scale, zero, part, parts)


@numba.njit(cache=True, nogil=True)
def _drop_serial(w: Any, y: Any, key: Any, starts: Any, threshold: int, scale: Any, zero: Any) -> None:
    _drop_part(w, y, key, starts, threshold, scale, zero, 0, 1)


def drop_rows(
    weights: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    keep_scale: float,
    starts: torch.Tensor,
    inplace: bool,
) -> torch.Tensor:
    """``where(keep, weights * keep_scale, 0)`` of a contiguous float32/float64 CPU matrix whose
    row ``r`` holds the mask elements ``starts[r] ..``."""
    if weights.dtype not in (torch.float32, torch.float64) or not weights.is_contiguous():
        raise TypeError(f"weights must be a contiguous float32/float64 tensor, got {weights.dtype}")
    if weights.device.type != "cpu" or key.device.type != "cpu":
        raise ValueError(f"weights and key must be CPU tensors, got {weights.device} and {key.device}")
    out = weights if inplace else torch.empty_like(weights)
    runs = weights.shape[0]
    w = weights.detach().numpy()
    y = out.detach().numpy()
    numpy_type = np.float64 if weights.dtype == torch.float64 else np.float32
    args = (
        w,
        y,
        key.contiguous().numpy(),
        starts.numpy(),
        threshold,
        numpy_type(keep_scale),
        numpy_type(0.0),
    )
    threads = torch.get_num_threads()
    tasks = runs * -(-w.shape[1] // _RUN)
    parallel = threads > 1 and weights.numel() >= _PARALLEL_MIN_ELEMENTS and tasks > 1
    if not parallel or not run_parallel(_drop_parallel, (*args, min(threads, tasks))):
        _drop_serial(*args)
    return out
