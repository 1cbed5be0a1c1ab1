"""Concrete dropout (Gal, Hron, Kendall 2017): relaxed mask, learned rate, regularizer."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

import dropkit
from dropkit.functional.concrete import concrete_dropout, concrete_uniforms
from dropkit.nn.concrete import ConcreteDropout, concrete_regularizers
from tests.conftest import SIGMAS, binomial_tolerance


def _logit(p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(math.log(p) - math.log1p(-p), dtype=dtype)


def _drop_values(p: float, t: float, shape: tuple[int, ...], seed: int = 7, **kw: object) -> torch.Tensor:
    """The relaxed drop mask z recovered from y = (1 - z) / (1 - p) for x = 1 (float64)."""
    y = concrete_dropout(
        torch.ones(shape, dtype=torch.float64),
        _logit(p, torch.float64),
        temperature=t,
        seed=seed,
        **kw,  # type: ignore[arg-type]
    )
    return 1.0 - y * (1.0 - p)


# ---------------------------------------------------------------------------------------------
# The relaxed mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_tends_to_hard_bernoulli_at_small_temperature(p: float) -> None:
    t = 1e-3
    n = 200_000
    z = _drop_values(p, t, (n,))
    assert bool(((z >= -1e-12) & (z <= 1 + 1e-12)).all())
    # z > 1/2 exactly when log u - log(1-u) > -logit(p), i.e. u > 1 - p: a Bernoulli(p) drop
    # for every t (up to the 2**-24 resolution of u).
    dropped = (z > 0.5).double().mean().item()
    assert abs(dropped - p) <= binomial_tolerance(p, n) + 2.0**-24
    # Soft values: |logit(u) + logit(p)| < t*logit(1 - eps); logit(u) has density <= 1/4,
    # so their probability is at most 2 * t * logit(1 - eps) / 4.
    eps = 1e-2
    soft_bound = 2.0 * t * math.log((1 - eps) / eps) / 4.0
    soft = ((z > eps) & (z < 1 - eps)).double().mean().item()
    assert soft <= soft_bound + binomial_tolerance(soft_bound, n)


def test_larger_temperature_is_softer() -> None:
    z_cold = _drop_values(0.3, 0.01, (50_000,))
    z_warm = _drop_values(0.3, 0.5, (50_000,))
    soft = [((z > 0.01) & (z < 0.99)).double().mean().item() for z in (z_cold, z_warm)]
    assert soft[0] < 0.05 < soft[1]


@pytest.mark.parametrize(("p", "t"), [(0.3, 0.1), (0.5, 0.1), (0.1, 0.02)])
def test_expectation_matches_quadrature_and_is_close_to_x(p: float, t: float) -> None:
    n = 200_000
    x = torch.linspace(-2.0, 3.0, n, dtype=torch.float64)
    y = concrete_dropout(x, _logit(p, torch.float64), temperature=t, seed=3)
    ratio = y / x  # (1 - z) / (1 - p), i.i.d. per element
    # E[(1 - z)] by the midpoint rule over u (the integrand is smooth and bounded in [0, 1]).
    m = 1_000_000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    keep = torch.sigmoid(-(_logit(p, torch.float64) + torch.log(u) - torch.log1p(-u)) / t)
    expected = keep.mean().item() / (1.0 - p)
    tolerance = SIGMAS * ratio.std().item() / math.sqrt(n) + 1e-4
    assert abs(ratio.mean().item() - expected) <= tolerance
    # The relaxation's bias is small at these temperatures: E[y] = x within a few percent.
    assert abs(expected - 1.0) < 0.05


def test_one_uniform_per_element() -> None:
    z = _drop_values(0.5, 1.0, (64, 128))  # t = 1: z is a continuous function of u
    assert z.unique().numel() > 0.99 * z.numel()  # not one scalar for the whole tensor
    # Neighbouring elements are uncorrelated: |corr| within 6 / sqrt(n).
    flat = z.reshape(-1)
    a, b = flat[:-1] - flat.mean(), flat[1:] - flat.mean()
    corr = (a * b).mean() / flat.var()
    assert abs(corr.item()) <= SIGMAS / math.sqrt(flat.numel())


def test_one_uniform_per_channel_with_broadcast_dims() -> None:
    z = _drop_values(0.5, 1.0, (16, 32, 5, 6), broadcast_dims=(2, 3))
    assert bool((z == z[:, :, :1, :1]).all())  # shared over the spatial dims
    per_channel = z[:, :, 0, 0]
    assert per_channel.unique().numel() == per_channel.numel()  # independent per (sample, channel)


def test_uniforms_are_a_pure_function_of_the_key() -> None:
    key = dropkit.make_key(11)
    u = concrete_uniforms(key, (1000,), torch.float32)
    assert torch.equal(u, concrete_uniforms(key, (1000,), torch.float32))
    assert torch.equal(u[:10], concrete_uniforms(key, (10,), torch.float32))  # prefix-stable
    assert float(u.min()) > 0.0
    assert float(u.max()) < 1.0
    assert abs(u.double().mean().item() - 0.5) <= SIGMAS * math.sqrt(1 / 12 / 1000)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def test_gradient_reaches_p_logit_and_input() -> None:
    x = torch.randn(8, 16, requires_grad=True)
    logit = torch.tensor(-1.0, requires_grad=True)
    concrete_dropout(x, logit, seed=1).pow(2).sum().backward()
    assert x.grad is not None
    assert logit.grad is not None
    assert torch.isfinite(logit.grad)
    assert logit.grad.item() != 0.0


# ---------------------------------------------------------------------------------------------
# Eval
# ---------------------------------------------------------------------------------------------


def test_functional_eval_is_identity() -> None:
    x = torch.randn(5, 7)
    assert concrete_dropout(x, torch.tensor(2.0), training=False) is x


def test_module_channel_form_draws_one_uniform_per_sample_and_channel() -> None:
    conv = ConcreteDropout(nn.Conv2d(4, 2, 1, bias=False), init_p=0.5, temperature=1.0)
    with torch.no_grad():
        conv.module.weight.zero_()
        conv.module.weight[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # output 0 = input channel 0
    x = torch.ones(8, 4, 5, 5)
    scale = conv(x, seed=2)[:, 0]
    assert bool((scale == scale[:, :1, :1]).all())  # one uniform per (sample, channel)
    assert scale[:, 0, 0].unique().numel() == 8
    unbatched = conv(torch.ones(4, 5, 5), seed=2)
    assert unbatched.shape == (2, 5, 5)
    assert bool((unbatched[0] == unbatched[0, 0, 0]).all())


# ---------------------------------------------------------------------------------------------
# Regularizer
# ---------------------------------------------------------------------------------------------


def test_regularizer_hand_computed_linear_excludes_bias() -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]]))
        layer.bias.fill_(100.0)
    m = ConcreteDropout(layer, init_p=0.25, weight_regularizer=0.1, dropout_regularizer=0.01)
    p, k, sum_sq = 0.25, 3, 1 + 4 + 0.25 + 0 + 1 + 9
    expected = 0.1 * sum_sq / (1 - p) + 0.01 * k * (p * math.log(p) + (1 - p) * math.log(1 - p))
    assert m.regularization().item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        layer.bias.fill_(-7.0)
    assert m.regularization().item() == pytest.approx(expected, rel=1e-6)


def test_regularizer_conv_uses_in_channels() -> None:
    layer = nn.Conv2d(5, 2, 3)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    m = ConcreteDropout(layer, init_p=0.4, weight_regularizer=0.0, dropout_regularizer=1.0)
    assert m.input_dim == 5 == layer.weight.shape[1]
    p = 0.4
    expected = 5 * (p * math.log(p) + (1 - p) * math.log(1 - p))
    assert m.regularization().item() == pytest.approx(expected, rel=1e-6)
    m.weight_regularizer = 2.0
    assert m.regularization().item() == pytest.approx(expected + 2.0 * 0.25 * 90 / 0.6, rel=1e-6)


def test_concrete_regularizers() -> None:
    wr, dr = concrete_regularizers(0.5, 100)
    assert wr == pytest.approx(0.0025)
    assert dr == pytest.approx(0.02)
    with pytest.raises(ValueError, match="length_scale"):
        concrete_regularizers(0.0, 100)
    with pytest.raises(ValueError, match="num_train"):
        concrete_regularizers(1.0, 0)
    with pytest.raises(TypeError, match="num_train"):
        concrete_regularizers(1.0, 10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        concrete_regularizers(1.0, 10, precision=0.0)
    with pytest.raises(ValueError, match="y_std"):
        concrete_regularizers(1.0, 10, y_std=math.nan)


def test_concrete_regularizers_in_mse_units() -> None:
    # tau_s = precision * y_std**2 divides both weights; the defaults (tau_s = 1) are Gal's.
    length_scale, n, tau, y_std = 0.1, 50, 0.4, 3.0
    tau_s = tau * y_std**2
    got = concrete_regularizers(length_scale, n, precision=tau, y_std=y_std)
    assert got == (length_scale**2 / (tau_s * n), 2.0 / (tau_s * n))  # exactly this arithmetic
    assert concrete_regularizers(length_scale, n, precision=1.0, y_std=1.0) == concrete_regularizers(
        length_scale, n
    )


# ---------------------------------------------------------------------------------------------
# Learning p
# ---------------------------------------------------------------------------------------------


def _train(m: ConcreteDropout, data_weight: float, steps: int = 40) -> float:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    with torch.no_grad():
        target = m.module(x)
    m.module.requires_grad_(False)
    opt = torch.optim.Adam([m.p_logit], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = data_weight * (m(x) - target).pow(2).mean() + m.regularization()
        loss.backward()
        opt.step()
    return m.p


def test_noise_hurting_the_fit_lowers_p() -> None:
    m = ConcreteDropout(nn.Linear(4, 1), init_p=0.3, weight_regularizer=0.0, dropout_regularizer=0.0)
    assert _train(m, data_weight=1.0) < 0.2


def test_entropy_term_raises_a_small_p() -> None:
    m = ConcreteDropout(nn.Linear(4, 1), init_p=0.05, weight_regularizer=0.0, dropout_regularizer=1.0)
    assert _train(m, data_weight=0.0) > 0.1


def test_learning_is_deterministic() -> None:
    results = []
    for _ in range(2):
        dropkit.manual_seed(5)
        layer = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            layer.weight.fill_(0.5)
        m = ConcreteDropout(layer, init_p=0.3, weight_regularizer=0.0, dropout_regularizer=0.0)
        results.append(_train(m, data_weight=1.0, steps=5))
    assert results[0] == results[1]


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, -0.1, math.inf, math.nan])
def test_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        concrete_dropout(torch.ones(2), torch.tensor(0.0), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        ConcreteDropout(nn.Linear(2, 2), temperature=temperature)


def test_bad_p_logit_and_input() -> None:
    with pytest.raises(TypeError, match="p_logit"):
        concrete_dropout(torch.ones(2), 0.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="p_logit"):
        concrete_dropout(torch.ones(2), torch.tensor(0))
    with pytest.raises(TypeError, match="input"):
        concrete_dropout(torch.ones(2, dtype=torch.int64), torch.tensor(0.0))
    with pytest.raises(ValueError, match="p_logit"):
        concrete_dropout(torch.ones(2), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="temperature"):
        concrete_dropout(torch.ones(2), torch.tensor(0.0), temperature="0.1")  # type: ignore[arg-type]


def test_bad_layer_and_regularizers() -> None:
    with pytest.raises(TypeError, match=r"module must be.*ReLU"):
        ConcreteDropout(nn.ReLU())
    with pytest.raises(TypeError, match=r"module must be.*LazyLinear"):
        ConcreteDropout(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="weight_regularizer"):
        ConcreteDropout(nn.Linear(2, 2), weight_regularizer=-1.0)
    with pytest.raises(ValueError, match="dropout_regularizer"):
        ConcreteDropout(nn.Linear(2, 2), dropout_regularizer=math.inf)
    with pytest.raises(ValueError, match="4-D"):
        ConcreteDropout(nn.Conv2d(2, 2, 1))(torch.ones(2, 2, 2, 2, 2))


def test_extra_repr_and_state_dict() -> None:
    m = ConcreteDropout(nn.Linear(2, 2), init_p=0.25)
    assert "p=0.25" in repr(m)
    assert "temperature=0.1" in repr(m)
    assert set(m.state_dict()) == {"p_logit", "module.weight", "module.bias"}


def test_state_dict_saved_under_the_former_layer_prefix_loads() -> None:
    # Checkpoints written before the wrapped layer was renamed `layer` -> `module`, nested too.
    source = nn.Sequential(ConcreteDropout(nn.Linear(3, 2), init_p=0.3))
    old = {key.replace(".module.", ".layer."): value for key, value in source.state_dict().items()}
    assert set(old) == {"0.p_logit", "0.layer.weight", "0.layer.bias"}
    target = nn.Sequential(ConcreteDropout(nn.Linear(3, 2)))
    target.load_state_dict(old)  # strict: no missing or unexpected keys
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_module_pickled_whole_under_the_former_layer_name_loads() -> None:
    m = ConcreteDropout(nn.Linear(3, 2))
    m._modules = {"layer": m.module}  # what such a pickle holds: no `module`, no load hook
    m._load_state_dict_pre_hooks.clear()
    old = pickle.loads(pickle.dumps(m))
    assert list(old._modules) == ["module"]
    x = torch.randn(4, 3)
    assert torch.equal(old.eval()(x), old.module(x))
    old.load_state_dict(
        {"p_logit": old.p_logit.detach(), "layer.weight": torch.ones(2, 3), "layer.bias": torch.zeros(2)}
    )
    assert torch.equal(old.module.weight, torch.ones(2, 3))
