"""Mask domains: which ``torch.distributed`` ranks draw the same dropout masks.

A domain is a list of *folds*, each the ranks of one group, and at most one group *merged* into
the global rank.  A rank's seed is :func:`dropkit.engine.streams.fold_seed` of the global seed
with one number per fold: its index in that group's ranks, or for the global-rank fold its
global rank (the lowest global rank of the merged group, when one is merged).  Two ranks draw
the same masks exactly when those numbers agree.  The default domain is the global-rank fold
alone; see :mod:`dropkit.distributed` for the three context managers that change it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Union

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dropkit.engine.streams import _distributed_rank, folded_ranks, rank_fold, rank_fold_domain

__all__ = [
    "Domain",
    "GroupLike",
    "MaskDomain",
    "check_mesh_shares_masks",
    "current_domain",
    "group_ranks",
    "rank_masks",
    "replicated",
    "sharded",
]

GroupLike = Union[dist.ProcessGroup, DeviceMesh]  # noqa: UP007 - a runtime alias on 3.10
"""A process group, or a device mesh (all its ranks, in row-major order of the mesh)."""

Ranks = tuple[int, ...]


def group_ranks(group: object, name: str = "group") -> Ranks:
    """The global ranks of ``group`` (a process group or a device mesh), in group-rank order.

    Raises:
        TypeError: ``group`` is neither a process group nor a device mesh.
        RuntimeError: ``torch.distributed`` is not initialized.
        ValueError: this process is not one of its ranks.
    """
    if not isinstance(group, (DeviceMesh, dist.ProcessGroup)):
        raise TypeError(
            f"{name} must be a torch.distributed.ProcessGroup or a DeviceMesh, got {type(group).__name__} "
            f"({group!r})"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            f"{name} names ranks of a process group, but torch.distributed is not initialized "
            "(call torch.distributed.init_process_group first)"
        )
    if isinstance(group, DeviceMesh):
        ranks: Ranks = tuple(int(rank) for rank in group.mesh.flatten().tolist())
    else:
        ranks = tuple(dist.get_process_group_ranks(group))
    me = _distributed_rank()
    if me not in ranks:
        raise ValueError(
            f"{name} must contain this process (global rank {me}), got a group of ranks {list(ranks)}"
        )
    return ranks


@dataclass(frozen=True)
class Domain:
    """The folds of a mask domain: ``None`` stands for the global rank, ``merged`` is the group
    whose ranks share the global-rank fold (its lowest rank stands for all of them)."""

    folds: tuple[Ranks | None, ...] = (None,)
    merged: Ranks | None = None

    def ranks(self, me: int) -> tuple[int, ...]:
        """The numbers that rank ``me`` folds into the seed."""
        numbers = []
        for fold in self.folds:
            if fold is None:
                numbers.append(me if self.merged is None else min(self.merged))
            else:
                numbers.append(fold.index(me))
        return tuple(numbers)

    def shares_with(self, ranks: Ranks, me: int) -> bool:
        """Whether every rank of ``ranks`` folds the numbers ``me`` folds, as far as this rank can
        tell (the group of a fold that does not contain ``me``'s peers is not known here: such
        folds are assumed to agree, as they do on a device mesh)."""
        others = set(ranks) - {me}
        if not others:
            return True
        for fold in self.folds:
            if fold is None:
                if self.merged is None or not others <= set(self.merged):
                    return False
            elif others & set(fold):
                return False
        return True


_DEFAULT = Domain()


def current_domain() -> Domain:
    """The domain in force in this thread (the global-rank fold outside every mask domain)."""
    domain = rank_fold_domain()
    return domain if isinstance(domain, Domain) else _DEFAULT


def _replicate(domain: Domain, ranks: Ranks, name: str) -> Domain:
    folds = tuple(fold for fold in domain.folds if fold != ranks)
    merged = domain.merged
    if None in folds and len(ranks) > 1:
        if merged is None or set(ranks) <= set(merged):
            merged = merged or ranks
        elif set(merged) <= set(ranks):
            merged = ranks
        else:
            raise ValueError(
                f"{name}: the ranks {list(ranks)} cannot share masks on top of the ranks {list(merged)} "
                "while the global rank is folded (the ranks that share would not be known on every "
                "rank); name the groups whose ranks draw different masks with "
                "dropkit.distributed.rank_masks(dp_group, ...) instead"
            )
    return replace(domain, folds=folds, merged=merged)


def _shard(domain: Domain, ranks: Ranks, me: int) -> Domain:
    if ranks in domain.folds or len(ranks) == 1:
        return domain
    if None in domain.folds:
        if domain.merged is None:
            return domain  # the global rank tells every rank apart
        overlap = set(ranks) & set(domain.merged)
        if overlap <= {me}:
            return domain  # orthogonal to the merged group: told apart by its lowest rank
        if ranks == domain.merged:
            return replace(domain, merged=None)
    return replace(domain, folds=(*domain.folds, ranks))


class MaskDomain(contextlib.AbstractContextManager["MaskDomain"]):
    """A change of the mask domain: a context manager (per thread, nests), or attached to a module
    with :meth:`attach` so that it holds while that module's forward runs.

    Built by :func:`rank_masks`, :func:`replicated` or :func:`sharded`; the groups are read when
    it is built (their ranks never change), the change is applied to the domain in force when it
    is entered.
    """

    def __init__(self, kind: str, groups: tuple[Ranks, ...]) -> None:
        self.kind = kind
        self.groups = groups
        self._local = threading.local()  # the entered contexts, per thread

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(str(list(ranks)) for ranks in self.groups)})"

    def apply(self, domain: Domain) -> Domain:
        """The domain that entering this change inside ``domain`` gives."""
        me = _distributed_rank()
        if self.kind == "rank_masks":
            return Domain(folds=self.groups, merged=None)
        for ranks in self.groups:
            if self.kind == "replicated":
                domain = _replicate(domain, ranks, self.kind)
            else:
                domain = _shard(domain, ranks, me)
        return domain

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        domain = self.apply(current_domain())
        with rank_fold(domain.ranks(_distributed_rank()), domain):
            yield

    def _stack(self) -> list[contextlib.ExitStack]:
        stack: list[contextlib.ExitStack] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def __enter__(self) -> MaskDomain:
        exit_stack = contextlib.ExitStack()
        exit_stack.enter_context(self._entered())
        self._stack().append(exit_stack)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack().pop().close()

    def attach(self, module: nn.Module) -> _Attachment:
        """Hold this domain while ``module``'s forward runs (a forward pre-hook enters it, a forward
        hook that also runs when the forward raises leaves it).  Keys drawn in the forward, and
        their replay when activation checkpointing recomputes it, follow the domain.

        Returns:
            A handle whose ``remove()`` detaches the domain.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")

        def enter(*_: Any) -> None:
            self.__enter__()

        def leave(*_: Any) -> None:
            if self._stack():
                self.__exit__(None, None, None)

        return _Attachment(
            module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave, always_call=True),
        )


