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
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as torch_F
from torch.autograd.function import once_differentiable

from dropkit import ops
from dropkit._validation import check_bool, check_floating_tensor, check_int
from dropkit.engine.numerics import as_rate_tensor, drop_threshold, inverted_scale, rate_value
from dropkit.functional._common import SeedLike, check_rate, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.functional.dropout import dropout
from dropkit.functional.fused import fused_bias_dropout_add
from dropkit.kernels.attention import (
    attention_inputs,
    attention_weights,
    batch_shape,
    block_rows,
    fused_applies,
    score_factor,
)
from dropkit.kernels.attention import backward as attention_backward
from dropkit.kernels.attention import forward as attention_forward
from dropkit.ops import Rate

__all__ = ["BLOCKED_MIN_ELEMENTS", "residual_dropout", "scaled_dot_product_attention"]


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
    gqa = check_bool(enable_gqa, "enable_gqa")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"key must have the query's feature size {query.shape[-1]}, got key of shape {tuple(key.shape)}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"value must have the key's length {key.shape[-2]}, got value of shape {tuple(value.shape)}"
        )
    if gqa and query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        heads, kv_heads = query.shape[-3], key.shape[-3]
        if heads % kv_heads != 0 or value.dim() < 3 or value.shape[-3] != kv_heads:
            raise ValueError(
                "with enable_gqa the query heads must be a multiple of the key/value heads, got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)}"
            )
    try:
        batch = batch_shape(query, key, value, gqa)
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
    """Softmax attention weights ``(..., L, S)`` and values in the compute dtype (materialised path)."""
    q, k, v = attention_inputs(query, key, value, enable_gqa)
    return attention_weights(q, k, attn_mask, is_causal, score_factor(q.shape[-1], scale)), v


# --- attention without materialised weights ---------------------------------------------------
#
# The fused kernels (CUDA) and the blocked path (from BLOCKED_MIN_ELEMENTS weights, or with
# block_size=) compute attention without keeping the weights: dropkit.kernels.attention's
# forward and backward, which draw the materialised path's masks (each weight reads the mask
# element of its index in the whole weights).  Eager calls run them as an autograd.Function;
# traced calls (torch.compile, torch.export) as the custom ops dropkit::engine_attention and
# dropkit::engine_attention_backward, so that a compiled model keeps nothing per weight either.

#: Attention weights (``batch * L * S`` elements) from which a call takes the blocked path where
#: the fused kernels do not apply: 8 MiB of float32.  Measured on the CPU
#: (benchmarks/bench_transformer.py): from there on the blocked path, which skips the keys a causal
#: block never attends to but recomputes the scores in backward, is about as fast as the
#: materialised one (faster for causal attention), and keeps nothing per weight.
BLOCKED_MIN_ELEMENTS = 1 << 21

# (is_causal, scale, enable_gqa, threshold, keep_scale, fused, block) of one call.
_Options = tuple[bool, float | None, bool, int, float, bool, int]


