"""``dropkit reproduce conv-variants`` and ``early-late`` at the tiny scale, and their verdict rules.

Each experiment runs once per data source (scikit-learn's digits with Fashion-MNIST hidden, and
a synthetic Fashion-MNIST written as IDX files under ``DATA/fashion-mnist``), plus once more on
digits for determinism; the other tests read those results.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dropkit
from dropkit.experiments.reproduce import conv_variants as cv
from dropkit.experiments.reproduce import data as image_data
from dropkit.experiments.reproduce import early_late as el
from dropkit.experiments.reproduce.api import DataUnavailableError, Experiment, RunContext, Summary
from dropkit.experiments.sparse_vd_mnist import MNIST_FILES

EXPERIMENTS = {"conv-variants": cv.EXPERIMENT, "early-late": el.EXPERIMENT}


def write_fashion(root: Path, n_train: int = 160, n_test: int = 80) -> Path:
    """A learnable synthetic Fashion-MNIST in IDX form: each class lights its own rows."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 4, 4:24] = 255
        for kind, array in (("images", images), ("labels", labels)):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (root / (MNIST_FILES[f"{split}_{kind}"] + ".gz")).write_bytes(
                gzip.compress(header + array.tobytes())
            )
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every tiny run the tests read: ``runs[name]["digits"]`` (twice), ``["fashion"]``."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float results every run, and no oversubscription
    data_dir = tmp_path_factory.mktemp("DATA")
    write_fashion(data_dir / "fashion-mnist")
    out: dict[str, Any] = {}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(image_data, "FASHION_MNIST_PACKAGE_DIR", data_dir / "absent")
            for name, experiment in EXPERIMENTS.items():
                work = tmp_path_factory.mktemp(name)
                digits_ctx = RunContext("tiny", None, work)
                fashion_ctx = RunContext("tiny", data_dir, work)
                out[name] = {
                    "ctx": digits_ctx,
                    "digits": [experiment.run_seed(digits_ctx, 3), experiment.run_seed(digits_ctx, 3)],
                    "fashion": experiment.run_seed(fashion_ctx, 0),
                    "fashion_ctx": fashion_ctx,
                }
        yield out
    finally:
        torch.set_num_threads(previous_threads)


def without_timing(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "timing"}


# ---------------------------------------------------------------------------------------------
# The contract, for both experiments


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_object(name: str) -> None:
    experiment = EXPERIMENTS[name]
    assert isinstance(experiment, Experiment)
    assert experiment.name == name
    assert set(experiment.default_seeds) == {"tiny", "quick", "full"}
    assert experiment.default_seeds["tiny"] == 1
    assert experiment.default_seeds["quick"] >= 2  # an error bar needs two seeds
    assert experiment.claim.statement
    assert experiment.claim.source
    assert experiment.claim.published


@pytest.mark.parametrize("name", list(EXPERIMENTS))
@pytest.mark.parametrize("source", ["digits", "fashion"])
def test_results_are_json(runs: dict[str, Any], name: str, source: str) -> None:
    result = runs[name][source][0] if source == "digits" else runs[name][source]
    assert json.loads(json.dumps(result, allow_nan=False)) == result


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_same_seed_same_results(runs: dict[str, Any], name: str) -> None:
    first, second = runs[name]["digits"]
    # Only measured wall and CPU times may differ between two runs of one seed.
    assert without_timing(first) == without_timing(second)
    assert without_timing(first) != without_timing(runs[name]["fashion"])


