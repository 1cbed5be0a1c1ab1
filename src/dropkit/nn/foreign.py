"""Recognising the dropout modules of torch and of other libraries, and how to replace each by
the dropkit layer with the same behaviour (a :class:`Plan`), or why it cannot be (a reason).

timm's and torchvision's classes are recognised by module path and class name (and by class
identity when that module is imported), Hugging Face drop-path modules by their code; none of
those libraries is imported here.  :func:`dropkit.convert` replaces what this module plans, and
:func:`dropkit.mc_dropout` and :mod:`dropkit.diagnostics` recognise the same modules with it.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

import dropkit.nn as dk_nn
from dropkit.nn._base import _DropoutBase

__all__ = [
    "MODULE_KEYS",
    "TORCH_DROPOUT_MODULES",
    "TORCH_TO_DROPKIT",
    "Plan",
    "check_attributes",
    "class_name",
    "drop_path_plan",
    "extra_attributes",
    "foreign_class",
    "is_hf_drop_path",
    "is_stateless",
    "plan_hf_drop_path",
    "plan_replacement",
    "plan_timm_drop_block",
    "plan_timm_drop_path",
    "plan_torch",
    "plan_torchvision_stochastic_depth",
    "rate_or_reason",
]

#: torch's dropout module classes (dropkit's standard layers subclass them).
TORCH_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
MODULE_KEYS = frozenset(nn.Module().__dict__)

TORCH_TO_DROPKIT: dict[type[nn.Module], type[_DropoutBase]] = {
    nn.Dropout: dk_nn.Dropout,
    nn.Dropout1d: dk_nn.Dropout1d,
    nn.Dropout2d: dk_nn.Dropout2d,
    nn.Dropout3d: dk_nn.Dropout3d,
    nn.AlphaDropout: dk_nn.AlphaDropout,
    nn.FeatureAlphaDropout: dk_nn.FeatureAlphaDropout,
}


def class_name(cls: type) -> str:
    """``torch.nn.Dropout`` / ``dropkit.nn.Dropout`` for public classes, else ``module.qualname``."""
    for prefix, namespace in (("torch.nn", nn), ("dropkit.nn", dk_nn)):
        if getattr(namespace, cls.__name__, None) is cls:
            return f"{prefix}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Plan:
    """How to replace one module: the factory, and where its rate lives (for :func:`revert`)."""

    build: Callable[[], _DropoutBase]
    rate_attribute: str
    rate_scale: float = 1.0


def extra_attributes(module: nn.Module) -> set[str]:
    return set(module.__dict__) - MODULE_KEYS


def is_stateless(module: nn.Module) -> bool:
    return not (module._parameters or module._buffers or module._modules)


def foreign_class(module: nn.Module, module_path: str, name: str) -> bool:
    """``module`` is an instance of ``module_path.name`` (by identity when that module is imported)."""
    cls = type(module)
    if cls.__module__ != module_path or cls.__qualname__ != name:
        return False
    loaded = sys.modules.get(module_path)
    return loaded is None or getattr(loaded, name, None) is cls


def rate_or_reason(value: object, name: str) -> float | str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}={value!r} is not a rate"
    if not 0.0 <= float(value) <= 1.0:
        return f"{name}={value!r} is not in [0, 1]"
    return float(value)


def check_attributes(module: nn.Module, expected: set[str]) -> str | None:
    """Why ``module`` is not the known version (a reason), or ``None``.

    Its own attributes must include ``expected``; further private ones (``_is_hf_initialized``
    and such, set by frameworks) are carried over to the new layer, further public ones mean a
    version with options this conversion does not know."""
    extra = extra_attributes(module)
    if "forward" in module.__dict__:
        return "its forward is replaced on the instance"
    missing = expected - extra
    unknown = sorted(name for name in extra - expected if not name.startswith("_"))
    if missing or unknown:
        return (
            f"its attributes differ from the known version's {sorted(expected)} "
            f"(missing {sorted(missing)}, unknown {unknown})"
        )
    if not is_stateless(module):
        return "it has parameters, buffers or submodules, unlike the known version"
    return None


def plan_torch(module: nn.Module) -> Plan | str:
    target = TORCH_TO_DROPKIT[type(module)]
    reason = check_attributes(module, {"p", "inplace"})
    if reason is not None:
        return reason
    p, inplace = module.__dict__["p"], module.__dict__["inplace"]
    return Plan(lambda: target(p, inplace), "p")


def plan_timm_drop_path(module: nn.Module) -> Plan | str:
    reason = check_attributes(module, {"drop_prob", "scale_by_keep"})
    if reason is not None:
        return reason
    scale_by_keep = module.__dict__["scale_by_keep"]
    if scale_by_keep is not True:
        return (
            f"scale_by_keep={scale_by_keep!r}: kept paths are not rescaled, and "
            "dropkit.nn.DropPath always scales them by 1/(1-p)"
        )
    return drop_path_plan(module.__dict__["drop_prob"], "drop_prob")


def plan_torchvision_stochastic_depth(module: nn.Module) -> Plan | str:
    reason = check_attributes(module, {"p", "mode"})
    if reason is not None:
        return reason
    mode = module.__dict__["mode"]
    if mode not in ("row", "batch"):
        return f"mode={mode!r} is neither 'row' nor 'batch'"
    return drop_path_plan(module.__dict__["p"], "p", mode=mode)


def drop_path_plan(value: object, attribute: str, mode: str = "row") -> Plan | str:
    rate = rate_or_reason(value, attribute)
    if isinstance(rate, str):
        return rate
    return Plan(lambda: dk_nn.DropPath(rate, mode=mode), attribute)


def plan_timm_drop_block(module: nn.Module) -> Plan | str:
    expected = {"drop_prob", "block_size", "gamma_scale", "with_noise", "inplace", "batchwise", "fast"}
    reason = check_attributes(module, expected)
    if reason is not None:
        return reason
    attrs = module.__dict__
    if attrs["with_noise"]:
        return "with_noise=True fills dropped blocks with Gaussian noise: no dropkit equivalent"
    if attrs["fast"]:
        return (
            "fast=True draws block seeds over the whole map (blocks clipped at the edges), which "
            "drops a different fraction than dropkit.nn.DropBlock2d (seeds only where a whole "
            "block fits, as timm's fast=False): no faithful equivalent"
        )
    if attrs["batchwise"]:
        return "batchwise=True shares one mask over the batch: no dropkit equivalent"
    size = attrs["block_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        return f"block_size={size!r}: timm's mask is aligned only for an odd block size"
    scale = attrs["gamma_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        return f"gamma_scale={scale!r} is not a positive number"
    rate = rate_or_reason(attrs["drop_prob"], "drop_prob")
    if isinstance(rate, str):
        return rate
    p = rate * float(scale)
    if p > 1.0:
        return f"drop_prob * gamma_scale = {p:g} is above 1"
    inplace = attrs["inplace"]
    if not isinstance(inplace, bool):
        return f"inplace={inplace!r} is not a bool"
    return Plan(lambda: dk_nn.DropBlock2d(p, inplace, block_size=size), "drop_prob", float(scale))


def _body_of(function: object) -> tuple[str, str] | None:
    """``(first argument, body)`` of a function's source in a canonical form: each statement
    by ``ast.unparse``, spaces removed, one line each, the docstring left out; ``None`` when
    the source is not available or not a plain function."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    except (OSError, TypeError, SyntaxError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    definition = tree.body[0]
    arguments = [argument.arg for argument in definition.args.args if argument.arg != "self"]
    body = definition.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not arguments:
        return None
    return arguments[0], "\n".join(ast.unparse(statement).replace(" ", "") for statement in body)


