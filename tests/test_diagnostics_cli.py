"""``dropkit doctor`` (``dropkit.diagnostics.cli``): builds a model from ``MODULE:FACTORY``, checks it
on random inputs or measures it on a batch from ``MODULE:LOADER``, prints the findings, writes
reports, and exits 0 (clean), 1 (findings at ``--fail-on``) or 2 (one-line error)."""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dropkit.diagnostics.cli import DoctorError, add_doctor_parser, load_batch, load_model, run_doctor

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F


    def clean(hidden=16):
        return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 3))


    def shifted():
        return nn.Sequential(
            nn.Linear(8, 16), nn.Dropout(0.5), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
        )


    class AlwaysOn(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, x):
            return self.linear(F.dropout(x, 0.1))


    class Language(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(8, 2)

        def forward(self, ids):
            return self.head(self.drop(self.embed(ids)).mean(1))


    instance = clean()


    def broken():
        raise RuntimeError("no weights here")


    def not_a_model():
        return 3


    def pair():
        generator = torch.Generator().manual_seed(0)
        return torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)


    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*pair()), batch_size=16)


    def mapping():
        x, y = pair()
        return {"x": x, "labels": y}


    def nothing():
        return []


    def empty():
        return iter(())
    """
)


@pytest.fixture(autouse=True)
def _models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / "doctor_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dropkit")
    doctor = add_doctor_parser(parser.add_subparsers(dest="command", required=True))
    assert doctor.prog == "dropkit doctor"
    args = parser.parse_args(["doctor", *argv])
    status = args.func(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_a_clean_model_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(
        capsys, "doctor_models:clean", "--input-shape", "4,8", "--factory-arg", "hidden=32"
    )
    assert status == 0
    assert "findings: none" in out
    assert "checked from a traced forward" in out
    assert err == ""


def test_findings_exit_1_unless_below_fail_on(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "doctor_models:shifted", "--input-shape", "16,8")
    assert status == 1
    assert "DK101 warning" in out
    assert "Li et al. predict" in out
    assert _run(capsys, "doctor_models:shifted", "--input-shape", "16,8", "--fail-on", "error")[0] == 0
    assert _run(capsys, "doctor_models:shifted", "--fail-on", "never")[0] == 0
    assert _run(capsys, "doctor_models:AlwaysOn", "--input-shape", "4x8", "--fail-on", "error")[0] == 1
    assert _run(capsys, "doctor_models:clean", "--n-train", "100", "--fail-on", "info")[0] == 1  # DK108


def test_module_instances_and_integer_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "doctor_models:instance", "--input-shape", "2,8")[0] == 0
    status, out, _ = _run(capsys, "doctor_models:Language", "--input-shape", "2,5", "--input-ids", "50")
    assert status == 0
    assert "drop" in out


def test_data_runs_the_measurements_and_writes_every_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    status, out, err = _run(
        capsys,
        "doctor_models:shifted",
        "--data",
        "doctor_models:pair",
        "--t-values",
        "1,4",
        "--html",
        str(tmp_path / "report.html"),
        "--markdown",
        str(tmp_path / "report.md"),
        "--json",
        str(tmp_path / "report.json"),
        "--no-progress",
    )
    assert status == 1
    assert "measurements:" in out
    assert "ensemble gap (classification, 32 inputs)" in out
    assert err.count("report written to") == 3
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["measurements"]["ensemble_gap"]["T"] == [1, 4]
    assert data["measurements"]["variance_shift"][0]["batchnorm"] == "2"
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    assert (tmp_path / "report.md").read_text().startswith("# dropkit doctor: Sequential")


def test_json_to_stdout_replaces_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "doctor_models:shifted", "--json", "-")
    assert status == 1
    assert json.loads(out)["findings"][0]["code"] == "DK101"


@pytest.mark.parametrize("loader", ["doctor_models:loader", "doctor_models:mapping"])
def test_loaders_give_inputs_and_targets(loader: str) -> None:
    inputs, targets = load_batch(loader)
    assert targets is not None
    assert targets.dtype == torch.int64
    if isinstance(inputs, dict):
        assert set(inputs) == {"x"}
        assert inputs["x"].shape == (32, 8)
    else:
        assert inputs.shape == (16, 8)
        assert targets.shape == (16,)


def test_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "doctor_models:clean", "--data", "doctor_models:pair", "--t-values", "1,2")
    assert status == 0
    assert "dropkit diagnostics" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no_such_module:build"], "cannot import 'no_such_module' (ModuleNotFoundError"),
        (["doctor_models:missing"], "'doctor_models' has no attribute 'missing'"),
        (["doctor_models"], "MODULE:FACTORY must look like MODULE:NAME"),
        (
            ["doctor_models:broken"],
            "building the model with 'doctor_models:broken' failed (RuntimeError: no weights",
        ),
        (["doctor_models:not_a_model"], "'doctor_models:not_a_model' returned int, not a torch.nn.Module"),
        (["doctor_models:clean", "--factory-arg", "hidden"], "--factory-arg must look like KEY=VALUE"),
        (
            ["doctor_models:instance", "--factory-arg", "a=1"],
            "is a module instance: it takes no --factory-arg",
        ),
        (["doctor_models:clean", "--input-shape", "4,a"], "--input-shape must be positive ints"),
        (["doctor_models:clean", "--input-shape", "4,0"], "--input-shape must be positive ints"),
        (["doctor_models:clean", "--input-shape", "4,5"], "the example forward of Sequential failed"),
        (["doctor_models:clean", "--input-ids", "9"], "--input-ids needs --input-shape"),
        (["doctor_models:clean", "--n-train", "0"], "--n-train must be >= 1, got 0"),
        (["doctor_models:clean", "--t-values", "5,1"], "--t-values must be increasing positive ints"),
        (["doctor_models:clean", "--data", "doctor_models:nothing"], "the loader must give a tensor, a pair"),
        (
            ["doctor_models:clean", "--html", "missing/dir/report.html"],
            "cannot write 'missing/dir/report.html'",
        ),
    ],
)
def test_errors_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, _out, err = _run(capsys, *argv)
    assert status == 2
    assert err.startswith("dropkit doctor: error: ")
    assert err.count("\n") == 1
    assert message in err, err


def test_bad_choices_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _run(capsys, "doctor_models:clean", "--fail-on", "sometimes")
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        _run(capsys, "doctor_models:clean", "--input-shape", "2,8", "--data", "doctor_models:pair")


def test_the_library_functions_raise_doctor_errors() -> None:
    with pytest.raises(DoctorError, match="returned int"):
        load_model("doctor_models:not_a_model")
    model = load_model("doctor_models:clean", ["hidden=4"])
    assert isinstance(model, torch.nn.Sequential)
    assert model[0].out_features == 4
    with pytest.raises(DoctorError, match="the loader 'doctor_models:empty' gave no batch"):
        load_batch("doctor_models:empty")
    assert run_doctor.__doc__ is not None
    assert "exit status" in run_doctor.__doc__
