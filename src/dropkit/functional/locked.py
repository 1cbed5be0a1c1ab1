"""Locked (variational, time-tied) dropout as a function; documentation lives on
:class:`dropkit.nn.locked.LockedDropout`."""

from __future__ import annotations

from typing import overload

import torch
from torch.nn.utils.rnn import PackedSequence

from dropkit._validation import check_bool, check_floating_tensor, check_min_rank
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import compute_dtype, inverted_scale, rate_value
from dropkit.functional._common import SeedLike, check_common, check_rate, finish, is_zero, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.functional.dropout import dropout
from dropkit.ops import Rate

__all__ = ["locked_dropout"]

_LAYOUT = "(T, B, *) (batch_first=False), (B, T, *) (batch_first=True) or unbatched (T, *)"


def _check_padding_mask(padding_mask: object, input: torch.Tensor, batch_first: bool) -> torch.Tensor:
    if not isinstance(padding_mask, torch.Tensor):
        raise TypeError(
            f"padding_mask must be a bool torch.Tensor or None, got {type(padding_mask).__name__}"
        )
    if padding_mask.dtype != torch.bool:
        raise TypeError(f"padding_mask must be a bool tensor (True = padded), got dtype {padding_mask.dtype}")
    if input.dim() == 2:
        expected, layout = tuple(input.shape[:1]), "(T,) for unbatched input"
    else:
        expected = tuple(input.shape[:2])
        layout = "(B, T) for batch_first input" if batch_first else "(T, B) for time-first input"
    if tuple(padding_mask.shape) != expected:
        raise ValueError(
            f"padding_mask must have shape {layout}, i.e. {expected}, got {tuple(padding_mask.shape)}"
        )
    return padding_mask.to(input.device)


def _packed_locked_dropout(
    packed: PackedSequence,
    rate: Rate,
    training: bool,
    inplace: bool,
    seed: SeedLike,
    generator: torch.Generator | None,
) -> PackedSequence:
    data = check_floating_tensor(packed.data, "input.data")
    # Packed masks are gathered by data-dependent indices (the batch sizes), which a traced graph
    # cannot hold: compiled code breaks the graph here anyway, so a tensor rate is read now.
    p = rate_value(rate)
    if not training or p == 0.0:
        return packed
    batch_sizes = packed.batch_sizes
    batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
    key = resolve_key(data, seed, generator)
    # One draw per (sequence, feature), in the order of the padded (1, B, *) / (B, 1, *) mask of
    # the original batch, so a packed batch gets the masks of the padded batch it came from.
    keep = keep_mask(key, p, (batch, *data.shape[1:]))
    # Row r of the packed data is sorted position r - offset(t) of its time step t.
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    position = torch.arange(int(batch_sizes.sum())) - offsets.repeat_interleave(batch_sizes)
    position = position.to(data.device)
    sequence = position if packed.sorted_indices is None else packed.sorted_indices[position]
    compute = compute_dtype(data.dtype)
    kept = data.to(compute) * torch.tensor(inverted_scale(p), dtype=compute, device=data.device)
    zero = torch.zeros((), dtype=compute, device=data.device)
    output = torch.where(keep[sequence], kept, zero).to(data.dtype)
    return PackedSequence(
        finish(data, output, inplace), batch_sizes, packed.sorted_indices, packed.unsorted_indices
    )


@overload
def locked_dropout(
    input: torch.Tensor,
    p: Rate = ...,
    training: bool = ...,
    inplace: bool = ...,
    *,
    batch_first: bool = ...,
    padding_mask: torch.Tensor | None = ...,
    seed: SeedLike = ...,
    generator: torch.Generator | None = ...,
) -> torch.Tensor: ...


@overload
def locked_dropout(
    input: PackedSequence,
    p: Rate = ...,
    training: bool = ...,
    inplace: bool = ...,
    *,
    batch_first: bool = ...,
    padding_mask: torch.Tensor | None = ...,
    seed: SeedLike = ...,
    generator: torch.Generator | None = ...,
) -> PackedSequence: ...


def locked_dropout(
    input: torch.Tensor | PackedSequence,
    p: Rate = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    batch_first: bool = False,
    padding_mask: torch.Tensor | None = None,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | PackedSequence:
    """Dropout with one mask per sequence, shared by all its time steps; see
    :class:`dropkit.nn.locked.LockedDropout`.

    ``input`` is ``(T, B, *)``, ``(B, T, *)`` with ``batch_first=True``, unbatched ``(T, *)``
    (2-D) or a :class:`~torch.nn.utils.rnn.PackedSequence`, which is returned as one with the
    same ``batch_sizes`` and indices.  ``padding_mask`` (bool, True = padded, ``(T, B)`` or
    ``(B, T)`` like the input) leaves padded positions exactly as they are.  ``seed`` (an int
    or a key from :func:`dropkit.make_key`) or ``generator`` fix the masks of this call.

    Examples::

        >>> from dropkit.functional.locked import locked_dropout
        >>> y = locked_dropout(torch.ones(5, 2, 3), 0.5, seed=0)
        >>> bool((y == y[0]).all())  # the same mask at every time step
        True
    """
    check_bool(training, "training")
    check_bool(inplace, "inplace")
    check_bool(batch_first, "batch_first")
    p = check_rate(p)
    check_seed(seed, generator)
    if isinstance(input, PackedSequence):
        if padding_mask is not None:
            raise ValueError("padding_mask must be None for a PackedSequence, which holds no padding")
        return _packed_locked_dropout(input, p, training, inplace, seed, generator)
    input = check_common(input, training, inplace)
    check_min_rank(input, 2, "locked_dropout", _LAYOUT)
    pad = None if padding_mask is None else _check_padding_mask(padding_mask, input, batch_first)
    if not training or is_zero(p):
        return input
    time_dim = 1 if batch_first and input.dim() > 2 else 0
    key = resolve_key(input, seed, generator)
    if pad is None:
        return dropout(input, p, True, inplace, broadcast_dims=time_dim, seed=key)
    output = dropout(input, p, True, False, broadcast_dims=time_dim, seed=key)
    pad = pad.reshape(*pad.shape, *([1] * (input.dim() - pad.dim())))
    return finish(input, torch.where(pad, input, output), inplace)
