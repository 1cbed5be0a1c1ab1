"""Monte Carlo dropout mode: every dropout-like operation of a model on, everything else in eval.

:func:`mc_dropout` (a context manager) and :func:`enable_mc_dropout` (a handle with
:meth:`MCDropoutHandle.restore`) switch a model into *MC mode*.  What is turned on, for the
modules that the ``include`` / ``exclude`` selection keeps:

* every dropkit random layer (any subclass of dropkit's private ``_RandomLayer``: dropout,
  DropConnect, variational and sparse variational layers, Gaussian noise, DropPath, ...): its
  ``training`` flag is set, and nothing else about it changes;
* the ``torch.nn`` dropout modules (``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
  ``FeatureAlphaDropout``) and every call of ``torch.nn.functional.dropout``, ``dropout1d``,
  ``dropout2d``, ``dropout3d``, ``alpha_dropout`` and ``feature_alpha_dropout`` made from the
  forward of a selected module (a third-party module that calls
  ``F.dropout(x, p, training=self.training)`` while it is in eval included): these calls are
  intercepted and run on dropkit's counter-based engine, whatever their ``training`` argument;
* attention dropout of ``torch.nn.functional.scaled_dot_product_attention`` called from a
  selected module (see *Attention dropout* below), and ``torch.nn.MultiheadAttention`` and the
  ``torch.nn.Transformer*`` layers, whose own ``training`` flag is set so that they leave their
  eval-only fused fast paths (that skip dropout) and pass their dropout rate on.

Every other module is put in eval, so BatchNorm uses (and never updates) its running
statistics, spectral-norm power iterations do not run, and so on.  On exit every ``training``
flag, patched function, hook and ``forward`` attribute is restored exactly, also when the block
raises.  When the mode turned nothing on (no dropout module found and no dropout call
intercepted) it warns with :class:`NoDropoutFoundWarning`.

Selection: ``include`` and ``exclude`` each take a module type, a glob pattern over qualified
module names (``"classifier.*"``, ``"encoder.layer.0.attention"``; the root module is ``""``),
a predicate ``(name, module) -> bool``, or a list of these.  A module is selected when it or
one of its ancestors matches ``include`` (default: every module) and neither it nor any ancestor
matches ``exclude``.  A functional call is turned on when the innermost module running it is
selected.

Attention dropout: modules that follow the timm / Hugging Face pattern
``dropout_p=self.attn_drop.p if self.training else 0.0`` call SDPA with ``dropout_p=0`` in
eval, so the rate must be recovered.  For an SDPA call from a selected module with
``dropout_p == 0`` the rate is, by ``attention_p``:

* a float: that rate, for every such call;
* a string: the attribute of the calling module with that (dotted) name, a float or a module
  with a float ``p`` (``"attn_drop"``, ``"attention_dropout"``, ``"config.attention_dropout"``);
* a callable ``module -> float | None``;
* ``None`` (default): the first of the attributes ``attn_drop``, ``attention_dropout``,
  ``attn_dropout``, ``dropout_p``, ``attn_pdrop``, ``dropout`` of the calling module that holds
  a float in ``[0, 1]`` or a module with such a ``p``.

A call with ``dropout_p > 0`` keeps its rate.  A positive rate runs attention by the math
formula (softmax, dropkit dropout of the weights, product with the values) instead of the fused
kernel.  If no rate is found, the call runs unchanged and :class:`AttentionDropoutNotFoundWarning`
is issued once per module (``attention_p=0.0`` silences it).  Limits: the rate is found only on
the module whose forward calls SDPA (not a helper module further out), and a module whose
attention rate lives elsewhere needs ``attention_p``.

What is not caught: functions bound before the mode started (``from torch.nn.functional import
dropout`` at the top of a third-party file), ``torch.dropout`` and other ``torch._C`` entry
points, and compiled (``torch.compile``, TorchScript) code.

Randomness: outside :func:`dropkit.mc.mc_predict`, dropkit layers draw from their own streams
and intercepted calls from dropkit's functional stream, so :func:`dropkit.manual_seed` makes
MC-mode forwards reproducible.  Inside it, every op gets a per-sample key (see there).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as torch_F
from torch import nn

from dropkit import functional as dk_F
from dropkit.engine.streams import make_key
from dropkit.nn._base import _RandomLayer
from dropkit.nn.fused import BiasDropoutAdd

__all__ = [
    "AttentionDropoutNotFoundWarning",
    "MCDropoutHandle",
    "MCDropoutWarning",
    "NoDropoutFoundWarning",
    "active_handle",
    "enable_mc_dropout",
    "mc_dropout",
]


class MCDropoutWarning(UserWarning):
    """Base class of the warnings of dropkit's Monte Carlo dropout mode."""


