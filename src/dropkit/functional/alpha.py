"""Alpha dropout for self-normalizing (SELU) networks; documentation lives on the modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dropkit import ops
from dropkit._validation import check_bool, check_min_rank, normalize_dims
from dropkit.engine.numerics import SELU_ALPHA_PRIME as SELU_ALPHA_PRIME
from dropkit.engine.numerics import alpha_dropout_coefficients as alpha_dropout_coefficients
from dropkit.functional._common import SeedLike, check_common, check_rate, finish, passes_through, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate

__all__ = ["SELU_ALPHA_PRIME", "alpha_dropout", "alpha_dropout_coefficients", "feature_alpha_dropout"]


def _alpha(
    input: torch.Tensor,
    p: Rate,
    training: bool,
    inplace: bool,
    dims: list[int],
    seed: SeedLike,
    generator: torch.Generator | None,
) -> torch.Tensor:
    # The constants (a, b, a * alpha' + b) come from the rate the op reads; at p = 1 they are
    # zeros (the correction diverges): the defined output, never NaN, even for inf input.
    if passes_through(input, training, p):
        check_seed(seed, generator)  # a bad seed is refused where nothing is drawn too
        return input
    key = resolve_key(input, seed, generator)
    return finish(input, ops.masked_affine(input, key, p, dims, "alpha", "p"), inplace)


def alpha_dropout(
    input: torch.Tensor,
    p: Rate = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout of each element; see :class:`dropkit.nn.AlphaDropout`."""
    input = check_common(input, training, inplace, floating=False)
    p = check_rate(p)
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    return _alpha(input, p, training, inplace, dims, seed, generator)


def feature_alpha_dropout(
    input: torch.Tensor,
    p: Rate = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    channels_last: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Alpha dropout of whole channels of ``(N, C, *)`` input; see :class:`dropkit.nn.FeatureAlphaDropout`."""
    input = check_common(input, training, inplace, floating=False)
    p = check_rate(p)
    spatial = _feature_dims(input, channels_last)
    return _alpha(input, p, training, inplace, spatial, seed, generator)


def _feature_dims(input: torch.Tensor, channels_last: bool) -> list[int]:
    """The dims one channel's draw is shared over (after checking the layout arguments)."""
    check_bool(channels_last, "channels_last")
    layout = "(N, *, C)" if channels_last else "(N, C, *)"
    check_min_rank(input, 2, "feature_alpha_dropout", layout)
    return list(range(1, input.dim() - 1)) if channels_last else list(range(2, input.dim()))
