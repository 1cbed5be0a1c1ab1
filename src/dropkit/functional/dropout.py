"""Standard and spatial (channel) dropout as functions; documentation lives on the modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from dropkit._validation import (
    check_bool,
    check_probability,
    check_probability_tensor,
    check_rank,
    normalize_dims,
)
from dropkit.engine import ops
from dropkit.functional._common import SeedLike, check_common, finish, resolve_key, scale_by
from dropkit.functional._tensor_rate import TENSOR_RATE_VARIANTS as TENSOR_RATE_VARIANTS
from dropkit.functional._tensor_rate import register_tensor_rate_variant

__all__ = ["dropout", "dropout1d", "dropout2d", "dropout3d"]


def dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    inverted: bool = True,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero elements with probability ``p``; see :class:`dropkit.nn.Dropout`.

    ``broadcast_dims`` lists the dims along which one draw is shared (channel, time-tied or
    token masks); ``seed`` (an int or a key from :func:`dropkit.make_key`) or ``generator``
    fix the mask for this call.
    """
    input = check_common(input, training, inplace)
    p = check_probability(p)
    check_bool(inverted, "inverted")
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    keep_prob = 1.0 - p
    if not training:
        return input if inverted else scale_by(input, keep_prob, inplace)
    if p == 0.0:
        return input
    key = resolve_key(input, seed, generator)
    # Guard 1/q: at p = 1 nothing is kept, so the scale is never applied.
    keep_scale = (1.0 / keep_prob if keep_prob > 0.0 else 0.0) if inverted else 1.0
    output = ops.masked_affine(input, key, p, dims, keep_scale, 0.0, 0.0)
    return finish(input, output, inplace)


# --- rates held in tensors ---------------------------------------------------------------------
# See dropkit.functional._tensor_rate: while torch.compile traces a dropkit module, the rate
# reaches these variants as a one-element tensor and is read at run time by the custom op.


def _dropout_tensor_rate(
    input: torch.Tensor,
    p: torch.Tensor,
    training: bool = True,
    inplace: bool = False,
    *,
    inverted: bool = True,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`dropout` with ``p`` a floating-point tensor of shape ``()`` or ``(1,)``."""
    check_probability_tensor(p)
    if not torch.compiler.is_compiling():
        return dropout(
            input,
            float(p),
            training,
            inplace,
            inverted=inverted,
            broadcast_dims=broadcast_dims,
            seed=seed,
            generator=generator,
        )
    input = check_common(input, training, inplace)
    check_bool(inverted, "inverted")
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    p = p.reshape(())
    if not training:
        if inverted:
            return input
        # 1 - p in float64 (as the float path computes it), rounded once to the compute dtype.
        compute = ops.compute_dtype(input.dtype)
        keep_prob = (1.0 - p.to(torch.float64)).to(device=input.device, dtype=compute)
        return finish(input, (input.to(compute) * keep_prob).to(input.dtype), inplace)
    key = resolve_key(input, seed, generator)
    return finish(input, dropout_tensor_rate_op(input, key, p, dims, inverted), inplace)


@torch.library.custom_op("dropkit::dropout_tensor_rate", mutates_args=())
def dropout_tensor_rate_op(
    x: torch.Tensor, key: torch.Tensor, p: torch.Tensor, broadcast_dims: list[int], inverted: bool
) -> torch.Tensor:
    """Dropout of ``x`` with the rate held in the one-element tensor ``p``: reads ``p`` and runs
    ``dropkit::masked_affine`` with the same arguments as the float path (same bits)."""
    rate = check_probability(float(p))
    keep_scale = ops.inverted_scale(rate) if inverted else 1.0
    return ops.masked_affine(x, key, rate, broadcast_dims, keep_scale, 0.0, 0.0)


@dropout_tensor_rate_op.register_fake
def _(
    x: torch.Tensor, key: torch.Tensor, p: torch.Tensor, broadcast_dims: list[int], inverted: bool
) -> torch.Tensor:
    return torch.empty_like(x)


def _tensor_rate_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    # The key and the rate: zero bytes per element, like dropkit::masked_affine.
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.broadcast_dims, ctx.inverted = inputs[3], inputs[4]


def _tensor_rate_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    # d/dx where(keep, x * s, 0) = where(keep, dy * s, 0): the same op on dy.
    key, p = ctx.saved_tensors
    return dropout_tensor_rate_op(grad, key, p, ctx.broadcast_dims, ctx.inverted), None, None, None, None


dropout_tensor_rate_op.register_autograd(_tensor_rate_backward, setup_context=_tensor_rate_setup)


def _channel_dropout(
    input: torch.Tensor,
    p: Any,
    training: bool,
    inplace: bool,
    channels_last: bool,
    spatial_rank: int,
    name: str,
    seed: SeedLike,
    generator: torch.Generator | None,
    op: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    input = check_common(input, training, inplace)
    check_bool(channels_last, "channels_last")
    letters = {1: "L", 2: "HW", 3: "DHW"}[spatial_rank]
    layout = f"(N, {', '.join(letters)}, C)" if channels_last else f"(N, C, {', '.join(letters)})"
    check_rank(input, (spatial_rank + 2, spatial_rank + 1), name, f"{layout} or unbatched")
    batched = input.dim() == spatial_rank + 2
    first_spatial = (1 if batched else 0) + (0 if channels_last else 1)
    spatial = list(range(first_spatial, first_spatial + spatial_rank))
    op = dropout if op is None else op
    return op(input, p, training, inplace, broadcast_dims=spatial, seed=seed, generator=generator)


def dropout1d(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channels_last: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero whole channels of ``(N, C, L)`` / ``(C, L)`` input; see :class:`dropkit.nn.Dropout1d`."""
    return _channel_dropout(input, p, training, inplace, channels_last, 1, "dropout1d", seed, generator)


def dropout2d(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channels_last: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero whole channels of ``(N, C, H, W)`` / ``(C, H, W)`` input; see :class:`dropkit.nn.Dropout2d`."""
    return _channel_dropout(input, p, training, inplace, channels_last, 2, "dropout2d", seed, generator)


def dropout3d(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channels_last: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero whole channels of ``(N, C, D, H, W)`` / ``(C, D, H, W)``; see :class:`dropkit.nn.Dropout3d`."""
    return _channel_dropout(input, p, training, inplace, channels_last, 3, "dropout3d", seed, generator)


def _channel_tensor_rate(spatial_rank: int, name: str) -> Callable[..., torch.Tensor]:
    def channel_dropout(
        input: torch.Tensor,
        p: torch.Tensor,
        training: bool = True,
        inplace: bool = False,
        *,
        channels_last: bool = False,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        check_probability_tensor(p)
        return _channel_dropout(
            input,
            p,
            training,
            inplace,
            channels_last,
            spatial_rank,
            name,
            seed,
            generator,
            _dropout_tensor_rate,
        )

    return channel_dropout


register_tensor_rate_variant(dropout, _dropout_tensor_rate)
register_tensor_rate_variant(dropout1d, _channel_tensor_rate(1, "dropout1d"))
register_tensor_rate_variant(dropout2d, _channel_tensor_rate(2, "dropout2d"))
register_tensor_rate_variant(dropout3d, _channel_tensor_rate(3, "dropout3d"))