class NoDropoutFoundWarning(MCDropoutWarning):
    """The MC mode turned nothing on: no dropout module was selected and no call intercepted."""


class AttentionDropoutNotFoundWarning(MCDropoutWarning):
    """An SDPA call with ``dropout_p=0`` came from a module whose attention rate was not found."""


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
_FAST_PATH_MODULES: tuple[type[nn.Module], ...] = (
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
# Per-sample keys (used by mc_predict)


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
class _SamplingPlan:
    """Which samples the current forward computes: ``count`` samples from ``first`` on, stacked
    sample-major along dim 0 of every activation, under ``seed``."""

    seed: int
    first: int
    count: int
    path: tuple[int, ...] = ()
    counter: int = 0


# ---------------------------------------------------------------------------------------------
# Module stack and function patches (shared by all active handles)


@dataclass
class _Frame:
    module: nn.Module
    handle: MCDropoutHandle
    selected: bool
    calls: int = 0


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.stack: list[_Frame] = []


_THREAD = _ThreadState()
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, MCDropoutHandle] = weakref.WeakKeyDictionary()
_PATCH_LOCK = threading.Lock()
_PATCH_USERS = 0
_ORIGINALS: dict[str, Callable[..., Any]] = {}


def _current_frame() -> _Frame | None:
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
    return frame.handle._functional_dropout(name, frame, *args, **kwargs)


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
    return frame.handle._attention(frame, original, query, key, value, *args, **kwargs)


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


def _install_patches() -> None:
    global _PATCH_USERS
    with _PATCH_LOCK:
        if _PATCH_USERS == 0:
            for name, stand_in in _STAND_INS.items():
                current = getattr(torch_F, name)
                if current is not stand_in:
                    _ORIGINALS[name] = current
                    setattr(torch_F, name, stand_in)
        _PATCH_USERS += 1


def _remove_patches() -> None:
    global _PATCH_USERS
    with _PATCH_LOCK:
        _PATCH_USERS -= 1
        if _PATCH_USERS == 0:
            for name, stand_in in _STAND_INS.items():
                # Restore only what is still ours; a later patch by someone else stays (our
                # stand-in underneath passes every call through once no mode is active).
                if getattr(torch_F, name) is stand_in and name in _ORIGINALS:
                    setattr(torch_F, name, _ORIGINALS[name])


# ---------------------------------------------------------------------------------------------
# Selection


def _normalize_selector(spec: SelectorSpec, name: str) -> list[Selector] | None:
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


