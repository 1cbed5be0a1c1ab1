"""Dropout-rate schedules and their attachment to models.

Schedules (:mod:`dropkit.schedules.schedules`) are pure functions of the optimizer step;
:func:`attach` returns a :class:`ScheduledRates` controller that sets the rates of selected
modules as training advances, with ``state_dict`` for resuming.  ``RateScheduleCallback`` (a
PyTorch Lightning callback) is imported on first use, so Lightning stays optional.
"""

from __future__ import annotations

from typing import Any

from dropkit.schedules.attach import DEFAULT_DROPOUT_TYPES as DEFAULT_DROPOUT_TYPES
from dropkit.schedules.attach import Attachment as Attachment
from dropkit.schedules.attach import ScheduledRates as ScheduledRates
from dropkit.schedules.attach import attach as attach
from dropkit.schedules.schedules import Constant as Constant
from dropkit.schedules.schedules import Cosine as Cosine
from dropkit.schedules.schedules import Curriculum as Curriculum
from dropkit.schedules.schedules import DropBlockRamp as DropBlockRamp
from dropkit.schedules.schedules import EarlyDropout as EarlyDropout
from dropkit.schedules.schedules import LateDropout as LateDropout
from dropkit.schedules.schedules import Linear as Linear
from dropkit.schedules.schedules import Schedule as Schedule
from dropkit.schedules.schedules import Step as Step

__all__ = [
    "DEFAULT_DROPOUT_TYPES",
    "Attachment",
    "Constant",
    "Cosine",
    "Curriculum",
    "DropBlockRamp",
    "EarlyDropout",
    "LateDropout",
    "Linear",
    "Schedule",
    "ScheduledRates",
    "Step",
    "attach",
]


def __getattr__(name: str) -> Any:
    if name == "RateScheduleCallback":
        from dropkit.schedules.lightning import rate_schedule_callback_class

        return rate_schedule_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
