"""Results of the UCI benchmark on disk: per-split JSON (atomic), summaries as CSV/JSON/Markdown.

Layout of an output directory::

    OUT/<dataset>/split_<i>.json   one file per finished split, written atomically, sealed
    OUT/results.csv                one row per finished split
    OUT/summary.json, summary.csv  mean ± standard error per data set
    OUT/summary.md                 dropkit's numbers beside the published ones (with sources)

A split file carries its identity (data set, split, dropkit version, settings) and a SHA-256
checksum of its content (:func:`write_split_result`); a resumed run uses a file only when all of
them match, and recomputes it otherwise (:func:`load_split_results`).

The standard error is ``std(ddof=0) / sqrt(n_splits)``, as the benchmark reports it.  The
Markdown summary shows numbers to significant figures; the CSV and JSON files keep full
precision.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dropkit._version import __version__
from dropkit.experiments._console import format_mean_se, format_number
from dropkit.experiments._files import read_sealed_json, seal, write_atomic

__all__ = [
    "PUBLISHED",
    "PUBLISHED_NAMES",
    "RESULT_FIELDS",
    "SOURCES",
    "SPLIT_FORMAT",
    "Cell",
    "Published",
    "SplitScan",
    "load_split_results",
    "markdown_table",
    "mean_se",
    "published_columns",
    "read_split_result",
    "split_path",
    "summarize",
    "write_atomic",
    "write_reports",
    "write_split_result",
]


class Cell(NamedTuple):
    """One published number: its text as published (or rounded to significant figures) and the
    key of its source in :data:`SOURCES`."""

    text: str
    source: str


class Published(NamedTuple):
    """A data set's published MC-dropout numbers.

    Attributes:
        name: the display name (``"Boston"``).
        rmse: MC RMSE, ``"mean ± SE"``.
        ll: test log-likelihood, ``"mean ± SE"``.
    """

    name: str
    rmse: Cell
    ll: Cell


#: Where the published numbers come from (Markdown; one footnote per source used in a table).
SOURCES: dict[str, str] = {
    "grid": (
        "Gal & Ghahramani, MC dropout, grid-search protocol (20 splits, protein 5; mean ± SE): "
        "the 'Grid Search (new)' columns of the results table in the readme of "
        "github.com/yaringal/DropoutUncertaintyExps (commit 6eb4497, 2018), the reference "
        "implementation this benchmark follows."
    ),
    "grid-log": (
        "The same grid-search run, from the authors' results logs "
        "`UCI_Datasets/<name>/results/log_100_xepochs_1_hidden_layers.txt` (same repository and "
        "commit; lines 'MC errors' and 'lls', mean ± std error; rounded here to significant "
        "figures), used where the readme's table rounds the standard error to 0.00."
    ),
    "paper": (
        "Gal & Ghahramani, 'Dropout as a Bayesian Approximation', ICML 2016, Table 1 (as quoted "
        "in the readme of github.com/yaringal/DropoutUncertaintyExps, commit 04604eb): the "
        "original protocol (hyper-parameters by Bayesian optimisation, 40 epochs) on the single "
        "split of Year Prediction MSD, so no standard error. The grid-search table has no Year row."
    ),
}


def _grid(rmse: str, ll: str) -> tuple[Cell, Cell]:
    return Cell(rmse, "grid"), Cell(ll, "grid")


#: Published numbers of every data set of the benchmark's table, keyed by the benchmark's folder
#: name (as in its ``UCI_Datasets``).
PUBLISHED: dict[str, Published] = {
    "bostonHousing": Published("Boston", *_grid("2.90 ± 0.18", "-2.40 ± 0.04")),
    "concrete": Published("Concrete", *_grid("4.82 ± 0.16", "-2.93 ± 0.02")),
    "energy": Published("Energy", *_grid("0.54 ± 0.06", "-1.21 ± 0.01")),
    "kin8nm": Published("Kin8nm", Cell("0.0789 ± 0.0006", "grid-log"), Cell("1.14 ± 0.01", "grid")),
    "naval-propulsion-plant": Published(
        "Naval", Cell("0.000743 ± 0.000046", "grid-log"), Cell("4.450 ± 0.002", "grid-log")
    ),
    "power-plant": Published("Power", *_grid("4.01 ± 0.04", "-2.80 ± 0.01")),
    "protein-tertiary-structure": Published(
        "Protein", Cell("4.27 ± 0.02", "grid"), Cell("-2.871 ± 0.001", "grid-log")
    ),
    "wine-quality-red": Published("Wine", *_grid("0.62 ± 0.01", "-0.93 ± 0.01")),
    "yacht": Published("Yacht", *_grid("0.67 ± 0.05", "-1.25 ± 0.01")),
    "YearPredictionMSD": Published("Year", Cell("8.849", "paper"), Cell("-3.588", "paper")),
}
#: Display names of the data sets.
PUBLISHED_NAMES = {key: entry.name for key, entry in PUBLISHED.items()}
_CSV_FIELDS = (
    "dataset",
    "split",
    "p",
    "tau",
    "validation_ll",
    "rmse",
    "ll",
    "ll_gaussian",
    "picp95",
    "mpiw95",
    "tau_learned",
    "ll_tau_learned",
    "tau_at_grid_edge",
    "epochs",
    "samples",
)
#: ``format`` entry of a per-split result file (a file of another format is recomputed).
SPLIT_FORMAT = "dropkit-uci-split/1"
_NUMBER: tuple[type, ...] = (int, float)
_OPTIONAL_NUMBER: tuple[type, ...] = (int, float, type(None))
#: Keys of a protocol split result and their JSON types, checked when a run resumes.
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "dataset": (str,),
    "split": (int,),
    "epochs": (int,),
    "samples": (int,),
    "p": _NUMBER,
    "tau": _NUMBER,
    "validation_ll": _NUMBER,
    "rmse": _NUMBER,
    "ll": _NUMBER,
    "ll_gaussian": _NUMBER,
    "picp95": _NUMBER,
    "mpiw95": _NUMBER,
    "tau_learned": _OPTIONAL_NUMBER,
    "ll_tau_learned": _OPTIONAL_NUMBER,
    "tau_at_grid_edge": (bool,),
    "grid": (list,),
    "seconds": (dict,),
}
# The identity entries of a split file, with their JSON types.
_ENVELOPE: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "dataset": (str,),
    "split": (int,),
    "dropkit_version": (str,),
    "settings": (dict,),
    "result": (dict,),
}


def split_path(output: str | Path, dataset: str, split: int) -> Path:
    """Where the result of one split lives."""
    return Path(output) / dataset / f"split_{split}.json"


def write_split_result(output: str | Path, result: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write one split's result, sealed with its identity, atomically.

    The file is a JSON object: ``format`` (:data:`SPLIT_FORMAT`), ``dataset``, ``split``,
    ``dropkit_version``, ``settings`` (everything a resume must match), ``result``, and
    ``sha256``, the :func:`~dropkit.experiments._files.checksum` of all the other entries.

    Args:
        output: the output directory.
        result: one entry of ``run_splits``'s list (holds ``dataset`` and ``split``).
        settings: the settings that produced it.

    Returns:
        The path written (:func:`split_path`).
    """
    payload = {
        "format": SPLIT_FORMAT,
        "dataset": result["dataset"],
        "split": result["split"],
        "dropkit_version": __version__,
        "settings": settings,
        "result": result,
    }
    path = split_path(output, result["dataset"], result["split"])
    return write_atomic(path, json.dumps(seal(payload), indent=2) + "\n")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(value: object, kinds: tuple[type, ...], where: str) -> None:
    # bool is an int to isinstance, but a true/false in a count or a metric is damage.
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{where} is {_type_name(value)}, expected {expected}")


