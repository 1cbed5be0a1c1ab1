"""Self-contained HTML and Markdown reports, with plots embedded as PNG data URIs.

:func:`render_html` and :func:`render_markdown` write a :class:`DiagnosticReport` (findings with
reason and fix, the dropout sites) and, when it holds measurements, their tables and plots: the
ensemble-gap curve (MC error and KL against the number of samples, weight scaling as a line),
the variance shift per BatchNorm (measured, with its standard error, next to Li et al.'s
prediction) and the activation histograms per dropout site (dropout off and on); a
:class:`~dropkit.diagnostics.sweep.SweepResult` adds the rate curve with error bars.  The
files need nothing else to display.  Plots need matplotlib (``pip install 'dropkit[plot]'``),
which is imported when a report with plots is rendered; ``plots=False`` renders without it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dropkit.diagnostics.report import DiagnosticReport
from dropkit.diagnostics.sweep import SweepResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_html", "render_markdown", "write_report"]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError(
            "plots in dropkit's diagnostic reports need matplotlib: pip install 'dropkit[plot]' "
            "(or render with plots=False)",
            name="matplotlib",
        ) from None
    return Figure(figsize=(width, height), layout="constrained")


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(report: DiagnosticReport, sweep: SweepResult | None) -> list[tuple[str, str]]:
    """``(title, base64 png)`` of every plot the report has data for."""
    plots = []
    measurements = report.measurements
    gap = getattr(measurements, "ensemble_gap", None)
    if gap is not None:
        figure = _figure(8, 3)
        panels = [name for name in ("error", "kl") if name in gap.mc]
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        for ax, name in zip(axes, panels, strict=False):
            ax.plot(gap.T, gap.mc[name], marker="o", label="MC average")
            if name in gap.weight_scaling:
                ax.axhline(gap.weight_scaling[name], color="k", linestyle="--", label="weight scaling")
            if gap.matching_T is not None and name == "error":
                ax.axvline(
                    gap.matching_T, color="tab:green", linestyle=":", label=f"match at T={gap.matching_T}"
                )
            ax.set_xscale("log")
            if name == "kl" and min(gap.mc[name]) > 0:
                ax.set_yscale("log")
            ax.set_xlabel("T (MC samples)")
            ax.set_ylabel(
                {"error": "error" if gap.task == "classification" else "RMSE", "kl": "KL(ws || MC)"}[name]
            )
            ax.legend(fontsize="small")
        plots.append(("Ensemble gap (Srivastava et al. 2014, Fig. 11)", _png(figure)))
    shifts = getattr(measurements, "variance_shift", None) or []
    if shifts:
        figure = _figure(max(4, 1.2 * len(shifts) + 2), 3)
        ax = figure.subplots()
        positions = list(range(len(shifts)))
        errors = [
            float(s.standard_error.square().mean().sqrt()) / max(s.measured.numel(), 1) ** 0.5 for s in shifts
        ]
        ax.bar(positions, [s.measured_mean for s in shifts], yerr=errors, label="measured", color="tab:blue")
        ax.scatter(
            positions, [s.predicted_mean for s in shifts], color="tab:red", zorder=3, label="Li et al."
        )
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks(positions, [s.batchnorm for s in shifts], rotation=30, ha="right")
        ax.set_ylabel("Var eval / Var train")
        ax.legend(fontsize="small")
        plots.append(("Variance shift at BatchNorm inputs (Li et al. 2019)", _png(figure)))
    activations = (getattr(measurements, "activations", None) or [])[:6]
    if activations:
        columns = min(3, len(activations))
        rows = (len(activations) + columns - 1) // columns
        figure = _figure(3.2 * columns, 2.4 * rows)
        axes = figure.subplots(rows, columns, squeeze=False).reshape(-1)
        for ax, stats in zip(axes, activations, strict=False):
            centers = ((stats.edges[1:] + stats.edges[:-1]) / 2).tolist()
            ax.step(centers, stats.eval_histogram.tolist(), where="mid", label="dropout off")
            ax.step(centers, stats.dropout_histogram.tolist(), where="mid", label="dropout on")
            ax.set_title(stats.site, fontsize="small")
            ax.set_yscale("log")
        for ax in axes[len(activations) :]:
            ax.set_visible(False)
        axes[0].legend(fontsize="x-small")
        plots.append(("Activations at dropout sites (Srivastava et al. 2014, Fig. 7-8)", _png(figure)))
    if sweep is not None:
        figure = _figure(5, 3)
        ax = figure.subplots()
        ax.errorbar(
            [p.rate for p in sweep.points],
            [p.mean for p in sweep.points],
            yerr=[p.sem for p in sweep.points],
            marker="o",
            capsize=3,
        )
        ax.axvline(sweep.best_rate, color="tab:green", linestyle=":")
        ax.set_xlabel("dropout rate")
        ax.set_ylabel("score (mean +- s.e. over seeds)")
        plots.append(("Rate sweep", _png(figure)))
    return plots


def _finding_rows(report: DiagnosticReport) -> list[list[str]]:
    return [[f.code, f.severity, f.path, f.message, f.reason, f.fix] for f in report.findings]


def _site_rows(report: DiagnosticReport) -> list[list[str]]:
    return [
        [
            s.path,
            s.name + (f" ({s.note})" if s.note else ""),
            s.variant,
            "?" if s.rate is None else f"{s.rate:g}",
            s.position or "-",
            "-" if s.calls is None else str(s.calls),
        ]
        for s in report.sites
    ]


_SITE_HEADER = ["site", "class / function", "variant", "p", "position", "calls"]
_FINDING_HEADER = ["code", "severity", "where", "finding", "why", "fix"]


def _text_blocks(report: DiagnosticReport, sweep: SweepResult | None) -> list[tuple[str, str]]:
    blocks = []
    if report.measurements is not None:
        blocks.append(("Measurements", str(report.measurements)))
    if sweep is not None:
        blocks.append(("Rate sweep", sweep.table()))
    return blocks


def _header(report: DiagnosticReport) -> str:
    counts = report.counts()
    found = ", ".join(f"{count} {level}" for level, count in counts.items() if count) or "no findings"
    return f"{len(report.sites)} dropout site(s), checked from a {report.method} analysis: {found}"


def render_markdown(
    report: DiagnosticReport,
    *,
    sweep: SweepResult | None = None,
    title: str | None = None,
    plots: bool = True,
) -> str:
    """The report as a self-contained Markdown document (plots as PNG data URIs).

    Args:
        report: from :func:`~dropkit.diagnostics.check` (with ``measurements`` set by the
            caller or the ``doctor`` command for the measured part).
        sweep: a rate sweep to include.
        title: the heading; default ``"dropkit doctor: <model>"``.
        plots: embed plots (needs matplotlib).

    Example::

        >>> import torch
        >>> from dropkit.diagnostics import check
        >>> text = render_markdown(check(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))))
        >>> "DK102" in text and text.startswith("# dropkit doctor: Sequential")
        True
    """
    lines = [f"# {title or f'dropkit doctor: {report.model}'}", "", _header(report), ""]

    def table(header: list[str], rows: list[list[str]]) -> None:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for row in rows:
            lines.append(
                "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
            )
        lines.append("")

    lines += ["## Findings", ""]
    if report.findings:
        table(_FINDING_HEADER, _finding_rows(report))
    else:
        lines += ["None.", ""]
    lines += ["## Dropout sites", ""]
    table(_SITE_HEADER, _site_rows(report))
    for note in report.notes:
        lines += [f"> {note}", ""]
    for name, text in _text_blocks(report, sweep):
        lines += [f"## {name}", "", "```", text, "```", ""]
    if plots:
        for name, png in _plots(report, sweep):
            lines += [f"### {name}", "", f"![{name}](data:image/png;base64,{png})", ""]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
    "td,th{border:1px solid #ccc;padding:.3rem .5rem;vertical-align:top;text-align:left}"
    ".error{color:#b00}.warning{color:#a60}.info{color:#06a}pre{background:#f5f5f5;padding:1rem;overflow:auto}"
)


def render_html(
    report: DiagnosticReport,
    *,
    sweep: SweepResult | None = None,
    title: str | None = None,
    plots: bool = True,
) -> str:
    """The report as one self-contained HTML page (inline style, plots as PNG data URIs).

    Args:
        report: from :func:`~dropkit.diagnostics.check`, optionally with ``measurements``.
        sweep: a rate sweep to include.
        title: the page title; default ``"dropkit doctor: <model>"``.
        plots: embed plots (needs matplotlib).

    Example::

        >>> import torch
        >>> from dropkit.diagnostics import check
        >>> report = check(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)))
        >>> page = render_html(report, plots=False)
        >>> page.startswith("<!DOCTYPE html>") and "DK102" in page
        True
    """
    heading = html.escape(title or f"dropkit doctor: {report.model}")
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{heading}</h1>",
        f"<p>{html.escape(_header(report))}</p>",
    ]

    def table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> None:
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        for index, row in enumerate(rows):
            css = f' class="{classes[index]}"' if classes else ""
            parts.append(f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
        parts.append("</table>")

    parts.append("<h2>Findings</h2>")
    if report.findings:
        table(_FINDING_HEADER, _finding_rows(report), [f.severity for f in report.findings])
    else:
        parts.append("<p>None.</p>")
    parts.append("<h2>Dropout sites</h2>")
    table(_SITE_HEADER, _site_rows(report))
    for note in report.notes:
        parts.append(f"<p><em>{html.escape(note)}</em></p>")
    for name, text in _text_blocks(report, sweep):
        parts.append(f"<h2>{html.escape(name)}</h2><pre>{html.escape(text)}</pre>")
    if plots:
        for name, png in _plots(report, sweep):
            parts.append(
                f"<h3>{html.escape(name)}</h3>"
                f'<img alt="{html.escape(name)}" src="data:image/png;base64,{png}">'
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    report: DiagnosticReport,
    path: str | os.PathLike[str],
    *,
    sweep: SweepResult | None = None,
    plots: bool = True,
) -> Path:
    """Write ``report`` to ``path``: HTML for ``.html`` / ``.htm``, Markdown for ``.md``, JSON for ``.json``.

    Returns:
        The path written.

    Raises:
        ValueError: another extension, or a directory that does not exist.
        TypeError: ``path`` is not a string or path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".html", ".htm", ".md", ".json"):
        raise ValueError(f"path must end in .html, .htm, .md or .json, got {str(path)!r}")
    if not target.parent.is_dir():
        raise ValueError(f"the directory of {str(path)!r} does not exist")
    text: str
    if suffix == ".json":
        data: dict[str, Any] = report.to_dict()
        if sweep is not None:
            data["sweep"] = sweep.to_dict()
        text = json.dumps(data, indent=2)
    elif suffix == ".md":
        text = render_markdown(report, sweep=sweep, plots=plots)
    else:
        text = render_html(report, sweep=sweep, plots=plots)
    target.write_text(text, encoding="utf-8")
    return target
