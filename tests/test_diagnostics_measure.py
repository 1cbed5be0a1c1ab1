"""The measurements of ``dropkit.diagnostics``, checked against their formulas and sampling
distributions: Li et al.'s variance shift (measured against predicted within bounds derived from
the mask's variance), the ensemble gap (hand-computed cases, the metrics of ``dropkit.metrics``),
Wager et al.'s quadratic approximation against the exact dropout penalty (enumeration,
quadrature, Monte Carlo; its order in ``p`` for Gaussian and for Bernoulli noise), activation
statistics (binomial bounds), and ``measure`` end to end.  Fixed seeds; every statistical
margin is ``SIGMAS`` (6) standard deviations of the quantity's own sampling distribution."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.diagnostics import (
    adaptive_l2,
    dropout_penalty,
    ensemble_gap,
    li_variance_ratio,
    measure,
    measure_activations,
    measure_ensemble_gap,
    measure_variance_shift,
)
from dropkit.diagnostics.activations import activation_summary
from dropkit.diagnostics.adaptive_l2 import cumulant, find_head, measure_head_penalty
from dropkit.diagnostics.flow import trace_flow
from dropkit.metrics import regression as regression_metrics
from tests.conftest import SIGMAS, peak_cpu_bytes


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Variance shift (Li et al. 2019)


def test_li_ratio_closed_forms() -> None:
    assert li_variance_ratio(0.0, 2.0, 0.7).item() == pytest.approx(0.7)  # c = 0: q
    assert li_variance_ratio(1.0, 1.0, 0.5).item() == pytest.approx(1 / 3)  # 0.5 / (1 + 0.5)
    assert li_variance_ratio(3.0, 0.0, 0.5).item() == 0.0  # a constant unit: v = 0
    assert li_variance_ratio(0.0, 0.0, 0.5).item() == 1.0  # nothing varies: no shift
    assert li_variance_ratio(2.0, 1.0, 1.0).item() == 1.0  # nothing dropped
    ratios = li_variance_ratio(torch.tensor([0.0, 1.0, 2.0]), torch.ones(3), 0.8)
    assert torch.allclose(ratios, torch.tensor([0.8, 0.8 / 1.2, 0.8 / 1.8], dtype=torch.float64))
    # The ratio is Var_test / Var_train with Var_train = (c^2 + v)/q - c^2.
    c, v, q = 1.3, 0.4, 0.6
    assert li_variance_ratio(c, v, q).item() == pytest.approx(v / ((c * c + v) / q - c * c))
    with pytest.raises(ValueError, match=r"keep must be a float in \[0, 1\], got 1\.5"):
        li_variance_ratio(0.0, 1.0, 1.5)
    with pytest.raises(ValueError, match="var must be >= 0"):
        li_variance_ratio(0.0, -1.0, 0.5)


def _multiplier_moments(kind: str, p: float) -> tuple[float, float, float]:
    """Var[m], Var[m^2] and Cov[m^2, m] of the dropout multiplier m (E[m] = 1, E[m^2] = 1/q):
    m = r/q with r ~ Bernoulli(q), or m = 1 + u with u ~ N(0, p/q)."""
    q = 1 - p
    if kind == "bernoulli":
        return p / q, p / q**3, p / q**2
    s2 = p / q
    return s2, 4 * s2 + 2 * s2**2, 2 * s2


@pytest.mark.parametrize(
    ("layer", "kind"),
    [
        (nn.Dropout(0.3), "bernoulli"),
        (dropkit.nn.Dropout(0.3), "bernoulli"),
        (dropkit.nn.GaussianDropout(0.3), "gaussian"),
    ],
    ids=["torch", "dropkit", "gaussian"],
)
def test_measured_variance_shift_agrees_with_li_within_derived_bounds(layer: nn.Module, kind: str) -> None:
    """Inputs with different means and variances per channel go straight into dropout and then
    BatchNorm, as Li et al. assume.  Given the batch x (n rows, mean c, mean square m2), the
    population variance S of y = m x has E[S] = m2 E[m^2] - c^2 - Var[m] m2 / n with
    E[m^2] = 1/q for standard and for Gaussian dropout alike (so both shift the variance by
    Li et al.'s ratio), and, linearized, Var[S] = sum_i x_i^2 (x_i^2 Var[m^2]
    - 4 c x_i Cov[m^2, m] + 4 c^2 Var[m]) / n^2; averaging R passes divides it by R."""
    torch.manual_seed(0)
    n, repeats, p = 4096, 8, 0.3
    q = 1 - p
    means = torch.tensor([0.0, 1.0, -2.0, 0.5])
    stds = torch.tensor([1.0, 0.5, 2.0, 1.0])
    x = torch.randn(n, 4) * stds + means
    model = nn.Sequential(layer, nn.BatchNorm1d(4)).eval()
    before = copy.deepcopy(model.state_dict())
    (shift,) = measure_variance_shift(model, x, repeats=repeats, seed=1)

    x64 = x.double()
    c, m2 = x64.mean(0), x64.square().mean(0)
    v = x64.var(0, correction=0)
    assert shift.batchnorm == "1"
    assert shift.sites == ("0",)
    assert shift.keep == pytest.approx(q)
    assert torch.allclose(shift.mean, c)
    assert torch.allclose(shift.var, v)
    assert torch.allclose(shift.predicted, li_variance_ratio(c, v, q))

    var_m, var_m2, cov = _multiplier_moments(kind, p)
    expected_train = m2 / q - c.square() - var_m * m2 / n
    terms = x64.square() * (x64.square() * var_m2 - 4 * c * x64 * cov + 4 * c.square() * var_m)
    sigma_train = terms.sum(0).sqrt() / n / math.sqrt(repeats)
    assert ((shift.train_var - expected_train).abs() <= SIGMAS * sigma_train).all(), (
        shift.train_var,
        expected_train,
        sigma_train,
    )
    # The ratio: the prediction from the same batch, the O(1/n) bias, and the noise of the masks.
    sigma_ratio = v * sigma_train / expected_train.square()
    bias = (v / expected_train - shift.predicted).abs()
    assert ((shift.measured - shift.predicted).abs() <= SIGMAS * sigma_ratio + bias).all()
    # Li et al.'s shift is large here: the ratio is q for the centred channel, far less for the others.
    assert shift.predicted[0].item() == pytest.approx(q, abs=0.01)
    assert shift.predicted[1].item() == pytest.approx(0.7 * 0.25 / (0.25 + 0.3 * 1.0), abs=0.02)
    # Measuring changes nothing: BatchNorm's statistics stay as they were.
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_variance_shift_with_only_the_feeding_dropout_on() -> None:
    """An upstream dropout is off while measuring a BatchNorm's shift, so the ratio is that of
    the feeding site alone (q = 0.5 for a centred input), not of both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 6, bias=False), nn.Dropout(0.5), nn.BatchNorm1d(6))
    (shift,) = measure_variance_shift(model, torch.randn(2048, 6), repeats=8)
    assert shift.sites == ("2",)
    # Linear maps of centred inputs: c ~ 0, so the ratio is ~q = 0.5 (with two dropouts on it would be ~0.33).
    assert abs(shift.measured_mean - 0.5) < 0.05
    assert shift.standard_error.max() < 0.02


