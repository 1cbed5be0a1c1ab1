"""The four Srivastava et al. (2014) reproductions of ``dropkit reproduce``: ``mnist-mlp``,
``ensemble-vs-scaling``, ``rate-and-size`` and ``coadaptation``.

Each runs once at the tiny scale on the embedded digits (results JSON-serialisable and
deterministic, a summary with a verdict, tables and drawable figures), then the science is
checked on what the runs return and on re-derived values, and every verdict rule on hand-made
results: held, not held, and undecided (tiny scale, one seed).
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import dropkit
from dropkit.experiments.reproduce import coadaptation, ensemble_vs_scaling, mnist_mlp, rate_and_size
from dropkit.experiments.reproduce.api import Experiment, RunContext, Summary
from dropkit.experiments.reproduce.data import ImageSet, load_mnist_or_digits
from dropkit.experiments.reproduce.mnist_mlp import (
    SGDSchedule,
    apply_max_norm,
    build_mlp,
    classification_error,
    mean_se,
    resolved_sign,
)

pytest.importorskip("sklearn", reason="the tiny runs use scikit-learn's embedded digits")

MODULES = {
    "mnist-mlp": mnist_mlp,
    "ensemble-vs-scaling": ensemble_vs_scaling,
    "rate-and-size": rate_and_size,
    "coadaptation": coadaptation,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunContext, dict[str, Any]]]:
    """Each experiment's tiny run (seed 0), done once for the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name, module in MODULES.items():
            ctx = RunContext("tiny", None, tmp_path_factory.mktemp(name))
            runs[name] = (ctx, module.run_seed(ctx, 0))
        return runs
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train with one torch thread, as the tiny runs of the module fixture did; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def quick_ctx(tmp_path: Path) -> RunContext:
    return RunContext("quick", None, tmp_path)


# --- the contract, for all four ---------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_experiment_object(name: str) -> None:
    experiment = MODULES[name].EXPERIMENT
    assert isinstance(experiment, Experiment)
    assert experiment.name == name
    assert experiment.claim.statement
    assert experiment.claim.source
    assert experiment.claim.published
    assert "Srivastava" in experiment.claim.source
    assert set(experiment.default_seeds) == {"tiny", "quick", "full"}
    assert experiment.default_seeds["quick"] >= 2  # an error bar at the quick size


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.usefixtures("one_thread")
def test_tiny_result_is_json_and_deterministic(name: str, tiny: Mapping[str, Any]) -> None:
    ctx, result = tiny[name]
    assert json.loads(json.dumps(result)) == result
    assert result["data"] == "digits"
    again = MODULES[name].run_seed(ctx, 0)
    assert again == result


@pytest.mark.parametrize("name", MODULES)
def test_tiny_summary(name: str, tiny: Mapping[str, Any]) -> None:
    ctx, result = tiny[name]
    summary = MODULES[name].summarize(ctx, [result])
    assert isinstance(summary, Summary)
    assert summary.verdict.held is None  # the tiny scale never decides
    assert "tiny" in summary.verdict.text
    assert summary.ours
    assert summary.tables
    published = [t for t in summary.tables if any("published" in c for c in t.columns)]
    assert published, "a table with the published values beside ours"
    for table in summary.tables:
        assert all(len(row) == len(table.columns) for row in table.rows)
        assert all(isinstance(cell, str) and cell for row in table.rows for cell in row)
    assert any("digits" in note and "not MNIST" in note for note in summary.notes)
    json.dumps(dict(summary.metrics))
    assert summary.figures
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure as MplFigure

    for figure in summary.figures:
        canvas = MplFigure()
        figure.draw(canvas)
        assert canvas.axes, f"figure {figure.name} drew no axes"
        assert figure.caption


@pytest.mark.parametrize("name", MODULES)
def test_summarize_refuses_no_results(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="results must hold"):
        MODULES[name].summarize(quick_ctx(tmp_path), [])


