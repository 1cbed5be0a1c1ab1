"""Multiplicative Gaussian dropout and additive Gaussian noise; documentation lives on the modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dropkit import ops
from dropkit._validation import check_nonnegative, normalize_dims
from dropkit.engine.numerics import gaussian_dropout_std as gaussian_dropout_std
from dropkit.functional._common import SeedLike, check_common, check_rate, finish, is_zero, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate

__all__ = ["gaussian_dropout", "gaussian_dropout_std", "gaussian_noise"]


def gaussian_dropout(
    input: torch.Tensor,
    p: Rate = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multiply by ``N(1, p/(1-p))`` noise; see :class:`dropkit.nn.GaussianDropout`."""
    input = check_common(input, training, inplace)
    p = check_rate(p)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    check_seed(seed, generator)
    if not training or is_zero(p):
        return input
    key = resolve_key(input, seed, generator)
    return finish(input, ops.gaussian_dropout(input, key, p, dims, "p"), inplace)


def gaussian_noise(
    input: torch.Tensor,
    std: Rate = 0.1,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add ``N(0, std^2)`` noise; see :class:`dropkit.nn.GaussianNoise`."""
    input = check_common(input, training, inplace)
    std = check_rate(std, "std", check_nonnegative)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    check_seed(seed, generator)
    if not training or is_zero(std):
        return input
    key = resolve_key(input, seed, generator)
    return finish(input, ops.gaussian_noise(input, key, std, dims, "std"), inplace)
