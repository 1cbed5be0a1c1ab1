"""Alpha dropout for self-normalizing (SELU) networks; documentation lives on the modules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dropkit._validation import (
    check_bool,
    check_min_rank,
    check_probability,
    check_probability_tensor,
    normalize_dims,
)
from dropkit.engine import ops
from dropkit.functional._common import SeedLike, check_common, drop_everything, finish, resolve_key
from dropkit.functional._tensor_rate import register_tensor_rate_variant, tensor_rate_op

__all__ = ["SELU_ALPHA_PRIME", "alpha_dropout", "alpha_dropout_coefficients", "feature_alpha_dropout"]

# The SELU saturation value -lambda * alpha (Klambauer et al. 2017): where dropped units sit.
SELU_ALPHA_PRIME = -1.7580993408473766


def alpha_dropout_coefficients(p: float) -> tuple[float, float]:
    """The affine correction ``(a, b)`` that keeps a standard-normal input at mean 0, variance 1.

    ``a = (q + alpha'^2 q p)^(-1/2)`` and ``b = -a alpha' p`` with ``q = 1 - p``; undefined at
    ``p = 1`` (ValueError), where alpha dropout outputs zeros instead.
    """
    p = check_probability(p)
    if p == 1.0:
        raise ValueError("alpha dropout coefficients are undefined at p = 1, got p=1.0")
    q = 1.0 - p
    a = 1.0 / math.sqrt(q + SELU_ALPHA_PRIME**2 * q * p)
    return a, -a * SELU_ALPHA_PRIME * p


def _alpha(
    input: torch.Tensor,
    p: float,
    training: bool,
    inplace: bool,
    dims: list[int],
    seed: SeedLike,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not training or p == 0.0:
        return input
    if p == 1.0:
        # The affine correction diverges; zeros are the defined output (never NaN, even for inf).
        return drop_everything(input, inplace)
    a, b = alpha_dropout_coefficients(p)
    key = resolve_key(input, seed, generator)
    output = ops.masked_affine(input, key, p, dims, a, b, a * SELU_ALPHA_PRIME + b)
    return finish(input, output, inplace)


def _alpha_forward(x: torch.Tensor, key: torch.Tensor, p: float, dims: list[int]) -> torch.Tensor:
    return _alpha(x, p, True, False, dims, key, None)


def _alpha_backward(grad: torch.Tensor, key: torch.Tensor, p: float, dims: list[int]) -> torch.Tensor:
    # The gradients of the float path: identity at p = 0, zeros at p = 1 (drop_everything), and
    # where(keep, dy * a, 0) in between (the shift b does not depend on x).
    if p == 0.0:
        return grad
    if p == 1.0:
        return drop_everything(grad, False)
    a, _ = alpha_dropout_coefficients(p)
    return ops.masked_affine(grad, key, p, dims, a, 0.0, 0.0)


#: ``dropkit::alpha_dropout_tensor_rate(x, key, p, broadcast_dims)``: alpha dropout with the rate
#: read from ``p`` at run time; ``a`` and ``b`` come from :func:`alpha_dropout_coefficients` of
#: the value read, so compiled results are the float path's bits.
alpha_dropout_tensor_rate_op = tensor_rate_op(
    "alpha_dropout_tensor_rate", "int[] broadcast_dims", _alpha_forward, _alpha_backward
)


def _alpha_tensor_rate(
    input: torch.Tensor,
    p: torch.Tensor,
    training: bool,
    inplace: bool,
    dims: list[int],
    seed: SeedLike,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not training:
        return input
    key = resolve_key(input, seed, generator)
    return finish(input, alpha_dropout_tensor_rate_op(input, key, p.reshape(()), dims), inplace)


def alpha_dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout of each element; see :class:`dropkit.nn.AlphaDropout`."""
    input = check_common(input, training, inplace)
    p = check_probability(p)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    return _alpha(input, p, training, inplace, dims, seed, generator)


def feature_alpha_dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channels_last: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout of whole channels of ``(N, C, *)`` input; see :class:`dropkit.nn.FeatureAlphaDropout`."""
    input = check_common(input, training, inplace)
    p = check_probability(p)
    spatial = _feature_dims(input, channels_last)
    return _alpha(input, p, training, inplace, spatial, seed, generator)


def _feature_dims(input: torch.Tensor, channels_last: bool) -> list[int]:
    """The dims one channel's draw is shared over (after checking the layout arguments)."""
    check_bool(channels_last, "channels_last")
    layout = "(N, *, C)" if channels_last else "(N, C, *)"
    check_min_rank(input, 2, "feature_alpha_dropout", layout)
    return list(range(1, input.dim() - 1)) if channels_last else list(range(2, input.dim()))


def _alpha_dropout_tensor_rate(
    input: torch.Tensor,
    p: torch.Tensor,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`alpha_dropout` with ``p`` a floating-point tensor of shape ``()`` or ``(1,)``."""
    check_probability_tensor(p)
    if not torch.compiler.is_compiling():
        return alpha_dropout(
            input, float(p), training, inplace, broadcast_dims=broadcast_dims, seed=seed, generator=generator
        )
    input = check_common(input, training, inplace)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    return _alpha_tensor_rate(input, p, training, inplace, dims, seed, generator)


def _feature_alpha_dropout_tensor_rate(
    input: torch.Tensor,
    p: torch.Tensor,
    training: bool = True,
    inplace: bool = False,
    *,
    channels_last: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`feature_alpha_dropout` with ``p`` a floating-point tensor of shape ``()`` or ``(1,)``."""
    check_probability_tensor(p)
    if not torch.compiler.is_compiling():
        return feature_alpha_dropout(
            input, float(p), training, inplace, channels_last=channels_last, seed=seed, generator=generator
        )
    input = check_common(input, training, inplace)
    spatial = _feature_dims(input, channels_last)
    return _alpha_tensor_rate(input, p, training, inplace, spatial, seed, generator)


register_tensor_rate_variant(alpha_dropout, _alpha_dropout_tensor_rate)
register_tensor_rate_variant(feature_alpha_dropout, _feature_alpha_dropout_tensor_rate)
