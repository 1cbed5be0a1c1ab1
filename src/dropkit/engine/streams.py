"""RNG discipline: global seed, per-owner streams, step counters, keys and rank folding.

Every random draw in dropkit is addressed by a *key*: an int64 tensor ``[seed, stream, step]``.
The mask engine turns ``(key, element index)`` into random bits with Philox4x32-10, so a key
names one mask exactly, on any device and however the work is split.

* ``seed`` is the global seed set by :func:`manual_seed` (folded with the distributed rank by
  default, see :func:`share_masks_across_ranks` and :mod:`dropkit.distributed`, whose mask
  domains choose which ranks are folded), or a seed given per call.
* ``stream`` identifies the owner of the draws: each dropkit module receives the next stream id
  when it is built, so ``manual_seed(s)`` followed by building and running a model reproduces the
  same masks in any process.
* ``step`` counts the owner's draws: it advances on each training forward so successive calls
  draw fresh masks.  Modules keep it in a non-persistent int64 buffer, so that
  ``torch.compile`` does not recompile as it advances.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

import numpy as np
import torch

from dropkit._validation import env_flag
from dropkit.engine import checkpoint

__all__ = [
    "FUNCTIONAL_STREAM",
    "StepCounterOwner",
    "allocate_copy_stream",
    "allocate_stream",
    "clone_masks",
    "cloning_masks",
    "draw_key",
    "effective_seed",
    "functional_step",
    "functional_step_as",
    "element_key",
    "fold_seed",
    "folded_ranks",
    "initial_seed",
    "make_key",
    "manual_seed",
    "masks_shared_across_ranks",
    "rank_fold",
    "rank_fold_domain",
    "refuse_jit_trace",
    "register_step_owner",
    "seed_tensor",
    "share_masks_across_ranks",
]

_UINT64 = 1 << 64
_INT64_MIN = -(1 << 63)
# Stream of functional calls that get no seed; modules count up from 0, so they never meet it.
FUNCTIONAL_STREAM = 0xFFFFFFFF
# Streams of copied layers count up from here; built layers count up from 0.
COPY_STREAMS = 1 << 31
_SHARE_ENV = "DROPKIT_SHARE_MASKS_ACROSS_RANKS"


def _to_int64(value: int) -> int:
    """Reinterpret an integer in ``[-2**63, 2**64)`` as the int64 with the same low 64 bits."""
    value %= _UINT64
    return value - _UINT64 if value >= (1 << 63) else value


def _check_seed(seed: object, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} ({seed!r})")
    if not _INT64_MIN <= seed < _UINT64:
        raise ValueError(f"{name} must be in [-2**63, 2**64), got {seed}")
    return _to_int64(seed)


class StepCounterOwner(Protocol):
    """Anything that keeps a step counter that :func:`manual_seed` must restart."""

    def reset_rng_step(self) -> None: ...


class _GlobalRngState:
    def __init__(self) -> None:
        self.seed = _to_int64(torch.initial_seed())
        self.next_stream = 0
        self.next_copy_stream = COPY_STREAMS
        self.share_across_ranks = env_flag(_SHARE_ENV)
        self.functional_step = torch.zeros(1, dtype=torch.int64)
        # Set while a program that takes its seed as an input is traced (see seed_tensor).
        self.seed_tensor: torch.Tensor | None = None
        self.owners: weakref.WeakSet[StepCounterOwner] = weakref.WeakSet()


_STATE = _GlobalRngState()
# Held while an eager draw reads and advances a step counter (uncontended: ~0.1 us).
_DRAW_LOCK = threading.Lock()
_peek_interpreter = torch._C._functorch.peek_interpreter_stack  # bound once: every draw asks
_INT64 = np.dtype(np.int64)
_PROCESS_FUNCTIONAL_STEP = _STATE.functional_step


def manual_seed(seed: int) -> None:
    """Seed every dropkit draw, like :func:`torch.manual_seed` does for torch.

    Sets the global seed, restarts the stream numbering for modules built afterwards, and
    restarts the step counter of every live module and of the functional stream.  So
    ``manual_seed(s)`` followed by running a model draws the same masks every time, whether the
    model was built before or after the call.

    Args:
        seed: any integer in ``[-2**63, 2**64)``; it is used modulo ``2**64``.
    """
    _STATE.seed = _check_seed(seed)
    _STATE.next_stream = 0
    _STATE.next_copy_stream = COPY_STREAMS
    _STATE.functional_step.zero_()
    for owner in list(_STATE.owners):
        owner.reset_rng_step()


def initial_seed() -> int:
    """The global seed (as a signed 64-bit integer), before any rank folding."""
    return _STATE.seed


def allocate_stream() -> int:
    """The next stream id, in construction order; :func:`manual_seed` restarts the numbering."""
    stream = _STATE.next_stream
    if stream >= COPY_STREAMS:
        raise RuntimeError("dropkit ran out of stream ids; call dropkit.manual_seed() to restart them")
    _STATE.next_stream += 1
    return stream


def allocate_copy_stream() -> int:
    """The next stream id of a copied layer (``copy.deepcopy``, unpickling): from a range of its
    own, ``[2**31, 2**32 - 1)``, so that a copy never shares a stream with a layer that was built,
    even when :func:`manual_seed` restarted the numbering after the model was built."""
    stream = _STATE.next_copy_stream
    if stream >= FUNCTIONAL_STREAM:
        raise RuntimeError("dropkit ran out of copy stream ids; call dropkit.manual_seed() to restart them")
    _STATE.next_copy_stream += 1
    return stream


def register_step_owner(owner: StepCounterOwner) -> None:
    """Let :func:`manual_seed` restart ``owner``'s step counter (held by weak reference)."""
    _STATE.owners.add(owner)


