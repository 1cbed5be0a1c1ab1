"""Run the reproductions: per-seed results written atomically, resume, skipped and failed experiments.

Layout of an output directory::

    OUTPUT/NAME/seed-<k>.json     one sealed file per finished seed (:func:`write_seed_result`)
    OUTPUT/NAME/<figure>.png|svg  the experiment's figures (:func:`.report.draw_figures`)
    OUTPUT/NAME/error.txt         the traceback, when the experiment failed
    OUTPUT/README.md, index.html, results.json   the combined report (:mod:`.report`)

:func:`run_suite` runs the experiments one after the other.  Each seed's result is written as
soon as it is finished, atomically and sealed with a checksum, so an interrupted run loses at
most the seeds in progress.  With ``resume`` a seed whose file is valid and was written at the
same scale with the same data is not run again; a missing, damaged or foreign file is run again
(one line on stderr says why); a file written at another scale or with other data is refused
before anything runs (:func:`resume_conflicts`), since mixing them would mix two protocols.

An experiment that raises :class:`~.api.DataUnavailableError` (or whose module needs an optional
package that is not installed) is *skipped* with its message; any other exception marks it
*failed*, its traceback goes to ``OUTPUT/NAME/error.txt``, and the suite goes on.  The exit
status (:attr:`SuiteResult.exit_status`) is 1 when any experiment failed, else 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

import torch

import dropkit
from dropkit.experiments._console import Progress, format_duration
from dropkit.experiments._files import read_sealed_json, seal, write_atomic
from dropkit.experiments.reproduce import get_experiment
from dropkit.experiments.reproduce.api import (
    SCALES,
    DataUnavailableError,
    Experiment,
    RunContext,
    Scale,
    Summary,
)
from dropkit.experiments.reproduce.report import (
    FIGURE_FORMATS,
    STATUS_LABELS,
    FigureFiles,
    draw_figures,
    write_report,
)

__all__ = [
    "SEED_FORMAT",
    "STATUS_LABELS",
    "TRAINED_DIR",
    "Outcome",
    "RunOptions",
    "SeedRecord",
    "SeedScan",
    "SuiteResult",
    "conflicts_message",
    "data_label",
    "read_seed_result",
    "resume_conflicts",
    "run_experiment",
    "run_suite",
    "scan_seeds",
    "seed_path",
    "write_seed_result",
]

#: ``format`` entry of a per-seed result file (a file of another format is run again).
SEED_FORMAT = "dropkit-reproduce-seed/1"
#: What happened to an experiment: its verdict, or why there is none.
Status = Literal["held", "not_held", "undecided", "skipped", "failed"]
_ERROR_FILE = "error.txt"
#: ``OUTPUT/_trained``: models one experiment trains and another reuses (``RunContext.trained_dir``).
TRAINED_DIR = "_trained"


@dataclass(frozen=True)
class RunOptions:
    """Settings of one run of the suite (the command line's options).

    Attributes:
        scale: ``"tiny"``, ``"quick"`` or ``"full"``.
        data_dir: the ``--data`` directory, or ``None``.
        output: the output directory.
        seeds: seeds per experiment, overriding each experiment's ``default_seeds``; ``None``
            keeps them.
        resume: reuse the valid finished seeds found in ``output``, and the models kept in
            ``output/_trained`` (without it, a run removes them first and trains again).
        threads: torch intra-op threads during the run (the UCI benchmark's numba kernels follow
            them); ``None`` keeps torch's setting.
        progress: show progress on stderr.
        formats: figure formats, a non-empty subset of :data:`~.report.FIGURE_FORMATS`.
        command: the command line, for the report.

    Raises:
        ValueError: a setting is out of range; the message names it and the value.
    """

    scale: Scale = "full"
    data_dir: Path | None = None
    output: Path = Path("reproductions-output")
    seeds: int | None = None
    resume: bool = False
    threads: int | None = None
    progress: bool = True
    formats: tuple[str, ...] = FIGURE_FORMATS
    command: str = ""

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        for name in ("seeds", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        formats = tuple(self.formats)
        unknown = [f for f in formats if f not in FIGURE_FORMATS]
        if not formats or unknown or len(set(formats)) != len(formats):
            raise ValueError(
                f"formats must be distinct entries of {', '.join(FIGURE_FORMATS)} (at least one), "
                f"got {','.join(formats) or 'none'}"
            )


# ---------------------------------------------------------------------------------------------
# Per-seed result files


def seed_path(output: str | Path, name: str, seed: int) -> Path:
    """Where seed ``seed`` of experiment ``name`` is written: ``OUTPUT/NAME/seed-<seed>.json``."""
    return Path(output) / name / f"seed-{seed}.json"


def data_label(data_dir: str | Path | None) -> str | None:
    """How a seed file records the data directory: its absolute path, or ``None``."""
    return None if data_dir is None else str(Path(data_dir).resolve())


class SeedRecord(NamedTuple):
    """One seed's result file, read back and checked (:func:`read_seed_result`)."""

    experiment: str
    seed: int
    scale: str
    data: str | None
    seconds: float
    result: dict[str, Any]


def write_seed_result(
    output: str | Path,
    name: str,
    seed: int,
    scale: Scale,
    data_dir: str | Path | None,
    result: Mapping[str, Any],
    seconds: float,
) -> Path:
    """Write one seed's result, sealed with its identity, atomically.

    The file is a JSON object: ``format`` (:data:`SEED_FORMAT`), ``experiment``, ``seed``,
    ``scale``, ``data`` (:func:`data_label`), the dropkit and torch versions, ``seconds`` (wall
    time of the seed), ``result`` and ``sha256``, the checksum of everything else
    (:func:`dropkit.experiments._files.seal`).

    Returns:
        The path written (:func:`seed_path`).

    Raises:
        OSError: the file cannot be written.
    """
    payload = {
        "format": SEED_FORMAT,
        "experiment": name,
        "seed": seed,
        "scale": scale,
        "data": data_label(data_dir),
        "dropkit_version": dropkit.__version__,
        "torch_version": torch.__version__,
        "seconds": seconds,
        "result": dict(result),
    }
    return write_atomic(seed_path(output, name, seed), json.dumps(seal(payload), indent=1) + "\n")


_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "experiment": (str,),
    "seed": (int,),
    "scale": (str,),
    "data": (str, type(None)),
    "seconds": (int, float),
    "result": (dict,),
}