@pytest.mark.parametrize("name", MODULES)
def test_one_seed_is_undecided(name: str, tiny: Mapping[str, Any], tmp_path: Path) -> None:
    _, result = tiny[name]
    verdict = MODULES[name].summarize(quick_ctx(tmp_path), [result]).verdict
    assert verdict.held is None
    assert "one seed" in verdict.text


# --- shared pieces ----------------------------------------------------------------------------


def test_mean_se_and_resolved_sign() -> None:
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5.0 / 3.0 / 4.0))
    assert math.isnan(mean_se([1.0])[1])
    with pytest.raises(ValueError, match="values"):
        mean_se([])
    assert resolved_sign([1.0, 1.1, 0.9]) == 1
    assert resolved_sign([-1.0, -1.1, -0.9]) == -1
    assert resolved_sign([1.0, -1.0, 0.5]) == 0
    assert resolved_sign([0.0, 0.0]) == 0  # a zero difference is never resolved
    assert resolved_sign([1.0, 1.1, 0.9], margin=2.0) == 0
    assert resolved_sign([3.0]) is None


def test_paired_se_is_mcnemar() -> None:
    # 30 examples only A gets wrong, 10 only B, 50 both, on 1000: sqrt(40 - 20**2 / 1000) / 1000.
    a = list(range(80))
    b = list(range(30, 90))
    assert mnist_mlp.paired_se(a, b, 1000) == pytest.approx(math.sqrt(40 - 0.4) / 1000)
    assert mnist_mlp.paired_se(a, a, 1000) == 0.0
    with pytest.raises(ValueError, match="n"):
        mnist_mlp.paired_se(a, b, 0)
    # The test-set floor joins the spread over seeds: a gain of 0.5 pp that the seeds agree on
    # is not resolved when the shared test set alone is that noisy.
    assert resolved_sign([0.005, 0.005]) == 1  # two seeds that happen to agree exactly
    assert resolved_sign([0.005, 0.005], floor=0.003) == 0
    assert resolved_sign([0.005, 0.0051, 0.0049], floor=0.002) == 1


def test_misclassified_matches_the_error() -> None:
    torch.manual_seed(0)
    model = build_mlp(5, [4], 3, hidden_retain=0.5)
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    wrong = mnist_mlp.misclassified(model, x, y)
    model.eval()
    expected = (model(x).argmax(1) != y).nonzero().flatten().tolist()
    assert wrong == expected
    assert classification_error(model, x, y) == len(expected) / 50
    assert model.training is False  # left as found


def test_build_mlp_variants_share_initial_weights() -> None:
    models = []
    for input_retain, hidden_retain in ((1.0, 1.0), (0.8, 0.5)):
        torch.manual_seed(3)
        models.append(build_mlp(12, [7, 5], 4, input_retain=input_retain, hidden_retain=hidden_retain))
    plain, dropped = ([m for m in model if isinstance(m, torch.nn.Linear)] for model in models)
    assert len(plain) == len(dropped) == 3
    for a, b in zip(plain, dropped, strict=True):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.bias, b.bias)
    rates = [(m.p, m.inverted) for m in models[1] if isinstance(m, dropkit.nn.Dropout)]
    assert rates == [(0.2, False), (0.5, False), (0.5, False)]
    assert not any(isinstance(m, dropkit.nn.Dropout) for m in models[0])


@pytest.mark.parametrize("retain", [0.0, 1.5, -0.1, True, "0.5"])
def test_build_mlp_rejects_bad_retain(retain: object) -> None:
    with pytest.raises(ValueError, match="hidden_retain"):
        build_mlp(4, [3], 2, hidden_retain=retain)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("epochs", 0, ValueError),
        ("lr", 0.0, ValueError),
        ("lr", "1", TypeError),
        ("lr_decay", 1.5, ValueError),
        ("momentum_end", 1.0, ValueError),
        ("max_norm", -1.0, ValueError),
        ("batch_size", 0, ValueError),
    ],
)
def test_schedule_rejects_bad_settings(field: str, value: object, error: type[Exception]) -> None:
    settings: dict[str, Any] = {"epochs": 2, "lr": 1.0, "lr_decay": 0.9, field: value}
    with pytest.raises(error, match=field):
        SGDSchedule(**settings)


