"""``dropkit reproduce``: the registry, the runner (atomic per-seed files, resume, skipped and
failed experiments, exit status), the report (README.md, index.html, results.json) and the
command line, first on fake experiments registered for the test, then every registered
experiment end to end at the tiny size, run and resumed.

The fakes are modules put into :data:`sys.modules` under the experiments' package and listed in
a patched :data:`~dropkit.experiments.reproduce.EXPERIMENT_MODULES`, so they go through the
same lazy import as the real ones.  Nothing here reads the shared data directory.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from dropkit.__main__ import main
from dropkit.experiments import reproduce
from dropkit.experiments._console import format_number
from dropkit.experiments._files import read_sealed_json
from dropkit.experiments.reproduce import report as reproduce_report
from dropkit.experiments.reproduce import runner
from dropkit.experiments.reproduce.api import (
    Claim,
    DataUnavailableError,
    Experiment,
    Figure,
    RunContext,
    Scale,
    Summary,
    Table,
    Verdict,
)

REGISTERED = (
    "mnist-mlp",
    "ensemble-vs-scaling",
    "rate-and-size",
    "coadaptation",
    "variance-shift",
    "adaptive-l2",
    "conv-variants",
    "early-late",
    "alpha-selu",
    "mc-uncertainty",
    "concrete-rate",
    "uci",
    "sparse-vd",
)
CLAIM = Claim("Fakes hold <b>claims</b> & more", "Nobody et al. 2024, Table 0", "0.50 ± 0.10")


# --- fake experiments -------------------------------------------------------------------------------


class Calls:
    """Every ``run_seed`` call of the fakes, as ``(name, seed, scale)``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def seeds(self, name: str) -> list[int]:
        return [seed for n, seed, _ in self.seen if n == name]


def fake(
    name: str,
    calls: Calls,
    *,
    held: bool | None = True,
    raise_in_seed: Callable[[int], None] | None = None,
    figures: bool = True,
) -> Experiment:
    """A fast experiment: one number per seed from a seeded generator, one table, one figure."""

    def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
        calls.seen.append((name, seed, ctx.scale))
        assert ctx.work_dir.is_dir()
        if raise_in_seed is not None:
            raise_in_seed(seed)
        value = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        return {"value": value, "pair": (seed, seed + 1)}

    def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
        # A result reads the same fresh and resumed: the tuple comes back as a list either way.
        if not all(isinstance(r["pair"], list) for r in results):
            raise TypeError("summarize saw a tuple: results were not passed through JSON")
        values = [r["value"] for r in results]
        mean = sum(values) / len(values)

        def draw(fig: Any) -> None:
            fig.add_subplot().plot(range(len(values)), values, marker="o")

        return Summary(
            verdict=Verdict(held, f"Ours {mean:.4f} against 0.50 (fake verdict text)."),
            tables=[
                Table(
                    "Values per seed", ["seed", "value"], [[str(i), f"{v:.4f}"] for i, v in enumerate(values)]
                )
            ],
            figures=[Figure("values", "The value drawn for each seed.", draw)] if figures else [],
            notes=["A fake note about the protocol."],
            metrics={"mean": mean, "values": values},
            ours=f"{mean:.4f} (fake)",
        )

    return Experiment(
        name=name,
        title=f"Fake experiment {name}",
        claim=CLAIM,
        run_seed=run_seed,
        summarize=summarize,
        default_seeds={"tiny": 2, "quick": 3, "full": 4},
        data=("nothing at all",),
    )


def register(monkeypatch: pytest.MonkeyPatch, *entries: Experiment | tuple[str, str]) -> None:
    """Make the registry hold exactly ``entries``: experiments (put into :data:`sys.modules`) or
    ``(name, module)`` pairs naming a module that does not exist."""
    modules = {}
    for entry in entries:
        if isinstance(entry, tuple):
            modules[entry[0]] = entry[1]
            continue
        module_name = "_test_fake_" + entry.name.replace("-", "_")
        module = types.ModuleType(f"{reproduce.PACKAGE}.{module_name}")
        module.EXPERIMENT = entry  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
        modules[entry.name] = module_name
    monkeypatch.setattr(reproduce, "EXPERIMENT_MODULES", modules)


