"""The mask engine: Philox bits, the 16-bit layout, thresholds, keys, streams and independence
from how the work is split."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dropkit
from dropkit._validation import env_flag
from dropkit.engine import streams
from dropkit.engine.masks import (
    keep_mask,
    mask_chunk_counters,
    normal_noise,
    random_bits16,
    threshold_keep_mask,
)
from dropkit.engine.numerics import (
    THRESHOLD_SCALE,
    drop_threshold,
    drop_threshold_tensor,
    realised_drop_probability,
)
from dropkit.engine.philox import philox4x32
from tests.conftest import binomial_tolerance

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_known_answers(
    counter: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]
) -> None:
    words = philox4x32(*(torch.tensor([c]) for c in counter), *(torch.tensor([k]) for k in key))
    assert tuple(int(w) for w in words) == expected


def test_bit_layout_element_j_reads_counter_j_over_8() -> None:
    key = dropkit.make_key(0x0123456789ABCDEF, stream=7, step=3)
    bits = random_bits16(key, 8 * 6)
    counter = torch.tensor([5])
    words = philox4x32(
        counter, torch.tensor([0]), torch.tensor([7]), torch.tensor([3]),
        torch.tensor([0x89ABCDEF]), torch.tensor([0x01234567]),
    )  # fmt: skip
    expected = [part for w in words for part in (int(w) & 0xFFFF, int(w) >> 16)]
    assert bits[40:48].tolist() == expected


def test_threshold_is_exact_to_2_pow_minus_17() -> None:
    for p in [0.0, 1e-7, 1e-5, 0.1, 1 / 3, 0.5, 0.999, 0.99999, 1.0]:
        assert abs(realised_drop_probability(p) - p) <= 2.0**-17
    assert drop_threshold(0.0) == 0
    assert drop_threshold(1.0) == 1 << 16 == THRESHOLD_SCALE


# Rates whose p * 2**16 is a tie (k + 1/2, rounded half to even), just either side of one, the
# ends and ordinary values: a tensor rate must give the float rate's threshold at all of them.
_THRESHOLD_RATES = [
    0.0,
    0.5 / 2**16,
    1.5 / 2**16,
    2.5 / 2**16,
    (3.5 - 1e-9) / 2**16,
    1e-5,
    0.3,
    1 / 3,
    0.999,
    1.0,
]


def test_tensor_rates_give_the_float_threshold_and_mask() -> None:
    key = dropkit.make_key(41, stream=1, step=2)
    for p in _THRESHOLD_RATES:
        threshold = drop_threshold(p)
        for dtype in (torch.float64, torch.float32):
            rate = torch.tensor(p, dtype=torch.float64).to(dtype)
            assert int(drop_threshold_tensor(rate)) == drop_threshold(float(rate)), (p, dtype)
        rate = torch.tensor([p], dtype=torch.float64)  # one element, any shape
        expected = threshold_keep_mask(key, threshold, [3, 37])
        assert torch.equal(keep_mask(key, p, [3, 37]), expected)
        assert torch.equal(keep_mask(key, rate, [3, 37]), expected)
        assert torch.equal(expected, random_bits16(key, 3 * 37).reshape(3, 37) >= threshold)
    assert [drop_threshold(p) for p in _THRESHOLD_RATES[1:5]] == [0, 2, 2, 3]


def test_sixteen_bit_draws_are_uniform() -> None:
    bits = random_bits16(dropkit.make_key(5), 1 << 20)
    assert bits.min() >= 0
    assert bits.max() < 1 << 16
    # Each of the 16 bits is a fair coin: frequency within 6 sigma of 1/2.
    for bit in range(16):
        frequency = ((bits >> bit) & 1).float().mean().item()
        assert abs(frequency - 0.5) <= binomial_tolerance(0.5, bits.numel())


@pytest.mark.parametrize("p", [1e-5, 0.3, 0.999])
def test_realised_rate_of_large_mask(p: float) -> None:
    n = 1 << 22
    keep = keep_mask(dropkit.make_key(17, stream=2, step=9), p, [n])
    rate = 1.0 - keep.float().mean().item()
    exact = realised_drop_probability(p)
    assert abs(rate - exact) <= binomial_tolerance(exact, n) + 1.0 / n


def test_masks_do_not_depend_on_chunking_or_thread_count() -> None:
    key = dropkit.make_key(2024, stream=3, step=1)
    reference = random_bits16(key, 20_003)
    noise = normal_noise(key, [10_007], torch.float32)
    for counters in (3, 7, 1000):
        with mask_chunk_counters(counters):
            assert torch.equal(random_bits16(key, 20_003), reference)
            assert torch.equal(normal_noise(key, [10_007], torch.float32), noise)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert torch.equal(random_bits16(key, 20_003), reference)
    finally:
        torch.set_num_threads(threads)


def test_every_key_word_changes_the_bits() -> None:
    base = random_bits16(dropkit.make_key(1, stream=2, step=3), 4096)
    for other in (
        dropkit.make_key(1 + (1 << 32), stream=2, step=3),  # high word of the seed
        dropkit.make_key(2, stream=2, step=3),
        dropkit.make_key(1, stream=3, step=3),
        dropkit.make_key(1, stream=2, step=4),
    ):
        changed = (random_bits16(other, 4096) != base).float().mean().item()
        assert changed > 0.99  # two independent 16-bit draws agree with probability 2**-16


def test_normal_noise_moments_and_tails() -> None:
    n = 1 << 20
    noise = normal_noise(dropkit.make_key(8), [n], torch.float64)
    assert abs(noise.mean().item()) <= 6.0 / n**0.5
    assert abs(noise.var().item() - 1.0) <= 6.0 * (2.0 / n) ** 0.5
    # Kolmogorov-Smirnov distance to the standard normal CDF, bound far above its 1e-9 quantile.
    ordered = noise.sort().values
    cdf = 0.5 * (1.0 + torch.erf(ordered / 2**0.5))
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - empirical).abs().max().item() <= 4.0 / n**0.5


def test_make_key_validation() -> None:
    assert dropkit.make_key(-1).tolist() == [-1, 0, 0]
    assert dropkit.make_key((1 << 64) - 1).tolist() == [-1, 0, 0]
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\), got 18446744073709551616"):
        dropkit.make_key(1 << 64)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        dropkit.make_key(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"stream must be an int in \[0, 2\*\*32\), got -1"):
        dropkit.make_key(1, stream=-1)
    with pytest.raises(ValueError, match=r"step must be an int in \[0, 2\*\*32\), got 4294967296"):
        dropkit.make_key(1, step=1 << 32)
    with pytest.raises(TypeError, match="seed must be an int, got str"):
        dropkit.manual_seed("7")  # type: ignore[arg-type]


def test_manual_seed_restarts_streams_and_live_steps() -> None:
    dropkit.manual_seed(5)
    first, second = dropkit.nn.Dropout(), dropkit.nn.Dropout()
    assert (first.rng_stream, second.rng_stream) == (0, 1)
    x = torch.ones(64)
    a = first(x)
    dropkit.manual_seed(5)
    assert int(first.rng_step) == 0
    assert torch.equal(first(x), a)
    assert dropkit.nn.Dropout().rng_stream == 0
    assert dropkit.initial_seed() == 5


def test_functional_stream_advances_and_replays() -> None:
    x = torch.ones(256)
    dropkit.manual_seed(3)
    a, b = dropkit.functional.dropout(x), dropkit.functional.dropout(x)
    assert not torch.equal(a, b)
    dropkit.manual_seed(3)
    assert torch.equal(dropkit.functional.dropout(x), a)


def test_step_buffer_follows_to_and_stays_out_of_state_dict() -> None:
    layer = dropkit.nn.Dropout()
    layer.double()  # integer buffers keep their dtype
    assert layer.rng_step.dtype == torch.int64
    assert "rng_step" not in layer.state_dict()
    assert "rng_step" in dict(layer.named_buffers())


_SCRIPT = """
import torch, dropkit
dropkit.manual_seed(11)
model = torch.nn.Sequential(dropkit.nn.Dropout(0.5), dropkit.nn.Dropout2d(0.5))
x = torch.ones(4, 8, 3, 3)
print([int(t) for t in (model(x) != 0).flatten().nonzero().flatten()[:40]])
print([int(t) for t in (model(x) != 0).flatten().nonzero().flatten()[:40]])
"""


def test_same_masks_in_another_process() -> None:
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True)
    dropkit.manual_seed(11)
    model = torch.nn.Sequential(dropkit.nn.Dropout(0.5), dropkit.nn.Dropout2d(0.5))
    x = torch.ones(4, 8, 3, 3)
    here = [[int(t) for t in (model(x) != 0).flatten().nonzero().flatten()[:40]] for _ in range(2)]
    assert out.stdout.split("\n")[:2] == [str(here[0]), str(here[1])]


def test_rank_is_folded_into_the_seed_unless_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(4096)
    dropkit.manual_seed(1)
    rank0 = dropkit.functional.dropout(x, seed=None)
    monkeypatch.setattr(streams, "_distributed_rank", lambda: 1)
    dropkit.manual_seed(1)
    rank1 = dropkit.functional.dropout(x)
    assert not torch.equal(rank0, rank1)
    assert streams.effective_seed() != dropkit.initial_seed()
    dropkit.manual_seed(1)
    with dropkit.share_masks_across_ranks():
        assert dropkit.masks_shared_across_ranks()
        assert torch.equal(dropkit.functional.dropout(x), rank0)
    assert not dropkit.masks_shared_across_ranks()


def test_share_env_var_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROPKIT_SHARE_MASKS_ACROSS_RANKS", "maybe")
    with pytest.raises(
        ValueError, match="DROPKIT_SHARE_MASKS_ACROSS_RANKS must be 0/1/true/false, got 'maybe'"
    ):
        env_flag("DROPKIT_SHARE_MASKS_ACROSS_RANKS")
    monkeypatch.setenv("DROPKIT_SHARE_MASKS_ACROSS_RANKS", "1")
    assert env_flag("DROPKIT_SHARE_MASKS_ACROSS_RANKS")


def test_chunk_size_validation() -> None:
    with pytest.raises(ValueError, match="counters must be a positive int, got 0"), mask_chunk_counters(0):
        pass