def test_no_shift_without_a_batchnorm_after_dropout() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    assert measure_variance_shift(model, torch.randn(8, 4)) == []


# ---------------------------------------------------------------------------------------------
# Ensemble gap (Srivastava et al. 2014, Fig. 11)


def test_ensemble_gap_by_hand() -> None:
    ws = torch.zeros(1, 2, dtype=torch.float64)  # probabilities (0.5, 0.5)
    logit = math.log(9.0)
    samples = torch.tensor([[[logit, 0.0]], [[0.0, logit]]], dtype=torch.float64)  # (0.9, 0.1), (0.1, 0.9)
    gap = ensemble_gap(ws, samples, torch.tensor([0]), T_values=(1, 2))
    kl_1 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert gap.mc["kl"] == pytest.approx([kl_1, 0.0], abs=1e-12)
    assert gap.mc["nll"] == pytest.approx([-math.log(0.9), -math.log(0.5)])
    assert gap.weight_scaling == pytest.approx({"error": 0.0, "nll": math.log(2.0)})
    assert gap.mc["error"] == [0.0, 0.0]  # a tie (0.5, 0.5) goes to class 0
    assert gap.mc["agreement"] == [1.0, 1.0]


def test_matching_t_is_where_mc_error_stays_within_tolerance() -> None:
    correct, flipped = math.log(9.0), math.log(0.25)  # logit of the right class: p = 0.9, then 0.2
    labels = torch.ones(4, dtype=torch.long)
    ws = torch.full((4, 1), correct)  # one binary logit
    samples = torch.full((5, 4, 1), correct)
    samples[0] = flipped
    gap = ensemble_gap(ws, samples, labels, T_values=(1, 2, 5))
    assert gap.mc["error"] == [1.0, 0.0, 0.0]
    assert gap.tolerance == pytest.approx(0.25)  # sqrt(e(1-e)/N) is 0 here, so 1/N
    assert gap.matching_T == 2
    never = ensemble_gap(ws, samples[:1].expand(5, 4, 1).contiguous(), labels, T_values=(1, 5))
    assert never.matching_T is None
    assert ensemble_gap(ws, samples, T_values=(1, 5)).matching_T is None  # no targets
    assert "MC matches weight scaling from T = 2" in gap.table()


