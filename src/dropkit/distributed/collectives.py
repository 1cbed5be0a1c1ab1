"""The collectives that split work across the ranks of a process group and put it back together
in group-rank order, so that every rank ends with the result a single process computes.

Used by :func:`dropkit.mc.mc_predict` with ``group=``: the ``T`` samples are cut into contiguous
ranges (:func:`split_range`), each rank computes its range, the samples are gathered in order
(:func:`all_gather_rows`) or each rank's streaming statistics are gathered
(:func:`all_gather_objects`) and merged in rank order.  Tensors travel on the CPU for gloo and on
the current CUDA device for NCCL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dropkit.distributed.domains import group_ranks

__all__ = ["all_gather_objects", "all_gather_rows", "broadcast_seed", "check_group", "split_range"]


def check_group(group: object, name: str = "group") -> tuple[int, ...]:
    """The global ranks of ``group`` (a process group), checked: a TypeError or ValueError naming
    ``name`` otherwise, a RuntimeError if ``torch.distributed`` is not initialized."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}"
        )
    return group_ranks(group, name)


def split_range(total: int, index: int, size: int) -> tuple[int, int]:
    """The contiguous share ``[start, stop)`` of ``range(total)`` of part ``index`` of ``size``:
    the parts differ in length by at most one and follow each other in index order."""
    if not 0 <= index < size:
        raise ValueError(f"index must be in [0, {size}), got {index}")
    return total * index // size, total * (index + 1) // size


def _device(group: dist.ProcessGroup) -> torch.device:
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int, group: dist.ProcessGroup) -> int:
    """Group rank 0's ``seed`` (an int64), on every rank of ``group``."""
    ranks = group_ranks(group)
    value = torch.tensor([seed], dtype=torch.int64, device=_device(group))
    dist.broadcast(value, src=ranks[0], group=group)
    return int(value.item())


def all_gather_rows(tensor: torch.Tensor, counts: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """The tensors of every rank concatenated along dim 0 in group-rank order; rank ``i`` holds
    ``counts[i]`` rows (every rank passes the same ``counts``)."""
    ranks = group_ranks(group)
    if len(counts) != len(ranks):
        raise ValueError(f"counts must have one entry per rank ({len(ranks)}), got {counts}")
    index = ranks.index(dist.get_rank())
    if tensor.shape[0] != counts[index]:
        raise ValueError(f"this rank holds {tensor.shape[0]} rows, but counts says {counts[index]}")
    width = max(counts)
    device = _device(group)
    padded = torch.zeros((width, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    pieces = [torch.empty_like(padded) for _ in ranks]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)]).to(tensor.device)


def all_gather_objects(value: Any, group: dist.ProcessGroup) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in group-rank order."""
    gathered: list[Any] = [None] * len(group_ranks(group))
    dist.all_gather_object(gathered, value, group=group)
    return gathered
