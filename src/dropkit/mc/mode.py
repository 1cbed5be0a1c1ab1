"""Monte Carlo dropout mode: every dropout-like operation of a model on, everything else in eval.

:func:`mc_dropout` (a context manager) and :func:`enable_mc_dropout` (a handle with
:meth:`MCDropoutHandle.restore`) switch a model into *MC mode*.  What is turned on, for the
modules that the ``include`` / ``exclude`` selection keeps:

* every dropkit random layer (any subclass of dropkit's private ``_RandomLayer``: dropout,
  DropConnect, variational and sparse variational layers, Gaussian noise, ...): its
  ``training`` flag is set, and nothing else about it changes;
* the ``torch.nn`` dropout modules (``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
  ``FeatureAlphaDropout``) and every call of ``torch.nn.functional.dropout``, ``dropout1d``,
  ``dropout2d``, ``dropout3d``, ``alpha_dropout`` and ``feature_alpha_dropout`` made from the
  forward of a selected module (a third-party module that calls
  ``F.dropout(x, p, training=self.training)`` while it is in eval included): these calls are
  intercepted and run on dropkit's counter-based engine, whatever their ``training`` argument;
* attention dropout, on every path (see *Attention dropout* below);
* stochastic depth, unless ``drop_path=False`` (see *Stochastic depth* below).

Every other module is put in eval, so BatchNorm uses (and never updates) its running
statistics, spectral-norm power iterations do not run, and so on.  On exit every ``training``
flag, rate, patched function, hook and ``forward`` attribute is restored exactly, also when the
block raises.

Rate zero: a site whose rate is 0 is deterministic, exactly as if it were excluded: a dropkit
layer whose rates are all 0 (checked when the mode starts) stays in eval, and an intercepted
call with rate 0 runs torch's function unchanged.  Neither counts as a stochastic op, so the
automatic trunk of :func:`dropkit.mc.mc_predict` runs past it (timm's ``pos_drop`` with
``p = 0`` before the blocks), a manual ``trunk=`` may contain it, and the numbering of the ops
(the per-sample keys) does not depend on it: excluding it gives the same samples.  A mode that
turned nothing on (no site in :attr:`MCDropoutHandle.modules`, below, and no intercepted call
with a positive rate) warns with :class:`NoDropoutFoundWarning` on exit, a model whose rates are
all 0 as one without dropout.

Which sites act: :attr:`MCDropoutHandle.modules`.  Before the model has run in the mode it lists
the selected dropout modules with a positive rate (the sites that act when called); from its
first forward (or first stochastic op) on, the sites that acted so far: a dropout module that was
called, the module holding the rate that an intercepted attention call used (timm's
``attn_drop``, Hugging Face's ``attention.self.dropout``: modules kept only for their ``p``
that the fused or functional attention never calls), or else the module whose forward made an
intercepted functional call.  A module that is never called and whose rate no call used (an
``attn_drop`` with ``p = 0``, a branch the forward does not take) is not listed.

Selection: ``include`` and ``exclude`` each take a module type, a glob pattern over qualified
module names (``"classifier.*"``, ``"encoder.layer.0.attention"``; the root module is ``""``),
a predicate ``(name, module) -> bool``, or a list of these.  A module is selected when it or
one of its ancestors matches ``include`` (default: every module) and neither it nor any ancestor
matches ``exclude``.  A functional call is turned on when the innermost module running it is
selected, and an attention call whose rate lives on an excluded module (``exclude="*attn_drop"``)
stays off.

Attention dropout, per path, with ``attention_p``:

* ``torch.nn.functional.scaled_dot_product_attention`` called from a selected module (timm's
  fused attention, Hugging Face's ``"sdpa"`` attention): modules pass ``dropout_p=0`` in eval
  (``dropout_p=self.attn_drop.p if self.training else 0.``), so the rate is recovered.  With
  ``attention_p=None`` (default) a call keeps a positive ``dropout_p``, and one with
  ``dropout_p=0`` gets the rate of the first of the attributes ``attn_drop``,
  ``attention_dropout``, ``attn_dropout``, ``dropout_p``, ``attn_pdrop``, ``dropout`` of the
  calling module that holds a float in ``[0, 1]`` or a module with such a ``p``; if there is
  none, the call runs unchanged and :class:`AttentionDropoutNotFoundWarning` is issued once per
  module (``attention_p=0.0`` silences it).  With ``attention_p`` given, every call gets the
  rate it resolves to on the calling module: a float is that rate, a string the (dotted)
  attribute of that name (``"config.attention_dropout"``), a callable ``module -> float | None``
  its result; where a string or a callable finds nothing, the default rule applies.  A call with
  a positive rate runs :func:`dropkit.functional.scaled_dot_product_attention` instead of torch's
  kernel, once per sample (on that sample's slice of the query, key, value and mask; arguments
  that broadcast over the batch go whole), with the sample's key: its argument checks, its maths
  (float32 for half inputs, zeros for rows that attend nowhere) and its paths, so the fused
  Triton kernel on CUDA and the blocked path on the CPU (weights of at least
  :data:`dropkit.functional.attention.BLOCKED_MIN_ELEMENTS` elements) keep nothing of size
  ``L x S``.  Each weight gets the mask that dropping the whole materialised weights of the
  sample with its key draws, whichever path runs.
* Hugging Face eager attention (``attn_implementation="eager"``) and any attention that gates a
  functional dropout on ``self.training``
  (``F.dropout(weights, p=0.0 if not module.training else module.dropout.p)``): a
  ``torch.nn.functional.dropout`` call with ``p = 0`` from a selected module that is not itself a
  dropout module is attention dropout when the calling module holds an attention rate by the
  default rule above; it then gets that rate.  ``attention_p`` applies as for SDPA, except that a
  float applies only to modules holding such an attribute (a module calling ``F.dropout`` with
  ``p = 0`` for other reasons is left alone); a string or callable applies to any calling module.
  Calls that pass a positive ``p`` keep it (they cannot be told from other dropout).
* dropkit's :class:`~dropkit.nn.AttentionDropout` and :class:`~dropkit.nn.ScaledDotProductAttention`:
  on with their ``p``; ``attention_p``, resolved on the layer, replaces ``p`` for the mode.
* ``torch.nn.MultiheadAttention`` and the ``torch.nn.Transformer*`` layers: their ``training``
  flag is set, when they or a submodule have a site that acts, so that they leave their eval-only
  fused fast paths (that skip dropout) and pass their rate on; ``attention_p``, resolved on the
  ``MultiheadAttention``, replaces its ``dropout`` for the mode.

Limits: the rate is found only on the module whose forward makes the call (not a helper module
further out); a module whose attention rate lives elsewhere needs ``attention_p``.

Stochastic depth: dropkit's :class:`~dropkit.nn.DropPath`, :class:`~dropkit.nn.StochasticDepth`
and :class:`~dropkit.nn.LayerDrop`, timm's ``DropPath``, torchvision's ``StochasticDepth`` and
Hugging Face's ``*DropPath`` modules (recognised as :func:`dropkit.convert` recognises them,
without importing those libraries) are on by default, ``drop_path=False`` leaves them all in
eval.  On by default because stochastic depth is dropout of whole residual branches (a Bernoulli
draw per sample, kept branches scaled by :math:`1/(1-p)`), noise the model was trained with, and
MC mode samples the training noise of the model (as dropkit's own ``DropPath`` always was);
off when only the dropout proper should vary (a model trained with heavy stochastic depth whose
head dropout is to be sampled), which also lets the automatic trunk of
:func:`dropkit.mc.mc_predict` run further: timm and Hugging Face give every block but the first a
positive drop-path rate, so with stochastic depth on the trunk ends at the second block.  A
foreign module that :func:`dropkit.convert` would replace by ``dropkit.nn.DropPath`` runs as
that layer would (dropkit's engine, per-sample keys); one that it would not (timm's
``scale_by_keep=False``) runs its own code with its ``training`` flag set, on torch's generator
(random, but not reproducible from ``seed=`` nor independent of the chunk size), with an
:class:`MCDropoutWarning` when the mode starts.

What is not caught: functions bound before the mode started (``from torch.nn.functional import
dropout`` at the top of a third-party file), ``torch.dropout`` and other ``torch._C`` entry
points, and TorchScript.

``torch.compile``: a compiled model (or one with compiled submodules) works in MC mode, with the
samples of the eager model.  Every stochastic op runs eagerly, at a graph break, and the rest
stays compiled; the module tracking that the mode adds traces without guards on any mode's
state, so entering new modes (every :func:`dropkit.mc.mc_predict` call) and new seeds or chunks
do not recompile (a new input shape does, as always).  This needs ``torch._dynamo`` imported
when the mode starts, which ``torch.compile`` does; a mode started before the first
``torch.compile`` of the process lets Dynamo trace its bookkeeping, which recompiles.

Randomness: outside :func:`dropkit.mc.mc_predict`, dropkit layers draw from their own streams
and intercepted calls from dropkit's functional stream, so :func:`dropkit.manual_seed` makes
MC-mode forwards reproducible.  Inside it, every op gets a per-sample key (see there and
:mod:`dropkit.mc.plan`).

This module holds the handle; the selection rules live in :mod:`dropkit.mc.selection`, the
patches of ``torch.nn.functional`` and the module tracking in :mod:`dropkit.mc.patching`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dropkit import functional as dk_F
from dropkit._validation import check_bool
from dropkit.functional.attention import _check_attention_args, _check_scale
from dropkit.kernels.attention import batch_shape
from dropkit.mc.patching import (
    FRAME_ATTRIBUTE,
    Frame,
    enter_module,
    frame_stack,
    install_patches,
    leave_module,
    original_function,
    remove_patches,
    run_eagerly,
)
from dropkit.mc.plan import PlanRunner
from dropkit.mc.selection import (
    ATTENTION_LAYERS,
    DROP_PATH_LAYERS,
    FAST_PATH_MODULES,
    TORCH_DROPOUT_MODULES,
    AttentionRate,
    ForeignDropPath,
    SelectorSpec,
    check_attention_p,
    find_attention_rate,
    foreign_drop_path,
    has_zero_rate,
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
    """The MC mode turned nothing on: no site with a positive rate was selected or intercepted."""


class AttentionDropoutNotFoundWarning(MCDropoutWarning):
    """An SDPA call with ``dropout_p=0`` came from a module whose attention rate was not found."""


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, MCDropoutHandle] = weakref.WeakKeyDictionary()

# The MC forwards of turned-on layers, kept per module so that every mode installs the very same
# function object (a compiled graph guards on it): (made with torch._dynamo loaded, function).
_FORWARDS: weakref.WeakKeyDictionary[nn.Module, tuple[bool, Callable[..., Any]]] = weakref.WeakKeyDictionary()


@dataclass
class _Saved:
    flags: dict[nn.Module, bool] = field(default_factory=dict)
    forwards: dict[nn.Module, tuple[bool, Any]] = field(default_factory=dict)
    rates: list[tuple[nn.Module, str, float]] = field(default_factory=list)
    hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)


@dataclass(frozen=True)
class _LayerCall:
    """How the MC forward of a dropkit layer runs it: whether it takes ``seed=`` and which of its
    arguments hold the batch."""

    takes_seed: bool
    split: tuple[int, ...]


def _count_forward(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of the model of a mode: count a completed forward (see ``modules``)."""
    frame = module.__dict__.get(FRAME_ATTRIBUTE)
    if frame is not None and isinstance(frame.handle, MCDropoutHandle):
        frame.handle._forwards += 1


