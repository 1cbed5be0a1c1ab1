"""Activation checkpointing that recomputes the same dropout masks.

A dropkit mask is a pure function of its key ``[seed, stream, step]``; the only state a
recomputation could get wrong is the step counter, which the first forward already advanced.
:func:`checkpoint_context` records the keys drawn during the checkpointed forward and replays
them, in order, during recomputation, so recomputed masks are bit-identical to the original
ones whatever ``preserve_rng_state`` says and without stashing any torch RNG state.

A dropkit draw that happens during a backward pass with no replay active is a recomputation that
would draw *different* masks (for example ``torch.utils.checkpoint.checkpoint`` called without
``context_fn=dropkit.checkpoint_context``): it raises :class:`UnmanagedRecomputeError` instead of
silently training on wrong gradients.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

__all__ = [
    "UnmanagedRecomputeError",
    "checkpoint",
    "checkpoint_context",
    "record_key",
    "refuse_unmanaged_recompute",
    "replayed_key",
]


class UnmanagedRecomputeError(RuntimeError):
    """A checkpoint recomputation would draw different dropout masks than the forward pass."""


class _KeyLog:
    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []


class _Frame:
    """One active checkpoint context: recording into ``log`` or replaying from it."""

    def __init__(self, log: _KeyLog, replay: bool) -> None:
        self.log = log
        self.replay = replay
        self.cursor = 0

    def next_key(self) -> torch.Tensor:
        if self.cursor >= len(self.log.keys):
            raise UnmanagedRecomputeError(
                "checkpoint recomputation drew more dropout keys than the forward pass "
                f"({len(self.log.keys)}); the checkpointed function must run the same dropout "
                "calls each time (data-dependent control flow around dropout is not supported)"
            )
        key = self.log.keys[self.cursor]
        self.cursor += 1
        return key


_LOCAL = threading.local()
#: Frames open in all threads together: while it is 0 (outside every checkpoint, the common case)
#: a draw skips the per-thread lookups.  Changed under its lock, read without it: a thread only
#: needs to see its own frames, which it opened itself before reading.
open_frames = 0
_open_frames_lock = threading.Lock()


def _frames() -> list[_Frame]:
    frames: list[_Frame] | None = getattr(_LOCAL, "frames", None)
    if frames is None:
        frames = _LOCAL.frames = []
    return frames


class _FrameContext(contextlib.AbstractContextManager[None]):
    """Pushes a fresh frame on each entry: torch re-enters the recompute context for every
    recomputation (e.g. a second backward with ``retain_graph=True``)."""

    def __init__(self, log: _KeyLog, replay: bool) -> None:
        self.log = log
        self.replay = replay

    def __enter__(self) -> None:
        global open_frames
        _frames().append(_Frame(self.log, self.replay))
        with _open_frames_lock:
            open_frames += 1

    def __exit__(self, *exc_info: object) -> None:
        global open_frames
        _frames().pop()
        with _open_frames_lock:
            open_frames -= 1


def _innermost_replay() -> int | None:
    frames = _frames()
    for index in range(len(frames) - 1, -1, -1):
        if frames[index].replay:
            return index
    return None


def replayed_key() -> torch.Tensor | None:
    """The key to reuse if a recomputation is being replayed, else ``None`` (eager only)."""
    if not open_frames:
        return None
    index = _innermost_replay()
    if index is None:
        return None
    key = _frames()[index].next_key()
    # Checkpoints nested inside the replayed region record the replayed key for their own
    # recomputation.
    for frame in _frames()[index + 1 :]:
        if not frame.replay:
            frame.log.keys.append(key)
    return key


def record_key(key: torch.Tensor) -> None:
    """Remember a freshly drawn key in every enclosing recording checkpoint (eager only)."""
    if not open_frames:
        return
    for frame in _frames():
        if not frame.replay:
            frame.log.keys.append(key)


def refuse_unmanaged_recompute() -> None:
    """Raise if a fresh draw happens while autograd runs a backward pass with grad enabled.

    That only happens when a checkpoint recomputes its forward, and a fresh draw there would
    give masks that differ from the forward pass.  Eager only: traced code never recomputes
    through this path.
    """
    if torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
        raise UnmanagedRecomputeError(
            "a dropkit dropout was recomputed during backward (activation checkpointing) "
            "without dropkit's checkpoint integration, so it would draw different masks than "
            "the forward pass. Use dropkit.checkpoint(fn, *args) or pass "
            "context_fn=dropkit.checkpoint_context to torch.utils.checkpoint.checkpoint "
            "(use_reentrant=False)."
        )


def checkpoint_context() -> tuple[
    contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]
]:
    """A ``context_fn`` for :func:`torch.utils.checkpoint.checkpoint` (non-reentrant).

    Example::

        >>> import torch, dropkit
        >>> layer = torch.nn.Sequential(torch.nn.Linear(4, 4), dropkit.nn.Dropout(0.5))
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> y = torch.utils.checkpoint.checkpoint(
        ...     layer, x, use_reentrant=False, context_fn=dropkit.checkpoint_context)
        >>> y.sum().backward()
    """
    log = _KeyLog()
    return _FrameContext(log, replay=False), _FrameContext(log, replay=True)


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`torch.utils.checkpoint.checkpoint` (non-reentrant) that recomputes the same masks.

    Accepts the keyword arguments of torch's checkpoint except ``use_reentrant`` (always
    ``False``: the reentrant variant has no ``context_fn``) and ``context_fn`` (dropkit's).
    ``preserve_rng_state`` may be ``False``: dropkit masks do not depend on torch's RNG state.
    """
    for name in ("use_reentrant", "context_fn"):
        if name in kwargs and not (name == "use_reentrant" and kwargs[name] is False):
            raise ValueError(f"dropkit.checkpoint sets {name} itself, got {name}={kwargs[name]!r}")
    kwargs.pop("use_reentrant", None)
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=checkpoint_context, **kwargs
    )
