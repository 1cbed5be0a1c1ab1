"""``dropkit reproduce`` experiments mc-uncertainty and concrete-rate: tiny runs, metrics, verdicts.

No data set is needed: the digits ship with scikit-learn, and Fashion-MNIST is either hidden
(the held-out-classes fallback) or written here as small synthetic IDX files.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dropkit.experiments.reproduce import concrete_rate as cr
from dropkit.experiments.reproduce import data as data_module
from dropkit.experiments.reproduce import mc_uncertainty as mu
from dropkit.experiments.reproduce.api import Experiment, RunContext, Summary
from dropkit.experiments.sparse_vd_mnist import MNIST_FILES
from dropkit.mc import NoDropoutFoundWarning

pytest.importorskip("sklearn", reason="the embedded digits need scikit-learn")


@pytest.fixture(autouse=True)
def _no_installed_fashion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide the Debian package's Fashion-MNIST, so the tests do not depend on it being installed."""
    monkeypatch.setattr(data_module, "FASHION_MNIST_PACKAGE_DIR", tmp_path / "no-such-dir")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunContext, dict[str, Any]]]:
    """Seed 0 of both experiments at the tiny scale, once per module (Fashion-MNIST hidden)."""
    root = tmp_path_factory.mktemp("tiny-runs")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, "FASHION_MNIST_PACKAGE_DIR", root / "no-such-dir")
        for name, module in (("mc", mu), ("concrete", cr)):
            ctx = tiny(root / name)
            runs[name] = (ctx, module.run_seed(ctx, 0))
    return runs


def tiny(tmp_path: Path, data_dir: Path | None = None) -> RunContext:
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    return RunContext("tiny", data_dir, work)


def quick(tmp_path: Path) -> RunContext:
    return RunContext("quick", None, tmp_path)


def json_round_trip(result: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(result, allow_nan=False))
    return loaded


def check_summary(summary: Summary) -> None:
    """Tables are rectangular, figures draw on an Agg canvas, metrics are finite numbers."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    assert summary.tables
    for table in summary.tables:
        assert table.rows
        assert all(len(row) == len(table.columns) for row in table.rows)
        assert all(isinstance(cell, str) for row in table.rows for cell in row)
    assert summary.figures
    assert len({figure.name for figure in summary.figures}) == len(summary.figures)
    for item in summary.figures:
        fig = Figure()
        item.draw(fig)
        assert fig.axes, item.name
        fig.canvas.draw()
    assert summary.notes
    for name, value in summary.metrics.items():
        numbers = value if isinstance(value, list) else [value]
        assert all(math.isfinite(v) for v in numbers), name


def write_fashion(root: Path, n: int = 60) -> np.ndarray:
    """Synthetic 28x28 IDX files under the Fashion-MNIST names; returns the test images."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    test_images = np.empty(0)
    for split in ("train", "test"):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for name, array, code in (("images", images, 3), ("labels", labels, 1)):
            header = bytes([0, 0, 0x08, code]) + struct.pack(f">{code}I", *array.shape)
            path = root / (MNIST_FILES[f"{split}_{name}"] + ".gz")
            path.write_bytes(gzip.compress(header + array.tobytes()))
        if split == "test":
            test_images = images
    return test_images


# ---------------------------------------------------------------------------------------------
# mc-uncertainty


def test_mc_experiment_contract() -> None:
    assert isinstance(mu.EXPERIMENT, Experiment)
    assert mu.EXPERIMENT.name == "mc-uncertainty"
    assert set(mu.EXPERIMENT.default_seeds) == {"tiny", "quick", "full"}


def test_mc_run_seed_tiny_is_json_and_deterministic(tiny_runs: dict) -> None:
    ctx, first = tiny_runs["mc"]
    assert json_round_trip(first) == first
    assert mu.run_seed(ctx, 0) == first
    # Without Fashion-MNIST the held-out classes are the OOD set, and the task has 5 classes.
    assert first["ood"] == "digits classes 5, 6, 7, 8, 9"
    assert first["classes"] == 5
    for name in ("mc", "ws"):
        assert sum(first["reliability"][name]["counts"]) == first["n_test_in"]
        assert 0.0 <= first["ece"][name] <= 1.0
        assert first["nll"][name] > 0.0
    for key in ("entropy", "mi"):
        assert sum(first["histograms"][f"{key}_in"]) == first["n_test_in"]
        assert sum(first["histograms"][f"{key}_out"]) == first["n_test_out"]
    assert all(0.0 <= v <= 1.0 for v in first["auroc"].values())


