# Triton convention: compile-time (constexpr) kernel parameters are UPPER_CASE.
# ruff: noqa: N803
"""FlashAttention-style Triton kernels whose attention dropout is dropkit's engine mask.

Forward (one program per block of ``BLOCK_M`` query rows of one (batch, head)): tiles of
``BLOCK_N`` keys are scored (``q k^T * factor``, then the causal, bool or additive mask), the
softmax is accumulated online (running max ``m`` and sum ``l`` of the *undropped*
probabilities), and each tile's probabilities are dropped before they multiply ``V``; at the end
``out = acc / l * keep_scale`` and ``lse = m + log l`` is saved.  This is dropout on the
normalised probabilities with the ``1/q`` scale, the softmax statistics taken before dropout.

Backward (FlashAttention-2 style, no atomics): ``delta_i = sum_d dO_id O_id`` on the host, then
one kernel over key blocks (``dK``, ``dV``) and one over query blocks (``dQ``) recompute each
tile's probabilities from ``lse`` and regenerate its keep mask: between :func:`forward` and
:func:`backward` the caller keeps the inputs, the output, ``lse`` and the key (24 bytes), nothing
per attention weight (:mod:`dropkit.kernels.attention` wraps the pair; it falls back to its
blocked path, with the same masks, if a kernel fails).

The mask (:mod:`dropkit.kernels.attention`): weight ``(z, h, i, j)`` of the ``(Z, H, L, S)``
weights is mask element ``n = ((z H + h) L + i) S + j`` of the engine under the call's key, so
the kernels drop exactly the weights that the materialised path drops with
:func:`dropkit.functional.dropout`.  The bits come from :func:`dropkit.kernels.triton_gpu._philox_words`
(the dropout kernels' Philox, counter words ``(n // 8 lo, n // 8 hi, stream, step)``): when
``S`` is a multiple of 8 a tile row is whole counters and one Philox call serves 8 weights; else
every weight computes its own counter.

Grouped-query attention reads key/value head ``h // (H / H_kv)`` (no copies); ``dK``, ``dV``
are computed per query head in float32 and summed over each group on the host.  Inputs are
float16, bfloat16 or float32 with head dims up to 128; scores, softmax and accumulators are
float32; ``P V`` and the backward products take half inputs in their dtype (as FlashAttention
does) and float32 in IEEE float32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - the loader falls back to the blocked path
    raise ImportError(
        "dropkit.kernels.triton_attention needs the 'triton' package (shipped with CUDA builds of "
        "PyTorch, or `pip install triton`)"
    ) from exc

from dropkit.kernels.triton_gpu import _device_guard, _philox_words, _store_rounded, _widen

__all__ = ["backward", "block_sizes", "forward", "name"]

name = "triton"

_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


# Tiles (BLOCK_M query rows x BLOCK_N keys), warps and pipeline stages per kernel, for 2-byte and
# 4-byte inputs and head dims up to 64 or up to 128: chosen so that ptxas (sm_90a, compiled
# offline) reports no register spills, or a few bytes; not timed on a GPU yet.
_TILES: dict[tuple[str, bool, bool], tuple[int, int, int, int]] = {
    ("forward", True, True): (128, 64, 8, 3),
    ("forward", True, False): (64, 32, 8, 2),
    ("backward_kv", True, True): (32, 64, 4, 2),
    ("backward_kv", True, False): (32, 64, 8, 2),
    ("backward_q", True, True): (64, 32, 4, 2),
    ("backward_q", True, False): (64, 32, 8, 2),
    **{
        (kernel, False, small): (32, 32, 4 if small else 8, 2)
        for kernel in ("forward", "backward_kv", "backward_q")
        for small in (True, False)
    },
}


class _Override:
    tiles: tuple[int, int] | None = None


_override = _Override()


class block_sizes:  # noqa: N801  (a context manager, used like a function)
    """Use tiles of ``block_m`` query rows x ``block_n`` keys in every kernel inside a ``with``
    block (tests, tuning); the masks never change."""

    def __init__(self, block_m: int, block_n: int) -> None:
        for label, value in (("block_m", block_m), ("block_n", block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{label} must be a power of two >= 16, got {value}")
        self.sizes = (block_m, block_n)

    def __enter__(self) -> None:
        self.previous = _override.tiles
        _override.tiles = self.sizes

    def __exit__(self, *exc: object) -> None:
        _override.tiles = self.previous


# ---------------------------------------------------------------------------------------------
# Device code
# ---------------------------------------------------------------------------------------------


@triton.jit
def _keep_tile(
    key_ptr: tl.tensor,
    rows: tl.tensor,
    start_n: tl.tensor,
    source: tl.tensor,
    threshold: tl.tensor,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
) -> tl.tensor:
    """Keep flags ``[BLOCK_M, BLOCK_N]`` of the weights of global rows ``rows`` (``(z H + h) L +
    i``, int64) and keys ``start_n ..``: mask element ``rows * source + j``, kept when its 16-bit
    draw is at least ``threshold``."""
    first = rows * source + start_n
    if ALIGNED:
        # A tile row is BLOCK_N / 8 whole counters (source and start_n are multiples of 8).
        counters = (first // 8)[:, None] + tl.arange(0, BLOCK_N // 8)[None, :]
        w0, w1, w2, w3 = _philox_words(key_ptr, counters)
        element = tl.arange(0, 8)[None, None, :]
        word = tl.where(
            element < 2,
            w0[:, :, None],
            tl.where(element < 4, w1[:, :, None], tl.where(element < 6, w2[:, :, None], w3[:, :, None])),
        )
        draws = (word >> ((element % 2) * 16).to(tl.uint32)) & 0xFFFF
        draws = tl.reshape(draws, (BLOCK_M, BLOCK_N))
    else:
        n = first[:, None] + tl.arange(0, BLOCK_N)[None, :]
        w0, w1, w2, w3 = _philox_words(key_ptr, n // 8)
        index = (n // 2) % 4
        word = tl.where(index == 0, w0, tl.where(index == 1, w1, tl.where(index == 2, w2, w3)))
        draws = (word >> ((n % 2) * 16).to(tl.uint32)) & 0xFFFF
    return draws.to(tl.int32) >= threshold


@triton.jit
def _operand(x: tl.tensor, WIDEN: tl.constexpr) -> tl.tensor:
    """A loaded ``tl.dot`` operand: as is, or (``WIDEN``: bfloat16 under Triton's interpreter, whose
    ``tl.dot`` multiplies bfloat16 bit patterns as integers) widened exactly to float32."""
    if WIDEN:
        return _widen(x, tl.float32)
    else:
        return x


@triton.jit
def _scores(
    q: tl.tensor,
    k_ptrs: tl.tensor,
    mask_ptrs: tl.tensor,
    offs_m: tl.tensor,
    offs_n: tl.tensor,
    rows_valid: tl.tensor,
    length_k: tl.tensor,
    factor: tl.tensor,
    head_dim: tl.tensor,
    offs_d: tl.tensor,
    MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
) -> tl.tensor:
    """Scores ``[BLOCK_M, BLOCK_N]`` of a tile: ``q k^T * factor`` with the mask, ``-inf`` where a
    weight is masked out or out of bounds."""
    cols_valid = offs_n < length_k
    k = _operand(tl.load(k_ptrs, mask=(offs_d[:, None] < head_dim) & cols_valid[None, :], other=0.0), WIDEN)
    s = tl.dot(q, k, input_precision=PRECISION) * factor
    valid = rows_valid[:, None] & cols_valid[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND == 1:
        valid = valid & (tl.load(mask_ptrs, mask=valid, other=0) != 0)
    if MASK_KIND == 2:
        s = s + _widen(tl.load(mask_ptrs, mask=valid, other=0.0), tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit(do_not_specialize=["threshold"])
def _forward_kernel(
    Q: tl.tensor, K: tl.tensor, V: tl.tensor, Mask: tl.tensor, Out: tl.tensor, LSE: tl.tensor,
    key_ptr: tl.tensor, sqz: tl.tensor, sqh: tl.tensor, sqm: tl.tensor, sqd: tl.tensor, skz: tl.tensor,
    skh: tl.tensor, skn: tl.tensor, skd: tl.tensor, svz: tl.tensor, svh: tl.tensor, svn: tl.tensor,
    svd: tl.tensor, smz: tl.tensor, smh: tl.tensor, smm: tl.tensor, smn: tl.tensor, soz: tl.tensor,
    soh: tl.tensor, som: tl.tensor, sod: tl.tensor, heads: tl.tensor, group: tl.tensor, length_q: tl.tensor,
    length_k: tl.tensor, head_dim: tl.tensor, value_dim: tl.tensor, factor: tl.tensor, threshold: tl.tensor,
    keep_scale: tl.tensor, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
) -> None:  # fmt: skip
    pid_m = tl.program_id(0)
    zh = tl.program_id(1).to(tl.int64)
    z = zh // heads
    h = zh % heads
    kv = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_valid = offs_m < length_q
    q_ptrs = Q + z * sqz + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = _operand(tl.load(q_ptrs, mask=rows_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0), WIDEN)
    k_base = K + z * skz + kv * skh + offs_d[:, None] * skd
    v_base = V + z * svz + kv * svh + offs_dv[None, :] * svd
    mask_base = Mask + z * smz + h * smh + offs_m[:, None] * smm
    rows = zh * length_q + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    end = length_k
    if CAUSAL:
        end = tl.minimum(length_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + offs_n0
        s = _scores(
            q, k_base + offs_n[None, :] * skn, mask_base + offs_n[None, :] * smn, offs_m, offs_n,
            rows_valid, length_k, factor, head_dim, offs_d, MASK_KIND, CAUSAL, PRECISION, WIDEN,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(
                _keep_tile(key_ptr, rows, start_n, length_k, threshold, BLOCK_M, BLOCK_N, ALIGNED), p, 0.0
            )
        v_valid = (offs_n[:, None] < length_k) & (offs_dv[None, :] < value_dim)
        v = tl.load(v_base + offs_n[:, None] * svn, mask=v_valid, other=0.0)
        v = _operand(v, WIDEN)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # a row that attends nowhere: zeros, and p = exp(s - inf) = 0 in backward
    out = acc * (keep_scale / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(empty, float("inf"), tl.where(empty, 0.0, m_i) + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptrs = Out + z * soz + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    _store_rounded(o_ptrs, out, rows_valid[:, None] & (offs_dv[None, :] < value_dim))
    tl.store(LSE + zh * length_q + offs_m, lse, mask=rows_valid)


@triton.jit
def _probabilities(
    s: tl.tensor, lse: tl.tensor, rows: tl.tensor, start_n: tl.tensor, key_ptr: tl.tensor,
    length_k: tl.tensor, threshold: tl.tensor, keep_scale: tl.tensor, DROPOUT: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:  # fmt: skip
    """The tile's probabilities ``p``, the dropped ones ``p * keep / q`` and the keep flags."""
    p = tl.exp(s - lse[:, None])
    if DROPOUT:
        keep = _keep_tile(key_ptr, rows, start_n, length_k, threshold, BLOCK_M, BLOCK_N, ALIGNED)
    else:
        keep = p == p
    return p, tl.where(keep, p * keep_scale, 0.0), keep


