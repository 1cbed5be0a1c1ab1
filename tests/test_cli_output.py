"""What the long commands print: numbers to significant figures (one helper everywhere), the
published numbers with their sources, and progress that is a bar only on a terminal: plain
lines, one per finished block of work, in a log."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from dropkit.__main__ import main
from dropkit.experiments import _console, sparse_vd_mnist
from dropkit.experiments._console import Progress, format_duration, format_mean_se, format_number, is_terminal
from dropkit.experiments.uci import concrete, report
from tests.test_sparse_vd_mnist import write_mnist
from tests.test_uci import _write_dataset

NAN, INF = float("nan"), float("inf")

# --- numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "digits", "text"),
    [
        (0.00101234, 3, "0.00101"),
        (0.000742612, 3, "0.000743"),
        (12345.678, 3, "12346"),  # integer digits are never rounded away
        (123.456, 3, "123"),
        (2.90362, 3, "2.90"),
        (0.0, 3, "0"),
        (-0.0, 3, "0"),
        (-2.401936, 3, "-2.40"),
        (-0.00101234, 2, "-0.0010"),
        (9.9996, 3, "10.0"),  # rounding up adds a digit in front, not behind
        (0.99996, 3, "1.00"),
        (1, 3, "1.00"),
        (3.2e-12, 3, "3.20e-12"),
        (2.5e17, 2, "2.5e+17"),
        (NAN, 3, "nan"),
        (INF, 3, "inf"),
        (-INF, 3, "-inf"),
    ],
)
def test_format_number(value: float, digits: int, text: str) -> None:
    assert format_number(value, digits) == text


@pytest.mark.parametrize(
    ("mean", "se", "text"),
    [
        (0.00101234, 0.0000312, "0.00101 ± 0.00003"),  # Naval: the digits survive
        (2.90362, 0.17684, "2.90 ± 0.18"),
        (0.538867, 0.013524, "0.539 ± 0.014"),
        (-1.211517, 0.005319, "-1.212 ± 0.005"),  # the SE keeps a significant digit
        (12345.678, 12.3, "12346 ± 12"),
        (123.456, 0.18, "123.5 ± 0.2"),
        (0.003, 0.02, "0.003 ± 0.020"),  # no digits far below the uncertainty
        (2.8976, 5.0, "2.9 ± 5.0"),
        (-1.3, 0.0, "-1.30 ± 0.00"),
        (0.0, 0.03, "0.00 ± 0.03"),
        (0.0, 0.0, "0 ± 0"),
        (-0.0004, 0.03, "0.000 ± 0.030"),  # no "-0.000"
        (NAN, 0.1, "nan ± 0.1"),
        (1.5, NAN, "1.50 ± nan"),
        (3.2e-12, 1e-13, "3.20e-12 ± 1.0e-13"),
    ],
)
def test_format_mean_se(mean: float, se: float, text: str) -> None:
    assert format_mean_se(mean, se) == text


def test_formatting_rejects_bad_digits() -> None:
    for digits in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="digits must be an int >= 1"):
            format_number(1.0, digits)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="digits must be an int >= 1"):
            format_mean_se(1.0, 0.1, digits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0004, "<0.01 s"),
        (0.25, "0.25 s"),
        (4.25, "4.2 s"),
        (42.4, "42 s"),
        (75.4, "1 min 15 s"),
        (7385, "2 h 03 min"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def _naval_like_results() -> list[dict[str, Any]]:
    """Two splits with Naval's magnitudes: RMSE 0.00101 ± 0.00003, LL 4.42 ± 0.01."""
    return [
        {
            "dataset": "naval-propulsion-plant",
            "split": split,
            "rmse": rmse,
            "ll": ll,
            "tau_at_grid_edge": False,
            "seconds": {"a": 2.0},
        }
        for split, (rmse, ll) in enumerate(((0.00097, 4.40), (0.00105, 4.44)))
    ]


def _naval_like_summary() -> dict[str, Any]:
    return report.summarize(_naval_like_results())