@pytest.mark.parametrize("name", list(EXPERIMENTS))
@pytest.mark.parametrize("source", ["digits", "fashion"])
def test_summary_renders(runs: dict[str, Any], name: str, source: str) -> None:
    from matplotlib.figure import Figure as MplFigure

    experiment = EXPERIMENTS[name]
    ctx = runs[name]["ctx" if source == "digits" else "fashion_ctx"]
    result = runs[name][source][0] if source == "digits" else runs[name][source]
    summary = experiment.summarize(ctx, [result])
    assert isinstance(summary, Summary)
    assert summary.verdict.held is None  # the tiny scale never decides
    assert "tiny" in summary.verdict.text
    assert summary.tables
    for table in summary.tables:
        assert table.rows
        assert all(len(row) == len(table.columns) for row in table.rows)
        assert all(isinstance(cell, str) for row in table.rows for cell in row)
    assert len({figure.name for figure in summary.figures}) == len(summary.figures) >= 1
    for figure in summary.figures:
        canvas = MplFigure(figsize=(6.4, 4.0))
        figure.draw(canvas)
        assert canvas.axes
        assert all(axes.has_data() for axes in canvas.axes)
        if source == "digits":  # rendering once per figure is enough
            canvas.savefig(io.BytesIO(), format="png", dpi=30)
    json.dumps(summary.metrics, allow_nan=False)


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_data_source_is_reported(runs: dict[str, Any], name: str) -> None:
    def info(result: Mapping[str, Any]) -> Mapping[str, Any]:
        return result["data"] if name == "conv-variants" else result["regimes"]["underfitting"]["data"]

    digits, fashion = runs[name]["digits"][0], runs[name]["fashion"]
    assert info(digits)["name"] == "digits"
    assert "apt-get install dataset-fashion-mnist" in info(digits)["fallback"]
    assert info(fashion)["name"] == "fashion-mnist"
    assert info(fashion)["fallback"] is None
    assert info(fashion)["side"] == 28
    assert info(fashion)["source"].endswith("fashion-mnist")
    digits_notes = " ".join(EXPERIMENTS[name].summarize(runs[name]["ctx"], [digits]).notes)
    fashion_notes = " ".join(EXPERIMENTS[name].summarize(runs[name]["fashion_ctx"], [fashion]).notes)
    assert "Fashion-MNIST was not available" in digits_notes
    assert "dataset-fashion-mnist" in digits_notes
    assert "not available" not in fashion_notes


def test_fashion_fallback_gives_digits_and_says_how_to_get_fashion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package_dir = tmp_path / "absent"
    monkeypatch.setattr(image_data, "FASHION_MNIST_PACKAGE_DIR", package_dir)
    for data_dir in (None, tmp_path):  # no --data, and a --data without fashion-mnist/
        images, fallback = image_data.load_fashion_mnist_or_digits(RunContext("tiny", data_dir, tmp_path))
        assert images is image_data.load_digits()
        assert fallback is not None
        assert fallback.startswith("Fashion-MNIST not found (looked in ")
        assert str(package_dir) in fallback
        assert (str(tmp_path / "fashion-mnist") in fallback) == (data_dir is not None)
        assert fallback.endswith(image_data.FASHION_MNIST_HINT)
        assert "apt-get install dataset-fashion-mnist" in fallback

    write_fashion(tmp_path / "fashion-mnist")
    images, fallback = image_data.load_fashion_mnist_or_digits(RunContext("tiny", tmp_path, tmp_path))
    assert fallback is None
    assert images.name == "fashion-mnist"
    assert images.source == str(tmp_path / "fashion-mnist")
    assert images.x_train.shape == (160, 1, 28, 28)


def test_fashion_fallback_without_scikit_learn_gives_both_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_digits() -> image_data.ImageSet:
        raise DataUnavailableError("the embedded digits need scikit-learn")

    monkeypatch.setattr(image_data, "FASHION_MNIST_PACKAGE_DIR", tmp_path / "absent")
    monkeypatch.setattr(image_data, "load_digits", no_digits)
    with pytest.raises(DataUnavailableError) as raised:
        image_data.load_fashion_mnist_or_digits(RunContext("tiny", None, tmp_path))
    message = str(raised.value)
    assert message.startswith("Fashion-MNIST not found")
    assert "dataset-fashion-mnist" in message
    assert message.endswith("; and the fallback: the embedded digits need scikit-learn")


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_summarize_refuses_no_results(runs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match="at least one"):
        EXPERIMENTS[name].summarize(runs[name]["ctx"], [])


