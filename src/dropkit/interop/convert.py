"""Convert the dropout modules of an existing model to dropkit layers, and back.

:func:`convert` replaces, in place or on a copy, every dropout module it can replace
faithfully by the dropkit layer with the same rate and options, and :func:`revert` puts the
original modules back.  Both return a :class:`ConversionReport`.

What is replaced, and by what:

* ``torch.nn.Dropout``, ``Dropout1d``, ``Dropout2d``, ``Dropout3d``, ``AlphaDropout`` and
  ``FeatureAlphaDropout`` (the exact classes; a user subclass has code of its own and is left
  as is) by :class:`dropkit.nn.Dropout` etc. with the same ``p`` and ``inplace``.  The masks
  follow the same distribution (one draw per element, or per sample and channel; dropkit
  realises ``p`` to within :math:`2^{-17}`), alpha dropout the same affine correction, and eval
  mode is the identity in both.  One difference: ``torch.nn.Dropout2d`` reads a 3-D input as
  ``(N, C, L)`` (deprecated, with a warning) and ``dropkit.nn.Dropout2d`` as an unbatched
  ``(C, H, W)`` map; with ``example_inputs`` such a module (and a ``Dropout2d`` / ``Dropout3d``
  that receives a rank dropkit refuses) is left unconverted and listed as skipped.
* timm's ``timm.layers.drop.DropPath`` (``scale_by_keep=True``), torchvision's
  ``torchvision.ops.StochasticDepth`` (``mode="row"`` or ``"batch"``) and the per-sample drop
  path modules of Hugging Face ``transformers`` (``ConvNextDropPath``, ``BeitDropPath``,
  ``SwinDropPath``, ...: a ``drop_prob`` attribute and the code ``x.div(keep_prob) *
  floor(keep_prob + rand(N, 1, ..., 1))``, inline or through the model file's ``drop_path``
  helper, checked on the source) by :class:`dropkit.nn.DropPath` with ``p = drop_prob``: each
  sample's path is dropped with probability ``p`` and kept ones are scaled by
  :math:`1/(1-p)`.  At ``p = 1`` dropkit gives exact zeros where the Hugging Face code gives NaN.
* timm's ``timm.layers.drop.DropBlock2d`` with ``fast=False``, ``batchwise=False``,
  ``with_noise=False`` and an odd ``block_size`` by :class:`dropkit.nn.DropBlock2d` with
  ``p = drop_prob * gamma_scale`` (the seed rate :math:`\\gamma` of both is linear in that
  product), the same ``block_size`` and ``inplace``: seeds per sample and channel only where a
  whole block fits, renormalised by ``numel / sum`` of the batch's mask.  The two are the same
  while the block fits in the feature map; on a smaller map timm's :math:`\\gamma` uses the
  unclipped block size.  ``fast=True`` (timm's default) draws seeds over the whole map with
  blocks clipped at the edges, which drops a different (larger) fraction; ``batchwise=True``
  shares one mask over the batch; ``with_noise=True`` fills dropped blocks with noise: none has
  a dropkit equivalent, so such modules are skipped, with the reason, in the report.

A ``torch.nn.MultiheadAttention`` with a positive ``dropout`` is listed as skipped: its
attention dropout runs inside ``torch.nn.functional.multi_head_attention_forward`` and there is
no module to replace (the ``nn.Dropout`` modules of the ``nn.Transformer*`` layers are replaced).
Any other leaf module with "drop" in its class name is listed as skipped too, as unknown.

timm and torchvision classes are recognised by their module path and class name (and, when
that module is imported, by class identity); neither library is imported here.  A dropkit layer
already in the model is left as it is (dropkit's standard layers subclass the ``torch.nn``
classes, and are recognised first), so converting twice replaces nothing the second time.

What is kept: the ``training`` flag, the module's hooks (moved to the new module), the
``state_dict`` (dropout modules have no parameters, and dropkit's step counter is not
persistent) and the structure (a module shared by several parents is replaced by one new
module).  The new layers get dropkit streams in the order of ``named_modules()``, so after
:func:`dropkit.manual_seed` the conversion and the masks are reproducible.

Functional dropout cannot be replaced: code such as ``F.dropout(x, p, self.training)`` or
``F.scaled_dot_product_attention(q, k, v, dropout_p=...)`` inside a forward keeps calling
torch.  With ``example_inputs`` the model runs one forward in eval mode, without gradients,
with every ``training`` flag restored afterwards, while the stand-ins of
:mod:`dropkit.mc.patching` record which module makes each call of
``torch.nn.functional.dropout``, ``dropout1d/2d/3d``, ``alpha_dropout`` and
``feature_alpha_dropout``, and of ``scaled_dot_product_attention`` with a positive rate; the
calls run unchanged.  Models pass ``p=0`` / ``dropout_p=0`` in eval; the rate is then looked up
on the calling module as :func:`dropkit.mc_dropout` does (so an attention call without dropout
from a module that holds an attention rate is counted too, as that mode would turn it on), and
reported as unknown if none is found.  Calls that run only in training, calls through names
bound before the forward (``from torch.nn.functional import dropout``) and fused eval fast
paths are not seen.  :func:`dropkit.mc_dropout` turns such calls on at run time.

:func:`revert` restores, for every module that :func:`convert` made, the very module it
replaced (the original is kept on the dropkit layer, outside ``state_dict`` and
``named_modules``, and survives ``copy.deepcopy`` and pickling), with the current ``training``
flag and, if the dropkit layer's ``p`` was changed since, that rate.
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import nn

from dropkit.mc import patching
from dropkit.mc.mode import _ACTIVE as _MC_ACTIVE
from dropkit.mc.patching import Frame, frame_stack, install_patches, remove_patches
from dropkit.mc.selection import attention_rate
from dropkit.nn._base import _DropoutBase, _RandomLayer
from dropkit.nn.foreign import (
    MODULE_KEYS,
    TORCH_DROPOUT_MODULES,
    TORCH_TO_DROPKIT,
    Plan,
    class_name,
    extra_attributes,
    plan_replacement,
)

__all__ = ["ConversionReport", "FunctionalCall", "Replacement", "Skipped", "convert", "revert"]

_ORIGIN = "_dropkit_converted_from"
# Input ranks for which a dropkit channel layer reads the input as torch does.
_SAME_RANKS: dict[type[nn.Module], tuple[int, ...]] = {nn.Dropout2d: (4,), nn.Dropout3d: (4, 5)}

# Modules whose own functional calls the report lists as module sites (replaced or skipped).
_MODULE_SITES = (*TORCH_DROPOUT_MODULES, nn.MultiheadAttention)


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Replacement:
    """One module replaced by :func:`convert` (or put back by :func:`revert`).

    Attributes:
        name: qualified name of the module in the model (``""`` for the model itself).
        old_class: class that was there, e.g. ``"torch.nn.Dropout"``.
        new_class: class that is there now, e.g. ``"dropkit.nn.Dropout"``.
        rate: the drop rate, dropkit's ``p`` (for timm's ``DropBlock2d``,
            ``drop_prob * gamma_scale``).
        called: whether the example forward called the module (``None``: not inspected).  A
            converted module that is never called may only hold a rate that functional code
            reads (``self.dropout.p``); see :attr:`ConversionReport.functional_calls`.
    """

    name: str
    old_class: str
    new_class: str
    rate: float
    called: bool | None = None


@dataclass(frozen=True)
class Skipped:
    """A dropout-like module left as it is, and why."""

    name: str
    module_class: str
    reason: str


@dataclass(frozen=True)
class FunctionalCall:
    """Functional dropout calls made from one module's forward, which :func:`convert` cannot replace.

    Attributes:
        module: qualified name of the innermost module whose forward made the calls.
        module_class: its class.
        function: e.g. ``"torch.nn.functional.scaled_dot_product_attention"``.
        rate: the positive rate passed, else the rate found on the module (as
            :func:`dropkit.mc_dropout` finds it), else ``None`` (unknown: ``0`` was passed in eval).
        calls: how many calls the example forward made.
    """

    module: str
    module_class: str
    function: str
    rate: float | None
    calls: int


@dataclass
class ConversionReport:
    """What :func:`convert` or :func:`revert` did; ``str(report)`` is a readable summary.

    Attributes:
        model: the converted (or reverted) model: the model passed in, or its copy with
            ``copy=True``, or the new module when the model itself was a replaced module.
        direction: ``"convert"`` or ``"revert"``.
        replaced: the modules replaced, in ``named_modules()`` order.
        skipped: dropout-like modules left as they are, with the reason.
        unchanged: names of dropkit layers left as they are (convert: already dropkit; revert:
            not made by :func:`convert`, so with no original to go back to).
        functional_calls: functional dropout calls seen in the example forward, or ``None`` when
            no forward was run (functional calls were not inspected).
    """

    model: nn.Module = field(repr=False)
    direction: str
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    functional_calls: list[FunctionalCall] | None = None

    def summary(self) -> str:
        """A few lines: counts, then one line per replaced / skipped module and functional site."""
        lines = [
            f"dropkit.{self.direction}: {len(self.replaced)} replaced, {len(self.skipped)} skipped, "
            f"{len(self.unchanged)} dropkit layers unchanged"
        ]
        if self.replaced:
            lines.append("replaced:")
        for item in self.replaced:
            note = "" if item.called is not False else "; not called by the example forward"
            lines.append(
                f"  {_show(item.name)}: {item.old_class} -> {item.new_class} (p={item.rate:g}{note})"
            )
        if self.skipped:
            lines.append("skipped:")
        for skip in self.skipped:
            lines.append(f"  {_show(skip.name)} ({skip.module_class}): {skip.reason}")
        if self.direction == "convert":
            if self.functional_calls is None:
                lines.append("functional dropout calls: not inspected (pass example_inputs= to record them)")
            elif not self.functional_calls:
                lines.append("functional dropout calls: none in the example forward")
            else:
                lines.append("functional dropout calls (not replaced; dropkit.mc_dropout intercepts them):")
            for call in self.functional_calls or []:
                rate = "p unknown (0 in eval)" if call.rate is None else f"p={call.rate:g}"
                count = f"{call.calls} call" + ("" if call.calls == 1 else "s")
                lines.append(
                    f"  {_show(call.module)} ({call.module_class}): {call.function}, {rate}, {count}"
                )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _show(name: str) -> str:
    return name if name else "(model)"


# ---------------------------------------------------------------------------------------------
# Recognising modules


@dataclass(frozen=True)
class _Origin:
    """Kept on a converted layer: the module it replaced, and how to map its rate back."""

    module: nn.Module
    rate_attribute: str
    rate_scale: float
    rate: float


def _carry_private_attributes(source: nn.Module, target: nn.Module) -> None:
    """Copy ``source``'s own private attributes (set by frameworks) that ``target`` does not have."""
    for name in extra_attributes(source):
        if name.startswith("_") and name != _ORIGIN and name not in target.__dict__:
            target.__dict__[name] = source.__dict__[name]


