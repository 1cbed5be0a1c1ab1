"""dropkit's ops on DTensors: every rank applies its slice of the one global mask.

A dropkit op that gets a :class:`~torch.distributed.tensor.DTensor` computes, on each rank, the
elements of the mask that its local shard covers, by their *global* index (the bit layout of
:mod:`dropkit.engine.masks`): the result is the DTensor whose full tensor is what the op gives
the full tensor in a single process, bit for bit, with no communication for ``Shard`` and
``Replicate`` placements (a ``Partial`` input is reduced first).  Its backward does the same on
the gradient, so the gradient is the single-process one too.

* ``dropkit::masked_affine`` (dropout, channel dropout, alpha dropout, every mask of that op):
  computed locally as above.
* ``dropkit::bias_dropout_add``: ``residual + masked_affine(x + bias)``, each step a DTensor op in
  the compute dtype, rounded once: the fused kernel's values.
* Every other dropkit op (Gaussian dropout and noise, DropBlock): the inputs are gathered, the op
  runs on the full tensors on every rank and each rank keeps its shard of the result
  (correct, but it moves and computes the full tensor).

Every rank of the DTensor's mesh must draw the same key, which a mask domain that folds their
ranks would prevent: a key drawn here under such a domain is refused with a RuntimeError that
names :func:`dropkit.distributed.replicated`.  Keys given explicitly (``seed=``, the per-sample
keys of :func:`dropkit.mc.mc_predict`) are used as they are.

The ops are routed here by DTensor's table of custom op handlers, filled when
:mod:`dropkit.distributed` is imported.  Ops under ``torch.compile`` with DTensor inputs are not
covered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dropkit.distributed.domains import check_mesh_shares_masks
from dropkit.engine.masks import mask_shape, philox_words
from dropkit.engine.numerics import (
    AFFINE_FORMULAS,
    THRESHOLD_SCALE,
    compute_dtype,
    drop_threshold,
    rate_value,
)
from dropkit.engine.philox import MASK32, philox4x32
from dropkit.engine.streams import effective_seed

__all__ = ["bits16_at", "register_handlers"]

Op = torch._ops.OpOverload
Args = tuple[object, ...]
Kwargs = dict[str, object]

_NOT_RANDOM = ("checked_rate",)


def bits16_at(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The 16-bit draws of the mask elements at the global row-major indices ``index`` (int64),
    as :func:`dropkit.engine.masks.random_bits16` gives them for the whole mask.

    Where the indices are dense (their counters span no more counters than there are indices) the
    span is generated once and gathered; else each index gets its counter.
    """
    flat = index.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(index.shape, dtype=torch.int64, device=key.device)
    first = int(flat.min()) // 8
    span = int(flat.max()) // 8 - first + 1
    if span <= flat.numel():
        words = philox_words(key, first, span)
        halves = torch.stack([part for word in words for part in (word & 0xFFFF, word >> 16)], dim=1)
        return halves.reshape(-1)[flat - first * 8].reshape(index.shape)
    counters = flat // 8
    seed, stream, step = key[0], key[1], key[2]
    stacked = torch.stack(
        philox4x32(
            counters & MASK32,
            counters >> 32,
            (stream & MASK32).expand_as(counters),
            (step & MASK32).expand_as(counters),
            seed & MASK32,
            (seed >> 32) & MASK32,
        )
    )
    word = stacked.gather(0, ((flat // 2) % 4).unsqueeze(0)).squeeze(0)
    return ((word >> (16 * (flat % 2))) & 0xFFFF).reshape(index.shape)


def _global_index(
    global_mask: Sequence[int], local_shape: Sequence[int], offset: Sequence[int], broadcast: Sequence[int]
) -> torch.Tensor:
    """Row-major indices in the global mask of the mask elements a local shard covers (size 1 and
    offset 0 along the broadcast dims)."""
    strides = [math.prod(global_mask[dim + 1 :]) for dim in range(len(global_mask))]
    index = torch.zeros((), dtype=torch.int64)
    ndim = len(global_mask)
    for dim in range(ndim):
        if dim in broadcast:
            continue
        positions = (torch.arange(local_shape[dim], dtype=torch.int64) + offset[dim]) * strides[dim]
        index = index + positions.reshape([-1 if d == dim else 1 for d in range(ndim)])
    return index.expand([1 if dim in broadcast else local_shape[dim] for dim in range(ndim)])


def _arguments(op_call: Op, args: Args, kwargs: Kwargs) -> list[Any]:
    """The op's arguments in schema order."""
    values = list(args)
    for argument in op_call._schema.arguments[len(args) :]:
        values.append(kwargs.get(argument.name, argument.default_value))
    return values


def _check_key(key: torch.Tensor, mesh: Any, what: str) -> None:
    """Refuse a key drawn here (not given, not replayed in backward) under a domain that gives the
    ranks of ``mesh`` different seeds."""
    if isinstance(key, DTensor):
        raise TypeError(f"{what}: the key must be a plain tensor, got a DTensor")
    if torch._C._current_graph_task_id() != -1:
        return  # a backward pass replays the forward's key
    if int(key[0]) == effective_seed():
        check_mesh_shares_masks(mesh, what)


def _reduced(x: DTensor) -> DTensor:
    """``x`` with its ``Partial`` placements reduced (to ``Replicate``)."""
    if any(isinstance(placement, Partial) for placement in x.placements):
        placements = [Replicate() if isinstance(p, Partial) else p for p in x.placements]
        return x.redistribute(x.device_mesh, placements)
    return x


def _local_path(x: DTensor) -> bool:
    """Whether the local shard of ``x`` is a box of the global tensor (``Shard`` and
    ``Replicate`` placements, not strided or custom ones)."""
    return all(type(placement) in (Shard, Replicate) for placement in x.placements)


def _masked_affine(op_call: Op, args: Args, kwargs: Kwargs) -> object:
    x, key, rate, broadcast_dims, formula, rate_name = _arguments(op_call, args, kwargs)
    if not isinstance(x, DTensor) or isinstance(rate, DTensor):
        return _gathered(op_call, args, kwargs)
    x = _reduced(x)
    if not _local_path(x):
        return _gathered(op_call, (x, *_arguments(op_call, args, kwargs)[1:]), {})
    p = rate_value(rate, rate_name)
    threshold = drop_threshold(p)
    if 0 < threshold < THRESHOLD_SCALE:  # else the mask does not depend on the key
        _check_key(key, x.device_mesh, f"dropkit::masked_affine ({formula})")
    local = x._local_tensor
    dims = list(broadcast_dims or [])
    global_mask = mask_shape(x.shape, dims)
    local_shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    index = _global_index(global_mask, local_shape, offset, dims).to(key.device)
    keep = (bits16_at(key, index) >= threshold).to(local.device)
    keep_scale, keep_shift, drop_value = AFFINE_FORMULAS[formula](p)
    compute = compute_dtype(local.dtype)

    def constant(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=compute, device=local.device)

    # The arithmetic of dropkit.engine.reference.masked_affine, on the local shard.
    kept = local.to(compute) * constant(keep_scale)
    if keep_shift != 0.0:
        kept = kept + constant(keep_shift)
    out = torch.empty_like(local)
    out.copy_(torch.where(keep, kept, constant(drop_value)))
    return DTensor._op_dispatcher.wrap(out, x._spec)


def _bias_dropout_add(op_call: Op, args: Args, kwargs: Kwargs) -> object:
    x, bias, residual, key, rate = _arguments(op_call, args, kwargs)
    if not isinstance(x, DTensor):
        return _gathered(op_call, args, kwargs)
    mesh = x.device_mesh
    compute = compute_dtype(x.dtype)
    summed = x.to(compute) + _as_dtensor(bias, mesh).to(compute)
    dropped = torch.ops.dropkit.masked_affine(summed, key, rate, [], "inverted", "p")
    result: torch.Tensor = (_as_dtensor(residual, mesh).to(compute) + dropped).to(x.dtype)
    return result


def _as_dtensor(value: torch.Tensor, mesh: Any) -> DTensor:
    """A DTensor as is; a plain tensor as the same tensor replicated on ``mesh``."""
    if isinstance(value, DTensor):
        return value
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _gathered(op_call: Op, args: Args, kwargs: Kwargs) -> object:
    """Run ``op_call`` on the full tensors on every rank; keep the shard of the first DTensor input's
    placements (``Replicate`` where it was ``Partial``, or for an output of another shape)."""
    first: DTensor | None = None
    for value in (*args, *kwargs.values()):
        if isinstance(value, DTensor) and first is None:
            first = value
    if first is None:  # unreachable: DTensor dispatch routes only calls with a DTensor
        return op_call(*args, **kwargs)
    for value in (*args, *kwargs.values()):
        if (
            isinstance(value, torch.Tensor)
            and not isinstance(value, DTensor)
            and value.dtype == torch.int64
            and value.shape == (3,)
        ):
            _check_key(value, first.device_mesh, f"dropkit::{op_call._schema.name.split('::')[-1]}")

    def full(value: Any) -> Any:
        return value.full_tensor() if isinstance(value, DTensor) else value

    result = op_call(*[full(value) for value in args], **{key: full(value) for key, value in kwargs.items()})
    mesh = first.device_mesh
    replicated = DTensor.from_local(result, mesh, [Replicate()] * mesh.ndim, run_check=False)
    if tuple(result.shape) != tuple(first.shape):
        return replicated
    placements = [Replicate() if isinstance(p, Partial) else p for p in first.placements]
    return replicated.redistribute(mesh, placements)


def register_handlers() -> None:
    """Route every dropkit op's DTensor calls here (idempotent)."""
    handlers = DTensor._op_dispatcher._custom_op_handlers
    prefix = "dropkit::"
    names = [name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix)]
    for name in names:
        if name in _NOT_RANDOM:
            continue
        op = getattr(torch.ops.dropkit, name).default
        if name == "masked_affine":
            handlers[op] = _masked_affine
        elif name == "bias_dropout_add":
            handlers[op] = _bias_dropout_add
        else:
            handlers[op] = _gathered