def read_seed_result(path: str | Path, name: str, seed: int) -> SeedRecord:
    """Read a file of :func:`write_seed_result` and check that it is seed ``seed`` of ``name``.

    The scale and data it records are returned, not checked: :func:`scan_seeds` compares them.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is truncated or not JSON, its checksum does not match, an entry is
            missing or of the wrong type, or it belongs to another experiment or seed; the
            message says which, on one line.
    """
    payload = read_sealed_json(path)
    for key, kinds in _FIELDS.items():
        if key not in payload:
            raise ValueError(f"missing key {key!r}")
        value = payload[key]
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise ValueError(f"{key!r} is {type(value).__name__}, expected {kinds[0].__name__}")
    if payload["format"] != SEED_FORMAT:
        raise ValueError(f"format {payload['format']!r}, expected {SEED_FORMAT!r}")
    if (payload["experiment"], payload["seed"]) != (name, seed):
        raise ValueError(
            f"written for {payload['experiment']} seed {payload['seed']}, expected {name} seed {seed}"
        )
    return SeedRecord(
        name, seed, payload["scale"], payload["data"], float(payload["seconds"]), payload["result"]
    )


class SeedScan(NamedTuple):
    """What :func:`scan_seeds` found for one experiment."""

    #: Valid results of this scale and data, keyed by seed.
    done: dict[int, SeedRecord]
    #: Seeds whose file exists but cannot be used (damaged, foreign): seed -> (path, why).
    stale: dict[int, tuple[Path, str]]
    #: Seeds whose valid file was written at another scale or with other data: seed -> (path, why).
    conflicts: dict[int, tuple[Path, str]]


def _identity_difference(record: SeedRecord, scale: str, data: str | None) -> str | None:
    if record.scale != scale:
        return f"written at scale {record.scale}, this run is {scale}"
    if record.data != data:
        return f"written with --data {record.data or '(none)'}, this run has --data {data or '(none)'}"
    return None


