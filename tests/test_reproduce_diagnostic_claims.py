"""``dropkit reproduce``: the variance-shift, adaptive-l2 and alpha-selu experiments (issue 17).

Each experiment runs once per seed at the tiny scale (module fixture, twice for determinism);
the scientific checks use controlled inputs and the verdict logic hand-made result dicts, so
that every assertion can fail on a bug and none depends on how well a tiny run trained.
"""

from __future__ import annotations

import copy
import io
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import dropkit
from dropkit.diagnostics.activations import measure_activations
from dropkit.diagnostics.adaptive_l2 import dropout_penalty
from dropkit.diagnostics.variance_shift import measure_variance_shift
from dropkit.experiments.reproduce import _stats, adaptive_l2, alpha_selu, variance_shift
from dropkit.experiments.reproduce.api import Experiment, RunContext, Summary

pytest.importorskip("sklearn")  # the tiny runs use the embedded digits

MODULES = {"variance-shift": variance_shift, "adaptive-l2": adaptive_l2, "alpha-selu": alpha_selu}


def _ctx(scale: str, work_dir: Path) -> RunContext:
    return RunContext(scale, None, work_dir)  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Each experiment's seed-0 result at the tiny scale, computed twice."""
    runs = {}
    for name, module in MODULES.items():
        ctx = _ctx("tiny", tmp_path_factory.mktemp(name))
        runs[name] = (module.run_seed(ctx, 0), module.run_seed(ctx, 0))
    return runs


# ---------------------------------------------------------------------------------------------
# The contract, for all three


@pytest.mark.parametrize("name", MODULES)
def test_experiment_object(name: str) -> None:
    experiment = MODULES[name].EXPERIMENT
    assert isinstance(experiment, Experiment)
    assert experiment.name == name
    assert set(experiment.default_seeds) == {"tiny", "quick", "full"}
    assert experiment.default_seeds["quick"] >= 2  # an error bar at the quick scale
    assert experiment.claim.statement
    assert experiment.claim.source
    assert experiment.claim.published


@pytest.mark.parametrize("name", MODULES)
def test_tiny_result_is_json_and_deterministic(
    name: str, tiny_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]]
) -> None:
    first, second = tiny_runs[name]
    text = json.dumps(first, allow_nan=False)
    assert json.loads(text) == first
    assert first == second


@pytest.mark.parametrize("name", MODULES)
def test_tiny_summary(
    name: str, tiny_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], tmp_path: Path
) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    result = json.loads(json.dumps(tiny_runs[name][0]))
    summary = MODULES[name].summarize(_ctx("tiny", tmp_path), [result])
    assert isinstance(summary, Summary)
    assert summary.verdict.held is None
    assert "tiny" in summary.verdict.text
    assert summary.tables
    assert summary.notes
    assert summary.ours  # the overview's short "ours" column
    published = [t for t in summary.tables if "published" in t.columns]
    assert published, "one table sets the published numbers beside ours"
    assert any("ours" in column for column in published[0].columns)
    for table in summary.tables:
        assert all(len(row) == len(table.columns) for row in table.rows)
        assert all(isinstance(cell, str) and cell for row in table.rows for cell in row)
    json.dumps(dict(summary.metrics), allow_nan=False)
    assert len({figure.name for figure in summary.figures}) == len(summary.figures) >= 1
    for figure in summary.figures:
        fig = Figure()
        figure.draw(fig)
        assert fig.axes
        fig.savefig(io.BytesIO(), format="png", dpi=20)


def test_summarize_refuses_no_results(tmp_path: Path) -> None:
    for module in MODULES.values():
        with pytest.raises(ValueError, match="at least one"):
            module.summarize(_ctx("quick", tmp_path), [])


