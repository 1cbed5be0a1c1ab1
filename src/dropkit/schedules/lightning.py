"""A PyTorch Lightning callback that steps rate schedules (Lightning is optional).

Lightning is imported only when the callback class is first asked for
(``dropkit.schedules.RateScheduleCallback`` or :func:`rate_schedule_callback_class`), from
``lightning.pytorch`` or else the standalone ``pytorch_lightning``; this module itself imports
without either.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from dropkit.schedules.attach import ScheduledRates

__all__ = ["rate_schedule_callback_class"]

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


class _RateScheduleHooks:
    """The hooks of ``RateScheduleCallback``; mixed into the installed Lightning's ``Callback``.

    After every training batch the controller is moved to ``trainer.global_step``, the number of
    optimizer steps taken so far, so ``accumulate_grad_batches`` (which makes Lightning step the
    optimizer every N batches, and at the end of an epoch) is respected, and a run resumed from a
    Lightning checkpoint continues mid-schedule (the global step is part of the checkpoint; the
    controller's ``state_dict`` is saved as the callback's state too).  The current rates are
    logged with ``pl_module.log`` as ``{prefix}/{label}`` (per step).

    Args:
        rates: the controller from :func:`dropkit.schedules.attach`, with
            ``accumulation_steps=1`` and not following an optimizer (the callback steps it).
        log_rates: log the rates. Default: ``True``
        prefix: prefix of the logged names. Default: ``"dropout_rate"``

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), dropkit.nn.Dropout(0.1))
        >>> rates = dropkit.schedules.attach(model, dropkit.schedules.LateDropout(0.1, start=100))
        >>> callback = dropkit.schedules.RateScheduleCallback(rates)  # doctest: +SKIP
        >>> trainer = lightning.pytorch.Trainer(callbacks=[callback])  # doctest: +SKIP
    """

    def __init__(
        self, rates: ScheduledRates, *, log_rates: bool = True, prefix: str = "dropout_rate"
    ) -> None:
        if not isinstance(rates, ScheduledRates):
            raise TypeError(f"rates must be a ScheduledRates controller, got {type(rates).__name__}")
        if rates.accumulation_steps != 1:
            raise ValueError(
                "the callback steps the schedules by trainer.global_step, which already counts "
                "optimizer steps; build the controller with accumulation_steps=1, "
                f"got {rates.accumulation_steps}"
            )
        if not isinstance(log_rates, bool):
            raise TypeError(f"log_rates must be a bool, got {type(log_rates).__name__} ({log_rates!r})")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.rates = rates
        self.log_rates = log_rates
        self.prefix = prefix

    def _sync(self, trainer: Any) -> None:
        if self.rates.following:
            raise RuntimeError(
                "the controller follows an optimizer and the callback steps it too; use one of them"
            )
        self.rates.set_step(int(trainer.global_step))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._sync(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(trainer)
        if self.log_rates:
            for label, value in self.rates.rates().items():
                pl_module.log(f"{self.prefix}/{label}", value, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.rates.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rates.load_state_dict(state_dict)


@functools.cache
def rate_schedule_callback_class(package: str | None = None) -> type:
    """``RateScheduleCallback``: a ``Callback`` of ``package`` (``"lightning.pytorch"`` or
    ``"pytorch_lightning"``; default: the first one installed) that steps rate schedules.

    See :class:`_RateScheduleHooks` for what it does; it is built on first use so that dropkit
    does not require Lightning.
    """
    if package is not None and package not in _PACKAGES:
        raise ValueError(f"package must be one of {_PACKAGES}, got {package!r}")
    last_error: ImportError | None = None
    for name in (package,) if package is not None else _PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            last_error = error
            continue
        return type(
            "RateScheduleCallback",
            (_RateScheduleHooks, module.Callback),
            {"__doc__": _RateScheduleHooks.__doc__, "__module__": __name__},
        )
    raise ImportError(
        "RateScheduleCallback needs PyTorch Lightning: pip install lightning "
        f"(or pytorch_lightning); {last_error}"
    ) from None
