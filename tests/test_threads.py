"""Concurrent callers: every eager call draws its own key, so threads never reuse a mask.

A thread switch between reading a layer's step and advancing it would hand two calls the same
step (the same mask).  With 4 threads of 100 calls, a race shows up as fewer than 400 distinct
masks or a step below 400; before the draw was made atomic this run gave 306-333.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

import dropkit

THREADS = 4
CALLS = 100


def _run_concurrently(call: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def work() -> None:
        start.wait()
        local = [call() for _ in range(CALLS)]
        with lock:
            outputs.extend(local)

    workers = [threading.Thread(target=work) for _ in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return outputs


@pytest.fixture
def frequent_switches() -> Iterator[None]:
    # Switch threads as often as the interpreter allows, so that a race cannot hide.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield None
    sys.setswitchinterval(previous)


def _distinct(outputs: list[torch.Tensor]) -> int:
    # 256 elements at p = 0.3: two independent masks coincide with probability < 2**-200.
    return len({tuple(output.tolist()) for output in outputs})


@pytest.mark.usefixtures("frequent_switches")
def test_a_layer_called_from_threads_draws_a_fresh_mask_per_call() -> None:
    dropkit.manual_seed(0)
    layer = dropkit.nn.Dropout(0.3)
    x = torch.ones(256)
    outputs = _run_concurrently(lambda: layer(x))
    assert _distinct(outputs) == THREADS * CALLS
    assert int(layer.rng_step) == THREADS * CALLS


@pytest.mark.usefixtures("frequent_switches")
def test_functional_calls_without_a_seed_from_threads_draw_fresh_masks() -> None:
    dropkit.manual_seed(0)
    x = torch.ones(256)
    outputs = _run_concurrently(lambda: dropkit.functional.dropout(x, 0.3))
    assert _distinct(outputs) == THREADS * CALLS


@pytest.mark.usefixtures("frequent_switches")
def test_threads_draw_exactly_the_masks_of_the_steps_they_took() -> None:
    # The set of masks equals the sequential run's: each step 0..399 is drawn exactly once.
    dropkit.manual_seed(0)
    layer = dropkit.nn.Dropout(0.3)
    x = torch.ones(256)
    concurrent = {tuple(output.tolist()) for output in _run_concurrently(lambda: layer(x))}
    layer.reset_rng_step()
    sequential = {tuple(layer(x).tolist()) for _ in range(THREADS * CALLS)}
    assert concurrent == sequential
