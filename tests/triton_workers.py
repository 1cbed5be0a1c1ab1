"""Test cases run in a child Python: the harness of the Triton tests' workers.

A test module that checks Triton kernels registers its cases (plain functions that raise on
failure) in a :class:`CaseRegistry` and runs them in children, one per mode:

* ``interpret``: ``TRITON_INTERPRET=1``, the kernels interpreted on the CPU;
* ``compile``: ``TRITON_INTERPRET`` unset, the kernels compiled for a GPU the machine need not
  have (every case skipped, with the reason, where this triton cannot, see
  :func:`offline_compile_unavailable`);
* any other mode a module defines (``cuda``: the cases on a real GPU), run without
  ``TRITON_INTERPRET``.

Triton reads ``TRITON_INTERPRET`` when it first decorates a kernel, so the pytest process, which
may already hold a compiled-mode triton, cannot switch modes (``tests/test_kernels_triton.py``
explains more): this module imports no triton, and the tests' own process need not either.

The pytest side starts the children with :func:`start_worker` (or :func:`run_workers`, which
runs several side by side and collects their reports), and each parametrized test reports its
own case with :func:`report_case`.  The child side is the module run as ``python -m
tests.MODULE MODE REPORT.json [CASE ...]`` from the repository root, whose ``__main__`` block
calls :func:`main` with its cases and setup per mode: every case runs with warnings as errors
(and pytest's exceptions to that rule), and the JSON report holds, per case, ``error`` (a
traceback or None) and ``seconds``, or ``skipped`` (the reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import dropkit

Case = Callable[[], None]
# A worker's report: ``{case: {"error": ..., "seconds": ...} or {"error": None, "skipped": ...}}``,
# or ``{"__crash__": what it printed}`` when the child failed or wrote nothing.
Report = dict[str, Any]

INTERPRET = "interpret"
REPO_ROOT = Path(__file__).resolve().parents[1]
# pytest's exceptions to "filterwarnings = error" (pyproject.toml) that a case may meet: Inductor's
# advice on GPUs with TF32, not a fault of the code under test.
IGNORED_WARNINGS = [("TensorFloat32 tensor cores", UserWarning)]


class CaseRegistry:
    """The cases of one mode, by name, in order of registration."""

    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}

    def case(self, name: str) -> Callable[[Case], Case]:
        """Registers the decorated function (or any callable passed to the result) as ``name``."""

        def register(fn: Case) -> Case:
            if name in self.cases:
                raise ValueError(f"case {name!r} registered twice")
            self.cases[name] = fn
            return fn

        return register

    def __iter__(self) -> Iterator[str]:
        return iter(self.cases)


@dataclass(frozen=True)
class Mode:
    """What a child runs in one mode.

    ``setup`` prepares the child before the cases (it may return why the mode cannot run here, a
    usage error); ``skip_all`` says why every case is skipped here (or None); ``unavailable`` gives
    the cases skipped in this mode, with the reason.
    """

    cases: Mapping[str, Case]
    setup: Callable[[], str | None] | None = None
    skip_all: Callable[[], str | None] | None = None
    unavailable: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The pytest side
# ---------------------------------------------------------------------------------------------


def start_worker(module: str, mode: str, report: Path) -> subprocess.Popen[str]:
    """``python -m module mode report`` from the repository root, with ``TRITON_INTERPRET=1`` in
    the interpret mode only, and a Triton cache beside the report in the others."""
    # The children must import the same dropkit as this process, installed or not, and the tests.
    package_root = str(Path(dropkit.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)
    if mode == INTERPRET:
        env["TRITON_INTERPRET"] = "1"
    else:
        env["TRITON_CACHE_DIR"] = str(report.parent / "triton-cache")
    command = [sys.executable, "-m", module, mode, str(report)]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def collect(worker: subprocess.Popen[str], report: Path, timeout: float) -> Report:
    """The report of a worker (killed after ``timeout`` seconds), or what it printed if it failed."""
    try:
        stdout, stderr = worker.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        stdout, stderr = worker.communicate()
    if worker.returncode != 0 or not report.exists():
        return {"__crash__": f"exit {worker.returncode}:\n{stdout[-3000:]}\n{stderr[-6000:]}"}
    result: Report = json.loads(report.read_text())
    return result


def run_workers(module: str, modes: Sequence[str], root: Path, timeout: float) -> dict[str, Report]:
    """The workers of ``modes``, run side by side (each paying the torch and triton import once):
    ``{mode: report}``, their reports written under ``root``."""
    workers = {mode: start_worker(module, mode, root / f"{mode}.json") for mode in modes}
    return {mode: collect(worker, root / f"{mode}.json", timeout) for mode, worker in workers.items()}


def report_case(reports: Mapping[str, Report], mode: str, name: str) -> None:
    """Passes, skips or fails the calling test as case ``name`` did in the ``mode`` worker."""
    report = reports[mode]
    if "__crash__" in report:
        pytest.fail(f"the {mode} worker failed, {report['__crash__']}", pytrace=False)
    result = report.get(name)
    if result is None:
        pytest.fail(f"the {mode} worker reported nothing for case {name!r}", pytrace=False)
    if result.get("skipped"):
        pytest.skip(result["skipped"])
    if result["error"] is not None:
        pytest.fail(f"case {name!r} failed in the {mode} worker:\n{result['error']}", pytrace=False)


# ---------------------------------------------------------------------------------------------
# The child side
# ---------------------------------------------------------------------------------------------


def run_cases(
    cases: Mapping[str, Case], skipped: str | None = None, unavailable: Mapping[str, str] | None = None
) -> Report:
    """Runs every case with warnings as errors: its traceback or None, and its time; ``skipped``
    skips them all, ``unavailable`` the cases it names, each with its reason."""
    results: Report = {}
    for name, check in cases.items():
        reason = skipped if skipped is not None else (unavailable or {}).get(name)
        if reason is not None:
            results[name] = {"error": None, "skipped": reason}
            continue
        started = time.perf_counter()
        error = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # as pytest's filterwarnings = error
                for message, category in IGNORED_WARNINGS:
                    warnings.filterwarnings("ignore", message, category)
                check()
        except Exception:
            error = traceback.format_exc()
        results[name] = {"error": error, "seconds": round(time.perf_counter() - started, 3)}
    return results


def offline_compile_unavailable() -> str | None:
    """Why this triton cannot build for an NVIDIA GPU here, or None if it can."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as error:
        return f"triton backends unavailable: {error}"
    if "nvidia" not in backends:
        return "this triton has no NVIDIA backend"
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as error:  # any failure to locate the tool means "cannot compile here"
        return f"ptxas not found: {error}"
    return None if ptxas and Path(ptxas).exists() else "ptxas not found"


