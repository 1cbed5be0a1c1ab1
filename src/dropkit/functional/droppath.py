"""DropPath (stochastic depth) as a function, and per-block drop-rate schedules.

Documentation of the layer lives on :class:`dropkit.nn.droppath.DropPath`.
"""

from __future__ import annotations

import torch

from dropkit._validation import check_probability, normalize_dims
from dropkit.functional._common import SeedLike, check_common, check_rate
from dropkit.functional._seed import check_seed
from dropkit.functional.dropout import dropout
from dropkit.ops import Rate

__all__ = ["DROP_PATH_MODES", "STOCHASTIC_DEPTH_RULES", "drop_path", "stochastic_depth_rates"]

DROP_PATH_MODES = ("row", "batch")
STOCHASTIC_DEPTH_RULES = ("linear", "linear_from_zero", "uniform")


def check_mode(mode: object) -> str:
    """``mode`` if it is ``"row"`` or ``"batch"``; ValueError naming the value otherwise."""
    if not isinstance(mode, str) or mode not in DROP_PATH_MODES:
        raise ValueError(f"mode must be one of {DROP_PATH_MODES}, got {mode!r}")
    return mode


def check_batch_dim(batch_dim: object) -> int:
    """``batch_dim`` if it is an int (its range is checked per call, against the input's rank)."""
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise TypeError(f"batch_dim must be an int, got {type(batch_dim).__name__} ({batch_dim!r})")
    return batch_dim


def drop_path(
    input: torch.Tensor,
    p: Rate = 0.1,
    training: bool = True,
    inplace: bool = False,
    *,
    mode: str = "row",
    batch_dim: int = 0,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zero whole samples (``mode="row"``) or the whole tensor (``mode="batch"``) with
    probability ``p``, scaling what is kept by ``1 / (1 - p)``; see
    :class:`dropkit.nn.droppath.DropPath`.

    Row mode makes one draw per index along ``batch_dim``, shared over every other dim; batch
    mode makes a single draw.  The mask comes from the engine's ``masked_affine`` op, so backward
    keeps only the 3-word key.  ``p = 1`` gives exact zeros, ``p = 0`` or ``training=False``
    return ``input`` itself.

    Unlike ``timm.layers.drop_path``, whose ``training`` defaults to ``False``, ``training``
    defaults to ``True`` here, like every functional op of dropkit.
    """
    input = check_common(input, training, inplace)
    p = check_rate(p)
    shared = _shared_dims(input, mode, batch_dim)
    check_seed(seed, generator)
    return dropout(input, p, training, inplace, broadcast_dims=shared, seed=seed, generator=generator)


def _shared_dims(input: torch.Tensor, mode: object, batch_dim: object) -> list[int]:
    """The dims one draw is shared over (after checking ``mode`` and ``batch_dim``)."""
    mode = check_mode(mode)
    batch_dim = check_batch_dim(batch_dim)
    if mode == "batch":
        return list(range(input.dim()))
    if input.dim() == 0:
        raise ValueError(
            "drop_path with mode='row' needs at least a 1-D input with a batch dim, got a 0-D "
            "tensor (use mode='batch' to drop a scalar)"
        )
    (batch,) = normalize_dims(batch_dim, input.dim(), "batch_dim")
    return [dim for dim in range(input.dim()) if dim != batch]


def stochastic_depth_rates(num_blocks: int, max_rate: float, *, rule: str = "linear") -> list[float]:
    """Per-block drop rates for stochastic depth, shallowest block first.

    * ``"linear"`` (Huang et al. 2016, "linear decay"): block ``l = 1 .. L`` gets
      ``max_rate * l / L``, so the first block already drops with ``max_rate / L`` and the last
      one with ``max_rate``.
    * ``"linear_from_zero"`` (the convention of timm, ``torch.linspace(0, max_rate, L)``): block
      ``i = 0 .. L-1`` gets ``max_rate * i / (L - 1)``, from ``0`` to ``max_rate``; a single block
      gets ``0``, as in timm.
    * ``"uniform"``: every block gets ``max_rate``.

    Args:
        num_blocks: number of residual blocks ``L``, an int >= 1.
        max_rate: the rate of the deepest block (of every block for ``"uniform"``), in ``[0, 1]``.
        rule: ``"linear"``, ``"linear_from_zero"`` or ``"uniform"``. Default: ``"linear"``

    Examples::

        >>> stochastic_depth_rates(4, 0.5)
        [0.125, 0.25, 0.375, 0.5]
        >>> stochastic_depth_rates(3, 0.2, rule="linear_from_zero")
        [0.0, 0.1, 0.2]
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"num_blocks must be an int, got {type(num_blocks).__name__} ({num_blocks!r})")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    max_rate = check_probability(max_rate, "max_rate")
    if not isinstance(rule, str) or rule not in STOCHASTIC_DEPTH_RULES:
        raise ValueError(f"rule must be one of {STOCHASTIC_DEPTH_RULES}, got {rule!r}")
    if rule == "uniform":
        return [max_rate] * num_blocks
    # min(): max_rate * L / L may round one ulp above max_rate; the deepest block gets it exactly.
    if rule == "linear":
        return [min(max_rate * block / num_blocks, max_rate) for block in range(1, num_blocks + 1)]
    if num_blocks == 1:
        return [0.0]
    return [min(max_rate * block / (num_blocks - 1), max_rate) for block in range(num_blocks)]
