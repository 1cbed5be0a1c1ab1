"""The fused ``residual + dropout(input + bias)``; the API is
:func:`dropkit.functional.residual_dropout` (documentation on :class:`dropkit.nn.ResidualDropout`),
and :func:`bias_dropout_add` its deprecated alias."""

from __future__ import annotations

import torch

from dropkit import ops
from dropkit._deprecation import warn_deprecated
from dropkit._validation import check_bool, check_floating_tensor
from dropkit.engine.numerics import compute_dtype
from dropkit.functional._common import SeedLike, check_rate, is_zero, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate

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
    p: Rate = 0.5,
    training: bool = True,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Deprecated alias of ``residual_dropout(input, residual, p, training, bias=bias)``.

    .. deprecated::
        Use :func:`dropkit.functional.residual_dropout` (note its argument order and its default
        ``p = 0.1``); this alias, with its own order and ``p = 0.5``, will be removed in the
        next release.  It gives the same bits as ``residual_dropout`` with a bias.
    """
    warn_deprecated(
        "bias_dropout_add(input, bias, residual, p, training) is deprecated and will be removed in "
        "the next release; use residual_dropout(input, residual, p, training, bias=bias)"
    )
    return fused_bias_dropout_add(input, bias, residual, p, training, seed=seed, generator=generator)


def fused_bias_dropout_add(
    input: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    p: Rate,
    training: bool,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + dropout(input + bias, p)`` in one pass: the fused path of
    :func:`dropkit.functional.residual_dropout` (the one implementation).

    ``bias`` broadcasts to ``input`` (typically of shape ``(input.shape[-1],)``) and ``residual``
    has the input's shape; all three share dtype and device.  The mask is the one
    ``dropkit.functional.dropout(input + bias, p, seed=...)`` draws for the same key.
    """
    input, bias, residual = _check_operands(input, bias, residual)
    p = check_rate(p)
    check_bool(training, "training")
    check_seed(seed, generator)
    if not training or is_zero(p):
        return _sum_all(input, bias, residual)
    key = resolve_key(input, seed, generator)
    return ops.bias_dropout_add(input, bias, residual, key, p)


def _sum_all(input: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    # The same arithmetic as the op with every element kept: one rounding to the input dtype.
    compute = compute_dtype(input.dtype)
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