def test_seed_stats_bind_the_summation() -> None:
    # 0.1 ten times and 0.2 add up to another mean left to right than exactly: the three
    # experiments of this file add left to right, and their bound helpers must say so.
    values = [0.1] * 10 + [0.2]
    stats = _stats.BUILTIN_SUM
    assert stats.summation == "sum"
    assert stats.mean_se(values) == _stats.mean_se(values, summation="sum") != _stats.mean_se(values)
    assert stats.json_pair(values) == _stats.json_pair(values, summation="sum")
    assert stats.json_pair([4.0]) == [4.0, None]
    for scale in (1.0, 100.0):
        assert stats.cell(values, scale=scale) == _stats.format_cell(values, scale=scale, summation="sum")
    # zero_se_below (adaptive-l2) shows a rounding-only SE as 0 in cells, and only there.
    pair = [0.1, 0.1 + 1e-12]
    rounding = replace(stats, zero_se_below=1e-9)
    assert stats.cell(pair, digits=15).endswith(" ± 5.0e-13")
    assert rounding.cell(pair, digits=15).endswith(" ± 0.0e+00")
    assert rounding.mean_se(pair) == stats.mean_se(pair)
    assert rounding.json_pair(pair) == stats.json_pair(pair)


# ---------------------------------------------------------------------------------------------
# variance-shift


def test_dropout_feeds_batchnorm_and_the_shift_follows_the_formula() -> None:
    torch.manual_seed(0)
    dropkit.manual_seed(0)
    model = variance_shift.build_network("before_bn", growth=4, layers=2, side=8)
    x = torch.rand(512, 1, 8, 8)
    shifts = measure_variance_shift(model, x, repeats=8, seed=0)
    # The BatchNorm inside each dense layer is fed directly by dropout.
    assert [s.batchnorm for s in shifts] == ["1.body.4", "2.body.4"]
    q = 1 - variance_shift.P
    for shift in shifts:
        assert shift.keep == pytest.approx(q)
        gap = (shift.measured - shift.predicted).abs()
        assert bool((gap <= 6 * shift.standard_error + 1e-3).all()), gap.max()
        # The ratio is at most q, and below it where a channel's mean is not 0 (ReLU -> conv).
        assert float(shift.predicted.max()) <= q + 1e-12
        assert float(shift.predicted.mean()) < q - 0.05
    # No dropout before a BatchNorm: nothing shifted.
    after = variance_shift.build_network("after_last_bn", growth=4, layers=2, side=8)
    assert measure_variance_shift(after, x, repeats=2) == []


def test_recalibration_removes_the_shift() -> None:
    torch.manual_seed(1)
    dropkit.manual_seed(1)
    model = variance_shift.build_network("before_bn", growth=4, layers=1, side=8)
    x = torch.rand(256, 1, 8, 8)
    norm = model[1].body[4]  # the BatchNorm fed by the first dropout
    inputs: list[torch.Tensor] = []
    handle = norm.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    # Running statistics learned with dropout on, as in training.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(x)
    learned = norm.running_var.clone()
    recalibrated = variance_shift.recalibrate_batchnorm(model, x, batch=256)
    again = variance_shift.recalibrate_batchnorm(model, x, batch=256)
    inputs.clear()
    with torch.no_grad():
        model.eval()(x)
    dims = [0, 2, 3]
    eval_var = inputs[0].var(dims)
    # Before: eval inputs have about q/(...) of the learned variance; after: the same.
    assert float((eval_var / learned).mean()) < 0.75
    recal_norm = recalibrated[1].body[4]
    ratio = eval_var / recal_norm.running_var
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=0.02)
    assert torch.equal(recal_norm.running_var, again[1].body[4].running_var)  # dropout was off
    assert torch.equal(norm.running_var, learned)  # the model itself is not changed
    assert not recalibrated.training
    handle.remove()


def test_build_network_validates() -> None:
    with pytest.raises(ValueError, match="variant must be one of"):
        variance_shift.build_network("dropout", growth=4, layers=2, side=8)
    with pytest.raises(ValueError, match="layers must be an int >= 1, got 0"):
        variance_shift.build_network("none", growth=4, layers=0, side=8)
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        variance_shift.recalibrate_batchnorm(torch.nn.BatchNorm1d(2), torch.zeros(3, 2), batch=0)


def _shift_results(
    base: dict[str, Any], eval_acc: list[float], recal_acc: list[float], off: float = 1.0
) -> list[dict[str, Any]]:
    """Seeds with the given accuracies of "dropout before BN"; other variants at 0.95."""
    results = []
    for seed, (acc, recal) in enumerate(zip(eval_acc, recal_acc, strict=True)):
        result = copy.deepcopy(base)
        for key in ("none", "after_last_bn"):
            result["variants"][key].update(accuracy=0.95 + 0.01 * seed, recalibrated_accuracy=0.95)
        before = result["variants"]["before_bn"]
        before.update(accuracy=acc, recalibrated_accuracy=recal)
        for shift in before["shifts"]:
            shift["measured"] = [off * v for v in shift["predicted"]]
        results.append(result)
    return results