def _first_difference(stored: object, now: object, where: str = "") -> str:
    """The first setting that differs, as ``name=stored, now current`` (nested keys dotted)."""
    if isinstance(stored, dict) and isinstance(now, dict):
        for key in sorted(set(stored) | set(now), key=str):
            if stored.get(key) != now.get(key):
                return _first_difference(stored.get(key), now.get(key), f"{where}{key}.")
    return f"{where.rstrip('.')}={stored!r}, now {now!r}"


def read_split_result(
    path: str | Path,
    dataset: str,
    split: int,
    settings: dict[str, Any],
    fields: Mapping[str, tuple[type, ...]] = RESULT_FIELDS,
) -> dict[str, Any]:
    """Read a file of :func:`write_split_result` and check that it is the result wanted.

    Args:
        path: the file.
        dataset: the data set it must belong to.
        split: the split it must hold.
        settings: the settings it must have been produced with.
        fields: keys the result must have, with their allowed types.

    Returns:
        The result.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is truncated or not JSON, its checksum does not match, a key is
            missing or has the wrong type, or it was written for another data set, split,
            dropkit version or settings; the message says which, on one line.
    """
    payload = read_sealed_json(path)
    for key, kinds in _ENVELOPE.items():
        if key not in payload:
            raise ValueError(f"missing key {key!r}")
        _check_type(payload[key], kinds, repr(key))
    if payload["format"] != SPLIT_FORMAT:
        raise ValueError(f"format {payload['format']!r}, expected {SPLIT_FORMAT!r}")
    for key, expected in (("dataset", dataset), ("split", split)):
        if payload[key] != expected:
            raise ValueError(f"written for {key} {payload[key]!r}, expected {expected!r}")
    if payload["dropkit_version"] != __version__:
        raise ValueError(f"written by dropkit {payload['dropkit_version']}, this is dropkit {__version__}")
    # Compared as JSON: a tuple in ``settings`` is the list it was written as.
    wanted = json.loads(json.dumps(settings))
    if payload["settings"] != wanted:
        raise ValueError(f"written for other settings ({_first_difference(payload['settings'], wanted)})")
    result: dict[str, Any] = payload["result"]
    for key, kinds in fields.items():
        if key not in result:
            raise ValueError(f"result has no key {key!r}")
        _check_type(result[key], kinds, f"result key {key!r}")
    if (result["dataset"], result["split"]) != (dataset, split):
        found = f"{result['dataset']!r} split {result['split']!r}"
        raise ValueError(f"result is of {found}, expected {dataset!r} split {split}")
    return result