def test_mc_run_seed_depends_on_seed(tiny_runs: dict) -> None:
    ctx, first = tiny_runs["mc"]
    assert mu.run_seed(ctx, 1)["nll"] != first["nll"]


def test_mc_summary_tiny_is_undecided_and_drawable(tiny_runs: dict) -> None:
    ctx, first = tiny_runs["mc"]
    summary = mu.summarize(ctx, [first])
    assert summary.verdict.held is None
    assert "tiny" in summary.verdict.text
    check_summary(summary)
    assert any("classes 5, 6, 7, 8, 9" in note for note in summary.notes)


def test_mc_held_out_classes_without_fashion(tmp_path: Path) -> None:
    task = mu.load_task(tiny(tmp_path), n_train=50, n_test=20, seed=0)
    digits = data_module.load_digits()
    assert task.images.classes == 5
    assert int(task.images.y_train.max()) == 4
    assert int(task.images.y_test.max()) == 4
    assert len(task.images.y_train) == 50
    assert task.x_out.shape == (20, 1, 8, 8)
    held_out = digits.x_test[digits.y_test >= 5].flatten(1)
    gaps = (task.x_out.flatten(1)[:, None] - held_out[None]).abs().amax(dim=-1).min(dim=1).values
    assert float(gaps.max()) == 0.0  # every OOD image is a test digit of a held-out class
    assert "not found" in task.ood_source


def test_mc_fashion_is_resized_to_the_digits(tmp_path: Path) -> None:
    written = write_fashion(tmp_path / "fashion-mnist")
    task = mu.load_task(tiny(tmp_path, data_dir=tmp_path), n_train=50, n_test=20, seed=0)
    assert task.images.name == "digits"
    assert task.images.classes == 10
    assert task.ood == "fashion-mnist 8x8"
    assert task.x_out.shape == (20, 1, 8, 8)
    full = F.adaptive_avg_pool2d(torch.from_numpy(written).float()[:, None] / 255.0, 8)
    # Each OOD image is the area average of one written test image.
    gaps = (task.x_out.flatten(1)[:, None] - full.flatten(1)[None]).abs().amax(dim=-1).min(dim=1).values
    assert float(gaps.max()) < 1e-6


def test_score_predictions_perfect_separation() -> None:
    """In-distribution: every pass certain and right; OOD: passes disagree, weight scaling uniform."""
    n_in, n_out, classes = 6, 4, 3
    labels = torch.arange(n_in) % classes
    certain = F.one_hot(labels, classes).double()
    samples_in = certain.expand(5, n_in, classes).clone()
    disagree = torch.stack([F.one_hot(torch.full((n_out,), t % classes), classes).double() for t in range(5)])
    uniform = torch.full((n_out, classes), 1.0 / classes, dtype=torch.float64)
    scores = mu.score_predictions(certain, uniform, samples_in, disagree, labels)
    assert scores["auroc"] == {"mc_entropy": 1.0, "mc_mutual_information": 1.0, "ws_entropy": 1.0}
    assert scores["accuracy"] == {"mc": 1.0, "ws": 1.0}
    assert scores["ece"] == {"mc": 0.0, "ws": 0.0}
    assert scores["nll"]["mc"] == pytest.approx(0.0, abs=1e-12)
    assert scores["mean_score"]["mi_in"] == 0.0
    assert scores["mean_score"]["mi_out"] > 0.5
    # Swapping the roles reverses the ranking: OOD is the positive class.
    swapped = mu.score_predictions(uniform, certain[:n_out], disagree, samples_in[:, :n_out], labels[:n_out])
    assert swapped["auroc"]["mc_mutual_information"] == 0.0
    assert swapped["auroc"]["ws_entropy"] == 0.0