def test_regression_gap_matches_dropkit_metrics() -> None:
    torch.manual_seed(0)
    ws, y = torch.randn(10), torch.randn(10)
    samples = ws + 0.3 * torch.randn(20, 10)
    gap = ensemble_gap(ws, samples, y, T_values=(2, 20), noise_var=0.25)
    assert gap.task == "regression"
    for index, count in enumerate((2, 20)):
        mean = samples[:count].double().mean(0)
        assert gap.mc["error"][index] == pytest.approx(float((y.double() - mean).square().mean().sqrt()))
        assert gap.mc["distance"][index] == pytest.approx(float((mean - ws.double()).square().mean().sqrt()))
        ll = regression_metrics.gaussian_log_likelihood(samples[:count].double(), y.double(), tau=4.0)
        assert gap.mc["nll"][index] == pytest.approx(-float(ll))
    assert gap.weight_scaling["nll"] == pytest.approx(
        -float(regression_metrics.gaussian_log_likelihood(ws[None].double(), y.double(), tau=4.0))
    )
    # KL(N(ws, s2) || N(m, s2 + v)) with v = 0 and m = ws is 0; it grows with the spread.
    zero = ensemble_gap(ws, ws.expand(3, 10), y, T_values=(3,), noise_var=0.25)
    assert zero.mc["kl"] == [0.0]
    assert zero.mc["distance"] == [0.0]
    assert gap.mc["kl"][1] > 0