def test_markdown_summary_keeps_small_numbers_digits_and_csv_full_precision(tmp_path: Path) -> None:
    summary = _naval_like_summary()
    table = report.markdown_table([summary], {"protocol": True})
    row = next(line for line in table.splitlines() if line.startswith("| Naval |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == format_mean_se(summary["rmse"], summary["rmse_se"]) == "0.00101 ± 0.00003"
    assert cells[3] == "0.000743 ± 0.000046 [1]"  # published, from the authors' log
    assert cells[4] == "4.42 ± 0.01"
    assert cells[8] == "4.0"  # seconds, to significant figures too
    assert "0.00 ± 0.00" not in table

    report.write_reports(tmp_path, {"naval-propulsion-plant": _naval_like_results()}, {"protocol": True})
    assert f"{summary['rmse']!r}" in (tmp_path / "summary.csv").read_text()  # full precision
    assert "0.00097" in (tmp_path / "results.csv").read_text()
    assert "| 0.00101 ± 0.00003 |" in (tmp_path / "summary.md").read_text()


def test_concrete_table_uses_the_same_formatting() -> None:
    summary = {
        **_naval_like_summary(),
        "p_input": 0.00065,
        "p_input_se": 0.00012,
        "p_hidden": 0.0000381,
        "p_hidden_se": 0.0000042,
    }
    table = concrete.markdown_table([summary], {"full_recipe": True})
    row = next(line for line in table.splitlines() if line.startswith("| Naval |"))
    assert "| 0.00101 ± 0.00003 | 0.000743 ± 0.000046 [1] |" in row
    assert "| 0.00065 ± 0.00012 | 0.0000381 ± 0.0000042 |" in row
    assert "\n[1] The same grid-search run, from the authors' results logs" in table


# --- the published numbers --------------------------------------------------------------------------

BENCHMARK = {
    "bostonHousing": "Boston",
    "concrete": "Concrete",
    "energy": "Energy",
    "kin8nm": "Kin8nm",
    "naval-propulsion-plant": "Naval",
    "power-plant": "Power",
    "protein-tertiary-structure": "Protein",
    "wine-quality-red": "Wine",
    "yacht": "Yacht",
    "YearPredictionMSD": "Year",
}


def test_every_data_set_of_the_table_has_published_numbers_and_a_source() -> None:
    assert {name: pub.name for name, pub in report.PUBLISHED.items()} == BENCHMARK
    assert report.PUBLISHED_NAMES == BENCHMARK
    for name, pub in report.PUBLISHED.items():
        for cell in (pub.rmse, pub.ll):
            assert cell.source in report.SOURCES, name
            mean, _, se = cell.text.partition(" ± ")
            assert math.isfinite(float(mean)), name
            if name != "YearPredictionMSD":  # one split: no standard error
                assert float(se) > 0 or se in ("0.00", "0.01"), name
    # the five sets of the reference, as published in the grid-search table
    assert report.PUBLISHED["bostonHousing"].rmse == report.Cell("2.90 ± 0.18", "grid")
    assert report.PUBLISHED["wine-quality-red"].ll == report.Cell("-0.93 ± 0.01", "grid")
    assert report.PUBLISHED["YearPredictionMSD"].rmse.source == "paper"


def test_published_columns_number_their_sources_in_order_of_use() -> None:
    cells, notes = report.published_columns(["kin8nm", "yacht", "mine"])
    assert cells["kin8nm"] == ("0.0789 ± 0.0006 [1]", "1.14 ± 0.01 [2]")
    assert cells["yacht"] == ("0.67 ± 0.05 [2]", "-1.25 ± 0.01 [2]")
    assert cells["mine"] == ("-", "-")
    assert [note[:4] for note in notes] == ["[1] ", "[2] "]
    assert "log_100_xepochs_1_hidden_layers.txt" in notes[0]
    assert "commit 6eb4497" in notes[1]


# --- progress ---------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


def _check_plain(err: str) -> list[str]:
    """The lines of a non-terminal progress log: no carriage returns, no escape codes."""
    assert "\r" not in err
    assert "\x1b" not in err
    return err.splitlines()


def test_is_terminal() -> None:
    assert is_terminal(_Terminal())
    assert not is_terminal(io.StringIO())
    assert not is_terminal(_Closed())
    assert not is_terminal(object())  # type: ignore[arg-type]


def test_progress_off_a_terminal_is_one_line_per_block() -> None:
    stream = io.StringIO()
    with Progress("train", 25, unit="epochs", stream=stream, lines=5) as progress:
        assert not progress.bar
        for epoch in range(1, 26):
            progress.update(epoch, {"loss": format_number(1 / epoch)})
    lines = _check_plain(stream.getvalue())
    assert [line.split(",")[0] for line in lines] == [f"train: {k}/25 epochs" for k in (5, 10, 15, 20, 25)]
    for line in lines[:-1]:
        assert re.fullmatch(r"train: \d+/25 epochs, .+ s elapsed, about .+ s left, loss=\S+", line), line
    assert re.fullmatch(r"train: 25/25 epochs, done in .+ s, loss=0.0400", lines[-1]), lines[-1]


def test_progress_lines_when_steps_jump_and_when_disabled() -> None:
    stream = io.StringIO()
    progress = Progress("grid", 100, unit="epochs", stream=stream, lines=10)
    progress.update(35)  # three blocks at once: one line
    progress.update(35)
    progress.update(100)
    progress.close()
    assert [line.split(",")[0] for line in _check_plain(stream.getvalue())] == [
        "grid: 35/100 epochs",
        "grid: 100/100 epochs",
    ]
    quiet = io.StringIO()
    with Progress("grid", 10, unit="epochs", stream=quiet, enabled=False) as progress:
        for step in range(11):
            progress.update(step)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="total must be an int >= 0"):
        Progress("x", -1, unit="epochs")


def test_progress_on_a_terminal_is_a_bar() -> None:
    pytest.importorskip("tqdm")
    stream = _Terminal()
    with Progress("train", 3, unit="epochs", stream=stream) as progress:
        assert progress.bar
        for step in range(1, 4):
            progress.update(step, {"loss": "0.5"})
    assert "\r" in stream.getvalue()  # drawn in place
    assert "3/3" in stream.getvalue()


def test_progress_follows_stderr_at_run_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_console.sys, "stderr", _Terminal())
    assert Progress("a", 2, unit="epochs").bar
    monkeypatch.undo()
    assert not Progress("a", 2, unit="epochs").bar  # pytest's captured stderr is no terminal