def _selected_modules(
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


def _rate_of(value: object) -> float | None:
    if isinstance(value, nn.Module):
        value = getattr(value, "p", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    rate = float(value)
    return rate if 0.0 <= rate <= 1.0 else None


def _check_attention_p(attention_p: object) -> AttentionRate:
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


# ---------------------------------------------------------------------------------------------
# The handle


@dataclass
class _Saved:
    flags: dict[nn.Module, bool] = field(default_factory=dict)
    forwards: dict[nn.Module, tuple[bool, Any]] = field(default_factory=dict)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)


class MCDropoutHandle:
    """An active Monte Carlo dropout mode on a model; see :mod:`dropkit.mc.mode`.

    Made by :func:`enable_mc_dropout` (or :func:`mc_dropout`); :meth:`restore` ends the mode.

    Attributes:
        model: the model in MC mode.
        modules: the qualified names of the dropout modules turned on (dropkit layers,
            ``torch.nn`` dropout modules, attention modules with a positive dropout).
        intercepted_calls: functional dropout and attention-dropout calls turned on so far.
        active: whether the mode is still on.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: SelectorSpec = None,
        exclude: SelectorSpec = None,
        attention_p: AttentionRate = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        include_list = _normalize_selector(include, "include")
        exclude_list = _normalize_selector(exclude, "exclude")
        self.attention_p = _check_attention_p(attention_p)
        self.model = model
        self.active = False
        self.modules: list[str] = []
        self.intercepted_calls = 0
        self.ops = 0  # every op turned on: dropkit layer calls and intercepted calls
        self._plan: _SamplingPlan | None = None
        self._measure: list[int] | None = None
        self._warned_attention: set[int] = set()
        self._saved = _Saved()
        self._selected = _selected_modules(model, include_list, exclude_list)
        for module in self._selected:
            if module in _ACTIVE:
                raise RuntimeError(
                    f"{type(module).__name__} is already in an MC dropout mode; restore that one first"
                )
        self._activate()

    # -- entering and leaving ------------------------------------------------------------------

    def _activate(self) -> None:
        names = {module: name for name, module in self.model.named_modules()}
        saved = self._saved
        try:
            _install_patches()
            self.active = True
            for module, selected in self._selected.items():
                _ACTIVE[module] = self
                saved.flags[module] = module.training
                turn_on = selected and isinstance(module, (_RandomLayer, *_FAST_PATH_MODULES))
                module.training = turn_on
                if selected and isinstance(module, _RandomLayer):
                    saved.forwards[module] = ("forward" in module.__dict__, module.__dict__.get("forward"))
                    module.forward = self._wrap_random_layer(module)
                if selected and (
                    isinstance(module, (_RandomLayer, *TORCH_DROPOUT_MODULES))
                    or (isinstance(module, nn.MultiheadAttention) and module.dropout > 0)
                ):
                    self.modules.append(names.get(module, type(module).__name__))
                saved.hooks.append(
                    module.register_forward_pre_hook(self._make_pre_hook(selected), prepend=True)
                )
                saved.hooks.append(module.register_forward_hook(self._post_hook, always_call=True))
        except BaseException:
            self.restore(warn=False)
            raise

    def restore(self, *, warn: bool = True) -> None:
        """End the mode: restore every flag, ``forward`` attribute, hook and patched function.

        Idempotent.  Warns with :class:`NoDropoutFoundWarning` (unless ``warn=False``) when the
        mode turned nothing on.
        """
        if not self.active:
            return
        self.active = False
        saved = self._saved
        for hook in saved.hooks:
            hook.remove()
        for module, (had, previous) in saved.forwards.items():
            if had:
                module.forward = previous
            else:
                module.__dict__.pop("forward", None)
        for module, flag in saved.flags.items():
            module.training = flag
            if _ACTIVE.get(module) is self:
                del _ACTIVE[module]
        _THREAD.stack[:] = [frame for frame in _THREAD.stack if frame.handle is not self]
        saved.hooks.clear()
        saved.forwards.clear()
        saved.flags.clear()
        _remove_patches()
        if warn and not self.modules and self.intercepted_calls == 0:
            warnings.warn(
                f"MC dropout mode on {type(self.model).__name__} turned nothing on: no dropout module "
                "was selected and no functional dropout call was intercepted; samples are deterministic",
                NoDropoutFoundWarning,
                stacklevel=2,
            )

    def __enter__(self) -> MCDropoutHandle:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self.restore(warn=exc_type is None)

    # -- the module stack ----------------------------------------------------------------------

    def _make_pre_hook(self, selected: bool) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            _THREAD.stack.append(_Frame(module, self, selected))

        return pre_hook

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = _THREAD.stack
        if stack and stack[-1].module is module and stack[-1].handle is self:
            stack.pop()
        if self._measure is not None and isinstance(output, torch.Tensor) and not any(module.children()):
            self._measure[0] += output.nelement() * output.element_size()

    @contextlib.contextmanager
    def inside(self, module: nn.Module) -> Iterator[None]:
        """Run the block as if inside ``module``'s forward (for code lifted out of it, e.g. by fx)."""
        _THREAD.stack.append(_Frame(module, self, self._selected.get(module, False)))
        try:
            yield
        finally:
            stack = _THREAD.stack
            if stack and stack[-1].module is module:
                stack.pop()

    # -- sampling plans (mc_predict) -----------------------------------------------------------

    @contextlib.contextmanager
    def sampling(self, seed: int, first: int, count: int) -> Iterator[None]:
        """Compute samples ``first .. first + count - 1`` of seed ``seed`` (stacked along dim 0)."""
        previous, self._plan = self._plan, _SamplingPlan(seed, first, count)
        try:
            yield
        finally:
            self._plan = previous

    @contextlib.contextmanager
    def measuring(self) -> Iterator[list[int]]:
        """Sum the bytes of leaf-module and intercepted-op outputs made inside the block."""
        previous, self._measure = self._measure, [0]
        try:
            yield self._measure
        finally:
            self._measure = previous

    def _per_sample(
        self,
        call: Callable[[list[Any], torch.Tensor | None], torch.Tensor],
        args: list[Any],
        split: Sequence[int],
        what: str,
    ) -> torch.Tensor:
        """Run one op: in a sampling plan, once per sample with that sample's key; else as is."""
        self.ops += 1
        plan = self._plan
        if plan is None:
            output = call(args, None)
        else:
            ordinal = plan.counter
            plan.counter += 1
            path = (*plan.path, ordinal)
            stream = op_stream(path)
            if plan.count == 1:
                output = self._one_sample(call, args, plan, path, stream, plan.first)
            else:
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
                output = torch.cat(outputs)
        if self._measure is not None:
            self._measure[0] += output.nelement() * output.element_size()
        return output

    def _one_sample(
        self,
        call: Callable[[list[Any], torch.Tensor | None], torch.Tensor],
        args: list[Any],
        plan: _SamplingPlan,
        path: tuple[int, ...],
        stream: int,
        sample: int,
    ) -> torch.Tensor:
        key = make_key(plan.seed, stream, sample)
        self._plan = _SamplingPlan(plan.seed, sample, 1, path)
        try:
            return call(args, key)
        finally:
            self._plan = plan

    # -- the ops -------------------------------------------------------------------------------

    def _wrap_random_layer(self, module: _RandomLayer) -> Callable[..., Any]:
        forward = module.forward
        split = (0, 2) if isinstance(module, BiasDropoutAdd) else (0,)
        what = type(module).__name__

        try:
            takes_seed = "seed" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            takes_seed = False

        def mc_forward(*args: Any, **kwargs: Any) -> Any:
            if not self.active or not module.training or "seed" in kwargs or "generator" in kwargs:
                return forward(*args, **kwargs)
            if not takes_seed:  # no per-call key: it draws its own (not chunk-invariant)
                self.ops += 1
                return forward(*args, **kwargs)

            def call(call_args: list[Any], key: torch.Tensor | None) -> torch.Tensor:
                result: torch.Tensor = forward(*call_args, seed=key, **kwargs)
                return result

            return self._per_sample(call, list(args), split, what)

        return mc_forward

    def _functional_dropout(
        self, name: str, frame: _Frame, input: torch.Tensor, p: float, training: bool, inplace: bool
    ) -> torch.Tensor:
        del training  # turned on whatever the caller passed: that is the point of the mode
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name} expects a tensor input, got {type(input).__name__}")
        if name == "dropout2d" and input.dim() == 3:
            name = "dropout1d"  # torch's historical reading of 3-D input: (N, C, L)
        op: Callable[..., torch.Tensor] = getattr(dk_F, name)
        self.intercepted_calls += 1

        def call(call_args: list[Any], key: torch.Tensor | None) -> torch.Tensor:
            return op(call_args[0], p, True, False, seed=key)

        output = self._per_sample(call, [input], (0,), f"torch.nn.functional.{name}")
        if inplace:
            with torch.no_grad() if not input.requires_grad else contextlib.nullcontext():
                return input.copy_(output)
        return output

    def _attention_rate(self, module: nn.Module) -> float | None:
        spec = self.attention_p
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

    def _attention(
        self,
        frame: _Frame,
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
        rate: float | None = float(dropout_p)
        if dropout_p == 0.0:
            rate = self._attention_rate(frame.module)
            if rate is None:
                if id(frame.module) not in self._warned_attention:
                    self._warned_attention.add(id(frame.module))
                    warnings.warn(
                        f"{type(frame.module).__name__} called scaled_dot_product_attention with "
                        "dropout_p=0 and no attention dropout rate was found on it; pass attention_p= "
                        "(a rate, an attribute name or a callable) to mc_dropout",
                        AttentionDropoutNotFoundWarning,
                        stacklevel=3,
                    )
                rate = 0.0
        if rate is None or rate == 0.0:
            return original(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
        self.intercepted_calls += 1
        weights = _attention_weights(query, key, attn_mask, is_causal, scale, enable_gqa)

        def call(call_args: list[Any], sample_key: torch.Tensor | None) -> torch.Tensor:
            return dk_F.dropout(call_args[0], rate, True, False, seed=sample_key)

        weights = self._per_sample(call, [weights], (0,), "scaled_dot_product_attention")
        if enable_gqa and key.dim() >= 3 and value.size(-3) != query.size(-3):
            value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
        return weights @ value


def _attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask)``: the attention weights that SDPA's dropout acts on."""
    length, source = query.size(-2), key.size(-2)
    factor = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.size(-3) != query.size(-3):
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
    scores = query @ key.transpose(-2, -1) * factor
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1)


