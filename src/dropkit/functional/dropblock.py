"""DropBlock (Ghiasi et al. 2018) as functions; documentation lives on :mod:`dropkit.nn.dropblock`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as TF

from dropkit._validation import check_bool, check_rank
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import compute_dtype
from dropkit.functional._common import SeedLike, check_common, check_rate, finish, is_zero, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate, RateOp

__all__ = ["drop_block", "drop_block1d", "drop_block2d", "drop_block3d"]

_LETTERS = {1: "L", 2: "HW", 3: "DHW"}


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__} ({block_size!r})")
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def _check_spatial_rank(spatial_rank: object) -> int:
    if isinstance(spatial_rank, bool) or not isinstance(spatial_rank, int):
        raise TypeError(f"spatial_rank must be an int, got {type(spatial_rank).__name__} ({spatial_rank!r})")
    if spatial_rank not in (1, 2, 3):
        raise ValueError(f"spatial_rank must be 1, 2 or 3, got {spatial_rank!r}")
    return spatial_rank


def block_geometry(feature: Sequence[int], block_size: int) -> tuple[list[int], list[int]]:
    """Per-axis block sizes (``block_size`` clamped to each axis) and valid-region (seed) sizes."""
    blocks = [min(block_size, int(size)) for size in feature]
    valid = [int(size) - block + 1 for size, block in zip(feature, blocks, strict=True)]
    return blocks, valid


def seed_rate(p: float, feature: Sequence[int], block_size: int) -> float:
    """The paper's seed probability, per axis for non-square maps, clipped to ``[0, 1]``:
    ``gamma = p / prod(bs_i) * prod(feat_i / (feat_i - bs_i + 1))``."""
    blocks, valid = block_geometry(feature, block_size)
    # A list, not a generator: dynamo cannot trace math.prod over a generator (fullgraph compile).
    gamma = p / math.prod(blocks) * math.prod([size / v for size, v in zip(feature, valid, strict=True)])
    return min(max(gamma, 0.0), 1.0)


def coverage_multiplicities(feature: Sequence[int], block_size: int) -> dict[int, int]:
    """``{n: how many units are covered by exactly n valid seed positions}``.

    Unit ``j`` is dropped when any of the ``n_j`` seeds whose block contains it fires; ``n_j`` is a
    product of per-axis counts (each axis has at most ``block_size`` distinct counts), so the
    multiset is built from at most ``block_size ** rank`` products, whatever the map size.
    """
    blocks, valid = block_geometry(feature, block_size)
    multiplicities = {1: 1}
    for size, block, v in zip(feature, blocks, valid, strict=True):
        axis: dict[int, int] = {}
        for i in range(int(size)):
            count = min(i, v - 1) - max(0, i - block + 1) + 1
            axis[count] = axis.get(count, 0) + 1
        combined: dict[int, int] = {}
        for n, units in multiplicities.items():
            for count, positions in axis.items():
                combined[n * count] = combined.get(n * count, 0) + units * positions
        multiplicities = combined
    return multiplicities


def expected_drop_fraction(gamma: float, multiplicities: dict[int, int]) -> float:
    """Expected fraction of dropped units at seed rate ``gamma``: mean over units of
    ``1 - (1 - gamma) ** n_j``."""
    total = sum(multiplicities.values())
    return sum(units * (1.0 - (1.0 - gamma) ** n) for n, units in multiplicities.items()) / total


# Per geometry (feature shape, block size): the last rate asked for and its seed rate.  One entry
# per geometry, so a rate schedule replaces entries instead of growing the cache.
_EXACT_SEED_RATES: dict[tuple[tuple[int, ...], int], tuple[float, float]] = {}


def exact_seed_rate(p: float, feature: Sequence[int], block_size: int) -> float:
    """The seed rate whose expected fraction of dropped units is exactly ``p``.

    The paper's ``gamma`` counts overlapping blocks twice, so it realises slightly less than
    ``p`` (0.094 for p = 0.1, block 7 on 32 x 32).  The exact rate solves
    :func:`expected_drop_fraction` ``= p`` by bisection (the fraction rises monotonically from 0
    at gamma = 0 to 1 at gamma = 1, since every unit is covered by at least one seed).
    """
    geometry = (tuple(int(size) for size in feature), block_size)
    cached = _EXACT_SEED_RATES.get(geometry)
    if cached is not None and cached[0] == p:
        return cached[1]
    multiplicities = coverage_multiplicities(feature, block_size)
    low, high = 0.0, 1.0
    for _ in range(64):
        middle = 0.5 * (low + high)
        if expected_drop_fraction(middle, multiplicities) < p:
            low = middle
        else:
            high = middle
    gamma = 0.5 * (low + high)
    _EXACT_SEED_RATES[geometry] = (p, gamma)  # run by the op on real values, never while tracing
    return gamma


def _sliding_max(t: torch.Tensor, dim: int, window: int) -> torch.Tensor:
    """The maximum of every ``window`` consecutive elements along ``dim`` (stride 1): the size
    along ``dim`` shrinks by ``window - 1``.

    Windows double by comparing two shifted views (``[i, i + 2w)`` is ``[i, i + w)`` and
    ``[i + w, i + 2w)``), and one last overlapping pair reaches ``window``: about ``log2(window)``
    element-wise maxima instead of a pooling kernel (torch's CPU ``max_pool`` takes ~20x longer
    on a map of 0/1 seeds)."""
    width = 1
    while 2 * width <= window:
        length = t.shape[dim] - width
        t = torch.maximum(t.narrow(dim, 0, length), t.narrow(dim, width, length))
        width *= 2
    if width < window:  # window - width <= width: [i, i + width) and [i + shift, i + window) overlap
        shift = window - width
        length = t.shape[dim] - shift
        t = torch.maximum(t.narrow(dim, 0, length), t.narrow(dim, shift, length))
    return t


def _block_drops(seeds: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """uint8 drop map (1 = dropped) of shape ``(M, *feature)`` from seeds ``(*lead, *valid)``;
    see :func:`block_keep_mask`."""
    valid = seeds.shape[seeds.dim() - len(blocks) :]
    # One byte per seed: the maxima are exact on 0/1 and move a quarter of float32's bytes.
    flat = seeds.reshape(-1, *valid).to(torch.uint8)
    padding: list[int] = []
    for block in reversed(blocks):  # F.pad lists the last axis first
        padding += [block - 1, block - 1]
    dropped = TF.pad(flat, padding) if any(padding) else flat
    for axis, block in enumerate(blocks, start=1):
        dropped = _sliding_max(dropped, axis, block)
    return dropped


def block_keep_mask(seeds: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """Float32 keep mask (1 = kept) of shape ``(*lead, *feature)`` from a seed map ``(*lead, *valid)``.

    A seed at valid position ``i`` drops ``[i, i + bs)`` on every axis, so blocks never hang off
    the map: padding ``bs - 1`` zeros on both sides of each axis and taking the maximum over
    every window of ``bs`` (stride 1) gives, at output ``j``, the maximum over seeds
    ``j - bs + 1 .. j``; the output size is ``valid + 2 (bs - 1) - bs + 1 = feature`` for odd
    and even ``bs`` alike.
    """
    lead = seeds.shape[: seeds.dim() - len(blocks)]
    dropped = _block_drops(seeds, blocks)
    return (dropped == 0).to(torch.float32).reshape(*lead, *dropped.shape[1:])


def _check_options(
    input: torch.Tensor,
    block_size: object,
    spatial_rank: object,
    channels_last: object,
    shared_channels: object,
    per_sample_renorm: object,
    exact_rate: object,
) -> int:
    """Check the options and the input's rank; returns the spatial rank."""
    _check_block_size(block_size)
    rank = _check_spatial_rank(spatial_rank)
    check_bool(channels_last, "channels_last")
    check_bool(shared_channels, "shared_channels")
    check_bool(per_sample_renorm, "per_sample_renorm")
    check_bool(exact_rate, "exact_rate")
    letters = ", ".join(_LETTERS[rank])
    layout = f"(N, {letters}, C)" if channels_last else f"(N, C, {letters})"
    check_rank(input, (rank + 2, rank + 1), f"drop_block{rank}d", f"{layout} or unbatched")
    return rank