def test_schedule_momentum_ramp_and_hinton_learning_rate() -> None:
    schedule = SGDSchedule(epochs=10, lr=2.0, lr_decay=0.5, momentum_epochs=4)
    assert [schedule.momentum(e) for e in (0, 2, 4, 9)] == pytest.approx([0.5, 0.725, 0.95, 0.95])
    # One update of a linear model with a known gradient: PyTorch's step lr is (1 - m) * eps.
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    x, target = torch.ones(1, 1), torch.ones(1, 1)
    mnist_mlp.train_sgd(
        torch.nn.Sequential(layer),
        x,
        target,
        SGDSchedule(epochs=1, lr=2.0, lr_decay=1.0, batch_size=1),
        seed=0,
        loss="mse",
    )
    # d/dw (w - 1)^2 at w = 0 is -2; the step is (1 - 0.5) * 2.0 * 2 = 2.
    assert float(layer.weight.detach()) == pytest.approx(2.0)


def test_train_sgd_rejects_unknown_loss() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="loss"):
        mnist_mlp.train_sgd(
            model,
            torch.zeros(4, 2),
            torch.zeros(4, dtype=torch.long),
            SGDSchedule(epochs=1, lr=1.0, lr_decay=1.0),
            seed=0,
            loss="hinge",
        )


def test_apply_max_norm_projects_hidden_rows_only() -> None:
    hidden, output = torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, -6.0]]))
        output.weight.fill_(10.0)
    apply_max_norm(torch.nn.Sequential(hidden, torch.nn.ReLU(), output), 2.0)
    rows = hidden.weight.detach()
    assert torch.allclose(rows[0], torch.tensor([1.2, 1.6]), atol=1e-5)  # 5 -> 2, same direction
    assert torch.equal(rows[1], torch.tensor([0.3, 0.4]))  # inside the ball: untouched
    assert torch.allclose(rows[2], torch.tensor([0.0, -2.0]), atol=1e-5)
    assert torch.equal(output.weight.detach(), torch.full((2, 3), 10.0))  # the output layer is free


@pytest.mark.parametrize("scale", ["tiny", "quick", "full"])
@pytest.mark.parametrize("data", ["mnist", "digits"])
def test_protocols_of_every_scale(scale: str, data: str, tmp_path: Path) -> None:
    """Every scale's settings build (no data needed), and the sizes grow with the scale."""
    images = ImageSet(data, torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 10, "none")
    ctx = RunContext(scale, None, tmp_path)  # type: ignore[arg-type]
    mlp = mnist_mlp.mlp_protocol(ctx, images)
    assert mlp.schedule.epochs >= 1
    assert set(mlp.lr) == set(mnist_mlp.MODELS)
    rates = rate_and_size.protocol(ctx, images)
    assert rates.q[-1] == 1.0
    assert all(0.0 < q <= 1.0 for q in rates.q)
    assert list(rates.sizes) == sorted(rates.sizes)
    n_train, _, schedule = coadaptation._protocol(ctx, data)
    assert schedule.epochs >= 1
    if scale == "full" and data == "mnist":
        assert mlp.hidden == (1024, 1024, 2048)  # Table 9's network
        assert mlp.n_train is None
        assert n_train is None
        assert rates.sizes[-1] == 50_000


# --- mnist-mlp --------------------------------------------------------------------------------


