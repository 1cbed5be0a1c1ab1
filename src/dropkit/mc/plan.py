"""Per-sample keys of MC sampling: which samples a forward computes and the key of each op.

Used by :func:`dropkit.mc.mc_predict` through :meth:`dropkit.mc.mode.MCDropoutHandle.sampling`.
Under a plan of ``count`` samples from ``first`` on, stacked sample-major along dim 0, an op
with ordinal ``c`` (the ``c``-th op turned on in the forward) runs once per sample ``s`` with
the key ``make_key(seed, op_stream(path), s)``; an op nested inside such an op (a dropkit layer
that calls another) has the ordinals of the enclosing ops in its ``path``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dropkit.engine.streams import make_key

__all__ = ["PlanRunner", "SamplingPlan", "op_stream"]

# An op, as the plan runs it: ``call(args, key)``, with ``key`` ``None`` outside a plan.
OpCall = Callable[[list[Any], torch.Tensor | None], torch.Tensor]


def op_stream(path: tuple[int, ...]) -> int:
    """Stream id of the op at ``path`` (its ordinal, and the ordinals of enclosing split ops).

    A top-level op (``path == (c,)``) uses stream ``c``; an op nested inside a per-sample op
    uses a 31-bit mix of its path with the top bit set, so the two never meet.
    """
    if len(path) == 1:
        return path[0]
    value = 0x243F6A8885A308D3
    for part in path:
        value = ((value ^ part) * 0x100000001B3 + 0x9E3779B97F4A7C15) % (1 << 64)
        value ^= value >> 29
    return 0x80000000 | (value & 0x7FFFFFFF)


@dataclass
class SamplingPlan:
    """Which samples the current forward computes: ``count`` samples from ``first`` on, stacked
    sample-major along dim 0 of every activation, under ``seed``."""

    seed: int
    first: int
    count: int
    path: tuple[int, ...] = ()
    counter: int = 0


class PlanRunner:
    """The current sampling plan of one MC mode, and the running of its ops under it."""

    def __init__(self) -> None:
        self.plan: SamplingPlan | None = None

    @contextlib.contextmanager
    def sampling(self, seed: int, first: int, count: int) -> Iterator[None]:
        """Compute samples ``first .. first + count - 1`` of seed ``seed`` (stacked along dim 0)."""
        previous, self.plan = self.plan, SamplingPlan(seed, first, count)
        try:
            yield
        finally:
            self.plan = previous

    def run(self, call: OpCall, args: list[Any], split: Sequence[int], what: str) -> torch.Tensor:
        """Run one op: in a plan, once per sample (``args[i]`` for ``i`` in ``split`` cut along
        dim 0) with that sample's key, the outputs concatenated; outside one, ``call(args, None)``.
        """
        plan = self.plan
        if plan is None:
            return call(args, None)
        ordinal = plan.counter
        plan.counter += 1
        path = (*plan.path, ordinal)
        stream = op_stream(path)
        if plan.count == 1:
            return self._one_sample(call, args, plan, path, stream, plan.first)
        lead = args[split[0]].shape[0] if args[split[0]].dim() else 0
        if lead == 0 or lead % plan.count:
            raise RuntimeError(
                f"{what} got an input of shape {tuple(args[split[0]].shape)} during batched MC "
                f"sampling of {plan.count} samples: the leading dim must stack the samples "
                "(sample-major batch first); use chunk_size=1 for this model"
            )
        pieces = {i: args[i].split(lead // plan.count) for i in split}
        outputs = []
        for index in range(plan.count):
            piece_args = list(args)
            for i in split:
                piece_args[i] = pieces[i][index]
            outputs.append(self._one_sample(call, piece_args, plan, path, stream, plan.first + index))
        return torch.cat(outputs)

    def _one_sample(
        self,
        call: OpCall,
        args: list[Any],
        plan: SamplingPlan,
        path: tuple[int, ...],
        stream: int,
        sample: int,
    ) -> torch.Tensor:
        key = make_key(plan.seed, stream, sample)
        self.plan = SamplingPlan(plan.seed, sample, 1, path)  # what ops nested in this one see
        try:
            return call(args, key)
        finally:
            self.plan = plan
