"""The patches of ``torch.nn.functional`` that MC modes install, and the module stack they read.

While at least one MC mode is active, ``torch.nn.functional.dropout`` (and ``dropout1d/2d/3d``,
``alpha_dropout``, ``feature_alpha_dropout``) and ``scaled_dot_product_attention`` are replaced
by stand-ins.  A stand-in called from the forward of a module that an active mode selected (the
innermost frame of this thread's module stack) hands the call to that mode; every other call
goes to the original function unchanged.  The patches are shared by all active modes, installed
by the first and removed by the last; see :mod:`dropkit.mc.mode`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as torch_F
from torch import nn

__all__ = [
    "Frame",
    "Interceptor",
    "frame_stack",
    "install_patches",
    "remove_patches",
    "stand_in_for",
]


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
    """A module whose forward is running, the mode that tracks it, and whether it is selected."""

    module: nn.Module
    handle: Interceptor
    selected: bool


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


def _current_frame() -> Frame | None:
    stack = _THREAD.stack
    if not stack:
        return None
    frame = stack[-1]
    return frame if frame.selected and frame.handle.active else None


def _dispatch_dropout(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    original = _ORIGINALS.get(name, getattr(torch_F, name))
    frame = _current_frame()
    if frame is None:
        result: torch.Tensor = original(*args, **kwargs)
        return result
    return frame.handle.intercept_dropout(name, frame, *args, **kwargs)


def dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout`` while an MC mode is active."""
    return _dispatch_dropout("dropout", (input, p, training, inplace), {})


def dropout1d(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout1d`` while an MC mode is active."""
    return _dispatch_dropout("dropout1d", (input, p, training, inplace), {})


def dropout2d(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout2d`` while an MC mode is active."""
    return _dispatch_dropout("dropout2d", (input, p, training, inplace), {})


def dropout3d(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.dropout3d`` while an MC mode is active."""
    return _dispatch_dropout("dropout3d", (input, p, training, inplace), {})


def alpha_dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.alpha_dropout`` while an MC mode is active."""
    return _dispatch_dropout("alpha_dropout", (input, p, training, inplace), {})


def feature_alpha_dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = False, inplace: bool = False
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.feature_alpha_dropout`` while an MC mode is active."""
    return _dispatch_dropout("feature_alpha_dropout", (input, p, training, inplace), {})


def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Stand-in for ``torch.nn.functional.scaled_dot_product_attention`` while an MC mode is active."""
    original = _ORIGINALS.get("scaled_dot_product_attention", torch_F.scaled_dot_product_attention)
    frame = _current_frame()
    if frame is None:
        result: torch.Tensor = original(query, key, value, *args, **kwargs)
        return result
    return frame.handle.intercept_attention(frame, original, query, key, value, *args, **kwargs)


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
        if function is _ORIGINALS.get(name, getattr(torch_F, name)) or function is stand_in:
            return stand_in
    return None


def install_patches() -> None:
    """Count one more active mode; the first replaces the functions by their stand-ins."""
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
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
