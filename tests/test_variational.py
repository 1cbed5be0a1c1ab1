"""Variational dropout (Kingma 2015), sparse variational dropout (Molchanov 2017), regularization."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from dropkit.nn.regularization import KLWarmup, Regularized, regularization_loss
from dropkit.nn.sparse_variational import (
    SparseVariationalConv1d,
    SparseVariationalConv2d,
    SparseVariationalConv3d,
    SparseVariationalLinear,
    molchanov_kl,
    sparsity_report,
)
from dropkit.nn.variational import (
    VariationalConv1d,
    VariationalConv2d,
    VariationalConv3d,
    VariationalLinear,
    kingma_kl,
)
from tests.conftest import SIGMAS

EULER_GAMMA = 0.5772156649015329

# ---------------------------------------------------------------------------------------------
# KL approximations against the exact KL, computed by numerical integration


def _expected_log_abs(alpha: float) -> float:
    """E log|1 + sqrt(alpha) * eps|, eps ~ N(0, 1), by adaptive quadrature around the singularity."""
    integrate = pytest.importorskip("scipy.integrate")
    scale = math.sqrt(alpha)
    pole = -1.0 / scale

    def integrand(e: float) -> float:
        return math.log(abs(1.0 + scale * e)) * math.exp(-0.5 * e * e) / math.sqrt(2.0 * math.pi)

    pieces = [(-math.inf, pole - 1.0), (pole - 1.0, pole), (pole, pole + 1.0), (pole + 1.0, math.inf)]
    return sum(integrate.quad(integrand, a, b, limit=200)[0] for a, b in pieces)


def _exact_neg_kl(log_alpha: float) -> float:
    """-KL(N(theta, alpha theta^2) || log-uniform) = 1/2 log alpha - E log|1 + sqrt(alpha) eps| + C.

    The prior is improper, so the KL is defined up to a constant; C = -(gamma + log 2) / 2 is the
    one that makes it vanish as alpha -> infinity (Molchanov et al. 2017, eq. 14).
    """
    return 0.5 * log_alpha - _expected_log_abs(math.exp(log_alpha)) - 0.5 * (EULER_GAMMA + math.log(2.0))


def test_molchanov_kl_matches_numerical_integration() -> None:
    # Molchanov et al. fit k1..k3 to the exact KL over log alpha in [-8, 8]; the fit is within
    # 0.01 absolute everywhere (largest deviation 0.0094 near log alpha = -3.5).
    grid = [-8.0 + 0.5 * i for i in range(33)]
    approx = molchanov_kl(torch.tensor(grid, dtype=torch.float64))
    for log_alpha, value in zip(grid, approx.tolist(), strict=True):
        assert value == pytest.approx(-_exact_neg_kl(log_alpha), abs=0.01), log_alpha
    assert bool((approx > 0).all())


def test_kingma_kl_matches_numerical_integration_up_to_a_constant() -> None:
    # Kingma's cubic is a least-squares fit over alpha in (0, 1]: exact - approximation is a
    # constant to within +-0.02 for log alpha in [-6, 0] (observed spread 0.039).
    grid = [-6.0 + 0.5 * i for i in range(13)]
    approx = kingma_kl(torch.tensor(grid, dtype=torch.float64)).tolist()
    offsets = [-_exact_neg_kl(la) - kl for la, kl in zip(grid, approx, strict=True)]
    assert max(offsets) - min(offsets) < 0.045
    # The chosen constant: KL = 0 at alpha = 1 and positive below; alpha is clipped to 1.
    assert approx[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(kl > 0 for kl in approx[:-1])
    assert kingma_kl(torch.tensor([2.0], dtype=torch.float64)).item() == approx[-1]


def test_layer_kl_is_summed_over_weights() -> None:
    layer = VariationalLinear(5, 3, alpha_shape="unit", dtype=torch.float64)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(-3, -0.5, 5, dtype=torch.float64))
    assert layer.log_alpha.shape == (5,)
    expected = 3 * kingma_kl(layer.log_alpha).sum()  # every one of the 3 rows shares the unit alpha
    torch.testing.assert_close(layer.kl(), expected)
    torch.testing.assert_close(layer.regularization(), layer.kl())
    sparse = SparseVariationalLinear(5, 3, dtype=torch.float64)
    torch.testing.assert_close(sparse.kl(), molchanov_kl(sparse.log_alpha).sum())


# ---------------------------------------------------------------------------------------------
# local reparameterization: moments of the pre-activation vs sampled weights


def _assert_moments(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """``samples`` (n, *shape) of a Gaussian with ``mean`` and ``var``: compare to SIGMAS standard
    errors, sqrt(var / n) for the mean and var * sqrt(2 / (n - 1)) for the sample variance."""
    n = samples.shape[0]
    torch.testing.assert_close(samples.mean(0), mean, rtol=0, atol=float(SIGMAS * (var.max() / n).sqrt()))
    tolerance = SIGMAS * var * math.sqrt(2.0 / (n - 1)) + 1e-7
    assert bool(((samples.var(0) - var).abs() <= tolerance).all())


def _randomize(layer: nn.Module, log_name: str, low: float, high: float) -> None:
    with torch.no_grad():
        parameter = getattr(layer, log_name)
        parameter.uniform_(low, high)


def _weight_samples(layer: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """n weight draws from the posterior: theta * N(1, alpha), or N(theta, sigma^2)."""
    theta = layer.weight.detach()
    noise = torch.randn((n, *theta.shape), generator=generator, dtype=theta.dtype)
    if isinstance(layer, (VariationalLinear, VariationalConv1d, VariationalConv2d)):
        return theta * (1.0 + layer.alpha.detach().sqrt() * noise)
    return theta + (layer.log_alpha.detach().exp() * theta * theta).sqrt() * noise


LINEAR_LAYERS = [
    pytest.param(lambda: VariationalLinear(6, 4, dtype=torch.float64), "log_alpha", id="variational"),
    pytest.param(
        lambda: VariationalLinear(6, 4, alpha_shape="unit", dtype=torch.float64), "log_alpha", id="unit"
    ),
    pytest.param(lambda: SparseVariationalLinear(6, 4, dtype=torch.float64), "log_sigma2", id="sparse"),
]


@pytest.mark.parametrize(("make", "log_name"), LINEAR_LAYERS)
def test_linear_moments_match_sampled_weights_and_training_outputs(
    make: Callable[[], nn.Module], log_name: str
) -> None:
    layer = make()
    _randomize(layer, log_name, -3.0, 0.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    mean, var = layer.moments(x)
    torch.testing.assert_close(mean, F.linear(x, layer.weight, layer.bias))
    assert bool((var > 0).all())
    n = 20000
    weights = _weight_samples(layer, n, torch.Generator().manual_seed(0))
    sampled = torch.einsum("bi,noi->nbo", x, weights) + layer.bias
    _assert_moments(sampled, mean.detach(), var.detach())
    # The layer's own samples: one batch of n copies of x gets independent noise per row.
    outputs = layer.train()(x.repeat(n, 1), seed=3).reshape(n, 3, 4)
    _assert_moments(outputs.detach(), mean.detach(), var.detach())


CONV_LAYERS = [
    pytest.param(
        lambda: VariationalConv1d(4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64),
        "log_alpha",
        (4, 9),
        id="variational1d",
    ),
    pytest.param(
        lambda: VariationalConv2d(2, 3, (2, 3), padding="same", dilation=(2, 1), dtype=torch.float64),
        "log_alpha",
        (2, 5, 5),
        id="variational2d",
    ),
    pytest.param(
        lambda: SparseVariationalConv2d(2, 4, 3, stride=(1, 2), padding=(1, 0), dtype=torch.float64),
        "log_sigma2",
        (2, 5, 6),
        id="sparse2d",
    ),
]


@pytest.mark.parametrize(("make", "log_name", "shape"), CONV_LAYERS)
def test_conv_moments_match_sampled_weights_and_training_outputs(
    make: Callable[[], nn.Module], log_name: str, shape: tuple[int, ...]
) -> None:
    layer = make()
    _randomize(layer, log_name, -3.0, 0.0)
    x = torch.randn(shape, dtype=torch.float64)
    mean, var = layer.moments(x)
    n = 2000
    weights = _weight_samples(layer, n, torch.Generator().manual_seed(0))
    conv = {1: F.conv1d, 2: F.conv2d}[x.dim() - 1]
    # The convolution is linear in the weights: its Jacobian (one convolution per basis weight)
    # maps every weight draw to its output without n convolutions.
    basis = torch.eye(layer.weight.numel(), dtype=x.dtype).reshape(-1, *layer.weight.shape)
    jacobian = torch.stack(
        [conv(x, e, None, layer.stride, layer.padding, layer.dilation, layer.groups) for e in basis]
    )
    bias = layer.bias.detach().reshape(-1, *([1] * (x.dim() - 1)))
    sampled = (weights.reshape(n, -1) @ jacobian.reshape(len(basis), -1)).reshape(n, *mean.shape) + bias
    _assert_moments(sampled, mean.detach(), var.detach())
    batch = x.unsqueeze(0).expand(n, *shape)
    outputs = layer.train()(batch, seed=5)
    _assert_moments(outputs.detach(), mean.detach(), var.detach())


# ---------------------------------------------------------------------------------------------
# training noise and eval


ALL_LAYERS = [
    pytest.param(lambda: VariationalLinear(5, 3), (4, 5), id="VariationalLinear"),
    pytest.param(lambda: VariationalConv1d(2, 3, 3), (2, 2, 7), id="VariationalConv1d"),
    pytest.param(lambda: VariationalConv2d(2, 3, 3, padding=1), (2, 2, 5, 5), id="VariationalConv2d"),
    pytest.param(lambda: VariationalConv3d(2, 3, 2), (2, 2, 3, 3, 3), id="VariationalConv3d"),
    pytest.param(lambda: SparseVariationalLinear(5, 3), (4, 5), id="SparseVariationalLinear"),
    pytest.param(lambda: SparseVariationalConv1d(2, 3, 3), (2, 2, 7), id="SparseVariationalConv1d"),
    pytest.param(lambda: SparseVariationalConv2d(2, 3, 3, padding=1), (2, 2, 5, 5), id="SparseConv2d"),
    pytest.param(lambda: SparseVariationalConv3d(2, 3, 2), (2, 2, 3, 3, 3), id="SparseVariationalConv3d"),
]


@pytest.mark.parametrize(("make", "shape"), ALL_LAYERS)
def test_training_noise_is_keyed_and_eval_is_the_noise_free_mean(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    layer = make()
    with torch.no_grad():
        if isinstance(layer, (VariationalLinear, VariationalConv1d, VariationalConv2d, VariationalConv3d)):
            layer.log_alpha.fill_(-1.0)
        else:
            layer.log_sigma2.fill_(-3.0)
    x = torch.randn(shape)
    # Training: the same seed gives the same noise, another seed other noise, and the layer's
    # own stream advances its step.
    a, b = layer(x, seed=1), layer(x, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, layer(x, seed=2))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(layer(x, generator=g1), layer(x, generator=g2))
    step = int(layer.rng_step)
    first, second = layer(x), layer(x)
    assert int(layer.rng_step) == step + 2
    assert not torch.equal(first, second)
    mean, _ = layer.moments(x)
    assert not torch.equal(first, mean)
    # Eval: the mean (with pruned weights for the sparse layers), no draw, no mode switch.
    layer.eval()
    out = layer(x)
    assert torch.equal(out, layer(x, seed=123))
    assert int(layer.rng_step) == step + 2
    assert not layer.training
    if isinstance(layer, (VariationalLinear, VariationalConv1d, VariationalConv2d, VariationalConv3d)):
        torch.testing.assert_close(out, mean, rtol=0, atol=0)
    assert torch.equal(out, layer.export()(x))
    assert out.dtype == x.dtype
    assert out.shape == mean.shape


def test_unit_alpha_follows_the_input_channels_of_grouped_convolutions() -> None:
    layer = VariationalConv1d(4, 2, 1, groups=2, alpha_shape="unit", dtype=torch.float64)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log())
    # Output 0 reads input channels 0, 1 and output 1 reads channels 2, 3.
    torch.testing.assert_close(
        layer.alpha[:, :, 0], torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    )
    linear = VariationalLinear(2, 3, alpha_shape="unit")
    with torch.no_grad():
        linear.log_alpha.copy_(torch.tensor([-1.0, -2.0]))
    assert torch.equal(linear.weight_log_alpha(), torch.tensor([[-1.0, -2.0]] * 3))


def test_unbatched_input_and_float32_dtype() -> None:
    layer = VariationalConv2d(2, 3, 3)
    x = torch.randn(2, 6, 6)
    assert layer(x, seed=0).shape == (3, 4, 4)
    assert layer(x, seed=0).dtype == torch.float32
    linear = SparseVariationalLinear(4, 2)
    assert linear(torch.randn(4), seed=0).shape == (2,)
    assert linear(torch.randn(2, 3, 4), seed=0).shape == (2, 3, 2)


def test_state_dict_holds_parameters_only() -> None:
    assert set(VariationalLinear(2, 2).state_dict()) == {"weight", "bias", "log_alpha"}
    assert set(SparseVariationalLinear(2, 2, bias=False).state_dict()) == {"weight", "log_sigma2"}


# ---------------------------------------------------------------------------------------------
# pruning, export, sparsity


def test_pruning_threshold_and_sparse_export() -> None:
    layer = SparseVariationalLinear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4))
        layer.log_sigma2.copy_(torch.log(layer.weight**2) + torch.tensor([-5.0, 2.0, 3.5, 9.0]))
    log_alpha = layer.log_alpha.detach()
    # log alpha = log sigma2 - log(theta^2 + 1e-8): the offsets, within 1e-8, and clipped to 8.
    torch.testing.assert_close(log_alpha[0], torch.tensor([-5.0, 2.0, 3.5, 8.0], dtype=torch.float64))
    assert layer.keep_mask().tolist() == [[True, True, False, False]] * 3
    assert layer.sparsity() == 0.5
    # A weight exactly at the threshold is pruned, one just below is kept.
    layer.threshold = float(log_alpha[1, 1])
    assert layer.keep_mask()[1].tolist() == [True, False, False, False]
    layer.threshold = math.nextafter(float(log_alpha[1, 1]), math.inf)
    assert layer.keep_mask()[1].tolist() == [True, True, False, False]
    layer.threshold = 3.0
    pruned = layer.pruned_weight()
    assert pruned[:, 2:].abs().sum() == 0
    assert torch.equal(pruned[:, :2], layer.weight.detach()[:, :2])
    assert not pruned.requires_grad
    x = torch.randn(7, 4, dtype=torch.float64)
    out = layer.eval()(x)
    assert torch.equal(out, F.linear(x, pruned, layer.bias))
    exported = layer.export()
    assert type(exported) is nn.Linear
    assert torch.equal(exported(x), out)
    coo = layer.to_sparse()
    assert coo.layout == torch.sparse_coo
    assert coo._nnz() == 6
    assert torch.equal(coo.to_dense(), pruned)
    csr = layer.to_sparse("csr")
    assert csr.layout == torch.sparse_csr
    assert torch.equal(csr.to_dense(), pruned)
    # Training ignores the threshold: the pruned weights still carry noise and mean.
    mean, _ = layer.train().moments(x)
    torch.testing.assert_close(mean, F.linear(x, layer.weight, layer.bias))


def test_prune_in_training_drops_pruned_weights_from_mean_variance_and_gradient() -> None:
    layer = SparseVariationalLinear(4, 3, dtype=torch.float64, prune_in_training=True)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 13.0, dtype=torch.float64).reshape(3, 4))
        layer.log_sigma2.copy_(torch.log(layer.weight**2) + torch.tensor([-5.0, 2.0, 3.5, 9.0]))
    assert "prune_in_training=True" in repr(layer)
    keep = layer.keep_mask()
    assert keep.tolist() == [[True, True, False, False]] * 3
    x = torch.randn(7, 4, dtype=torch.float64)
    mean, variance = layer.moments(x)
    pruned = layer.weight * keep
    torch.testing.assert_close(mean, F.linear(x, pruned, layer.bias))
    torch.testing.assert_close(variance, F.linear(x * x, layer._weight_variance() * keep))
    # The training output has the pruned layer's moments, and pruned weights get no likelihood
    # gradient (only the KL reaches their log sigma^2).
    layer(x, seed=3).sum().backward()
    assert layer.weight.grad is not None
    assert layer.log_sigma2.grad is not None
    assert layer.weight.grad[:, 2:].abs().sum() == 0
    assert layer.weight.grad[:, :2].abs().sum() > 0
    assert layer.log_sigma2.grad[:, 2:].abs().sum() == 0
    # Training and eval now agree in mean: eval is the pruned mean.
    torch.testing.assert_close(layer.eval()(x), mean)
    with pytest.raises(TypeError, match="prune_in_training must be a bool"):
        SparseVariationalLinear(4, 3, prune_in_training=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: SparseVariationalConv1d(4, 2, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        lambda: SparseVariationalConv2d(2, 4, (3, 1), padding="valid"),
        lambda: SparseVariationalConv3d(2, 2, 2, padding=1),
    ],
)
def test_exported_conv_reproduces_eval_exactly(make: Callable[[], nn.Module]) -> None:
    layer = make()
    with torch.no_grad():
        layer.log_sigma2.uniform_(-12.0, 4.0)  # prunes part of the weights
    assert 0.0 < layer.sparsity() < 1.0
    x = torch.randn(3, layer.in_channels, *([6] * len(layer.kernel_size)))
    exported = layer.export()
    assert isinstance(exported, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    assert torch.equal(layer.eval()(x), exported(x))
    csr = layer.to_sparse("csr")
    assert torch.equal(csr.to_dense(), layer.pruned_weight().reshape(layer.out_channels, -1))


def test_sparsity_report_on_a_hand_made_model() -> None:
    first = SparseVariationalLinear(4, 2)  # 8 weights, 6 pruned
    conv = SparseVariationalConv2d(2, 2, 1)  # 4 weights, 1 pruned
    model = nn.Sequential(first, nn.ReLU(), nn.Sequential(conv), nn.Linear(3, 3))
    with torch.no_grad():
        first.log_sigma2.view(-1)[:6] = 20.0
        conv.log_sigma2.view(-1)[3] = 20.0
    report = sparsity_report(model)
    assert report["layers"] == {
        "0": {"kept": 2, "total": 8, "sparsity": 0.75},
        "2.0": {"kept": 3, "total": 4, "sparsity": 0.25},
    }
    assert (report["kept"], report["total"]) == (5, 12)
    assert report["sparsity"] == pytest.approx(7 / 12)
    assert report["compression"] == pytest.approx(12 / 5)
    assert sparsity_report(first)["layers"].keys() == {""}
    with torch.no_grad():
        conv.log_sigma2.fill_(20.0)
        first.log_sigma2.fill_(20.0)
    assert sparsity_report(model)["compression"] == math.inf
    empty = sparsity_report(nn.Linear(2, 2))
    assert empty == {"layers": {}, "kept": 0, "total": 0, "sparsity": 0.0, "compression": 1.0}


# ---------------------------------------------------------------------------------------------
# regularization protocol and warm-up


class _Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def regularization(self) -> torch.Tensor:
        return self.value * 1.0


def test_regularization_loss_sums_over_nested_modules() -> None:
    svd = SparseVariationalLinear(3, 2)
    vd = VariationalConv1d(2, 2, 1)
    shared = _Constant(2.5)
    model = nn.Sequential(svd, nn.Sequential(vd, nn.Sequential(shared, nn.ReLU())), shared)
    assert isinstance(svd, Regularized)
    assert isinstance(shared, Regularized)
    assert not isinstance(nn.ReLU(), Regularized)
    loss = regularization_loss(model)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, svd.kl() + vd.kl() + 2.5)  # the shared module counts once
    loss.backward()
    assert svd.log_sigma2.grad is not None
    assert vd.log_alpha.grad is not None
    assert shared.value.grad == 1.0
    zero = regularization_loss(nn.Linear(2, 2, dtype=torch.float64))
    assert zero.dim() == 0
    assert zero.item() == 0.0
    assert zero.dtype == torch.float64
    assert regularization_loss(nn.ReLU()).dtype == torch.get_default_dtype()


def test_regularization_loss_refuses_bad_terms() -> None:
    class Bad(nn.Module):
        def regularization(self) -> torch.Tensor:
            return torch.ones(2)

    with pytest.raises(TypeError, match=r"Bad.regularization\(\) must return a 0-d tensor, got shape \(2,\)"):
        regularization_loss(nn.Sequential(Bad()))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        regularization_loss("model")  # type: ignore[arg-type]


def test_kl_warmup_schedule() -> None:
    warmup = KLWarmup(5, 20)
    assert [warmup.weight(e) for e in (0, 4, 5)] == [0.0, 0.0, 0.0]
    assert warmup.weight(12.5) == pytest.approx(0.5)
    assert warmup.weight(8) == pytest.approx(0.2)
    assert [warmup.weight(e) for e in (20, 21, 200)] == [1.0, 1.0, 1.0]
    scaled = KLWarmup(0, 10, max_weight=0.5)
    assert scaled.weight(5) == pytest.approx(0.25)
    assert scaled.weight(10) == 0.5
    step = KLWarmup(3, 3)
    assert [step.weight(e) for e in (2.9, 3, 4)] == [0.0, 1.0, 1.0]
    assert repr(warmup) == "KLWarmup(start_epoch=5.0, end_epoch=20.0, max_weight=1.0)"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"start_epoch": 5, "end_epoch": 2}, ValueError, "end_epoch must be >= start_epoch \\(5\\), got 2"),
        ({"start_epoch": -1, "end_epoch": 2}, ValueError, "start_epoch must be a finite number >= 0, got -1"),
        ({"start_epoch": True, "end_epoch": 2}, TypeError, "start_epoch must be a number, got bool"),
        ({"start_epoch": 0, "end_epoch": "9"}, TypeError, "end_epoch must be a number, got str"),
        ({"start_epoch": 0, "end_epoch": math.inf}, ValueError, "end_epoch must be a finite number"),
        (
            {"start_epoch": 0, "end_epoch": 2, "max_weight": 0.0},
            ValueError,
            "max_weight must be a finite float > 0",
        ),
        ({"start_epoch": 0, "end_epoch": 2, "max_weight": None}, TypeError, "max_weight must be a float"),
    ],
)
def test_kl_warmup_validation(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        KLWarmup(**kwargs)  # type: ignore[arg-type]


def test_kl_warmup_refuses_a_negative_epoch() -> None:
    with pytest.raises(ValueError, match="epoch must be a finite number >= 0, got -1"):
        KLWarmup(0, 1).weight(-1)


# ---------------------------------------------------------------------------------------------
# gradients


class _KL(nn.Module):
    """Calls ``layer.kl()`` as ``forward``, so ``functional_call`` can substitute its parameters."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self) -> torch.Tensor:
        return self.layer.kl()