def test_model_ensemble_gap_closes_with_t_and_is_reproducible() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    gap = measure_ensemble_gap(model, x, y, T_values=(1, 10, 100), seed=3)
    # KL(ws || mean of T passes) falls roughly like 1/T: two orders of magnitude over 1 -> 100.
    assert gap.mc["kl"][2] < gap.mc["kl"][0] / 10
    assert gap.mc["agreement"][2] >= gap.mc["agreement"][0]
    assert gap.n == 64
    assert set(gap.mc) == {"error", "nll", "kl", "agreement"}
    assert measure_ensemble_gap(model, x, y, T_values=(1, 10, 100), seed=3) == gap
    assert model.training  # flags restored


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"T_values": (5, 2)}, ValueError, "strictly increasing"),
        ({"T_values": (0,)}, ValueError, "ints >= 1"),
        ({"T_values": 5}, TypeError, "non-empty sequence"),
        ({"task": "ranking", "T_values": (1,)}, ValueError, "task must be"),
        ({"tolerance": -1.0, "T_values": (1,)}, ValueError, "tolerance must be"),
        ({"T_values": (1, 50)}, ValueError, "fewer than max"),
    ],
)
def test_ensemble_gap_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ensemble_gap(torch.zeros(2, 3), torch.zeros(4, 2, 3), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Adaptive L2 (Wager et al. 2013)


def _brute_force(x: torch.Tensor, w: torch.Tensor, b: float, p: float, family: str) -> float:
    """Sum over examples of E[A(eta~)] - A(eta) by explicit enumeration of the masks."""
    q = 1 - p
    total = 0.0
    for mask in itertools.product([0, 1], repeat=x.shape[1]):
        kept = torch.tensor(mask, dtype=torch.float64)
        probability = math.prod(q if bit else p for bit in mask)
        eta = (x * kept / q) @ w + b
        total += probability * float(
            (cumulant(family, eta[:, None]) - cumulant(family, (x @ w + b)[:, None])).sum()
        )
    return total


def _logistic_problem(scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    w = scale * torch.randn(5, generator=generator, dtype=torch.float64)
    return x, w


@pytest.mark.parametrize("family", ["logistic", "poisson"])
def test_enumeration_is_the_exact_expectation(family: str) -> None:
    x, w = _logistic_problem(0.5)
    result = dropout_penalty(x, w, 0.3, p=0.2, family=family)
    assert result.method == "enumeration"
    assert result.exact_se == 0.0
    assert result.exact == pytest.approx(_brute_force(x, w, 0.3, 0.2, family), rel=1e-12)


def test_monte_carlo_agrees_with_enumeration_within_its_standard_error() -> None:
    x, w = _logistic_problem()
    exact = dropout_penalty(x, w, p=0.3)
    sampled = dropout_penalty(x, w, p=0.3, method="monte_carlo", samples=20_000, seed=5)
    assert sampled.method == "monte carlo"
    assert sampled.exact_se > 0
    assert abs(sampled.exact - exact.exact) <= SIGMAS * sampled.exact_se
    assert sampled.quadratic == exact.quadratic


def test_monte_carlo_memory_is_bounded_and_bernoulli_draws_do_not_depend_on_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2,000 x 784 features: 256 noised float64 copies at once would take 3.2 GB.
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2000, 784, generator=generator, dtype=torch.float64)
    w = 0.05 * torch.randn(784, generator=generator, dtype=torch.float64)
    results: list[object] = []
    peak = peak_cpu_bytes(
        lambda: results.append(dropout_penalty(x, w, p=0.5, method="monte_carlo", samples=64, seed=3))
    )
    assert peak < 600 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    monkeypatch.setattr(adaptive_l2, "_MC_CHUNK_ELEMENTS", 1 << 40)  # every draw in one chunk
    whole = dropout_penalty(x, w, p=0.5, method="monte_carlo", samples=64, seed=3)
    chunked = results[0]
    assert isinstance(chunked, adaptive_l2.AdaptiveL2)
    assert (chunked.exact, chunked.exact_se) == (whole.exact, whole.exact_se)


def test_gaussian_family_is_srivastavas_ridge() -> None:
    """A(eta) = eta^2/2: the penalty is exactly quadratic, (1/2)(p/q) ||Gamma w||^2 with
    Gamma = diag(X^T X)^(1/2) (Srivastava et al. 2014, §9.1, inverted scaling)."""
    x, w = _logistic_problem()
    p = 0.4
    ridge = 0.5 * p / (1 - p) * float((w.square() * x.square().sum(0)).sum())
    result = dropout_penalty(x, w, p=p, family="gaussian")
    assert result.method == "closed form"
    assert result.exact == pytest.approx(ridge)
    assert result.quadratic == pytest.approx(ridge)
    assert torch.allclose(result.l2_weights, 0.5 * p / (1 - p) * x.square().sum(0))
    sampled = dropout_penalty(x, w, p=p, family="gaussian", method="monte_carlo", samples=20_000)
    assert abs(sampled.exact - ridge) <= SIGMAS * sampled.exact_se


def test_quadrature_agrees_with_monte_carlo_for_gaussian_noise() -> None:
    x, w = _logistic_problem()
    exact = dropout_penalty(x, w, p=0.3, noise="gaussian")
    assert exact.method == "quadrature"
    sampled = dropout_penalty(x, w, p=0.3, noise="gaussian", method="monte_carlo", samples=20_000, seed=2)
    assert abs(sampled.exact - exact.exact) <= SIGMAS * sampled.exact_se


def test_wager_approximation_is_second_order_in_p_for_gaussian_noise() -> None:
    """With Gaussian dropout the neglected cumulants are O(p^2): the relative gap is
    k p + O(p^2), so halving p halves it ever more exactly (the ratio's distance from 2 halves
    too).  Computed by quadrature, exact to rounding."""
    x, w = _logistic_problem()
    rates = (0.04, 0.02, 0.01, 0.005, 0.0025)
    gaps = [dropout_penalty(x, w, p=p, noise="gaussian").relative_gap for p in rates]
    distances = [abs(gaps[index] / gaps[index + 1] - 2.0) for index in range(len(rates) - 1)]
    assert all(later <= 0.6 * earlier for earlier, later in itertools.pairwise(distances))
    assert distances[-1] < 0.1, distances
    # Standard (Bernoulli) dropout on the same problem: the gap tends to a constant instead.
    bernoulli = [dropout_penalty(x, w, p=p).relative_gap for p in rates]
    assert abs(bernoulli[-1] / bernoulli[-2] - 1.0) < 0.05


def test_wager_approximation_for_bernoulli_noise_is_exact_only_for_small_effects() -> None:
    """With standard dropout every cumulant of the multiplier is O(p): as p -> 0 the exact
    penalty over p tends to the sum of Bregman divergences D_A(eta - a, eta) over examples and
    features (one feature dropped at a time), not to Wager's (1/2) A'' a^2, so the relative gap
    tends to a constant; it vanishes as the effects a_ij = x_ij w_j shrink."""
    x, w = _logistic_problem()
    p = 1e-4
    result = dropout_penalty(x, w, p=p)
    eta = x @ w
    effects = x * w
    a, a_prime = F.softplus(eta)[:, None], torch.sigmoid(eta)[:, None]
    bregman = float((F.softplus(eta[:, None] - effects) - a + effects * a_prime).sum())
    quadratic = float(
        (0.5 * torch.sigmoid(eta) * (1 - torch.sigmoid(eta)))[:, None].mul(effects.square()).sum()
    )
    assert result.exact / p == pytest.approx(bregman, rel=20 * p * x.shape[1])
    assert result.quadratic / p == pytest.approx(quadratic, rel=2 * p)
    limit = 1 - quadratic / bregman  # the relative gap (R - R^q) / R as p -> 0
    assert abs(limit) > 0.01  # a real gap that p -> 0 does not close
    assert result.relative_gap == pytest.approx(limit, abs=0.01)
    gaps = [
        abs(dropout_penalty(*_logistic_problem(scale), p=0.1).relative_gap)
        for scale in (1.0, 0.5, 0.25, 0.125, 0.0625)
    ]
    assert gaps == sorted(gaps, reverse=True), gaps
    assert gaps[-1] < 0.01, gaps


def test_per_feature_terms() -> None:
    """The quadratic terms add up to the quadratic penalty; the exact single-feature penalties
    add up to the exact penalty up to O(p^2) (two features dropped together), so their relative
    difference halves with p."""
    x, w = _logistic_problem()
    result = dropout_penalty(x, w, p=0.1)
    assert float(result.per_feature_quadratic.sum()) == pytest.approx(result.quadratic, rel=1e-12)
    differences = []
    for p in (0.02, 0.01):
        at = dropout_penalty(x, w, p=p)
        differences.append(abs(float(at.per_feature_exact.sum()) - at.exact) / at.exact)
    assert 1.8 < differences[0] / differences[1] < 2.2


def test_multinomial_curvature_is_the_hessian_of_logsumexp() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, generator=generator, dtype=torch.float64)
    p = 0.2
    result = dropout_penalty(x, weight, bias, p=p, family="multinomial")
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(6):
        eta = weight @ x[i] + bias
        hessian = torch.autograd.functional.hessian(lambda e: torch.logsumexp(e, 0), eta)
        for j in range(3):
            expected[j] += 0.5 * p / (1 - p) * x[i, j] ** 2 * weight[:, j] @ hessian @ weight[:, j]
    assert torch.allclose(result.per_feature_quadratic, expected)
    assert result.method == "enumeration"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"p": 1.0}, ValueError, "p must be in \\[0, 1\\), got 1.0"),
        ({"p": 0.1, "family": "probit"}, ValueError, "family must be one of"),
        ({"p": 0.1, "noise": "uniform"}, ValueError, "noise must be one of"),
        ({"p": 0.1, "method": "exact"}, ValueError, "method must be"),
        ({"p": 0.1, "noise": "gaussian", "method": "enumeration"}, ValueError, "needs noise='bernoulli'"),
        ({"p": 0.1, "weight": torch.ones(3)}, ValueError, "weight has 3 features, features has 2"),
        ({"p": 0.1, "weight": torch.ones(2, 2)}, ValueError, "family='logistic' has one output"),
        ({"p": 0.1, "bias": "zero"}, TypeError, "bias must be a tensor, a float or None"),
    ],
)
def test_dropout_penalty_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    arguments: dict[str, object] = {"features": torch.ones(3, 2), "weight": torch.ones(2), **kwargs}
    with pytest.raises(error, match=match):
        dropout_penalty(**arguments)  # type: ignore[arg-type]