def scan_seeds(
    output: str | Path, name: str, seeds: Sequence[int], scale: Scale, data_dir: str | Path | None
) -> SeedScan:
    """The finished seeds of ``name`` under ``output``, for a resume.

    A seed without a file is pending; a file that cannot be used (:func:`read_seed_result`) is
    reported in :attr:`SeedScan.stale` and its seed is run again; a valid file of another scale
    or data is reported in :attr:`SeedScan.conflicts`.
    """
    scan = SeedScan({}, {}, {})
    data = data_label(data_dir)
    for seed in seeds:
        path = seed_path(output, name, seed)
        if not path.exists():
            continue
        try:
            record = read_seed_result(path, name, seed)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            scan.stale[seed] = (path, reason)
            continue
        difference = _identity_difference(record, scale, data)
        if difference is None:
            scan.done[seed] = record
        else:
            scan.conflicts[seed] = (path, difference)
    return scan


def resume_conflicts(names: Sequence[str], options: RunOptions) -> list[str]:
    """Seed files under ``options.output`` that a resume of ``names`` must not mix with this run.

    Every ``OUTPUT/NAME/seed-<k>.json`` of the selected experiments is read (any ``k``, not only
    the seeds this run needs, so that an output directory never holds two protocols); a valid
    file written at another scale or with other data is a conflict.  Damaged files are not:
    the run replaces them.  Nothing is imported or run.

    Returns:
        One line per conflicting file, ``"PATH: why"``; empty when the resume can go ahead.
    """
    lines = []
    data = data_label(options.data_dir)
    for name in names:
        for path in sorted((options.output / name).glob("seed-*.json")):
            stem = path.stem.removeprefix("seed-")
            if not stem.isdigit():
                continue
            try:
                record = read_seed_result(path, name, int(stem))
            except (OSError, ValueError):
                continue
            difference = _identity_difference(record, options.scale, data)
            if difference is not None:
                lines.append(f"{path}: {difference}")
    return lines


def conflicts_message(conflicts: Sequence[str]) -> str:
    """The error for a resume refused by :func:`resume_conflicts` (one line)."""
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return (
        f"cannot resume: {conflicts[0]}{more}; use another --output, the same scale and --data, "
        "or run without --resume to replace them"
    )


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Outcome:
    """What became of one experiment in a run.

    Attributes:
        name: the registered name.
        experiment: the experiment, or ``None`` when its module could not be imported.
        status: its verdict (``"held"``, ``"not_held"``, ``"undecided"``) or ``"skipped"`` /
            ``"failed"``.
        summary: what ``summarize`` returned (kept when drawing a figure failed afterwards).
        seeds: the seeds of the run, in order.
        seeds_run: those run now; seeds_reused: those read back from an earlier run.
        seconds: wall time of the experiment in this run.
        compute_seconds: recorded wall time of every seed used, this run's and earlier ones'.
        message: why it was skipped, or the error that failed it.
        figures: the figure files written.
        figure_note: why figures are missing (matplotlib not installed), or empty.
        error_file: the traceback file of a failed experiment, relative to the output directory.
    """

    name: str
    experiment: Experiment | None
    status: Status
    summary: Summary | None = None
    seeds: tuple[int, ...] = ()
    seeds_run: tuple[int, ...] = ()
    seeds_reused: tuple[int, ...] = ()
    seconds: float = 0.0
    compute_seconds: float = 0.0
    message: str = ""
    figures: tuple[FigureFiles, ...] = ()
    figure_note: str = ""
    error_file: str | None = None

    @property
    def label(self) -> str:
        """The status as the report writes it (:data:`STATUS_LABELS`)."""
        return STATUS_LABELS[self.status]