def active_handle(model: nn.Module) -> MCDropoutHandle | None:
    """The active MC mode whose root is ``model``, or ``None``.

    Args:
        model: a module.

    Returns:
        The :class:`MCDropoutHandle` that was enabled on ``model`` itself and is still active.

    Examples::

        >>> from dropkit.mc.mode import active_handle, mc_dropout
        >>> model = torch.nn.Dropout()
        >>> with mc_dropout(model) as handle:
        ...     active_handle(model) is handle
        True
        >>> active_handle(model) is None
        True
    """
    handle = _ACTIVE.get(model)
    return handle if handle is not None and handle.model is model and handle.active else None


def enable_mc_dropout(
    model: nn.Module,
    *,
    include: SelectorSpec = None,
    exclude: SelectorSpec = None,
    attention_p: AttentionRate = None,
) -> MCDropoutHandle:
    """Switch ``model`` into Monte Carlo dropout mode until :meth:`MCDropoutHandle.restore`.

    See :mod:`dropkit.mc.mode` for what is turned on, the selection rules and the limits.

    Args:
        model: the model (a ``torch.nn.Module``).
        include: modules to turn on (type, name glob, predicate or a list); default all.
        exclude: modules to leave deterministic (same forms); default none.
        attention_p: how to find the attention dropout rate of SDPA calls made with
            ``dropout_p=0`` (a float, an attribute name, a callable or ``None`` for the
            automatic rule).

    Returns:
        The active :class:`MCDropoutHandle`.

    Raises:
        TypeError: ``model`` is not a module, or a selector has the wrong type.
        RuntimeError: a module of ``model`` is already in an MC mode.

    Examples::

        >>> from dropkit.mc.mode import enable_mc_dropout
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).eval()
        >>> handle = enable_mc_dropout(model)
        >>> handle.modules
        ['1']
        >>> x = torch.ones(2, 4)
        >>> bool(torch.equal(model(x), model(x)))
        False
        >>> handle.restore()
        >>> bool(torch.equal(model(x), model(x))), model.training
        (True, False)
    """
    return MCDropoutHandle(model, include=include, exclude=exclude, attention_p=attention_p)


