"""The ``dropkit`` command line as users meet it: the list of commands, ``--version``, one help
text per command whichever way it is called (each default once), and both data layouts of
``dropkit uci`` (tiny synthetic data, nothing read from the shared data directory)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import dropkit
from dropkit.__main__ import build_parser, main
from dropkit.experiments import sparse_vd_mnist
from dropkit.experiments.uci import cli as uci_cli
from tests.test_uci import _argv, _write_dataset, _write_published_layout

COMMANDS = ("demo", "uci", "sparse-vd")


@pytest.fixture(autouse=True)
def _fixed_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Help is wrapped to the terminal width: fix it, so that the texts compare."""
    monkeypatch.setenv("COLUMNS", "100")


def _help(entry: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The help an entry point prints for ``argv`` (it exits with status 0)."""
    with pytest.raises(SystemExit) as info:
        entry(argv)
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def _split_usage(text: str) -> tuple[str, str]:
    """``(usage, rest)``: the usage block (up to the first blank line), the rest verbatim."""
    usage, _, rest = text.partition("\n\n")
    return usage, rest


def _usage_words(usage: str, prog: str) -> list[str]:
    """The usage's options and metavars, without the program name and the line wrapping."""
    assert usage.startswith(f"usage: {prog} ")
    return usage[len(f"usage: {prog} ") :].split()


def _option_blocks(text: str) -> dict[str, str]:
    """Each option's help in the ``options:`` section, keyed by its first option string."""
    section = text.split("\noptions:\n", 1)[1]
    blocks: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current is not None and line.startswith("   "):
            blocks[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return blocks


def _commands() -> argparse._SubParsersAction[argparse.ArgumentParser]:
    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands


def _subparser(name: str) -> argparse.ArgumentParser:
    return _commands().choices[name]


def _summaries() -> dict[str, str]:
    """Each command's one-line help of ``dropkit --help``."""
    return {action.dest: action.help or "" for action in _commands()._get_subactions()}


def _meaningful_default(action: argparse.Action) -> bool:
    return action.default not in (None, False, [], argparse.SUPPRESS)


# --- dropkit --help, --version --------------------------------------------------------------------


def test_top_level_help_lists_each_command_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(main, ["--help"], capsys)
    lines = text.splitlines()
    summaries = _summaries()
    assert tuple(summaries)[: len(COMMANDS)] == COMMANDS  # later commands come after these
    assert summaries["uci"] == uci_cli.SUMMARY
    assert summaries["sparse-vd"] == sparse_vd_mnist.SUMMARY
    for command, summary in summaries.items():
        # the command and its whole one-line summary share a line
        (line,) = [line for line in lines if line.split()[:1] == [command]]
        assert line.split(maxsplit=1)[1] == summary
    assert "Run 'dropkit COMMAND --help'" in text
    assert "--version" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert _help(main, ["--version"], capsys).strip() == f"dropkit {dropkit.__version__}"


def test_version_from_the_shell() -> None:
    # `python -m dropkit` runs the same main as the `dropkit` console script.
    env = {**os.environ, "COLUMNS": "100"}
    done = subprocess.run(
        [sys.executable, "-m", "dropkit", "--version"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"dropkit {dropkit.__version__}"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "COMMAND" in err
    assert "Traceback" not in err


# --- one help per command -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "module_main", "module_prog"),
    [
        ("uci", uci_cli.main, "python -m dropkit.experiments.uci.cli"),
        ("sparse-vd", sparse_vd_mnist.main, "python -m dropkit.experiments.sparse_vd_mnist"),
    ],
)
def test_help_is_the_same_whichever_way_a_command_is_called(
    command: str,
    module_main: Callable[[list[str]], int],
    module_prog: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mounted = _help(main, [command, "--help"], capsys)
    alone = _help(module_main, ["--help"], capsys)
    mounted_usage, mounted_rest = _split_usage(mounted)
    alone_usage, alone_rest = _split_usage(alone)
    # Only the program name (and so the wrapping of the usage) differs.
    assert _usage_words(mounted_usage, f"dropkit {command}") == _usage_words(alone_usage, module_prog)
    assert mounted_rest == alone_rest
    assert mounted_rest.startswith(_subparser(command).description.split()[0])  # a description


def test_module_help_from_the_shell() -> None:
    env = {**os.environ, "COLUMNS": "100"}
    argv = [sys.executable, "-m", "dropkit.experiments.uci.cli", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    mounted = _subparser("uci").format_help()  # COLUMNS is 100 here too
    assert _split_usage(done.stdout)[1] == _split_usage(mounted)[1]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_default_is_shown_once(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(main, [command, "--help"], capsys)
    blocks = _option_blocks(text)
    parser = _subparser(command)
    for action in parser._actions:
        if not action.option_strings:
            continue
        block = blocks[action.option_strings[0]]
        count = block.count("(default:")
        assert count <= 1, block
        if _meaningful_default(action):
            assert count == 1, block
            if "(default: %(default)s)" not in (action.help or "") and "(default:" not in (action.help or ""):
                assert f"(default: {action.default})" in block, block
    for noise in ("(default: None)", "(default: False)", "(default: [])"):
        assert noise not in text


def test_uci_help_names_both_layouts(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(main, ["uci", "--help"], capsys)
    flat = " ".join(text.split())
    assert "DIR/<name>/data.txt" in flat
    assert "DIR/<name>/data/data.txt" in flat
    assert "UCI_Datasets" in flat
    assert "DIR/<name>/data.txt or DIR/<name>/data/data.txt" in " ".join(
        _option_blocks(text)["--data"].split()
    )


# --- dropkit uci on both layouts --------------------------------------------------------------------


def test_uci_runs_on_a_root_with_both_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "UCI_Datasets"
    _write_dataset(data, name="flat", n_splits=1)
    _write_published_layout(data, name="nested", n_splits=1)
    out = tmp_path / "out"
    assert main(["uci", *_argv(data, out)]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"^flat: RMSE \S+ ± \S+  LL \S+ ± \S+  \(1 splits, .+ this run\)$", stdout, re.M)
    assert re.search(r"^nested: RMSE ", stdout, re.M)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert [s["dataset"] for s in summary] == ["flat", "nested"]
    nested = json.loads((out / "nested" / "split_0.json").read_text())
    assert nested["settings"]["splits_source"] == "index files (equal to the regeneration)"


def test_uci_errors_name_the_layouts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["uci", *_argv(tmp_path / "empty", tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dropkit uci: error: ")
    assert "<name>/data.txt and " in err
    assert "<name>/data/data.txt" in err

    (tmp_path / "root" / "kin8nm").mkdir(parents=True)
    assert main(["uci", *_argv(tmp_path / "root", tmp_path / "out", "--datasets", "kin8nm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{tmp_path / 'root' / 'kin8nm' / 'data' / 'data.txt'}" in err
    assert "UCI_Datasets" in err

    _write_published_layout(tmp_path / "UCI_Datasets", name="yacht", n_splits=1)
    assert main(["uci", *_argv(tmp_path / "UCI_Datasets" / "yacht", tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(f"use --data {tmp_path / 'UCI_Datasets'} --datasets yacht")
    assert not (tmp_path / "out" / "data").exists()  # its data/ folder was not run as a data set


# --- dropkit sparse-vd ------------------------------------------------------------------------------


def test_sparse_vd_is_a_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sparse-vd", "--data", str(tmp_path / "nowhere"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dropkit sparse-vd: error: ")
    assert err.count("\n") == 1
    assert "never downloads" in err
