"""The combined report of ``dropkit reproduce``: ``README.md``, ``index.html`` and ``results.json``.

Written into the output directory after every run (:func:`write_report`), for the experiments
of that run and those that earlier runs wrote into the same directory at the same scale with the
same data (so that experiments run one at a time still make one report; each section says which
run it comes from):

* ``README.md`` and ``index.html`` (the same content; the HTML is one file with its style
  inline, no scripts, nothing fetched from elsewhere; figures are the files under
  ``OUTPUT/NAME/``, linked relatively): a header (command, versions, machine, date, time), an
  overview table (experiment | claim | published | ours | held?), then one section per
  experiment: title, the claim and its source, the data used, the verdict, the tables, the
  figures with their captions, the notes, the seeds and the time;
* ``results.json``: the same facts for programs, sealed with a checksum
  (:func:`dropkit.experiments._files.seal`): command, versions, machine, date, and per
  experiment its status, claim, verdict, metrics, tables, seeds and times.  Numbers keep full
  precision; NaN and infinities are written as ``null``.

Both documents are rendered from the content of ``results.json`` alone.  Figures are drawn by
:func:`draw_figures` (matplotlib is optional: without it the report says so and keeps every
table).
"""

from __future__ import annotations

import contextlib
import datetime
import html
import io
import json
import math
import numbers
import os
import platform
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import dropkit
from dropkit.experiments._console import format_duration
from dropkit.experiments._files import read_sealed_json, seal, write_atomic
from dropkit.experiments.reproduce.api import Summary

if TYPE_CHECKING:
    from dropkit.experiments.reproduce.runner import Outcome, SuiteResult

__all__ = [
    "FIGURE_FORMATS",
    "MATPLOTLIB_MISSING",
    "RESULTS_FORMAT",
    "STATUS_LABELS",
    "FigureFiles",
    "draw_figures",
    "render_html",
    "render_markdown",
    "results_payload",
    "write_report",
]

#: Figure formats that can be written, in the order of the links under each figure.
FIGURE_FORMATS: tuple[str, ...] = ("png", "svg")
#: ``format`` entry of ``results.json``.
RESULTS_FORMAT = "dropkit-reproduce-results/1"
#: What the report says in place of the figures when matplotlib is not installed.
MATPLOTLIB_MISSING = (
    "matplotlib is not installed, so the figures were not drawn (pip install 'dropkit[plot]'); "
    "the tables are complete."
)
#: How the report writes each status of an experiment.
STATUS_LABELS: dict[str, str] = {
    "held": "held",
    "not_held": "did not hold",
    "undecided": "undecided at this size",
    "skipped": "skipped",
    "failed": "failed",
}
_ENTRY_KEYS = {
    "name",
    "title",
    "status",
    "held",
    "claim",
    "ours",
    "verdict",
    "message",
    "data",
    "tables",
    "notes",
    "figures",
    "seeds",
    "seeds_run",
    "seeds_reused",
    "seconds",
    "compute_seconds",
    "error_file",
    "command",
    "finished",
}
_FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FIGURE_SIZE = (6.4, 4.0)
_DPI = 110
_SCALE_TEXT = {
    "tiny": "tiny: seconds per experiment, a check that every experiment runs end to end; "
    "no claim can be decided at this size",
    "quick": "quick: reduced runs of minutes each on two CPU cores; the notes of each experiment "
    "say what was reduced",
    "full": "full: the published protocols, or the largest reduction of them that a CPU can run "
    "(see each experiment's notes)",
}


@dataclass(frozen=True)
class FigureFiles:
    """A figure drawn to files.

    Attributes:
        name: the figure's name (file stem).
        caption: its caption.
        files: format -> path relative to the output directory (``"uci/z-scores.svg"``).
    """

    name: str
    caption: str
    files: Mapping[str, str]