# ---------------------------------------------------------------------------------------------
# conv-variants: each variant is what it claims to be


def test_conv_variant_modules() -> None:
    def random_layers(variant: str) -> list[torch.nn.Module]:
        model = cv.build_convnet(variant, side=28, channels=(4, 8), p=0.2, block_size=3)
        return [m for m in model.modules() if type(m).__module__.startswith("dropkit.")]

    assert random_layers("none") == []
    assert [type(m) for m in random_layers("dropout")] == [dropkit.nn.Dropout] * 2
    assert [type(m) for m in random_layers("spatial")] == [dropkit.nn.Dropout2d] * 2
    blocks = random_layers("dropblock")
    assert [type(m) for m in blocks] == [dropkit.nn.DropBlock2d] * 2
    assert all(m.block_size == 3 and m.p == 0.2 for m in blocks)
    connect = random_layers("dropconnect")
    assert [type(m) for m in connect] == [dropkit.nn.DropConnect] * 2
    assert all(isinstance(m.module, torch.nn.Conv2d) and not m.per_example for m in connect)


def test_spatial_masks_whole_channels_and_element_does_not() -> None:
    x = torch.ones(8, 16, 14, 14)
    spatial = cv.build_convnet("spatial", side=28, channels=(16, 8), p=0.5)[3]
    element = cv.build_convnet("dropout", side=28, channels=(16, 8), p=0.5)[3]
    y = spatial(x, seed=1)
    per_channel = y.flatten(2)
    assert torch.equal(per_channel.amin(2), per_channel.amax(2))  # one value per (sample, channel)
    assert 0 < int((per_channel[..., 0] == 0).sum()) < 8 * 16
    z = element(x, seed=1).flatten(2)
    assert bool((z.amin(2) != z.amax(2)).any())


def test_dropblock_drops_contiguous_blocks() -> None:
    block = cv.build_convnet("dropblock", side=28, channels=(4, 8), p=0.2, block_size=3)[3]
    y = block(torch.ones(4, 4, 14, 14), seed=2)
    dropped = (y == 0).float()
    assert dropped.sum() > 0
    # Every dropped unit lies in a whole dropped 3x3 square: the 3x3 minimum over some window
    # covering it is 1.
    window_all = -torch.nn.functional.max_pool2d(-dropped.flatten(0, 1).unsqueeze(1), 3, stride=1)
    covered = torch.nn.functional.max_pool2d(torch.nn.functional.pad(window_all, (2, 2, 2, 2)), 3, stride=1)
    assert torch.equal(covered.squeeze(1).reshape_as(dropped) * dropped, dropped)


def test_dropconnect_drops_weights_not_activations() -> None:
    torch.manual_seed(0)
    model = cv.build_convnet("dropconnect", side=28, channels=(4, 8), p=0.5).train()
    x = torch.rand(1, 1, 28, 28).expand(6, 1, 28, 28)
    y = model(x)
    # One weight mask per batch: identical images give identical outputs in training ...
    assert torch.equal(y, y[:1].expand_as(y))
    # ... yet the training output is random (weights dropped), and eval is the plain network.
    assert not torch.equal(y, model(x))
    model.eval()
    assert not torch.equal(model(x)[:1], y[:1])
    element = cv.build_convnet("dropout", side=28, channels=(4, 8), p=0.5).train()
    assert not torch.equal(element(x)[0], element(x)[1])  # activation dropout would differ per row


def test_variants_start_from_the_same_weights() -> None:
    def weights(variant: str) -> list[torch.Tensor]:
        torch.manual_seed(5)
        model = cv.build_convnet(variant, side=28, channels=(4, 8), p=0.2)
        return [p.detach().clone() for p in model.parameters()]

    reference = weights("none")
    for variant in cv.VARIANTS[1:]:
        assert all(torch.equal(a, b) for a, b in zip(reference, weights(variant), strict=True)), variant


