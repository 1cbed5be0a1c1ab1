"""The engine's Philox words from the CPU kernel (:mod:`dropkit.kernels.words`): the same bits as
the tensor-op generator everywhere they are used, and the tensor ops wherever the kernel must not
answer (the reference engine forced, a trace, a transform)."""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import dropkit
from dropkit.engine import masks
from dropkit.kernels import dispatch, words

pytest.importorskip("numba")

KEYS = [
    torch.tensor([0, 0, 0]),
    torch.tensor([-5, 2**40, 2**33 + 7]),  # a negative seed; stream and step past 32 bits
    torch.tensor([2**62 + 11, 3, 1]),
    torch.tensor([-(2**63), -1, -(2**31)]),
]
SPANS = [(0, 1), (5, 1000), (2**32 - 3, 10), (2**40, 33)]  # counters crossing the low word too


def _tensor_op_words(key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...]:
    with dropkit.use_reference_engine():
        return masks.philox_words(key, first, count)


@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
@pytest.mark.parametrize(("first", "count"), SPANS)
def test_kernel_words_are_the_tensor_op_words(key: torch.Tensor, first: int, count: int) -> None:
    got = words.kernel_philox_words(key, first, count)
    assert got is not None, "the CPU kernel did not answer an eager call"
    expected = _tensor_op_words(key, first, count)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == torch.int64
        assert torch.equal(a, b), f"word {index}"
    assert int(torch.stack(got).min()) >= 0
    assert int(torch.stack(got).max()) < 2**32


def test_every_user_of_the_words_gets_the_same_bits() -> None:
    key = KEYS[1]
    fast = [
        masks.normal_noise(key, (37, 19), torch.float32),
        masks.normal_noise(key, (5, 7), torch.float64),
        masks.random_bits32(key, 1001),
        masks.random_bits16(key, 999),
        masks.keep_mask(key, 0.3, (41, 3)),
        masks.keep_mask(key, torch.tensor([0.3], dtype=torch.float64), (41, 3)),
    ]
    with dropkit.use_reference_engine():
        reference = [
            masks.normal_noise(key, (37, 19), torch.float32),
            masks.normal_noise(key, (5, 7), torch.float64),
            masks.random_bits32(key, 1001),
            masks.random_bits16(key, 999),
            masks.keep_mask(key, 0.3, (41, 3)),
            masks.keep_mask(key, torch.tensor([0.3], dtype=torch.float64), (41, 3)),
        ]
    for index, (a, b) in enumerate(zip(fast, reference, strict=True)):
        assert torch.equal(a, b), index


def test_gaussian_layers_match_the_reference_engine() -> None:
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    for make in (lambda: dropkit.nn.GaussianDropout(0.3), lambda: dropkit.nn.GaussianNoise(0.2)):
        dropkit.manual_seed(4)
        fast = make().train()(x)
        dropkit.manual_seed(4)
        with dropkit.use_reference_engine():
            reference = make().train()(x)
        assert torch.equal(fast, reference)


class _Counting:
    """The kernel generator, counting the calls each of its methods answered."""

    def __init__(self) -> None:
        self.answered: collections.Counter[str] = collections.Counter()

    @property
    def calls(self) -> int:
        return sum(self.answered.values())

    def _count(self, method: str, result: Any) -> Any:
        self.answered[method] += result is not None
        return result

    def words(self, key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...] | None:
        return self._count("words", words.KERNEL_GENERATOR.words(key, first, count))

    def threshold_mask(self, key: torch.Tensor, threshold: int, numel: int) -> torch.Tensor | None:
        return self._count("threshold_mask", words.KERNEL_GENERATOR.threshold_mask(key, threshold, numel))

    def box_muller_uniforms(
        self, key: torch.Tensor, first: int, count: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._count(
            "box_muller_uniforms", words.KERNEL_GENERATOR.box_muller_uniforms(key, first, count, dtype)
        )


@pytest.fixture
def counting() -> Iterator[_Counting]:
    spy = _Counting()
    previous = masks.set_fast_generator(spy)
    yield spy
    masks.set_fast_generator(previous)


def test_the_kernel_answers_eager_calls_only(counting: _Counting) -> None:
    key = KEYS[2]
    masks.normal_noise(key, (8,), torch.float32)
    assert counting.calls == 1
    with dropkit.use_reference_engine():
        masks.normal_noise(key, (8,), torch.float32)
    assert counting.calls == 1, "the reference engine was forced"
    # Traced (a fake-tensor key) and transformed calls take the tensor ops.
    compiled = torch.compile(lambda k: masks.normal_noise(k, (8,), torch.float32), backend="aot_eager")
    traced = compiled(key)
    assert counting.calls == 1, "a compiled call used the kernel"
    assert torch.equal(traced, masks.normal_noise(key, (8,), torch.float32))
    batched = torch.func.vmap(lambda k: masks.normal_noise(k, (8,), torch.float32), randomness="same")(
        torch.stack([key, KEYS[3]])
    )
    assert counting.calls == 2, "a vmapped call used the kernel"
    assert torch.equal(batched[0], masks.normal_noise(key, (8,), torch.float32))


def test_first_use_loads_the_kernels_without_waiting_on_their_own_self_check() -> None:
    # The CPU kernels' self-check draws reference masks through philox_words, which asks the
    # kernel backend: that must answer from the tensor ops, not wait on the loading lock.
    dispatch._reset_backends()
    result: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: result.append(masks.normal_noise(KEYS[1], (16,), torch.float32)))
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "loading the kernels deadlocked"
    assert dispatch.loaded_kernels("cpu") is not None
    assert torch.equal(result[0], masks.normal_noise(KEYS[1], (16,), torch.float32))