class _Attachment:
    """The hooks of :meth:`MaskDomain.attach`; ``remove()`` detaches them."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _group_arguments(kind: str, groups: tuple[object, ...]) -> tuple[Ranks, ...]:
    return tuple(group_ranks(group, f"{kind}() group {index}") for index, group in enumerate(groups))


def rank_masks(*groups: GroupLike) -> MaskDomain:
    """Masks differ across the ranks of each of ``groups`` and are shared by every other rank.

    ``rank_masks(dp_group)`` folds the data-parallel rank only: tensor- and pipeline-parallel
    peers draw the same masks, data-parallel replicas different ones.  ``rank_masks()`` shares
    masks across all ranks.  The rank of ``groups[i]`` is the ``i``-th number folded, so every
    rank must list the groups in the same order (as code run by every rank does).
    """
    return MaskDomain("rank_masks", _group_arguments("rank_masks", groups))


def replicated(*groups: GroupLike) -> MaskDomain:
    """The ranks of each of ``groups`` draw the same masks; every other distinction of the domain
    in force is kept.

    For the replicated region of tensor parallelism: inside ``replicated(tp_group)`` the TP peers
    share masks while data-parallel replicas still differ.  Needed around dropkit layers that get
    a DTensor (their masks are slices of one global mask, which every rank of the DTensor's mesh
    must draw alike).
    """
    if not groups:
        raise ValueError("replicated() needs at least one group, got none")
    return MaskDomain("replicated", _group_arguments("replicated", groups))


def sharded(*groups: GroupLike) -> MaskDomain:
    """The ranks of each of ``groups`` draw different masks; every other sharing of the domain in
    force is kept.

    For a sharded region of tensor parallelism computed on plain local tensors (each rank holds a
    different slice of the activation, as in Megatron-LM's model-parallel RNG region): inside
    ``replicated(tp_group)``, ``sharded(tp_group)`` gives the TP peers different masks again.
    """
    if not groups:
        raise ValueError("sharded() needs at least one group, got none")
    return MaskDomain("sharded", _group_arguments("sharded", groups))


def check_mesh_shares_masks(mesh: DeviceMesh, what: str) -> None:
    """Raise if the domain in force gives the ranks of ``mesh`` different masks (a DTensor's mask
    is a slice of one global mask, which each of them must draw alike)."""
    if not folded_ranks():
        return  # nothing folded: every rank draws the same key (share_masks_across_ranks, rank_masks())
    ranks = tuple(int(rank) for rank in mesh.mesh.flatten().tolist())
    me = _distributed_rank()
    if me in ranks and not current_domain().shares_with(ranks, me):
        raise RuntimeError(
            f"{what} got a DTensor on the ranks {list(ranks)}, whose masks are slices of one global "
            "mask, but the mask domain in force folds their ranks into the seed, so they would draw "
            "different global masks.  Run the tensor-parallel region under "
            "dropkit.distributed.replicated(mesh) (or replicated(tp_group)), or attach it: "
            "dropkit.distributed.replicated(mesh).attach(module); data-parallel replicas keep "
            "different masks"
        )