@contextlib.contextmanager
def share_masks_across_ranks(enabled: bool = True) -> Iterator[None]:
    """Context manager: draw the same masks on every ``torch.distributed`` rank.

    By default the rank is folded into the seed, because data-parallel ranks that draw identical
    masks waste their randomness.  Share masks when ranks hold *the same* activations and must
    agree (tensor parallelism of a replicated activation, or checking results across ranks).
    The default can also be set with the environment variable
    ``DROPKIT_SHARE_MASKS_ACROSS_RANKS=1``, read at import.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    previous = _STATE.share_across_ranks
    _STATE.share_across_ranks = enabled
    try:
        yield
    finally:
        _STATE.share_across_ranks = previous


_CLONING_MASKS: ContextVar[bool] = ContextVar("dropkit_cloning_masks", default=False)


@contextlib.contextmanager
def clone_masks() -> Iterator[None]:
    """Context manager: layers copied (``copy.deepcopy``) or unpickled inside it keep their stream
    and step, so the copy draws exactly the masks the original would draw next.

    By default a copy gets a stream of its own (fresh masks): an EMA or teacher copy, or an
    ensemble built by copying one model, must not repeat the original's dropout.

    Example::

        >>> import copy, torch, dropkit
        >>> layer = dropkit.nn.Dropout(0.5)
        >>> x = torch.ones(16)
        >>> with dropkit.clone_masks():
        ...     twin = copy.deepcopy(layer)
        >>> torch.equal(twin(x), layer(x))
        True
        >>> fresh = copy.deepcopy(layer)
        >>> fresh.rng_stream != layer.rng_stream
        True
    """
    token = _CLONING_MASKS.set(True)
    try:
        yield
    finally:
        _CLONING_MASKS.reset(token)


def cloning_masks() -> bool:
    """Whether copies keep their original's stream (see :func:`clone_masks`)."""
    return _CLONING_MASKS.get()


def masks_shared_across_ranks() -> bool:
    """Whether ranks currently share masks (see :func:`share_masks_across_ranks`)."""
    return _STATE.share_across_ranks


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) % _UINT64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) % _UINT64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) % _UINT64
    return value ^ (value >> 31)


# Bound once: whether this build of torch has torch.distributed cannot change while it runs.
_distributed_is_initialized = torch.distributed.is_initialized if torch.distributed.is_available() else None


def _distributed_rank() -> int:
    if _distributed_is_initialized is not None and _distributed_is_initialized():
        return int(torch.distributed.get_rank())
    return 0


# The rank numbers folded into the seed in this thread, set by rank_fold (dropkit.distributed's
# mask domains); None: the global rank.  A threading.local, not a ContextVar: a compiled forward
# reads it while it is traced, and dynamo guards on a thread-local's attributes (it cannot trace
# ContextVar.get).
class _RankFold(threading.local):
    """Per thread: the folded ranks (``None``: the global rank) and their domain.  Set in each
    thread on first use, so that reads find them (a missing thread-local attribute costs an
    exception: ~0.4 us on every draw)."""

    def __init__(self) -> None:
        self.ranks: tuple[int, ...] | None = None
        self.domain: object = None