def test_gradcheck_variational_linear() -> None:
    layer = VariationalLinear(4, 3, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    theta = layer.weight.detach().clone().requires_grad_()
    log_alpha = torch.empty(3, 4, dtype=torch.float64).uniform_(-3.0, -0.5).requires_grad_()

    def forward(theta: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
        params = {"weight": theta, "log_alpha": log_alpha, "bias": layer.bias}
        return functional_call(layer, params, (x,), {"seed": 7})

    assert torch.autograd.gradcheck(forward, (theta, log_alpha))
    assert torch.autograd.gradcheck(
        lambda la: functional_call(_KL(layer), {"layer.log_alpha": la}, ()), (log_alpha,)
    )


def test_gradcheck_sparse_variational_layers() -> None:
    linear = SparseVariationalLinear(4, 3, dtype=torch.float64)
    conv = SparseVariationalConv2d(2, 2, 2, padding=1, dtype=torch.float64)
    for layer, x in (
        (linear, torch.randn(5, 4, dtype=torch.float64)),
        (conv, torch.randn(2, 2, 3, 3, dtype=torch.float64)),
    ):
        theta = layer.weight.detach().clone()
        theta = torch.where(theta.abs() < 0.05, torch.full_like(theta, 0.1), theta).requires_grad_()
        # log alpha = log sigma2 - log theta^2 stays well inside the clipping range [-8, 8].
        log_sigma2 = (
            torch.log(theta.detach() ** 2) + torch.empty_like(theta).uniform_(-4.0, 2.0)
        ).requires_grad_()

        def forward(
            theta: torch.Tensor, log_sigma2: torch.Tensor, layer: nn.Module = layer, x: torch.Tensor = x
        ) -> torch.Tensor:
            params = {"weight": theta, "log_sigma2": log_sigma2, "bias": layer.bias}
            return functional_call(layer, params, (x,), {"seed": 11})

        def kl(theta: torch.Tensor, log_sigma2: torch.Tensor, layer: nn.Module = layer) -> torch.Tensor:
            return functional_call(_KL(layer), {"layer.weight": theta, "layer.log_sigma2": log_sigma2}, ())

        assert torch.autograd.gradcheck(forward, (theta, log_sigma2))
        assert torch.autograd.gradcheck(kl, (theta, log_sigma2))


def test_gradcheck_variational_conv_unit_alpha() -> None:
    layer = VariationalConv2d(2, 2, 2, alpha_shape="unit", dtype=torch.float64)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    log_alpha = torch.tensor([-2.0, -0.7], dtype=torch.float64).requires_grad_()

    def forward(log_alpha: torch.Tensor) -> torch.Tensor:
        params = {"weight": layer.weight, "log_alpha": log_alpha, "bias": layer.bias}
        return functional_call(layer, params, (x,), {"seed": 2})

    assert torch.autograd.gradcheck(forward, (log_alpha,))


# ---------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: VariationalLinear(0, 3), ValueError, "in_features must be a positive int, got 0"),
        (lambda: VariationalLinear(2.0, 3), TypeError, r"in_features must be an int, got float \(2.0\)"),
        (lambda: SparseVariationalLinear(2, -1), ValueError, "out_features must be a positive int, got -1"),
        (lambda: VariationalLinear(2, 3, bias=1), TypeError, r"bias must be a bool, got int \(1\)"),
        (
            lambda: VariationalLinear(2, 3, alpha_shape="row"),
            ValueError,
            "alpha_shape must be 'weight' or 'unit', got 'row'",
        ),
        (
            lambda: VariationalLinear(2, 3, alpha_shape=None),
            TypeError,
            "alpha_shape must be a str, got NoneType",
        ),
        (
            lambda: VariationalLinear(2, 3, init_log_alpha=0.5),
            ValueError,
            r"init_log_alpha must be <= 0 \(alpha <= 1\), got 0.5",
        ),
        (
            lambda: VariationalLinear(2, 3, init_log_alpha=math.nan),
            ValueError,
            "init_log_alpha must be finite, got nan",
        ),
        (
            lambda: SparseVariationalLinear(2, 3, threshold="3"),
            TypeError,
            r"threshold must be a float, got str \('3'\)",
        ),
        (
            lambda: SparseVariationalLinear(2, 3, threshold=math.inf),
            ValueError,
            "threshold must be finite, got inf",
        ),
        (
            lambda: SparseVariationalLinear(2, 3, init_log_sigma2=math.nan),
            ValueError,
            "init_log_sigma2 must be finite",
        ),
        (
            lambda: VariationalConv2d(2, 3, (3,)),
            ValueError,
            r"kernel_size must be an int or 2 ints, got \(3,\)",
        ),
        (lambda: VariationalConv2d(2, 3, 0), ValueError, "kernel_size entries must be >= 1, got 0"),
        (lambda: VariationalConv1d(2, 3, 1.5), TypeError, "kernel_size must contain ints, got 1.5"),
        (
            lambda: SparseVariationalConv2d(2, 3, 3, padding=-1),
            ValueError,
            "padding entries must be >= 0, got -1",
        ),
        (
            lambda: SparseVariationalConv2d(2, 3, 3, padding="full"),
            ValueError,
            "padding must be 'same', 'valid' or ints, got 'full'",
        ),
        (
            lambda: SparseVariationalConv2d(2, 3, 3, stride=2, padding="same"),
            ValueError,
            "padding='same' needs stride 1, got stride=2",
        ),
        (
            lambda: SparseVariationalConv1d(2, 3, 3, groups=2),
            ValueError,
            "must be divisible by groups, got groups=2",
        ),
        (
            lambda: SparseVariationalConv3d(2, 2, 3, groups=0),
            ValueError,
            "groups must be a positive int, got 0",
        ),
    ],
)
def test_constructor_validation(build: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build()


def test_forward_and_export_validation() -> None:
    linear = VariationalLinear(4, 2)
    with pytest.raises(ValueError, match=r"VariationalLinear expects input of shape \(\*, 4\), got \(3, 5\)"):
        linear(torch.randn(3, 5))
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch.int64"):
        linear(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        linear([1.0, 2.0, 3.0, 4.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass at most one of seed and generator, got both"):
        linear(torch.randn(3, 4), seed=1, generator=torch.Generator())
    conv = SparseVariationalConv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"SparseVariationalConv2d expects 3-D or 4-D input"):
        conv(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"expects 2 input channels, got input of shape \(1, 3, 5, 5\)"):
        conv(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="layout must be 'coo' or 'csr', got 'csc'"):
        conv.to_sparse("csc")
    with pytest.raises(TypeError, match="layout must be a str, got int"):
        conv.to_sparse(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got int"):
        sparsity_report(3)  # type: ignore[arg-type]