def test_variance_shift_verdict(
    tiny_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], tmp_path: Path
) -> None:
    base = tiny_runs["variance-shift"][0]
    quick = _ctx("quick", tmp_path)
    held = variance_shift.summarize(quick, _shift_results(base, [0.60, 0.63, 0.61], [0.80, 0.82, 0.79]))
    assert held.verdict.held is True
    assert "77.42" in held.verdict.text
    no_gain = variance_shift.summarize(quick, _shift_results(base, [0.60, 0.63, 0.61], [0.60, 0.64, 0.60]))
    assert no_gain.verdict.held is False
    assert "re-estimating" in no_gain.verdict.text
    off_formula = variance_shift.summarize(
        quick, _shift_results(base, [0.60, 0.63, 0.61], [0.80, 0.82, 0.79], off=1.2)
    )
    assert off_formula.verdict.held is False
    assert "formula" in off_formula.verdict.text
    one_seed = variance_shift.summarize(quick, _shift_results(base, [0.6], [0.8]))
    assert one_seed.verdict.held is None
    tiny = variance_shift.summarize(_ctx("tiny", tmp_path), _shift_results(base, [0.6, 0.6], [0.8, 0.8]))
    assert tiny.verdict.held is None


def test_variance_shift_summary_with_gaussian_variant(
    tiny_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], tmp_path: Path
) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    results = _shift_results(tiny_runs["variance-shift"][0], [0.6, 0.62], [0.8, 0.81])
    for result in results:
        result["variants"]["gaussian_before_bn"] = copy.deepcopy(result["variants"]["before_bn"])
    summary = variance_shift.summarize(_ctx("full", tmp_path), results)
    detail = summary.tables[1]
    assert [row[0] for row in detail.rows] == list(variance_shift.VARIANTS.values())
    for figure in summary.figures:
        figure.draw(Figure())


# ---------------------------------------------------------------------------------------------
# adaptive-l2


def test_quadratic_penalty_matches_the_diagnostics() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(40, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, generator=generator, dtype=torch.float64)
    for p in (0.1, 0.5, 0.8):
        ours = float(adaptive_l2.quadratic_penalty(x, weight, 0.3, p))
        theirs = dropout_penalty(x, weight, 0.3, p=p).quadratic
        assert ours == pytest.approx(theirs, rel=1e-12)
    with pytest.raises(ValueError, match="p must be in"):
        adaptive_l2.quadratic_penalty(x, weight, 0.0, 1.0)


def test_fit_dropout_minimizes_the_expected_dropout_loss() -> None:
    # Three features: the expected loss over the 2**3 masks is exact, and its minimizer is
    # found by L-BFGS; dropout training must land on it, not on the unregularized fit.
    generator = torch.Generator().manual_seed(3)
    n, d, p = 300, 3, 0.5
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    beta = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    y = (torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(x @ beta)).double()
    codes = torch.arange(2**d)
    masks = ((codes[:, None] >> torch.arange(d)) & 1).double()
    chance = (1 - p) ** masks.sum(1) * p ** (d - masks.sum(1))

    def expected(weight: torch.Tensor, bias: torch.Tensor, rate: float) -> torch.Tensor:
        if rate == 0.0:
            return torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y)
        logits = (x[None] * masks[:, None] / (1 - rate)) @ weight + bias  # (masks, n)
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.expand_as(logits), reduction="none"
        ).mean(1)
        return (chance * losses).sum()

    def minimize(rate: float) -> torch.Tensor:
        weight = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = expected(weight, bias, rate)
            value.backward()
            return value

        optimizer.step(closure)
        return weight.detach()

    exact, unregularized = minimize(p), minimize(0.0)
    torch.manual_seed(0)
    dropkit.manual_seed(0)
    fitted, _ = adaptive_l2.fit_dropout(x, y, p, steps=600, replicas=8)
    scale = float(exact.norm())
    assert float((fitted - exact).norm()) < 0.05 * scale
    assert float((unregularized - exact).norm()) > 0.2 * scale  # dropout changes the fit


