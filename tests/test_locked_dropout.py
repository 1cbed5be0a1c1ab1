"""LockedDropout: time-tied masks, layouts, PackedSequence, padding masks, errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import dropkit
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import realised_drop_probability
from dropkit.functional.locked import locked_dropout
from dropkit.nn.locked import LockedDropout
from tests.conftest import binomial_tolerance


def _positive(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Input with no zeros, so a kept unit is never mistaken for a dropped one."""
    return torch.rand(*shape, dtype=dtype) + 0.5


def _padded_reference(y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``y`` (T, B, *) with the steps past each sequence's length set to zero (what unpacking gives)."""
    out = y.clone()
    for b, length in enumerate(lengths.tolist()):
        out[length:, b] = 0
    return out


# --- mask structure ---------------------------------------------------------------------------


def test_mask_is_the_engine_mask_of_shape_one_b_h() -> None:
    p = 0.3
    x = _positive(5, 7, 6)
    y = locked_dropout(x, p, seed=dropkit.make_key(3, 4, 5))
    expected = keep_mask(dropkit.make_key(3, 4, 5), p, (7, 6))
    assert torch.equal((y != 0)[2], expected)


def test_both_layouts_get_the_same_masks() -> None:
    x = _positive(6, 5, 4)
    y = locked_dropout(x, 0.5, seed=2)
    y_bf = locked_dropout(x.transpose(0, 1).contiguous(), 0.5, batch_first=True, seed=2)
    assert torch.equal(y, y_bf.transpose(0, 1))


def test_unbatched_input_ties_the_mask_over_dim_0() -> None:
    x = _positive(8, 32)
    for batch_first in (False, True):  # 2-D is always unbatched (T, H)
        y = locked_dropout(x, 0.5, batch_first=batch_first, seed=3)
        kept = y != 0
        assert torch.equal(kept, kept[:1].expand_as(kept))


def test_masks_of_different_sequences_are_independent() -> None:
    p, batch, hidden = 0.5, 400, 100
    dropped = locked_dropout(torch.ones(2, batch, hidden), p, seed=5)[0] == 0
    # Pairs of neighbouring sequences: both dropped with probability p**2 if independent.
    both = dropped[0::2] & dropped[1::2]
    n = both.numel()
    p_real = realised_drop_probability(p)
    assert abs(float(both.double().mean()) - p_real**2) <= binomial_tolerance(p_real**2, n)
    # No two sequences share a whole mask (probability ~ 400**2 / 2 * 2**-100 if independent).
    assert torch.unique(dropped, dim=0).shape[0] == batch


# --- expectation, gradients, identities ---------------------------------------------------------


def test_gradcheck_float64_with_a_padding_mask() -> None:
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(4, 3, dtype=torch.bool)
    pad[2:, 1] = True
    assert torch.autograd.gradcheck(lambda inp: locked_dropout(inp, 0.5, padding_mask=pad, seed=9), (x,))


# --- PackedSequence -------------------------------------------------------------------------------


@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_gets_the_masks_of_the_padded_batch(enforce_sorted: bool) -> None:
    lengths = torch.tensor([7, 5, 5, 2, 1]) if enforce_sorted else torch.tensor([3, 7, 1, 5, 5])
    x = _positive(7, 5, 6)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    out = locked_dropout(packed, 0.5, seed=10)
    assert isinstance(out, PackedSequence)
    assert out.batch_sizes is packed.batch_sizes
    for got, want in (
        (out.sorted_indices, packed.sorted_indices),
        (out.unsorted_indices, packed.unsorted_indices),
    ):
        assert (got is None and want is None) or (
            got is not None and want is not None and torch.equal(got, want)
        )
    unpacked, out_lengths = pad_packed_sequence(out)
    assert torch.equal(out_lengths, lengths)
    expected = _padded_reference(locked_dropout(x, 0.5, seed=10), lengths)
    assert torch.equal(unpacked, expected)


def test_packed_mask_is_constant_over_each_sequence() -> None:
    lengths = torch.tensor([6, 2, 4])
    packed = pack_padded_sequence(_positive(6, 3, 50), lengths, enforce_sorted=False)
    unpacked, _ = pad_packed_sequence(locked_dropout(packed, 0.5, seed=11))
    for b, length in enumerate(lengths.tolist()):
        kept = unpacked[:length, b] != 0
        assert torch.equal(kept, kept[:1].expand_as(kept))
        assert 0 < int(kept[0].sum()) < 50
    # Sequences of the batch draw different masks.
    assert not torch.equal(unpacked[0, 0] != 0, unpacked[0, 1] != 0)


def test_packed_module_gradient_eval_and_p1() -> None:
    lengths = torch.tensor([4, 3, 1])
    x = torch.full((4, 3, 20), 0.5)
    packed = pack_padded_sequence(x, lengths)
    data = packed.data.clone().requires_grad_(True)
    source = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    m = LockedDropout(0.5)
    out = m(source, seed=12)
    out.data.backward(torch.ones_like(out.data))
    assert data.grad is not None
    kept = out.data.detach() != 0
    assert torch.equal(data.grad, kept.float() / 0.5), "gradient uses the forward mask, scaled by 1/q"
    assert m.eval()(source) is source
    zeros = locked_dropout(source, 1.0, seed=1)
    assert torch.equal(zeros.data, torch.zeros_like(data))


def test_packed_gradcheck_and_inplace() -> None:
    lengths = torch.tensor([3, 2])
    packed = pack_padded_sequence(torch.randn(3, 2, 4, dtype=torch.float64), lengths)

    def fn(data: torch.Tensor) -> torch.Tensor:
        pk = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        return locked_dropout(pk, 0.5, seed=13).data

    assert torch.autograd.gradcheck(fn, (packed.data.clone().requires_grad_(True),))
    expected = locked_dropout(packed, 0.5, seed=13).data
    data = packed.data.clone()
    pk = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    out = locked_dropout(pk, 0.5, inplace=True, seed=13)
    assert out.data is data
    assert torch.equal(data, expected)


# --- padding masks --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
def test_padded_positions_are_left_as_they_are(batch_first: bool) -> None:
    lengths = torch.tensor([5, 2, 4, 1])
    x = _positive(5, 4, 30)
    pad = torch.arange(5)[:, None] >= lengths[None, :]  # (T, B), True = padded
    if batch_first:
        x, pad = x.transpose(0, 1).contiguous(), pad.t().contiguous()
    y = locked_dropout(x, 0.5, batch_first=batch_first, padding_mask=pad, seed=14)
    assert torch.equal(y[pad], x[pad]), "padded positions pass through untouched"
    unmasked = locked_dropout(x, 0.5, batch_first=batch_first, seed=14)
    assert torch.equal(y[~pad], unmasked[~pad]), "real positions get the masks of the unpadded call"
    m = LockedDropout(0.5, batch_first=batch_first)
    assert torch.equal(m(x, pad, seed=14), y)
    z = x.clone()
    assert locked_dropout(z, 0.5, True, True, batch_first=batch_first, padding_mask=pad, seed=14) is z
    assert torch.equal(z, y)


def test_padding_mask_on_unbatched_input() -> None:
    x = _positive(6, 40)
    pad = torch.tensor([False, False, False, False, True, True])
    y = locked_dropout(x, 0.5, padding_mask=pad, seed=15)
    assert torch.equal(y[pad], x[pad])
    assert torch.equal(y[~pad], locked_dropout(x, 0.5, seed=15)[~pad])


# --- module and functional ---------------------------------------------------------------------


def test_module_stream_reproduces_under_manual_seed() -> None:
    dropkit.manual_seed(21)
    m = LockedDropout(0.5)
    x = _positive(4, 6, 8)
    first = m(x)
    expected = locked_dropout(x, 0.5, seed=dropkit.make_key(21, m.rng_stream, 0))
    assert torch.equal(first, expected)
    dropkit.manual_seed(21)
    assert torch.equal(m(x), first)
    packed = pack_padded_sequence(x, torch.tensor([4, 4, 3, 2, 2, 1]))
    key = dropkit.make_key(21, m.rng_stream, 1)
    assert torch.equal(m(packed).data, locked_dropout(packed, 0.5, seed=key).data)


def test_repr() -> None:
    m = LockedDropout(0.2, batch_first=True)
    assert repr(m) == "LockedDropout(p=0.2, inplace=False, batch_first=True)"


# --- errors ---------------------------------------------------------------------------------------


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 2-D"):
        locked_dropout(torch.ones(5), 0.5)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        LockedDropout(0.5, batch_first=1)  # type: ignore[arg-type]
    x = torch.ones(4, 3, 2)
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(T, B\).*\(4, 3\), got \(3, 4\)"):
        locked_dropout(x, 0.5, padding_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        locked_dropout(x, 0.5, batch_first=True, padding_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        locked_dropout(x, 0.5, padding_mask=torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"bool torch\.Tensor or None"):
        locked_dropout(x, 0.5, padding_mask=[[True]])  # type: ignore[arg-type]
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 1]))
    with pytest.raises(ValueError, match="padding_mask must be None for a PackedSequence"):
        locked_dropout(packed, 0.5, padding_mask=torch.zeros(4, 3, dtype=torch.bool))
    int_packed = pack_padded_sequence(x.long(), torch.tensor([4, 2, 1]))
    with pytest.raises(TypeError, match=r"input.data must be a floating-point"):
        locked_dropout(int_packed, 0.5)
