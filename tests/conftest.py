"""Shared fixtures and statistical helpers for dropkit's tests."""

from __future__ import annotations

import math

import pytest
import torch

import dropkit

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
