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

A call with ``dropout_p > 0`` keeps its rate.  A positive rate runs attention by the explicit
path of :func:`dropkit.functional.scaled_dot_product_attention` (its argument checks and its
maths: float32 for half inputs, zeros for rows that attend nowhere) with dropkit dropout of the
weights, instead of the fused kernel.  If no rate is found, the call runs unchanged and
:class:`AttentionDropoutNotFoundWarning` is issued once per module (``attention_p=0.0``
silences it).  Limits: the rate is found only on the module whose forward calls SDPA (not a
helper module further out), and a module whose attention rate lives elsewhere needs
``attention_p``.

What is not caught: functions bound before the mode started (``from torch.nn.functional import
dropout`` at the top of a third-party file), ``torch.dropout`` and other ``torch._C`` entry
points, and compiled (``torch.compile``, TorchScript) code.

Randomness: outside :func:`dropkit.mc.mc_predict`, dropkit layers draw from their own streams
and intercepted calls from dropkit's functional stream, so :func:`dropkit.manual_seed` makes
MC-mode forwards reproducible.  Inside it, every op gets a per-sample key (see there and
:mod:`dropkit.mc.plan`).

This module holds the handle; the selection rules live in :mod:`dropkit.mc.selection`, the
patches of ``torch.nn.functional`` in :mod:`dropkit.mc.patching`.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dropkit import functional as dk_F
from dropkit.functional.attention import _attention_weights_and_values, _check_attention_args, _check_scale
from dropkit.mc.patching import Frame, frame_stack, install_patches, remove_patches
from dropkit.mc.plan import PlanRunner
from dropkit.mc.selection import (
    FAST_PATH_MODULES,
    TORCH_DROPOUT_MODULES,
    AttentionRate,
    SelectorSpec,
    attention_rate,
    check_attention_p,
    normalize_selector,
    selected_modules,
)
from dropkit.nn._base import _RandomLayer
from dropkit.nn.attention import ResidualDropout
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


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, MCDropoutHandle] = weakref.WeakKeyDictionary()


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
        include_list = normalize_selector(include, "include")
        exclude_list = normalize_selector(exclude, "exclude")
        self.attention_p = check_attention_p(attention_p)
        self.model = model
        self.active = False
        self.modules: list[str] = []
        self.intercepted_calls = 0
        self.ops = 0  # every op turned on: dropkit layer calls and intercepted calls
        self._plans = PlanRunner()
        self._measure: list[int] | None = None
        self._warned_attention: set[int] = set()
        self._saved = _Saved()
        self._selected = selected_modules(model, include_list, exclude_list)
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
            install_patches()
            self.active = True
            for module, selected in self._selected.items():
                _ACTIVE[module] = self
                saved.flags[module] = module.training
                turn_on = selected and isinstance(module, (_RandomLayer, *FAST_PATH_MODULES))
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
        stack = frame_stack()
        stack[:] = [frame for frame in stack if frame.handle is not self]
        saved.hooks.clear()
        saved.forwards.clear()
        saved.flags.clear()
        remove_patches()
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
            frame_stack().append(Frame(module, self, selected))

        return pre_hook

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = frame_stack()
        if stack and stack[-1].module is module and stack[-1].handle is self:
            stack.pop()
        if self._measure is not None and isinstance(output, torch.Tensor) and not any(module.children()):
            self._measure[0] += output.nelement() * output.element_size()

    @contextlib.contextmanager
    def inside(self, module: nn.Module) -> Iterator[None]:
        """Run the block as if inside ``module``'s forward (for code lifted out of it, e.g. by fx)."""
        frame_stack().append(Frame(module, self, self._selected.get(module, False)))
        try:
            yield
        finally:
            stack = frame_stack()
            if stack and stack[-1].module is module:
                stack.pop()

    # -- sampling plans (mc_predict) -----------------------------------------------------------

    def sampling(self, seed: int, first: int, count: int) -> contextlib.AbstractContextManager[None]:
        """Compute samples ``first .. first + count - 1`` of seed ``seed`` (stacked along dim 0);
        see :mod:`dropkit.mc.plan`."""
        return self._plans.sampling(seed, first, count)

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
        output = self._plans.run(call, args, split, what)
        if self._measure is not None:
            self._measure[0] += output.nelement() * output.element_size()
        return output

    # -- the ops -------------------------------------------------------------------------------

    def _wrap_random_layer(self, module: _RandomLayer) -> Callable[..., Any]:
        forward = module.forward
        # The batch-shaped arguments: the input, and the residual of the fused residual op.
        if isinstance(module, BiasDropoutAdd):  # deprecated: (input, bias, residual)
            split: tuple[int, ...] = (0, 2)
        elif isinstance(module, ResidualDropout):  # (input, residual, bias)
            split = (0, 1)
        else:
            split = (0,)
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

    def intercept_dropout(
        self, name: str, frame: Frame, input: torch.Tensor, p: float, training: bool, inplace: bool
    ) -> torch.Tensor:
        """Run an intercepted ``torch.nn.functional`` dropout call (``name``) on dropkit's engine."""
        del frame, training  # turned on whatever the caller passed: that is the point of the mode
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
        """Run an intercepted SDPA call: with the rate found (see :mod:`dropkit.mc.mode`) by the
        maths of :func:`dropkit.functional.scaled_dot_product_attention`, the weights dropped
        with this op's keys; with none, by ``original`` (torch's function) unchanged."""
        rate: float | None = float(dropout_p)
        if dropout_p == 0.0:
            rate = attention_rate(self.attention_p, frame.module)
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
        query, key, value = _check_attention_args(query, key, value, attn_mask, is_causal, enable_gqa)
        weights, values = _attention_weights_and_values(
            query, key, value, attn_mask, is_causal, _check_scale(scale), enable_gqa
        )
        self.intercepted_calls += 1

        def call(call_args: list[Any], sample_key: torch.Tensor | None) -> torch.Tensor:
            return dk_F.dropout(call_args[0], rate, True, False, seed=sample_key)

        weights = self._per_sample(call, [weights], (0,), "scaled_dot_product_attention")
        return torch.matmul(weights, values).to(query.dtype)  # as the functional's explicit path


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