def test_mnist_mlp_tiny_science(tiny: Mapping[str, Any]) -> None:
    _, result = tiny["mnist-mlp"]
    models = result["models"]
    assert list(models) == list(mnist_mlp.MODELS)
    for record in models.values():
        assert 0.0 <= record["test_error"] < 0.5  # far below chance (0.9): the nets learned
    # The constraint holds after training, and binds at the tiny size (so the variant differs).
    # The constraint holds after training in the max-norm variant only.
    constrained = models["dropout + max-norm"]
    assert constrained["max_unit_norm"] <= mnist_mlp.MAX_NORM * (1 + 1e-5)
    assert constrained["schedule"]["max_norm"] == mnist_mlp.MAX_NORM
    assert models["dropout"]["schedule"]["max_norm"] is None
    assert models["no dropout"]["schedule"]["lr"] == mnist_mlp.LEARNING_RATES["no dropout"]


N_TEST = 10_000


def _wrong(error: float) -> list[int]:
    """Misclassified indices for an error rate on N_TEST examples, nested across rates (the
    models disagree only on the examples that make their difference)."""
    return list(range(round(error * N_TEST)))


def _mlp_results(errors: Mapping[str, list[float]], template: Mapping[str, Any]) -> list[dict[str, Any]]:
    seeds = len(next(iter(errors.values())))
    results = []
    for seed in range(seeds):
        record = copy.deepcopy(dict(template))
        record["n_test"] = N_TEST
        for name, values in errors.items():
            record["models"][name]["test_error"] = values[seed]
            record["models"][name]["wrong"] = _wrong(values[seed])
        results.append(record)
    return results


def test_mnist_mlp_verdict_rules(tiny: Mapping[str, Any], tmp_path: Path) -> None:
    _, template = tiny["mnist-mlp"]
    ctx = quick_ctx(tmp_path)
    held = _mlp_results(
        {
            "no dropout": [0.0160, 0.0162, 0.0158],
            "dropout": [0.0125, 0.0127, 0.0124],
            "dropout + max-norm": [0.0105, 0.0104, 0.0107],
        },
        template,
    )
    verdict = mnist_mlp.summarize(ctx, held).verdict
    assert verdict.held is True, verdict.text
    assert "1.25" in verdict.text or "1.2" in verdict.text
    # Max-norm gives nothing (identical errors): not resolved, so the claim did not hold.
    same = _mlp_results(
        {
            "no dropout": [0.0160, 0.0162, 0.0158],
            "dropout": [0.0125, 0.0127, 0.0124],
            "dropout + max-norm": [0.0125, 0.0127, 0.0124],
        },
        template,
    )
    verdict = mnist_mlp.summarize(ctx, same).verdict
    assert verdict.held is False
    assert "not resolved" in verdict.text
    assert "tried" in verdict.text
    # Dropout worse than no dropout: reversed.
    reversed_ = _mlp_results(
        {
            "no dropout": [0.0120, 0.0121, 0.0119],
            "dropout": [0.0140, 0.0142, 0.0141],
            "dropout + max-norm": [0.0130, 0.0131, 0.0129],
        },
        template,
    )
    verdict = mnist_mlp.summarize(ctx, reversed_).verdict
    assert verdict.held is False
    assert "reversed" in verdict.text


# --- ensemble-vs-scaling ----------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_ensemble_weight_scaling_and_mc_come_from_the_same_model(tiny: Mapping[str, Any]) -> None:
    """Retrain the tiny model and recompute both errors by hand on the same test examples."""
    ctx, result = tiny["ensemble-vs-scaling"]
    _, protocol, data = mnist_mlp.load_protocol_data(ctx, 0)
    model, _ = mnist_mlp.train_variant(ctx, protocol, data, "dropout", 0)
    x, y = data[2][: result["n_test"]], data[3][: result["n_test"]]
    assert classification_error(model, x, y) == pytest.approx(result["ws_error"], abs=1e-12)
    samples = dropkit.mc_predict(model, x, T=result["k"][-1], seed=0)
    single = float((samples[0].argmax(1) != y).double().mean())
    assert single == pytest.approx(result["mc_error"][0], abs=1e-12)
    averaged = samples.double().softmax(-1).mean(0).argmax(1)
    assert float((averaged != y).double().mean()) == pytest.approx(result["mc_error"][-1], abs=1e-12)


