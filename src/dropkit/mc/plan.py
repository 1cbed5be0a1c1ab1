"""Plans of MC sampling: the chunks a call runs, the memory they are sized from, the per-sample keys.

* :class:`MCPlan` is what :func:`dropkit.mc.mc_predict` chose for one call (trunk split, chunk
  size, measured peak memory); :func:`dropkit.mc.sampling.last_plan` returns it.
* :class:`PeakMemoryMeter` measures the peak bytes of tensor storage live during a block, on
  any device, which sizes the chunks (see its docstring for what it counts).
* :class:`PlanRunner` runs the ops of a forward under a sampling plan, used through
  :meth:`dropkit.mc.mode.MCDropoutHandle.sampling`.  Under a plan of ``count`` samples from
  ``first`` on, stacked sample-major along dim 0, an op with ordinal ``c`` (the ``c``-th op
  turned on in the forward) runs once per sample ``s`` with the key
  ``make_key(seed, op_stream(path), s)``; an op nested inside such an op (a dropkit layer that
  calls another) has the ordinals of the enclosing ops in its ``path``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dropkit.engine.streams import make_key

__all__ = ["MCPlan", "PeakMemoryMeter", "PlanRunner", "SamplingPlan", "op_stream"]

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


def format_bytes(count: int) -> str:
    """``count`` bytes as a short human-readable string (``"1.5 MiB"``)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # unreachable: the loop returns at GiB


@dataclass(frozen=True)
class MCPlan:
    """How one call of :func:`dropkit.mc.mc_predict` (or ``iter_mc_samples``) computes its samples.

    ``str(plan)`` reads like ``"trunk: 14 modules, head: 2; chunks of 50; peak 3.1 MiB per
    sample, budget 256.0 MiB"``; the same line is logged at ``DEBUG`` level on the
    ``dropkit.mc.sampling`` logger.

    Attributes:
        samples: the number of samples ``T``.
        batch: the batch size ``N`` of the inputs.
        chunk_size: samples per batched forward (the last chunk holds the rest).
        trunk: ``"auto"`` when the automatic trunk split engaged, ``"manual"`` with ``trunk=`` and
            ``head=`` callables, ``None`` when the whole model runs for every sample.
        reason: with ``trunk=None``, why no trunk is cached (``"trunk=None"``, ``"no
            deterministic prefix found"``, ...); ``""`` otherwise.
        trunk_modules: with ``trunk="auto"``: how many submodules ran once, in the trunk (the
            outermost ones the trace keeps whole, not counting those the head calls again).
        head_modules: with ``trunk="auto"``: how many submodule calls the head makes per forward.
        peak_bytes: peak bytes of tensor storage of the forward of one sample (the head only,
            with a trunk), measured by :class:`PeakMemoryMeter`; ``None`` when ``chunk_size``
            was given or ``T = 1``.
        memory_budget: the budget in bytes the chunk size was chosen for; ``None`` when
            ``chunk_size`` was given.
        measured: whether this call ran the measuring forward (``False`` when the peak came from
            the cache of an earlier call with inputs of the same shapes, or was not needed).

    Examples::

        >>> from dropkit.mc.plan import MCPlan
        >>> plan = MCPlan(samples=50, batch=8, chunk_size=20, trunk="auto", trunk_modules=14, head_modules=2)
        >>> str(plan), plan.chunks
        ('trunk: 14 modules, head: 2; chunks of 20, last 10', (20, 20, 10))
    """

    samples: int
    batch: int
    chunk_size: int
    trunk: Literal["auto", "manual"] | None = None
    reason: str = ""
    trunk_modules: int | None = None
    head_modules: int | None = None
    peak_bytes: int | None = None
    memory_budget: int | None = None
    measured: bool = False

    @property
    def chunks(self) -> tuple[int, ...]:
        """The number of samples of each batched forward, in order."""
        full, rest = divmod(self.samples, self.chunk_size)
        return (self.chunk_size,) * full + ((rest,) if rest else ())

    def __str__(self) -> str:
        if self.trunk == "auto":
            text = f"trunk: {self.trunk_modules} modules, head: {self.head_modules}"
        elif self.trunk == "manual":
            text = "trunk: given (trunk=, head=)"
        else:
            text = f"no trunk ({self.reason or 'whole model per sample'})"
        text += f"; chunks of {self.chunk_size}"
        rest = self.samples % self.chunk_size
        if rest and self.samples > self.chunk_size:
            text += f", last {rest}"
        if self.peak_bytes is not None:
            text += f"; peak {format_bytes(self.peak_bytes)} per sample"
        if self.memory_budget is not None:
            text += f", budget {format_bytes(self.memory_budget)}"
        return text