def drop_block(
    input: torch.Tensor,
    p: Rate = 0.1,
    training: bool = True,
    inplace: bool = False,
    *,
    block_size: int = 7,
    spatial_rank: int = 2,
    channels_last: bool = False,
    shared_channels: bool = False,
    per_sample_renorm: bool = False,
    exact_rate: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop contiguous ``block_size`` blocks of feature maps; see :class:`dropkit.nn.dropblock.DropBlock2d`.

    ``input`` is ``(N, C, *spatial)`` or unbatched ``(C, *spatial)`` with ``spatial_rank`` spatial
    axes (``(N, *spatial, C)`` with ``channels_last``); ``seed`` (an int or a key from
    :func:`dropkit.make_key`) or ``generator`` fix the mask for this call.
    """
    input = check_common(input, training, inplace)
    p = check_rate(p)
    _check_options(
        input, block_size, spatial_rank, channels_last, shared_channels, per_sample_renorm, exact_rate
    )
    check_seed(seed, generator)
    if not training or is_zero(p) or input.numel() == 0:
        return input
    key = resolve_key(input, seed, generator)
    output = _drop_block(
        input,
        key,
        p,
        block_size,
        spatial_rank,
        channels_last,
        shared_channels,
        per_sample_renorm,
        exact_rate,
        "p",
    )
    return finish(input, output, inplace)


def _drop_block_forward(
    input: torch.Tensor,
    key: torch.Tensor,
    p: float,
    block_size: int,
    rank: int,
    channels_last: bool,
    shared_channels: bool,
    per_sample_renorm: bool,
    exact_rate: bool,
) -> torch.Tensor:
    # Run by the op with the rate it read, so gamma (the paper's formula, or the bisection of
    # exact_rate) is computed by the same float arithmetic eagerly and in a compiled graph.
    if p == 0.0:
        return input
    if p == 1.0:
        return torch.zeros_like(input)
    batched = input.dim() == rank + 2
    x = input if batched else input.unsqueeze(0)
    if channels_last:
        x = x.movedim(-1, 1)
    n, c, *feature = x.shape
    blocks, valid = block_geometry(feature, block_size)
    gamma = exact_seed_rate(p, feature, block_size) if exact_rate else seed_rate(p, feature, block_size)
    seeds = ~keep_mask(key, gamma, [n, 1 if shared_channels else c, *valid])
    compute = compute_dtype(input.dtype)
    keep = (_block_drops(seeds, blocks) == 0).reshape(seeds.shape[0], seeds.shape[1], *feature)

    # Exact integer counts (a bool sum straight to float64 is ~20x slower on the CPU).
    if per_sample_renorm:
        kept = keep.sum(dim=tuple(range(1, keep.dim())), keepdim=True).to(torch.float64)
        count = keep[0].numel()
    else:
        kept = torch.count_nonzero(keep).to(torch.float64)
        count = keep.numel()
    # All dropped (kept == 0) gives scale 0, never a division by zero (and keep is all False).
    scale = torch.where(kept > 0, count / kept.clamp_min(1.0), torch.zeros_like(kept)).to(compute)
    # where (not x * 0) so that dropped units are exact zeros even for inf / NaN input.
    zero = torch.zeros((), dtype=compute, device=x.device)
    output = torch.where(keep, x.to(compute) * scale, zero).to(input.dtype)
    if channels_last:
        output = output.movedim(1, -1)
    if not batched:
        output = output.squeeze(0)
    return output


#: ``dropkit::drop_block(x, key, rate, block_size, spatial_rank, channels_last, shared_channels,
#: per_sample_renorm, exact_rate, rate_name)``: ``y = x * factor(mask)``, linear in ``x``, so the
#: gradient is the same op on ``dy``.
_drop_block = RateOp(
    "drop_block",
    "int block_size, int spatial_rank, bool channels_last, bool shared_channels, "
    "bool per_sample_renorm, bool exact_rate",
    _drop_block_forward,
)


def _ranked(rank: int, layout: str) -> Callable[..., torch.Tensor]:
    def drop_block_ranked(
        input: torch.Tensor,
        p: Rate = 0.1,
        training: bool = True,
        inplace: bool = False,
        *,
        block_size: int = 7,
        channels_last: bool = False,
        shared_channels: bool = False,
        per_sample_renorm: bool = False,
        exact_rate: bool = False,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return drop_block(
            input,
            p,
            training,
            inplace,
            block_size=block_size,
            spatial_rank=rank,
            channels_last=channels_last,
            shared_channels=shared_channels,
            per_sample_renorm=per_sample_renorm,
            exact_rate=exact_rate,
            seed=seed,
            generator=generator,
        )

    name = f"drop_block{rank}d"
    drop_block_ranked.__name__ = drop_block_ranked.__qualname__ = name
    drop_block_ranked.__doc__ = f"DropBlock on {layout}; see :class:`dropkit.nn.dropblock.DropBlock{rank}d`."
    return drop_block_ranked


drop_block1d = _ranked(1, "``(N, C, L)`` / ``(C, L)``")
drop_block2d = _ranked(2, "``(N, C, H, W)`` / ``(C, H, W)``")
drop_block3d = _ranked(3, "``(N, C, D, H, W)`` / ``(C, D, H, W)``")