def test_ensemble_tiny_science(tiny: Mapping[str, Any]) -> None:
    _, result = tiny["ensemble-vs-scaling"]
    assert result["k"] == list(range(1, len(result["k"]) + 1))
    assert len(result["mc_error"]) == len(result["k"]) == len(result["mc_kl"])
    # The MC average approaches the weight-scaled prediction as k grows (nested samples).
    assert result["mc_kl"][-1] < result["mc_kl"][0]
    assert result["mc_agreement"][-1] > result["mc_agreement"][0]
    # One thinned network is worse than weight scaling at this size (by a wide margin).
    assert result["mc_error"][0] > result["ws_error"]


def _ensemble_results(
    template: Mapping[str, Any], curve: Callable[[int, int], float], ws: float, seeds: int = 3
) -> list[dict[str, Any]]:
    results = []
    for seed in range(seeds):
        record = copy.deepcopy(dict(template))
        record["k"] = list(range(1, 101))
        record["mc_error"] = [curve(k, seed) for k in record["k"]]
        record["mc_kl"] = [1.0 / k for k in record["k"]]
        record["mc_agreement"] = [1.0 - 0.1 / k for k in record["k"]]
        record["ws_error"] = ws
        record["tolerance"] = 0.001
        matching = [k for k in record["k"] if all(e <= ws + 0.001 for e in record["mc_error"][k - 1 :])]
        record["matching_k"] = matching[0] if matching else None
        results.append(record)
    return results


def test_ensemble_verdict_rules(tiny: Mapping[str, Any], tmp_path: Path) -> None:
    _, template = tiny["ensemble-vs-scaling"]
    ctx = quick_ctx(tmp_path)
    # Falls like 1/k from 5.2 % to weight scaling's 1.2 %, within tolerance from k = 40-50.
    held = _ensemble_results(template, lambda k, s: 0.012 + 0.040 / k + 0.0001 * s, 0.012)
    verdict = ensemble_vs_scaling.summarize(ctx, held).verdict
    assert verdict.held is True, verdict.text
    assert all(r["matching_k"] >= ensemble_vs_scaling.MIN_MATCHING_K for r in held)
    # Never reaches weight scaling: 0.5 pp above it even at k = 100.
    never = _ensemble_results(template, lambda k, s: 0.017 + 0.040 / k + 0.0001 * s, 0.012)
    verdict = ensemble_vs_scaling.summarize(ctx, never).verdict
    assert verdict.held is False
    assert "still" in verdict.text
    assert "never" in verdict.text
    # Matches after two samples: not "about 50".
    early = _ensemble_results(template, lambda k, s: 0.012 + (0.01 if k == 1 else 0.0) + 0.0001 * s, 0.012)
    verdict = ensemble_vs_scaling.summarize(ctx, early).verdict
    assert verdict.held is False
    assert "already below" in verdict.text


# --- rate-and-size ----------------------------------------------------------------------------


def test_rate_and_size_tiny_structure(tiny: Mapping[str, Any]) -> None:
    ctx, result = tiny["rate-and-size"]
    p = rate_and_size.protocol(ctx, load_mnist_or_digits(ctx))
    assert result["fixed_n"]["width"] == [float(p.width)] * len(p.q)
    for q, width in zip(result["fixed_qn"]["q"], result["fixed_qn"]["width"], strict=True):
        assert width == round(p.qn / q)
    errors = result["fixed_n"]["test_error"] + result["fixed_qn"]["test_error"]
    errors += result["sizes"]["no dropout"] + result["sizes"]["dropout"]
    assert all(0.0 <= e < 0.9 for e in errors)  # every net learned something
    assert result["sizes"]["n"] == [float(n) for n in p.sizes]


