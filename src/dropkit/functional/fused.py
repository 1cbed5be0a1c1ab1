"""Fused neighbours of dropout; documentation lives on the modules."""

from __future__ import annotations

import torch

from dropkit._validation import check_bool, check_floating_tensor, check_probability
from dropkit.engine import ops
from dropkit.functional._common import SeedLike, resolve_key

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
    input = check_floating_tensor(input)
    bias = _check_operand(bias, "bias", input)
    residual = _check_operand(residual, "residual", input)
    p = check_probability(p)
    check_bool(training, "training")
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
    if not training or p == 0.0:
        # The same arithmetic as the op with every element kept: one rounding to the input dtype.
        compute = ops.compute_dtype(input.dtype)
        return (residual.to(compute) + (input.to(compute) + bias.to(compute))).to(input.dtype)
    key = resolve_key(input, seed, generator)
    return ops.bias_dropout_add(input, bias, residual, key, p)