def _write_bytes(path: Path, data: bytes) -> None:
    # write_atomic writes text; a PNG is bytes.  Same idea: a unique temporary file beside the
    # target, renamed over it, so a reader never sees half an image.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def draw_figures(
    name: str, summary: Summary, output: str | Path, formats: Sequence[str] = FIGURE_FORMATS
) -> tuple[tuple[FigureFiles, ...], str]:
    """Draw every figure of ``summary`` into ``OUTPUT/NAME/<figure>.<format>``.

    Each figure is drawn on a fresh :class:`matplotlib.figure.Figure` (no pyplot, no global
    state, no display needed) and saved in each of ``formats``; unless the drawing chose a
    layout (``fig.tight_layout()``, ``fig.set_layout_engine``), the constrained layout keeps
    labels inside the image.

    Args:
        name: the experiment's name (its directory under ``output``).
        summary: what the experiment's ``summarize`` returned.
        output: the output directory.
        formats: entries of :data:`FIGURE_FORMATS`.

    Returns:
        ``(figures, note)``: the files written, and :data:`MATPLOTLIB_MISSING` when matplotlib
        is not installed (then no figure is drawn), else ``""``.

    Raises:
        ValueError: a figure name is not a plain file stem, or two figures share a name.
        Exception: whatever a figure's ``draw`` raises.
    """
    if not summary.figures:
        return (), ""
    seen: set[str] = set()
    for figure in summary.figures:
        if not _FIGURE_NAME.fullmatch(figure.name) or figure.name in seen:
            raise ValueError(f"figure names must be distinct plain file stems, got {figure.name!r}")
        seen.add(figure.name)
    try:
        import matplotlib
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        return (), MATPLOTLIB_MISSING
    directory = Path(output) / name
    directory.mkdir(parents=True, exist_ok=True)
    drawn = []
    for figure in summary.figures:
        canvas = MplFigure(figsize=_FIGURE_SIZE)
        figure.draw(canvas)
        if canvas.get_layout_engine() is None:  # the draw chose no layout (tight_layout sets one)
            canvas.set_layout_engine("constrained")
        files = {}
        for fmt in formats:
            buffer = io.BytesIO()
            # A fixed hash salt and no date keep an unchanged SVG byte-identical between runs.
            with matplotlib.rc_context({"svg.hashsalt": "dropkit"}):
                metadata = {"Date": None} if fmt == "svg" else {"Software": None}
                canvas.savefig(buffer, format=fmt, dpi=_DPI, metadata=metadata)
            path = directory / f"{figure.name}.{fmt}"
            if fmt == "svg":
                write_atomic(path, buffer.getvalue().decode("utf-8"))
            else:
                _write_bytes(path, buffer.getvalue())
            files[fmt] = f"{name}/{figure.name}.{fmt}"
        drawn.append(FigureFiles(figure.name, figure.caption, files))
    return tuple(drawn), ""


# ---------------------------------------------------------------------------------------------
# Facts of the run


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    try:
        import matplotlib

        mpl: str | None = matplotlib.__version__
    except ImportError:
        mpl = None
    return {
        "dropkit": dropkit.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "matplotlib": mpl,
    }


def _machine(threads: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
    }


def _plain(value: Any) -> Any:
    """``value`` as strict JSON: tuples as lists, numpy scalars as numbers, NaN and infinities
    as ``None``, anything else that JSON cannot hold as its text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _experiment_payload(outcome: Outcome, result: SuiteResult) -> dict[str, Any]:
    exp, summary = outcome.experiment, outcome.summary
    claim = exp.claim if exp else None
    return {
        "name": outcome.name,
        "title": exp.title if exp else outcome.name,
        "status": outcome.status,
        "held": summary.verdict.held if summary and outcome.status != "failed" else None,
        "claim": (
            {"statement": claim.statement, "source": claim.source, "published": claim.published}
            if claim
            else None
        ),
        "ours": (summary.ours or summary.verdict.text) if summary else None,
        "verdict": summary.verdict.text if summary else None,
        "message": outcome.message or None,
        "data": list(exp.data) if exp else [],
        "metrics": dict(summary.metrics) if summary else {},
        "tables": (
            [
                {"title": t.title, "columns": list(t.columns), "rows": [list(r) for r in t.rows]}
                for t in summary.tables
            ]
            if summary
            else []
        ),
        "notes": list(summary.notes) if summary else [],
        "figures": [{"name": f.name, "caption": f.caption, "files": dict(f.files)} for f in outcome.figures],
        "figure_note": outcome.figure_note or None,
        "seeds": list(outcome.seeds),
        "seeds_run": list(outcome.seeds_run),
        "seeds_reused": list(outcome.seeds_reused),
        "seconds": outcome.seconds,
        "compute_seconds": outcome.compute_seconds,
        "error_file": outcome.error_file,
        "command": result.options.command,
        "finished": result.finished,
        "earlier_run": False,
    }


def _counts(entries: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {status: sum(e["status"] == status for e in entries) for status in STATUS_LABELS}


def _earlier_entries(previous: Mapping[str, Any] | None, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Entries of an earlier ``results.json`` of the same scale and data, for experiments that
    this run did not run (so that running experiments one at a time builds one report)."""
    if not previous or previous.get("format") != RESULTS_FORMAT:
        return []
    if (previous.get("scale"), previous.get("data")) != (payload["scale"], payload["data"]):
        return []
    ran = {e["name"] for e in payload["experiments"]}
    earlier = []
    for entry in previous.get("experiments", []):
        if isinstance(entry, dict) and entry.get("name") not in ran and set(entry) >= _ENTRY_KEYS:
            earlier.append({**entry, "earlier_run": True})
    return earlier


