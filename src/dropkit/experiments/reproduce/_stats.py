"""Statistics over seeds shared by the ``dropkit reproduce`` experiments.

Every experiment reports ``mean ± SE`` over seeds (the sample standard deviation, ``ddof = 1``,
over ``sqrt(n)``; no SE from one seed) and decides a paired difference as *resolved* when it is
further than :data:`SIGNIFICANCE` standard errors from zero.  The experiments were written
separately and differ in small numerical details (how the mean is summed, whether a spread
that is only float rounding counts as zero); those details are keyword arguments here, so each
experiment keeps its numbers and verdicts exactly.

Example:
    >>> mean, se = mean_se([1.0, 2.0, 3.0])
    >>> mean, round(se, 6)
    (2.0, 0.57735)
    >>> mean_se([4.0])
    (4.0, nan)
    >>> resolved_sign(paired_differences([1.3, 1.4, 1.5], [1.0, 1.0, 1.0]))
    1
    >>> format_cell([0.0125, 0.0131], scale=100.0), format_cell([0.02], scale=100.0)
    ('1.28 ± 0.03', '2.00')
    >>> json_pair([1.0, 3.0]), json_pair([4.0])
    ([2.0, 1.0], [4.0, None])

An experiment that departs from the defaults binds its details once in a :class:`SeedStats`
(:data:`BUILTIN_SUM` for those that add with the builtin :func:`sum`) and calls its methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dropkit.experiments._console import format_mean_se, format_number

__all__ = [
    "BUILTIN_SUM",
    "SIGNIFICANCE",
    "SeedStats",
    "Summation",
    "count",
    "format_cell",
    "json_pair",
    "json_metric",
    "mean_se",
    "paired_differences",
    "resolved_sign",
    "seeds",
]

#: How many standard errors separate a difference from zero before it counts as resolved.
SIGNIFICANCE = 2.0

#: How :func:`mean_se` adds up: ``"fsum"`` (:func:`math.fsum`, exact), ``"sum"`` (the builtin,
#: left to right) or ``"numpy"`` (``np.mean`` and ``np.std(ddof=1)``).
Summation = Literal["fsum", "sum", "numpy"]


def mean_se(
    values: Sequence[float],
    *,
    summation: Summation = "fsum",
    zero_relative: float = 0.0,
    exact_when_equal: bool = False,
) -> tuple[float, float]:
    """Mean and standard error over seeds (``std(ddof=1) / sqrt(n)``); NaN SE for one value.

    Args:
        values: one number per seed, at least one.
        summation: how sums are formed (see :data:`Summation`).
        zero_relative: an SE ``<= zero_relative * |mean|`` is reported as 0.0 (equal values
            computed along different paths differ by rounding only); 0 keeps every SE.
        exact_when_equal: all values equal gives ``(values[0], 0.0)`` with no rounding residue.

    Raises:
        ValueError: ``values`` is empty.

    Example:
        >>> mean_se([1.0, 3.0])
        (2.0, 1.0)
        >>> mean_se([0.0634 - 0.0544, 0.0701 - 0.0611], zero_relative=1e-12)[1]
        0.0
        >>> mean_se([0.004] * 3, exact_when_equal=True)
        (0.004, 0.0)
        >>> mean_se([1.0, 3.0], summation="numpy")
        (2.0, 1.0)
        >>> mean_se([])
        Traceback (most recent call last):
        ...
        ValueError: values must hold at least one number, got an empty sequence
    """
    n = len(values)
    if n == 0:
        raise ValueError("values must hold at least one number, got an empty sequence")
    if summation == "numpy":
        array = np.asarray(values, dtype=np.float64)
        mean = float(array.mean())
        if n < 2:
            return mean, math.nan
        se = float(array.std(ddof=1) / math.sqrt(n))
    else:
        add = math.fsum if summation == "fsum" else sum
        mean = add(values) / n
        if n < 2:
            return mean, math.nan
        if exact_when_equal and all(v == values[0] for v in values):
            return values[0], 0.0
        se = math.sqrt(add((v - mean) ** 2 for v in values) / (n - 1) / n)
    if zero_relative > 0.0 and se <= zero_relative * abs(mean):
        return mean, 0.0
    return mean, se


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a - b`` seed by seed (both measured on the same seeds, in the same order).

    Example:
        >>> paired_differences([3.0, 5.0], [1.0, 1.5])
        [2.0, 3.5]
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must have one value per seed each, got {len(a)} and {len(b)}")
    return [float(x) - float(y) for x, y in zip(a, b, strict=True)]


def resolved_sign(
    values: Sequence[float],
    *,
    margin: float = 0.0,
    floor: float | None = None,
    significance: float = SIGNIFICANCE,
    zero_relative: float = 0.0,
    exact_when_equal: bool = False,
) -> int | None:
    """The sign of a difference measured once per seed, when its error bar resolves it.

    ``1`` when ``mean - significance * SE > margin``, ``-1`` when
    ``mean + significance * SE < -margin``, ``0`` when neither and ``None`` for a single value
    (no error bar over seeds).  With ``floor`` the error bar is ``hypot(SE, floor)``: a noise
    that seeds do not average away, such as that of a test set every seed shares.  The other
    keywords go to :func:`mean_se`.

    Example:
        >>> resolved_sign([0.3, 0.4, 0.5]), resolved_sign([0.3, -0.4]), resolved_sign([1.0])
        (1, 0, None)
        >>> resolved_sign([-0.3, -0.4, -0.5]), resolved_sign([0.3, 0.4, 0.5], floor=0.2)
        (-1, 0)
        >>> resolved_sign([1.0, 1.1, 0.9], margin=2.0)
        0
    """
    mean, se = mean_se(values, zero_relative=zero_relative, exact_when_equal=exact_when_equal)
    if math.isnan(se):
        return None
    if floor is not None:
        se = math.hypot(se, floor)
    if mean - significance * se > margin:
        return 1
    if mean + significance * se < -margin:
        return -1
    return 0


def format_cell(
    values: Sequence[float],
    *,
    scale: float = 1.0,
    digits: int = 3,
    zero_se_below: float = 0.0,
    summation: Summation = "fsum",
    zero_relative: float = 0.0,
    exact_when_equal: bool = False,
) -> str:
    """A table cell: ``mean ± SE`` of ``values * scale`` via
    :func:`~dropkit.experiments._console.format_mean_se` (just the mean from one value).

    ``zero_se_below`` shows an SE ``<= zero_se_below * max(1, |mean|)`` as 0 (identical values
    that differ by rounding only); the other keywords go to :func:`mean_se`.

    Example:
        >>> format_cell([1.0, 3.0]), format_cell([0.5]), format_cell([0.5], digits=2)
        ('2.0 ± 1.0', '0.500', '0.50')
        >>> format_cell([0.1, 0.1 + 1e-12], zero_se_below=1e-9)
        '0.100 ± 0.000'
    """
    mean, se = mean_se(
        [v * scale for v in values],
        summation=summation,
        zero_relative=zero_relative,
        exact_when_equal=exact_when_equal,
    )
    if math.isnan(se):
        return format_number(mean, digits)
    if zero_se_below > 0.0 and se <= zero_se_below * max(1.0, abs(mean)):
        se = 0.0
    return format_mean_se(mean, se, digits)


def json_pair(
    values: Sequence[float],
    *,
    summation: Summation = "fsum",
    zero_relative: float = 0.0,
    exact_when_equal: bool = False,
) -> list[float | None]:
    """``[mean, se]`` for ``results.json`` (``None`` for the SE that one seed cannot give).

    Example:
        >>> json_pair([1.0, 3.0]), json_pair([4.0])
        ([2.0, 1.0], [4.0, None])
    """
    mean, se = mean_se(
        values, summation=summation, zero_relative=zero_relative, exact_when_equal=exact_when_equal
    )
    return [mean, None if math.isnan(se) else se]


@dataclass(frozen=True)
class SeedStats:
    """:func:`mean_se`, :func:`format_cell` and :func:`json_pair` with one experiment's numerical
    details bound, so that its tables, verdicts and ``results.json`` agree.

    Attributes:
        summation, zero_relative, exact_when_equal: as in :func:`mean_se`, for every method.
        zero_se_below: as in :func:`format_cell`, for :meth:`cell` only.

    Example:
        >>> stats = SeedStats(summation="sum", zero_se_below=1e-9)
        >>> stats.mean_se([1.0, 3.0]), stats.json_pair([4.0])
        ((2.0, 1.0), [4.0, None])
        >>> stats.cell([0.1, 0.1 + 1e-12]), stats.cell([0.0125, 0.0131], scale=100.0)
        ('0.100 ± 0.000', '1.28 ± 0.03')
    """

    summation: Summation = "fsum"
    zero_relative: float = 0.0
    exact_when_equal: bool = False
    zero_se_below: float = 0.0

    def mean_se(self, values: Sequence[float]) -> tuple[float, float]:
        """:func:`mean_se` of ``values``."""
        return mean_se(
            values,
            summation=self.summation,
            zero_relative=self.zero_relative,
            exact_when_equal=self.exact_when_equal,
        )

    def cell(self, values: Sequence[float], *, scale: float = 1.0, digits: int = 3) -> str:
        """:func:`format_cell` of ``values``."""
        return format_cell(
            values,
            scale=scale,
            digits=digits,
            zero_se_below=self.zero_se_below,
            summation=self.summation,
            zero_relative=self.zero_relative,
            exact_when_equal=self.exact_when_equal,
        )

    def json_pair(self, values: Sequence[float]) -> list[float | None]:
        """:func:`json_pair` of ``values``."""
        return json_pair(
            values,
            summation=self.summation,
            zero_relative=self.zero_relative,
            exact_when_equal=self.exact_when_equal,
        )


#: Sums formed with the builtin :func:`sum`, left to right (``adaptive-l2``, ``alpha-selu``,
#: ``variance-shift``); every other detail at its default.
BUILTIN_SUM = SeedStats(summation="sum")


def json_metric(values: Sequence[float]) -> float | list[float]:
    """A metric for ``results.json``: ``[mean, se]``, or the mean alone from one seed.

    Example:
        >>> json_metric([1.0, 3.0]), json_metric([4.0])
        ([2.0, 1.0], 4.0)
    """
    mean, se = mean_se(values)
    return mean if math.isnan(se) else [mean, se]


def count(n: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``.

    Example:
        >>> count(1, "seed"), count(3, "layer")
        ('1 seed', '3 layers')
    """
    return f"{n} {noun}{'s' if n != 1 else ''}"


def seeds(n: int) -> str:
    """``count(n, "seed")``."""
    return count(n, "seed")