class SplitScan(NamedTuple):
    """What :func:`load_split_results` found: results to keep, files to recompute."""

    #: Valid results, keyed by split index.
    done: dict[int, dict[str, Any]]
    #: Splits whose file exists but cannot be used: split index -> (path, why).
    stale: dict[int, tuple[Path, str]]


def load_split_results(
    output: str | Path,
    dataset: str,
    settings: dict[str, Any],
    splits: Iterable[int],
    fields: Mapping[str, tuple[type, ...]] = RESULT_FIELDS,
) -> SplitScan:
    """The finished results of ``splits`` of ``dataset`` under ``output``, for a resume.

    A split without a file is simply pending.  A file that cannot be used (see
    :func:`read_split_result`) is reported in :attr:`SplitScan.stale` and the split is to be
    recomputed: a damaged or foreign file never ends a run, and is never used.

    Args:
        output: the output directory.
        dataset: the data set.
        settings: the settings of this run.
        splits: the split indices wanted.
        fields: keys the results must have, with their allowed types.

    Returns:
        The :class:`SplitScan`.
    """
    scan = SplitScan({}, {})
    for split in splits:
        path = split_path(output, dataset, split)
        if not path.exists():
            continue
        try:
            scan.done[split] = read_split_result(path, dataset, split, settings, fields)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            scan.stale[split] = (path, reason)
    return scan


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``std(ddof=0) / sqrt(n)``.

    Example:
        >>> mean_se([1.0, 3.0, 5.0, 7.0])  # std 2.236..., / sqrt(4)
        (4.0, 1.118033988749895)
    """
    if not values:
        raise ValueError("values must not be empty")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return mean, std / math.sqrt(n)


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± SE over the splits of one data set (RMSE, LL, extras)."""
    out: dict[str, Any] = {"dataset": results[0]["dataset"], "n_splits": len(results)}
    for key in ("rmse", "ll", "ll_gaussian", "picp95", "mpiw95", "ll_tau_learned"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            out[key], out[f"{key}_se"] = mean_se(values)
    out["tau_at_grid_edge"] = sum(bool(r["tau_at_grid_edge"]) for r in results)
    out["seconds"] = sum(sum(r["seconds"].values()) for r in results)
    return out


def _fmt(summary: Mapping[str, Any], key: str) -> str:
    """``summary[key] ± summary[key_se]`` to significant figures; ``-`` when absent."""
    if summary.get(key) is None or summary.get(f"{key}_se") is None:
        return "-"
    return format_mean_se(summary[key], summary[f"{key}_se"])


def published_columns(datasets: Iterable[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The published RMSE and test LL of ``datasets`` with footnote marks, and the footnotes.

    Args:
        datasets: data-set folder names, in table order.

    Returns:
        ``(cells, notes)``: ``cells[name] = (rmse, ll)``, each number followed by the mark of its
        source such as ``[1]`` (``("-", "-")`` for a data set without published numbers), and
        one Markdown footnote line per source used, numbered in order of first use.

    Example:
        >>> cells, notes = published_columns(["yacht", "naval-propulsion-plant", "mine"])
        >>> for name, cell in cells.items():
        ...     print(name, cell)
        yacht ('0.67 ± 0.05 [1]', '-1.25 ± 0.01 [1]')
        naval-propulsion-plant ('0.000743 ± 0.000046 [2]', '4.450 ± 0.002 [2]')
        mine ('-', '-')
        >>> [note[:30] for note in notes]
        ['[1] Gal & Ghahramani, MC dropo', '[2] The same grid-search run, ']
    """
    marks: dict[str, int] = {}
    cells: dict[str, tuple[str, str]] = {}
    for name in datasets:
        pub = PUBLISHED.get(name)
        if pub is None:
            cells[name] = ("-", "-")
            continue
        texts = []
        for cell in (pub.rmse, pub.ll):
            mark = marks.setdefault(cell.source, len(marks) + 1)
            texts.append(f"{cell.text} [{mark}]")
        cells[name] = (texts[0], texts[1])
    notes = [f"[{mark}] {SOURCES[source]}" for source, mark in marks.items()]
    return cells, notes


def markdown_table(summaries: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """dropkit's mean ± SE beside the published numbers (each with its source, as a footnote).

    Every number is formatted to significant figures
    (:func:`~dropkit.experiments._console.format_mean_se`), so that small values such as
    Naval's RMSE keep their digits.
    """
    published, notes = published_columns(s["dataset"] for s in summaries)
    lines = [
        "| data set | splits | RMSE (dropkit) | RMSE (published) | test LL (dropkit) | test LL (published) "
        "| LL, learned τ | τ at grid edge | time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        pub_rmse, pub_ll = published[s["dataset"]]
        name = PUBLISHED_NAMES.get(s["dataset"], s["dataset"])
        lines.append(
            f"| {name} | {s['n_splits']} | {_fmt(s, 'rmse')} | {pub_rmse} | {_fmt(s, 'll')} | {pub_ll} | "
            f"{_fmt(s, 'll_tau_learned')} | {s['tau_at_grid_edge']}/{s['n_splits']} | "
            f"{format_number(s['seconds'], 2)} |"
        )
    note = (
        "Published protocol settings."
        if settings.get("protocol")
        else "NOT the published protocol (shortened or modified settings): " + json.dumps(settings["config"])
    )
    return "\n".join([*lines, "", note, "", *([*notes, ""] if notes else [])])


def write_reports(
    output: str | Path, results: dict[str, list[dict[str, Any]]], settings: dict[str, Any]
) -> None:
    """Write ``results.csv``, ``summary.json``, ``summary.csv`` and ``summary.md`` (atomically)."""
    output = Path(output)
    rows = [r for name in results for r in sorted(results[name], key=lambda r: r["split"])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(output / "results.csv", buffer.getvalue())
    summaries = [summarize(results[name]) for name in results if results[name]]
    write_atomic(
        output / "summary.json", json.dumps({"settings": settings, "summary": summaries}, indent=2) + "\n"
    )
    buffer = io.StringIO()
    fields = sorted({k for s in summaries for k in s}, key=lambda k: (k != "dataset", k))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summaries)
    write_atomic(output / "summary.csv", buffer.getvalue())
    write_atomic(output / "summary.md", markdown_table(summaries, settings))