def _registry_order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from dropkit.experiments.reproduce import names

    order = {name: i for i, name in enumerate(names())}
    return sorted(entries, key=lambda e: order.get(e["name"], len(order)))


def results_payload(result: SuiteResult, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``results.json`` (before sealing): the run's facts and every experiment's
    status, claim, verdict, metrics, tables, seeds and times.

    Args:
        result: the finished run.
        previous: the earlier ``results.json`` of the output directory (unsealed), or ``None``.
            When it has the same scale and data, its entries for experiments this run did not
            run are kept (``"earlier_run": true``), so the report stays combined when experiments
            are run one at a time.
    """
    options = result.options
    payload: dict[str, Any] = _plain(
        {
            "format": RESULTS_FORMAT,
            "command": options.command,
            "scale": options.scale,
            "seeds": options.seeds,
            "data": None if options.data_dir is None else str(options.data_dir.resolve()),
            "resume": options.resume,
            "started": result.started,
            "finished": result.finished,
            "seconds": result.seconds,
            "versions": _versions(),
            "machine": _machine(result.threads),
            "experiments": [_experiment_payload(o, result) for o in result.outcomes],
        }
    )
    payload["experiments"] = _registry_order(payload["experiments"] + _earlier_entries(previous, payload))
    payload["counts"] = _counts(payload["experiments"])
    return payload


# ---------------------------------------------------------------------------------------------
# Text shared by both renderings


def _stamp(iso: str) -> str:
    return datetime.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


def _verdict_label(entry: Mapping[str, Any]) -> str:
    held = entry["held"]
    return STATUS_LABELS["held" if held is True else "not_held" if held is False else "undecided"]


def _verdict_status(entry: Mapping[str, Any]) -> str:
    held = entry["held"]
    return "held" if held is True else "not_held" if held is False else "undecided"


def _claim_text(entry: Mapping[str, Any]) -> str:
    claim = entry["claim"]
    return f"{claim['statement']} ({claim['source']})" if claim else "-"


def _run_text(entry: Mapping[str, Any], scale: str) -> str:
    seeds = ", ".join(str(s) for s in entry["seeds"]) or "none"
    text = f"scale {scale}; seeds {seeds}"
    if entry["seeds_reused"]:
        text += (
            f" ({len(entry['seeds_run'])} run now, {len(entry['seeds_reused'])} reused from an earlier run)"
        )
    text += f". Time: {format_duration(entry['seconds'])}"
    if entry["compute_seconds"]:
        text += f" ({format_duration(entry['compute_seconds'])} of training over the seeds)"
    if entry.get("earlier_run"):
        text += f". From an earlier run: {entry['command']}, {_stamp(entry['finished'])}"
    return text + "."


def _header_rows(payload: Mapping[str, Any]) -> list[tuple[str, str]]:
    versions, machine = payload["versions"], payload["machine"]
    return [
        ("command", payload["command"] or "(not recorded)"),
        ("scale", _SCALE_TEXT[payload["scale"]]),
        (
            "versions",
            f"dropkit {versions['dropkit']}, torch {versions['torch']}, numpy {versions['numpy']}, "
            f"Python {versions['python']}, matplotlib {versions['matplotlib'] or 'not installed'}",
        ),
        (
            "machine",
            f"{machine['platform']}; {machine['cpu']}; {machine['cpu_count']} CPUs, "
            f"{machine['torch_threads']} torch threads",
        ),
        ("date", _stamp(payload["finished"])),
        ("time", f"{format_duration(payload['seconds'])} (this run)"),
    ]


def _counts_text(payload: Mapping[str, Any]) -> str:
    counts = payload["counts"]
    return ", ".join(f"{STATUS_LABELS[k]}: {n}" for k, n in counts.items() if n) or "no experiments"


_MACHINE_READABLE_MD = "Machine-readable: [results.json](results.json); also as [index.html](index.html)."
_MACHINE_READABLE_HTML = (
    'Machine-readable: <a href="results.json">results.json</a>; also as <a href="README.md">README.md</a>.'
)


def _earlier_text(payload: Mapping[str, Any]) -> str:
    earlier = [e["name"] for e in payload["experiments"] if e.get("earlier_run")]
    if not earlier:
        return ""
    return f"Kept from earlier runs into this directory (same scale and data): {', '.join(earlier)}."


# ---------------------------------------------------------------------------------------------
# Markdown


def _md(text: object) -> str:
    """A table cell: pipes escaped, one line."""
    return " ".join(str(text).replace("|", "\\|").split())


def _md_table(columns: Sequence[object], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_md(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _md_section(entry: Mapping[str, Any], scale: str) -> list[str]:
    lines = [f"## {entry['title']} (`{entry['name']}`)", ""]
    claim = entry["claim"]
    if claim:
        lines += [f"**Claim.** {_claim_text(entry)}", "", f"**Published.** {claim['published']}", ""]
    if entry["data"]:
        lines += [f"**Data.** {', '.join(entry['data'])}", ""]
    if entry["status"] == "skipped":
        lines += [f"**Skipped.** {entry['message']}", ""]
    elif entry["status"] == "failed":
        error_file = entry["error_file"]
        tb = f" (traceback: [{error_file}]({error_file}))" if error_file else ""
        lines += [f"**Failed.** {entry['message']}{tb}", ""]
    if entry["verdict"] is not None:
        lines += [f"**Verdict: {_verdict_label(entry)}.** {entry['verdict']}", ""]
    for table in entry["tables"]:
        lines += [f"#### {table['title']}", "", *_md_table(table["columns"], table["rows"]), ""]
    if entry.get("figure_note"):
        lines += [f"*{entry['figure_note']}*", ""]
    for figure in entry["figures"]:
        files = figure["files"]
        main = files.get("png") or files.get("svg", "")
        links = " · ".join(f"[{fmt.upper()}]({path})" for fmt, path in files.items())
        lines += [f"![{_md(figure['caption'])}]({main})", "", f"*{figure['caption']}* ({links})", ""]
    if entry["notes"]:
        lines += ["**Notes.**", "", *[f"- {note}" for note in entry["notes"]], ""]
    lines += [f"**Run.** {_run_text(entry, scale)}", ""]
    return lines


def render_markdown(payload: Mapping[str, Any]) -> str:
    """``README.md`` from the content of ``results.json``."""
    lines = ["# dropkit reproductions", ""]
    lines += [f"- **{k}:** " + (f"`{v}`" if k == "command" else v) for k, v in _header_rows(payload)]
    lines += ["", "## Overview", ""]
    rows = [
        (
            f"{e['title']} (`{e['name']}`)",
            _claim_text(e),
            e["claim"]["published"] if e["claim"] else "-",
            e["ours"] or "-",
            f"**{STATUS_LABELS[e['status']]}**",
        )
        for e in payload["experiments"]
    ]
    lines += _md_table(["experiment", "claim", "published", "ours", "held?"], rows)
    summary = [f"{_counts_text(payload)}.", _earlier_text(payload), _MACHINE_READABLE_MD]
    lines += ["", " ".join(part for part in summary if part), ""]
    for entry in payload["experiments"]:
        lines += _md_section(entry, payload["scale"])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:62rem;margin:2rem auto;
padding:0 1rem;line-height:1.45;color:#1b1b1b}
h1{font-size:1.7rem}h2{font-size:1.3rem;margin-top:2.4rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
h3{font-size:1rem;margin-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
code{background:#f3f3f3;padding:0 .2rem;border-radius:3px}
.status{font-weight:600;white-space:nowrap;padding:.05rem .4rem;border-radius:3px}
.held{background:#d8f0d8;color:#14501a}.not_held{background:#f7d7d5;color:#7a1610}
.undecided{background:#eee;color:#444}.skipped{background:#fdf0c8;color:#5c4500}
.failed{background:#7a1610;color:#fff}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9rem;color:#333}
.meta{font-size:.9rem}.note{font-style:italic}
"""


def _h(text: object) -> str:
    return html.escape(str(text), quote=True)


def _html_table(columns: Sequence[object], rows: Sequence[Sequence[object]]) -> list[str]:
    out = [
        "<table>",
        "<thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in columns) + "</tr></thead>",
        "<tbody>",
    ]
    out += ["<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in rows]
    out += ["</tbody>", "</table>"]
    return out


def _badge(status: str, label: str) -> str:
    return f'<span class="status {_h(status)}">{_h(label)}</span>'


def _html_section(entry: Mapping[str, Any], scale: str) -> list[str]:
    name = entry["name"]
    out = [f'<section id="{_h(name)}">', f"<h2>{_h(entry['title'])} <code>{_h(name)}</code></h2>"]
    claim = entry["claim"]
    if claim:
        out.append(f"<p><b>Claim.</b> {_h(_claim_text(entry))}</p>")
        out.append(f"<p><b>Published.</b> {_h(claim['published'])}</p>")
    if entry["data"]:
        out.append(f"<p><b>Data.</b> {_h(', '.join(entry['data']))}</p>")
    status = entry["status"]
    if status == "skipped":
        out.append(f"<p>{_badge(status, STATUS_LABELS[status])} {_h(entry['message'])}</p>")
    elif status == "failed":
        error_file = entry["error_file"]
        tb = f' (traceback: <a href="{_h(error_file)}">{_h(error_file)}</a>)' if error_file else ""
        out.append(f"<p>{_badge(status, STATUS_LABELS[status])} {_h(entry['message'])}{tb}</p>")
    if entry["verdict"] is not None:
        badge = _badge(_verdict_status(entry), _verdict_label(entry))
        out.append(f"<p><b>Verdict:</b> {badge} {_h(entry['verdict'])}</p>")
    for table in entry["tables"]:
        out += [f"<h3>{_h(table['title'])}</h3>", *_html_table(table["columns"], table["rows"])]
    if entry.get("figure_note"):
        out.append(f'<p class="note">{_h(entry["figure_note"])}</p>')
    for figure in entry["figures"]:
        files = figure["files"]
        main = files.get("svg") or files.get("png", "")
        links = " · ".join(f'<a href="{_h(path)}">{_h(fmt.upper())}</a>' for fmt, path in files.items())
        out += [
            "<figure>",
            f'<img src="{_h(main)}" alt="{_h(figure["caption"])}">',
            f"<figcaption>{_h(figure['caption'])} ({links})</figcaption>",
            "</figure>",
        ]
    if entry["notes"]:
        out += ["<p><b>Notes.</b></p>", "<ul>", *[f"<li>{_h(n)}</li>" for n in entry["notes"]], "</ul>"]
    out += [f'<p class="meta"><b>Run.</b> {_h(_run_text(entry, scale))}</p>', "</section>"]
    return out


def render_html(payload: Mapping[str, Any]) -> str:
    """``index.html`` from the content of ``results.json``: self-contained (inline style, no
    scripts, no remote resources; figures are linked relatively)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>dropkit reproductions</title>",
        f"<style>{_CSS.strip()}</style>",
        "</head>",
        "<body>",
        "<h1>dropkit reproductions</h1>",
        '<table class="meta"><tbody>',
    ]
    for key, value in _header_rows(payload):
        cell = f"<code>{_h(value)}</code>" if key == "command" else _h(value)
        out.append(f"<tr><th>{_h(key)}</th><td>{cell}</td></tr>")
    out += ["</tbody></table>", "<h2>Overview</h2>", "<table>", "<thead><tr>"]
    out.append("".join(f"<th>{c}</th>" for c in ("experiment", "claim", "published", "ours", "held?")))
    out += ["</tr></thead>", "<tbody>"]
    for e in payload["experiments"]:
        name = e["name"]
        out.append(
            f'<tr><td><a href="#{_h(name)}">{_h(e["title"])}</a> <code>{_h(name)}</code></td>'
            f"<td>{_h(_claim_text(e))}</td><td>{_h(e['claim']['published'] if e['claim'] else '-')}</td>"
            f"<td>{_h(e['ours'] or '-')}</td><td>{_badge(e['status'], STATUS_LABELS[e['status']])}</td></tr>"
        )
    out += ["</tbody>", "</table>"]
    summary = [_h(f"{_counts_text(payload)}."), _h(_earlier_text(payload)), _MACHINE_READABLE_HTML]
    out.append(f"<p>{' '.join(part for part in summary if part)}</p>")
    for entry in payload["experiments"]:
        out += _html_section(entry, payload["scale"])
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _previous(path: Path) -> dict[str, Any] | None:
    try:
        return read_sealed_json(path)
    except (OSError, ValueError):
        return None  # none yet, or damaged: the report holds this run only


def write_report(result: SuiteResult) -> tuple[Path, Path, Path]:
    """Write ``results.json``, ``README.md`` and ``index.html`` into the output directory, each
    atomically; both documents are rendered from the content of ``results.json``.

    Experiments that an earlier run wrote into the same directory at the same scale and with the
    same data, and that this run did not run, are kept (see :func:`results_payload`).

    Returns:
        The paths of ``README.md``, ``index.html`` and ``results.json``.

    Raises:
        OSError: a file cannot be written.
    """
    output = result.options.output
    payload = results_payload(result, _previous(output / "results.json"))
    text = json.dumps(seal(payload), indent=1, allow_nan=False, ensure_ascii=False)
    results = write_atomic(output / "results.json", text + "\n")
    readme = write_atomic(output / "README.md", render_markdown(payload))
    page = write_atomic(output / "index.html", render_html(payload))
    return readme, page, results