@dataclass(frozen=True)
class SuiteResult:
    """A finished run of the suite.

    Attributes:
        outcomes: one per experiment, in run order.
        options: the settings.
        seconds: total wall time.
        started, finished: UTC times, ISO 8601.
        threads: torch intra-op threads during the run.
        report: the files of the report (README.md, index.html, results.json).
    """

    outcomes: tuple[Outcome, ...]
    options: RunOptions
    seconds: float
    started: str
    finished: str
    threads: int
    report: tuple[Path, ...] = field(default=())

    @property
    def exit_status(self) -> int:
        """1 when an experiment failed, else 0 (skipped experiments do not count)."""
        return 1 if any(o.status == "failed" for o in self.outcomes) else 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_result(name: str, result: object) -> dict[str, Any]:
    """``result`` as it reads back from its file (tuples become lists), so that ``summarize``
    sees the same values whether a seed ran now or was resumed."""
    if not isinstance(result, dict):
        raise TypeError(f"{name}: run_seed must return a dict, got {type(result).__name__}")
    try:
        loaded: dict[str, Any] = json.loads(json.dumps(result))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: run_seed returned a result that is not JSON-serialisable ({exc})") from None
    return loaded


def _seed_count(experiment: Experiment, options: RunOptions) -> int:
    if options.seeds is not None:
        return options.seeds
    count = experiment.default_seeds.get(options.scale)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(
            f"{experiment.name}: default_seeds[{options.scale!r}] must be an int >= 1, got {count!r}"
        )
    return count


def _check_summary(name: str, summary: object) -> Summary:
    if not isinstance(summary, Summary):
        raise TypeError(f"{name}: summarize must return a Summary, got {type(summary).__name__}")
    try:
        json.dumps(dict(summary.metrics))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: Summary.metrics is not JSON-serialisable ({exc})") from None
    return summary


def _status(summary: Summary) -> Status:
    held = summary.verdict.held
    return "undecided" if held is None else "held" if held else "not_held"


def _missing_optional(exc: ModuleNotFoundError) -> bool:
    """Whether ``exc`` is an optional third-party package missing (not a module of dropkit)."""
    return bool(exc.name) and str(exc.name).split(".")[0] != "dropkit"


def _write_traceback(work_dir: Path, exc: BaseException) -> str | None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        write_atomic(work_dir / _ERROR_FILE, text)
    except OSError:
        return None
    return f"{work_dir.name}/{_ERROR_FILE}"