_ROOT_HOOKS: dict[bool, Callable[..., None]] = {}


def _root_hook() -> Callable[..., None]:
    """:func:`_count_forward`, run eagerly under ``torch.compile`` once ``torch._dynamo`` is
    loaded (a counter that Dynamo traced would recompile every call); one object for good."""
    eager = "torch._dynamo" in sys.modules
    if eager not in _ROOT_HOOKS:
        _ROOT_HOOKS[eager] = run_eagerly(_count_forward)
    return _ROOT_HOOKS[eager]


def _mc_forward(module: nn.Module) -> Callable[..., Any]:
    """The ``forward`` an MC mode installs on a turned-on layer: hands every call to the mode
    that tracks the module (:meth:`MCDropoutHandle._run_module`), eagerly under ``torch.compile``.

    One function per module, kept across modes, unless the module had a ``forward`` of its own
    on the instance (then that one is wrapped, afresh)."""
    previous = module.__dict__.get("forward")
    eager = "torch._dynamo" in sys.modules
    cached = _FORWARDS.get(module)
    if previous is None and cached is not None and cached[0] == eager:
        return cached[1]
    reference = weakref.ref(module)

    def forward(*args: Any, **kwargs: Any) -> Any:
        layer = reference()
        if layer is None:
            raise RuntimeError("the module of this MC dropout forward has been freed")
        call = previous if previous is not None else type(layer).forward.__get__(layer)
        frame = layer.__dict__.get(FRAME_ATTRIBUTE)
        handle = frame.handle if frame is not None else None
        if not isinstance(handle, MCDropoutHandle) or not handle.active:
            return call(*args, **kwargs)
        return handle._run_module(layer, call, args, kwargs)

    wrapped = run_eagerly(forward)
    if previous is None:
        _FORWARDS[module] = (eager, wrapped)
    return wrapped


