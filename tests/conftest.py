"""Shared fixtures and statistical helpers for dropkit's tests."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch

import dropkit

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # only tests/test_properties.py needs it
    pass
else:
    # Hypothesis profiles (tests/test_properties.py): "ci", the default, is derandomized (the
    # same examples on every run, no example database) with few examples, so that the property
    # suite runs in about a minute on two cores; HYPOTHESIS_PROFILE=thorough draws many more,
    # randomly, for long local runs.  No deadline: a first call may compile a kernel.
    _HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile(
        "ci", derandomize=True, database=None, deadline=None, max_examples=20, suppress_health_check=_HEALTH
    )
    settings.register_profile("thorough", deadline=None, max_examples=1000, suppress_health_check=_HEALTH)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Margin for every statistical check: far beyond any fluctuation a fixed seed could produce,
# so a change of the random stream never makes a correct implementation fail.
SIGMAS = 6.0


def binomial_tolerance(p: float, n: int, sigmas: float = SIGMAS) -> float:
    """Tolerance on an observed frequency of ``n`` independent Bernoulli(p) draws."""
    return sigmas * math.sqrt(max(p * (1.0 - p), 1e-12) / n)


@pytest.fixture(autouse=True)
def _fresh_rng() -> None:
    """Every test starts from the same dropkit and torch seeds."""
    dropkit.manual_seed(1234)
    torch.manual_seed(1234)


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak growth of the bytes held by torch's CPU allocator while ``fn`` runs (its allocation and
    free events, recorded by torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak
