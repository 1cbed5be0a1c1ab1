"""Dropout placements of transformer blocks as functions; documentation lives on the modules.

* :func:`scaled_dot_product_attention`: attention with dropout on the attention weights, drawn
  by dropkit's engine (reproducible, keyed like every other dropkit mask), or delegated to
  :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels, torch's RNG).
* :func:`residual_dropout`: ``residual + dropout(input + bias)``, the sub-layer output dropout
  before the residual add (fused when a bias is given); the one API of that operation
  (:func:`dropkit.functional.bias_dropout_add` is its deprecated alias).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as torch_F

from dropkit import ops
from dropkit._validation import check_bool, check_floating_tensor
from dropkit.engine.numerics import compute_dtype
from dropkit.functional._common import SeedLike, check_rate, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.functional.dropout import dropout
from dropkit.functional.fused import fused_bias_dropout_add
from dropkit.ops import Rate

__all__ = ["residual_dropout", "scaled_dot_product_attention"]


def _check_like(value: object, name: str, query: torch.Tensor) -> torch.Tensor:
    tensor = check_floating_tensor(value, name)
    if tensor.dtype != query.dtype:
        raise TypeError(f"{name} must have the query's dtype {query.dtype}, got {tensor.dtype}")
    if tensor.device != query.device:
        raise ValueError(f"{name} must be on the query's device {query.device}, got {tensor.device}")
    if tensor.dim() < 2:
        raise ValueError(
            f"{name} must be at least 2-D (..., length, features), got shape {tuple(tensor.shape)}"
        )
    return tensor


def _check_scale(scale: object) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} ({scale!r})")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _check_attention_args(
    query: object,
    key: object,
    value: object,
    attn_mask: object,
    is_causal: object,
    enable_gqa: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    query = check_floating_tensor(query, "query")
    if query.dim() < 2:
        raise ValueError(f"query must be at least 2-D (..., L, E), got shape {tuple(query.shape)}")
    key = _check_like(key, "key", query)
    value = _check_like(value, "value", query)
    check_bool(is_causal, "is_causal")
    check_bool(enable_gqa, "enable_gqa")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"key must have the query's feature size {query.shape[-1]}, got key of shape {tuple(key.shape)}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"value must have the key's length {key.shape[-2]}, got value of shape {tuple(value.shape)}"
        )
    key_batch, value_batch = list(key.shape[:-2]), list(value.shape[:-2])
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        heads, kv_heads = query.shape[-3], key.shape[-3]
        if heads % kv_heads != 0 or value.dim() < 3 or value.shape[-3] != kv_heads:
            raise ValueError(
                "with enable_gqa the query heads must be a multiple of the key/value heads, got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)}"
            )
        key_batch[-1] = value_batch[-1] = heads
    try:
        batch = torch.broadcast_shapes(query.shape[:-2], torch.Size(key_batch), torch.Size(value_batch))
    except RuntimeError:
        raise ValueError(
            "the batch dims of query, key and value must broadcast, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        ) from None
    weights_shape = (*batch, query.shape[-2], key.shape[-2])
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be a bool or floating-point tensor, got dtype {attn_mask.dtype}")
        if is_causal:
            raise ValueError("pass at most one of attn_mask and is_causal=True, got both")
        try:
            broadcast = torch.broadcast_shapes(attn_mask.shape, weights_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(weights_shape):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention "
                f"weights of shape {weights_shape} (..., L, S)"
            )
    return query, key, value


def _attention_weights_and_values(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention weights ``(..., L, S)`` and values in the compute dtype (explicit path)."""
    work = compute_dtype(query.dtype)
    q, k, v = query.to(work), key.to(work), value.to(work)
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        repeats = q.shape[-3] // k.shape[-3]  # divisibility checked with the arguments
        k = k.repeat_interleave(repeats, dim=-3)
        v = v.repeat_interleave(repeats, dim=-3)
    factor = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * factor
    length, source = scores.shape[-2], scores.shape[-1]
    if is_causal:
        attend = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~attend, float("-inf"))
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, torch.tensor(float("-inf"), dtype=work, device=q.device))
        else:
            scores = scores + attn_mask.to(work)
    if attn_mask is None:
        return torch.softmax(scores, dim=-1), v
    # Rows with every position masked get zero weights (as torch's kernels give), not NaN; the
    # zero fill before the softmax keeps their gradient finite too.
    empty_row = (scores == float("-inf")).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1)
    return weights.masked_fill(empty_row, 0.0), v


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: Rate = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    training: bool = True,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
    use_engine: bool = True,
) -> torch.Tensor:
    """Attention with dropout on the attention weights; see :class:`dropkit.nn.ScaledDotProductAttention`.

    The arguments before ``*`` are those of :func:`torch.nn.functional.scaled_dot_product_attention`
    (``attn_mask``: bool, True = take part, or float, added to the scores).  Dropout is applied
    only when ``training`` is true and ``dropout_p > 0``; otherwise the call is torch's kernel
    with ``dropout_p=0``.  With ``use_engine=True`` (default) the weights are computed
    explicitly and dropped by :func:`dropkit.functional.dropout` with the key of ``seed`` /
    ``generator`` (or the global functional stream); ``use_engine=False`` passes ``dropout_p`` to
    torch's fused kernel, whose mask comes from torch's RNG (``seed``/``generator`` refused).

    On the explicit path a query row that attends nowhere (a bool ``attn_mask`` row all False,
    a float one all ``-inf``) gives zeros, never NaN, with zero gradients; float16 and bfloat16
    inputs are computed in float32 and rounded once.  :func:`dropkit.mc.mc_dropout` runs the
    attention dropout it intercepts by this path's maths.
    """
    query, key, value = _check_attention_args(query, key, value, attn_mask, is_causal, enable_gqa)
    dropout_p = check_rate(dropout_p, "dropout_p")
    scale = _check_scale(scale)
    check_bool(training, "training")
    check_bool(use_engine, "use_engine")
    check_seed(seed, generator)
    if not use_engine and (seed is not None or generator is not None):
        raise ValueError(
            "seed and generator fix dropkit's engine masks and need use_engine=True, got use_engine=False"
        )
    if not use_engine and isinstance(dropout_p, torch.Tensor):
        raise ValueError(
            "a rate held in a tensor needs use_engine=True (torch's fused kernel takes a float), "
            "got use_engine=False"
        )
    # A tensor rate is never read here (a compiled graph must not branch on it): a training call
    # takes the explicit path, where the dropout op reads it, also when it holds 0.
    active = training and (isinstance(dropout_p, torch.Tensor) or dropout_p > 0.0)
    if not (active and use_engine):
        return torch_F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=float(dropout_p) if active else 0.0,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    weights, v = _attention_weights_and_values(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    weights = ops.masked_affine(
        weights, resolve_key(weights, seed, generator), dropout_p, [], "inverted", "dropout_p"
    )
    return torch.matmul(weights, v).to(query.dtype)


def residual_dropout(
    input: torch.Tensor,
    residual: torch.Tensor,
    p: Rate = 0.1,
    training: bool = True,
    *,
    bias: torch.Tensor | None = None,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + dropout(input + bias, p)``; see :class:`dropkit.nn.ResidualDropout`.

    With a ``bias`` this is the fused bias-dropout-add (one pass, no mask kept for backward;
    the deprecated :func:`dropkit.functional.bias_dropout_add` is this call); without one,
    ``residual + dropout(input)``.  Either way the mask is the one
    :func:`dropkit.functional.dropout` draws for the same key.
    """
    input, residual = _check_residual_args(input, residual, training)
    check_seed(seed, generator)
    if bias is not None:
        return fused_bias_dropout_add(input, bias, residual, p, training, seed=seed, generator=generator)
    p = check_rate(p)
    _check_residual_like(input, residual)
    return residual + dropout(input, p, training, seed=seed, generator=generator)


def _check_residual_args(
    input: object, residual: object, training: object
) -> tuple[torch.Tensor, torch.Tensor]:
    input = check_floating_tensor(input)
    residual = check_floating_tensor(residual, "residual")
    check_bool(training, "training")
    return input, residual


def _check_residual_like(input: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.dtype != input.dtype:
        raise TypeError(f"residual must have the input's dtype {input.dtype}, got {residual.dtype}")
    if residual.shape != input.shape:
        raise ValueError(
            f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}"
        )