def _rate_results(
    template: Mapping[str, Any],
    fixed_n: list[float],
    fixed_qn: list[float],
    sizes: Mapping[str, list[float]],
    seeds: int = 3,
) -> list[dict[str, Any]]:
    q = [0.2, 0.4, 0.6, 0.8, 1.0]
    results = []
    for seed in range(seeds):
        jitter = 0.0002 * seed
        record = copy.deepcopy(dict(template))
        record["n_test"] = N_TEST
        curves = {"fixed_n": [e + jitter for e in fixed_n], "fixed_qn": [e + jitter for e in fixed_qn]}
        for sweep, errors in curves.items():
            record[sweep] = {
                "q": q,
                "width": [256.0] * 5 if sweep == "fixed_n" else [round(128 / v) * 1.0 for v in q],
                "test_error": errors,
                "wrong": [_wrong(e) for e in errors],
            }
        by_size = {
            "no dropout": [e + jitter for e in sizes["no dropout"]],
            "dropout": [e + jitter * (1 + i) for i, e in enumerate(sizes["dropout"])],
        }
        record["sizes"] = {
            "n": [100.0, 500.0, 10_000.0],
            **by_size,
            "wrong": {name: [_wrong(e) for e in errors] for name, errors in by_size.items()},
        }
        results.append(record)
    return results


def test_rate_and_size_verdict_rules(tiny: Mapping[str, Any], tmp_path: Path) -> None:
    _, template = tiny["rate-and-size"]
    ctx = quick_ctx(tmp_path)
    flat = [0.030, 0.0130, 0.0125, 0.0131, 0.016]
    optimum = [0.030, 0.016, 0.0125, 0.014, 0.017]
    sizes = {"no dropout": [0.25, 0.10, 0.020], "dropout": [0.26, 0.10, 0.015]}
    held = rate_and_size.summarize(ctx, _rate_results(template, flat, optimum, sizes))
    assert held.verdict.held is True, held.verdict.text
    claims = held.tables[0]
    assert [row[-1] for row in claims.rows] == ["yes"] * 4
    # A slope inside 0.4-0.8 (1.3 % -> 2.0 %) is not flat.
    steep = [0.030, 0.020, 0.016, 0.013, 0.016]
    verdict = rate_and_size.summarize(ctx, _rate_results(template, steep, optimum, sizes)).verdict
    assert verdict.held is False
    assert rate_and_size.CLAIMS[0] in verdict.text
    # The optimum at q = 1 with q·n fixed.
    at_one = [0.030, 0.016, 0.015, 0.014, 0.012]
    verdict = rate_and_size.summarize(ctx, _rate_results(template, flat, at_one, sizes)).verdict
    assert verdict.held is False
    assert rate_and_size.CLAIMS[1] in verdict.text
    # A resolved gain on 100 examples contradicts "no gain".
    small_gain = {"no dropout": [0.25, 0.10, 0.020], "dropout": [0.20, 0.10, 0.015]}
    verdict = rate_and_size.summarize(ctx, _rate_results(template, flat, optimum, small_gain)).verdict
    assert verdict.held is False
    assert rate_and_size.CLAIMS[2] in verdict.text
    # No gain anywhere (as a broken dropout would give) fails the large-set part.
    no_gain = {"no dropout": [0.25, 0.10, 0.020], "dropout": [0.26, 0.11, 0.021]}
    verdict = rate_and_size.summarize(ctx, _rate_results(template, flat, optimum, no_gain)).verdict
    assert verdict.held is False
    assert rate_and_size.CLAIMS[3] in verdict.text


# --- coadaptation -----------------------------------------------------------------------------