def run_experiment(name: str, options: RunOptions, stream: TextIO | None = None) -> Outcome:
    """Run (or resume) every seed of experiment ``name``, summarize it and draw its figures.

    Before each seed, torch and dropkit are seeded with the seed (the experiment seeds them
    itself too, as the contract asks).  Errors end this experiment only: a
    :class:`~.api.DataUnavailableError` or a missing optional package makes it ``"skipped"``,
    anything else ``"failed"`` (traceback in ``OUTPUT/NAME/error.txt``); seeds finished before
    the error stay on disk for a resume.  ``KeyboardInterrupt`` is not caught.

    Args:
        name: a registered name.
        options: the settings.
        stream: where resume notes go (default: :data:`sys.stderr`).

    Returns:
        The :class:`Outcome`.
    """
    stream = sys.stderr if stream is None else stream
    start = time.perf_counter()
    work_dir = options.output / name
    outcome = Outcome(name, None, "failed")
    try:
        outcome.experiment = experiment = get_experiment(name)
        seeds = tuple(range(_seed_count(experiment, options)))
        outcome.seeds = seeds
        work_dir.mkdir(parents=True, exist_ok=True)
        ctx = RunContext(
            options.scale, options.data_dir, work_dir, options.progress, name, options.output / TRAINED_DIR
        )
        records: dict[int, SeedRecord] = {}
        if options.resume:
            scan = scan_seeds(options.output, name, seeds, options.scale, options.data_dir)
            if scan.conflicts:
                path, why = next(iter(scan.conflicts.values()))
                raise ValueError(f"cannot resume: {path}: {why}")
            records.update(scan.done)
            for path, why in scan.stale.values():
                print(f"{path}: {why}; running it again", file=stream)
            if records:
                print(
                    f"{name}: resuming, {len(records)} seed(s) done, {len(seeds) - len(records)} to run",
                    file=stream,
                )
        pending = [s for s in seeds if s not in records]
        outcome.seeds_reused = tuple(s for s in seeds if s in records)
        with Progress(
            name, len(pending), unit="seeds", enabled=options.progress, lines=max(1, len(pending))
        ) as bar:
            for count, seed in enumerate(pending, start=1):
                torch.manual_seed(seed)
                dropkit.manual_seed(seed)
                seed_start = time.perf_counter()
                raw = experiment.run_seed(dataclasses.replace(ctx, label=f"{name} seed {seed}"), seed)
                seconds = time.perf_counter() - seed_start
                result = _json_result(name, raw)
                write_seed_result(
                    options.output, name, seed, options.scale, options.data_dir, result, seconds
                )
                records[seed] = SeedRecord(
                    name, seed, options.scale, data_label(options.data_dir), seconds, result
                )
                outcome.seeds_run += (seed,)
                bar.update(count)
        outcome.compute_seconds = sum(records[s].seconds for s in seeds)
        summary = _check_summary(name, experiment.summarize(ctx, [records[s].result for s in seeds]))
        outcome.summary = summary
        outcome.figures, outcome.figure_note = draw_figures(name, summary, options.output, options.formats)
        outcome.status = _status(summary)
        (work_dir / _ERROR_FILE).unlink(missing_ok=True)
    except DataUnavailableError as exc:
        outcome.status, outcome.message = "skipped", str(exc)
    except ModuleNotFoundError as exc:
        if _missing_optional(exc):
            outcome.status = "skipped"
            outcome.message = f"needs the optional package {exc.name!r}, which is not installed ({exc})"
        else:
            outcome.status, outcome.message = "failed", f"{type(exc).__name__}: {exc}"
            outcome.error_file = _write_traceback(work_dir, exc)
    except Exception as exc:  # an experiment's bug ends that experiment, not the suite
        outcome.status, outcome.message = "failed", f"{type(exc).__name__}: {exc}"
        outcome.error_file = _write_traceback(work_dir, exc)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _status_line(outcome: Outcome) -> str:
    runs = f"{len(outcome.seeds_run)} seed(s) run"
    if outcome.seeds_reused:
        runs += f", {len(outcome.seeds_reused)} reused"
    tail = f"({runs}, {format_duration(outcome.seconds)})"
    if outcome.status in ("skipped", "failed"):
        extra = f"; traceback in {outcome.error_file}" if outcome.error_file else ""
        return f"{outcome.name}: {outcome.label.upper()}: {outcome.message}{extra} {tail}"
    text = outcome.summary.verdict.text if outcome.summary is not None else ""
    return f"{outcome.name}: {outcome.label}. {text} {tail}"


def run_suite(names: Sequence[str], options: RunOptions, stream: TextIO | None = None) -> SuiteResult:
    """Run experiments ``names`` in order and write the combined report.

    Args:
        names: registered names, each once.
        options: the settings; ``options.output`` is created.
        stream: where the one-line result of each experiment goes (default: :data:`sys.stdout`).

    Returns:
        The :class:`SuiteResult`, with the report's paths.

    Raises:
        ValueError: ``options.resume`` and a seed file of another scale or data is in the way
            (:func:`resume_conflicts`), before anything runs.
        OSError: the report cannot be written.
    """
    stream = sys.stdout if stream is None else stream
    conflicts = resume_conflicts(names, options) if options.resume else []
    if conflicts:
        raise ValueError(conflicts_message(conflicts))
    options.output.mkdir(parents=True, exist_ok=True)
    if not options.resume:
        # A run that replaces its seeds trains again: networks of an earlier run are not reused.
        for stale in (options.output / TRAINED_DIR).glob("*.pt"):
            stale.unlink(missing_ok=True)
    started, start = _now(), time.perf_counter()
    previous_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    threads = torch.get_num_threads()
    outcomes = []
    try:
        with Progress(
            "reproduce", len(names), unit="experiments", enabled=options.progress, lines=max(1, len(names))
        ) as bar:
            for count, name in enumerate(names, start=1):
                outcome = run_experiment(name, options)
                outcomes.append(outcome)
                print(_status_line(outcome), file=stream, flush=True)
                bar.update(count)
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    result = SuiteResult(tuple(outcomes), options, seconds, started, _now(), threads)
    paths = write_report(result)
    return dataclasses.replace(result, report=paths)
