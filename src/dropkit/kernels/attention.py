"""Attention with dropout on the weights, computed without keeping them: the mask index, the
weights of a block of query rows, the blocked path, and the dispatch to the fused kernels.

The mask index (the one definition every attention path follows).  Attention weights of shape
``(*batch, L, S)`` are dropped with the engine's element mask of that shape
(:mod:`dropkit.engine.masks`): weight ``(b, i, j)``, ``b`` the row-major index over the batch
dims, reads the 16-bit draw of mask element

    ``n = (b * L + i) * S + j``

under the call's key.  So row ``i`` of batch element ``b`` is one contiguous run of mask elements
starting at ``(b * L + i) * S`` (:func:`row_starts`), whatever block of rows or tile of keys a
path computes at a time: the materialised path (:func:`attention_weights` of every row, then
:func:`dropkit.functional.dropout`), the blocked path here (blocks of query rows, and for causal
attention only the keys they attend to) and the Triton kernels of
:mod:`dropkit.kernels.triton_attention` (tiles, the same ``n`` in device code) drop the same
weights.

:func:`drop_rows` applies that mask to a block of weights computed in the compute dtype (float32,
or float64), with the arithmetic of :func:`dropkit.engine.reference.masked_affine`
(``where(keep, w * keep_scale, 0)``, the scale rounded once to the compute dtype): the numba
kernel of :mod:`dropkit.kernels.attention_cpu` on the CPU, this module's reference code
elsewhere (or when :func:`dropkit.use_reference_engine` forces it, or numba is missing).  Being
linear in ``w``, the same call is its own gradient.

:func:`forward` and :func:`backward` compute attention and its gradients from the arguments as
:func:`dropkit.functional.scaled_dot_product_attention` takes them: on the fused kernels
(``fused=True``; a kernel that fails is switched off with one
:class:`~dropkit.kernels.KernelFallbackWarning` and the blocked path answers, with the same
masks) or on the blocked path.  Nothing per weight passes from one to the other: the backward
recomputes the weights (from the saved log-sum-exp, on the fused kernels) and regenerates the
masks from the key.  The functional wraps the pair as an ``autograd.Function`` (eager) and as a
``torch.library`` custom op (``torch.compile``, ``torch.export``).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from dropkit.engine.numerics import THRESHOLD_SCALE, compute_dtype
from dropkit.engine.philox import MASK32, philox4x32
from dropkit.kernels import dispatch

__all__ = [
    "MAX_HEAD_DIM",
    "attention_inputs",
    "attention_weights",
    "backward",
    "batch_shape",
    "block_rows",
    "drop_rows",
    "forward",
    "fused_attention_failed",
    "fused_applies",
    "fused_attention_kernels",
    "fused_supports",
    "masked_scores",
    "row_starts",
    "run_draws",
    "score_factor",
]

_ELEMENTS_PER_COUNTER = 8

# The numba kernel of drop_rows (CPU) and the fused attention kernels (Triton, CUDA), loaded on
# first use and switched off for good, with one KernelFallbackWarning, when they fail.
_ROW_KERNELS: dict[str, dispatch._Backend] = {}
_FUSED: dict[str, dispatch._Backend] = {}


def _check_row_kernels(module: ModuleType) -> None:
    """Refuse a numba build whose bits differ from the reference (as the dropout kernels do)."""
    key = torch.tensor([0x123456789, 7, 11], dtype=torch.int64)
    weights = torch.ones(15, 6)
    starts = row_starts(3, 9, 7, 2, 5)
    got = module.drop_rows(weights, key, 1 << 15, 2.0, starts, False)
    if not torch.equal(got, _drop_rows_reference(weights, key, 1 << 15, 2.0, starts, False)):
        raise RuntimeError("self-check failed: attention masks differ from the reference engine")


_ROW_KERNELS["cpu"] = dispatch._Backend(dispatch.NUMBA, "dropkit.kernels.attention_cpu", _check_row_kernels)
_FUSED["cuda"] = dispatch._Backend(dispatch.TRITON, "dropkit.kernels.triton_attention", None)


# --- the mask -------------------------------------------------------------------------------


def row_starts(
    batch: int, length: int, source: int, row0: int, rows: int, device: torch.device | None = None
) -> torch.Tensor:
    """Mask index of weight ``(b, i, 0)`` for the query rows ``i = row0 .. row0 + rows - 1`` of every
    batch element ``b``: ``(b * length + i) * source``, an int64 tensor of shape ``(batch * rows,)``
    in row-major ``(b, i)`` order (see the module docs)."""
    index = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
    batch_index = torch.arange(batch, dtype=torch.int64, device=device)[:, None]
    return ((batch_index * length + index) * source).view(-1)


def run_draws(key: torch.Tensor, starts: torch.Tensor, count: int) -> torch.Tensor:
    """The 16-bit draws (int64) of mask elements ``starts[b] .. starts[b] + count - 1``: shape
    ``(len(starts), count)``, by the bit layout of :mod:`dropkit.engine.masks` (counter ``n // 8``,
    word ``(n // 2) % 4``, low half for even ``n``)."""
    first = starts >> 3
    span = (count + 2 * _ELEMENTS_PER_COUNTER - 2) // _ELEMENTS_PER_COUNTER  # any alignment
    counters = first[:, None] + torch.arange(span, dtype=torch.int64, device=starts.device)
    seed, stream, step = key[0], key[1], key[2]
    words = philox4x32(
        counters & MASK32,
        (counters >> 32) & MASK32,
        stream & MASK32,
        step & MASK32,
        seed & MASK32,
        (seed >> 32) & MASK32,
    )
    halves = torch.stack([part for word in words for part in (word & 0xFFFF, word >> 16)], dim=-1)
    halves = halves.reshape(len(starts), span * _ELEMENTS_PER_COUNTER)
    offsets = (starts & (_ELEMENTS_PER_COUNTER - 1))[:, None]
    return halves.gather(1, offsets + torch.arange(count, dtype=torch.int64, device=starts.device))


def _drop_rows_reference(
    weights: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    keep_scale: float,
    starts: torch.Tensor,
    inplace: bool,
) -> torch.Tensor:
    keep = run_draws(key, starts.to(weights.device), weights.shape[1]) >= threshold
    scale = torch.tensor(keep_scale, dtype=weights.dtype, device=weights.device)
    result = torch.where(keep, weights * scale, torch.zeros((), dtype=weights.dtype, device=weights.device))
    return weights.copy_(result) if inplace else result


def drop_rows(
    weights: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    keep_scale: float,
    shape: tuple[int, int, int],
    row0: int,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``where(keep, weights * keep_scale, 0)`` for a block of attention weights of ``shape``
    ``(batch, L, S)`` (the batch dims flattened): ``weights`` is a contiguous float32 or float64
    tensor ``(batch, rows, cols)`` holding the query rows ``row0 .. row0 + rows - 1`` and the keys
    ``0 .. cols - 1`` (``cols <= S``), and ``keep`` the engine's mask of the whole weights at those
    positions (see the module docs).  ``threshold`` is the integer drop threshold; written into
    ``weights`` with ``inplace=True``.
    """
    batch, rows, cols = weights.shape
    if threshold == 0 or threshold >= THRESHOLD_SCALE or weights.numel() == 0:
        # Nothing drawn: every weight kept (scaled) or every weight dropped (exact zeros).
        if threshold >= THRESHOLD_SCALE:
            return weights.zero_() if inplace else torch.zeros_like(weights)
        scale = torch.tensor(keep_scale, dtype=weights.dtype, device=weights.device)
        return weights.mul_(scale) if inplace else weights * scale
    starts = row_starts(batch, shape[1], shape[2], row0, rows)
    flat = weights.view(batch * rows, cols)
    backend = None if dispatch._force_reference.get() else _ROW_KERNELS.get(weights.device.type)
    module = None if backend is None else backend.load()
    if backend is not None and module is not None:
        try:
            result: torch.Tensor = module.drop_rows(flat, key, threshold, keep_scale, starts, inplace)
            return result.view(weights.shape)
        except Exception as error:  # a broken kernel costs speed, never a result
            backend.fail(error)
    return _drop_rows_reference(flat, key, threshold, keep_scale, starts, inplace).view(weights.shape)


# --- the weights ----------------------------------------------------------------------------


def batch_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> torch.Size:
    """The batch dims of the attention weights: those of query, key and value broadcast, the key
    and value heads counted as the query's under grouped-query attention."""
    key_batch, value_batch = list(key.shape[:-2]), list(value.shape[:-2])
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        key_batch[-1] = value_batch[-1] = query.shape[-3]
    return torch.broadcast_shapes(query.shape[:-2], torch.Size(key_batch), torch.Size(value_batch))


def attention_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value in the compute dtype, key and value repeated over the query heads."""
    work = compute_dtype(query.dtype)
    q, k, v = query.to(work), key.to(work), value.to(work)
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        repeats = q.shape[-3] // k.shape[-3]  # divisibility checked with the arguments
        k = k.repeat_interleave(repeats, dim=-3)
        v = v.repeat_interleave(repeats, dim=-3)
    return q, k, v


def score_factor(head_dim: int, scale: float | None) -> float:
    """The factor of the scores: ``scale``, or ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def masked_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    factor: float,
    row0: int = 0,
) -> torch.Tensor:
    """Scores ``q k^T * factor`` of the query rows ``q`` (rows ``row0 ..`` of the whole query;
    ``attn_mask`` holds the mask's rows for them) with the mask: ``-inf`` where a bool mask is
    False or causal attention looks ahead, a float mask added."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * factor
    if is_causal:
        length, source = scores.shape[-2], scores.shape[-1]
        attend = torch.ones(length, source, dtype=torch.bool, device=q.device).tril(row0)
        return scores.masked_fill(~attend, float("-inf"))
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return torch.where(
            attn_mask, scores, torch.tensor(float("-inf"), dtype=scores.dtype, device=q.device)
        )
    return scores + attn_mask.to(scores.dtype)


def _softmax(scores: torch.Tensor, guard: bool) -> torch.Tensor:
    if not guard:
        return torch.softmax(scores, dim=-1)
    # Rows with every position masked get zero weights (as torch's kernels give), not NaN; the
    # zero fill before the softmax keeps their gradient finite too.
    empty_row = (scores == float("-inf")).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1)
    return weights.masked_fill(empty_row, 0.0)


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    factor: float,
    row0: int = 0,
) -> torch.Tensor:
    """Softmax attention weights ``(..., rows, S)`` of the query rows ``q`` (see
    :func:`masked_scores`), in the compute dtype: the one computation of the weights, for every row
    at once (the materialised path) or a block of rows at a time (the blocked path)."""
    return _softmax(masked_scores(q, k, attn_mask, is_causal, factor, row0), attn_mask is not None)


# --- the blocked path -----------------------------------------------------------------------

#: Weights per block that the automatic block size aims at (2 MiB of float32, cache-sized).
_BLOCK_ELEMENTS = 1 << 19
_MIN_BLOCK_ROWS = 32


def block_rows(batch: int, length: int, source: int, block_size: int | None) -> int:
    """Query rows per block: ``block_size``, or about :data:`_BLOCK_ELEMENTS` weights a block."""
    if block_size is not None:
        return max(1, min(block_size, length))
    return max(_MIN_BLOCK_ROWS, min(length, _BLOCK_ELEMENTS // max(batch * source, 1)))


def _mask_rows(attn_mask: torch.Tensor | None, rows: slice, cols: int) -> torch.Tensor | None:
    """``attn_mask`` (broadcastable to ``(..., L, S)``) for the query rows ``rows`` and the keys
    ``0 .. cols - 1``."""
    if attn_mask is None:
        return None
    if attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1:
        attn_mask = attn_mask[..., rows, :]
    return attn_mask if attn_mask.shape[-1] == 1 else attn_mask[..., :cols]


def _blocks(length: int, source: int, block: int, is_causal: bool) -> list[tuple[int, slice, int]]:
    """``(row0, rows, cols)`` of every block: its query rows and the keys ``0 .. cols - 1`` they
    attend to (a causal row ``i`` attends keys ``j <= i`` only, so later keys are skipped)."""
    blocks = []
    for row0 in range(0, length, block):
        rows = slice(row0, min(length, row0 + block))
        blocks.append((row0, rows, min(source, rows.stop) if is_causal else source))
    return blocks


def _prepared(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_inputs` expanded (views) to the batch dims of the weights."""
    batch = batch_shape(query, key, value, enable_gqa)
    q, k, v = attention_inputs(query, key, value, enable_gqa)
    return q.expand(*batch, *q.shape[-2:]), k.expand(*batch, *k.shape[-2:]), v.expand(*batch, *v.shape[-2:])


def _blocked_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    factor: float,
    attention_key: torch.Tensor,
    threshold: int,
    keep_scale: float,
    block: int,
    with_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (compute dtype) and, with ``with_lse``, the log-sum-exp of every query row's scores
    as the fused kernels save it (``+inf`` for a row that attends nowhere), of prepared inputs."""
    length, source = q.shape[-2], k.shape[-2]
    shape = (math.prod(q.shape[:-2]), length, source)
    out = q.new_empty((*q.shape[:-2], length, v.shape[-1]))
    lse = torch.empty((*q.shape[:-2], length) if with_lse else (0,), dtype=torch.float32, device=q.device)
    for row0, rows, cols in _blocks(length, source, block, is_causal):
        scores = masked_scores(
            q[..., rows, :], k[..., :cols, :], _mask_rows(attn_mask, rows, cols), is_causal, factor, row0
        )
        if with_lse:
            row_lse = torch.logsumexp(scores, dim=-1)
            lse[..., rows] = torch.where(row_lse == float("-inf"), float("inf"), row_lse)
        weights = _softmax(scores, attn_mask is not None).contiguous()
        dropped = drop_rows(
            weights.view(-1, *weights.shape[-2:]),
            attention_key,
            threshold,
            keep_scale,
            shape,
            row0,
            inplace=True,
        )
        out[..., rows, :] = torch.matmul(dropped.view(weights.shape), v[..., :cols, :])
    return out, lse


def _blocked_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    factor: float,
    attention_key: torch.Tensor,
    threshold: int,
    keep_scale: float,
    block: int,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (compute dtype, the prepared inputs' shapes) of prepared inputs: each block's
    weights recomputed, its mask regenerated."""
    length, source = q.shape[-2], k.shape[-2]
    shape = (math.prod(q.shape[:-2]), length, source)
    grad_out = grad_out.to(q.dtype)
    grad_q, grad_k, grad_v = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for row0, rows, cols in _blocks(length, source, block, is_causal):
        q_rows, grad_rows, k_cols = q[..., rows, :], grad_out[..., rows, :], k[..., :cols, :]
        mask = _mask_rows(attn_mask, rows, cols)
        weights = attention_weights(q_rows, k_cols, mask, is_causal, factor, row0).contiguous()
        flat = weights.view(-1, *weights.shape[-2:])
        if needs[2]:
            dropped = drop_rows(flat, attention_key, threshold, keep_scale, shape, row0)
            grad_v[..., :cols, :] += torch.matmul(dropped.view(weights.shape).mT, grad_rows)
            del dropped
        if not (needs[0] or needs[1]):
            continue
        # The dropout is linear: its gradient is the same mask and scale on the gradient.
        grad_weights = torch.matmul(grad_rows, v[..., :cols, :].mT).contiguous()
        drop_rows(
            grad_weights.view(flat.shape), attention_key, threshold, keep_scale, shape, row0, inplace=True
        )
        # Softmax backward, in place: dS = P * (dP - sum_j P dP); the score factor goes on the
        # (smaller) products with k and q.
        row_dot = (grad_weights * weights).sum(dim=-1, keepdim=True)
        grad_scores = grad_weights.sub_(row_dot).mul_(weights)
        if needs[0]:
            grad_q[..., rows, :] = torch.matmul(grad_scores, k_cols).mul_(factor)
        if needs[1]:
            grad_k[..., :cols, :].add_(torch.matmul(grad_scores.mT, q_rows), alpha=factor)
    return grad_q, grad_k, grad_v


def _reduced(grad: torch.Tensor, like: torch.Tensor, heads: int | None) -> torch.Tensor:
    """The gradient of the prepared (broadcast, repeated over ``heads`` query heads) form of
    ``like``, summed back to ``like``'s shape and cast to its dtype."""
    if heads is not None and like.shape[-3] != heads:
        grad = grad.sum_to_size(*like.shape[:-3], heads, *grad.shape[-2:])
        grad = grad.unflatten(-3, (like.shape[-3], heads // like.shape[-3])).sum(dim=-3)
    return grad.sum_to_size(like.shape).to(like.dtype)


# --- one call, on the fused kernels or the blocked path -------------------------------------


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
    fused: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: attention of checked arguments with the weights dropped by the mask of
    ``attention_key`` (``threshold``: the integer drop threshold, ``keep_scale``: ``1/q``), on the
    fused kernels (``fused=True``; ``lse`` of shape ``(*batch, L)``) or on the blocked path with
    ``block`` query rows a block (``lse`` empty; with ``fused=True`` the fallback computes it)."""
    if fused:
        module = fused_attention_kernels(query.device)
        if module is not None:
            try:
                result: tuple[torch.Tensor, torch.Tensor] = module.forward(
                    query,
                    key,
                    value,
                    attn_mask,
                    is_causal,
                    scale,
                    enable_gqa,
                    attention_key,
                    threshold,
                    keep_scale,
                )
                return result
            except Exception as error:  # a broken kernel costs speed, never a result
                fused_attention_failed(query.device, error)
    q, k, v = _prepared(query, key, value, enable_gqa)
    factor = score_factor(query.shape[-1], scale)
    out, lse = _blocked_forward(
        q, k, v, attn_mask, is_causal, factor, attention_key, threshold, keep_scale, block, fused
    )
    return out.to(query.dtype), lse


def backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    attention_key: torch.Tensor,
    threshold: int,
    keep_scale: float,
    fused: bool,
    block: int,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`forward`'s output with respect to ``query``, ``key`` and ``value`` (zeros
    where ``needs`` says a gradient is not needed, on the blocked path); ``out`` is needed with
    ``fused=True`` only."""
    if fused and out is not None:
        module = fused_attention_kernels(query.device)
        if module is not None:
            try:
                grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = module.backward(
                    grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, enable_gqa,
                    attention_key, threshold, keep_scale,
                )  # fmt: skip
                return grads
            except Exception as error:  # the blocked path has the same masks: same gradients
                fused_attention_failed(query.device, error)
    q, k, v = _prepared(query, key, value, enable_gqa)
    factor = score_factor(query.shape[-1], scale)
    grad_q, grad_k, grad_v = _blocked_backward(
        grad_out, q, k, v, attn_mask, is_causal, factor, attention_key, threshold, keep_scale, block, needs
    )
    heads = query.shape[-3] if enable_gqa and query.dim() >= 3 and key.dim() >= 3 else None
    return _reduced(grad_q, query, None), _reduced(grad_k, key, heads), _reduced(grad_v, value, heads)


# --- the kernels ----------------------------------------------------------------------------


#: The largest head dim (of the query/key and of the value) the fused kernels take.
MAX_HEAD_DIM = 128
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_supports(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None
) -> bool:
    """Whether the fused kernels take these (checked) arguments: float16, bfloat16 or float32
    inputs, head dims up to :data:`MAX_HEAD_DIM`, at least one query, one key and one feature (a
    pure function of shapes and dtypes, so that a traced call decides as an eager one does)."""
    if query.dtype not in _FUSED_DTYPES or query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return False
    if query.shape[-2] == 0 or key.shape[-2] == 0 or query.shape[-1] == 0 or value.shape[-1] == 0:
        return False
    return attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.is_floating_point()


def fused_applies(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    *,
    traced: bool = False,
) -> bool:
    """Whether a call runs on the fused kernels: a device that has them, loaded (eager calls; a
    traced call only asks that the device has them: the op checks, and falls back, when it runs)
    and not switched off, and :func:`fused_supports` arguments."""
    if not fused_supports(query, key, value, attn_mask):
        return False
    return query.device.type in _FUSED if traced else fused_attention_kernels(query.device) is not None


def fused_attention_kernels(device: torch.device) -> ModuleType | None:
    """The fused attention kernels for tensors on ``device`` (Triton, on CUDA), or ``None``: no
    kernel for the device, the reference engine forced, or the kernels failed to load."""
    if dispatch._force_reference.get():
        return None
    backend = _FUSED.get(device.type)
    return None if backend is None else backend.load()


def fused_attention_failed(device: torch.device, error: BaseException) -> None:
    """Switch the fused attention kernels of ``device`` off for the rest of the process (one
    :class:`~dropkit.kernels.KernelFallbackWarning`)."""
    backend = _FUSED.get(device.type)
    if backend is not None:
        backend.fail(error)