def test_mc_with_rate_zero_equals_weight_scaling() -> None:
    torch.manual_seed(0)
    model = mu.build_mlp(64, 16, 4, p=0.0)
    x_in, x_out = torch.rand(30, 1, 8, 8), torch.rand(20, 1, 8, 8)
    labels = torch.arange(30) % 4
    with pytest.warns(NoDropoutFoundWarning):
        scores = mu.evaluate(model, x_in, labels, x_out, samples=5, seed=0)
    assert scores["accuracy"]["mc"] == scores["accuracy"]["ws"]
    assert scores["nll"]["mc"] == pytest.approx(scores["nll"]["ws"], rel=1e-6)
    assert scores["ece"]["mc"] == pytest.approx(scores["ece"]["ws"], abs=1e-6)
    assert scores["reliability"]["mc"]["counts"] == scores["reliability"]["ws"]["counts"]
    assert scores["mean_score"]["mi_in"] == 0.0
    assert scores["mean_score"]["mi_out"] == 0.0
    assert scores["auroc"]["mc_entropy"] == pytest.approx(scores["auroc"]["ws_entropy"], abs=1e-12)


def test_mc_dropout_samples_differ_with_positive_rate() -> None:
    torch.manual_seed(0)
    model = mu.build_mlp(64, 16, 4, p=0.5)
    scores = mu.evaluate(model, torch.rand(30, 1, 8, 8), torch.arange(30) % 4, torch.rand(20, 1, 8, 8), 8, 0)
    assert scores["mean_score"]["mi_in"] > 0.0
    assert scores["nll"]["mc"] != scores["nll"]["ws"]


def mc_result(nll_gain: float, ece_gain: float, auroc_entropy: float, auroc_mi: float, jitter: float) -> dict:
    """The parts of a seed's result that the verdict reads."""
    return {
        "nll": {"ws": 0.3, "mc": 0.3 - nll_gain - jitter},
        "ece": {"ws": 0.05, "mc": 0.05 - ece_gain + jitter},
        "auroc": {"mc_entropy": auroc_entropy + jitter, "mc_mutual_information": auroc_mi - jitter},
        "ood": "fashion-mnist",
        "protocol": {"samples": 50, "p": 0.5},
        "n_train": 1000,
    }


@pytest.mark.parametrize(
    ("values", "held", "named"),
    [
        ((0.02, 0.01, 0.8, 0.85), True, None),
        ((-0.02, 0.01, 0.8, 0.85), False, "NLL(weight scaling) - NLL(MC)"),
        ((0.02, -0.01, 0.8, 0.85), False, "ECE(weight scaling) - ECE(MC)"),
        ((0.02, 0.01, 0.5, 0.85), False, "AUROC(MC predictive entropy) - 0.5"),
        ((0.02, 0.01, 0.8, 0.45), False, "AUROC(MC mutual information) - 0.5"),
    ],
)
def test_mc_verdict_rule(tmp_path: Path, values: tuple[float, ...], held: bool, named: str | None) -> None:
    results = [mc_result(*values, jitter=j) for j in (-0.001, 0.0, 0.001)]
    verdict = mu.verdict(quick(tmp_path), results)
    assert verdict.held is held
    if named is None:
        assert verdict.text.startswith("Held")
    else:
        assert named in verdict.text
        assert "Tried: 3 seeds" in verdict.text


def test_mc_verdict_undecided_for_tiny_and_one_seed(tmp_path: Path) -> None:
    good = [mc_result(0.02, 0.01, 0.8, 0.85, jitter=j) for j in (-0.001, 0.001)]
    assert mu.verdict(tiny(tmp_path), good).held is None
    assert mu.verdict(quick(tmp_path), good[:1]).held is None


def test_mc_verdict_needs_two_standard_errors(tmp_path: Path) -> None:
    # Mean NLL gain 0.01 with seeds at +0.03 and -0.01: SE = 0.02, not resolved.
    results = [mc_result(0.02, 0.01, 0.8, 0.85, jitter=0.0) for _ in range(2)]
    results[0]["nll"]["mc"] = 0.3 - 0.03
    results[1]["nll"]["mc"] = 0.3 + 0.01
    verdict = mu.verdict(quick(tmp_path), results)
    assert verdict.held is False
    assert "NLL" in verdict.text


