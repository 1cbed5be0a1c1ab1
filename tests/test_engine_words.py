"""The engine's Philox words from the CPU kernel (:mod:`dropkit.kernels.words`): the same bits as
the tensor-op generator everywhere they are used, and the tensor ops wherever the kernel must not
answer (the reference engine forced, a trace, a transform)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

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
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...] | None:
        result = words.kernel_philox_words(key, first, count)
        self.calls += result is not None
        return result


@pytest.fixture
def counting() -> Iterator[_Counting]:
    spy = _Counting()
    previous = masks.set_philox_words_backend(spy)
    yield spy
    masks.set_philox_words_backend(previous)


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