def _is_drop_path_code(function: object, prob: str, training: str) -> bool:
    """Whether ``function(x, ...)`` is, statement for statement, the Hugging Face drop path:
    ``x`` when ``prob == 0`` or not ``training``, else ``x.div(keep) * floor(keep + rand(N, 1, ...))``
    (both spellings that ``transformers`` has used)."""
    found = _body_of(function)
    if found is None:
        return False
    x = re.escape(found[0])
    draw = rf"torch\.rand\(shape,dtype={x}\.dtype,device={x}\.device\)"
    pattern = (
        rf"if{prob}==0(?:\.0)?ornot{training}:\nreturn{x}\n"
        rf"keep_prob=1(?:\.0)?-{prob}\n"
        rf"shape=\({x}\.shape\[0\],\)\+\(1,\)\*\({x}\.ndim-1\)\n"
        rf"(?:random_tensor={draw}\nrandom_tensor=torch\.floor\(random_tensor\+keep_prob\)"
        rf"|random_tensor=keep_prob\+{draw}\nrandom_tensor\.floor_\(\))\n"
        rf"(?:return{x}\.div\(keep_prob\)\*random_tensor"
        rf"|output={x}\.div\(keep_prob\)\*random_tensor\nreturnoutput)"
    )
    return re.fullmatch(pattern, found[1]) is not None


def _hf_drop_path_code(cls: type[nn.Module]) -> bool:
    """The Hugging Face drop-path code, inline in ``forward`` or through the file's ``drop_path``."""
    if _is_drop_path_code(cls.forward, r"self\.drop_prob", r"self\.training"):
        return True
    found = _body_of(cls.forward)
    if found is None or found[1] != f"returndrop_path({found[0]},self.drop_prob,self.training)":
        return False
    helper = getattr(sys.modules.get(cls.__module__), "drop_path", None)
    return _is_drop_path_code(helper, "drop_prob", "training")


def plan_hf_drop_path(module: nn.Module) -> Plan | str:
    reason = check_attributes(module, {"drop_prob"})
    if reason is not None:
        return reason
    if not _hf_drop_path_code(type(module)):
        return "its code does not match the Hugging Face drop-path pattern (per-sample, scaled by 1/keep)"
    return drop_path_plan(module.__dict__["drop_prob"], "drop_prob")


def is_hf_drop_path(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("DropPath")


def plan_replacement(module: nn.Module) -> Plan | str | None:
    """How to convert ``module``: a plan, a reason to skip it, or ``None`` (not dropout-like)."""
    cls = type(module)
    if cls in TORCH_TO_DROPKIT:
        return plan_torch(module)
    if isinstance(module, TORCH_DROPOUT_MODULES):
        base = next(base for base in cls.__mro__ if base in TORCH_TO_DROPKIT)
        return f"a subclass of {class_name(base)} with code of its own"
    if foreign_class(module, "timm.layers.drop", "DropPath"):
        return plan_timm_drop_path(module)
    if foreign_class(module, "timm.layers.drop", "DropBlock2d"):
        return plan_timm_drop_block(module)
    if foreign_class(module, "torchvision.ops.stochastic_depth", "StochasticDepth"):
        return plan_torchvision_stochastic_depth(module)
    if is_hf_drop_path(module):
        return plan_hf_drop_path(module)
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return (
            f"its attention dropout (p={module.dropout:g}) runs inside "
            "torch.nn.functional.multi_head_attention_forward: no module to replace "
            "(dropkit.mc_dropout turns it on)"
        )
    if "drop" in cls.__name__.lower() and not module._modules:
        return "not a dropout class that dropkit.convert knows"
    return None
