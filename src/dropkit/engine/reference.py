"""The reference backend: dropkit's mask ops in plain tensor code, the ground truth of every kernel.

It implements the :class:`dropkit.kernels.Backend` protocol (``masked_affine`` and
``bias_dropout_add``, rates as integer thresholds and float constants) on any device, and the
Gaussian ops that only it implements.  The fused kernels (numba on CPU, Triton on CUDA)
reproduce these functions bit for bit: float32 arithmetic (float64 for float64 inputs),
constants rounded once to that dtype, one rounding to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dropkit.engine.masks import mask_shape, normal_noise, threshold_keep_mask
from dropkit.engine.numerics import compute_dtype

__all__ = ["bias_dropout_add", "gaussian_scale", "gaussian_shift", "masked_affine", "name"]

name = "reference"


def _store_like(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to ``x.dtype`` in a fresh tensor with ``x``'s memory layout."""
    out = torch.empty_like(x)
    out.copy_(values)
    return out


def _constant(value: float, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=compute_dtype(x.dtype), device=x.device)


def masked_affine(
    x: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    broadcast_dims: Sequence[int],
    keep_scale: float,
    keep_shift: float,
    drop_value: float,
) -> torch.Tensor:
    """``where(keep, x * keep_scale + keep_shift, drop_value)``, ``keep`` the mask of ``threshold``."""
    keep = threshold_keep_mask(key, threshold, mask_shape(x.shape, broadcast_dims))
    kept = x.to(compute_dtype(x.dtype)) * _constant(keep_scale, x)
    if keep_shift != 0.0:
        kept = kept + _constant(keep_shift, x)
    return _store_like(x, torch.where(keep, kept, _constant(drop_value, x)))


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    key: torch.Tensor,
    threshold: int,
    keep_scale: float,
) -> torch.Tensor:
    """``residual + where(keep, (x + bias) * keep_scale, 0)`` with the element mask of ``x``."""
    compute = compute_dtype(x.dtype)
    keep = threshold_keep_mask(key, threshold, list(x.shape))
    kept = (x.to(compute) + bias.to(compute)) * _constant(keep_scale, x)
    dropped = torch.where(keep, kept, _constant(0.0, x))
    return _store_like(x, residual.to(compute) + dropped)


def _noise(x: torch.Tensor, key: torch.Tensor, broadcast_dims: Sequence[int]) -> torch.Tensor:
    return normal_noise(key, mask_shape(x.shape, broadcast_dims), x.dtype)


def gaussian_scale(
    x: torch.Tensor, key: torch.Tensor, sigma: float, broadcast_dims: Sequence[int]
) -> torch.Tensor:
    """``x * (1 + sigma * n)`` with standard normal ``n`` of the key."""
    factor = 1.0 + _constant(sigma, x) * _noise(x, key, broadcast_dims)
    return _store_like(x, x.to(compute_dtype(x.dtype)) * factor)


def gaussian_shift(
    x: torch.Tensor, key: torch.Tensor, std: float, broadcast_dims: Sequence[int]
) -> torch.Tensor:
    """``x + std * n`` with standard normal ``n`` of the key."""
    return _store_like(x, x.to(compute_dtype(x.dtype)) + _constant(std, x) * _noise(x, key, broadcast_dims))
