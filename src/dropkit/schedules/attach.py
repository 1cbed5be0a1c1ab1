r"""Attach rate schedules to the modules of a model and step them with the optimizer.

:func:`attach` selects modules by type and/or by qualified name and returns a
:class:`ScheduledRates` controller; further :meth:`ScheduledRates.attach` calls add schedules
for other modules (attention dropout and residual dropout on different schedules, say).  The
controller counts *optimizer* steps and sets every attached rate to ``schedule(step)``.

Three ways to advance it, from the hardest to get wrong:

* ``rates.follow(optimizer)``: a post-step hook of the optimizer advances the schedules on every
  real ``optimizer.step()`` (so gradient accumulation needs no bookkeeping, and steps skipped by
  a ``GradScaler`` are not counted); calling :meth:`~ScheduledRates.step` is then an error.
* ``ScheduledRates(accumulation_steps=N)`` and :meth:`~ScheduledRates.step` once per
  micro-batch: the schedules advance every ``N`` calls.
* :meth:`~ScheduledRates.step` once per optimizer step (``accumulation_steps=1``, the default).

The ``p`` of dropkit's ``Dropout`` / ``Dropout1d/2d/3d``, ``AlphaDropout``,
``FeatureAlphaDropout``, ``GaussianDropout``, ``DropBlock1d/2d/3d``, ``DropPath``,
``StochasticDepth``, ``ResidualDropout``, ``BiasDropoutAdd``, ``ScaledDotProductAttention``
(with ``use_engine=True``), ``LockedDropout``, ``EmbeddingDropout``, ``WeightDrop``,
``DropConnect`` and ``ZoneoutCell`` (and its ``cell_p``), the ``std`` of ``GaussianNoise``,
and any attribute that holds a tensor (filled in place) reach a ``torch.compile``-d graph as a
tensor input, so a schedule does not recompile the model.  Any other float attribute, that of
``torch.nn.Dropout`` and of dropkit's ``LayerDrop`` included, is a constant of the compiled
graph: every new value recompiles it, up to ``torch._dynamo.config.recompile_limit`` times;
attaching to a compiled model warns about such modules.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dropkit import nn as dk_nn
from dropkit._validation import check_int
from dropkit.nn._base import _RandomLayer

__all__ = ["DEFAULT_DROPOUT_TYPES", "Attachment", "ScheduledRates", "attach"]

#: Modules a schedule applies to when neither ``modules`` nor ``names`` is given: element and
#: channel dropout of ``torch.nn`` and dropkit (not DropPath, DropBlock or noise layers).
DEFAULT_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    dk_nn.Dropout,
    dk_nn.Dropout1d,
    dk_nn.Dropout2d,
    dk_nn.Dropout3d,
)

NameFilter = str | re.Pattern[str] | Callable[[str], bool]
Schedule = Callable[[int], float]


@dataclass(frozen=True)
class Attachment:
    """One schedule and the modules whose ``attribute`` it sets."""

    label: str
    schedule: Schedule
    attribute: str
    modules: tuple[tuple[str, nn.Module], ...]
    original: tuple[Any, ...]

    @property
    def names(self) -> list[str]:
        """Qualified names of the scheduled modules (``""`` is the model itself)."""
        return [name for name, _ in self.modules]


def _check_types(modules: object) -> tuple[type[nn.Module], ...]:
    types = modules if isinstance(modules, tuple) else (modules,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"modules must be an nn.Module subclass or a tuple of them, got {modules!r}")
    return types


def _name_matcher(names: object) -> Callable[[str], bool]:
    if isinstance(names, str):
        pattern = names
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    if isinstance(names, re.Pattern):
        regex = names
        return lambda name: regex.fullmatch(name) is not None
    if callable(names):
        return lambda name: bool(names(name))
    raise TypeError(
        "names must be a glob string, a compiled re.Pattern or a callable name -> bool, "
        f"got {type(names).__name__} ({names!r})"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles, so names carry no ``_orig_mod.`` prefix."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _set(module: nn.Module, attribute: str, value: float) -> None:
    current = getattr(module, attribute)
    if isinstance(current, torch.Tensor):
        with torch.no_grad():
            current.fill_(value)  # in place: a compiled graph holding the tensor sees the new value
    else:
        setattr(module, attribute, value)


class ScheduledRates:
    """Sets the rates of attached modules to ``schedule(step)`` as training advances.

    ``step`` counts optimizer steps, from 0.  After every advance (and when a schedule is
    attached or a state is loaded) each attached module gets ``setattr(module, attribute,
    schedule(step))``; an attribute holding a tensor is filled in place instead.

    Args:
        accumulation_steps: calls of :meth:`step` per optimizer step (gradient accumulation:
            call :meth:`step` every micro-batch). Default: 1

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), dropkit.nn.Dropout(0.1))
        >>> rates = dropkit.schedules.ScheduledRates(accumulation_steps=2)
        >>> rates = rates.attach(model, dropkit.schedules.LateDropout(0.1, start=1))
        >>> model[1].p
        0.0
        >>> for micro_batch in range(4):
        ...     rates.step()  # after each backward; the schedule advances every 2nd call
        >>> rates.optimizer_steps, model[1].p
        (2, 0.1)
        >>> rates.state_dict()
        {'optimizer_steps': 2, 'micro_steps': 0, 'accumulation_steps': 2}
    """

    def __init__(self, *, accumulation_steps: int = 1) -> None:
        self.accumulation_steps = check_int(accumulation_steps, "accumulation_steps", 1)
        self._optimizer_steps = 0
        self._micro_steps = 0
        self._attachments: list[Attachment] = []
        self._followed: RemovableHandle | None = None

    # --- attaching ----------------------------------------------------------------------------

    def attach(
        self,
        model: nn.Module,
        schedule: Schedule,
        *,
        modules: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
        names: NameFilter | None = None,
        attribute: str = "p",
        label: str | None = None,
    ) -> ScheduledRates:
        """Schedule ``attribute`` of the modules of ``model`` selected by ``modules`` and ``names``.

        Args:
            model: the model (a ``torch.compile`` wrapper is looked through).
            schedule: a :class:`~dropkit.schedules.Schedule` or any callable ``step -> float``.
            modules: a module type or tuple of types to select. Default: when ``names`` is also
                ``None``, :data:`DEFAULT_DROPOUT_TYPES`; otherwise any type.
            names: qualified module names to select (``model.named_modules()``): a glob
                (``"blocks.*.attn_drop"``), a compiled regex (must match the whole name) or a
                callable ``name -> bool``. Default: any name
            attribute: the attribute that holds the rate. Default: ``"p"``
            label: the name of this attachment in :meth:`rates` and in logs. Default: its index

        Returns:
            ``self``, so attachments chain.

        Raises:
            ValueError: nothing matched, a selected module lacks ``attribute``, or a module's
                ``attribute`` is already scheduled by this controller.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(schedule):
            raise TypeError(f"schedule must be callable step -> float, got {type(schedule).__name__}")
        if not isinstance(attribute, str) or not attribute.isidentifier():
            raise ValueError(f"attribute must be an attribute name, got {attribute!r}")
        if label is not None and not isinstance(label, str):
            raise TypeError(f"label must be a str, got {type(label).__name__}")
        label = str(len(self._attachments)) if label is None else label
        if label in self.labels:
            raise ValueError(f"label {label!r} is already used by another attachment")
        if modules is None and names is None:
            modules = DEFAULT_DROPOUT_TYPES
        types = _check_types(modules) if modules is not None else (nn.Module,)
        matches = _name_matcher(names) if names is not None else (lambda name: True)

        root = _unwrap(model)
        selected = [
            (name, module)
            for name, module in root.named_modules()
            if isinstance(module, types) and matches(name)
        ]
        if not selected:
            raise ValueError(
                f"no module of {type(root).__name__} matched modules={modules!r}, names={names!r}"
            )
        taken = {(id(m), a.attribute) for a in self._attachments for _, m in a.modules}
        for name, module in selected:
            if not hasattr(module, attribute):
                raise ValueError(f"module {name!r} ({type(module).__name__}) has no attribute {attribute!r}")
            if (id(module), attribute) in taken:
                raise ValueError(
                    f"{attribute!r} of module {name!r} ({type(module).__name__}) is already scheduled"
                )
        if root is not model:
            _warn_if_recompiling(selected, attribute)
        original = tuple(_copy(getattr(module, attribute)) for _, module in selected)
        attachment = Attachment(label, schedule, attribute, tuple(selected), original)
        try:
            self._apply(attachment)
        except Exception:
            _put_back(attachment)  # a refused value leaves the modules as they were
            raise
        self._attachments.append(attachment)
        return self

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        return tuple(self._attachments)

    @property
    def labels(self) -> list[str]:
        return [a.label for a in self._attachments]

    # --- stepping -----------------------------------------------------------------------------

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken so far (the step at which the schedules are evaluated)."""
        return self._optimizer_steps

    @property
    def micro_steps(self) -> int:
        """Calls of :meth:`step` since the last optimizer step (``< accumulation_steps``)."""
        return self._micro_steps

    @property
    def following(self) -> bool:
        """Whether the controller advances on ``optimizer.step()`` (see :meth:`follow`)."""
        return self._followed is not None

    def step(self) -> None:
        """Count one micro-batch; every ``accumulation_steps`` calls, advance the schedules."""
        if self._followed is not None:
            raise RuntimeError(
                "this controller advances on optimizer.step() (see follow()); do not call step() too"
            )
        self._micro_steps += 1
        if self._micro_steps >= self.accumulation_steps:
            self._micro_steps = 0
            self._advance()

    def set_step(self, optimizer_steps: int) -> None:
        """Jump to ``optimizer_steps`` (e.g. a trainer's global step) and apply the rates."""
        self._optimizer_steps = check_int(optimizer_steps, "optimizer_steps", 0)
        self._micro_steps = 0
        self._apply_all()

    def follow(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Advance the schedules after every ``optimizer.step()``; returns the hook's handle.

        Gradient accumulation needs nothing more: the schedules move when the weights do.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._followed is not None:
            raise RuntimeError("this controller already follows an optimizer")
        if self.accumulation_steps != 1:
            raise ValueError(
                "follow() counts optimizer steps itself; construct the controller with "
                f"accumulation_steps=1, got {self.accumulation_steps}"
            )

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._advance()

        handle = optimizer.register_step_post_hook(hook)
        self._followed = handle
        return handle

    def unfollow(self) -> None:
        """Stop following the optimizer (then :meth:`step` may be called again)."""
        if self._followed is not None:
            self._followed.remove()
            self._followed = None

    def _advance(self) -> None:
        self._optimizer_steps += 1
        self._apply_all()

    def _apply(self, attachment: Attachment) -> None:
        value = float(attachment.schedule(self._optimizer_steps))
        for _, module in attachment.modules:
            _set(module, attachment.attribute, value)

    def _apply_all(self) -> None:
        for attachment in self._attachments:
            self._apply(attachment)

    def rates(self) -> dict[str, float]:
        """The current value of each attachment, by label."""
        return {a.label: float(a.schedule(self._optimizer_steps)) for a in self._attachments}

    def restore(self) -> None:
        """Put back the values the attributes had when attached, and drop every attachment."""
        self.unfollow()
        for attachment in reversed(self._attachments):
            _put_back(attachment)
        self._attachments.clear()

    # --- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """The position in the schedules (plain ints: ``torch.save`` / ``weights_only`` safe)."""
        return {
            "optimizer_steps": self._optimizer_steps,
            "micro_steps": self._micro_steps,
            "accumulation_steps": self.accumulation_steps,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: restores the step and applies the rates."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = {"optimizer_steps", "micro_steps", "accumulation_steps"}
        if set(state_dict) != expected:
            raise ValueError(f"state_dict must have the keys {sorted(expected)}, got {sorted(state_dict)}")
        accumulation = check_int(state_dict["accumulation_steps"], "accumulation_steps", 1)
        if accumulation != self.accumulation_steps:
            raise ValueError(
                f"state_dict was saved with accumulation_steps={accumulation}, "
                f"this controller has {self.accumulation_steps}"
            )
        optimizer_steps = check_int(state_dict["optimizer_steps"], "optimizer_steps", 0)
        micro = check_int(state_dict["micro_steps"], "micro_steps", 0, accumulation - 1)
        self.set_step(optimizer_steps)
        self._micro_steps = micro

    def __repr__(self) -> str:
        lines = [
            f"{type(self).__name__}(optimizer_steps={self._optimizer_steps}, "
            f"accumulation_steps={self.accumulation_steps}"
            + (", following an optimizer" if self._followed is not None else "")
            + ")"
        ]
        for a in self._attachments:
            lines.append(f"  {a.label}: {a.schedule!r} -> {a.attribute} of {_summary(a.names)}")
        return "\n".join(lines)


def _compile_safe(module: nn.Module, attribute: str) -> bool:
    """Whether a compiled graph reads ``attribute`` of ``module`` as an input, not a constant."""
    if isinstance(getattr(module, attribute), torch.Tensor):
        return True
    # Each dropkit layer knows which of its float rates it mirrors into a tensor holder that its
    # compiled forward reads (SDPA only on the engine path, unary layers only with a variant).
    return isinstance(module, _RandomLayer) and module._rate_is_graph_input(attribute)


def _warn_if_recompiling(selected: list[tuple[str, nn.Module]], attribute: str) -> None:
    constant = [name for name, module in selected if not _compile_safe(module, attribute)]
    if constant:
        warnings.warn(
            f"the compiled model treats {attribute!r} of {_summary(constant)} as a constant: every "
            "new scheduled value recompiles it; the rates of dropkit's dropout layers (see "
            "dropkit.schedules.attach) or tensor-valued attributes change without recompiling",
            UserWarning,
            stacklevel=4,
        )


def _put_back(attachment: Attachment) -> None:
    for (_, module), value in zip(attachment.modules, attachment.original, strict=True):
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                getattr(module, attachment.attribute).copy_(value)
        else:
            setattr(module, attachment.attribute, value)


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _summary(names: Iterable[str]) -> str:
    listed = [repr(n) for n in names]
    return ", ".join(listed) if len(listed) <= 4 else ", ".join(listed[:3]) + f", ... ({len(listed)})"


def attach(
    model: nn.Module,
    schedule: Schedule,
    *,
    modules: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    names: NameFilter | None = None,
    attribute: str = "p",
    label: str | None = None,
    accumulation_steps: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
) -> ScheduledRates:
    """Schedule the rates of ``model``'s modules; returns the :class:`ScheduledRates` controller.

    Selection and arguments as in :meth:`ScheduledRates.attach`.  With ``optimizer`` the
    controller follows it (:meth:`ScheduledRates.follow`) and needs no ``step()`` calls.

    Examples::

        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 4), dropkit.nn.Dropout(0.1), torch.nn.Linear(4, 2), torch.nn.Dropout(0.1)
        ... )
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> early = dropkit.schedules.EarlyDropout(0.1, steps=2)
        >>> rates = dropkit.schedules.attach(model, early, names="1", optimizer=opt, label="hidden")
        >>> rates = rates.attach(model, dropkit.schedules.LateDropout(0.2, start=1), names="3", label="head")
        >>> rates.rates()
        {'hidden': 0.1, 'head': 0.0}
        >>> for _ in range(2):
        ...     model(torch.randn(8, 4)).sum().backward()
        ...     opt.step()
        >>> model[1].p, model[3].p
        (0.0, 0.2)
    """
    controller = ScheduledRates(accumulation_steps=accumulation_steps)
    controller.attach(model, schedule, modules=modules, names=names, attribute=attribute, label=label)
    if optimizer is not None:
        controller.follow(optimizer)
    return controller