def test_summarize_rejects_no_results(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one seed"):
        mu.summarize(quick(tmp_path), [])
    with pytest.raises(ValueError, match="at least one seed"):
        cr.summarize(quick(tmp_path), [])


# ---------------------------------------------------------------------------------------------
# concrete-rate


def test_concrete_experiment_contract() -> None:
    assert isinstance(cr.EXPERIMENT, Experiment)
    assert cr.EXPERIMENT.name == "concrete-rate"


def test_concrete_run_seed_tiny_is_json_and_deterministic(tiny_runs: dict) -> None:
    ctx, first = tiny_runs["concrete"]
    assert json_round_trip(first) == first
    assert cr.run_seed(ctx, 0) == first
    sizes = first["sizes"]
    assert sizes == sorted(sizes)
    assert len(first["p"]) == len(sizes)
    for rates, trace in zip(first["p"], first["p_trace"], strict=True):
        assert len(rates) == len(cr.LAYERS)
        assert all(0.0 < p < 1.0 for p in rates)
        assert len(trace) == cr.TRACE_POINTS
        assert trace[-1] == rates
        assert any(abs(p - cr.INIT_P) > 1e-3 for p in rates)  # the rates were trained
    for key in ("accuracy", "nll", "mutual_information", "objective"):
        assert len(first[key]) == len(sizes)
        assert all(math.isfinite(v) for v in first[key])


def test_concrete_summary_tiny_is_undecided_and_drawable(tiny_runs: dict) -> None:
    ctx, first = tiny_runs["concrete"]
    summary = cr.summarize(ctx, [first])
    assert summary.verdict.held is None
    check_summary(summary)
    assert any(note.startswith("Convergence") for note in summary.notes)


def test_concrete_rate_follows_the_data_size() -> None:
    """With the same data and steps, a model told N = 10 learns larger rates than one told N = 10^6:
    the entropy term, weighted 1/N, pulls p up; the likelihood pulls it down."""
    images = data_module.load_digits()
    x, y = images.x_train[:200], images.y_train[:200]
    settings = cr.Protocol(sizes=(200,), n_test=None, hidden=16, steps=40, batch_size=64, lr=1e-3, samples=2)
    rates = {}
    for num_train in (10, 1_000_000):
        torch.manual_seed(0)
        model = cr.build_concrete_mlp(64, 16, 10, num_train)
        cr.train_concrete(model, x, y, settings, seed=0)
        rates[num_train] = cr.learned_rates(model)
    assert all(small > cr.INIT_P for small in rates[10])
    assert all(small > large for small, large in zip(rates[10], rates[1_000_000], strict=True))


def concrete_result(slopes: tuple[float, float, float], jitter: float) -> dict:
    sizes = [100, 1_000, 10_000]
    rates = [[0.3 + (s + jitter) * math.log10(n / 100) for s in slopes] for n in sizes]
    return {"sizes": sizes, "p": rates, "protocol": {"steps": 100}}


@pytest.mark.parametrize(
    ("slopes", "held", "failed"),
    [
        ((-0.1, -0.05, -0.02), True, None),
        ((-0.1, 0.0, -0.02), False, "hidden 1"),
        ((0.05, -0.05, -0.02), False, "input"),
    ],
)
def test_concrete_verdict_rule(
    tmp_path: Path, slopes: tuple[float, float, float], held: bool, failed: str | None
) -> None:
    results = [concrete_result(slopes, j) for j in (-0.002, 0.0, 0.002)]
    verdict = cr.verdict(quick(tmp_path), results)
    assert verdict.held is held
    if failed is not None:
        assert f"standard errors for {failed}." in verdict.text
    assert cr.verdict(tiny(tmp_path), results).held is None
    assert cr.verdict(quick(tmp_path), results[:1]).held is None


def test_concrete_summary_marks_each_layer(tiny_runs: dict, tmp_path: Path) -> None:
    _, base = tiny_runs["concrete"]
    results = []
    for jitter in (-0.002, 0.002):
        result = copy.deepcopy(base)
        result["p"] = [[0.3 - 0.1 * i + jitter, 0.3, 0.3 + 0.1 * i] for i in range(len(result["sizes"]))]
        results.append(result)
    summary = cr.summarize(quick(tmp_path), results)
    marks = [row[-1] for row in summary.tables[0].rows]
    assert marks == ["yes", "no", "no"]
    assert summary.verdict.held is False


@pytest.mark.parametrize(
    ("sizes", "values", "match"),
    [([10], [0.1], "length >= 2"), ([10, 100], [0.1], "length >= 2"), ([10, 10], [0.1, 0.2], "all be equal")],
)
def test_slope_rejects_bad_input(sizes: list[int], values: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cr.slope(sizes, values)