def test_coadaptation_tiny_science(tiny: Mapping[str, Any]) -> None:
    _ctx, result = tiny["coadaptation"]
    edges = result["edges"]
    assert edges[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(edges))
    for name, record in result["models"].items():
        # Every activation lands in a bin (larger ones in the last): the fractions sum to 1.
        assert math.fsum(record["histogram"]) == pytest.approx(1.0, abs=1e-9)
        assert len(record["unit_means"]) == coadaptation.HIDDEN
        # The overall mean is the mean of the units' means; ReLU outputs are never negative.
        assert record["mean"] == pytest.approx(
            math.fsum(record["unit_means"]) / coadaptation.HIDDEN, rel=1e-6
        )
        assert min(record["unit_means"]) >= 0.0
        assert 0.0 <= record["zero_fraction"] <= 1.0
        assert record["active_per_input"] == pytest.approx(
            coadaptation.HIDDEN * (1 - record["zero_fraction"])
        )
        assert record["test_reconstruction"] < 5.0, name  # the autoencoders learned something


def test_coadaptation_measures_the_hidden_units() -> None:
    torch.manual_seed(0)
    model = coadaptation.build_autoencoder(6, 5, retain=0.5)
    encoder, dropout = model[0], model[2]
    assert isinstance(encoder, torch.nn.Linear)
    assert isinstance(dropout, dropkit.nn.Dropout)
    assert not dropout.inverted
    x = torch.rand(8, 6)
    with torch.no_grad():
        expected = torch.relu(x @ encoder.weight.T + encoder.bias)
    model.eval()
    assert torch.allclose(coadaptation.hidden_activations(model, x), expected)
    with pytest.raises(ValueError, match="retain"):
        coadaptation.build_autoencoder(6, 5, retain=0.0)


def _coadaptation_results(
    template: Mapping[str, Any], means: Mapping[str, list[float]], zeros: Mapping[str, list[float]]
) -> list[dict[str, Any]]:
    results = []
    for seed in range(len(means["dropout"])):
        record = copy.deepcopy(dict(template))
        for name in coadaptation.MODELS:
            record["models"][name]["mean"] = means[name][seed]
            record["models"][name]["zero_fraction"] = zeros[name][seed]
        results.append(record)
    return results


def test_coadaptation_verdict_rules(tiny: Mapping[str, Any], tmp_path: Path) -> None:
    _, template = tiny["coadaptation"]
    ctx = quick_ctx(tmp_path)
    means = {"no dropout": [2.0, 2.1, 1.9], "dropout": [0.7, 0.72, 0.69]}
    zeros = {"no dropout": [0.30, 0.31, 0.29], "dropout": [0.60, 0.62, 0.61]}
    verdict = coadaptation.summarize(ctx, _coadaptation_results(template, means, zeros)).verdict
    assert verdict.held is True, verdict.text
    assert "0.35" in verdict.text  # the published ratio beside ours
    denser = {"no dropout": [0.60, 0.62, 0.61], "dropout": [0.30, 0.31, 0.29]}
    verdict = coadaptation.summarize(ctx, _coadaptation_results(template, means, denser)).verdict
    assert verdict.held is False
    assert "sparser" in verdict.text
    assert "tried" in verdict.text
    higher = {"no dropout": [0.7, 0.72, 0.69], "dropout": [2.0, 2.1, 1.9]}
    verdict = coadaptation.summarize(ctx, _coadaptation_results(template, higher, zeros)).verdict
    assert verdict.held is False
    assert "mean activation is not resolved lower" in verdict.text


# --- the dropout network trained once for mnist-mlp and ensemble-vs-scaling ---------------------


