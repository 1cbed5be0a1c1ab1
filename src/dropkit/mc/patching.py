"""The patches of ``torch.nn.functional`` that MC modes install, and the module stack they read.

While at least one MC mode is active, ``torch.nn.functional.dropout`` (and ``dropout1d/2d/3d``,
``alpha_dropout``, ``feature_alpha_dropout``) and ``scaled_dot_product_attention`` are replaced
by stand-ins.  A stand-in called from the forward of a module that an active mode selected (the
innermost frame of this thread's module stack) hands the call to that mode; every other call
goes to the original function unchanged.  The patches are shared by all active modes, installed
by the first and removed by the last; see :mod:`dropkit.mc.mode`.

The module stack is kept by two forward hooks, :func:`enter_module` and :func:`leave_module`,
that a mode registers on every module of its model; each pushes the :class:`Frame` the mode
stored on the module (attribute :data:`FRAME_ATTRIBUTE`).  The hooks are the same functions for
every mode and read nothing but that frame, so ``torch.compile`` traces them without guarding on
any mode's state.  What a mode does with an intercepted call (count it, key it per sample) runs
eagerly: the stand-ins hand the call over through :func:`run_eagerly` wrappers, at which a
compiled graph breaks, so a compiled model in MC mode never recompiles because a counter or a
sampling plan changed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as torch_F
from torch import nn

__all__ = [
    "FRAME_ATTRIBUTE",
    "Frame",
    "Interceptor",
    "enter_module",
    "frame_stack",
    "install_patches",
    "leave_module",
    "original_function",
    "remove_patches",
    "run_eagerly",
    "stand_in_for",
]

FRAME_ATTRIBUTE = "_dropkit_mc_frame"
"""The attribute (in the module's ``__dict__``) holding a module's :class:`Frame` while a mode tracks it."""


class Interceptor(Protocol):
    """What a stand-in hands an intercepted call to (an MC mode's handle)."""

    @property
    def active(self) -> bool: ...

    def intercept_dropout(
        self, name: str, frame: Frame, input: torch.Tensor, p: float, training: bool, inplace: bool
    ) -> torch.Tensor: ...

    def intercept_attention(
        self,
        frame: Frame,
        original: Callable[..., torch.Tensor],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor: ...


@dataclass
class Frame:
    """A module whose forward is running, the mode that tracks it, whether it is selected, and
    whether it is the root of that mode."""

    module: nn.Module
    handle: Interceptor
    selected: bool
    root: bool = False


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.stack: list[Frame] = []


_THREAD = _ThreadState()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINALS: dict[str, Callable[..., Any]] = {}


def frame_stack() -> list[Frame]:
    """This thread's stack of running modules (innermost last), pushed and popped by the modes."""
    return _THREAD.stack


def enter_module(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a tracked module: push its frame (see the module docstring).

    A forward of the root of a mode first drops the frames of that mode that a forward which
    raised left behind (post-hooks do not run on an exception).
    """
    frame: Frame = module.__dict__[FRAME_ATTRIBUTE]
    stack = _THREAD.stack
    if stack and frame.root:
        stack[:] = [entry for entry in stack if entry.handle is not frame.handle]
    stack.append(frame)


def leave_module(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of a tracked module: pop its frame, and any left above it by an exception."""
    frame = module.__dict__.get(FRAME_ATTRIBUTE)
    stack = _THREAD.stack
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] is frame:
            del stack[index:]
            return


def run_eagerly(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, run eagerly under ``torch.compile`` (a graph break) once ``torch._dynamo`` is loaded.

    Before that nothing can be compiling, and importing it (seconds) is not worth it: the
    function is returned as it is.
    """
    if "torch._dynamo" not in sys.modules:
        return function
    wrapped: Callable[..., Any] = torch.compiler.disable(
        function, reason="dropkit MC mode: per-sample keys and counters run eagerly"
    )
    return wrapped


def original_function(name: str) -> Callable[..., Any]:
    """The ``torch.nn.functional`` function ``name`` as it was before the patches."""
    return _ORIGINALS.get(name, getattr(torch_F, name))


def _current_frame() -> Frame | None:
    stack = _THREAD.stack
    if not stack:
        return None
    frame = stack[-1]
    return frame if frame.selected and frame.handle.active else None


def _route_dropout(frame: Frame, name: str, args: tuple[Any, ...]) -> torch.Tensor:
    return frame.handle.intercept_dropout(name, frame, *args)


def _route_attention(
    frame: Frame, original: Callable[..., torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    return frame.handle.intercept_attention(frame, original, *args, **kwargs)


# How a stand-in hands a call to its mode: the functions above, wrapped by run_eagerly once
# torch._dynamo is loaded (then the same wrapped objects for good, so compiled graphs keep
# their guards).
_ROUTES: dict[str, Callable[..., torch.Tensor]] = {"dropout": _route_dropout, "attention": _route_attention}
_EAGER_ROUTES = [False]


def _dispatch_dropout(name: str, args: tuple[Any, ...]) -> torch.Tensor:
    frame = _current_frame()
    if frame is None:
        result: torch.Tensor = original_function(name)(*args)
        return result
    return _ROUTES["dropout"](frame, name, args)


def dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout`` while an MC mode is active."""
    return _dispatch_dropout("dropout", (input, p, training, inplace))


def dropout1d(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout1d`` while an MC mode is active."""
    return _dispatch_dropout("dropout1d", (input, p, training, inplace))


def dropout2d(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout2d`` while an MC mode is active."""
    return _dispatch_dropout("dropout2d", (input, p, training, inplace))


def dropout3d(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout3d`` while an MC mode is active."""
    return _dispatch_dropout("dropout3d", (input, p, training, inplace))


def alpha_dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.alpha_dropout`` while an MC mode is active."""
    return _dispatch_dropout("alpha_dropout", (input, p, training, inplace))


def feature_alpha_dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.feature_alpha_dropout`` while an MC mode is active."""
    return _dispatch_dropout("feature_alpha_dropout", (input, p, training, inplace))


def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.scaled_dot_product_attention`` while an MC mode is active."""
    original = original_function("scaled_dot_product_attention")
    frame = _current_frame()
    if frame is None:
        result: torch.Tensor = original(query, key, value, *args, **kwargs)
        return result
    return _ROUTES["attention"](frame, original, (query, key, value, *args), kwargs)


_STAND_INS: dict[str, Callable[..., torch.Tensor]] = {
    "dropout": dropout,
    "dropout1d": dropout1d,
    "dropout2d": dropout2d,
    "dropout3d": dropout3d,
    "alpha_dropout": alpha_dropout,
    "feature_alpha_dropout": feature_alpha_dropout,
    "scaled_dot_product_attention": scaled_dot_product_attention,
}


def stand_in_for(function: object) -> Callable[..., torch.Tensor] | None:
    """The stand-in of a ``torch.nn.functional`` dropout/attention function, else ``None``.

    Used to rewrite traced graphs, whose nodes hold the function objects seen at trace time.
    """
    for name, stand_in in _STAND_INS.items():
        if function is original_function(name) or function is stand_in:
            return stand_in
    return None


def _clean_dynamo_rules() -> None:
    """Keep the stand-ins out of Dynamo's map of torch functions, when Dynamo is loaded.

    Dynamo builds that map once, by looking the functions up by name
    (``torch.nn.functional.dropout``, ...); built while the patches are in place (Dynamo imported
    during a mode), it would take a stand-in for torch's function and put the call, with the
    keys of the moment, into compiled graphs.  So it is built, or rebuilt, while the originals
    are in place.
    """
    trace_rules = sys.modules.get("torch._dynamo.trace_rules")
    if trace_rules is None:
        return
    rules = trace_rules.get_torch_obj_rule_map()
    if any(stand_in in rules for stand_in in _STAND_INS.values()):
        trace_rules.get_torch_obj_rule_map.cache_clear()
        trace_rules.get_torch_obj_rule_map()


def install_patches() -> None:
    """Count one more active mode; the first replaces the functions by their stand-ins."""
    global _PATCH_USERS
    with _PATCH_LOCK:
        if not _EAGER_ROUTES[0] and "torch._dynamo" in sys.modules:
            for route, function in list(_ROUTES.items()):
                _ROUTES[route] = run_eagerly(function)
            _EAGER_ROUTES[0] = True
        if _PATCH_USERS == 0:
            _clean_dynamo_rules()
            for name, stand_in in _STAND_INS.items():
                current = getattr(torch_F, name)
                if current is not stand_in:
                    _ORIGINALS[name] = current
                    setattr(torch_F, name, stand_in)
        _PATCH_USERS += 1


def remove_patches() -> None:
    """Count one active mode less; the last puts the original functions back."""
    global _PATCH_USERS
    with _PATCH_LOCK:
        _PATCH_USERS -= 1
        if _PATCH_USERS == 0:
            for name, stand_in in _STAND_INS.items():
                # Restore only what is still ours; a later patch by someone else stays (our
                # stand-in underneath passes every call through once no mode is active).
                if getattr(torch_F, name) is stand_in and name in _ORIGINALS:
                    setattr(torch_F, name, _ORIGINALS[name])
            _clean_dynamo_rules()