def test_conv_run_records_what_it_did(runs: dict[str, Any]) -> None:
    result = runs["conv-variants"]["fashion"]
    protocol = result["protocol"]
    assert result["eval_epochs"] == cv.eval_epochs(protocol["epochs"], protocol["evaluations"])
    assert result["eval_epochs"][-1] == protocol["epochs"]
    # DropBlock's keep_prob ramp reaches its target at the last step.
    assert result["final_dropblock_rate"] == pytest.approx(protocol["p"])
    assert result["steps"] == protocol["epochs"] * math.ceil(
        result["data"]["n_train"] / protocol["batch_size"]
    )
    for variant in cv.VARIANTS:
        run = result["variants"][variant]
        assert len(run["train_loss"]) == protocol["epochs"]
        assert len(run["test_error"]) == len(result["eval_epochs"])
        assert run["final_test_error"] == run["test_error"][-1]
        assert 0.0 <= run["final_test_error"] <= 1.0
        assert all(math.isfinite(v) and v > 0 for v in run["train_loss"])
        assert len(result["timing"]["epoch_seconds"][variant]) == protocol["epochs"]
    ratios = cv.relative_times(result)
    assert ratios["none"] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    assert set(result["timing"]["step_seconds"]) == {"none", "dropconnect", "dropconnect-per-example"}
    # The variants differ (different noise), the paired design notwithstanding.
    losses = {tuple(result["variants"][v]["train_loss"]) for v in cv.VARIANTS}
    assert len(losses) == len(cv.VARIANTS)


def test_build_convnet_validates() -> None:
    with pytest.raises(ValueError, match=r"variant must be one of .*got 'gaussian'"):
        cv.build_convnet("gaussian", side=28, channels=(4, 8), p=0.2)
    with pytest.raises(ValueError, match="side must be an int >= 4, got 2"):
        cv.build_convnet("none", side=2, channels=(4, 8), p=0.2)


# ---------------------------------------------------------------------------------------------
# early-late: the model's dropout follows its schedule


def test_early_schedule_reaches_zero_and_late_starts_at_cutoff() -> None:
    early, late = el.make_schedule("early", 0.1, cutoff=10), el.make_schedule("late", 0.1, cutoff=10)
    assert early(0) == 0.1
    assert all(early(t) > early(t + 1) for t in range(9))
    assert all(early(t) == 0.0 for t in range(9, 40))
    assert all(late(t) == 0.0 for t in range(10))
    assert all(late(t) == 0.1 for t in range(10, 40))
    assert el.make_schedule("none", 0.1, 10)(0) == 0.0
    assert el.make_schedule("constant", 0.1, 10)(99) == 0.1
    with pytest.raises(ValueError, match=r"schedule must be one of .*got 'cosine'"):
        el.make_schedule("cosine", 0.1, 10)


@pytest.mark.parametrize("regime", el.REGIMES)
@pytest.mark.parametrize("schedule", el.SCHEDULES)
def test_dropout_follows_its_schedule(runs: dict[str, Any], regime: str, schedule: str) -> None:
    entry = runs["early-late"]["fashion"]["regimes"][regime]
    run = entry["schedules"][schedule]
    p, cutoff, total = entry["protocol"]["p"], run["cutoff_step"], run["total_steps"]
    expected = el.make_schedule(schedule, p, cutoff)
    assert 1 <= cutoff < total
    assert run["step"] == list(range(1, total + 1))  # the tiny scale evaluates after every step
    for step, at_step, record in zip(run["step"], run["rate_at_step"], run["dropout"], strict=True):
        # Forward t (before optimizer step t + 1) runs with schedule(t), in both dropout layers.
        rate = expected(step - 1)
        assert record["rate"] == rate
        assert at_step == expected(step)
        assert record["eligible"] > 0
        assert record["expected"] == pytest.approx(record["eligible"] * rate, rel=1e-12)
        if rate == 0.0:
            assert record["dropped"] == 0
        else:
            # The realised drops within 6 sigma (plus one unit) of their expectation.
            assert abs(record["dropped"] - record["expected"]) <= 6 * math.sqrt(record["variance"]) + 1
            assert record["dropped"] > 0
    dropped = [record["dropped"] for record in run["dropout"]]
    if schedule == "none":
        assert not any(dropped)
    if schedule in ("constant", "early"):
        assert dropped[0] > 0
    if schedule in ("constant", "late"):
        assert all(dropped[cutoff:])  # steps after K: forwards t >= K
    if schedule == "early":
        assert not any(dropped[cutoff - 1 :])  # the linear ramp is 0 from step K - 1 on
        assert run["rate_at_step"][-1] == 0.0
    if schedule == "late":
        assert not any(dropped[:cutoff])
        assert run["rate_at_step"][-1] == p


