"""The shortcuts of the eager CPU path give the answers of the full path: a forward that autograd
does not record skips the autograd.Function, the kernels take tensors by data pointer, checkpoint
and rank-fold state is read per thread, and the CPU backend checks its own keys."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dropkit
from dropkit import ops
from dropkit.engine import checkpoint, reference, streams
from dropkit.engine.numerics import drop_threshold, inverted_scale
from dropkit.kernels import cpu, dispatch
from dropkit.kernels.dispatch import backend_for

KEY = dropkit.make_key(0x5EED, stream=4, step=9)


def test_a_forward_autograd_does_not_record_gives_the_recorded_values() -> None:
    x = torch.randn(7, 33)
    plain = dropkit.functional.dropout(x, 0.3, seed=KEY)
    recorded = dropkit.functional.dropout(x.clone().requires_grad_(True), 0.3, seed=KEY)
    assert plain.grad_fn is None
    assert not plain.requires_grad
    assert recorded.grad_fn is not None
    assert torch.equal(plain, recorded.detach())
    with torch.no_grad():
        assert torch.equal(dropkit.functional.dropout(x.requires_grad_(True), 0.3, seed=KEY), plain)


def test_a_dual_input_that_does_not_require_grad_keeps_its_tangent() -> None:
    x, tangent = torch.randn(5, 40), torch.randn(5, 40)
    layer = dropkit.nn.Dropout(0.5)
    dropkit.manual_seed(3)
    expected = layer(x)
    dropkit.manual_seed(3)
    with fwAD.dual_level():
        primal, forward = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
    assert forward is not None, "the tangent was dropped"
    assert torch.equal(primal, expected)
    scale = torch.tensor(inverted_scale(0.5), dtype=torch.float32)
    assert torch.equal(forward, torch.where(expected != 0, tangent * scale, torch.zeros(())))


def test_an_input_returned_as_the_output_comes_back_as_a_view() -> None:
    # Gaussian dropout at a tensor rate of 0 computes the identity in the op (a tensor rate is
    # never read outside it): as from autograd.Function.apply, a view of the input, not the input.
    x = torch.randn(4, 6)
    out = ops.gaussian_dropout(x, KEY, torch.zeros((), dtype=torch.float64), [], "p")
    assert out is not x
    assert out._base is x
    assert torch.equal(out, x)


def test_lazy_negations_and_zero_tensors_run_on_the_kernels() -> None:
    z = torch.randn(64, dtype=torch.complex64)
    negated = z.conj().imag  # a real view with the negative bit set
    assert negated.is_neg()
    zeros = torch._efficientzerotensor(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        for x in (negated, zeros):
            got = cpu.masked_affine(x, KEY, drop_threshold(0.5), [], 2.0, 0.0, 0.0)
            expected = reference.masked_affine(
                x.resolve_neg().clone(), KEY, drop_threshold(0.5), [], 2.0, 0.0, 0.0
            )
            assert torch.equal(got, expected)
    assert backend_for("cpu") == dispatch.NUMBA


def test_a_dead_functorch_wrapper_gives_the_plain_tensors_mask() -> None:
    leaked: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        leaked.append(t)
        return t.sum()

    x = torch.randn(3, 50)
    torch.func.grad(keep)(x)
    (dead,) = leaked
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    expected = dropkit.functional.dropout(x, 0.4, seed=KEY)
    assert torch.equal(dropkit.functional.dropout(dead, 0.4, seed=KEY), expected)
    assert torch.equal(dropkit.functional.dropout(dead.requires_grad_(True), 0.4, seed=KEY), expected)


def test_keys_the_cpu_kernels_do_not_take_are_answered_by_the_reference() -> None:
    x = torch.randn(30)
    threshold = drop_threshold(0.5)
    int32_key = KEY.to(torch.int32)
    strided_key = torch.stack([KEY, KEY], 1)[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = dispatch.masked_affine(x, int32_key, threshold, [], 2.0, 0.0, 0.0)
        assert torch.equal(got, reference.masked_affine(x, int32_key, threshold, [], 2.0, 0.0, 0.0))
        assert not strided_key.is_contiguous()
        got = dispatch.masked_affine(x, strided_key, threshold, [], 2.0, 0.0, 0.0)
        assert torch.equal(got, reference.masked_affine(x, KEY, threshold, [], 2.0, 0.0, 0.0))
    assert backend_for("cpu") == dispatch.NUMBA


@contextlib.contextmanager
def _held_open_in_another_thread(
    context: AbstractContextManager[object], inside: Callable[[], object] = lambda: None
) -> Iterator[None]:
    """Enter ``context`` in another thread, run ``inside`` there, and keep the context open
    there while the block runs in this thread."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with context:
            inside()
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(10)
        yield
    finally:
        release.set()
        thread.join()


def test_a_rank_fold_in_one_thread_leaves_the_others_on_the_global_rank() -> None:
    inside: list[int] = []
    with _held_open_in_another_thread(
        streams.rank_fold((3,)), lambda: inside.append(streams.effective_seed())
    ):
        assert streams.effective_seed() == streams.fold_seed(streams.initial_seed(), (0,))
        other: list[int] = []
        fresh = threading.Thread(target=lambda: other.append(streams.effective_seed()))
        fresh.start()
        fresh.join()
        assert other == [streams.initial_seed()]
    assert inside == [streams.fold_seed(streams.initial_seed(), (3,))]


def test_a_replay_in_one_thread_does_not_replay_the_draws_of_another() -> None:
    _, replay = checkpoint.checkpoint_context()  # replays an empty log: any draw there would fail
    layer = dropkit.nn.Dropout(0.5)
    with _held_open_in_another_thread(replay):
        assert checkpoint.open_frames == 1
        steps = [int(layer.rng_step)]
        layer(torch.ones(8))  # a fresh draw here, not a replay of the other thread's log
        steps.append(int(layer.rng_step))
    assert steps[1] == steps[0] + 1
    assert checkpoint.open_frames == 0


def test_a_bias_off_the_cpu_is_refused_without_switching_the_kernels_off() -> None:
    # The kernels read bias and residual through data pointers: another device must never get
    # there (the reference engine raises torch's device error instead).
    x = torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="device"):
            dispatch.bias_dropout_add(x, torch.zeros(8, device="meta"), x, KEY, drop_threshold(0.5), 2.0)
    assert backend_for("cpu") == dispatch.NUMBA
