"""Fused neighbours of dropout; documentation lives on the modules."""

from __future__ import annotations

from typing import Any

import torch

from dropkit._validation import check_bool, check_floating_tensor, check_probability, check_probability_tensor
from dropkit.engine import ops
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._tensor_rate import read_rate, register_tensor_rate_variant
from dropkit.functional.dropout import dropout_tensor_rate_op

__all__ = ["bias_dropout_add"]


def _check_operand(value: object, name: str, input: torch.Tensor) -> torch.Tensor:
    tensor = check_floating_tensor(value, name)
    if tensor.dtype != input.dtype:
        raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {tensor.dtype}")
    if tensor.device != input.device:
        raise ValueError(f"{name} must be on the input's device {input.device}, got {tensor.device}")
    return tensor


def bias_dropout_add(
    input: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + dropout(input + bias, p)`` in one pass; see :class:`dropkit.nn.BiasDropoutAdd`.

    ``bias`` broadcasts to ``input`` (typically of shape ``(input.shape[-1],)``) and ``residual``
    has the input's shape; all three share dtype and device.  The mask is the one
    ``dropkit.functional.dropout(input + bias, p, seed=...)`` draws for the same key.
    """
    input, bias, residual = _check_operands(input, bias, residual)
    p = check_probability(p)
    check_bool(training, "training")
    if not training or p == 0.0:
        return _sum_all(input, bias, residual)
    key = resolve_key(input, seed, generator)
    return ops.bias_dropout_add(input, bias, residual, key, p)


def _sum_all(input: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    # The same arithmetic as the op with every element kept: one rounding to the input dtype.
    compute = ops.compute_dtype(input.dtype)
    return (residual.to(compute) + (input.to(compute) + bias.to(compute))).to(input.dtype)


def _check_operands(
    input: object, bias: object, residual: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    input = check_floating_tensor(input)
    bias = _check_operand(bias, "bias", input)
    residual = _check_operand(residual, "residual", input)
    # Trailing-aligned broadcasting that leaves the input's shape unchanged (the output's shape).
    trailing = input.shape[input.dim() - bias.dim() :] if bias.dim() <= input.dim() else None
    if trailing is None or any(
        size not in (1, target) for size, target in zip(bias.shape, trailing, strict=True)
    ):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} does not broadcast to the input shape {tuple(input.shape)}"
        )
    if residual.shape != input.shape:
        raise ValueError(
            f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}"
        )
    return input, bias, residual


# --- rates held in tensors (see dropkit.functional._tensor_rate) --------------------------------


@torch.library.custom_op("dropkit::bias_dropout_add_tensor_rate", mutates_args=())
def bias_dropout_add_tensor_rate_op(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """``residual + dropout(x + bias)`` with the rate read from ``p`` at run time: the float path
    :func:`bias_dropout_add` on the value read (same bits)."""
    return bias_dropout_add(x, bias, residual, read_rate(p), True, seed=key)


@bias_dropout_add_tensor_rate_op.register_fake
def _(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(x)


def _tensor_rate_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    # The key, the rate and two shapes: zero bytes per element, like dropkit::bias_dropout_add.
    ctx.save_for_backward(inputs[3], inputs[4])
    ctx.bias_shape = inputs[1].shape
    ctx.residual_shape = inputs[2].shape


def _tensor_rate_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    # The gradients of dropkit::bias_dropout_add (at p = 0 the float path's plain sums give the
    # same: dx = dy * 1), with the rate read at run time by the dropout op.
    key, p = ctx.saved_tensors
    grad_x = grad_bias = grad_residual = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x = dropout_tensor_rate_op(grad, key, p, [], True)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_x.sum_to_size(ctx.bias_shape)
    if ctx.needs_input_grad[2]:
        grad_residual = grad.sum_to_size(ctx.residual_shape)
    return grad_x if ctx.needs_input_grad[0] else None, grad_bias, grad_residual, None, None


bias_dropout_add_tensor_rate_op.register_autograd(_tensor_rate_backward, setup_context=_tensor_rate_setup)


def _bias_dropout_add_tensor_rate(
    input: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    p: torch.Tensor,
    training: bool = True,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`bias_dropout_add` with ``p`` a floating-point tensor of shape ``()`` or ``(1,)``."""
    check_probability_tensor(p)
    if not torch.compiler.is_compiling():
        return bias_dropout_add(input, bias, residual, float(p), training, seed=seed, generator=generator)
    input, bias, residual = _check_operands(input, bias, residual)
    check_bool(training, "training")
    if not training:
        return _sum_all(input, bias, residual)
    key = resolve_key(input, seed, generator)
    return bias_dropout_add_tensor_rate_op(input, bias, residual, key, p.reshape(()))


register_tensor_rate_variant(bias_dropout_add, _bias_dropout_add_tensor_rate)
