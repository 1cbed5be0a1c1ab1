"""Results of the UCI benchmark on disk: per-split JSON (atomic), summaries as CSV/JSON/Markdown.

Layout of an output directory::

    OUT/<dataset>/split_<i>.json   one file per finished split, written atomically
    OUT/results.csv                one row per finished split
    OUT/summary.json, summary.csv  mean ± standard error per data set
    OUT/summary.md                 dropkit's numbers beside the published ones

The standard error is ``std(ddof=0) / sqrt(n_splits)``, as the benchmark reports it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PUBLISHED",
    "PUBLISHED_NAMES",
    "load_split_results",
    "mean_se",
    "split_path",
    "summarize",
    "write_atomic",
    "write_reports",
    "write_split_result",
]

#: Published grid-search results (Gal & Ghahramani; mean, SE): RMSE and test LL.
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "bostonHousing": {"rmse": (2.90, 0.18), "ll": (-2.40, 0.04)},
    "concrete": {"rmse": (4.82, 0.16), "ll": (-2.93, 0.02)},
    "energy": {"rmse": (0.54, 0.06), "ll": (-1.21, 0.01)},
    "wine-quality-red": {"rmse": (0.62, 0.01), "ll": (-0.93, 0.01)},
    "yacht": {"rmse": (0.67, 0.05), "ll": (-1.25, 0.01)},
}
#: Display names of the data sets.
PUBLISHED_NAMES = {
    "bostonHousing": "Boston",
    "concrete": "Concrete",
    "energy": "Energy",
    "wine-quality-red": "Wine",
    "yacht": "Yacht",
}
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


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def split_path(output: str | Path, dataset: str, split: int) -> Path:
    """Where the result of one split lives."""
    return Path(output) / dataset / f"split_{split}.json"


def write_split_result(output: str | Path, result: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write one split's result with the settings that produced it (atomically)."""
    payload = {"settings": settings, "result": result}
    path = split_path(output, result["dataset"], result["split"])
    return write_atomic(path, json.dumps(payload, indent=2) + "\n")


def load_split_results(
    output: str | Path, dataset: str, settings: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    """Finished splits of ``dataset`` under ``output``, keyed by split index.

    Raises:
        ValueError: a file is unreadable, or was produced with other settings (the message names
            the file and the first differing setting).
    """
    folder = Path(output) / dataset
    found: dict[int, dict[str, Any]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("split_*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            result, stored = payload["result"], payload["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a split result written by this benchmark ({exc})") from None
        if stored != settings:
            keys = sorted(set(stored) | set(settings))
            diff = next(k for k in keys if stored.get(k) != settings.get(k))
            raise ValueError(
                f"{path}: produced with other settings ({diff}={stored.get(diff)!r}, now "
                f"{settings.get(diff)!r}); use another --output or the same settings"
            )
        found[int(result["split"])] = result
    return found


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


def _fmt(mean: float | None, se: float | None, digits: int = 2) -> str:
    if mean is None or se is None:
        return "-"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(summaries: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """dropkit's mean ± SE beside the published grid-search numbers."""
    lines = [
        "| data set | splits | RMSE (dropkit) | RMSE (published) | test LL (dropkit) | test LL (published) "
        "| LL, learned τ | τ at grid edge | time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        pub = PUBLISHED.get(s["dataset"])
        name = PUBLISHED_NAMES.get(s["dataset"], s["dataset"])
        lines.append(
            f"| {name} | {s['n_splits']} | {_fmt(s.get('rmse'), s.get('rmse_se'))} | "
            f"{_fmt(*pub['rmse']) if pub else '-'} | {_fmt(s.get('ll'), s.get('ll_se'))} | "
            f"{_fmt(*pub['ll']) if pub else '-'} | "
            f"{_fmt(s.get('ll_tau_learned'), s.get('ll_tau_learned_se'))} | "
            f"{s['tau_at_grid_edge']}/{s['n_splits']} | {s['seconds']:.0f} |"
        )
    note = (
        "Published protocol settings."
        if settings.get("protocol")
        else "NOT the published protocol (shortened or modified settings): " + json.dumps(settings["config"])
    )
    return "\n".join([*lines, "", note, ""])


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
