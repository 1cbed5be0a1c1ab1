"""Multiplicative Gaussian dropout and additive Gaussian noise; documentation lives on the modules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dropkit._validation import check_nonnegative, check_probability, check_probability_tensor, normalize_dims
from dropkit.engine import ops
from dropkit.functional._common import SeedLike, check_common, drop_everything, finish, resolve_key
from dropkit.functional._tensor_rate import register_tensor_rate_variant, tensor_rate_op

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
    return finish(input, _gaussian_forward(input, key, p, dims), inplace)


def _gaussian_forward(x: torch.Tensor, key: torch.Tensor, p: float, dims: list[int]) -> torch.Tensor:
    """The training forward of :func:`gaussian_dropout` (linear in ``x``: also its backward)."""
    if p == 0.0:
        return x
    if p == 1.0:
        return drop_everything(x, False)
    return ops.gaussian_scale(x, key, gaussian_dropout_std(p), dims)


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


# --- rates held in tensors (see dropkit.functional._tensor_rate) --------------------------------

#: ``dropkit::gaussian_dropout_tensor_rate(x, key, p, broadcast_dims)``: the std
#: ``sqrt(p / (1 - p))`` is computed from the rate read at run time, as the float path computes it.
gaussian_dropout_tensor_rate_op = tensor_rate_op(
    "gaussian_dropout_tensor_rate", "int[] broadcast_dims", _gaussian_forward
)


def _noise_forward(x: torch.Tensor, key: torch.Tensor, std: float, dims: list[int]) -> torch.Tensor:
    return x if std == 0.0 else ops.gaussian_shift(x, key, std, dims)


#: ``dropkit::gaussian_noise_tensor_rate(x, key, p, broadcast_dims)``: ``p`` holds the std
#: (validated as ``std``: finite and >= 0); the gradient is the incoming one.
gaussian_noise_tensor_rate_op = tensor_rate_op(
    "gaussian_noise_tensor_rate",
    "int[] broadcast_dims",
    _noise_forward,
    "identity",
    rate_name="std",
    check=check_nonnegative,
)


def _gaussian_dropout_tensor_rate(
    input: torch.Tensor,
    p: torch.Tensor,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`gaussian_dropout` with ``p`` a floating-point tensor of shape ``()`` or ``(1,)``."""
    check_probability_tensor(p)
    if not torch.compiler.is_compiling():
        return gaussian_dropout(
            input, float(p), training, inplace, broadcast_dims=broadcast_dims, seed=seed, generator=generator
        )
    input = check_common(input, training, inplace)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    if not training:
        return input
    key = resolve_key(input, seed, generator)
    return finish(input, gaussian_dropout_tensor_rate_op(input, key, p.reshape(()), dims), inplace)


def _gaussian_noise_tensor_rate(
    input: torch.Tensor,
    std: torch.Tensor,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`gaussian_noise` with ``std`` a floating-point tensor of shape ``()`` or ``(1,)``."""
    check_probability_tensor(std, "std")
    if not torch.compiler.is_compiling():
        return gaussian_noise(
            input,
            float(std),
            training,
            inplace,
            broadcast_dims=broadcast_dims,
            seed=seed,
            generator=generator,
        )
    input = check_common(input, training, inplace)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    if not training:
        return input
    key = resolve_key(input, seed, generator)
    return finish(input, gaussian_noise_tensor_rate_op(input, key, std.reshape(()), dims), inplace)


register_tensor_rate_variant(gaussian_dropout, _gaussian_dropout_tensor_rate)
register_tensor_rate_variant(gaussian_noise, _gaussian_noise_tensor_rate)
