"""What an MC mode turns on: the ``include`` / ``exclude`` selection of modules, the module types
it switches, the rates that decide whether a site acts (zero-rate sites stay deterministic),
the attention dropout rate it finds on a module, and the stochastic-depth modules of timm,
torchvision and Hugging Face it recognises; see :mod:`dropkit.mc.mode`."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

from dropkit.nn import foreign
from dropkit.nn._base import _RandomLayer
from dropkit.nn.attention import AttentionDropout, ScaledDotProductAttention
from dropkit.nn.droppath import DropPath, LayerDrop, StochasticDepth
from dropkit.nn.foreign import TORCH_DROPOUT_MODULES

__all__ = [
    "ATTENTION_LAYERS",
    "DROP_PATH_LAYERS",
    "FAST_PATH_MODULES",
    "TORCH_DROPOUT_MODULES",
    "AttentionRate",
    "ForeignDropPath",
    "Selector",
    "SelectorSpec",
    "attention_rate",
    "check_attention_p",
    "find_attention_rate",
    "foreign_drop_path",
    "has_zero_rate",
    "normalize_selector",
    "selected_modules",
]

Selector = Union[type, str, Callable[[str, nn.Module], bool]]  # noqa: UP007 - a runtime alias on 3.10
SelectorSpec = Union[Selector, Sequence[Selector], None]  # noqa: UP007
AttentionRate = Union[float, str, Callable[[nn.Module], Union[float, None]], None]  # noqa: UP007

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
# dropkit's stochastic-depth family: on in MC mode only with ``drop_path=True`` (the default).
DROP_PATH_LAYERS: tuple[type[nn.Module], ...] = (DropPath, StochasticDepth, LayerDrop)
# Modules whose attention dropout rate is a module attribute that ``attention_p`` overrides for
# the mode (``p`` for dropkit's, ``dropout`` for torch's).
ATTENTION_LAYERS: tuple[type[nn.Module], ...] = (
    AttentionDropout,
    ScaledDotProductAttention,
    nn.MultiheadAttention,
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


def find_attention_rate(spec: AttentionRate, module: nn.Module) -> tuple[float | None, nn.Module | None]:
    """The attention dropout rate that ``spec`` (a checked ``attention_p``) finds on ``module``,
    and the module that holds it (an ``nn.Dropout`` kept only for its ``p``), if any.

    ``spec`` ``None`` is the automatic rule: the first attribute of ``_ATTENTION_ATTRIBUTES``
    holding a rate in ``[0, 1]`` or a module with such a ``p``.
    """
    if isinstance(spec, float):
        return spec, None
    if isinstance(spec, str):
        value: Any = module
        for part in spec.split("."):
            value = getattr(value, part, None)
        return _rate_of(value), value if isinstance(value, nn.Module) else None
    if spec is not None:
        found = spec(module)
        return (None if found is None else _rate_of(found)), None
    for attribute in _ATTENTION_ATTRIBUTES:
        value = getattr(module, attribute, None)
        rate = _rate_of(value)
        if rate is not None:
            return rate, value if isinstance(value, nn.Module) else None
    return None, None


def attention_rate(spec: AttentionRate, module: nn.Module) -> float | None:
    """The attention dropout rate that ``spec`` (a checked ``attention_p``) finds on ``module``."""
    return find_attention_rate(spec, module)[0]


# ---------------------------------------------------------------------------------------------
# Zero rates and stochastic depth


def has_zero_rate(module: _RandomLayer) -> bool:
    """Whether every rate of a dropkit layer is 0 (it is then deterministic: the identity, or
    for :class:`~dropkit.nn.StochasticDepth` its branch plus the input).  Layers without a
    rate attribute (variational, concrete: learnt noise) never are."""
    rates = type(module)._tensor_rates
    return bool(rates) and all(getattr(module, name) == 0.0 for name in rates)


@dataclass(frozen=True)
class ForeignDropPath:
    """A recognised stochastic-depth module of timm, torchvision or Hugging Face.

    Attributes:
        rate_attribute: where its drop rate lives (``drop_prob`` or ``p``), read at every call.
        mode: ``"row"`` (per sample) or ``"batch"`` (torchvision's whole-batch mode).
        exact: whether :func:`dropkit.convert` would replace it by :class:`dropkit.nn.DropPath`
            (the same distribution), so that MC mode can run it on dropkit's engine with
            per-sample keys; else ``reason`` says why not, and the module's own code runs.
        reason: why it is not exact (``""`` when it is).
    """

    rate_attribute: str
    mode: str
    exact: bool
    reason: str = ""

    def rate(self, module: nn.Module) -> float:
        """The module's drop rate now (``0.0`` if it is not a rate)."""
        value = _rate_of(module.__dict__.get(self.rate_attribute))
        return 0.0 if value is None else value


def foreign_drop_path(module: nn.Module) -> ForeignDropPath | None:
    """``module`` as a timm ``DropPath``, a torchvision ``StochasticDepth`` or a Hugging Face
    ``*DropPath``, else ``None``.

    Recognised as :func:`dropkit.convert` recognises them (module path and class name, class
    identity when the library is imported, the Hugging Face code checked on its source),
    without importing any of the libraries, with the recognisers of :mod:`dropkit.nn.foreign`.
    """
    if foreign.foreign_class(module, "timm.layers.drop", "DropPath"):
        plan, attribute = foreign.plan_timm_drop_path(module), "drop_prob"
    elif foreign.foreign_class(module, "torchvision.ops.stochastic_depth", "StochasticDepth"):
        plan, attribute = foreign.plan_torchvision_stochastic_depth(module), "p"
    elif foreign.is_hf_drop_path(module):
        plan, attribute = foreign.plan_hf_drop_path(module), "drop_prob"
    else:
        return None
    mode = module.__dict__.get("mode", "row")
    if isinstance(plan, str):
        return ForeignDropPath(attribute, mode if mode in ("row", "batch") else "row", False, plan)
    return ForeignDropPath(plan.rate_attribute, mode, True)