_StorageKey = tuple[torch.device, int]


class PeakMemoryMeter(TorchDispatchMode):
    """Peak bytes of tensor storage allocated, and still live, inside a ``with`` block.

    A ``TorchDispatchMode``: it sees every ATen op run in the block in this thread (after
    autograd and the decomposition of composite ops).  An op output whose storage is neither the
    storage of one of the op's inputs nor already counted is a new allocation of
    ``storage.nbytes()`` bytes; it stays live until every tensor that ops returned on that
    storage has been freed (weak references with callbacks track them).  :attr:`peak` is the
    largest sum of live bytes seen, :attr:`live` the current one.

    Counted from zero: tensors made before the block (parameters, buffers, the inputs) are not
    counted.  Not counted either: memory a kernel allocates without returning it as a tensor (a
    BLAS or cuDNN workspace), allocator rounding and caching, and tensors made outside ATen ops
    (``torch.from_numpy``).  The same measure on every device, CPU included; unlike
    ``torch.cuda.max_memory_allocated`` it needs no reset of the process-wide peak statistics
    and ignores other threads.

    Attributes:
        live: bytes allocated in the block and still held.
        peak: the largest value ``live`` reached.

    Examples::

        >>> from dropkit.mc.plan import PeakMemoryMeter
        >>> x = torch.ones(1000)  # made before the block: not counted
        >>> with PeakMemoryMeter() as meter:
        ...     y = (x + 1) * 2  # x + 1 (4000 bytes) is freed after the multiply made y
        >>> meter.peak, meter.live
        (8000, 4000)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[_StorageKey, list[int]] = {}  # key -> [bytes, tensors alive]
        self._refs: dict[int, weakref.ref[torch.Tensor]] = {}  # by id: a ref compares its tensors

    @staticmethod
    def _storage(tensor: torch.Tensor) -> tuple[_StorageKey, int] | None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested and other storage-less tensors
            return None
        pointer = storage.data_ptr()
        if pointer == 0:  # empty or meta
            return None
        return (tensor.device, pointer), storage.nbytes()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        output = func(*args, **(kwargs or {}))
        inputs = None
        for tensor in tree_leaves(output):
            if not isinstance(tensor, torch.Tensor):
                continue
            found = self._storage(tensor)
            if found is None:
                continue
            key, nbytes = found
            entry = self._storages.get(key)
            if entry is None:
                if inputs is None:
                    inputs = {
                        found_input[0]
                        for value in tree_leaves((args, kwargs))
                        if isinstance(value, torch.Tensor)
                        and (found_input := self._storage(value)) is not None
                    }
                if key in inputs:
                    continue  # a view of, or an in-place op on, a tensor made before the block
                entry = self._storages[key] = [nbytes, 0]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            ref = weakref.ref(tensor, self._release_callback(key))
            self._refs[id(ref)] = ref
        return output

    def _release_callback(self, key: _StorageKey) -> Callable[[weakref.ref[torch.Tensor]], None]:
        def release(ref: weakref.ref[torch.Tensor]) -> None:
            self._refs.pop(id(ref), None)
            entry = self._storages.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._storages[key]
                self.live -= entry[0]

        return release
