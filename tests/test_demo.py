"""The digits demo (dropkit.experiments.digits) and the ``dropkit`` command line."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import dropkit
from dropkit.__main__ import main
from dropkit.experiments import digits
from dropkit.experiments.digits import DigitsConfig

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")


# 50 steps of a 32-unit MLP on 50 digits: a fraction of a second, and well above chance (10 %).
TINY: dict[str, Any] = {"epochs": 10, "hidden": 32, "train_size": 50, "batch_size": 10, "lr": 0.05}
TINY_ARGS = ["--epochs", "10", "--hidden", "32", "--train-size", "50", "--batch-size", "10", "--lr", "0.05"]


def test_run_demo_tiny_is_sane_and_reproducible() -> None:
    config = DigitsConfig(**TINY)
    first = digits.run_demo(config, progress=False)
    second = digits.run_demo(config, progress=False)
    assert first == second
    assert tuple(first) == digits.MODEL_NAMES == ("no dropout", "dropout")
    for row in first.values():
        assert set(row) == {"train_accuracy", "test_accuracy", "gap", "final_loss"}
        assert 0.0 <= row["train_accuracy"] <= 1.0
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["gap"] == pytest.approx(row["train_accuracy"] - row["test_accuracy"])
        assert math.isfinite(row["final_loss"])
        assert row["final_loss"] > 0.0
        assert row["test_accuracy"] > 0.3
    # dropout changes the training trajectory from the same initial weights and batches
    assert first["dropout"]["final_loss"] != first["no dropout"]["final_loss"]


def test_run_demo_sets_and_restores_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_train = digits.train

    def spy(*args: Any, **kwargs: Any) -> list[float]:
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(digits, "train", spy)
    before = torch.get_num_threads()
    digits.run_demo(DigitsConfig(**TINY), progress=False, threads=1)
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        digits.run_demo(DigitsConfig(**TINY), progress=False, threads=0)


def test_run_demo_depends_on_seed() -> None:
    seed0 = digits.run_demo(DigitsConfig(**TINY, seed=0), progress=False)
    seed1 = digits.run_demo(DigitsConfig(**TINY, seed=1), progress=False)
    assert seed0["dropout"]["final_loss"] != seed1["dropout"]["final_loss"]


def test_load_digits_split_is_stratified_and_standardized_on_train_only() -> None:
    split = digits.load_digits_split(train_size=100, split_seed=0)
    assert split.x_train.shape == (100, digits.DIGITS_FEATURES)
    assert split.x_test.shape == (digits.DIGITS_SAMPLES - 100, digits.DIGITS_FEATURES)
    assert split.x_train.dtype == torch.float32
    assert split.y_train.dtype == torch.int64
    assert torch.bincount(split.y_train, minlength=10).tolist() == [10] * 10
    # train statistics: every train feature has mean 0 and std 1 (or 0 where it is constant)
    torch.testing.assert_close(split.x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    std = split.x_train.std(0, unbiased=False)
    assert bool(((std - 1).abs() < 1e-4).logical_or(std == 0).all())
    # the test set was not used: its statistics are not normalized
    assert split.x_test.mean(0).abs().max() > 1e-3
    again = digits.load_digits_split(train_size=100, split_seed=0)
    assert torch.equal(split.x_test, again.x_test)
    other = digits.load_digits_split(train_size=100, split_seed=1)
    assert not torch.equal(split.y_test, other.y_test)


def test_build_mlp_layers_and_shared_initialization() -> None:
    torch.manual_seed(0)
    plain = digits.build_mlp(32)
    torch.manual_seed(0)
    dropped = digits.build_mlp(32, input_dropout=0.2, hidden_dropout=0.5)
    assert not any(isinstance(m, dropkit.nn.Dropout) for m in plain)
    assert [m.p for m in dropped if isinstance(m, dropkit.nn.Dropout)] == [0.2, 0.5, 0.5]
    linears = [(m.in_features, m.out_features) for m in dropped if isinstance(m, torch.nn.Linear)]
    assert linears == [(64, 32), (32, 32), (32, 10)]
    for a, b in zip(plain.parameters(), dropped.parameters(), strict=True):
        assert torch.equal(a, b)
    assert dropped(torch.randn(5, 64)).shape == (5, 10)


def test_evaluate_uses_eval_mode_and_restores_it() -> None:
    torch.manual_seed(0)
    model = digits.build_mlp(8, input_dropout=0.5, hidden_dropout=0.5)
    x, y = torch.randn(40, 64), torch.randint(0, 10, (40,))
    model.train()
    first = digits.evaluate(model, x, y)
    assert model.training
    assert digits.evaluate(model, x, y) == first  # no dropout noise in eval
    model.eval()
    digits.evaluate(model, x, y)
    assert not model.training


def test_format_table() -> None:
    results = {
        "no dropout": {"train_accuracy": 1.0, "test_accuracy": 0.875, "gap": 0.125},
        "dropout": {"train_accuracy": 0.99, "test_accuracy": 0.9, "gap": 0.09},
    }
    lines = digits.format_table(results).splitlines()
    assert lines[0].split() == ["model", "train", "acc", "test", "acc", "gap"]
    assert lines[1].split() == ["no", "dropout", "100.00%", "87.50%", "12.50", "pp"]
    assert lines[2].split() == ["dropout", "99.00%", "90.00%", "9.00", "pp"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("hidden", 0),
        ("input_dropout", -0.1),
        ("input_dropout", 1.0),
        ("hidden_dropout", 1.5),
        ("hidden_dropout", float("nan")),
        ("train_size", 9),
        ("train_size", digits.DIGITS_SAMPLES - 9),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("inf")),
        ("optimizer", "rmsprop"),
        ("seed", -1),
        ("split_seed", 1 << 32),
    ],
)
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field) as info:
        DigitsConfig(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("epochs", 2.0), ("hidden", "8"), ("seed", True), ("lr", "0.1"), ("optimizer", 1)]
)
def test_config_rejects_bad_types(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=field):
        DigitsConfig(**{field: value})


def test_config_is_frozen_and_defaults_are_valid() -> None:
    config = DigitsConfig()
    assert (config.input_dropout, config.hidden_dropout) == (0.2, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 1  # type: ignore[misc]


def test_cli_demo_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY_ARGS, "--seed", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[header].split() == ["model", "train", "acc", "test", "acc", "gap"]
    assert lines[header + 1].startswith("no dropout ")
    assert lines[header + 2].startswith("dropout ")
    assert "seed 3" in captured.out
    # stderr is not a terminal here: plain progress lines (one per tenth of the 10 epochs, so
    # one per epoch) for each run, with the loss, and no bar codes
    lines = captured.err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["no dropout"] * 10 + ["dropout"] * 10
    assert lines[9].startswith("no dropout: 10/10 epochs, done in ")
    assert lines[19].startswith("dropout: 10/10 epochs, done in ")
    assert all("loss=" in line for line in lines)
    assert "\r" not in captured.err
    assert "\x1b" not in captured.err


def test_cli_demo_no_progress(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", *TINY_ARGS, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "train acc" in captured.out
    assert captured.err == ""


def test_cli_demo_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nested" / "results.json"
    assert main(["demo", *TINY_ARGS, "--no-progress", "--output", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    payload = json.loads(path.read_text(encoding="utf-8"))
    config = DigitsConfig(**TINY)
    assert payload["config"] == dataclasses.asdict(config)
    assert payload["dropkit_version"] == dropkit.__version__
    assert payload["results"] == digits.run_demo(config, progress=False)


def test_cli_demo_reports_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "epochs must be >= 1, got 0" in err
    assert "Traceback" not in err
    assert main(["demo", "--threads", "-1"]) == 2
    assert "threads must be >= 0, got -1" in capsys.readouterr().err


def test_cli_demo_missing_dependency(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes ``import sklearn`` fail
    assert main(["demo", *TINY_ARGS]) == 1
    captured = capsys.readouterr()
    assert "scikit-learn" in captured.err
    assert "pip install 'dropkit[demo]'" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dropkit {dropkit.__version__}"
