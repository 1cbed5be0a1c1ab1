"""Fused CPU kernels (numba) for the benchmark network: a training step and MC prediction.

The torch path of :mod:`dropkit.experiments.uci.model` materializes every mask and activation
of all ``G`` networks: for the validation of one data set that is ``G x T x n x (in + H)``
floats written and read several times (tens of GB of memory traffic for Wine), and a training
step runs a dozen batched ops over ``(G, B, H)`` tensors.  Here one numba task handles one
network (training) or one network and one pass (prediction) from start to end: the Philox
words of its mask elements go to a small buffer, the hidden layer lives in registers and L1,
and nothing of size ``G x B x H`` touches memory.

The masks are the engine's, bit for bit: element ``j`` of a mask of shape
``(slot + 1, rows, width)`` (training) or ``(slot + 1, t, n, width)`` (prediction) reads the
16-bit half ``j % 2`` of Philox word ``(j // 2) % 4`` at counter ``j // 8`` of the key
``[seed, 4 * mask_stream + offset, step]`` and is dropped when it is below
``round(p * 2**16)``; kept values are multiplied by ``float32(1 / (1 - p))``, as
:func:`dropkit.functional.dropout` does.  Only the order of the float32 sums differs from the
torch path (results agree to float32 rounding; tested).  Each network's arithmetic depends on
nothing but its own spec, so batched == one-at-a-time holds exactly, and the thread count
changes nothing.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange

from dropkit.kernels.cpu import philox_words, run_parallel

__all__ = ["launch", "predict_block", "train_step"]

_ELEMENTS_PER_COUNTER = 8
# Reassociation lets the dot products and gradient sums vectorize; no NaN/inf assumptions.
_FAST = {"reassoc", "contract", "nsz"}
_SERIAL: dict[str, Any] = {}


def launch(kernel: Any, *args: Any) -> None:
    """Run :func:`train_step` or :func:`predict_block` as dropkit's CPU kernels run (PyTorch's
    thread count, one launch at a time, :func:`dropkit.kernels.cpu.run_parallel`); in a forked
    child of the process that started numba's pool, a serial build of the same source (compiled
    on first use there, not cached).  The results do not depend on the thread count."""
    if run_parallel(kernel, args):
        return
    serial = _SERIAL.get(kernel.__name__)
    if serial is None:
        serial = _SERIAL[kernel.__name__] = numba.njit(nogil=True, fastmath=_FAST)(kernel.py_func)
    serial(*args)


@numba.njit(cache=True, nogil=True, inline="always")
def _mask_words(first: int, count: int, seed: int, stream: int, step: int, words: Any) -> int:
    """Philox words covering mask elements ``first .. first + count``; returns the first counter."""
    c0 = first // _ELEMENTS_PER_COUNTER
    c1 = (first + count - 1) // _ELEMENTS_PER_COUNTER
    key = np.empty(3, np.int64)
    key[0] = seed
    key[1] = stream
    key[2] = step
    philox_words(words, 0, c0, c1 - c0 + 1, key)
    return c0


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def predict_block(
    x: Any,
    data_index: Any,
    w1: Any,
    b1: Any,
    w2: Any,
    b2: Any,
    seed: int,
    streams: Any,
    slots: Any,
    thresholds: Any,
    scales: Any,
    block: int,
    passes: int,
    out: Any,
) -> None:
    """``out[g, t, i]``: pass ``t`` (of ``passes`` in prediction block ``block``) of network ``g``
    on point ``i`` of ``x[data_index[g]]``.

    Shapes: ``x (S, n, in)``, ``w1 (G, in, H)``, ``b1 (G, H)``, ``w2 (G, H)``, ``b2 (G,)``,
    ``out (G, passes, n)``, all float32; ``streams`` is ``4 * mask_stream`` per network.
    """
    count = w1.shape[0]
    n = x.shape[1]
    n_in = x.shape[2]
    hidden = w1.shape[2]
    for job in prange(count * passes):
        g = job // passes
        t = job - g * passes
        d = data_index[g]
        threshold = thresholds[g]
        scale = scales[g]
        first1 = (slots[g] * passes + t) * n * n_in
        first2 = (slots[g] * passes + t) * n * hidden
        words1 = np.empty(4 * ((n * n_in) // _ELEMENTS_PER_COUNTER + 2), np.uint32)
        words2 = np.empty(4 * ((n * hidden) // _ELEMENTS_PER_COUNTER + 2), np.uint32)
        c1 = _mask_words(first1, n * n_in, seed, streams[g] + 2, block, words1)
        c2 = _mask_words(first2, n * hidden, seed, streams[g] + 3, block, words2)
        # Little-endian: the uint16 view of the words is the draws in element order.
        bits1 = words1.view(np.uint16)[first1 - c1 * _ELEMENTS_PER_COUNTER :]
        bits2 = words2.view(np.uint16)[first2 - c2 * _ELEMENTS_PER_COUNTER :]
        acc = np.empty(hidden, np.float32)
        zero = np.float32(0.0)
        for i in range(n):
            for k in range(hidden):
                acc[k] = b1[g, k]
            for j in range(n_in):
                if bits1[i * n_in + j] >= threshold:
                    v = x[d, i, j] * scale
                    for k in range(hidden):
                        acc[k] += v * w1[g, j, k]
            total = zero
            row_bits = bits2[i * hidden : (i + 1) * hidden]
            for k in range(hidden):
                h = max(acc[k], zero) * scale
                total += (h if row_bits[k] >= threshold else zero) * w2[g, k]
            out[g, t, i] = total + b2[g]


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FAST)
def train_step(
    x: Any,
    y: Any,
    batch: Any,
    group: Any,
    data_index: Any,
    w1: Any,
    b1: Any,
    w2: Any,
    b2: Any,
    m_state: Any,
    v_state: Any,
    decay: Any,
    seed: int,
    streams: Any,
    slots: Any,
    thresholds: Any,
    scales: Any,
    step: int,
    lr_t: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One Adam step of every network on its mini-batch (see :func:`train_models`).

    ``batch (U, B)`` holds the row indices of each shuffle group's mini-batch and ``group[g]``
    the group of network ``g``; ``x (S, N, in)``, ``y (S, N)``.  The parameters are updated in
    place; ``m_state`` / ``v_state`` are ``(G, P)`` with the parameters flattened in the order
    ``w1, b1, w2, b2``; ``decay[g] = 2 λ_g``.
    """
    count = w1.shape[0]
    n_in = x.shape[2]
    hidden = w1.shape[2]
    rows = batch.shape[1]
    n_params = n_in * hidden + 2 * hidden + 1
    inv_rows = np.float32(2.0 / rows)
    one_m_b1 = np.float32(1.0 - beta1)
    one_m_b2 = np.float32(1.0 - beta2)
    f_b1 = np.float32(beta1)
    f_b2 = np.float32(beta2)
    f_eps = np.float32(eps)
    f_lr = np.float32(lr_t)
    for g in prange(count):
        d = data_index[g]
        u = group[g]
        threshold = thresholds[g]
        scale = scales[g]
        lam2 = decay[g]
        words1 = np.empty(4 * ((rows * n_in) // _ELEMENTS_PER_COUNTER + 2), np.uint32)
        words2 = np.empty(4 * ((rows * hidden) // _ELEMENTS_PER_COUNTER + 2), np.uint32)
        first1 = slots[g] * rows * n_in
        first2 = slots[g] * rows * hidden
        c1 = _mask_words(first1, rows * n_in, seed, streams[g], step, words1)
        c2 = _mask_words(first2, rows * hidden, seed, streams[g] + 1, step, words2)
        bits1 = words1.view(np.uint16)[first1 - c1 * _ELEMENTS_PER_COUNTER :]
        bits2 = words2.view(np.uint16)[first2 - c2 * _ELEMENTS_PER_COUNTER :]
        zero = np.float32(0.0)
        grad = np.zeros(n_params, np.float32)  # w1 (in x H), b1 (H), w2 (H), b2
        gb1 = n_in * hidden
        gw2 = gb1 + hidden
        gb2 = gw2 + hidden
        xm = np.empty(n_in, np.float32)
        pre = np.empty(hidden, np.float32)
        act = np.empty(hidden, np.float32)
        for r in range(rows):
            row = batch[u, r]
            for j in range(n_in):
                xm[j] = x[d, row, j] * scale if bits1[r * n_in + j] >= threshold else zero
            for k in range(hidden):
                pre[k] = b1[g, k]
            for j in range(n_in):
                v = xm[j]
                if v != 0.0:
                    for k in range(hidden):
                        pre[k] += v * w1[g, j, k]
            out = zero
            row_bits = bits2[r * hidden : (r + 1) * hidden]
            for k in range(hidden):
                a = scale if row_bits[k] >= threshold else zero
                a = a if pre[k] > zero else zero
                act[k] = a
                pre[k] = pre[k] * a  # the hidden output h
                out += pre[k] * w2[g, k]
            dout = (out + b2[g] - y[d, row]) * inv_rows
            grad[gb2] += dout
            for k in range(hidden):
                grad[gw2 + k] += pre[k] * dout
                dpre = act[k] * dout * w2[g, k]
                act[k] = dpre
                grad[gb1 + k] += dpre
            for j in range(n_in):
                v = xm[j]
                if v != 0.0:
                    for k in range(hidden):
                        grad[j * hidden + k] += v * act[k]
        for j in range(n_in):
            for k in range(hidden):
                grad[j * hidden + k] += lam2 * w1[g, j, k]
        for k in range(hidden):
            grad[gw2 + k] += lam2 * w2[g, k]
        m = m_state[g]
        v2 = v_state[g]
        for q in range(n_params):
            m[q] = f_b1 * m[q] + one_m_b1 * grad[q]
            v2[q] = f_b2 * v2[q] + one_m_b2 * grad[q] * grad[q]
            delta = f_lr * m[q] / (np.sqrt(v2[q]) + f_eps)
            if q < gb1:
                j = q // hidden
                w1[g, j, q - j * hidden] -= delta
            elif q < gw2:
                b1[g, q - gb1] -= delta
            elif q < gb2:
                w2[g, q - gw2] -= delta
            else:
                b2[g] -= delta