class MCDropoutHandle:
    """An active Monte Carlo dropout mode on a model; see :mod:`dropkit.mc.mode`.

    Made by :func:`enable_mc_dropout` (or :func:`mc_dropout`); :meth:`restore` ends the mode.

    Attributes:
        model: the model in MC mode.
        intercepted_calls: functional dropout and attention-dropout calls turned on so far
            (calls with rate 0 are not counted).
        ops: stochastic ops run so far (layers, intercepted calls); zero-rate sites are not ops.
        drop_path: whether stochastic depth is on.
        active: whether the mode is still on.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: SelectorSpec = None,
        exclude: SelectorSpec = None,
        attention_p: AttentionRate = None,
        drop_path: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        include_list = normalize_selector(include, "include")
        exclude_list = normalize_selector(exclude, "exclude")
        self.attention_p = check_attention_p(attention_p)
        self.drop_path = check_bool(drop_path, "drop_path")
        self.model = model
        self.active = False
        self.intercepted_calls = 0
        self.ops = 0  # every op turned on: dropkit layer calls and intercepted calls
        self._plans = PlanRunner()
        self._warned_attention: set[int] = set()
        self._saved = _Saved()
        self._names: dict[nn.Module, str] = {}
        self._candidates: list[nn.Module] = []  # selected sites with a positive rate
        self._acted: dict[nn.Module, None] = {}  # sites that ran a stochastic op (ordered set)
        self._forwards = 0  # forwards of the model completed in this mode
        self._layer_calls: dict[nn.Module, _LayerCall] = {}
        self._drop_paths: dict[nn.Module, ForeignDropPath] = {}
        self._selected = selected_modules(model, include_list, exclude_list)
        for module in self._selected:
            if module in _ACTIVE:
                raise RuntimeError(
                    f"{type(module).__name__} is already in an MC dropout mode; restore that one first"
                )
        self._activate()

    @property
    def modules(self) -> list[str]:
        """Qualified names of the sites that act, in ``named_modules()`` order.

        Before the model has run in this mode: the selected dropout modules with a positive
        rate (dropkit layers, ``torch.nn`` dropout modules, ``MultiheadAttention`` with a
        positive ``dropout``, stochastic depth when on).  From the first forward of the model (or
        the first stochastic op) on: the sites that acted so far (a module called, the module
        holding the rate an attention call used, or the module whose forward made an
        intercepted call); see :mod:`dropkit.mc.mode`.
        """
        sites = self._acted if self._acted or self._forwards else dict.fromkeys(self._candidates)
        names = [name for module, name in self._names.items() if module in sites]
        return names + [type(module).__name__ for module in sites if module not in self._names]

    # -- entering and leaving ------------------------------------------------------------------

    def _activate(self) -> None:
        for name, module in self.model.named_modules():
            self._names.setdefault(module, name)
        saved = self._saved
        try:
            install_patches()
            self.active = True
            for module, selected in self._selected.items():
                _ACTIVE[module] = self
                saved.flags[module] = module.training
                module.__dict__[FRAME_ATTRIBUTE] = Frame(module, self, selected, root=module is self.model)
                saved.hooks.append(module.register_forward_pre_hook(enter_module, prepend=True))
                saved.hooks.append(module.register_forward_hook(leave_module))
                module.training = False
            saved.hooks.append(self.model.register_forward_hook(_root_hook()))
            for module, selected in self._selected.items():
                if selected:
                    self._turn_on(module)
            acting = set(self._candidates)
            for module, selected in self._selected.items():
                if selected and isinstance(module, FAST_PATH_MODULES):
                    module.training = any(sub in acting for sub in module.modules())
            self._warn_unkeyed()
        except BaseException:
            self.restore(warn=False)
            raise

    def _turn_on(self, module: nn.Module) -> None:
        """Turn on a selected module if it is a site with a positive rate (see the module docstring)."""
        if isinstance(module, ATTENTION_LAYERS) and self.attention_p is not None:
            rate, _ = find_attention_rate(self.attention_p, module)
            if rate is not None:
                attribute = "dropout" if isinstance(module, nn.MultiheadAttention) else "p"
                self._saved.rates.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, rate)
        if isinstance(module, _RandomLayer):
            if (isinstance(module, DROP_PATH_LAYERS) and not self.drop_path) or has_zero_rate(module):
                return
            self._layer_calls[module] = _LayerCall(_takes_seed(module.forward), _batch_arguments(module))
            module.training = True
            self._install_forward(module)
        elif isinstance(module, TORCH_DROPOUT_MODULES):
            if not _number(module, "p") > 0.0:
                return
        elif isinstance(module, nn.MultiheadAttention):
            if not _number(module, "dropout") > 0.0:
                return
        else:
            site = foreign_drop_path(module) if self.drop_path else None
            if site is None or site.rate(module) == 0.0:
                return
            self._drop_paths[module] = site
            self._install_forward(module)
            module.training = not site.exact  # an inexact one runs its own (training) code
        self._candidates.append(module)

    def _install_forward(self, module: nn.Module) -> None:
        self._saved.forwards[module] = ("forward" in module.__dict__, module.__dict__.get("forward"))
        module.forward = _mc_forward(module)

    def _warn_unkeyed(self) -> None:
        unkeyed = [
            f"{self._names.get(module, type(module).__name__)} ({site.reason})"
            for module, site in self._drop_paths.items()
            if not site.exact
        ]
        if unkeyed:
            warnings.warn(
                "these stochastic-depth modules have no exact dropkit equivalent and run their own "
                "code on torch's generator in MC mode (random, but not reproducible from seed= nor "
                f"independent of the chunk size): {'; '.join(unkeyed)}",
                MCDropoutWarning,
                stacklevel=4,
            )

    def restore(self, *, warn: bool = True) -> None:
        """End the mode: restore every flag, rate, ``forward`` attribute, hook and patched function.

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
        for module, attribute, value in reversed(saved.rates):
            setattr(module, attribute, value)
        for module, flag in saved.flags.items():
            module.training = flag
            frame = module.__dict__.get(FRAME_ATTRIBUTE)
            if frame is not None and frame.handle is self:
                del module.__dict__[FRAME_ATTRIBUTE]
            if _ACTIVE.get(module) is self:
                del _ACTIVE[module]
        stack = frame_stack()
        stack[:] = [frame for frame in stack if frame.handle is not self]
        saved.hooks.clear()
        saved.forwards.clear()
        saved.rates.clear()
        saved.flags.clear()
        remove_patches()
        if warn and not self.modules and self.intercepted_calls == 0:
            warnings.warn(
                f"MC dropout mode on {type(self.model).__name__} turned nothing on: no dropout site "
                "with a positive rate was selected and no functional dropout call with a positive "
                "rate was intercepted; samples are deterministic",
                NoDropoutFoundWarning,
                stacklevel=2,
            )

    def __enter__(self) -> MCDropoutHandle:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self.restore(warn=exc_type is None)

    # -- the module stack ----------------------------------------------------------------------

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
            if module is self.model:
                self._forwards += 1

    # -- sampling plans (mc_predict) -----------------------------------------------------------

    def sampling(self, seed: int, first: int, count: int) -> contextlib.AbstractContextManager[None]:
        """Compute samples ``first .. first + count - 1`` of seed ``seed`` (stacked along dim 0);
        see :mod:`dropkit.mc.plan`."""
        return self._plans.sampling(seed, first, count)

    def _per_sample(
        self,
        call: Callable[[list[Any], torch.Tensor | None], torch.Tensor],
        args: list[Any],
        split: Sequence[int],
        what: str,
        site: nn.Module,
    ) -> torch.Tensor:
        """Run one op of ``site``: in a sampling plan, once per sample with that sample's key;
        else as is."""
        self.ops += 1
        self._acted[site] = None
        return self._plans.run(call, args, split, what)

    # -- the ops -------------------------------------------------------------------------------

    def _run_module(
        self, module: nn.Module, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A call of a turned-on dropkit layer or foreign drop-path module (its MC ``forward``)."""
        layer = self._layer_calls.get(module)
        if layer is not None:
            if not module.training or "seed" in kwargs or "generator" in kwargs:
                return call(*args, **kwargs)
            if not layer.takes_seed:  # no per-call key: it draws its own (not chunk-invariant)
                self.ops += 1
                self._acted[module] = None
                return call(*args, **kwargs)

            def run_layer(call_args: list[Any], key: torch.Tensor | None) -> torch.Tensor:
                result: torch.Tensor = call(*call_args, seed=key, **kwargs)
                return result

            return self._per_sample(run_layer, list(args), layer.split, type(module).__name__, module)
        site = self._drop_paths.get(module)
        if site is None:
            return call(*args, **kwargs)
        if not site.exact:  # its own code, on torch's generator: an op, not keyed
            self.ops += 1
            self._acted[module] = None
            return call(*args, **kwargs)
        values = [*args, *kwargs.values()]
        if len(values) != 1 or not isinstance(values[0], torch.Tensor):
            raise TypeError(
                f"{type(module).__name__} (stochastic depth) takes one tensor in MC mode, got "
                f"{len(values)} arguments of types {[type(value).__name__ for value in values]}"
            )
        rate = site.rate(module)
        if rate == 0.0:
            return values[0]

        def run_drop_path(call_args: list[Any], key: torch.Tensor | None) -> torch.Tensor:
            return dk_F.drop_path(call_args[0], rate, True, mode=site.mode, seed=key)

        return self._per_sample(run_drop_path, [values[0]], (0,), type(module).__name__, module)

    def _site_rate(self, rate: float, holder: nn.Module | None, module: nn.Module) -> tuple[float, nn.Module]:
        """``(rate, site)``: 0 when the rate lives on a module the selection excluded."""
        if holder is None:
            return rate, module
        if not self._selected.get(holder, True):
            return 0.0, module
        return rate, holder

    def _attention_rate(self, module: nn.Module, passed: float, *, sdpa: bool) -> tuple[float, nn.Module]:
        """The rate of an attention-dropout call from ``module`` that passed ``passed``, and the
        site it belongs to (see *Attention dropout* in :mod:`dropkit.mc.mode`)."""
        found, holder = find_attention_rate(None, module)
        spec = self.attention_p
        if spec is not None and (sdpa or not isinstance(spec, float) or found is not None):
            rate, given_holder = find_attention_rate(spec, module)
            if rate is not None:
                return self._site_rate(rate, given_holder if given_holder is not None else holder, module)
        if passed > 0.0:
            return passed, module
        if found is None:
            if sdpa and id(module) not in self._warned_attention:
                self._warned_attention.add(id(module))
                warnings.warn(
                    f"{type(module).__name__} called scaled_dot_product_attention with dropout_p=0 "
                    "and no attention dropout rate was found on it; pass attention_p= (a rate, an "
                    "attribute name or a callable) to mc_dropout",
                    AttentionDropoutNotFoundWarning,
                    stacklevel=5,
                )
            return 0.0, module
        return self._site_rate(found, holder, module)

    def intercept_dropout(
        self, name: str, frame: Frame, input: torch.Tensor, p: float, training: bool, inplace: bool
    ) -> torch.Tensor:
        """Run an intercepted ``torch.nn.functional`` dropout call (``name``) on dropkit's engine.

        A call with ``p = 0`` runs torch's function unchanged, unless it is gated attention
        dropout (see :mod:`dropkit.mc.mode`), which gets the attention rate.
        """
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name} expects a tensor input, got {type(input).__name__}")
        module = frame.module
        rate, site = float(p), module
        if (
            rate == 0.0
            and name == "dropout"
            and not isinstance(module, (*TORCH_DROPOUT_MODULES, _RandomLayer))
        ):
            rate, site = self._attention_rate(module, 0.0, sdpa=False)
        if rate == 0.0:
            result: torch.Tensor = original_function(name)(input, p, training, inplace)
            return result
        if name == "dropout2d" and input.dim() == 3:
            name = "dropout1d"  # torch's historical reading of 3-D input: (N, C, L)
        op: Callable[..., torch.Tensor] = getattr(dk_F, name)
        self.intercepted_calls += 1

        def call(call_args: list[Any], key: torch.Tensor | None) -> torch.Tensor:
            return op(call_args[0], rate, True, False, seed=key)

        output = self._per_sample(call, [input], (0,), f"torch.nn.functional.{name}", site)
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
        """Run an intercepted SDPA call: with the rate found (see :mod:`dropkit.mc.mode`) by
        :func:`dropkit.functional.scaled_dot_product_attention`, once per sample on that sample's
        slice of the arguments with its key; with rate 0, by ``original`` (torch's function)
        unchanged."""
        rate, site = self._attention_rate(frame.module, float(dropout_p), sdpa=True)
        if rate == 0.0:
            return original(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
        query, key, value = _check_attention_args(query, key, value, attn_mask, is_causal, enable_gqa)
        scale = _check_scale(scale)
        split = _attention_batch_arguments(query, key, value, attn_mask, enable_gqa)
        self.intercepted_calls += 1

        def call(call_args: list[Any], sample_key: torch.Tensor | None) -> torch.Tensor:
            q, k, v, mask = call_args
            return dk_F.scaled_dot_product_attention(
                q, k, v, mask, rate, is_causal, scale, enable_gqa, seed=sample_key
            )

        return self._per_sample(
            call, [query, key, value, attn_mask], split, "scaled_dot_product_attention", site
        )


def _attention_batch_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    enable_gqa: bool,
) -> tuple[int, ...]:
    """The arguments of an SDPA call (``query, key, value, attn_mask``) whose dim 0 is dim 0 of
    its attention weights, at full size: those a sampling plan cuts per sample.

    The others broadcast over that dim (size 1 there, or fewer dims) and go whole to every
    sample's call.  Either way a sample's call computes its slice of the weights, and the engine
    reads the mask of that slice's weight ``(b, i, j)`` at ``(b * L + i) * S + j`` under the
    sample's key: the mask that dropping that slice of the materialised weights draws.  Without
    batch dims the weights' dim 0 is the query rows, which only the query and the mask have.
    """
    batch = batch_shape(query, key, value, enable_gqa)
    dims, lead = len(batch) + 2, batch[0] if batch else query.shape[-2]
    arguments = (query, key, value, attn_mask) if batch else (query, None, None, attn_mask)
    return tuple(
        index
        for index, argument in enumerate(arguments)
        if argument is not None and argument.dim() == dims and argument.shape[0] == lead
    )


def _number(module: nn.Module, attribute: str) -> float:
    """A module's numeric attribute (a rate) as a float, ``0.0`` when it is not a number."""
    value = getattr(module, attribute, 0.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _takes_seed(forward: Callable[..., Any]) -> bool:
    try:
        return "seed" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _batch_arguments(module: nn.Module) -> tuple[int, ...]:
    """The batch-shaped positional arguments of a layer: the input, and the residual of the
    fused residual ops."""
    if isinstance(module, BiasDropoutAdd):  # deprecated: (input, bias, residual)
        return (0, 2)
    if isinstance(module, ResidualDropout):  # (input, residual, bias)
        return (0, 1)
    return (0,)


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
    drop_path: bool = True,
) -> MCDropoutHandle:
    """Switch ``model`` into Monte Carlo dropout mode until :meth:`MCDropoutHandle.restore`.

    See :mod:`dropkit.mc.mode` for what is turned on, the selection rules and the limits.

    Args:
        model: the model (a ``torch.nn.Module``).
        include: modules to turn on (type, name glob, predicate or a list); default all.
        exclude: modules to leave deterministic (same forms); default none.
        attention_p: the attention dropout rate of every attention path: a float, an attribute
            name or a callable ``module -> float | None`` resolved on the module running the
            attention, or ``None`` (default) for the model's configured rates.
        drop_path: whether stochastic depth (dropkit, timm, torchvision and Hugging Face
            drop-path modules) is on. Default: ``True``

    Returns:
        The active :class:`MCDropoutHandle`.

    Raises:
        TypeError: ``model`` is not a module, a selector or ``attention_p`` has the wrong type,
            or ``drop_path`` is not a bool.
        ValueError: a float ``attention_p`` outside ``[0, 1]``.
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
    return MCDropoutHandle(
        model, include=include, exclude=exclude, attention_p=attention_p, drop_path=drop_path
    )


@contextlib.contextmanager
def mc_dropout(
    model: nn.Module,
    *,
    include: SelectorSpec = None,
    exclude: SelectorSpec = None,
    attention_p: AttentionRate = None,
    drop_path: bool = True,
) -> Iterator[MCDropoutHandle]:
    """Context manager: ``model`` in Monte Carlo dropout mode inside the block.

    Dropout of every kind is on, everything else in eval (BatchNorm statistics untouched);
    everything is restored on exit, also after an exception.  See :mod:`dropkit.mc.mode` for
    the details and :func:`enable_mc_dropout` for the arguments.

    Args:
        model: the model (a ``torch.nn.Module``).
        include: modules to turn on (type, name glob, predicate or a list); default all.
        exclude: modules to leave deterministic (same forms); default none.
        attention_p: the attention dropout rate of every attention path (a float, an attribute
            name, a callable, or ``None`` for the configured rates).
        drop_path: whether stochastic depth is on. Default: ``True``

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

    With stochastic depth left deterministic::

        >>> block = dropkit.nn.StochasticDepth(torch.nn.Linear(4, 4), p=0.5)
        >>> with mc_dropout(torch.nn.Sequential(block, torch.nn.Dropout(0.1)), drop_path=False) as handle:
        ...     block.training
        False
        >>> handle.modules
        ['1']
    """
    handle = MCDropoutHandle(
        model, include=include, exclude=exclude, attention_p=attention_p, drop_path=drop_path
    )
    try:
        yield handle
    except BaseException:
        handle.restore(warn=False)
        raise
    handle.restore()