def main(argv: Sequence[str], modes: Mapping[str, Mode], prog: str | None = None) -> int:
    """The child: ``MODE REPORT.json [CASE ...]`` runs the cases of ``modes[MODE]`` (all, or those
    named) and writes the report; 2 on a usage error.  ``prog`` names the module in the usage line
    (by default the running ``__main__``'s)."""
    if prog is None:
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        prog = f"python -m {spec.name}" if spec is not None else Path(sys.argv[0]).name
    usage = f"usage: {prog} {{{'|'.join(modes)}}} REPORT.json [CASE ...]"
    if len(argv) < 2 or argv[0] not in modes:
        print(usage, file=sys.stderr)
        return 2
    name, report, names = argv[0], Path(argv[1]), list(argv[2:])
    mode = modes[name]
    interpreted = os.environ.get("TRITON_INTERPRET", "0") != "0"
    if name == INTERPRET and os.environ.get("TRITON_INTERPRET") != "1":
        print("interpret mode needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    if name != INTERPRET and interpreted:
        print(f"{name} mode needs TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    unknown = [case for case in names if case not in mode.cases]
    if unknown:
        print(f"no such {name} case: {', '.join(unknown)}\n{usage}", file=sys.stderr)
        return 2
    problem = mode.setup() if mode.setup is not None else None
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    cases = {case: mode.cases[case] for case in names or mode.cases}
    skipped = mode.skip_all() if mode.skip_all is not None else None
    results = run_cases(cases, skipped, mode.unavailable)
    report.write_text(json.dumps(results, indent=1))
    return 0
