"""Deprecation helpers: renamed arguments, deprecated aliases, renamed ``state_dict`` prefixes.

Every deprecated spelling keeps working for one release with a :class:`DeprecationWarning` that
names its replacement; passing an old and a new spelling of one argument is a ``TypeError``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

from torch import nn

__all__ = ["rename_state_dict_prefix", "renamed_arguments", "upgrade_renamed_submodule", "warn_deprecated"]

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def warn_deprecated(message: str, stacklevel: int = 2) -> None:
    """A :class:`DeprecationWarning` attributed to the caller ``stacklevel`` frames up."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)


def _owner(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """What the user called: the class for an ``__init__``, the function otherwise."""
    if fn.__name__ == "__init__" and args:
        return type(args[0]).__name__
    return fn.__name__


def renamed_arguments(**renames: str) -> Callable[[_Fn], _Fn]:
    """Accept ``old=`` as a deprecated keyword alias of ``new`` for each ``old="new"`` given.

    The decorated function keeps its signature (``inspect.signature`` and type checkers see the
    new names only).  A call with an old name warns and passes the value on under the new one;
    a call that also gives the new name, by keyword or by position, is a ``TypeError``.
    """

    def decorate(fn: _Fn) -> _Fn:
        names = list(inspect.signature(fn).parameters)
        for new in renames.values():
            if new not in names:
                raise AssertionError(f"{fn.__qualname__} has no parameter {new!r}")  # a bug here

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                owner = _owner(fn, args)
                if new in kwargs or len(args) > names.index(new):
                    raise TypeError(
                        f"{owner}() got {new!r} and its deprecated alias {old!r}; pass {new!r} only"
                    )
                warn_deprecated(
                    f"{owner}(): the argument {old!r} is deprecated and will be removed in the next "
                    f"release; pass {new!r} instead",
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return cast(_Fn, wrapper)

    return decorate


def _rename_prefix_hook(
    old: str,
    new: str,
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    old_prefix, new_prefix = f"{prefix}{old}.", f"{prefix}{new}."
    for key in [key for key in state_dict if key.startswith(old_prefix)]:
        renamed = new_prefix + key[len(old_prefix) :]
        if renamed not in state_dict:  # a checkpoint with both spellings: the new one wins
            state_dict[renamed] = state_dict.pop(key)


def rename_state_dict_prefix(module: nn.Module, old: str, new: str) -> None:
    """Let ``module.load_state_dict`` accept keys saved under the submodule name ``old``
    (``old.weight``) for the submodule now called ``new`` (``new.weight``)."""
    module.register_load_state_dict_pre_hook(functools.partial(_rename_prefix_hook, old, new))


def upgrade_renamed_submodule(module: nn.Module, old: str, new: str) -> None:
    """After unpickling: a module pickled whole before its submodule ``old`` was renamed ``new``
    gets the new name (in place, order kept) and the load hook of :func:`rename_state_dict_prefix`."""
    if old in module._modules and new not in module._modules:
        module._modules = {new if name == old else name: child for name, child in module._modules.items()}
        rename_state_dict_prefix(module, old, new)