def test_regimes_are_what_they_claim(runs: dict[str, Any]) -> None:
    regimes = runs["early-late"]["fashion"]["regimes"]
    under, over = regimes["underfitting"]["protocol"], regimes["overfitting"]["protocol"]
    # Lengths are in optimizer steps, whatever the data: digits get as many updates as Fashion.
    digits = runs["early-late"]["digits"][0]["regimes"]
    for name in el.REGIMES:
        steps = regimes[name]["protocol"]["steps"]
        assert regimes[name]["schedules"]["none"]["total_steps"] == steps
        assert digits[name]["schedules"]["none"]["total_steps"] == steps
    assert under["width"] < over["width"]
    assert regimes["underfitting"]["data"]["n_train"] > regimes["overfitting"]["data"]["n_train"]
    for scale in ("quick", "full"):
        protocol = el.protocol(RunContext(scale, None, Path()))
        assert protocol["underfitting"].width < protocol["overfitting"].width
        assert protocol["underfitting"].n_train is None  # the whole training set
        assert protocol["overfitting"].n_train is not None
        assert protocol["underfitting"].cutoff == pytest.approx(50 / 300)  # the paper's 50 of 300 epochs


def test_schedules_share_initial_weights_and_batches(runs: dict[str, Any]) -> None:
    # Until the first step with dropout, "late" and "none" are the same run: with K past the
    # first evaluation they agree there exactly, and part afterwards.
    images = image_data.subsample(image_data.load_digits(), 96, 64, seed=0)
    regime = el.Regime(96, 8, 24, 16, 3e-3, 0.3, 0.5, 4, 96)
    none = el.train_schedule(images, regime, "none", seed=1)
    late = el.train_schedule(images, regime, "late", seed=1)
    assert none["step"] == late["step"] == [6, 12, 18, 24]
    assert late["cutoff_step"] == 12
    assert none["train_loss"][:2] == late["train_loss"][:2]
    assert none["train_loss"][2:] != late["train_loss"][2:]


def test_build_mlp_validates() -> None:
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        el.build_mlp(64, 0)


# ---------------------------------------------------------------------------------------------
# Verdict rules on hand-made results


def conv_results(errors: Mapping[str, list[float]]) -> list[dict[str, Any]]:
    seeds = len(next(iter(errors.values())))
    return [
        {
            "protocol": {"p": 0.2, "epochs": 7},
            "data": {"n_train": 1500, "name": "fashion-mnist"},
            "variants": {v: {"final_test_error": errors[v][s]} for v in cv.VARIANTS},
        }
        for s in range(seeds)
    ]


CONV_HELD = {
    "none": [0.200, 0.210, 0.205],
    "dropout": [0.195, 0.205, 0.200],
    "spatial": [0.185, 0.194, 0.191],
    "dropblock": [0.180, 0.191, 0.184],
    "dropconnect": [0.190, 0.201, 0.196],
}


def test_conv_verdict_held() -> None:
    verdict, checks = cv.verdict("quick", conv_results(CONV_HELD))
    assert verdict.held is True
    assert [h for h, _ in checks] == [True, True, True]
    assert verdict.text.startswith("Held")
    assert "-1.00 ± 0.06 pp" in checks[0][1]  # spatial - dropout: -1.0, -1.1, -0.9 pp


