"""Multiplicative Gaussian dropout and additive Gaussian noise; documentation lives on the modules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dropkit._validation import check_nonnegative, check_probability, normalize_dims
from dropkit.engine import ops
from dropkit.functional._common import SeedLike, check_common, drop_everything, finish, resolve_key

__all__ = ["gaussian_dropout", "gaussian_dropout_std", "gaussian_noise"]


def gaussian_dropout_std(p: float) -> float:
    """The noise standard deviation ``sqrt(p / (1 - p))`` matching Bernoulli dropout's variance."""
    p = check_probability(p)
    if p == 1.0:
        raise ValueError("the Gaussian dropout std is infinite at p = 1, got p=1.0")
    return math.sqrt(p / (1.0 - p))


def gaussian_dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multiply by ``N(1, p/(1-p))`` noise; see :class:`dropkit.nn.GaussianDropout`."""
    input = check_common(input, training, inplace)
    p = check_probability(p)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return drop_everything(input, inplace)
    key = resolve_key(input, seed, generator)
    output = ops.gaussian_scale(input, key, gaussian_dropout_std(p), dims)
    return finish(input, output, inplace)


def gaussian_noise(
    input: torch.Tensor,
    std: float = 0.1,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add ``N(0, std^2)`` noise; see :class:`dropkit.nn.GaussianNoise`."""
    input = check_common(input, training, inplace)
    std = check_nonnegative(std, "std")
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    if not training or std == 0.0:
        return input
    key = resolve_key(input, seed, generator)
    return finish(input, ops.gaussian_shift(input, key, std, dims), inplace)