def test_head_penalty_uses_the_heads_features_and_the_sites_rate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.25), nn.Linear(6, 3))
    x = torch.randn(32, 4)
    flow = trace_flow(model, x)
    head, site = find_head(model, flow)  # type: ignore[misc]
    assert head is model[3]
    assert site.label == "2"
    result = measure_head_penalty(model, x, flow, task="classification")
    assert result is not None
    with torch.no_grad():
        features = torch.relu(model[0](x))
    expected = dropout_penalty(features, model[3].weight, model[3].bias, p=0.25, family="multinomial")
    assert (result.exact, result.quadratic, result.method) == (
        expected.exact,
        expected.quadratic,
        "enumeration",
    )
    assert torch.equal(result.per_feature_exact, expected.per_feature_exact)
    regression = measure_head_penalty(model, x, flow, task="regression")
    assert regression is not None
    assert regression.family == "gaussian"
    no_head = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.25), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(-1))
    assert find_head(no_head, trace_flow(no_head, x)) is not None  # softmax is not a layer
    other = nn.Sequential(nn.Dropout(0.25), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    assert find_head(other, trace_flow(other, x)) is None


# ---------------------------------------------------------------------------------------------
# Activations (Srivastava et al. 2014, Fig. 7-8)


def test_activation_statistics_follow_the_mask_distribution() -> None:
    """With dropout on, every non-zero unit is zeroed with probability p (a binomial count over
    the non-zero units of all passes) and the mean is preserved (its variance is
    (p/q) sum x^2 / (n R)^2 over the R passes)."""
    torch.manual_seed(0)
    p, repeats = 0.3, 4
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(p), nn.Linear(64, 2))
    x = torch.randn(256, 8)
    (stats,) = measure_activations(model, x, repeats=repeats, seed=7)
    with torch.no_grad():
        hidden = torch.relu(model[0](x)).double()
    n = hidden.numel()
    z0 = float((hidden == 0).double().mean())
    assert stats.site == "2"
    assert stats.rate == p
    assert stats.count == n
    assert stats.eval["zero_fraction"] == pytest.approx(z0)
    assert stats.eval["mean"] == pytest.approx(float(hidden.mean()))
    nonzero = n * repeats * (1 - z0)
    sigma_zeros = math.sqrt(nonzero * p * (1 - p)) / (n * repeats)
    assert abs(stats.dropout["zero_fraction"] - (z0 + p * (1 - z0))) <= SIGMAS * sigma_zeros
    sigma_mean = math.sqrt(p / (1 - p) * float(hidden.square().sum()) * repeats) / (n * repeats)
    assert abs(stats.dropout["mean"] - stats.eval["mean"]) <= SIGMAS * sigma_mean
    assert float(stats.eval_histogram.sum()) == pytest.approx(1.0)
    assert float(stats.dropout_histogram.sum()) == pytest.approx(1.0)
    assert stats.edges.numel() == 31


