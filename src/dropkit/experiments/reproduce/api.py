"""The contract between ``dropkit reproduce`` and its experiments.

An experiment is a module under :mod:`dropkit.experiments.reproduce` that defines one
:class:`Experiment` object, ``EXPERIMENT``.  The runner (:mod:`.runner`) calls
:meth:`Experiment.run_seed` once per seed, writes each result atomically as sealed JSON
(``OUTPUT/NAME/seed-<k>.json``) so an interrupted run resumes where it stopped, then calls
:meth:`Experiment.summarize` on every seed's result and renders the returned :class:`Summary`
(tables, figures, the claim and whether it held) into ``OUTPUT/README.md`` and
``OUTPUT/index.html``.

Three sizes (:data:`SCALES`): ``"tiny"`` runs in seconds (the end-to-end tests), ``"quick"`` in
about a minute or two on two CPU cores (``--quick``; the whole suite within 20 minutes) and
``"full"`` is the published protocol or the largest reduction of it that a CPU can run.

Results must be JSON-serialisable (numbers, strings, lists, dicts): they are what resume reads
back, so :meth:`Experiment.summarize` may only use what :meth:`Experiment.run_seed` returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "SCALES",
    "Claim",
    "DataUnavailableError",
    "Experiment",
    "Figure",
    "RunContext",
    "Scale",
    "Summary",
    "Table",
    "Verdict",
]

Scale = Literal["tiny", "quick", "full"]
#: The sizes an experiment runs at, smallest first.
SCALES: tuple[Scale, ...] = ("tiny", "quick", "full")


class DataUnavailableError(RuntimeError):
    """Data an experiment needs is absent; the message says where it was looked for and how to
    get it.  The runner reports the experiment as skipped (not failed) with this message."""


@dataclass(frozen=True)
class Claim:
    """A published statement an experiment checks.

    Attributes:
        statement: the claim in one sentence, as a reader would quote it.
        source: where it is published (``"Srivastava et al. 2014, Table 2"``).
        published: the published number(s), as text (``"1.60 % -> 1.25 % -> 1.05 %"``).
    """

    statement: str
    source: str
    published: str


@dataclass(frozen=True)
class RunContext:
    """What one run of the suite gives every experiment.

    Attributes:
        scale: ``"tiny"``, ``"quick"`` or ``"full"``.
        data_dir: the ``--data`` directory, or ``None`` (then experiments use the embedded
            scikit-learn digits; see :mod:`.data`).
        work_dir: ``OUTPUT/NAME``, created; an experiment may write extra files there.
        progress: show progress on stderr (:class:`dropkit.experiments._console.Progress`).
        label: prefix for progress lines (``"mnist-mlp seed 2"``).
        trained_dir: where an experiment may keep a trained model for another experiment of the
            same output directory that trains the same one (``OUTPUT/_trained``; ``mnist-mlp``
            and ``ensemble-vs-scaling`` share their dropout network), or ``None``: keep nothing.
    """

    scale: Scale
    data_dir: Path | None
    work_dir: Path
    progress: bool = False
    label: str = ""
    trained_dir: Path | None = None

    @property
    def quick(self) -> bool:
        """Whether this is a reduced run (``"tiny"`` or ``"quick"``)."""
        return self.scale != "full"

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        """The value for this run's scale: ``ctx.pick(tiny=2, quick=20, full=200)``."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.scale]


@dataclass(frozen=True)
class Table:
    """A table of the report.  Cells are already-formatted strings
    (:func:`dropkit.experiments._console.format_mean_se` for mean ± SE)."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass(frozen=True)
class Figure:
    """A plot of the report, drawn on demand (matplotlib is optional: without it the report
    has tables only and says so).

    Attributes:
        name: file stem, unique within the experiment (``"error-vs-k"`` gives
            ``error-vs-k.png`` and ``.svg``).
        caption: one or two sentences under the plot: what is shown and how to read it.
        draw: fills the given matplotlib figure (create axes with ``fig.add_subplot``).
    """

    name: str
    caption: str
    draw: Callable[[MplFigure], None]


@dataclass(frozen=True)
class Verdict:
    """Whether the claim held at this run's size.

    Attributes:
        held: ``True``, ``False``, or ``None`` when this size cannot decide (say why in
            ``text``; e.g. the tiny scale).
        text: one or two sentences: our number with its error bar against the published one,
            and, when it did not hold, what was tried.
    """

    held: bool | None
    text: str


@dataclass(frozen=True)
class Summary:
    """What :meth:`Experiment.summarize` returns: everything the report shows.

    Attributes:
        verdict: whether the claim held.
        tables: published vs ours and any detail tables.
        figures: plots, each beside the published figure's description in its caption.
        notes: protocol and deviations from the publication (data, epochs, sizes), one
            sentence each.
        metrics: headline numbers for ``results.json`` (name -> number or [mean, se]).
        ours: optional; our headline number(s) with error bars, as short text, for the "ours"
            column of the report's overview beside :attr:`Claim.published`
            (``"1.31 % ± 0.04 %"``); when empty the overview shows the verdict's text.
    """

    verdict: Verdict
    tables: Sequence[Table] = ()
    figures: Sequence[Figure] = ()
    notes: Sequence[str] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)
    ours: str = ""


@dataclass(frozen=True)
class Experiment:
    """One reproduction.

    Attributes:
        name: the command-line name (``dropkit reproduce NAME``), lower-case with dashes.
        title: a heading for the report.
        claim: the published claim checked.
        run_seed: ``run_seed(ctx, seed) -> dict``: one seed's full run; JSON-serialisable.
            Must be deterministic given ``(ctx.scale, ctx.data_dir, seed)``: seed torch
            (``torch.manual_seed``) and dropkit (``dropkit.manual_seed``) from ``seed``.
        summarize: ``summarize(ctx, results) -> Summary`` from every seed's result (in seed
            order); pure, no training.
        default_seeds: seeds per scale when ``--seeds`` is not given: ``{"tiny": 1, ...}``.
        data: the data sets used, for the report (``("mnist or digits",)``).
    """

    name: str
    title: str
    claim: Claim
    run_seed: Callable[[RunContext, int], dict[str, Any]]
    summarize: Callable[[RunContext, Sequence[Mapping[str, Any]]], Summary]
    default_seeds: Mapping[Scale, int] = field(default_factory=lambda: {"tiny": 1, "quick": 2, "full": 5})
    data: Sequence[str] = ()
