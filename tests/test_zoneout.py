"""Zoneout: functional masks, train/eval semantics, LSTM/GRU/RNN cells, sequences, errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import dropkit
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import realised_drop_probability
from dropkit.functional.zoneout import zoneout, zoneout_states
from dropkit.nn.zoneout import ZoneoutCell
from tests.conftest import binomial_tolerance

CELLS = [nn.LSTMCell, nn.GRUCell, nn.RNNCell]

# --- functional ---------------------------------------------------------------------------------


def test_zoned_out_units_are_the_ones_the_engine_drops() -> None:
    p, n = 0.3, 40_000
    prev, new = torch.randn(n), torch.randn(n)
    h = zoneout(prev, new, p, seed=1)
    assert torch.equal(h == prev, ~keep_mask(dropkit.make_key(1), p, (n,)))


def test_eval_extremes_are_exact() -> None:
    prev = torch.tensor([float("inf"), 1.0])
    new = torch.tensor([2.0, float("inf")])
    assert zoneout(prev, new, 0.0, training=False) is new
    assert zoneout(prev, new, 1.0, training=False) is prev
    assert zoneout(prev, new, 0.0) is new
    assert torch.equal(zoneout(prev, new, 1.0, seed=3), prev)
    torch.testing.assert_close(
        zoneout(torch.ones(3), torch.full((3,), 5.0), 0.3, False), torch.full((3,), 0.3 + 3.5)
    )


def test_states_have_independent_masks_and_their_own_rates() -> None:
    n = 40_000
    zeros, ones = torch.zeros(n), torch.ones(n)
    h, c = zoneout_states((zeros, zeros), (ones, ones), (0.1, 0.6), seed=4)
    for state, p in ((h, 0.1), (c, 0.6)):
        rate = float((state == 0).double().mean())
        assert abs(rate - realised_drop_probability(p)) <= binomial_tolerance(p, n)
    same_rate = zoneout_states((zeros, zeros), (ones, ones), (0.5, 0.5), seed=4)
    assert not torch.equal(same_rate[0], same_rate[1])
    both = (same_rate[0] == 0) & (same_rate[1] == 0)
    assert abs(float(both.double().mean()) - 0.25) <= binomial_tolerance(0.25, n)
    assert torch.equal(
        zoneout_states((zeros,), (ones,), (0.3,), seed=5)[0], zoneout(zeros, ones, 0.3, seed=5)
    )


def test_gradients_flow_to_the_chosen_value() -> None:
    prev = torch.randn(50, dtype=torch.float64, requires_grad=True)
    new = torch.randn(50, dtype=torch.float64, requires_grad=True)
    h = zoneout(prev, new, 0.5, seed=6)
    h.sum().backward()
    old = ~keep_mask(dropkit.make_key(6), 0.5, (50,))
    assert prev.grad is not None
    assert new.grad is not None
    assert torch.equal(prev.grad, old.double())
    assert torch.equal(new.grad, (~old).double())
    for training in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b, training=training: zoneout(a, b, 0.4, training, seed=7),
            (prev.detach().requires_grad_(), new.detach().requires_grad_()),
        )


# --- cells ------------------------------------------------------------------------------------------


def _state(cls: type[nn.Module], batch: int, hidden: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if cls is nn.LSTMCell:
        return torch.randn(batch, hidden), torch.randn(batch, hidden)
    return torch.randn(batch, hidden)


@pytest.mark.parametrize("cls", CELLS)
def test_cell_training_step_is_the_functional(cls: type[nn.Module]) -> None:
    cell = cls(4, 6)
    m = ZoneoutCell(cell, 0.3, 0.6 if cls is nn.LSTMCell else None)
    x = torch.randn(5, 4)
    hx = _state(cls, 5, 6)
    out = m(x, hx, seed=8)
    new = cell(x, hx)
    if isinstance(hx, tuple):
        assert isinstance(out, tuple)
        expected = zoneout_states(hx, new, (0.3, 0.6), seed=8)
        assert torch.equal(out[0], expected[0])
        assert torch.equal(out[1], expected[1])
    else:
        assert torch.equal(out, zoneout(hx, new, 0.3, seed=8))  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", CELLS)
def test_cell_eval_is_the_expectation(cls: type[nn.Module]) -> None:
    cell = cls(4, 6)
    m = ZoneoutCell(cell, 0.2).eval()
    x = torch.randn(3, 4)
    hx = _state(cls, 3, 6)
    out, new = m(x, hx), cell(x, hx)
    pairs = zip(out, hx, new, strict=True) if isinstance(hx, tuple) else [(out, hx, new)]
    for got, before, after in pairs:
        torch.testing.assert_close(got, 0.2 * before + 0.8 * after)


def test_default_state_is_zeros_and_unbatched_input() -> None:
    cell = nn.LSTMCell(4, 6)
    m = ZoneoutCell(cell, 0.5)
    x = torch.randn(2, 4)
    zeros = (torch.zeros(2, 6), torch.zeros(2, 6))
    h, c = m(x, seed=9)
    h_ref, c_ref = m(x, zeros, seed=9)
    assert torch.equal(h, h_ref)
    assert torch.equal(c, c_ref)
    g = ZoneoutCell(nn.GRUCell(4, 6), 0.5)
    assert g(torch.randn(4)).shape == (6,)


def test_fresh_masks_every_step_and_reproducible_stream() -> None:
    dropkit.manual_seed(10)
    m = ZoneoutCell(nn.GRUCell(3, 200), 0.5)
    x, h = torch.randn(2, 3), torch.zeros(2, 200)
    new = m.module(x, h)
    first, second = m(x, h), m(x, h)
    assert not torch.equal(first == h, second == h), "each step draws a new mask"
    assert torch.equal(first, zoneout(h, new, 0.5, seed=dropkit.make_key(10, m.rng_stream, 0)))
    dropkit.manual_seed(10)
    assert torch.equal(m(x, h), first)


@pytest.mark.parametrize("cls", CELLS)
def test_sequence_runs_the_steps_with_consecutive_keys(cls: type[nn.Module]) -> None:
    m = ZoneoutCell(cls(3, 5), 0.4)
    x = torch.randn(6, 2, 3)
    outputs, final = m.sequence(x, seed=11)
    state = None
    base = dropkit.make_key(11)
    for t in range(6):
        state = m(x[t], state, seed=base + torch.tensor([0, 0, t]))
        h = state[0] if isinstance(state, tuple) else state
        assert torch.equal(outputs[t], h)
    assert isinstance(state, type(final))
    batch_first, _ = m.sequence(x.transpose(0, 1), batch_first=True, seed=11)
    assert torch.equal(batch_first, outputs.transpose(0, 1))
    assert outputs.shape == (6, 2, 5)


def test_sequence_without_seed_uses_the_module_stream() -> None:
    dropkit.manual_seed(12)
    m = ZoneoutCell(nn.LSTMCell(3, 5), 0.4)
    x = torch.randn(4, 2, 3)
    first, _ = m.sequence(x)
    second, _ = m.sequence(x)
    assert not torch.equal(first, second)
    dropkit.manual_seed(12)
    assert torch.equal(m.sequence(x)[0], first)
    assert torch.equal(m.eval().sequence(x)[0], m.sequence(x)[0]), "eval is deterministic"


def test_cell_gradcheck_float64_in_eval() -> None:
    m = ZoneoutCell(nn.LSTMCell(3, 4).double(), 0.3, 0.5)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, h, c: m.eval()(a, (h, c)), (x, h0, c0))


def test_state_dict_round_trips_and_copies() -> None:
    plain = nn.LSTMCell(3, 4)
    m = ZoneoutCell(nn.LSTMCell(3, 4), 0.1, 0.5)
    assert list(m.state_dict()) == list(plain.state_dict())
    m.load_state_dict(plain.state_dict())
    other = nn.LSTMCell(3, 4)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.weight_hh, plain.weight_hh)
    x = torch.randn(2, 3)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(x, seed=1)[0], m(x, seed=1)[0])
    assert "p=0.1, cell_p=0.5" in repr(m)
    assert repr(ZoneoutCell(nn.GRUCell(2, 2), 0.2)).startswith("ZoneoutCell(\n  p=0.2\n")


# --- errors ---------------------------------------------------------------------------------------


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"cell_p applies to nn\.LSTMCell only"):
        ZoneoutCell(nn.GRUCell(2, 2), 0.1, 0.5)
    with pytest.raises(
        TypeError, match=r"module must be an nn\.LSTMCell, nn\.GRUCell or nn\.RNNCell, got LSTM"
    ):
        ZoneoutCell(nn.LSTM(2, 2))
    with pytest.raises(ValueError, match=r"rates\[1\] must be in \[0, 1\], got 2.0"):
        zoneout_states((torch.ones(2), torch.ones(2)), (torch.ones(2), torch.ones(2)), (0.1, 2.0))
    with pytest.raises(ValueError, match=r"^prev and new must have the same shape, got \(2,\) and \(3,\)"):
        zoneout(torch.ones(2), torch.ones(3), 0.1)
    with pytest.raises(
        ValueError, match=r"prev\[1\] and new\[1\] must have the same shape, got \(2,\) and \(3,\)"
    ):
        zoneout_states((torch.ones(2), torch.ones(2)), (torch.ones(2), torch.ones(3)), (0.1, 0.1))
    with pytest.raises(ValueError, match="same non-zero length"):
        zoneout_states((), (), ())
    with pytest.raises(TypeError, match=r"^new must be a floating-point"):
        zoneout(torch.ones(2), torch.ones(2, dtype=torch.int64), 0.1)
    m = ZoneoutCell(nn.LSTMCell(2, 3), 0.1)
    with pytest.raises(ValueError, match=r"expects \(B, I\) or unbatched \(I\) input, got \(1, 2, 2\)"):
        m(torch.ones(1, 2, 2))
    with pytest.raises(TypeError, match=r"hx of an LSTM cell must be a tuple \(h, c\)"):
        m(torch.ones(1, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"expects \(T, B, I\), \(B, T, I\) or \(T, I\) input, got \(2,\)"):
        m.sequence(torch.ones(2))
    with pytest.raises(ValueError, match="at least one time step"):
        m.sequence(torch.ones(0, 1, 2))