@contextlib.contextmanager
def mc_dropout(
    model: nn.Module,
    *,
    include: SelectorSpec = None,
    exclude: SelectorSpec = None,
    attention_p: AttentionRate = None,
) -> Iterator[MCDropoutHandle]:
    """Context manager: ``model`` in Monte Carlo dropout mode inside the block.

    Dropout of every kind is on, everything else in eval (BatchNorm statistics untouched);
    everything is restored on exit, also after an exception.  See :mod:`dropkit.mc.mode` for
    the details and :func:`enable_mc_dropout` for the arguments.

    Args:
        model: the model (a ``torch.nn.Module``).
        include: modules to turn on (type, name glob, predicate or a list); default all.
        exclude: modules to leave deterministic (same forms); default none.
        attention_p: rate rule for SDPA calls made with ``dropout_p=0``.

    Returns:
        A context manager yielding the active :class:`MCDropoutHandle`.

    Examples::

        >>> from dropkit.mc.mode import mc_dropout
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), dropkit.nn.Dropout(0.5), torch.nn.Linear(8, 2)
        ... )
        >>> x = torch.randn(3, 4)
        >>> with mc_dropout(model) as handle:
        ...     a, b = model(x), model(x)
        ...     bn_in_eval = not model[1].training
        >>> bool(torch.equal(a, b)), handle.modules, bn_in_eval
        (False, ['2'], True)
        >>> model.training, model[1].training  # flags restored
        (True, True)
    """
    handle = MCDropoutHandle(model, include=include, exclude=exclude, attention_p=attention_p)
    try:
        yield handle
    except BaseException:
        handle.restore(warn=False)
        raise
    handle.restore()