def test_a_diverged_model_is_measured_with_its_non_finite_fraction() -> None:
    """A layer whose output is partly NaN (one unit of 16 fed by a NaN weight) is summarized over
    its finite elements, with the NaN share reported exactly; an all-NaN layer gives NaN
    statistics and a fraction of 1, and the histograms hold only the finite elements."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.Dropout(0.5),
        nn.Linear(16, 4), nn.Dropout(0.5),
    )  # fmt: skip
    x = torch.randn(32, 8)
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")  # unit 0 of layer 3: NaN for every input
        model[5].weight.fill_(float("inf"))
        model[5].bias.zero_()
    first, partial, diverged = measure_activations(model, x, repeats=2, seed=1)
    assert first.eval["nonfinite_fraction"] == 0.0
    assert partial.eval["nonfinite_fraction"] == 1 / 16
    # With dropout on, a dropped NaN is an exact zero: only the kept ones stay NaN.
    assert 0 < partial.dropout["nonfinite_fraction"] < 1 / 16
    for summary in (partial.eval, partial.dropout):
        assert math.isfinite(summary["mean"])
        assert math.isfinite(summary["std"])
    with torch.no_grad():
        hidden = model[3](torch.relu(model[0](x))).double()[:, 1:]
    assert partial.eval["mean"] == pytest.approx(float(hidden.mean()))
    assert float(partial.eval_histogram.sum()) == pytest.approx(15 / 16)
    assert float(partial.dropout_histogram.sum()) == pytest.approx(1 - partial.dropout["nonfinite_fraction"])
    assert bool(torch.isfinite(partial.edges).all())
    assert diverged.eval["nonfinite_fraction"] > 0
    assert diverged.eval["nonfinite_fraction"] + float(diverged.eval_histogram.sum()) == pytest.approx(1.0)
    everything_nan = activation_summary(torch.full((3, 2), float("nan")))
    assert everything_nan["nonfinite_fraction"] == 1.0
    assert math.isnan(everything_nan["mean"])


def test_activations_skip_sites_that_drop_nothing() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), dropkit.nn.DropPath(0.2))
    assert measure_activations(model, torch.randn(4, 4)) == []


# ---------------------------------------------------------------------------------------------
# measure()


def test_measure_end_to_end_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    model[2].train()
    state = copy.deepcopy(model.state_dict())
    flags = [module.training for module in model.modules()]
    x, y = torch.randn(128, 4), torch.randint(0, 3, (128,))
    result = measure(model, x, y, T_values=(1, 5, 20))
    assert [shift.batchnorm for shift in result.variance_shift] == ["2"]
    assert result.ensemble_gap is not None
    assert result.ensemble_gap.T == (1, 5, 20)
    assert result.adaptive_l2 is not None
    assert result.adaptive_l2.p == 0.5
    assert [stats.site for stats in result.activations] == ["1", "4"]
    assert result.notes == []
    assert [module.training for module in model.modules()] == flags
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())
    data = result.to_dict()
    assert set(data) == {"variance_shift", "ensemble_gap", "adaptive_l2", "activations", "notes"}
    text = str(result)
    assert "Li et al. predict" in text
    assert "Wager's quadratic" in text
    assert "zeros" in text


def test_measure_without_dropout_says_what_it_could_not_do() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    result = measure(model, torch.randn(8, 4))
    assert result.ensemble_gap is None
    assert result.adaptive_l2 is None
    assert result.variance_shift == []
    assert result.activations == []
    assert len(result.notes) == 2


def test_measure_on_a_hugging_face_model() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    result = measure(
        model, {"input_ids": torch.randint(0, 99, (8, 5))}, torch.randint(0, 2, (8,)), T_values=(1, 4)
    )
    assert result.ensemble_gap is not None
    assert result.ensemble_gap.task == "classification"
    assert result.adaptive_l2 is not None
    assert result.adaptive_l2.family == "multinomial"
    assert "dropout" in [stats.site for stats in result.activations]
