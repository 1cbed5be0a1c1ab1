"""Runs that survive damage: atomic, sealed result files; resumes that recompute any file they
cannot trust (and say so); output checked before training; one-line CLI errors, exit status 2.

Fault injection on the ``dropkit uci`` command, the sparse VD experiment and the digits demo,
with tiny synthetic data (no downloads, nothing read from the shared data directory).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dropkit._version import __version__
from dropkit.experiments import _files, digits, sparse_vd_mnist
from dropkit.experiments.uci import cli, protocol, report
from tests.test_sparse_vd_mnist import write_mnist
from tests.test_uci import _argv, _write_dataset

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def _one_error_line(err: str, prefix: str, *, alone: bool = True) -> str:
    """The single error line on stderr (no traceback); ``alone``: nothing else was printed."""
    assert "Traceback" not in err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith(f"{prefix}: error: ")]
    assert len(errors) == 1, err
    assert errors[0] == lines[-1], err
    if alone:
        assert len(lines) == 1, err
    return errors[0]


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("training started although the run should have stopped before it")


# --- the shared file helper ----------------------------------------------------------------------


def test_write_atomic_writes_through_a_unique_fsynced_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "deep" / "result.json"
    replaced: list[tuple[str, str]] = []
    synced: list[int] = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(
        os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b))[1]
    )
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    _files.write_atomic(path, "first\n")
    _files.write_atomic(path, "second ✓\n")
    assert path.read_text(encoding="utf-8") == "second ✓\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temporary left
    (src1, dst1), (src2, dst2) = replaced
    assert dst1 == dst2 == str(path)
    # Each write has its own temporary in the target's directory: two runs never share one.
    assert src1 != src2
    assert Path(src1).parent == Path(src2).parent == path.parent
    assert len(synced) >= 2  # the file (and the directory where supported) of each write


def test_write_atomic_failure_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _files.write_atomic(tmp_path / "r.json", "old\n")

    def fail(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        _files.write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.skipif(not hasattr(os, "umask"), reason="POSIX permissions")
def test_write_atomic_files_get_the_usual_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = _files.write_atomic(tmp_path / "r.json", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_prepare_output_dir(tmp_path: Path) -> None:
    made = _files.prepare_output_dir(tmp_path / "a" / "b", "--output")
    assert made.is_dir()
    assert list(made.iterdir()) == []  # the probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"^--output .*file[/\\]out: cannot create the directory"):
        _files.prepare_output_dir(blocker / "out", "--output")
    with pytest.raises(ValueError, match="cannot create the directory"):
        _files.prepare_output_dir(blocker, "--output")
    with pytest.raises(ValueError, match="is a directory, expected a file path"):
        _files.prepare_output_file(tmp_path / "a", "--output")
    with pytest.raises(
        ValueError, match=r"r\.json: cannot create the directory .*file \(.*file is not a directory\)"
    ):
        _files.prepare_output_file(blocker / "r.json", "--output")


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every directory refuse the probe file, as a read-only one does (root included)."""
    real = _files._create_unique

    def refuse(directory: Path, name: str) -> tuple[int, Path]:
        if name == "dropkit-probe":
            raise PermissionError(13, "Permission denied")
        return real(directory, name)

    monkeypatch.setattr(_files, "_create_unique", refuse)


def test_prepare_output_dir_proves_writability_with_a_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _read_only(monkeypatch)
    with pytest.raises(
        ValueError, match=r"^--output .*: the directory .* is not writable \(Permission denied\)$"
    ):
        _files.prepare_output_dir(tmp_path, "--output")


@pytest.mark.skipif(ROOT or sys.platform == "win32", reason="root ignores permissions; POSIX modes")
def test_prepare_output_dir_refuses_a_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"the directory .*locked is not writable \(Permission denied\)"):
            _files.prepare_output_dir(locked, "--output")
    finally:
        locked.chmod(0o700)


def test_seal_and_unseal(tmp_path: Path) -> None:
    sealed = _files.seal({"a": [1, 2.5, None], "b": {"c": float("nan")}})
    again = json.loads(json.dumps(sealed, indent=3))  # other layout, same content
    assert _files.unseal(again)["a"] == [1, 2.5, None]
    with pytest.raises(ValueError, match="checksum mismatch"):
        _files.unseal({**sealed, "a": [1, 2.5]})
    with pytest.raises(ValueError, match="no 'sha256' checksum"):
        _files.unseal({"a": 1})
    with pytest.raises(ValueError, match="not a JSON object"):
        _files.unseal([1, 2])
    with pytest.raises(ValueError, match="must not have a 'sha256' key"):
        _files.seal(sealed)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(sealed)[:-5])
    with pytest.raises(ValueError, match="invalid JSON"):
        _files.read_sealed_json(path)


