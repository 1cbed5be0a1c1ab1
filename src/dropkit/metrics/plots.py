"""Plots for uncertainty evaluation: reliability diagram, uncertainty histograms, regression intervals.

Requires matplotlib (``pip install dropkit[plot]``); it is imported when a function is called, so
``import dropkit.metrics.plots`` works without it. Figures are built with
:class:`matplotlib.figure.Figure` directly — no pyplot, no global figure state, no backend
switch, safe in threads and headless jobs. Each function writes one file and returns its path;
the format follows the extension: ``.png``, ``.pdf`` or ``.svg``. Parent directories must exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dropkit._validation import check_floating_tensor, check_int, check_nonnegative
from dropkit.metrics.calibration import _calibration_compute, _calibration_update, _check_binning
from dropkit.metrics.calibration import _reliability_compute as _reliability

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_regression_intervals",
    "plot_reliability_diagram",
    "plot_uncertainty_histograms",
]

_FORMATS = ("png", "pdf", "svg")


def _new_figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("dropkit.metrics.plots needs matplotlib: pip install 'dropkit[plot]'") from None
    return Figure(figsize=figsize, layout="constrained")


def _check_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    suffix = target.suffix.lower().lstrip(".")
    if suffix not in _FORMATS:
        raise ValueError(f"path must end in .png, .pdf or .svg, got {str(path)!r}")
    if not target.parent.is_dir():
        raise ValueError(f"path's directory does not exist: {str(target.parent)!r}")
    return target


def _save(figure: Figure, target: Path) -> Path:
    # Fixed metadata keeps pdf/svg output byte-stable across runs (no creation date).
    suffix = target.suffix.lower().lstrip(".")
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[suffix]
    figure.savefig(target, format=suffix, metadata=metadata)
    return target


def _check_1d(values: object, name: str, length: int | None = None) -> torch.Tensor:
    tensor = check_floating_tensor(values, name)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(tensor.shape)}")
    if length is not None and tensor.numel() != length:
        raise ValueError(f"{name} must have shape ({length},) like x, got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(tensor)).sum())} NaN/inf entries")
    return tensor.detach().cpu().double()


def plot_reliability_diagram(
    probs: torch.Tensor,
    labels: torch.Tensor,
    path: str | os.PathLike[str],
    n_bins: int = 15,
    binning: str = "uniform",
    title: str | None = None,
) -> Path:
    """Reliability diagram: per-bin accuracy against confidence, with the gap and a count histogram.

    Bars show the accuracy of each non-empty bin over its ``(edges[b], edges[b+1]]`` interval
    (adaptive bins: the outer bars end at the lowest and highest confidence), the
    red hatched part the gap to the bin's mean confidence, the dashed diagonal perfect calibration;
    the legend reports the ECE (:func:`~dropkit.metrics.calibration.expected_calibration_error`)
    with the bins used. A lower panel shows how many inputs fall in each bin.

    Args:
        probs: predictive probabilities, shape ``(N, C)`` (the MC predictive mean for MC dropout).
        labels: integer class indices, shape ``(N,)``.
        path: output file, ``.png``, ``.pdf`` or ``.svg``.
        n_bins: number of bins requested, ``>= 1``.
        binning: ``"uniform"`` or ``"adaptive"``, see :mod:`dropkit.metrics.calibration`.
        title: optional axes title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Examples::

        >>> import tempfile, pathlib
        >>> from dropkit.metrics.plots import plot_reliability_diagram
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
        >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +SKIP
        ...     out = plot_reliability_diagram(probs, torch.tensor([0, 1, 1, 1]), pathlib.Path(tmp, "r.png"))
    """
    bins, binning = _check_binning(n_bins, binning)
    target = _check_path(path)
    confidence, correct = _calibration_update(probs, labels)
    confidence, correct = confidence.cpu().double(), correct.cpu().double()
    data = _reliability(confidence, correct, bins, binning)
    ece, used = _calibration_compute(confidence, correct, bins, binning, "l1")

    figure = _new_figure((4.8, 5.6))
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    edges = data.edges.numpy().copy()
    if binning == "adaptive" and float(confidence.max()) > float(confidence.min()):
        # Equal-mass bins span [0, 1] by definition; draw the outer bars over the observed range only.
        edges[0], edges[-1] = float(confidence.min()), float(confidence.max())
    filled = (data.counts > 0).numpy()
    left, width = edges[:-1][filled], (edges[1:] - edges[:-1])[filled]
    acc, conf = data.accuracy.numpy()[filled], data.confidence.numpy()[filled]
    top.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    top.bar(
        left,
        conf - acc,
        bottom=acc,
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        hatch="//",
        edgecolor="tab:red",
        label="gap to confidence",
    )
    top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0.0, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("accuracy")
    top.set_title(title if title is not None else "Reliability diagram")
    top.legend(loc="upper left", title=f"ECE = {float(ece):.4f} ({used} {binning} bins)")
    bottom.bar(left, data.counts.numpy()[filled], width=width, align="edge", color="gray", edgecolor="black")
    bottom.set_xlabel("confidence (max predictive probability)")
    bottom.set_ylabel("count")
    return _save(figure, target)


def plot_uncertainty_histograms(
    groups: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    bins: int = 30,
    xlabel: str = "uncertainty (nats)",
    title: str | None = None,
    density: bool = True,
) -> Path:
    """Overlaid histograms of an uncertainty score for several groups of inputs.

    Typical groups: ``{"correct": H[correct], "misclassified": H[wrong]}`` or
    ``{"in-distribution": mi_in, "out-of-distribution": mi_out}``, with scores from
    :mod:`dropkit.metrics.classification`. All groups share the same bin edges (``bins`` equal
    bins over the pooled range), so the shapes are comparable.

    Args:
        groups: label -> 1-D floating tensor of scores (at least one non-empty group).
        path: output file, ``.png``, ``.pdf`` or ``.svg``.
        bins: number of histogram bins, ``>= 1``.
        xlabel: x-axis label (name the score and its unit).
        title: optional axes title.
        density: normalize each histogram to unit area (default), so groups of different sizes
            compare; ``False`` plots raw counts.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Examples::

        >>> from dropkit.metrics.plots import plot_uncertainty_histograms
        >>> groups = {"correct": torch.rand(100) * 0.3, "misclassified": torch.rand(20)}
        >>> plot_uncertainty_histograms(groups, "entropy.png")  # doctest: +SKIP
        PosixPath('entropy.png')
    """
    if not isinstance(groups, Mapping) or len(groups) == 0:
        raise ValueError(f"groups must be a non-empty mapping of label -> scores, got {groups!r}")
    n_bins = check_int(bins, "bins", 1)
    if not isinstance(density, bool):
        raise TypeError(f"density must be a bool, got {type(density).__name__} ({density!r})")
    target = _check_path(path)
    values = {str(label): _check_1d(scores, f"groups[{label!r}]") for label, scores in groups.items()}
    pooled = torch.cat(list(values.values()))
    low, high = float(pooled.min()), float(pooled.max())
    if high <= low:  # every score equal: a unit-wide range around it
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, n_bins + 1, dtype=torch.float64).tolist()

    figure = _new_figure((5.6, 3.6))
    axes = figure.subplots()
    for label, scores in values.items():
        axes.hist(
            scores.numpy(),
            bins=edges,
            density=density,
            histtype="stepfilled",
            alpha=0.4,
            edgecolor="black",
            label=f"{label} (n={scores.numel()})",
        )
    axes.set_xlabel(xlabel)
    axes.set_ylabel("density" if density else "count")
    if title is not None:
        axes.set_title(title)
    axes.legend()
    return _save(figure, target)


def plot_regression_intervals(
    x: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    path: str | os.PathLike[str],
    k: float = 2.0,
    title: str | None = None,
) -> Path:
    """Predictive mean and a ``mean ± k·std`` band against a 1-D input, with the observations.

    The points are sorted by ``x`` before drawing the line and band. ``std`` is the predictive
    standard deviation (SD, not a standard error): for MC dropout regression
    ``sqrt(1/τ + mean_t ŷ_t² - ŷ²)``. The legend reports the fraction of ``y`` inside the band
    (empirical coverage; ``k = 2`` covers about 95.4 % under a Gaussian predictive).

    Args:
        x: inputs, shape ``(N,)``.
        y: observed targets, shape ``(N,)``.
        mean: predictive means, shape ``(N,)``.
        std: predictive standard deviations, shape ``(N,)``, ``>= 0``.
        path: output file, ``.png``, ``.pdf`` or ``.svg``.
        k: half-width of the band in standard deviations, ``>= 0``.
        title: optional axes title.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Examples::

        >>> from dropkit.metrics.plots import plot_regression_intervals
        >>> x = torch.linspace(-3, 3, 50)
        >>> plot_regression_intervals(x, x.sin(), x.sin(), 0.1 + 0.05 * x.abs(), "fit.pdf")  # doctest: +SKIP
        PosixPath('fit.pdf')
    """
    xs = _check_1d(x, "x")
    ys, means, stds = (_check_1d(v, name, xs.numel()) for v, name in ((y, "y"), (mean, "mean"), (std, "std")))
    if bool((stds < 0).any()):
        raise ValueError(f"std must be >= 0, got a minimum of {float(stds.min()):.6g}")
    half_width = check_nonnegative(k, "k")
    target = _check_path(path)
    order = xs.argsort()
    xs, ys, means, stds = xs[order], ys[order], means[order], stds[order]
    lower, upper = means - half_width * stds, means + half_width * stds
    coverage = float(((ys >= lower) & (ys <= upper)).double().mean())

    figure = _new_figure((6.4, 4.0))
    axes = figure.subplots()
    axes.fill_between(
        xs.numpy(),
        lower.numpy(),
        upper.numpy(),
        color="tab:blue",
        alpha=0.25,
        label=f"mean ± {half_width:g}·std (covers {100 * coverage:.1f} %)",
    )
    axes.plot(xs.numpy(), means.numpy(), color="tab:blue", label="predictive mean")
    axes.scatter(xs.numpy(), ys.numpy(), s=10, color="black", zorder=3, label="observed")
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    if title is not None:
        axes.set_title(title)
    axes.legend()
    return _save(figure, target)
