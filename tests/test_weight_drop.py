"""WeightDrop: DropConnect of named weights (RNN hidden-to-hidden by default), one mask per forward."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import dropkit
from dropkit.engine.masks import keep_mask
from dropkit.nn.weight_drop import WeightDrop
from tests.layer_specs import realised

RNNS = [nn.LSTM, nn.GRU, nn.RNN]


def _rnn(cls: type[nn.RNNBase], dtype: torch.dtype = torch.float32, **kwargs: object) -> nn.RNNBase:
    return cls(3, 6, num_layers=2, bidirectional=True, **kwargs).to(dtype)  # type: ignore[arg-type]


def _reference_masks(m: WeightDrop, seed: int) -> dict[str, torch.Tensor]:
    """The documented layout: weight i reads its slice of one draw of shape (sum numel,)."""
    weights = dict(m.module.named_parameters())
    sizes = [weights[name].numel() for name in m.weights]
    keep = keep_mask(dropkit.make_key(seed), m.p, (sum(sizes),))
    return {
        name: part.reshape(weights[name].shape)
        for name, part in zip(m.weights, keep.split(sizes), strict=True)
    }


def _with_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    reference = copy.deepcopy(module)
    with torch.no_grad():
        for name, value in weights.items():
            reference.get_parameter(name).copy_(value)
    return reference


# --- defaults and masks ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", RNNS)
def test_default_weights_are_every_hidden_to_hidden_matrix(cls: type[nn.RNNBase]) -> None:
    m = WeightDrop(_rnn(cls), 0.5)
    assert m.weights == ("weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse")
    assert WeightDrop(cls(2, 4), 0.5).weights == ("weight_hh_l0",)


@pytest.mark.parametrize("cls", RNNS)
def test_training_output_is_the_module_with_masked_weights(cls: type[nn.RNNBase]) -> None:
    # A fixed masked matrix reproduces the output: the mask is the same at every time step.
    p, seed = 0.4, 3
    rnn = _rnn(cls, torch.float64)
    m = WeightDrop(rnn, p)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    masks = _reference_masks(m, seed)
    masked = {
        name: torch.where(masks[name], rnn.get_parameter(name) * (1 / (1 - realised(p))), 0.0)
        for name in m.weights
    }
    expected = _with_weights(rnn, masked)(x)[0]
    torch.testing.assert_close(m(x, seed=seed)[0], expected, rtol=1e-12, atol=1e-12)
    dropped = m.dropped_weights(seed=seed)
    for name in m.weights:
        assert torch.equal(dropped[name], masked[name])
        assert 0 < int((~masks[name]).sum()) < masks[name].numel()


def test_each_weight_reads_its_own_part_of_the_draw() -> None:
    m = WeightDrop(nn.LSTM(8, 64, num_layers=2), 0.3)
    dropped = m.dropped_weights(seed=4)
    first, second = dropped["weight_hh_l0"] != 0, dropped["weight_hh_l1"] != 0
    assert not torch.equal(first, second), "each weight reads its own part of the draw"


def test_one_fresh_mask_per_forward_and_reproducible_stream() -> None:
    dropkit.manual_seed(5)
    m = WeightDrop(nn.GRU(3, 6), 0.5)
    x = torch.randn(4, 2, 3)
    first, second = m(x)[0], m(x)[0]
    assert not torch.equal(first, second)
    dropkit.manual_seed(5)
    assert torch.equal(m(x)[0], first)
    key = dropkit.make_key(5, m.rng_stream, 1)
    assert torch.equal(m(x, seed=key)[0], second)


@pytest.mark.parametrize("cls", RNNS)
def test_gradients_reach_the_raw_weights(cls: type[nn.RNNBase]) -> None:
    p, seed = 0.5, 6
    rnn = _rnn(cls, torch.float64)
    m = WeightDrop(rnn, p)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    m(x, seed=seed)[0].square().sum().backward()
    masks = _reference_masks(m, seed)
    masked = {
        name: torch.where(masks[name], rnn.get_parameter(name) * (1 / (1 - realised(p))), 0.0)
        for name in m.weights
    }
    reference = _with_weights(rnn, masked)
    reference(x)[0].square().sum().backward()
    for name, param in rnn.named_parameters():
        assert param.grad is not None, name
        ref_grad = reference.get_parameter(name).grad
        assert ref_grad is not None
        if name in m.weights:  # dW = mask / q * dW~: zero exactly where dropped
            expected = torch.where(masks[name], ref_grad / (1 - p), 0.0)
            torch.testing.assert_close(param.grad, expected, rtol=1e-10, atol=1e-12)
            assert bool((param.grad[~masks[name]] == 0).all())
        else:
            torch.testing.assert_close(param.grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_non_inverted_repr() -> None:
    m = WeightDrop(nn.Linear(6, 4), 0.25, weights="weight", inverted=False)
    assert "inverted=False" in repr(m)


# --- any module, keyword arguments --------------------------------------------------------------


def test_any_module_and_nested_names() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    m = WeightDrop(net, 0.5, weights=["0.weight", "2.weight"])
    x = torch.randn(3, 4)
    masks = _reference_masks(m, 9)
    masked = {n: torch.where(masks[n], net.get_parameter(n) * 2.0, 0.0) for n in m.weights}
    torch.testing.assert_close(m(x, seed=9), _with_weights(net, masked)(x))


def test_arguments_pass_through() -> None:
    lstm = nn.LSTM(3, 5, batch_first=True)
    m = WeightDrop(lstm, 0.5).eval()
    x = torch.randn(2, 4, 3)
    h0 = (torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    assert torch.equal(m(x, h0)[0], lstm(x, h0)[0])
    assert torch.equal(m(x, hx=h0)[0], lstm(x, h0)[0])
    out, _ = m.train()(x, h0, seed=2)
    assert out.shape == (2, 4, 5)


def test_packed_sequence_input() -> None:
    lstm = nn.LSTM(3, 5)
    m = WeightDrop(lstm, 0.5)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(4, 3, 3), torch.tensor([4, 2, 1]))
    out, _ = m(packed, seed=3)
    reference = _with_weights(lstm, m.dropped_weights(seed=3))(packed)[0]
    assert torch.equal(out.data, reference.data)


def test_no_warnings_in_forward_and_backward() -> None:
    m = WeightDrop(nn.LSTM(3, 5, num_layers=2), 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m(torch.randn(4, 2, 3))[0].sum().backward()
        m.eval()(torch.randn(4, 2, 3))
    assert caught == []


# --- state dicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", RNNS)
def test_state_dict_round_trips_with_the_plain_module(cls: type[nn.RNNBase]) -> None:
    plain = _rnn(cls)
    wrapped = WeightDrop(_rnn(cls), 0.5)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())
    for name, value in plain.state_dict().items():
        assert torch.equal(wrapped.module.get_parameter(name), value)
    other = _rnn(cls)
    other.load_state_dict(wrapped.state_dict())
    x = torch.randn(3, 2, 3)
    assert torch.equal(other(x)[0], wrapped.eval()(x)[0])


def test_state_dict_inside_a_model_and_prefixed_keys() -> None:
    plain_model = nn.Sequential(nn.LSTM(3, 4), nn.Identity())
    wrapped_model = nn.Sequential(WeightDrop(nn.LSTM(3, 4), 0.5), nn.Identity())
    assert list(wrapped_model.state_dict()) == list(plain_model.state_dict())
    wrapped_model.load_state_dict(plain_model.state_dict())
    plain_model.load_state_dict(wrapped_model.state_dict())
    prefixed = {f"0.module.{k[2:]}": v for k, v in plain_model.state_dict().items()}
    wrapped_model.load_state_dict(prefixed)  # keys of the wrapper's attribute load too
    with pytest.raises(RuntimeError, match="Unexpected key"):
        wrapped_model.load_state_dict({**plain_model.state_dict(), "0.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapped_model.load_state_dict({"0.weight_hh_l0": plain_model.state_dict()["0.weight_hh_l0"]})


def test_pickle_deepcopy_and_repr() -> None:
    m = WeightDrop(nn.LSTM(3, 4), 0.5)
    x = torch.randn(2, 1, 3)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(x, seed=1)[0], m(x, seed=1)[0])
        assert list(clone.state_dict()) == list(m.module.state_dict())
    assert "p=0.5, weights=['weight_hh_l0']" in repr(m)


# --- errors ---------------------------------------------------------------------------------------


def test_bad_arguments() -> None:
    lstm = nn.LSTM(3, 4)
    with pytest.raises(ValueError, match="'weight_hh_l3', which is not a parameter of LSTM"):
        WeightDrop(lstm, 0.5, weights="weight_hh_l3")
    with pytest.raises(ValueError, match="at least one parameter"):
        WeightDrop(lstm, 0.5, weights=[])
    with pytest.raises(ValueError, match="must not repeat"):
        WeightDrop(lstm, 0.5, weights=["weight_hh_l0", "weight_hh_l0"])
    with pytest.raises(TypeError, match="must contain str"):
        WeightDrop(lstm, 0.5, weights=[0])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be a str or a sequence"):
        WeightDrop(lstm, 0.5, weights=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights must name the parameters to drop for a Linear"):
        WeightDrop(nn.Linear(2, 2), 0.5)
    with pytest.raises(TypeError, match=r"module must be an nn\.Module"):
        WeightDrop(lambda x: x, 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inverted must be a bool"):
        WeightDrop(lstm, 0.5, inverted=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed and generator"):
        WeightDrop(lstm, 0.5)(torch.randn(2, 1, 3), seed=1, generator=torch.Generator())
