"""Figure helpers shared by the ``dropkit reproduce`` experiments: mean ± SE over seeds as
error bars or bands (matplotlib is imported by the caller's ``draw``; nothing here imports it).

Example:
    >>> means_and_bars([[1.0, 3.0], [4.0]])
    ([2.0, 4.0], [1.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dropkit.experiments.reproduce._stats import mean_se

__all__ = ["bar_heights", "errorbar", "means_and_bars"]


def bar_heights(stats: Sequence[tuple[float, float]]) -> list[float]:
    """The SEs of ``(mean, se)`` pairs as error-bar lengths (0 where one seed gives none).

    Example:
        >>> bar_heights([(1.0, 0.5), (2.0, float("nan"))])
        [0.5, 0.0]
    """
    return [0.0 if se != se else se for _, se in stats]


def means_and_bars(
    series: Sequence[Sequence[float]], *, scale: float = 1.0, zero_relative: float = 0.0
) -> tuple[list[float], list[float]]:
    """Per point, the mean over seeds of ``values * scale`` and its SE as an error-bar length
    (0 from one seed); ``zero_relative`` goes to :func:`~._stats.mean_se`."""
    stats = [mean_se([v * scale for v in values], zero_relative=zero_relative) for values in series]
    return [m for m, _ in stats], bar_heights(stats)


def errorbar(
    ax: Any,
    x: Sequence[float],
    series: Sequence[Sequence[float]],
    label: str,
    *,
    scale: float = 1.0,
    zero_relative: float = 0.0,
) -> None:
    """Plot mean ± SE over seeds at each ``x`` (``series[i]``: one value per seed) on ``ax``."""
    means, bars = means_and_bars(series, scale=scale, zero_relative=zero_relative)
    ax.errorbar(x, means, yerr=bars, marker="o", capsize=3, label=label)
