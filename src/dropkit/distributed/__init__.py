"""Dropout masks across ``torch.distributed`` ranks: which ranks share them, and DTensor inputs.

Every dropkit mask is a pure function of its key ``[seed, stream, step]`` and the element's
index (:mod:`dropkit.engine.masks`).  Across ranks, only the seed can differ: the global seed
(:func:`dropkit.manual_seed`, the same on every rank) *folded* with rank numbers
(:func:`dropkit.engine.streams.fold_seed`).  Which rank numbers are folded is the *mask domain*,
a per-thread setting that nests; there is no tracker object and no global state to keep in sync.

**The default domain folds the global rank**: data-parallel ranks (DDP, FSDP) draw different
masks, and rank 0 draws what a single process draws.  Three context managers change it; each
can also be attached to a module (``domain.attach(module)``) so that it holds while that
module's forward runs, where a ``with`` block cannot reach::

    rank_masks(*groups)   fold exactly the rank in each group      rank_masks(dp_group)
    replicated(*groups)   the groups' ranks share masks            replicated(tp_group)
    sharded(*groups)      the groups' ranks draw different masks   sharded(tp_group)

Data parallel x tensor parallel, 4 ranks on a ``(dp=2, tp=2)`` mesh, one model replica per row::

                       TP rank 0            TP rank 1
                   +--------------------+--------------------+
      DP replica 0 | rank 0             | rank 1             |   DP replicas: different
                   |   x (replicated)   |   x (replicated)   |   masks everywhere (they
                   |   h[:, :H/2]       |   h[:, H/2:]       |   train on different data)
                   +--------------------+--------------------+
      DP replica 1 | rank 2             | rank 3             |
                   |   x (replicated)   |   x (replicated)   |
                   |   h[:, :H/2]       |   h[:, H/2:]       |
                   +--------------------+--------------------+

    where                      domain                         masks of ranks 0 1 2 3
    default (DDP, FSDP)        global rank folded             a b c d   all differ
    replicated region (x)      replicated(tp_group)           a a c c   TP peers share
    sharded region, plain      sharded(tp_group) inside       a b c d   TP peers differ
      local shards (h)           replicated(tp_group)
    sharded region, DTensor    replicated(tp_group)           one global mask per replica,
      (h a Shard(1) DTensor)                                  each rank applies its slice:
                                                              a[:, :H/2] a[:, H/2:] on ranks
                                                              0, 1; c[:, :H/2] c[:, H/2:] on 2, 3
    everything shared          rank_masks()                   a a a a
    DP rank only               rank_masks(dp_group)           a a b b   (replica 1 folds DP rank 1: b)

This is the semantics of Megatron-LM's RNG tracker (a default stream shared by the TP peers and
a ``model-parallel-rng`` stream that differs per TP rank), without its global state: a region
says what it is, and the key of every mask stays a pure function of (seed, folded ranks,
stream, step, index), so activation checkpointing (:func:`dropkit.checkpoint`) recomputes the
same masks in every domain.  With ``pp_group`` pipeline stages, the layers of each stage own
different streams anyway; fold the pipeline rank as well only to give stages that hold copies
of one layer different masks.

**DTensor inputs.**  A dropkit op given a :class:`~torch.distributed.tensor.DTensor` (e.g. the
output of ``ColwiseParallel(use_local_output=False)``) applies, on each rank, the slice of the
one global mask that its shard covers, by global element index (:mod:`dropkit.distributed.dtensor`):
the full result equals the single-process result for the same key, bit for bit, and a 2-way
tensor-parallel model trains with the masks of its single-process twin.  Every rank of the
DTensor's mesh must draw that key: run the region under ``replicated(tp_group)`` (or
``replicated(mesh)``); a key drawn under a domain that folds their ranks is refused with a
RuntimeError.  Importing this package routes dropkit's ops on DTensors here.

**Monte Carlo prediction.**  :func:`dropkit.mc.mc_predict` with ``group=`` splits the ``T``
samples across the ranks of a group and gathers or merges the results
(:mod:`dropkit.distributed.collectives`); per-sample keys make the samples those of a single
process for the same seed.

Example (one process here: the default domain and rank 0 leave the seed unchanged)::

    >>> import dropkit
    >>> from dropkit.distributed import folded_ranks
    >>> folded_ranks()
    (0,)
"""

from __future__ import annotations

from dropkit.distributed import dtensor as _dtensor
from dropkit.distributed.domains import GroupLike as GroupLike
from dropkit.distributed.domains import MaskDomain as MaskDomain
from dropkit.distributed.domains import rank_masks as rank_masks
from dropkit.distributed.domains import replicated as replicated
from dropkit.distributed.domains import sharded as sharded
from dropkit.engine.streams import fold_seed as fold_seed
from dropkit.engine.streams import folded_ranks as folded_ranks

__all__ = ["GroupLike", "MaskDomain", "fold_seed", "folded_ranks", "rank_masks", "replicated", "sharded"]

_dtensor.register_handlers()