# ---------------------------------------------------------------------------------------------
# Inspecting functional calls


class _Recorder:
    """An MC-patching interceptor that records functional dropout calls and runs them unchanged."""

    active = True

    def __init__(self) -> None:
        # (module, function) -> [calls, largest positive rate passed]
        self.calls: dict[tuple[nn.Module, str], list[Any]] = {}
        self.inputs: dict[nn.Module, list[int]] = {}  # module -> ranks of its tensor inputs

    def _record(self, module: nn.Module, function: str, rate: float) -> None:
        entry = self.calls.setdefault((module, function), [0, 0.0])
        entry[0] += 1
        entry[1] = max(entry[1], rate)

    def intercept_dropout(
        self, name: str, frame: Frame, input: torch.Tensor, p: float, training: bool, inplace: bool
    ) -> torch.Tensor:
        if not isinstance(frame.module, _MODULE_SITES):  # listed as modules, not as calls
            self._record(frame.module, name, float(p))
        original = patching._ORIGINALS.get(name, getattr(torch_F, name))
        result: torch.Tensor = original(input, p, training, inplace)
        return result

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
    ) -> torch.Tensor:
        rate = float(dropout_p) if dropout_p > 0 else (attention_rate(None, frame.module) or 0.0)
        if rate > 0 and not isinstance(frame.module, _MODULE_SITES):
            self._record(frame.module, "scaled_dot_product_attention", float(dropout_p))
        return original(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        frame_stack().append(Frame(module, self, True))
        first = args[0] if isinstance(args, tuple) and args else None
        self.inputs.setdefault(module, []).append(first.dim() if isinstance(first, torch.Tensor) else -1)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = frame_stack()
        if stack and stack[-1].module is module and stack[-1].handle is self:
            stack.pop()


def _inspect(model: nn.Module, example_inputs: Any) -> _Recorder:
    """Run ``model`` once in eval mode, without gradients, recording functional dropout calls."""
    recorder = _Recorder()
    flags = {module: module.training for module in model.modules()}
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    install_patches()
    try:
        for module in flags:
            module.training = False
            hooks.append(module.register_forward_pre_hook(recorder.pre_hook, prepend=True))
            hooks.append(module.register_forward_hook(recorder.post_hook, always_call=True))
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            elif isinstance(example_inputs, tuple):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
        for module, flag in flags.items():
            module.training = flag
        stack = frame_stack()
        stack[:] = [frame for frame in stack if frame.handle is not recorder]
        remove_patches()
    return recorder


def _functional_calls(recorder: _Recorder, names: dict[nn.Module, str]) -> list[FunctionalCall]:
    calls = []
    for (module, function), (count, passed) in recorder.calls.items():
        rate: float | None = passed if passed > 0 else attention_rate(None, module)
        calls.append(
            FunctionalCall(
                module=names.get(module, type(module).__name__),
                module_class=class_name(type(module)),
                function=f"torch.nn.functional.{function}",
                rate=rate if rate else None,
                calls=count,
            )
        )
    return calls


# ---------------------------------------------------------------------------------------------
# Replacing modules


def _check_model(model: object, copy: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(copy, bool):
        raise TypeError(f"copy must be a bool, got {type(copy).__name__} ({copy!r})")
    for module in model.modules():
        if module in _MC_ACTIVE:
            raise RuntimeError(
                f"{type(module).__name__} is in an MC dropout mode; restore that mode before "
                "converting or reverting the model"
            )
    return model


def _device_of(*modules: nn.Module) -> torch.device | None:
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            return tensor.device
    return None


def _move_hooks(source: nn.Module, target: nn.Module) -> None:
    """Hand ``source``'s hook registries to ``target`` (handles keep working: same dicts)."""
    for key in MODULE_KEYS:
        if "hook" in key:
            target.__dict__[key] = source.__dict__[key]


def _swap(model: nn.Module, new: dict[nn.Module, nn.Module]) -> nn.Module:
    """Put ``new[child]`` in place of every occurrence of ``child``; returns the (new) root."""
    for parent in list(model.modules()):
        for child_name, child in parent._modules.items():
            if child is not None and child in new:
                parent._modules[child_name] = new[child]
    return new.get(model, model)


def convert(model: nn.Module, *, copy: bool = False, example_inputs: Any = None) -> ConversionReport:
    r"""Replace the dropout modules of ``model`` by dropkit's layers with the same rates and options.

    ``torch.nn`` dropout modules become :class:`dropkit.nn.Dropout`, ``Dropout1d/2d/3d``,
    ``AlphaDropout`` and ``FeatureAlphaDropout``; drop-path modules of timm, torchvision and
    Hugging Face ``transformers`` become :class:`dropkit.nn.DropPath`; timm's ``DropBlock2d``
    becomes :class:`dropkit.nn.DropBlock2d` where its options have an exact equivalent.  A
    module is converted only to a layer with the same training-mode distribution (the masks
    themselves come from dropkit's counter-based engine) and the same eval mode (the identity),
    so eval outputs are unchanged bit for bit.  Everything else, and the list of what was
    skipped and why, is in :mod:`dropkit.interop.convert`.

    Args:
        model: the model (a ``torch.nn.Module``); converted in place unless ``copy``.
        copy: convert a deep copy and leave ``model`` untouched. Default: ``False``
        example_inputs: inputs for one eval-mode forward that records the functional dropout
            calls (which cannot be replaced): a tensor, a tuple of positional arguments or a
            mapping of keyword arguments.  ``None`` (default) runs nothing, and the report says
            that functional calls were not inspected.

    Returns:
        A :class:`ConversionReport`; ``report.model`` is the converted model (``model`` itself,
        its copy with ``copy=True``, or the new layer when ``model`` itself was a dropout module).

    Raises:
        TypeError: ``model`` is not a module, ``copy`` not a bool, or ``example_inputs`` not a
            tensor, tuple or mapping.
        RuntimeError: a module of ``model`` is in an MC dropout mode.

    Example::

        >>> import torch, dropkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
        >>> report = dropkit.convert(model, example_inputs=torch.ones(2, 4))
        >>> print(report)
        dropkit.convert: 1 replaced, 0 skipped, 0 dropkit layers unchanged
        replaced:
          1: torch.nn.Dropout -> dropkit.nn.Dropout (p=0.1)
        functional dropout calls: none in the example forward
        >>> isinstance(model[1], dropkit.nn.Dropout), model[1].p
        (True, 0.1)
        >>> type(dropkit.revert(model).model[1]) is torch.nn.Dropout
        True
    """
    model = _check_model(model, copy)
    if example_inputs is not None and not isinstance(example_inputs, (torch.Tensor, tuple, Mapping)):
        raise TypeError(
            "example_inputs must be a tensor, a tuple of positional arguments or a mapping of "
            f"keyword arguments, got {type(example_inputs).__name__}"
        )
    target = copy_module.deepcopy(model) if copy else model
    recorder = _inspect(target, example_inputs) if example_inputs is not None else None
    names = {module: name for name, module in target.named_modules()}
    parents = {child: parent for parent in target.modules() for child in parent.children()}

    report = ConversionReport(model=target, direction="convert")
    new: dict[nn.Module, nn.Module] = {}
    for module, name in names.items():
        if isinstance(module, _RandomLayer):
            report.unchanged.append(name)
            continue
        plan = plan_replacement(module)
        if plan is None:
            continue
        cls_name = class_name(type(module))
        ranks = recorder.inputs.get(module, []) if recorder is not None else []
        same_ranks = _SAME_RANKS.get(type(module))
        if isinstance(plan, Plan) and same_ranks is not None:
            other = sorted({rank for rank in ranks if rank not in same_ranks})
            if other:
                plan = (
                    f"the example forward gave it {other[0]}-D input, which torch and "
                    f"{class_name(TORCH_TO_DROPKIT[type(module)])} read differently "
                    f"(the same only for {' or '.join(f'{rank}-D' for rank in same_ranks)} input)"
                )
        if isinstance(plan, str):
            report.skipped.append(Skipped(name, cls_name, plan))
            continue
        try:
            layer = plan.build()
        except (TypeError, ValueError) as error:
            report.skipped.append(Skipped(name, cls_name, f"no dropkit layer accepts its options: {error}"))
            continue
        device = _device_of(*([parents[module]] if module in parents else []), target)
        if device is not None:
            layer.to(device)
        layer.training = module.training
        _move_hooks(module, layer)
        _carry_private_attributes(module, layer)
        rate = float(layer.p)
        layer.__dict__[_ORIGIN] = _Origin(module, plan.rate_attribute, plan.rate_scale, rate)
        new[module] = layer
        called = None if recorder is None else module in recorder.inputs
        report.replaced.append(Replacement(name, cls_name, class_name(type(layer)), rate, called))
    if recorder is not None:
        report.functional_calls = _functional_calls(recorder, names)
    report.model = _swap(target, new)
    return report


def revert(model: nn.Module, *, copy: bool = False) -> ConversionReport:
    """Put back the modules that :func:`convert` replaced.

    Each dropkit layer that :func:`convert` made is replaced by the very module it replaced,
    with the layer's current ``training`` flag, its hooks and, if the layer's ``p`` was changed
    since the conversion (a rate schedule), that rate mapped back to the original attribute.
    Dropkit layers that :func:`convert` did not make stay, listed in ``report.unchanged``.

    Args:
        model: the model (a ``torch.nn.Module``); reverted in place unless ``copy``.
        copy: revert a deep copy and leave ``model`` untouched. Default: ``False``

    Returns:
        A :class:`ConversionReport` (``direction="revert"``); ``report.model`` is the model.

    Raises:
        TypeError: ``model`` is not a module or ``copy`` not a bool.
        RuntimeError: a module of ``model`` is in an MC dropout mode.

    Example::

        >>> import torch, dropkit
        >>> model = torch.nn.Sequential(torch.nn.Dropout(0.2), dropkit.nn.Dropout(0.3))
        >>> original = model[0]
        >>> _ = dropkit.convert(model)
        >>> print(dropkit.revert(model))
        dropkit.revert: 1 replaced, 0 skipped, 1 dropkit layers unchanged
        replaced:
          0: dropkit.nn.Dropout -> torch.nn.Dropout (p=0.2)
        >>> model[0] is original
        True
    """
    model = _check_model(model, copy)
    target = copy_module.deepcopy(model) if copy else model
    report = ConversionReport(model=target, direction="revert")
    new: dict[nn.Module, nn.Module] = {}
    for name, module in target.named_modules():
        origin = module.__dict__.get(_ORIGIN)
        if not isinstance(origin, _Origin):
            if isinstance(module, _RandomLayer):
                report.unchanged.append(name)
            continue
        original = origin.module
        rate = float(module.p) if isinstance(module, _DropoutBase) else origin.rate
        if rate != origin.rate:
            setattr(original, origin.rate_attribute, rate / origin.rate_scale)
        original.training = module.training
        _move_hooks(module, original)
        new[module] = original
        report.replaced.append(Replacement(name, class_name(type(module)), class_name(type(original)), rate))
    report.model = _swap(target, new)
    return report