def test_one_class_features_and_simulation() -> None:
    x = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert adaptive_l2.one_class_features(x, torch.tensor([1.0, 1.0, 0.0])) == [0, 2]
    first = adaptive_l2.simulate_glm(50, 20, seed=4, features=5)
    second = adaptive_l2.simulate_glm(50, 20, seed=4, features=5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], adaptive_l2.simulate_glm(50, 20, seed=5, features=5)[0])
    with pytest.raises(ValueError, match="n_train must be an int >= 1, got 0"):
        adaptive_l2.simulate_glm(0, 20, seed=0)
    with pytest.raises(ValueError, match="exactly one of p and ridge"):
        adaptive_l2.fit_penalized(x.double(), torch.ones(3, dtype=torch.float64))


def _l2_results(base: dict[str, Any], correlation: float, penalty_loss: float) -> list[dict[str, Any]]:
    results = []
    for seed in range(3):
        result = copy.deepcopy(base)
        for task in result["tasks"].values():
            models = task["models"]
            models["dropout"]["test_loss"] = 0.50 + 0.01 * seed
            models["penalty"]["test_loss"] = penalty_loss + 0.01 * seed
            models["penalty"]["correlation_with_dropout"] = correlation - 0.005 * seed
            models["ridge"]["correlation_with_dropout"] = 0.70 + 0.01 * seed
        results.append(result)
    return results


def test_adaptive_l2_verdict(
    tiny_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], tmp_path: Path
) -> None:
    base = tiny_runs["adaptive-l2"][0]
    quick = _ctx("quick", tmp_path)
    held = adaptive_l2.summarize(quick, _l2_results(base, 0.98, 0.505))
    assert held.verdict.held is True
    assert "0.92" in held.verdict.text
    weak = adaptive_l2.summarize(quick, _l2_results(base, 0.60, 0.505))
    assert weak.verdict.held is False
    assert "correlate" in weak.verdict.text
    far = adaptive_l2.summarize(quick, _l2_results(base, 0.98, 0.60))
    assert far.verdict.held is False
    assert "test losses" in far.verdict.text
    assert adaptive_l2.summarize(_ctx("tiny", tmp_path), _l2_results(base, 0.98, 0.5)).verdict.held is None


# ---------------------------------------------------------------------------------------------
# alpha-selu


def test_mean_field_fixed_points() -> None:
    for p in (0.05, 0.1):
        mean, var = alpha_selu.mean_field_fixed_point("alpha", p)
        assert abs(mean) < 1e-6
        assert abs(var - 1) < 1e-6
        mean, var = alpha_selu.mean_field_fixed_point("standard", p)
        # Inverted dropout divides the second moment by q at every layer: the variance settles
        # well above 1 (1.62 at p = 0.1) and the mean above 0.
        assert var > 1 + 2 * p
        assert mean > 0
    assert (
        alpha_selu.mean_field_fixed_point("standard", 0.1)[1]
        > alpha_selu.mean_field_fixed_point("standard", 0.05)[1]
    )
    with pytest.raises(ValueError, match="p must be a float in"):
        alpha_selu.mean_field_fixed_point("alpha", 1.0)


def test_alpha_dropout_keeps_self_normalization_at_depth() -> None:
    # A wide deep SELU network at initialization on standard-normal inputs, training mode,
    # deepest layer, against the mean-field fixed point.  A finite network deviates from the
    # infinite-width limit by its weight draw; the same network with dropout off measures that
    # deviation (its fixed point is also (0, 1)), and the margin 0.05 covers the dropout masks
    # (about 1/sqrt(512 * 256) per pooled statistic) many times over.
    width, depth = 256, 24
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    last = {}
    for variant in alpha_selu.MEASURED:
        torch.manual_seed(5)
        dropkit.manual_seed(5)
        model = alpha_selu.build_selu_mlp(variant, 64, depth, width)
        stats = measure_activations(model, x, seed=0)
        assert len(stats) == depth
        last[variant] = stats[-1]
    off = last["alpha"].eval  # the same weights with dropout off
    margin_mean = abs(off["mean"]) + 0.05
    margin_var = abs(off["std"] ** 2 - 1) + 0.05
    for variant, site in last.items():
        want_mean, want_var = alpha_selu.mean_field_fixed_point(variant)
        assert abs(site.dropout["mean"] - want_mean) < margin_mean, variant
        assert abs(site.dropout["std"] ** 2 - want_var) < margin_var + 0.05 * want_var, variant
    assert abs(last["standard"].dropout["std"] ** 2 - 1) > 4 * margin_var  # the drift is seen


