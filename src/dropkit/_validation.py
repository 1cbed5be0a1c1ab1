"""Argument checks shared by every op and module; messages name the argument and the value."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

__all__ = [
    "check_bool",
    "check_floating_tensor",
    "check_int",
    "check_nonnegative",
    "check_probability",
    "check_probability_tensor",
    "check_min_rank",
    "check_rank",
    "check_tensor",
    "env_flag",
    "normalize_dims",
]


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    as_float = float(value)
    if math.isnan(as_float):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return as_float


def check_probability(p: object, name: str = "p") -> float:
    """``p`` as a float in ``[0, 1]``; TypeError for non-real types, ValueError otherwise."""
    value = _check_real(p, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    return value


def check_probability_tensor(p: torch.Tensor, name: str = "p") -> torch.Tensor:
    """A rate held in a tensor: one element, floating point, no grad (the value is checked where
    it is read)."""
    if not p.is_floating_point():
        raise TypeError(f"{name} given as a tensor must be floating point, got dtype {p.dtype}")
    if p.numel() != 1 or p.dim() > 1 or p.requires_grad:
        raise ValueError(
            f"{name} given as a tensor must have shape () or (1,) and not require grad, got shape "
            f"{tuple(p.shape)} and requires_grad={p.requires_grad}"
        )
    return p


def check_nonnegative(value: object, name: str) -> float:
    """A finite float >= 0."""
    as_float = _check_real(value, name)
    if not (math.isfinite(as_float) and as_float >= 0.0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return as_float


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


def check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    """An int (not a bool) in ``[low, high]`` (``high=None``: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def check_tensor(input: object, name: str = "input") -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    return input


def check_floating_tensor(input: object, name: str = "input") -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {input.dtype}")
    return input


def check_rank(input: torch.Tensor, allowed: Sequence[int], layer: str, layout: str) -> None:
    """Refuse a rank the layer does not define, instead of reinterpreting the dimensions."""
    if input.dim() not in allowed:
        expected = " or ".join(f"{rank}-D" for rank in allowed)
        raise ValueError(
            f"{layer} expects {expected} input {layout}, "
            f"got {input.dim()}-D input of shape {tuple(input.shape)}"
        )


def check_min_rank(input: torch.Tensor, minimum: int, layer: str, layout: str) -> None:
    if input.dim() < minimum:
        raise ValueError(
            f"{layer} expects at least {minimum}-D input {layout}, "
            f"got {input.dim()}-D input of shape {tuple(input.shape)}"
        )


def normalize_dims(dims: object, ndim: int, name: str) -> list[int]:
    """Sorted, de-duplicated non-negative dims from ints that may be negative."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    if not isinstance(dims, Sequence) or isinstance(dims, str):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(dims).__name__}")
    result = set()
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{name} must contain ints, got {dim!r}")
        if not -ndim <= dim < ndim:
            raise ValueError(f"{name} entry {dim} is out of range for a {ndim}-D input")
        result.add(dim % ndim)
    return sorted(result)


def env_flag(name: str) -> bool:
    """A boolean environment variable (``0/1/true/false/yes/no/on/off``, unset = false); anything
    else is a ValueError, so a typo fails loudly instead of silently meaning "off"."""
    raw = os.environ.get(name, "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"environment variable {name} must be 0/1/true/false, got {raw!r}")