def test_conv_verdict_not_held_says_what_was_tried() -> None:
    errors = copy.deepcopy(CONV_HELD)
    errors["spatial"] = [0.199, 0.210, 0.204]  # worse than element-wise dropout on every seed
    verdict, checks = cv.verdict("full", conv_results(errors))
    assert verdict.held is False
    assert checks[0][0] is False
    assert verdict.text.startswith("Not held")
    assert "Tried: p = 0.2" in verdict.text
    assert "7 epochs on 1,500 fashion-mnist images, 3 seed(s)" in verdict.text


def test_conv_verdict_within_noise_and_tiny_are_undecided() -> None:
    errors = copy.deepcopy(CONV_HELD)
    errors["dropblock"] = [0.160, 0.230, 0.190]  # better on average, noisy
    verdict, checks = cv.verdict("quick", conv_results(errors))
    assert checks[1][0] is None
    assert "within noise" in checks[1][1]
    assert verdict.held is None
    assert cv.verdict("tiny", conv_results(CONV_HELD))[0].held is None
    one_seed = {v: values[:1] for v, values in CONV_HELD.items()}
    assert cv.verdict("quick", conv_results(one_seed))[0].held is None


def schedule_results(
    train_loss: Mapping[str, list[float]], test_error: Mapping[str, list[float]], late: list[float]
) -> list[dict[str, Any]]:
    results = []
    for s in range(len(late)):
        protocol = {"width": 16, "steps": 1400, "p": 0.1, "cutoff": 1 / 6, "n_train": None}
        under = {
            k: {"train_loss": [9.0, train_loss[k][s]], "test_error": [0.9, test_error[k][s]]}
            for k in ("none", "early")
        }
        over = {
            "none": {"train_loss": [0.1], "test_error": [0.2]},
            "late": {"train_loss": [0.2], "test_error": [late[s]]},
        }
        results.append(
            {
                "regimes": {
                    "underfitting": {"protocol": protocol, "schedules": under},
                    "overfitting": {
                        "protocol": {**protocol, "width": 256, "n_train": 500},
                        "schedules": over,
                    },
                }
            }
        )
    return results


def test_early_late_verdicts() -> None:
    loss = {"none": [0.44, 0.45, 0.43], "early": [0.42, 0.425, 0.412]}
    error = {"none": [0.17, 0.18, 0.16], "early": [0.165, 0.175, 0.154]}
    held, checks = el.verdict("quick", schedule_results(loss, error, [0.19, 0.191, 0.189]))
    assert held.held is True
    assert [h for h, _ in checks] == [True, True, True]
    assert "early - none, training loss: -0.0210 ± 0.0021 nats (held)" in checks[0][1]
    # Late dropout not better than none on the overfitting model: not held, and said so.
    not_held, checks = el.verdict("full", schedule_results(loss, error, [0.20, 0.21, 0.20]))
    assert not_held.held is False
    assert checks[2][0] is False
    assert "overfitting, late - none, test error" in not_held.text
    assert "Tried: a 16-unit MLP" in not_held.text
    # Early dropout's loss gain within noise: undecided; tiny: always undecided.
    noisy = {"none": [0.44, 0.45, 0.43], "early": [0.40, 0.47, 0.42]}
    assert el.verdict("quick", schedule_results(noisy, error, [0.19, 0.191, 0.189]))[0].held is None
    assert el.verdict("tiny", schedule_results(loss, error, [0.19, 0.191, 0.189]))[0].held is None


def test_check_and_combine() -> None:
    assert cv.check("d", [-0.01, -0.011, -0.012])[0] is True
    assert cv.check("d", [0.0, 0.0])[0] is False  # no improvement is not the claimed one
    assert cv.check("d", [-0.01, 0.005])[0] is None
    assert cv.combine([True, None, True]) is None
    assert cv.combine([True, False, None]) is False
    with pytest.raises(ValueError, match="at least one number"):
        cv.mean_se([])