# --- dropkit uci: resume recomputes what it cannot trust -----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 3-split run of the toy data set: (data directory, output directory)."""
    root = tmp_path_factory.mktemp("uci")
    _write_dataset(root / "data")
    assert cli.main(_argv(root / "data", root / "out")) == 0
    return root / "data", root / "out"


def _reseal(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change a split file's content and give it a valid checksum again (only identity and type
    checks can then catch the change)."""
    payload = json.loads(path.read_text())
    del payload[_files.CHECKSUM_KEY]
    change(payload)
    path.write_text(json.dumps(_files.seal(payload)))


def _edit_value(path: Path) -> None:
    payload = json.loads(path.read_text())
    payload["result"]["rmse"] = 0.01  # a better number, checksum untouched
    path.write_text(json.dumps(payload, indent=2))


def _bad_checksum(path: Path) -> None:
    payload = json.loads(path.read_text())
    payload["sha256"] = "0" * 64
    path.write_text(json.dumps(payload))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_split(path: Path) -> None:
    # The case: a file named for one split holding another split's (valid) result.
    shutil.copyfile(path.with_name("split_1.json"), path)


def _unsealed(path: Path) -> None:
    payload = json.loads(path.read_text())
    del payload["sha256"]
    path.write_text(json.dumps(payload))


FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "hand-edited": (_edit_value, "checksum mismatch (the content was changed after it was written)"),
    "bad-checksum": (_bad_checksum, "checksum mismatch"),
    "truncated": (_truncate, "invalid JSON"),
    "empty": (lambda p: p.write_text(""), "invalid JSON"),
    "not-utf8": (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not UTF-8 text"),
    "not-an-object": (lambda p: p.write_text("[1, 2]"), "not a JSON object (got list)"),
    "no-checksum": (_unsealed, "no 'sha256' checksum"),
    "other-split": (_other_split, "written for split 1, expected 2"),
    "missing-key": (lambda p: _reseal(p, lambda d: d.pop("settings")), "missing key 'settings'"),
    "missing-result-key": (
        lambda p: _reseal(p, lambda d: d["result"].pop("ll")),
        "result has no key 'll'",
    ),
    "wrong-type": (
        lambda p: _reseal(p, lambda d: d["result"].update(rmse="0.5")),
        "result key 'rmse' is str, expected int or float",
    ),
    "wrong-envelope-type": (
        lambda p: _reseal(p, lambda d: d.update(split="2")),
        "'split' is str, expected int",
    ),
    "bool-as-count": (
        lambda p: _reseal(p, lambda d: d["result"].update(epochs=True)),
        "result key 'epochs' is bool, expected int",
    ),
    "other-dataset": (
        lambda p: _reseal(p, lambda d: d.update(dataset="yacht")),
        "written for dataset 'yacht', expected 'toy'",
    ),
    "inner-split": (
        lambda p: _reseal(p, lambda d: d["result"].update(split=0)),
        "result is of 'toy' split 0, expected 'toy' split 2",
    ),
    "other-settings": (
        lambda p: _reseal(p, lambda d: d["settings"].update(n_hidden=50)),
        "written for other settings (n_hidden=50, now 6)",
    ),
    "other-version": (
        lambda p: _reseal(p, lambda d: d.update(dropkit_version="0.0.1")),
        f"written by dropkit 0.0.1, this is dropkit {__version__}",
    ),
    "other-format": (
        lambda p: _reseal(p, lambda d: d.update(format="something-else")),
        "format 'something-else', expected 'dropkit-uci-split/1'",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_resume_recomputes_a_damaged_or_foreign_file(
    fault: str,
    finished_run: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, finished = finished_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    damaged = out / "toy" / "split_2.json"
    damage, reason = FAULTS[fault]
    damage(damaged)
    calls: list[list[int]] = []
    real = protocol.run_splits
    monkeypatch.setattr(
        protocol, "run_splits", lambda *a, **k: (calls.append([s.index for s in a[1]]), real(*a, **k))[1]
    )
    capsys.readouterr()
    assert cli.main(_argv(data, out, "--resume")) == 0
    assert calls == [[2]]  # only the damaged split trains again
    err = capsys.readouterr().err
    recomputed = [line for line in err.splitlines() if line.endswith("; recomputing")]
    assert len(recomputed) == 1, err  # one line per recomputed file
    assert recomputed[0].startswith(f"{damaged}: {reason}"), err
    # The file is whole again, and holds split 2's real result.
    settings = json.loads((finished / "toy" / "split_0.json").read_text())["settings"]
    fresh = report.read_split_result(damaged, "toy", 2, settings)
    original = json.loads((finished / "toy" / "split_2.json").read_text())["result"]
    assert fresh["rmse"] == pytest.approx(original["rmse"], rel=1e-5)
    assert fresh["ll"] == pytest.approx(original["ll"], rel=1e-5)
    assert json.loads((out / "summary.json").read_text())["summary"][0]["n_splits"] == 3


def test_resume_computes_the_split_a_misnamed_file_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The case exactly: split_2.json says "split": 3 and split 3 has no file; split 3
    # used to be taken from split_2.json and never computed.
    data = tmp_path / "data"
    _write_dataset(data, n_splits=4)
    out = tmp_path / "out"
    assert cli.main(_argv(data, out, "--splits", "3")) == 0
    os.replace(out / "toy" / "split_3.json", out / "toy" / "split_2.json")
    calls: list[list[int]] = []
    real = protocol.run_splits
    monkeypatch.setattr(
        protocol, "run_splits", lambda *a, **k: (calls.append([s.index for s in a[1]]), real(*a, **k))[1]
    )
    capsys.readouterr()
    assert cli.main(_argv(data, out, "--splits", "2", "3", "--resume")) == 0
    assert calls == [[2, 3]]
    assert "split_2.json: written for split 3, expected 2; recomputing" in capsys.readouterr().err
    for i in (2, 3):
        assert json.loads((out / "toy" / f"split_{i}.json").read_text())["split"] == i


def test_split_file_format(finished_run: tuple[Path, Path]) -> None:
    _, out = finished_run
    payload = json.loads((out / "toy" / "split_1.json").read_text())
    assert set(payload) == {"format", "dataset", "split", "dropkit_version", "settings", "result", "sha256"}
    assert (payload["format"], payload["dataset"], payload["split"]) == ("dropkit-uci-split/1", "toy", 1)
    assert payload["dropkit_version"] == __version__
    assert payload["sha256"] == _files.checksum({k: v for k, v in payload.items() if k != "sha256"})
    assert (payload["result"]["dataset"], payload["result"]["split"]) == ("toy", 1)


# --- dropkit uci: errors before any training, one line, exit status 2 --------------------------


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        (["0", "0"], r"splits entry 0 is listed twice \(got \[0, 0\]\)"),
        (["1", "2", "1"], r"splits entry 1 is listed twice"),
        (["3"], r"splits entry 3 is out of range for toy \(3 splits\)"),
        (["-1"], r"splits entry -1 is out of range"),
    ],
)
def test_bad_splits_stop_before_training(
    splits: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    monkeypatch.setattr(protocol, "run_splits", _no_training)
    assert cli.main(_argv(data, tmp_path / "out", "--splits", *splits)) == 2
    line = _one_error_line(capsys.readouterr().err, "dropkit uci")
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_unwritable_output_stops_before_training(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A path under a regular file cannot be created, by root either.
    data = tmp_path / "data"
    _write_dataset(data)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out" if where == "under-a-file" else blocker
    monkeypatch.setattr(protocol, "run_splits", _no_training)
    assert cli.main(_argv(data, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "dropkit uci")
    assert f"--output {out}: cannot create the directory" in line


@pytest.mark.skipif(ROOT or sys.platform == "win32", reason="root ignores permissions; POSIX modes")
def test_read_only_output_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    monkeypatch.setattr(protocol, "run_splits", _no_training)
    try:
        assert cli.main(_argv(data, out)) == 2
    finally:
        out.chmod(0o700)
    line = _one_error_line(capsys.readouterr().err, "dropkit uci")
    assert "cannot create the directory" in line or "not writable" in line


def test_read_only_output_stops_before_training_as_root_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    _read_only(monkeypatch)
    monkeypatch.setattr(protocol, "run_splits", _no_training)
    assert cli.main(_argv(data, tmp_path / "out")) == 2
    line = _one_error_line(capsys.readouterr().err, "dropkit uci")
    assert line.endswith(f"the directory {tmp_path / 'out'} is not writable (Permission denied)")


def test_concrete_output_is_checked_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dropkit.experiments.uci import concrete

    data = tmp_path / "data"
    _write_dataset(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "concrete").write_text("in the way")
    monkeypatch.setattr(concrete, "run_splits", _no_training)
    assert cli.main([*_argv(data, out), "--concrete"]) == 2
    err = capsys.readouterr().err
    assert f"dropkit uci: error: --output {out / 'concrete'}: cannot create the directory" in err
    assert "Traceback" not in err


def test_a_write_failure_mid_run_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _write_dataset(data, n_splits=1)

    def full_disk(*args: Any, **kwargs: Any) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_split_result", full_disk)
    assert cli.main(_argv(data, tmp_path / "out")) == 2
    line = _one_error_line(capsys.readouterr().err, "dropkit uci", alone=False)
    assert f"cannot write the results under {tmp_path / 'out'}: [Errno 28] No space left on device" in line


def test_unreadable_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    folder = _write_dataset(data)
    (folder / "n_hidden.txt").unlink()
    (folder / "n_hidden.txt").mkdir()  # an OSError other than FileNotFoundError
    assert cli.main(_argv(data, tmp_path / "out")) == 2
    assert "n_hidden.txt" in _one_error_line(capsys.readouterr().err, "dropkit uci")


def test_cli_errors_reach_the_shell_without_traceback(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "DROPKIT_FORCE_REFERENCE"}
    for extra in (["--splits", "0", "0"], ["--output", str(blocker / "out")]):
        argv = [sys.executable, "-m", "dropkit", "uci", *_argv(data, tmp_path / "out"), *extra]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 2, done.stderr
        _one_error_line(done.stderr, "dropkit uci")
        assert done.stdout == ""


# --- the sparse VD experiment --------------------------------------------------------------------

_SPARSE_PROG = "python -m dropkit.experiments.sparse_vd_mnist"


def _sparse_argv(root: Path, output: Path) -> list[str]:
    return ["--data", str(root), "--epochs", "1", "--threads", "1", "--output", str(output), "--no-progress"]


def test_sparse_vd_results_are_sealed(tmp_path: Path) -> None:
    root = write_mnist(tmp_path / "mnist", n_train=100, n_test=20)
    output = tmp_path / "out" / "results.json"
    assert sparse_vd_mnist.main(_sparse_argv(root, output)) == 0
    payload = _files.read_sealed_json(output)
    assert payload["complete"] is True
    assert payload["dropkit_version"] == __version__
    assert [p.name for p in output.parent.iterdir()] == ["results.json"]  # no temporary left
    edited = json.loads(output.read_text())
    edited["results"]["test_error"] = 0.0
    with pytest.raises(ValueError, match="checksum mismatch"):
        _files.unseal(edited)


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_sparse_vd_bad_output_stops_before_training(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_mnist(tmp_path / "mnist", n_train=20, n_test=10)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    output = blocker / "results.json" if where == "under-a-file" else tmp_path
    monkeypatch.setattr(sparse_vd_mnist, "run_experiment", _no_training)
    assert sparse_vd_mnist.main(_sparse_argv(root, output)) == 2
    line = _one_error_line(capsys.readouterr().err, _SPARSE_PROG)
    expected = "cannot create the directory" if where == "under-a-file" else "is a directory"
    assert expected in line


def test_sparse_vd_write_failure_mid_run_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_mnist(tmp_path / "mnist", n_train=20, n_test=10)

    def full_disk(*args: Any, **kwargs: Any) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sparse_vd_mnist, "write_results", full_disk)
    assert sparse_vd_mnist.main(_sparse_argv(root, tmp_path / "r.json")) == 2
    line = _one_error_line(capsys.readouterr().err, _SPARSE_PROG, alone=False)
    assert line.endswith(f"cannot write --output {tmp_path / 'r.json'}: [Errno 28] No space left on device")


# --- the digits demo -----------------------------------------------------------------------------


def test_demo_bad_output_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dropkit.__main__ import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(digits, "run_demo", _no_training)
    assert main(["demo", "--epochs", "1", "--output", str(blocker / "r.json")]) == 2
    assert "cannot create the directory" in _one_error_line(capsys.readouterr().err, "dropkit demo")


def test_demo_results_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replaced: list[tuple[Path, Path]] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real(a, b))[1])
    results = {"dropout": {"train_acc": 1.0, "test_acc": 0.9, "gap": 0.1}}
    path = digits.write_results(tmp_path / "r.json", digits.DigitsConfig(), results)
    assert json.loads(path.read_text())["results"] == results
    ((src, dst),) = replaced
    assert dst == path
    assert src.parent == path.parent
    assert src != path