def test_uci_progress_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _write_dataset(data, n_splits=2)
    argv = ["uci", "--data", str(data), "--output", str(tmp_path / "out")]
    argv += ["--epochs-scale", "0.1", "--T", "20", "--tau-search-samples", "10", "--split-batch", "1"]
    assert main(argv) == 0  # 10 epochs per phase, 2 batches of one split
    captured = capsys.readouterr()
    lines = _check_plain(captured.err)
    assert lines[0].startswith("note: settings differ from the published protocol")
    progress = lines[1:]
    for first in (0, 1):
        label = f"toy splits {first}-{first}"
        grid = [line for line in progress if line.startswith(f"{label} grid: ")]
        assert [line.split(",")[0] for line in grid] == [f"{label} grid: {k}/10 epochs" for k in range(1, 11)]
        assert [line.split(",")[0] for line in progress if line.startswith(f"{label} validate: ")] == [
            f"{label} validate: 20/20 passes"
        ]
        assert sum(line.startswith(f"{label} retrain: ") for line in progress) == 10
        assert sum(line.startswith(f"{label} test: ") for line in progress) == 1
    assert re.match(r"toy: 1/2 splits, .+ elapsed, about .+ left$", progress[22])  # after 22 phase lines
    assert re.match(r"toy: 2/2 splits, done in ", progress[-1])
    assert len(progress) == 2 * 23
    # the summary is on stdout, after the work, with no cursor codes before it, formatted by the
    # one helper from the numbers summary.json keeps at full precision
    (s,) = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]
    expected = (
        f"toy: RMSE {format_mean_se(s['rmse'], s['rmse_se'])}  LL {format_mean_se(s['ll'], s['ll_se'])}  "
    )
    assert captured.out.startswith(expected)
    assert re.fullmatch(r"\(2 splits, .+ this run\)\n", captured.out[len(expected) :])


def test_uci_no_progress_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _write_dataset(data, n_splits=1)
    argv = ["uci", "--data", str(data), "--output", str(tmp_path / "out"), "--epochs-scale", "0.02"]
    argv += ["--T", "10", "--tau-search-samples", "0", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().err.splitlines() == [
        "note: settings differ from the published protocol; results are labelled so"
    ]


def test_sparse_vd_progress_off_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_mnist(tmp_path / "mnist", n_train=40, n_test=10)
    assert sparse_vd_mnist.main(["--data", str(root), "--epochs", "2", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    lines = _check_plain(captured.err)
    assert lines[0].startswith("note: 2 epochs")
    assert [line.split(",")[0] for line in lines[1:]] == [
        "sparse VD LeNet-300-100: 1/2 epochs",
        "sparse VD LeNet-300-100: 2/2 epochs",
    ]
    assert all(re.search(r"loss=\S+, err=\S+%, comp=\S+x$", line) for line in lines[1:])
    assert re.fullmatch(r"test error \S+%  compression \S+x  \(paper: 1.92% at 68x\)  .+ s\n", captured.out)