@triton.jit
def _row_block(
    Q: tl.tensor, DO: tl.tensor, LSE: tl.tensor, Delta: tl.tensor, z: tl.tensor, h: tl.tensor,
    zh: tl.tensor, offs_m: tl.tensor, rows_valid: tl.tensor, offs_d: tl.tensor, offs_dv: tl.tensor,
    sqz: tl.tensor, sqh: tl.tensor, sqm: tl.tensor, sqd: tl.tensor, sdoz: tl.tensor, sdoh: tl.tensor,
    sdom: tl.tensor, sdod: tl.tensor, length_q: tl.tensor, head_dim: tl.tensor, value_dim: tl.tensor,
    WIDEN: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:  # fmt: skip
    """What both backward kernels read of the query rows ``offs_m`` of one head: ``q`` and
    ``dO`` (as dot operands), the forward's log-sum-exp and ``delta = rowsum(dO * O)``."""
    q = tl.load(
        Q + z * sqz + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=rows_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0,
    )  # fmt: skip
    do = tl.load(
        DO + z * sdoz + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
        mask=rows_valid[:, None] & (offs_dv[None, :] < value_dim), other=0.0,
    )  # fmt: skip
    lse = tl.load(LSE + zh * length_q + offs_m, mask=rows_valid, other=float("inf"))
    delta = tl.load(Delta + zh * length_q + offs_m, mask=rows_valid, other=0.0)
    return _operand(q, WIDEN), _operand(do, WIDEN), lse, delta


@triton.jit(do_not_specialize=["threshold"])
def _backward_kv_kernel(
    Q: tl.tensor, K: tl.tensor, V: tl.tensor, Mask: tl.tensor, DO: tl.tensor, LSE: tl.tensor,
    Delta: tl.tensor, DK: tl.tensor, DV: tl.tensor, key_ptr: tl.tensor, sqz: tl.tensor, sqh: tl.tensor,
    sqm: tl.tensor, sqd: tl.tensor, skz: tl.tensor, skh: tl.tensor, skn: tl.tensor, skd: tl.tensor,
    svz: tl.tensor, svh: tl.tensor, svn: tl.tensor, svd: tl.tensor, smz: tl.tensor, smh: tl.tensor,
    smm: tl.tensor, smn: tl.tensor, sdoz: tl.tensor, sdoh: tl.tensor, sdom: tl.tensor, sdod: tl.tensor,
    heads: tl.tensor, group: tl.tensor, length_q: tl.tensor, length_k: tl.tensor, head_dim: tl.tensor,
    value_dim: tl.tensor, factor: tl.tensor, threshold: tl.tensor, keep_scale: tl.tensor,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
) -> None:  # fmt: skip
    """``dK``, ``dV`` (float32, per query head ``(Z, H, S, D)``) of one block of keys."""
    pid_n = tl.program_id(0)
    zh = tl.program_id(1).to(tl.int64)
    z = zh // heads
    h = zh % heads
    kv = h // group
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols_valid = offs_n < length_k
    k_ptrs = K + z * skz + kv * skh + offs_d[:, None] * skd + offs_n[None, :] * skn
    v_ptrs = V + z * svz + kv * svh + offs_dv[:, None] * svd + offs_n[None, :] * svn
    v_t = _operand(
        tl.load(v_ptrs, mask=(offs_dv[:, None] < value_dim) & cols_valid[None, :], other=0.0), WIDEN
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    begin = 0
    if CAUSAL:
        begin = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(begin, length_q, BLOCK_M):
        offs_m = start_m + offs_m0
        rows_valid = offs_m < length_q
        q, do, lse, delta = _row_block(
            Q, DO, LSE, Delta, z, h, zh, offs_m, rows_valid, offs_d, offs_dv, sqz, sqh, sqm, sqd,
            sdoz, sdoh, sdom, sdod, length_q, head_dim, value_dim, WIDEN,
        )  # fmt: skip
        mask_ptrs = Mask + z * smz + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn
        s = _scores(
            q, k_ptrs, mask_ptrs, offs_m, offs_n, rows_valid, length_k, factor, head_dim, offs_d,
            MASK_KIND, CAUSAL, PRECISION, WIDEN,
        )  # fmt: skip
        p, dropped, keep = _probabilities(
            s, lse, zh * length_q + offs_m, start_n, key_ptr, length_k, threshold, keep_scale,
            DROPOUT, ALIGNED, BLOCK_M, BLOCK_N,
        )  # fmt: skip
        dv += tl.dot(tl.trans(dropped.to(do.dtype)), do, input_precision=PRECISION)
        grad_dropped = tl.dot(do, v_t, input_precision=PRECISION)
        grad_p = tl.where(keep, grad_dropped * keep_scale, 0.0)
        ds = p * (grad_p - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * factor
    dk_ptrs = DK + zh * length_k * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
    tl.store(dk_ptrs, dk, mask=cols_valid[:, None] & (offs_d[None, :] < head_dim))
    dv_ptrs = DV + zh * length_k * value_dim + offs_n[:, None] * value_dim + offs_dv[None, :]
    tl.store(dv_ptrs, dv, mask=cols_valid[:, None] & (offs_dv[None, :] < value_dim))


@triton.jit(do_not_specialize=["threshold"])
def _backward_q_kernel(
    Q: tl.tensor, K: tl.tensor, V: tl.tensor, Mask: tl.tensor, DO: tl.tensor, LSE: tl.tensor,
    Delta: tl.tensor, DQ: tl.tensor, key_ptr: tl.tensor, sqz: tl.tensor, sqh: tl.tensor, sqm: tl.tensor,
    sqd: tl.tensor, skz: tl.tensor, skh: tl.tensor, skn: tl.tensor, skd: tl.tensor, svz: tl.tensor,
    svh: tl.tensor, svn: tl.tensor, svd: tl.tensor, smz: tl.tensor, smh: tl.tensor, smm: tl.tensor,
    smn: tl.tensor, sdoz: tl.tensor, sdoh: tl.tensor, sdom: tl.tensor, sdod: tl.tensor, heads: tl.tensor,
    group: tl.tensor, length_q: tl.tensor, length_k: tl.tensor, head_dim: tl.tensor, value_dim: tl.tensor,
    factor: tl.tensor, threshold: tl.tensor, keep_scale: tl.tensor, MASK_KIND: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
) -> None:  # fmt: skip
    """``dQ`` (float32 ``(Z, H, L, D)``) of one block of query rows."""
    pid_m = tl.program_id(0)
    zh = tl.program_id(1).to(tl.int64)
    z = zh // heads
    h = zh % heads
    kv = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_valid = offs_m < length_q
    q, do, lse, delta = _row_block(
        Q, DO, LSE, Delta, z, h, zh, offs_m, rows_valid, offs_d, offs_dv, sqz, sqh, sqm, sqd,
        sdoz, sdoh, sdom, sdod, length_q, head_dim, value_dim, WIDEN,
    )  # fmt: skip
    k_base = K + z * skz + kv * skh + offs_d[:, None] * skd
    v_base = V + z * svz + kv * svh + offs_dv[:, None] * svd
    mask_base = Mask + z * smz + h * smh + offs_m[:, None] * smm
    rows = zh * length_q + offs_m
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = length_k
    if CAUSAL:
        end = tl.minimum(length_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[None, :] * skn
        s = _scores(
            q, k_ptrs, mask_base + offs_n[None, :] * smn, offs_m, offs_n, rows_valid, length_k, factor,
            head_dim, offs_d, MASK_KIND, CAUSAL, PRECISION, WIDEN,
        )  # fmt: skip
        p, _, keep = _probabilities(
            s, lse, rows, start_n, key_ptr, length_k, threshold, keep_scale, DROPOUT, ALIGNED, BLOCK_M,
            BLOCK_N,
        )  # fmt: skip
        v_valid = (offs_dv[:, None] < value_dim) & (offs_n[None, :] < length_k)
        v_t = tl.load(v_base + offs_n[None, :] * svn, mask=v_valid, other=0.0)
        v_t = _operand(v_t, WIDEN)
        grad_dropped = tl.dot(do, v_t, input_precision=PRECISION)
        grad_p = tl.where(keep, grad_dropped * keep_scale, 0.0)
        ds = p * (grad_p - delta[:, None])
        k_t = tl.load(k_ptrs, mask=(offs_d[:, None] < head_dim) & (offs_n[None, :] < length_k), other=0.0)
        k_t = _operand(k_t, WIDEN)
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    dq = dq * factor
    dq_ptrs = DQ + zh * length_q * head_dim + offs_m[:, None] * head_dim + offs_d[None, :]
    tl.store(dq_ptrs, dq, mask=rows_valid[:, None] & (offs_d[None, :] < head_dim))


# ---------------------------------------------------------------------------------------------
# Host code
# ---------------------------------------------------------------------------------------------


def _four_d(t: torch.Tensor, batch: torch.Size, heads: int | None = None) -> torch.Tensor:
    """``t`` expanded to ``batch`` (its last batch dim ``heads`` if given) as ``(Z, H, rows, cols)``."""
    shape = list(batch)
    if heads is not None:
        shape[-1] = heads
    t = t.expand(*shape, *t.shape[-2:])
    if len(shape) == 0:
        return t[None, None]
    if len(shape) == 1:
        return t[None]
    return t.reshape(-1, shape[-1], *t.shape[-2:])


def _widen_operands(dtype: torch.dtype) -> bool:
    """bfloat16 under Triton's interpreter: its ``tl.dot`` would multiply the bit patterns."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE float32 products for float32 (and widened) operands unless torch allows TF32."""
    if _widen_operands(dtype) or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _meta(
    kernel: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    threshold: int,
) -> dict[str, Any]:
    """The compile-time arguments and launch options of ``kernel`` for these inputs."""
    head_dim = max(q.shape[3], v.shape[3])
    block_m, block_n, warps, stages = _TILES[(kernel, q.element_size() == 2, head_dim <= 64)]
    if _override.tiles is not None:
        block_m, block_n = _override.tiles
    return {
        "MASK_KIND": _MASK_NONE if mask is None else _MASK_BOOL if mask.dtype == torch.uint8 else _MASK_FLOAT,
        "CAUSAL": causal,
        "DROPOUT": threshold > 0,
        "ALIGNED": k.shape[2] % 8 == 0,
        "PRECISION": _dot_precision(q.dtype),
        "WIDEN": _widen_operands(q.dtype),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[3])),
        "BLOCK_DV": max(16, triton.next_power_of_2(v.shape[3])),
        "num_warps": warps,
        "num_stages": stages,
        # Fused multiply-adds are welcome here (the outputs are compared to float tolerance, the
        # masks are integer comparisons); said explicitly, as Triton 3.9 warns when unsaid.
        "enable_fp_fusion": True,
    }


def _mask_arg(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    return q if mask is None else mask


def _mask_strides(mask: torch.Tensor | None) -> tuple[int, ...]:
    return (0, 0, 0, 0) if mask is None else tuple(mask.stride())


class _Inputs:
    """The arguments of one call as the kernels take them: ``(Z, H, rows, cols)`` views (copies
    only for more than two batch dims that do not merge), the bool mask as bytes."""

    def __init__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        scale: float | None,
        enable_gqa: bool,
    ) -> None:
        heads = query.shape[-3] if query.dim() >= 3 else 1
        gqa = enable_gqa and query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != heads
        key_batch = list(key.shape[:-2])
        value_batch = list(value.shape[:-2])
        if gqa:
            key_batch[-1] = value_batch[-1] = heads
        self.batch = torch.broadcast_shapes(query.shape[:-2], torch.Size(key_batch), torch.Size(value_batch))
        kv_heads = key.shape[-3] if gqa else None
        self.key_batch = self.batch if kv_heads is None else torch.Size([*self.batch[:-1], kv_heads])
        self.q = _four_d(query, self.batch)
        self.k = _four_d(key, self.batch, kv_heads)
        self.v = _four_d(value, self.batch, kv_heads)
        self.mask = None
        if attn_mask is not None:
            mask = _four_d(attn_mask.expand(*self.batch, query.shape[-2], key.shape[-2]), self.batch)
            self.mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        self.factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def _grad_of(grad: torch.Tensor, like: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """A ``(Z, H, rows, cols)`` float32 gradient of ``like`` expanded to ``batch``, back in the shape
    and dtype of ``like``."""
    return grad.view(*batch, *grad.shape[-2:]).sum_to_size(like.shape).to(like.dtype)


def forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    attention_key: torch.Tensor,
    threshold: int,
    keep_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of (checked, :func:`dropkit.kernels.attention.fused_supports`-ed) arguments as
    :func:`dropkit.functional.scaled_dot_product_attention` takes them, the weights dropped with the
    engine's mask of ``attention_key`` (``threshold``: the integer drop threshold, ``keep_scale``:
    ``1/q``); ``lse`` (float32, ``(*batch, L)``) is what :func:`backward` needs besides the inputs."""
    inputs = _Inputs(query, key, value, attn_mask, scale, enable_gqa)
    q, k, v, mask = inputs.q, inputs.k, inputs.v, inputs.mask
    z, heads, length_q, _ = q.shape
    if len(inputs.batch) == 2:
        # Torch's flash layout, (batch, L, heads, Dv) in memory: the usual
        # out.transpose(1, 2).reshape(batch, L, heads * Dv) before the output projection is then
        # a view, not a second copy of the output next to the one kept for backward.
        out = q.new_empty((z, length_q, heads, v.shape[-1])).transpose(1, 2)
    else:
        out = q.new_empty((z, heads, length_q, v.shape[-1]))
    lse = torch.empty((z, heads, length_q), dtype=torch.float32, device=q.device)
    meta = _meta("forward", q, k, v, mask, is_causal, threshold)
    grid = (triton.cdiv(length_q, meta["BLOCK_M"]), z * heads)
    with _device_guard(q.device):
        _forward_kernel[grid](
            q, k, v, _mask_arg(mask, q), out, lse, attention_key,
            *q.stride(), *k.stride(), *v.stride(), *_mask_strides(mask), *out.stride(),
            heads, heads // k.shape[1], length_q, k.shape[2], q.shape[3], v.shape[3],
            inputs.factor, threshold, keep_scale, **meta,
        )  # fmt: skip
    return out.view(*inputs.batch, length_q, v.shape[-1]), lse.view(*inputs.batch, length_q)


def backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    attention_key: torch.Tensor,
    threshold: int,
    keep_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward`'s ``out`` with respect to ``query``, ``key`` and ``value``: each
    tile's probabilities recomputed from ``lse``, its mask regenerated from ``attention_key``."""
    inputs = _Inputs(query, key, value, attn_mask, scale, enable_gqa)
    q, k, v, mask = inputs.q, inputs.k, inputs.v, inputs.mask
    z, heads, length_q, head_dim = q.shape
    length_k, value_dim = k.shape[2], v.shape[3]
    grad_out = grad_out.expand(out.shape).reshape(z, heads, length_q, value_dim).contiguous()
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i (the dropped weights' rows sum against V to O).
    delta = (grad_out.float() * out.reshape(z, heads, length_q, value_dim).float()).sum(-1).contiguous()
    lse = lse.reshape(z, heads, length_q).contiguous()
    strides = (*q.stride(), *k.stride(), *v.stride(), *_mask_strides(mask), *grad_out.stride())
    sizes = (heads, heads // k.shape[1], length_q, length_k, head_dim, value_dim)
    constants = (inputs.factor, threshold, keep_scale)
    dk = torch.empty((z, heads, length_k, head_dim), dtype=torch.float32, device=q.device)
    dv = torch.empty((z, heads, length_k, value_dim), dtype=torch.float32, device=q.device)
    dq = torch.empty((z, heads, length_q, head_dim), dtype=torch.float32, device=q.device)
    mask_arg = _mask_arg(mask, q)
    with _device_guard(q.device):
        meta = _meta("backward_kv", q, k, v, mask, is_causal, threshold)
        _backward_kv_kernel[(triton.cdiv(length_k, meta["BLOCK_N"]), z * heads)](
            q, k, v, mask_arg, grad_out, lse, delta, dk, dv, attention_key, *strides, *sizes,
            *constants, **meta,
        )  # fmt: skip
        meta = _meta("backward_q", q, k, v, mask, is_causal, threshold)
        _backward_q_kernel[(triton.cdiv(length_q, meta["BLOCK_M"]), z * heads)](
            q, k, v, mask_arg, grad_out, lse, delta, dq, attention_key, *strides, *sizes,
            *constants, **meta,
        )  # fmt: skip
    kv_heads = k.shape[1]
    if kv_heads != heads:  # grouped-query attention: sum each group's query heads
        dk = dk.view(z, kv_heads, heads // kv_heads, length_k, head_dim).sum(2)
        dv = dv.view(z, kv_heads, heads // kv_heads, length_k, value_dim).sum(2)
    return (
        _grad_of(dq, query, inputs.batch),
        _grad_of(dk, key, inputs.key_batch),
        _grad_of(dv, value, inputs.key_batch),
    )