_RANK_FOLD = _RankFold()
_RANK_MULTIPLIER = 0xD1B54A32D192ED03
_POSITION_SALT = 0x9E3779B97F4A7C15


@functools.lru_cache(maxsize=256)
def _fold(base: int, ranks: tuple[int, ...]) -> int:
    # Cached: a process folds the same seed with the same ranks on every draw.
    for position, rank in enumerate(ranks):
        if rank:
            salt = (rank * _RANK_MULTIPLIER + position * _POSITION_SALT) % _UINT64
            base = _to_int64(_splitmix64((base % _UINT64) ^ salt))
    return base


def fold_seed(seed: int, ranks: tuple[int, ...]) -> int:
    """``seed`` folded with the rank numbers ``ranks``, as :func:`effective_seed` folds it.

    Each nonzero ``ranks[i]`` mixes ``ranks[i] * 0xD1B54A32D192ED03 + i * 0x9E3779B97F4A7C15``
    into the seed with SplitMix64, in order; zeros leave it unchanged.  So ``fold_seed(s, (0,))``
    is ``s`` and ``fold_seed(s, (rank,))`` is what the global rank ``rank`` draws with by default:
    a single process can rebuild the masks of any rank.
    """
    base = _check_seed(seed)
    return _fold(base, _check_ranks(ranks))


def _check_ranks(ranks: object) -> tuple[int, ...]:
    if not isinstance(ranks, tuple) or not all(
        isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0 for rank in ranks
    ):
        raise TypeError(f"ranks must be a tuple of ints >= 0, got {ranks!r}")
    return ranks


@contextlib.contextmanager
def rank_fold(ranks: tuple[int, ...], domain: object = None) -> Iterator[None]:
    """Context manager: fold exactly ``ranks`` (a tuple of rank numbers, possibly empty) into the
    seed of the draws made inside it in this thread, instead of the global rank.

    The low-level hook of :mod:`dropkit.distributed`, whose mask domains compute ``ranks`` from
    process groups; ``domain`` is what they record to nest (see :func:`rank_fold_domain`).
    :func:`share_masks_across_ranks` still wins: it folds nothing.
    """
    ranks = _check_ranks(ranks)
    previous = _RANK_FOLD.ranks, _RANK_FOLD.domain
    _RANK_FOLD.ranks, _RANK_FOLD.domain = ranks, domain
    try:
        yield
    finally:
        _RANK_FOLD.ranks, _RANK_FOLD.domain = previous


def rank_fold_domain() -> object:
    """The ``domain`` given to the innermost active :func:`rank_fold` of this thread, or ``None``."""
    return _RANK_FOLD.domain


def folded_ranks() -> tuple[int, ...]:
    """The rank numbers that :func:`effective_seed` folds into the seed here: ``()`` under
    :func:`share_masks_across_ranks`, those of the innermost :func:`rank_fold`, else the global
    rank (``(0,)`` in a single process)."""
    if _STATE.share_across_ranks:
        return ()
    ranks = _RANK_FOLD.ranks
    return (_distributed_rank(),) if ranks is None else ranks


def effective_seed(seed: int | None = None) -> int:
    """The seed that keys are made of: the global (or given) seed folded with the rank.

    Rank 0, a single process, and :func:`share_masks_across_ranks` leave the seed unchanged;
    any other rank mixes its number into the seed with SplitMix64 (see :func:`fold_seed`).
    Inside a mask domain of :mod:`dropkit.distributed` the rank numbers folded are the domain's
    (:func:`folded_ranks`).
    """
    base = _STATE.seed if seed is None else _check_seed(seed)
    # folded_ranks(), inlined: every eager draw asks, and rank 0 (a single process) folds nothing.
    if _STATE.share_across_ranks:
        return base
    ranks = _RANK_FOLD.ranks
    if ranks is None:
        rank = _distributed_rank()
        return _fold(base, (rank,)) if rank else base
    return _fold(base, ranks)


