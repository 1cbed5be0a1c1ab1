"""DropBlock (Ghiasi et al. 2018): realised drop rate, block geometry, renormalisation, layouts,
determinism, autograd and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from dropkit.engine.numerics import realised_drop_probability
from dropkit.functional.dropblock import (
    block_geometry,
    block_keep_mask,
    coverage_multiplicities,
    drop_block,
    drop_block1d,
    drop_block2d,
    drop_block3d,
    exact_seed_rate,
    expected_drop_fraction,
    seed_rate,
)
from dropkit.nn.dropblock import DropBlock1d, DropBlock2d, DropBlock3d

SIGMAS = 6.0
FUNCTIONALS = {1: drop_block1d, 2: drop_block2d, 3: drop_block3d}
MODULES = {1: DropBlock1d, 2: DropBlock2d, 3: DropBlock3d}


def _coverage_counts(feature: list[int], block_size: int) -> torch.Tensor:
    """n_j: how many valid seed positions drop unit j (product over axes of the 1-D counts)."""
    blocks, valid = block_geometry(feature, block_size)
    counts = torch.ones(())
    for size, block, v in zip(feature, blocks, valid, strict=True):
        j = torch.arange(size, dtype=torch.float64)
        axis = torch.minimum(j, torch.tensor(v - 1.0)) - torch.clamp(j - block + 1, min=0) + 1
        counts = counts.unsqueeze(-1) * axis
    return counts


# (p, block_size, feature, batch, channels): odd and even blocks, non-square maps, a block larger
# than one axis (clamped), and all three ranks.
RATE_CASES = [
    (0.1, 7, [32, 32], 64, 16),
    (0.2, 4, [17, 23], 16, 32),
    (0.1, 7, [5, 20], 64, 64),
    (0.3, 6, [40], 64, 64),
    (0.15, 2, [6, 7, 8], 16, 16),
]


@pytest.mark.parametrize(("p", "block_size", "feature", "batch", "channels"), RATE_CASES)
def test_realised_drop_rate_matches_p(
    p: float, block_size: int, feature: list[int], batch: int, channels: int
) -> None:
    rank = len(feature)
    x = torch.ones(batch, channels, *feature)
    dropped = float((FUNCTIONALS[rank](x, p, block_size=block_size, seed=11) == 0).double().mean())

    blocks, valid = block_geometry(feature, block_size)
    gamma = realised_drop_probability(seed_rate(p, feature, block_size))  # the engine's exact rate
    counts = _coverage_counts(feature, block_size)
    # Exact expectation: unit j is dropped unless none of its n_j covering seeds fires.
    expected = float((1.0 - (1.0 - gamma) ** counts).mean())
    # gamma is chosen so that gamma * mean(n_j) = p (up to the 2**-16 quantisation of gamma); blocks
    # may overlap, so the realised rate is p minus at most the pair term mean(C(n_j, 2)) gamma**2.
    quantisation = 2.0**-17 * float(counts.mean())
    assert abs(gamma * float(counts.mean()) - p) <= quantisation + 1e-12
    overlap = float((counts * (counts - 1) / 2).mean()) * gamma**2
    assert p - overlap - quantisation <= expected <= p + quantisation

    # Tolerance. Units are NOT independent draws: one seed zeroes up to B = prod(bs_i) units, so
    # the count Z of dropped units is a function of S independent Bernoulli(gamma) seeds (S = seed
    # positions over all samples and channels). Resampling one seed changes Z by at most B, and
    # only when the new draw differs (probability 2 gamma (1 - gamma)), so by the Efron-Stein
    # inequality Var(Z) <= 1/2 * S * 2 gamma (1 - gamma) * B**2, the variance of B * Binomial(S,
    # gamma): an upper bound (overlaps only shrink it). The observed fraction Z / M (M units) thus
    # has sd <= B sqrt(S gamma (1 - gamma)) / M, and we allow SIGMAS of those.
    block_volume = math.prod(blocks)
    n_seeds = batch * channels * math.prod(valid)
    n_units = batch * channels * math.prod(feature)
    tolerance = SIGMAS * block_volume * math.sqrt(n_seeds * gamma * (1.0 - gamma)) / n_units
    assert tolerance < p / 5, "the case is too small to say anything"
    assert abs(dropped - expected) <= tolerance, (dropped, expected, tolerance)


@pytest.mark.parametrize(("p", "block_size", "feature", "batch", "channels"), RATE_CASES)
def test_exact_rate_realises_p(
    p: float, block_size: int, feature: list[int], batch: int, channels: int
) -> None:
    rank = len(feature)
    counts = _coverage_counts(feature, block_size)
    multiplicities = coverage_multiplicities(feature, block_size)
    # The multiset equals the brute-force per-unit counts.
    values, frequencies = torch.unique(counts, return_counts=True)
    assert multiplicities == {int(v): int(f) for v, f in zip(values, frequencies, strict=True)}
    gamma = exact_seed_rate(p, feature, block_size)
    assert abs(expected_drop_fraction(gamma, multiplicities) - p) < 1e-12
    assert gamma > seed_rate(p, feature, block_size), "the paper's gamma undershoots when blocks overlap"

    x = torch.ones(batch, channels, *feature)
    dropped = float(
        (FUNCTIONALS[rank](x, p, block_size=block_size, exact_rate=True, seed=11) == 0).double().mean()
    )
    blocks, valid = block_geometry(feature, block_size)
    realised = realised_drop_probability(gamma)  # the engine quantises gamma to 2**-16
    # d(fraction)/d(gamma) <= mean(n_j): the quantisation moves the expectation by at most this.
    quantisation = abs(realised - gamma) * float(counts.mean())
    n_seeds = batch * channels * math.prod(valid)
    n_units = batch * channels * math.prod(feature)
    tolerance = SIGMAS * math.prod(blocks) * math.sqrt(n_seeds * realised * (1.0 - realised)) / n_units
    assert tolerance < p / 5
    assert abs(dropped - p) <= tolerance + quantisation, (dropped, p, tolerance)
    module = MODULES[rank](p, block_size=block_size, exact_rate=True)
    assert "exact_rate=True" in repr(module)
    assert torch.equal(
        module(x, seed=11), FUNCTIONALS[rank](x, p, block_size=block_size, exact_rate=True, seed=11)
    )


@pytest.mark.parametrize(
    ("block_size", "feature", "seed_at"),
    [
        (3, [9, 11], (0, 0)),
        (4, [9, 11], (5, 7)),
        (4, [9, 11], (2, 3)),
        (2, [5, 6], (3, 4)),
        (1, [4, 5], (3, 4)),
        (7, [5, 9], (0, 2)),
    ],
)
def test_single_seed_drops_exactly_one_block_inside_the_map(
    block_size: int, feature: list[int], seed_at: tuple[int, int]
) -> None:
    blocks, valid = block_geometry(feature, block_size)
    seeds = torch.zeros(1, 1, *valid, dtype=torch.bool)
    seeds[0, 0, seed_at[0], seed_at[1]] = True
    mask = block_keep_mask(seeds, blocks)
    assert mask.shape == (1, 1, *feature)
    expected = torch.ones(feature)
    (i, j), (bh, bw) = seed_at, blocks
    expected[i : i + bh, j : j + bw] = 0.0
    assert torch.equal(mask[0, 0], expected)
    assert int((mask == 0).sum()) == bh * bw


@pytest.mark.parametrize(("block_size", "feature"), [(4, [6]), (3, [5, 7, 4])])
def test_single_seed_geometry_in_1d_and_3d(block_size: int, feature: list[int]) -> None:
    blocks, valid = block_geometry(feature, block_size)
    last = tuple(v - 1 for v in valid)
    seeds = torch.zeros(valid, dtype=torch.bool)
    seeds[last] = True
    mask = block_keep_mask(seeds, blocks)
    expected = torch.ones(feature)
    expected[tuple(slice(v - 1, v - 1 + b) for v, b in zip(valid, blocks, strict=True))] = 0.0
    assert torch.equal(mask, expected)


@pytest.mark.parametrize(("block_size", "feature"), [(3, [16, 16]), (4, [13, 18]), (6, [20, 9])])
def test_dropped_region_is_a_union_of_whole_blocks(block_size: int, feature: list[int]) -> None:
    y = drop_block2d(torch.ones(4, 6, *feature), 0.3, block_size=block_size, seed=2)
    dropped = (y == 0).double().reshape(-1, 1, *feature)
    assert 0 < int(dropped.sum()) < dropped.numel()
    blocks, _ = block_geometry(feature, block_size)
    # Every valid position whose whole block lies in the dropped set; their blocks must rebuild it.
    full = torch.nn.functional.avg_pool2d(dropped, tuple(blocks), stride=1) > 1 - 1e-9
    rebuilt = block_keep_mask(full.reshape(4, 6, *full.shape[-2:]), blocks) == 0
    assert torch.equal(rebuilt, (y == 0))


def test_channels_draw_independent_masks_unless_shared() -> None:
    x = torch.ones(256, 2, 12, 12)
    own = drop_block2d(x, 0.3, block_size=3, seed=4) == 0
    rate0, rate1 = own[:, 0].double().mean(), own[:, 1].double().mean()
    both = (own[:, 0] & own[:, 1]).double().mean()
    assert not torch.equal(own[:, 0], own[:, 1])
    # Independent channels: P(both) = P0 P1 (loose bound; the pair rate is about 0.07).
    assert abs(float(both - rate0 * rate1)) < 0.02
    shared = drop_block2d(x, 0.3, block_size=3, shared_channels=True, seed=4) == 0
    assert torch.equal(shared[:, 0], shared[:, 1])
    assert not torch.equal(shared[0], shared[1]), "samples still differ"


def test_renormalisation_preserves_the_mean() -> None:
    x = torch.full((4, 3, 12, 12), 2.5, dtype=torch.float64)
    y = drop_block2d(x, 0.3, block_size=3, seed=1)
    assert torch.isclose(y.mean(), x.mean())
    per_sample = drop_block2d(x, 0.3, block_size=3, per_sample_renorm=True, seed=1)
    assert torch.allclose(per_sample.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    assert torch.equal(per_sample == 0, y == 0), "same seed, same mask"

    # Random input, many draws: the average output keeps the mean of x.
    x = torch.rand(4, 4, 12, 12, dtype=torch.float64) + 0.5
    draws = torch.stack([drop_block2d(x, 0.2, block_size=3, seed=s) for s in range(200)])
    assert abs(float(draws.mean() - x.mean())) < 0.01 * float(x.mean())
    channel_means = draws.mean(dim=(0, 3, 4))
    assert torch.allclose(channel_means, x.mean(dim=(2, 3)), rtol=0.03)


def test_a_map_dropped_whole_by_one_seed_gives_zeros_never_nan() -> None:
    # p < 1 but a 7x7 map with 7x7 blocks has one seed, fired with probability gamma = 0.9.
    inf = torch.full((2, 1, 7, 7), math.inf)
    hits = []
    for s in range(64):
        out = drop_block2d(inf, 0.9, block_size=7, per_sample_renorm=True, seed=s)
        assert not out.isnan().any()
        hits.append((out == 0).all(dim=(1, 2, 3)))
        whole = drop_block2d(inf, 0.9, block_size=7, seed=s)
        assert not whole.isnan().any()
    dropped = torch.stack(hits)
    assert dropped.all(dim=1).any(), "some draw drops everything"
    assert (dropped[:, 0] != dropped[:, 1]).any(), "some draw drops one sample only"


def test_empty_input_is_returned_as_is() -> None:
    empty = torch.ones(0, 3, 8, 8)
    assert drop_block2d(empty, 0.3) is empty


def test_modules_of_every_rank_match_the_generic_functional() -> None:
    for rank, shape in ((1, (2, 3, 20)), (3, (2, 3, 5, 6, 7))):
        x = torch.randn(shape)
        y = MODULES[rank](0.2, block_size=3, shared_channels=True)(x, seed=1)
        ref = drop_block(x, 0.2, block_size=3, spatial_rank=rank, shared_channels=True, seed=1)
        assert torch.equal(y, ref)


@pytest.mark.parametrize(("rank", "shape"), [(1, (3, 4, 20)), (2, (3, 4, 9, 10)), (3, (3, 4, 5, 6, 7))])
def test_channels_last_and_unbatched_layouts(rank: int, shape: tuple[int, ...]) -> None:
    fn = FUNCTIONALS[rank]
    x = torch.randn(shape)
    first = fn(x, 0.3, block_size=2, seed=3)
    last = fn(x.movedim(1, -1), 0.3, block_size=2, channels_last=True, seed=3)
    assert torch.equal(last, first.movedim(1, -1))
    one = fn(x[:1], 0.3, block_size=2, seed=3)
    assert torch.equal(fn(x[0], 0.3, block_size=2, seed=3), one[0])
    assert torch.equal(
        fn(x[0].movedim(0, -1), 0.3, block_size=2, channels_last=True, seed=3), one[0].movedim(0, -1)
    )


def test_gradcheck_with_per_sample_renormalisation() -> None:
    x = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: drop_block1d(t, 0.3, block_size=2, per_sample_renorm=True, seed=5), (x,)
    )


def test_extra_repr() -> None:
    assert repr(DropBlock2d()) == "DropBlock2d(p=0.1, inplace=False, block_size=7)"
    m = DropBlock1d(0.2, block_size=3, channels_last=True, shared_channels=True, per_sample_renorm=True)
    assert repr(m) == (
        "DropBlock1d(p=0.2, inplace=False, block_size=3, channels_last=True, shared_channels=True, "
        "per_sample_renorm=True)"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"block_size": 0}, ValueError, r"block_size must be a positive int, got 0"),
        ({"block_size": -3}, ValueError, r"block_size must be a positive int, got -3"),
        ({"block_size": True}, TypeError, r"block_size must be an int, got bool \(True\)"),
        ({"block_size": 3.0}, TypeError, r"block_size must be an int, got float \(3.0\)"),
        ({"spatial_rank": 4}, ValueError, r"spatial_rank must be 1, 2 or 3, got 4"),
        ({"spatial_rank": True}, TypeError, r"spatial_rank must be an int"),
        ({"channels_last": 1}, TypeError, r"channels_last must be a bool"),
        ({"shared_channels": None}, TypeError, r"shared_channels must be a bool"),
        ({"per_sample_renorm": "yes"}, TypeError, r"per_sample_renorm must be a bool"),
        ({"seed": torch.zeros(2)}, ValueError, r"int64 key"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        drop_block(torch.ones(2, 3, 8, 8), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rank", "shape", "message"),
    [
        (
            1,
            (2, 3, 4, 5),
            r"drop_block1d expects 3-D or 2-D input \(N, C, L\).*got 4-D input of shape \(2, 3, 4, 5\)",
        ),
        (2, (2, 3), r"drop_block2d expects 4-D or 3-D input \(N, C, H, W\).*got 2-D input of shape \(2, 3\)"),
        (3, (2, 3, 4), r"drop_block3d expects 5-D or 4-D input \(N, C, D, H, W\).*got 3-D"),
    ],
)
def test_wrong_rank_names_the_shape(rank: int, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FUNCTIONALS[rank](torch.ones(shape))
    with pytest.raises(ValueError, match=message):
        MODULES[rank]()(torch.ones(shape))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        drop_block2d(torch.ones(2, 3), channels_last=True)


def test_bad_inputs_and_module_arguments() -> None:
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        DropBlock2d(0.1, block_size=0)
    with pytest.raises(TypeError, match=r"block_size must be an int, got float \(7.5\)"):
        DropBlock3d(0.1, block_size=7.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"inplace must be a bool, got float \(7.5\)"):
        DropBlock3d(0.1, 7.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="shared_channels must be a bool"):
        DropBlock2d(shared_channels=1)  # type: ignore[arg-type]