def test_build_selu_mlp_is_lecun_normal_and_validates() -> None:
    torch.manual_seed(0)
    model = alpha_selu.build_selu_mlp("none", features=400, depth=2, width=300)
    first = model[0]
    assert isinstance(first, torch.nn.Linear)
    assert float(first.weight.detach().std()) == pytest.approx(1 / math.sqrt(400), rel=0.02)
    assert float(first.bias.detach().abs().max()) == 0.0
    assert not any(isinstance(m, (dropkit.nn.Dropout, dropkit.nn.AlphaDropout)) for m in model)
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        alpha_selu.build_selu_mlp("alpha", features=4, depth=0, width=4)
    with pytest.raises(ValueError, match="variant must be one of"):
        alpha_selu.build_selu_mlp("gaussian", features=4, depth=1, width=4)


def _selu_results(base: dict[str, Any], alpha_var: float, standard_var: float) -> list[dict[str, Any]]:
    results = []
    for seed in range(3):
        result = copy.deepcopy(base)
        for key, var in (("alpha", alpha_var), ("standard", standard_var)):
            profile = result["variants"][key]["init"]
            layers = len(profile["train_var"])
            profile["train_mean"] = [0.01 * seed] * layers
            # The first layer carries the input's moments (ignored): the deeper half is judged.
            profile["train_var"] = [0.7] + [1.0] * (layers - 2) + [var + 0.01 * seed]
        results.append(result)
    return results


def test_alpha_selu_verdict(
    tiny_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], tmp_path: Path
) -> None:
    base = tiny_runs["alpha-selu"][0]
    quick = _ctx("quick", tmp_path)
    assert alpha_selu.summarize(quick, _selu_results(base, 1.0, 1.6)).verdict.held is True
    drifted = alpha_selu.summarize(quick, _selu_results(base, 1.3, 1.6))
    assert drifted.verdict.held is False
    assert "alpha dropout left the band" in drifted.verdict.text
    kept = alpha_selu.summarize(quick, _selu_results(base, 1.0, 1.02))
    assert kept.verdict.held is False
    assert "standard dropout stayed" in kept.verdict.text
    assert alpha_selu.summarize(_ctx("tiny", tmp_path), _selu_results(base, 1.0, 1.6)).verdict.held is None


def test_alpha_selu_reports_a_seed_whose_network_diverged_in_training(
    tiny_runs: dict[str, tuple[dict[str, Any], dict[str, Any]]], tmp_path: Path
) -> None:
    """A trained network whose activations went NaN leaves the after-training columns (said in a
    note), keeps its accuracy, and does not change the verdict, which judges initialization."""
    base = tiny_runs["alpha-selu"][0]
    results = _selu_results(base, 1.0, 1.6)
    clean = alpha_selu.summarize(_ctx("quick", tmp_path), results)
    diverged = copy.deepcopy(results[0])
    profile = diverged["variants"]["standard"]["trained"]
    profile["train_var"] = [float("nan")] * len(profile["train_var"])
    profile["nonfinite"] = [1.0] * len(profile["train_var"])
    summary = alpha_selu.summarize(_ctx("quick", tmp_path), [diverged, *results[1:]])
    assert summary.verdict.held is clean.verdict.held is True
    assert any("1 of 3 seeds" in note and "non-finite" in note for note in summary.notes)
    assert not any("non-finite" in note for note in clean.notes)
    detail = summary.tables[1]
    assert all("nan" not in str(cell) for row in detail.rows for cell in row)
    only = alpha_selu.summarize(_ctx("quick", tmp_path), [diverged])
    assert "diverged" in [str(cell) for row in only.tables[1].rows for cell in row]
    from matplotlib.figure import Figure as MplFigure

    for figure in (*summary.figures, *only.figures):
        canvas = MplFigure()
        figure.draw(canvas)  # the after-training panels only where a seed kept finite activations
    assert len(canvas.axes) == 2