def make_key(
    seed: int, stream: int = 0, step: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """An explicit RNG key ``[seed, stream, step]`` (int64), usable as ``seed=`` of any op."""
    seed = _check_seed(seed)
    for name, value in (("stream", stream), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")
    if device is None or torch.compiler.is_compiling():
        return torch.tensor([seed, stream, step], dtype=torch.int64, device=device)
    return to_device_async(torch.tensor([seed, stream, step], dtype=torch.int64), torch.device(device))


@contextlib.contextmanager
def seed_tensor(seed: torch.Tensor) -> Iterator[None]:
    """Context manager: keys drawn inside it take their seed from ``seed`` (an int64 tensor of one
    element), read when the draw runs, instead of the global seed; no rank folding.  It is how an
    exported program takes its seed as an input (:func:`dropkit.export` with ``seed_input=True``).
    """
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"seed must be an int64 tensor of one element, got {type(seed).__name__}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(
            f"seed must be an int64 tensor of one element, got {seed.dtype} of shape {tuple(seed.shape)}"
        )
    previous = _STATE.seed_tensor
    _STATE.seed_tensor = seed
    try:
        yield
    finally:
        _STATE.seed_tensor = previous


_JIT_TRACE_REFUSAL = (
    "dropkit's random ops cannot be recorded by torch.jit.trace in training mode: the trace would "
    "replay one mask on every call. Use torch.compile or torch.export for a training-mode graph, "
    "or trace the model in eval mode (model.eval()), where dropout is the identity"
)


def refuse_jit_trace() -> None:
    """``torch.jit.trace`` records tensors, not the key a call draws: a traced training-mode
    model would replay one mask on every call, silently.  Refuse it with what to use instead.

    :func:`draw_key` refuses before it touches a step counter; the functionals' ``resolve_key``
    refuses for an explicit seed or generator: every random call passes one of them before any
    tensor is read."""
    if torch.jit.is_tracing():
        raise RuntimeError(_JIT_TRACE_REFUSAL)


def draw_key(stream: int, step: torch.Tensor) -> torch.Tensor:
    """Draw the key for the next call of ``stream`` and advance its ``step`` counter in place.

    Under :func:`dropkit.checkpoint` the forward pass records the keys it draws and the
    recomputation replays them, so recomputed masks equal the original ones.  Refuses
    ``torch.jit.trace`` (see :func:`refuse_jit_trace`).
    """
    compiling = torch.compiler.is_compiling()
    # refuse_jit_trace() with the C check that torch.jit.is_tracing() wraps: dynamo, which only
    # takes the wrapper, never gets here (and folds jit tracing to False anyway).
    if not compiling and torch._C._is_tracing():
        raise RuntimeError(_JIT_TRACE_REFUSAL)
    transformed = not compiling and _peek_interpreter() is not None
    if compiling or transformed:
        # Traced: tensor ops only, so the advancing step is data, not a guard.  Under torch.func
        # transforms too: the step of stacked modules is batched and may not be read; a step
        # captured from outside the transform (not one of its inputs) is advanced outside it,
        # where grad would refuse the mutation.
        key = torch.cat([_key_head(stream, step.device), step.reshape(1)])
        if transformed and not torch._C._functorch.is_functorch_wrapped_tensor(step):
            with torch._C._DisableFuncTorch():
                step.add_(1)
        else:
            step.add_(1)
        return key

    # Outside every checkpoint (no frame open in any thread) there is nothing to replay or record.
    checkpointing = checkpoint.open_frames != 0
    if checkpointing:
        replayed = checkpoint.replayed_key()
        if replayed is not None:
            return replayed
    checkpoint.refuse_unmanaged_recompute()
    # Reading and advancing the counter is one atomic draw: threads calling the same layer (an
    # inference server sampling MC dropout) each get a step of their own.
    with _DRAW_LOCK:
        if _STATE.seed_tensor is not None:
            key = torch.cat([_key_head(stream, step.device), step.reshape(1)])
            step.add_(1)
        elif step.is_cpu:
            # Eager on the CPU, reading the counter is free, and the key is built in NumPy and
            # handed over without a copy: a third of the price of torch.tensor([...]).
            value = step.item()
            step.fill_(value + 1)
            key = torch.from_numpy(np.array((effective_seed(), stream, value), dtype=_INT64))
        else:
            # On an accelerator, reading the step would sync with the device and building the
            # head with torch.tensor(..., device=...) is a blocking host-to-device copy: both
            # would stall the host on every call.  The head lives on the device, cached per seed.
            # The copy in torch.cat is ordered before the add_ on the same stream.
            key = torch.cat([_device_head(effective_seed(), stream, step.device), step.reshape(1)])
            step.add_(1)
    if checkpointing:  # this thread's frames were open before the draw, if it has any
        checkpoint.record_key(key)
    return key


def _key_head(stream: int, device: torch.device) -> torch.Tensor:
    """``[seed, stream]`` in tensor ops: the seed of :func:`seed_tensor` if one is set (read when
    the ops run), else the effective global seed."""
    given_seed = _STATE.seed_tensor
    if given_seed is None:
        return torch.tensor([effective_seed(), stream], dtype=torch.int64, device=device)
    stream_tensor = torch.tensor([stream], dtype=torch.int64, device=device)
    return torch.cat([given_seed.reshape(1).to(device), stream_tensor])


_DEVICE_HEADS: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_DEVICE_HEADS_LIMIT = 4096


def _device_head(seed: int, stream: int, device: torch.device) -> torch.Tensor:
    """``[seed, stream]`` as an int64 tensor on ``device``, made once per seed, stream and device."""
    cache_key = (seed, stream, device)
    head = _DEVICE_HEADS.get(cache_key)
    if head is None:
        if len(_DEVICE_HEADS) >= _DEVICE_HEADS_LIMIT:  # seeds change rarely; bound it anyway
            _DEVICE_HEADS.clear()
        head = torch.tensor([seed, stream], dtype=torch.int64).to(device)
        _DEVICE_HEADS[cache_key] = head
    return head


def to_device_async(key: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU key on ``device`` without blocking the host: a pinned copy, sent non-blocking.

    The caching host allocator keeps the pinned block alive until the copy has run.
    """
    if key.device == device:
        return key
    if device.type == "cuda":
        return key.pin_memory().to(device, non_blocking=True)
    return key.to(device)


def element_key(key: torch.Tensor, index: int) -> torch.Tensor:
    """The key that batch element ``index`` draws with under
    ``torch.func.vmap(..., randomness="different")``: ``key``'s seed mixed with the index by
    SplitMix64, its stream and step kept.  So ``vmap(f, randomness="different")(xs)`` equals
    ``stack([f_with_key(xs[b], element_key(key, b)) for b in ...])`` bit for bit.

    Example::

        >>> import torch, dropkit
        >>> key = dropkit.make_key(7)
        >>> xs = torch.ones(3, 8)
        >>> batched = torch.func.vmap(
        ...     lambda x: dropkit.functional.dropout(x, 0.5, seed=key), randomness="different"
        ... )(xs)
        >>> keys = [dropkit.element_key(key, b) for b in range(3)]
        >>> looped = torch.stack([dropkit.functional.dropout(x, 0.5, seed=k) for x, k in zip(xs, keys)])
        >>> torch.equal(batched, looped)
        True
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    seed, stream, step = (int(value) for value in key.tolist())
    mixed = _splitmix64((seed % _UINT64) ^ ((index + 1) * 0x9E3779B97F4A7C15 % _UINT64))
    return torch.tensor([_to_int64(mixed), stream, step], dtype=torch.int64, device=key.device)


@contextlib.contextmanager
def functional_step_as(step: torch.Tensor) -> Iterator[None]:
    """Context manager: functional calls without a seed count their draws in ``step`` (an int64
    tensor of one element) instead of the process-wide counter, e.g. a buffer of a module that
    ``torch.export`` traces, so that the program lists the counter's mutation and owns it."""
    previous = _STATE.functional_step
    _STATE.functional_step = step
    try:
        yield
    finally:
        _STATE.functional_step = previous


def functional_step() -> torch.Tensor:
    """The step counter of functional calls without a seed (see :func:`functional_step_as`)."""
    return _STATE.functional_step


def draw_functional_key(device: torch.device) -> torch.Tensor:
    """Key for a functional call with no seed: the shared functional stream."""
    if _STATE.functional_step is _PROCESS_FUNCTIONAL_STEP and torch.compiler.is_exporting():
        raise RuntimeError(
            "a dropkit functional call without a seed draws from the process-wide functional "
            "counter, which a program exported by torch.export cannot own (it would be a mutated "
            "constant of the graph): export with dropkit.export, which gives the program a "
            "counter of its own, or pass seed= to the call, or use the dropkit.nn layer"
        )
    return to_device_async(draw_key(FUNCTIONAL_STREAM, _STATE.functional_step), device)


def key_from_generator(generator: torch.Generator) -> torch.Tensor:
    """A key whose seed is drawn from a :class:`torch.Generator` (stream 0, step 0)."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seed = torch.randint(
        -(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, generator=generator, device=generator.device
    )
    return torch.cat([seed, torch.zeros(2, dtype=torch.int64, device=generator.device)])