# --- keep masks from a threshold, compared where the draws lie in the words -------------------

THRESHOLDS = [1, 2, 6554, 32768, 65535]  # the extremes of a partial mask, and p = 0.1, 0.5
NUMELS = [1, 7, 8, 9, 1000, 4099]  # within a counter, at its edge, and past it


@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_kernel_threshold_mask_is_the_tensor_op_mask(key: torch.Tensor, threshold: int) -> None:
    for numel in NUMELS:
        got = words.KERNEL_GENERATOR.threshold_mask(key, threshold, numel)
        assert got is not None, "the CPU kernel did not answer an eager call"
        with dropkit.use_reference_engine():
            expected = masks.random_bits16(key, numel) >= threshold
        assert got.dtype == torch.bool
        assert got.shape == (numel,)
        assert torch.equal(got, expected), numel


def test_threshold_mask_rate_is_the_threshold() -> None:
    # 2**20 draws at p = 0.1: the dropped fraction within 6 sigma of threshold / 2**16.
    numel, threshold = 1 << 20, 6554
    got = words.KERNEL_GENERATOR.threshold_mask(KEYS[2], threshold, numel)
    assert got is not None
    rate = threshold / 2**16
    dropped = 1.0 - float(got.double().mean())
    assert abs(dropped - rate) < 6 * (rate * (1 - rate) / numel) ** 0.5


def test_the_threshold_mask_kernel_answers_eager_calls_only(counting: _Counting) -> None:
    key = KEYS[1]
    eager = masks.threshold_keep_mask(key, 20000, (6, 7))
    assert counting.answered["threshold_mask"] == 1
    with dropkit.use_reference_engine():
        assert torch.equal(masks.threshold_keep_mask(key, 20000, (6, 7)), eager)
    assert counting.calls == 1, "the reference engine was forced"
    compiled = torch.compile(lambda k: masks.threshold_keep_mask(k, 20000, (6, 7)), backend="aot_eager")
    assert torch.equal(compiled(key), eager)
    assert counting.calls == 1, "a compiled call used the kernel"
    batched = torch.func.vmap(lambda k: masks.threshold_keep_mask(k, 20000, (6, 7)), randomness="same")(
        torch.stack([key, KEYS[3]])
    )
    assert counting.calls == 1, "a vmapped call used the kernel"
    assert torch.equal(batched[0], eager)


# --- the Box-Muller uniforms ----------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS, ids=range(len(KEYS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("first", "count"), SPANS)
def test_kernel_uniforms_are_the_tensor_op_uniforms(
    key: torch.Tensor, dtype: torch.dtype, first: int, count: int
) -> None:
    got = words.KERNEL_GENERATOR.box_muller_uniforms(key, first, count, dtype)
    assert got is not None, "the CPU kernel did not answer an eager call"
    with dropkit.use_reference_engine():
        expected = masks.box_muller_uniforms(key, first, count, dtype)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == dtype
        assert a.shape == (count, 2)
        assert a.is_contiguous()
        assert torch.equal(a, b)
        assert float(a.min()) > 0.0
        assert float(a.max()) < 1.0


def test_every_24_bit_uniform_rounds_like_the_tensor_ops() -> None:
    # The kernel rounds (x + 0.5) * 2**-24 once from float64; the tensor ops round x + 0.5 in
    # float32 and scale exactly: equal for every one of the 2**24 values x = w >> 8 can take.
    x = torch.arange(2**24, dtype=torch.int64)
    tensor_ops = (x.to(torch.float32) + 0.5) * 2.0**-24
    once = torch.from_numpy(((x.numpy().astype(np.float64) + 0.5) * 2.0**-24).astype(np.float32))
    assert torch.equal(tensor_ops.view(torch.int32), once.view(torch.int32))


def test_uniforms_only_for_the_dtypes_the_noise_is_computed_in() -> None:
    assert words.KERNEL_GENERATOR.box_muller_uniforms(KEYS[0], 0, 4, torch.bfloat16) is None
    assert words.KERNEL_GENERATOR.box_muller_uniforms(KEYS[0], 0, 0, torch.float32) is None


def test_drop_block_matches_the_reference_engine() -> None:
    x = torch.randn(4, 6, 13, 11, generator=torch.Generator().manual_seed(1), requires_grad=True)
    outputs = []
    for reference in (False, True):
        dropkit.manual_seed(3)
        layer = dropkit.nn.DropBlock2d(0.2, block_size=3).train()
        with dropkit.use_reference_engine() if reference else contextlib.nullcontext():
            y = layer(x)
            (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
        outputs.append((y, grad))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])
    assert 0 < int((outputs[0][0] == 0).sum()) < x.numel()