def run_cli(out: Path, *argv: str, progress: bool = False) -> int:
    extra = [] if progress else ["--no-progress"]
    return main(["reproduce", *argv, "--output", str(out), "--threads", "1", *extra])


def results_of(out: Path) -> dict[str, Any]:
    return read_sealed_json(out / "results.json")


def entry_of(out: Path, name: str) -> dict[str, Any]:
    (entry,) = [e for e in results_of(out)["experiments"] if e["name"] == name]
    return entry


def stamps(directory: Path) -> dict[str, tuple[int, bytes]]:
    """``seed-*.json`` files of a directory: modification time (ns) and content."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.glob("seed-*.json"))}


@pytest.fixture
def calls() -> Calls:
    return Calls()


# --- registry -----------------------------------------------------------------------------------------


def test_registry_lists_every_experiment_in_report_order() -> None:
    assert reproduce.names() == REGISTERED
    assert all(module.isidentifier() for module in reproduce.EXPERIMENT_MODULES.values())


def test_registry_rejects_unknown_names_and_bad_modules(
    monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    with pytest.raises(ValueError, match=r"one of mnist-mlp, .*sparse-vd, got 'nope'"):
        reproduce.get_experiment("nope")
    mislabelled = fake("other-name", calls)
    register(monkeypatch, mislabelled)
    reproduce.EXPERIMENT_MODULES["fake"] = reproduce.EXPERIMENT_MODULES.pop("other-name")
    with pytest.raises(TypeError, match="named 'other-name', registered as 'fake'"):
        reproduce.get_experiment("fake")
    empty = types.ModuleType(f"{reproduce.PACKAGE}._test_empty")
    monkeypatch.setitem(sys.modules, empty.__name__, empty)
    reproduce.EXPERIMENT_MODULES["empty"] = "_test_empty"
    with pytest.raises(TypeError, match="EXPERIMENT must be an Experiment, got nothing"):
        reproduce.get_experiment("empty")


# --- per-seed files -----------------------------------------------------------------------------------


def test_seed_files_are_sealed_with_their_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    register(monkeypatch, fake("alpha", calls))
    assert run_cli(tmp_path, "alpha", "--scale", "tiny") == 0
    assert calls.seeds("alpha") == [0, 1]
    for seed in (0, 1):
        path = runner.seed_path(tmp_path, "alpha", seed)
        payload = read_sealed_json(path)
        assert payload["format"] == runner.SEED_FORMAT
        assert (payload["experiment"], payload["seed"], payload["scale"], payload["data"]) == (
            "alpha",
            seed,
            "tiny",
            None,
        )
        assert payload["result"]["pair"] == [seed, seed + 1]
        record = runner.read_seed_result(path, "alpha", seed)
        assert record.result == payload["result"]
    assert not list((tmp_path / "alpha").glob(".*.tmp"))  # no temporary file left behind
    # A file of another seed, or one edited by hand, is recognised.
    with pytest.raises(ValueError, match="written for alpha seed 0, expected alpha seed 1"):
        runner.read_seed_result(runner.seed_path(tmp_path, "alpha", 0), "alpha", 1)
    path = runner.seed_path(tmp_path, "alpha", 0)
    path.write_text(path.read_text().replace('"value": 0.', '"value": 1.'))
    with pytest.raises(ValueError, match="checksum mismatch"):
        runner.read_seed_result(path, "alpha", 0)


def test_a_failed_write_leaves_the_previous_seed_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = runner.write_seed_result(tmp_path, "alpha", 0, "tiny", None, {"value": 1.0}, 0.5)
    before = path.read_bytes()

    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        runner.write_seed_result(tmp_path, "alpha", 0, "tiny", None, {"value": 2.0}, 0.5)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed-0.json"]


# --- resume -------------------------------------------------------------------------------------------


def test_resume_keeps_finished_seeds_and_reruns_missing_and_damaged_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    register(monkeypatch, fake("alpha", calls))
    assert run_cli(tmp_path, "alpha", "--scale", "tiny", "--seeds", "4") == 0
    first = json.loads(json.dumps(entry_of(tmp_path, "alpha")["metrics"]))
    directory = tmp_path / "alpha"
    runner.seed_path(tmp_path, "alpha", 1).unlink()
    damaged = runner.seed_path(tmp_path, "alpha", 2)
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated mid-file
    kept = {k: v for k, v in stamps(directory).items() if k in ("seed-0.json", "seed-3.json")}
    calls.seen.clear()
    capsys.readouterr()

    assert run_cli(tmp_path, "alpha", "--scale", "tiny", "--seeds", "4", "--resume") == 0
    assert calls.seeds("alpha") == [1, 2]
    err = capsys.readouterr().err
    assert f"{damaged}: invalid JSON" in err
    assert "running it again" in err
    assert "alpha: resuming, 2 seed(s) done, 2 to run" in err
    assert {k: v for k, v in stamps(directory).items() if k in kept} == kept  # untouched
    entry = entry_of(tmp_path, "alpha")
    assert (entry["seeds_run"], entry["seeds_reused"]) == ([1, 2], [0, 3])
    assert entry["metrics"] == first  # the same numbers as the uninterrupted run

    # Without --resume every seed runs again.
    calls.seen.clear()
    assert run_cli(tmp_path, "alpha", "--scale", "tiny", "--seeds", "4") == 0
    assert calls.seeds("alpha") == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (["--scale", "tiny"], ["--scale", "quick"], "written at scale tiny, this run is quick"),
        (["--scale", "tiny", "--data", "{data}"], ["--scale", "tiny"], "written with --data {data_abs}"),
    ],
)
def test_resume_refuses_files_of_another_scale_or_data(
    first: list[str],
    second: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: Calls,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out"
    register(monkeypatch, fake("alpha", calls))

    def fill(args: list[str]) -> list[str]:
        return [a.format(data=data) for a in args]

    assert run_cli(out, "alpha", *fill(first)) == 0
    before = stamps(out / "alpha")
    calls.seen.clear()
    capsys.readouterr()
    assert run_cli(out, "alpha", *fill(second), "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("dropkit reproduce: error: cannot resume: ")
    assert message.format(data_abs=data.resolve()) in err
    assert "run without --resume to replace them" in err
    assert len(err.strip().splitlines()) == 1
    assert calls.seen == []  # refused before anything ran
    assert stamps(out / "alpha") == before


# --- skipped and failed experiments, exit status --------------------------------------------------------


def _no_data(seed: int) -> None:
    raise DataUnavailableError("fake data not found in DATA/fake; put it there")


def _fails_at_seed_1(seed: int) -> None:
    if seed == 1:
        raise RuntimeError("boom in seed 1")


def _needs_optional(seed: int) -> None:
    import dropkit_test_absent_package  # type: ignore[import-not-found]  # noqa: F401


def test_skipped_and_failed_experiments_are_reported_and_the_suite_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    register(
        monkeypatch,
        fake("first", calls),
        fake("no-data", calls, raise_in_seed=_no_data),
        fake("broken", calls, raise_in_seed=_fails_at_seed_1),
        fake("optional", calls, raise_in_seed=_needs_optional),
        ("gone", "_test_no_such_module"),
        fake("last", calls, held=False),
    )
    assert run_cli(tmp_path, "all", "--scale", "tiny") == 1
    out, err = capsys.readouterr()
    assert "2 experiment(s) failed: broken, gone" in err
    assert calls.seeds("last") == [0, 1]  # ran after the failures

    statuses = {e["name"]: e["status"] for e in results_of(tmp_path)["experiments"]}
    assert statuses == {
        "first": "held",
        "no-data": "skipped",
        "broken": "failed",
        "optional": "skipped",
        "gone": "failed",
        "last": "not_held",
    }
    assert entry_of(tmp_path, "no-data")["message"] == "fake data not found in DATA/fake; put it there"
    assert "dropkit_test_absent_package" in entry_of(tmp_path, "optional")["message"]
    broken = entry_of(tmp_path, "broken")
    assert broken["message"] == "RuntimeError: boom in seed 1"
    assert broken["error_file"] == "broken/error.txt"
    traceback_text = (tmp_path / "broken" / "error.txt").read_text()
    assert "Traceback" in traceback_text
    assert "boom in seed 1" in traceback_text
    assert runner.seed_path(tmp_path, "broken", 0).exists()  # finished before the error: kept
    assert "ModuleNotFoundError" in entry_of(tmp_path, "gone")["message"]
    assert "broken: FAILED: RuntimeError: boom in seed 1" in out
    assert "no-data: SKIPPED: fake data not found" in out

    readme = (tmp_path / "README.md").read_text()
    for text in ("**skipped**", "**failed**", "**held**", "**did not hold**", "boom in seed 1"):
        assert text in readme
    assert "[broken/error.txt](broken/error.txt)" in readme

    # Fixed and resumed: the failed experiment reruns only its missing seed, its traceback goes.
    register(monkeypatch, fake("broken", calls))
    calls.seen.clear()
    assert run_cli(tmp_path, "broken", "--scale", "tiny", "--resume") == 0
    assert calls.seeds("broken") == [1]
    assert not (tmp_path / "broken" / "error.txt").exists()
    assert entry_of(tmp_path, "broken")["status"] == "held"
    assert entry_of(tmp_path, "no-data")["earlier_run"] is True  # the rest of the report is kept


def test_skipped_experiments_do_not_change_the_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    register(monkeypatch, fake("first", calls, held=None), fake("no-data", calls, raise_in_seed=_no_data))
    assert run_cli(tmp_path, "all", "--scale", "tiny") == 0
    assert results_of(tmp_path)["counts"] == {
        "held": 0,
        "not_held": 0,
        "undecided": 1,
        "skipped": 1,
        "failed": 0,
    }


def test_a_result_that_breaks_the_contract_fails_the_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    def returns_a_list(ctx: RunContext, seed: int) -> Any:
        return [seed]

    base = fake("bad", calls)
    bad = Experiment(base.name, base.title, base.claim, returns_a_list, base.summarize, base.default_seeds)
    register(monkeypatch, bad)
    outcome = runner.run_experiment("bad", runner.RunOptions(scale="tiny", output=tmp_path, progress=False))
    assert outcome.status == "failed"
    assert outcome.message == "TypeError: bad: run_seed must return a dict, got list"


# --- the report -----------------------------------------------------------------------------------------


def _links(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]*)"', page)


def test_report_shows_claim_verdict_tables_figures_and_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    register(monkeypatch, fake("alpha", calls), fake("beta", calls, held=None))
    assert run_cli(tmp_path, "all", "--scale", "tiny") == 0
    readme = (tmp_path / "README.md").read_text()
    page = (tmp_path / "index.html").read_text()

    # Overview first, then one section per experiment, in registry order.
    assert readme.index("## Overview") < readme.index("(`alpha`)\n") < readme.index("(`beta`)\n")
    assert "| experiment | claim | published | ours | held? |" in readme
    assert "| 0.50 ± 0.10 |" in readme
    assert "**held**" in readme
    assert "**undecided at this size**" in readme
    for text in (
        "**Claim.** Fakes hold <b>claims</b> & more (Nobody et al. 2024, Table 0)",
        "**Published.** 0.50 ± 0.10",
        "**Data.** nothing at all",
        "**Verdict: held.** Ours ",
        "#### Values per seed",
        "| seed | value |",
        "- A fake note about the protocol.",
        "![The value drawn for each seed.](alpha/values.png)",
        "[SVG](alpha/values.svg)",
        "**Run.** scale tiny; seeds 0, 1.",
        "`dropkit reproduce all --scale tiny --output",
    ):
        assert text in readme, text
    for name in ("alpha", "beta"):
        for fmt in ("png", "svg"):
            assert (tmp_path / name / f"values.{fmt}").stat().st_size > 0

    # HTML: escaped, self-contained, every local link resolves.
    assert "Fakes hold &lt;b&gt;claims&lt;/b&gt; &amp; more" in page
    assert "<b>claims</b>" not in page
    assert '<img src="alpha/values.svg"' in page
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page
    links = _links(page)
    assert links
    for link in links:
        assert not re.match(r"[a-z]+:|//", link), link  # no scheme, no remote resource
        if not link.startswith("#"):
            assert (tmp_path / link).is_file(), link
        else:
            assert f'id="{link[1:]}"' in page

    # results.json: sealed, the run's facts and each experiment's numbers.
    results = results_of(tmp_path)
    assert results["format"] == reproduce_report.RESULTS_FORMAT
    assert results["command"].startswith("dropkit reproduce all --scale tiny --output ")
    assert results["scale"] == "tiny"
    assert set(results["versions"]) >= {"dropkit", "torch", "python"}
    assert results["machine"]["cpu_count"] == os.cpu_count()
    assert results["machine"]["torch_threads"] == 1
    datetime.datetime.fromisoformat(results["finished"])
    alpha = entry_of(tmp_path, "alpha")
    assert alpha["claim"] == {
        "statement": CLAIM.statement,
        "source": CLAIM.source,
        "published": CLAIM.published,
    }
    assert alpha["held"] is True
    assert alpha["metrics"]["values"] == [
        read_sealed_json(runner.seed_path(tmp_path, "alpha", s))["result"]["value"] for s in (0, 1)
    ]
    assert alpha["tables"][0]["columns"] == ["seed", "value"]
    assert alpha["figures"][0]["files"] == {"png": "alpha/values.png", "svg": "alpha/values.svg"}
    assert alpha["seconds"] >= 0
    assert alpha["compute_seconds"] >= 0


def test_report_without_matplotlib_keeps_the_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    register(monkeypatch, fake("alpha", calls))
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)
    assert run_cli(tmp_path, "alpha", "--scale", "tiny") == 0
    readme = (tmp_path / "README.md").read_text()
    assert reproduce_report.MATPLOTLIB_MISSING in readme
    assert reproduce_report.MATPLOTLIB_MISSING.replace("'", "&#x27;") in (tmp_path / "index.html").read_text()
    assert "| seed | value |" in readme
    assert not list((tmp_path / "alpha").glob("values.*"))
    assert entry_of(tmp_path, "alpha")["figures"] == []


def test_figure_formats_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls) -> None:
    register(monkeypatch, fake("alpha", calls))
    assert run_cli(tmp_path, "alpha", "--scale", "tiny", "--formats", "png") == 0
    assert sorted(p.name for p in (tmp_path / "alpha").glob("values.*")) == ["values.png"]
    assert '<img src="alpha/values.png"' in (tmp_path / "index.html").read_text()
    assert "--formats png" in results_of(tmp_path)["command"]


def test_a_figure_that_fails_to_draw_fails_the_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    base = fake("alpha", calls)

    def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
        summary = base.summarize(ctx, results)

        def draw(fig: Any) -> None:
            raise ValueError("no such axis")

        return Summary(summary.verdict, summary.tables, [Figure("broken", "Never drawn.", draw)])

    register(
        monkeypatch, Experiment("alpha", base.title, base.claim, base.run_seed, summarize, base.default_seeds)
    )
    assert run_cli(tmp_path, "alpha", "--scale", "tiny") == 1
    entry = entry_of(tmp_path, "alpha")
    assert (entry["status"], entry["message"]) == ("failed", "ValueError: no such axis")
    assert "#### Values per seed" in (tmp_path / "README.md").read_text()  # the summary is still shown


def test_progress_lines_off_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    register(monkeypatch, fake("alpha", calls))
    assert run_cli(tmp_path, "alpha", "--scale", "tiny", progress=True) == 0
    err = capsys.readouterr().err
    assert "alpha: 1/2 seeds, " in err
    assert "alpha: 2/2 seeds, done in " in err
    assert "reproduce: 1/1 experiments, done in " in err
    assert "\r" not in err


def test_threads_are_set_for_the_run_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    seen: list[int] = []
    base = fake("alpha", calls)

    def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
        seen.append(torch.get_num_threads())
        return base.run_seed(ctx, seed)

    register(
        monkeypatch, Experiment("alpha", base.title, base.claim, run_seed, base.summarize, base.default_seeds)
    )
    before = torch.get_num_threads()
    assert run_cli(tmp_path, "alpha", "--scale", "tiny") == 0  # --threads 1
    assert seen == [1, 1]
    assert torch.get_num_threads() == before


# --- command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no experiment given: choose from all, alpha, beta (or --list)"),
        (["gamma"], "unknown experiment 'gamma': choose from all, alpha, beta"),
        (["all", "alpha"], "'all' cannot be combined with other names, got all alpha"),
        (["alpha", "alpha"], "experiment 'alpha' is listed twice"),
        (["alpha", "--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["alpha", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["alpha", "--data", "{tmp}/missing"], "--data {tmp}/missing: not a directory"),
        (["alpha", "--output", "{tmp}/file/sub"], "--output {tmp}/file/sub: cannot create the directory"),
    ],
)
def test_command_line_errors(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    calls: Calls,
    capsys: pytest.CaptureFixture[str],
) -> None:
    register(monkeypatch, fake("alpha", calls), fake("beta", calls))
    (tmp_path / "file").write_text("not a directory")
    args = [a.format(tmp=tmp_path) for a in argv]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    status = main(["reproduce", *args, "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"dropkit reproduce: error: {message.format(tmp=tmp_path)}")
    assert len(err.strip().splitlines()) == 1
    assert calls.seen == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["alpha", "--formats", "gif"], "expected distinct formats from png,svg"),
        (["alpha", "--formats", "png,png"], "expected distinct formats from png,svg"),
        (["alpha", "--quick", "--scale", "tiny"], "not allowed with argument --quick"),
        (["alpha", "--seeds", "two"], "invalid int value: 'two'"),
    ],
)
def test_command_line_parse_errors(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    calls: Calls,
    capsys: pytest.CaptureFixture[str],
) -> None:
    register(monkeypatch, fake("alpha", calls))
    with pytest.raises(SystemExit) as info:
        main(["reproduce", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_and_scale_choose_the_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    register(monkeypatch, fake("alpha", calls))
    assert run_cli(tmp_path / "q", "alpha", "--quick", "--seeds", "1") == 0
    assert run_cli(tmp_path / "f", "alpha", "--seeds", "1") == 0
    assert [scale for _, _, scale in calls.seen] == ["quick", "full"]
    assert results_of(tmp_path / "f")["command"].split()[2:5] == ["alpha", "--scale", "full"]


def test_list_shows_names_titles_and_claims(
    monkeypatch: pytest.MonkeyPatch, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per claim
    register(monkeypatch, fake("alpha", calls), ("gone", "_test_no_such_module"))
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert "alpha  Fake experiment alpha" in out
    assert f"claim: {CLAIM.statement} ({CLAIM.source})" in out
    assert f"published: {CLAIM.published}" in out
    assert "gone   (unavailable: ModuleNotFoundError" in out


def test_run_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scale must be one of tiny, quick, full, got 'huge'"):
        runner.RunOptions(scale="huge", output=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seeds must be None or an int >= 1, got 0"):
        runner.RunOptions(seeds=0, output=tmp_path)
    with pytest.raises(ValueError, match="formats must be distinct entries of png, svg"):
        runner.RunOptions(formats=("gif",), output=tmp_path)


# --- every registered experiment, tiny, end to end and resumed ------------------------------------------


@pytest.mark.parametrize("name", REGISTERED)
def test_every_experiment_runs_tiny_end_to_end_and_resumes(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(tmp_path, name, "--scale", "tiny") == 0, capsys.readouterr()
    entry = entry_of(tmp_path, name)
    assert entry["status"] in ("held", "not_held", "undecided"), entry["message"]
    assert entry["seeds"]
    assert entry["seeds_run"] == entry["seeds"]
    assert entry["verdict"]
    readme = (tmp_path / "README.md").read_text()
    assert entry["claim"]["statement"] in readme
    for figure in entry["figures"]:
        for path in figure["files"].values():
            assert (tmp_path / path).is_file()
    before = stamps(tmp_path / name)
    assert len(before) == len(entry["seeds"])

    assert run_cli(tmp_path, name, "--scale", "tiny", "--resume") == 0, capsys.readouterr()
    again = entry_of(tmp_path, name)
    assert again["seeds_run"] == []
    assert again["seeds_reused"] == entry["seeds"]
    assert stamps(tmp_path / name) == before  # nothing was run or rewritten
    assert (again["status"], again["verdict"], again["metrics"]) == (
        entry["status"],
        entry["verdict"],
        entry["metrics"],
    )


@pytest.mark.parametrize("name", ["uci", "sparse-vd"])
def test_wrapped_reproductions_are_deterministic(name: str, tmp_path: Path) -> None:
    for out in ("a", "b"):
        assert run_cli(tmp_path / out, name, "--scale", "tiny") == 0
    results = [read_sealed_json(runner.seed_path(tmp_path / out, name, 0))["result"] for out in ("a", "b")]

    def strip(value: Any) -> Any:  # wall times differ between runs
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "seconds" not in k}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    assert strip(results[0]) == strip(results[1])


@pytest.mark.parametrize("name", ["uci", "sparse-vd"])
def test_wrapped_reproductions_need_data_beyond_tiny(name: str, tmp_path: Path) -> None:
    assert run_cli(tmp_path, name, "--quick") == 0
    entry = entry_of(tmp_path, name)
    assert entry["status"] == "skipped"
    assert "--data DIR" in entry["message"]
    assert "nothing is downloaded" in entry["message"]


def test_experiments_run_one_at_a_time_make_one_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    register(monkeypatch, fake("alpha", calls), fake("beta", calls, held=False))
    assert run_cli(tmp_path, "beta", "--scale", "tiny") == 0
    assert run_cli(tmp_path, "alpha", "--scale", "tiny") == 0
    results = results_of(tmp_path)
    assert [e["name"] for e in results["experiments"]] == ["alpha", "beta"]  # registry order
    assert [e["earlier_run"] for e in results["experiments"]] == [False, True]
    assert results["counts"]["held"] == 1
    assert results["counts"]["not_held"] == 1
    readme = (tmp_path / "README.md").read_text()
    assert "Kept from earlier runs into this directory (same scale and data): beta." in readme
    assert "From an earlier run: dropkit reproduce beta --scale tiny" in readme
    # Another scale starts a new report: nothing of the tiny runs is mixed in.
    assert run_cli(tmp_path, "alpha", "--quick", "--seeds", "1") == 0
    assert [e["name"] for e in results_of(tmp_path)["experiments"]] == ["alpha"]


# --- verdicts of the wrapped reproductions (known inputs, no training) -----------------------------------


def _uci_seed(rmse: Sequence[float], ll: Sequence[float], *, protocol: bool = True) -> dict[str, Any]:
    results = [
        {
            "split": i,
            "rmse": r,
            "ll": v,
            "ll_tau_learned": v + 0.1,
            "picp95": 0.95,
            "tau_at_grid_edge": i % 2 == 0,
        }
        for i, (r, v) in enumerate(zip(rmse, ll, strict=True))
    ]
    entry = {"protocol": protocol, "config": {"samples": 10_000}, "epochs": 4000, "results": results}
    return {"data": "test values", "datasets": {"yacht": entry}}


@pytest.mark.parametrize(
    ("rmse", "ll", "scale", "held"),
    [
        ([0.60, 0.70, 0.65, 0.75], [-1.24, -1.26, -1.22, -1.28], "quick", True),  # as published
        ([0.40, 0.45, 0.42, 0.44], [-1.00, -1.02, -0.98, -1.01], "full", True),  # better than published
        ([1.50, 1.60, 1.55, 1.65], [-1.24, -1.26, -1.22, -1.28], "quick", False),  # RMSE far worse
        ([0.60, 0.70, 0.65, 0.75], [-1.60, -1.65, -1.62, -1.70], "full", False),  # LL far worse
        ([0.60, 0.70, 0.65, 0.75], [-1.24, -1.26, -1.22, -1.28], "tiny", None),  # tiny never decides
    ],
)
def test_uci_verdict(
    rmse: list[float], ll: list[float], scale: Scale, held: bool | None, tmp_path: Path
) -> None:
    from dropkit.experiments.reproduce import uci_table

    ctx = RunContext(scale, None, tmp_path)
    summary = uci_table.summarize(ctx, [_uci_seed(rmse, ll)])
    assert summary.verdict.held is held
    assert "Yacht" in summary.verdict.text
    rows = summary.tables[0].rows
    assert rows[0][:3] == ["Yacht", "4", "0.67 ± 0.05"]  # the published text as published
    mean = sum(rmse) / len(rmse)
    assert summary.metrics["yacht.rmse"][0] == pytest.approx(mean)
    # the benchmark's SE: std with ddof 0 over the splits, / sqrt(splits)
    std = (sum((r - mean) ** 2 for r in rmse) / len(rmse)) ** 0.5
    assert summary.metrics["yacht.rmse"][1] == pytest.approx(std / len(rmse) ** 0.5)


def test_uci_verdict_is_undecided_off_the_protocol(tmp_path: Path) -> None:
    from dropkit.experiments.reproduce import uci_table

    seed = _uci_seed([0.6, 0.7], [-1.24, -1.26], protocol=False)
    summary = uci_table.summarize(RunContext("full", None, tmp_path), [seed])
    assert summary.verdict.held is None
    assert "differ from the published protocol" in summary.verdict.text


def test_uci_seeds_are_averaged_per_split_before_the_standard_error(tmp_path: Path) -> None:
    from dropkit.experiments.reproduce import uci_table

    seeds = [_uci_seed([0.6, 0.8], [-1.2, -1.3]), _uci_seed([0.8, 1.0], [-1.4, -1.5])]
    summary = uci_table.summarize(RunContext("quick", None, tmp_path), seeds)
    assert summary.metrics["yacht.rmse"] == pytest.approx([0.8, 0.1 / 2**0.5])  # splits 0.7 and 0.9


def _sparse_seed(error: float, compression: float | None, epochs: int = 200) -> dict[str, Any]:
    config = {
        "epochs": epochs,
        "seed": 0,
        "lr_decay_start": epochs / 2,
        "kl_start": epochs / 40,
        "kl_end": epochs / 10,
    }
    history = [{"epoch": 1, "test_error": error, "compression": compression, "lr": 1e-3, "kl_weight": 1.0}]
    return {
        "data": "mnist: test values",
        "n_train": 60_000,
        "n_test": 10_000,
        "config": config,
        "official_recipe": epochs == 200,
        "test_error": error,
        "compression": compression,
        "layer_sparsity": [0.985, 0.976, 0.796],
        "history": history,
    }


@pytest.mark.parametrize(
    ("error", "compression", "scale", "held"),
    [
        (0.0173, 59.9, "full", True),  # this project's 200-epoch run (REPRODUCTIONS.md)
        (0.0250, 70.0, "full", False),  # error too high
        (0.0180, 30.0, "full", False),  # compression too low
        (0.0180, None, "full", True),  # everything pruned: infinite compression, the error decides
        (0.0173, 59.9, "quick", None),
    ],
)
def test_sparse_vd_verdict(
    error: float, compression: float | None, scale: Scale, held: bool | None, tmp_path: Path
) -> None:
    from dropkit.experiments.reproduce import sparse_vd

    epochs = 200 if scale == "full" else 8
    summary = sparse_vd.summarize(
        RunContext(scale, None, tmp_path), [_sparse_seed(error, compression, epochs)]
    )
    assert summary.verdict.held is held
    assert "published 1.92 % at 68x" in summary.verdict.text
    assert summary.tables[0].rows[0] == ["test error (%)", "1.92", format_number(100 * error)]


def test_uci_kernels_follow_the_thread_setting() -> None:
    numba = pytest.importorskip("numba")
    from dropkit.experiments.reproduce.uci_table import kernel_threads

    before = numba.get_num_threads()
    with kernel_threads(1):
        assert numba.get_num_threads() == 1
    with kernel_threads(10_000):  # at most numba's pool
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    assert numba.get_num_threads() == before
