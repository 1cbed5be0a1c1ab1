"""The result of :func:`dropkit.diagnostics.check`: findings and sites, as text and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dropkit.diagnostics.findings import SEVERITIES, Finding, severity_rank

__all__ = ["DiagnosticReport", "SiteReport"]

_METHODS = {
    "trace": "a traced forward on the example inputs",
    "sequential": "the order of its nn.Sequential layers (no example inputs)",
    "static": "its modules only (no example inputs, not an nn.Sequential): placement rules skipped",
}


@dataclass(frozen=True)
class SiteReport:
    """One dropout site as the report lists it.

    Attributes:
        path: the site's label (module path; plus the function for a functional call).
        name: class or function.
        variant: what it drops (see :mod:`dropkit.diagnostics.sites`).
        rate: drop rate (``None``: unknown).
        position: position in the network (see :mod:`dropkit.diagnostics.positions`).
        calls: runs in the example forward (``None`` when nothing was traced).
        note: e.g. that a module only holds the rate of a functional call.
    """

    path: str
    name: str
    variant: str
    rate: float | None
    position: str | None
    calls: int | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "path": self.path,
            "name": self.name,
            "variant": self.variant,
            "rate": self.rate,
            "position": self.position,
            "calls": self.calls,
            "note": self.note,
        }


@dataclass
class DiagnosticReport:
    """Findings about a model's dropout, and the sites they are about.

    ``str(report)`` is a terminal table; :meth:`to_json` the same for machines.

    Attributes:
        model: the model's class name.
        method: how the order of the forward was found: ``"trace"``, ``"sequential"`` or
            ``"static"`` (see :mod:`dropkit.diagnostics.flow`).
        findings: errors first, then warnings, then infos.
        sites: every dropout site.
        notes: what could not be checked, and why.
        n_train: training-set size given to the check.
        n_params: the parameter count used.
        measurements: :class:`~dropkit.diagnostics.measure.Measurements` when measured.
    """

    model: str
    method: str
    findings: list[Finding] = field(default_factory=list)
    sites: list[SiteReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_train: int | None = None
    n_params: int | None = None
    measurements: Any = None

    def codes(self) -> list[str]:
        """The codes of the findings, in order (with repeats)."""
        return [finding.code for finding in self.findings]

    def worst(self) -> str | None:
        """The highest severity among the findings, ``None`` without findings."""
        if not self.findings:
            return None
        return max((finding.severity for finding in self.findings), key=severity_rank)

    def counts(self) -> dict[str, int]:
        """``severity -> number of findings``."""
        return {level: sum(f.severity == level for f in self.findings) for level in reversed(SEVERITIES)}

    def summary(self) -> str:
        """The report as text: a header, the sites, the findings with reason and fix, notes."""
        lines = [
            f"dropkit diagnostics: {self.model}: {len(self.sites)} dropout site(s), "
            f"checked from {_METHODS.get(self.method, self.method)}"
        ]
        if self.sites:
            rows = [("site", "class / function", "variant", "p", "position", "calls")]
            for site in self.sites:
                rows.append(
                    (
                        site.path,
                        site.name + (f" ({site.note})" if site.note else ""),
                        site.variant,
                        "?" if site.rate is None else f"{site.rate:g}",
                        site.position or "-",
                        "-" if site.calls is None else str(site.calls),
                    )
                )
            widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
            for row in rows:
                lines.append(
                    "  "
                    + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                )
        counts = self.counts()
        if not self.findings:
            lines.append("findings: none")
        else:
            lines.append(
                "findings: " + ", ".join(f"{count} {level}" for level, count in counts.items() if count)
            )
        for finding in self.findings:
            lines.append(f"  {finding.code} {finding.severity:<7} {finding.path}: {finding.message}")
            lines.append(f"        why: {finding.reason}")
            lines.append(f"        fix: {finding.fix}")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.measurements is not None:
            lines.append(str(self.measurements))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "model": self.model,
            "method": self.method,
            "n_train": self.n_train,
            "n_params": self.n_params,
            "counts": self.counts(),
            "findings": [finding.to_dict() for finding in self.findings],
            "sites": [site.to_dict() for site in self.sites],
            "notes": list(self.notes),
            "measurements": None if self.measurements is None else self.measurements.to_dict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as a JSON document."""
        return json.dumps(self.to_dict(), indent=indent)
