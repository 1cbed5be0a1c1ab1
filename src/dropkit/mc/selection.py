"""What an MC mode turns on: the ``include`` / ``exclude`` selection of modules, the module types
it switches, and the attention dropout rate it finds on a module; see :mod:`dropkit.mc.mode`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Union

from torch import nn

__all__ = [
    "FAST_PATH_MODULES",
    "TORCH_DROPOUT_MODULES",
    "AttentionRate",
    "Selector",
    "SelectorSpec",
    "attention_rate",
    "check_attention_p",
    "normalize_selector",
    "selected_modules",
]

Selector = Union[type, str, Callable[[str, nn.Module], bool]]  # noqa: UP007 - a runtime alias on 3.10
SelectorSpec = Union[Selector, Sequence[Selector], None]  # noqa: UP007
AttentionRate = Union[float, str, Callable[[nn.Module], Union[float, None]], None]  # noqa: UP007

TORCH_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# Modules whose own training flag only picks an eval fast path (that skips dropout) and passes
# ``training`` to functional dropout; they have no other train-mode side effect.
FAST_PATH_MODULES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)
_ATTENTION_ATTRIBUTES = (
    "attn_drop",
    "attention_dropout",
    "attn_dropout",
    "dropout_p",
    "attn_pdrop",
    "dropout",
)


# ---------------------------------------------------------------------------------------------
# Modules


def normalize_selector(spec: SelectorSpec, name: str) -> list[Selector] | None:
    """``spec`` (one selector, a list of them or ``None``) as a checked list, or ``None``."""
    if spec is None:
        return None
    if isinstance(spec, (type, str)) or callable(spec):
        items: list[Any] = [spec]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        items = list(spec)
    else:
        raise TypeError(
            f"{name} must be a module type, a name pattern, a predicate or a list of these, "
            f"got {type(spec).__name__} ({spec!r})"
        )
    for item in items:
        if not (isinstance(item, (type, str)) or callable(item)):
            raise TypeError(
                f"{name} must be a module type, a name pattern, a predicate or a list of these, "
                f"got {type(item).__name__} ({item!r})"
            )
        if isinstance(item, type) and not issubclass(item, nn.Module):
            raise TypeError(f"{name} types must be torch.nn.Module subclasses, got {item.__name__}")
    return items


def _matches(selectors: list[Selector], name: str, module: nn.Module) -> bool:
    for item in selectors:
        if isinstance(item, type):
            if isinstance(module, item):
                return True
        elif isinstance(item, str):
            if fnmatch.fnmatchcase(name, item):
                return True
        elif item(name, module):
            return True
    return False


def selected_modules(
    model: nn.Module, include: list[Selector] | None, exclude: list[Selector] | None
) -> dict[nn.Module, bool]:
    """``module -> selected`` for every module of ``model`` (inherited down the tree)."""
    result: dict[nn.Module, bool] = {}

    def visit(name: str, module: nn.Module, included: bool, excluded: bool) -> None:
        if module in result:
            return
        included = included or include is None or _matches(include, name, module)
        excluded = excluded or (exclude is not None and _matches(exclude, name, module))
        result[module] = included and not excluded
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child, included, excluded)

    visit("", model, False, False)
    return result


# ---------------------------------------------------------------------------------------------
# Attention dropout rates


def _rate_of(value: object) -> float | None:
    if isinstance(value, nn.Module):
        value = getattr(value, "p", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    rate = float(value)
    return rate if 0.0 <= rate <= 1.0 else None


def check_attention_p(attention_p: object) -> AttentionRate:
    """``attention_p`` checked: a rate in ``[0, 1]`` (as a float), a string, a callable or ``None``."""
    if attention_p is None or isinstance(attention_p, str) or callable(attention_p):
        return attention_p
    if isinstance(attention_p, bool) or not isinstance(attention_p, (int, float)):
        raise TypeError(
            f"attention_p must be a float, an attribute name, a callable or None, got "
            f"{type(attention_p).__name__} ({attention_p!r})"
        )
    rate = float(attention_p)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"attention_p must be in [0, 1], got {attention_p}")
    return rate


def attention_rate(spec: AttentionRate, module: nn.Module) -> float | None:
    """The attention dropout rate that ``spec`` (a checked ``attention_p``) finds on ``module``."""
    if isinstance(spec, float):
        return spec
    if isinstance(spec, str):
        value: Any = module
        for part in spec.split("."):
            value = getattr(value, part, None)
        return _rate_of(value)
    if spec is not None:
        rate = spec(module)
        return None if rate is None else _rate_of(rate)
    for attribute in _ATTENTION_ATTRIBUTES:
        rate = _rate_of(getattr(module, attribute, None))
        if rate is not None:
            return rate
    return None