class _EngineAttention(torch.autograd.Function):
    """Eager calls: :func:`dropkit.kernels.attention.forward` and ``backward`` as an autograd
    Function; it keeps the inputs, the output, the log-sum-exp and the key."""

    @staticmethod
    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        attention_key: torch.Tensor,
        options: _Options,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        is_causal, scale, enable_gqa, threshold, keep_scale, fused, block = options
        return attention_forward(
            query, key, value, attn_mask, is_causal, scale, enable_gqa, attention_key, threshold, keep_scale,
            fused, block,
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        query, key, value, attn_mask, attention_key, options = inputs
        out, lse = output
        fused = options[5]  # the output is needed by the fused kernels' backward only
        ctx.save_for_backward(query, key, value, attn_mask, attention_key, out if fused else None, lse)
        ctx.options = options
        ctx.mark_non_differentiable(lse)

    @staticmethod
    @once_differentiable  # the backward reads storage (kernels): no double backward
    def backward(ctx: Any, grad_out: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        query, key, value, attn_mask, attention_key, out, lse = ctx.saved_tensors
        is_causal, scale, enable_gqa, threshold, keep_scale, fused, block = ctx.options
        needs = tuple(ctx.needs_input_grad[:3])
        grads = attention_backward(
            grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, enable_gqa, attention_key,
            threshold, keep_scale, fused, block, needs,
        )  # fmt: skip
        return *(grad if need else None for grad, need in zip(grads, needs, strict=True)), None, None, None


def _engine_attention_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    attention_key: torch.Tensor,
    rate: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    fused: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = rate_value(rate, "dropout_p")
    return attention_forward(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, attention_key, drop_threshold(p),
        inverted_scale(p), fused, block,
    )  # fmt: skip


_engine_attention_op = torch.library.custom_op(
    "dropkit::engine_attention",
    _engine_attention_impl,
    mutates_args=(),
    schema="(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor attention_key, Tensor rate, "
    "bool is_causal, float? scale, bool enable_gqa, bool fused, int block) -> (Tensor, Tensor)",
)


@_engine_attention_op.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    attention_key: torch.Tensor,
    rate: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    fused: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = batch_shape(query, key, value, enable_gqa)
    out = query.new_empty((*batch, query.shape[-2], value.shape[-1]))
    lse_shape = (*batch, query.shape[-2]) if fused else (0,)
    return out, query.new_empty(lse_shape, dtype=torch.float32)


def _engine_attention_backward_impl(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    attention_key: torch.Tensor,
    rate: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    fused: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = rate_value(rate, "dropout_p")
    grads = attention_backward(
        grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, enable_gqa, attention_key,
        drop_threshold(p), inverted_scale(p), fused, block,
    )  # fmt: skip
    grad_query, grad_key, grad_value = (grad.contiguous() for grad in grads)  # the fake's layout
    return grad_query, grad_key, grad_value


_engine_attention_backward_op = torch.library.custom_op(
    "dropkit::engine_attention_backward",
    _engine_attention_backward_impl,
    mutates_args=(),
    schema="(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
    "Tensor attention_key, Tensor rate, Tensor? out, Tensor lse, bool is_causal, float? scale, "
    "bool enable_gqa, bool fused, int block) -> (Tensor, Tensor, Tensor)",
)


@_engine_attention_backward_op.register_fake
def _(
    grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _engine_attention_setup(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    query, key, value, attn_mask, attention_key, rate, *options = inputs
    out, lse = output
    fused = options[3]  # the output is needed by the fused kernels' backward only
    ctx.save_for_backward(query, key, value, attn_mask, attention_key, rate, out if fused else None, lse)
    ctx.options = options


def _engine_attention_backward(ctx: Any, grad_out: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
    grads = _engine_attention_backward_op(grad_out, *ctx.saved_tensors, *ctx.options)
    return *grads, None, None, None, None, None, None, None, None


_engine_attention_op.register_autograd(_engine_attention_backward, setup_context=_engine_attention_setup)


def _route(*tensors: torch.Tensor | None) -> str:
    """How a call that may skip the weights runs: ``"eager"`` (plain eager tensors outside
    ``torch.func`` transforms, forward AD and dispatch or function modes: the autograd.Function),
    ``"op"`` (traced: ``torch.compile``, ``torch.export``, fake tensors and modes: the custom op)
    or ``"materialised"`` (``torch.func`` transforms and forward AD, which the two have no rules
    for)."""
    if torch.compiler.is_compiling():
        return "op"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "materialised"
    if getattr(forward_ad, "_current_level", -1) >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        return "materialised"
    if (
        all(t is None or type(t) is torch.Tensor for t in tensors)
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    ):
        return "eager"
    return "op"


def _engine_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: Rate,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    attention_key: torch.Tensor,
    block_size: int | None,
) -> torch.Tensor:
    """Attention with the weights dropped by the engine's mask of ``attention_key``: the fused
    kernels where they apply, else the blocked path (from :data:`BLOCKED_MIN_ELEMENTS` weights, or
    with ``block_size``), else the materialised path.  Every path draws the same mask."""
    route = "materialised"
    if attn_mask is None or not attn_mask.requires_grad:  # a mask's gradient: materialised
        route = _route(
            query, key, value, attn_mask, dropout_p if isinstance(dropout_p, torch.Tensor) else None
        )
    if route != "materialised":
        fused = fused_applies(query, key, value, attn_mask, traced=route == "op")
        batch = math.prod(batch_shape(query, key, value, enable_gqa))
        length, source = query.shape[-2], key.shape[-2]
        if fused or block_size is not None or batch * length * source >= BLOCKED_MIN_ELEMENTS:
            block = block_rows(batch, length, source, block_size)
            if route == "eager":
                p = rate_value(dropout_p, "dropout_p")
                options = (is_causal, scale, enable_gqa, drop_threshold(p), inverted_scale(p), fused, block)
                out, _ = _EngineAttention.apply(query, key, value, attn_mask, attention_key, options)
            else:
                out, _ = _engine_attention_op(
                    query, key, value, attn_mask, attention_key, as_rate_tensor(dropout_p), is_causal, scale,
                    enable_gqa, fused, block,
                )  # fmt: skip
            return out
    weights, v = _attention_weights_and_values(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    weights = ops.masked_affine(weights, attention_key, dropout_p, [], "inverted", "dropout_p")
    return torch.matmul(weights, v).to(query.dtype)


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
    block_size: int | None = None,
) -> torch.Tensor:
    """Attention with dropout on the attention weights; see :class:`dropkit.nn.ScaledDotProductAttention`.

    The arguments before ``*`` are those of :func:`torch.nn.functional.scaled_dot_product_attention`
    (``attn_mask``: bool, True = take part, or float, added to the scores).  Dropout is applied
    only when ``training`` is true and ``dropout_p > 0``; otherwise the call is torch's kernel
    with ``dropout_p=0``.  With ``use_engine=True`` (default) the weights are dropped by the
    mask that :func:`dropkit.functional.dropout` draws for them with the key of ``seed`` /
    ``generator`` (or the global functional stream); ``use_engine=False`` passes ``dropout_p`` to
    torch's fused kernel, whose mask comes from torch's RNG (``seed``/``generator`` refused).

    The engine path runs, with the same mask on every one: the fused Triton kernel on CUDA
    (float16/bfloat16/float32 inputs and head dims up to 128), the blocked path (weights of at
    least :data:`BLOCKED_MIN_ELEMENTS` elements, or ``block_size`` given: the query rows per
    block), else the materialised weights, which ``torch.func`` transforms, forward-mode AD and a
    float ``attn_mask`` that requires grad always take.  A query row
    that attends nowhere (a bool ``attn_mask`` row all False, a float one all ``-inf``) gives
    zeros, never NaN, with zero gradients; float16 and bfloat16 inputs are computed in float32
    and rounded once.  :func:`dropkit.mc.mc_dropout` runs the attention dropout it intercepts by
    this path's maths.
    """
    query, key, value = _check_attention_args(query, key, value, attn_mask, is_causal, enable_gqa)
    dropout_p = check_rate(dropout_p, "dropout_p")
    scale = _check_scale(scale)
    check_bool(training, "training")
    check_bool(use_engine, "use_engine")
    check_seed(seed, generator)
    if block_size is not None:
        check_int(block_size, "block_size", 1)
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
    attention_key = resolve_key(query, seed, generator)
    return _engine_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_key, block_size
    )


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
