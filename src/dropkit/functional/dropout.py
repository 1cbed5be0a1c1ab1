"""Standard and spatial (channel) dropout as functions; documentation lives on the modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dropkit import ops
from dropkit._validation import check_bool, check_floating_tensor, check_rank, normalize_dims
from dropkit.functional._common import (
    SeedLike,
    check_common,
    check_rate,
    finish,
    keep_probability,
    passes_through,
    read_rate,
    resolve_key,
    scale_by,
)
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate

__all__ = ["dropout", "dropout1d", "dropout2d", "dropout3d"]


def dropout(
    input: torch.Tensor,
    p: Rate = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    inverted: bool = True,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero elements with probability ``p``; see :class:`dropkit.nn.Dropout`.

    ``p`` is a float or a one-element floating-point tensor (read when the op runs, so a
    compiled graph takes it as an input); ``broadcast_dims`` lists the dims along which one draw
    is shared (channel, time-tied or token masks); ``seed`` (an int or a key from
    :func:`dropkit.make_key`) or ``generator`` fix the mask for this call.
    """
    input = check_common(input, training, inplace, floating=False)
    # A tensor's value is read once: by the op below, or by read_rate where nothing reads it.
    p = check_rate(p, read=False)
    if type(inverted) is not bool:
        check_bool(inverted, "inverted")
    # The default (an element mask) skips the walk over the dims.
    element_mask = type(broadcast_dims) is tuple and not broadcast_dims
    dims = [] if element_mask else normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    if not (training or inverted):  # the original formulation's eval: x * q
        check_seed(seed, generator)  # a bad seed is refused where nothing is drawn too
        return scale_by(check_floating_tensor(input), keep_probability(read_rate(p)), inplace)
    if not training:
        read_rate(p)  # the checks hold in every mode, a tensor's value included
    if passes_through(input, training, p):
        check_seed(seed, generator)
        return input
    key = resolve_key(input, seed, generator)
    output = ops.masked_affine(input, key, p, dims, "inverted" if inverted else "unscaled", "p")
    return finish(input, output, inplace)


def _channel_dropout(
    input: torch.Tensor,
    p: Rate,
    training: bool,
    inplace: bool,
    channels_last: bool,
    spatial_rank: int,
    name: str,
    seed: SeedLike,
    generator: torch.Generator | None,
) -> torch.Tensor:
    input = check_common(input, training, inplace, floating=False)
    check_bool(channels_last, "channels_last")
    letters = {1: "L", 2: "HW", 3: "DHW"}[spatial_rank]
    layout = f"(N, {', '.join(letters)}, C)" if channels_last else f"(N, C, {', '.join(letters)})"
    check_rank(input, (spatial_rank + 2, spatial_rank + 1), name, f"{layout} or unbatched")
    batched = input.dim() == spatial_rank + 2
    first_spatial = (1 if batched else 0) + (0 if channels_last else 1)
    spatial = list(range(first_spatial, first_spatial + spatial_rank))
    return dropout(input, p, training, inplace, broadcast_dims=spatial, seed=seed, generator=generator)


def _channel(rank: int, layout: str) -> Callable[..., torch.Tensor]:
    name = f"dropout{rank}d"

    def channel_dropout(
        input: torch.Tensor,
        p: Rate = 0.5,
        training: bool = True,
        inplace: bool = False,
        *,
        channels_last: bool = False,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return _channel_dropout(input, p, training, inplace, channels_last, rank, name, seed, generator)

    channel_dropout.__name__ = channel_dropout.__qualname__ = name
    channel_dropout.__doc__ = (
        f"Zero whole channels of {layout} input; see :class:`dropkit.nn.Dropout{rank}d`."
    )
    return channel_dropout


dropout1d = _channel(1, "``(N, C, L)`` / ``(C, L)``")
dropout2d = _channel(2, "``(N, C, H, W)`` / ``(C, H, W)``")
dropout3d = _channel(3, "``(N, C, D, H, W)`` / ``(C, D, H, W)``")