class _CountingTrainer:
    """``train_sgd`` that counts its calls (and can refuse to train)."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[str] = []
        self.refuse = refuse
        self.train = mnist_mlp.train_sgd

    def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        self.calls.append(str(kwargs.get("label", "")))
        if self.refuse:
            raise AssertionError(f"trained again: {kwargs.get('label')}")
        return self.train(*args, **kwargs)


def _shared_ctx(tmp_path: Path, name: str) -> RunContext:
    return RunContext("tiny", None, tmp_path / name, trained_dir=tmp_path / "_trained")


@pytest.mark.usefixtures("one_thread")
def test_ensemble_reuses_the_network_mnist_mlp_trained(
    tiny: Mapping[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same result as training again (the module fixture kept nothing), without training."""
    mnist_mlp.run_seed(_shared_ctx(tmp_path, "mnist-mlp"), 0)
    kept = sorted(p.name for p in (tmp_path / "_trained").iterdir())
    assert len(kept) == len(mnist_mlp.MODELS)
    assert all(name.endswith(".pt") for name in kept)
    monkeypatch.setattr(mnist_mlp, "train_sgd", _CountingTrainer(refuse=True))
    reused = ensemble_vs_scaling.run_seed(_shared_ctx(tmp_path, "ensemble-vs-scaling"), 0)
    assert reused == tiny["ensemble-vs-scaling"][1]


@pytest.mark.usefixtures("one_thread")
def test_kept_network_is_keyed_by_what_training_depends_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _shared_ctx(tmp_path, "ensemble-vs-scaling")
    trainer = _CountingTrainer()
    monkeypatch.setattr(mnist_mlp, "train_sgd", trainer)
    first = ensemble_vs_scaling.run_seed(ctx, 0)
    assert ensemble_vs_scaling.run_seed(ctx, 0) == first
    assert len(trainer.calls) == 1
    ensemble_vs_scaling.run_seed(ctx, 1)  # another seed: other weights, another subset
    assert len(trainer.calls) == 2
    _, protocol, data = mnist_mlp.load_protocol_data(ctx, 0)
    changed = (data[0].clone(), *data[1:])
    changed[0][0, 0] += 1.0  # one pixel of the training data
    mnist_mlp.train_variant(ctx, protocol, changed, "dropout", 0)
    assert len(trainer.calls) == 3
    assert len(list((tmp_path / "_trained").glob("*.pt"))) == 3


@pytest.mark.usefixtures("one_thread")
def test_damaged_kept_network_is_trained_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _shared_ctx(tmp_path, "ensemble-vs-scaling")
    first = ensemble_vs_scaling.run_seed(ctx, 0)
    (path,) = (tmp_path / "_trained").glob("*.pt")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    trainer = _CountingTrainer()
    monkeypatch.setattr(mnist_mlp, "train_sgd", trainer)
    assert ensemble_vs_scaling.run_seed(ctx, 0) == first
    assert len(trainer.calls) == 1
    assert path.stat().st_size > 100  # written again, whole


def test_a_context_without_trained_dir_keeps_nothing(tmp_path: Path) -> None:
    ctx = RunContext("tiny", None, tmp_path / "mnist-mlp")
    _, protocol, data = mnist_mlp.load_protocol_data(ctx, 0)
    mnist_mlp.train_variant(ctx, protocol, data, "no dropout", 0)
    assert list(tmp_path.rglob("*.pt")) == []


def test_suite_shares_the_network_and_a_fresh_run_trains_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dropkit.experiments.reproduce import runner

    trainer = _CountingTrainer()
    monkeypatch.setattr(mnist_mlp, "train_sgd", trainer)
    names = ["mnist-mlp", "ensemble-vs-scaling"]

    def run(resume: bool) -> None:
        options = runner.RunOptions(
            scale="tiny", output=tmp_path, resume=resume, threads=1, progress=False, formats=("svg",)
        )
        result = runner.run_suite(names, options, stream=io.StringIO())
        assert [o.status in ("failed", "skipped") for o in result.outcomes] == [False, False]

    run(resume=False)
    assert len(trainer.calls) == len(mnist_mlp.MODELS)  # the dropout network is trained once
    trainer.calls.clear()
    run(resume=False)  # replaces the seeds: trains again, once
    assert len(trainer.calls) == len(mnist_mlp.MODELS)
    trainer.calls.clear()
    for seed_file in tmp_path.glob("*/seed-*.json"):
        seed_file.unlink()
    run(resume=True)  # the seeds are gone, the networks are kept: nothing is trained
    assert trainer.calls == []
