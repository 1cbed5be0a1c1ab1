r"""``sweep``: train at several dropout rates and seeds, and report the curve with error bars.

For every rate and seed, :func:`sweep` seeds torch and dropkit (:func:`torch.manual_seed`,
:func:`dropkit.manual_seed`), calls ``train_fn(rate, seed)`` (plus ``budget``, when given:
epochs, steps or seconds, whatever the user's function reads) and scores the result with
``eval_fn``.  Per rate it reports the mean over seeds, the standard deviation (with Bessel's
correction) and the standard error :math:`s/\sqrt{n}`; the best rate; and the rates whose mean
lies within one standard error of the best (the "one standard error rule": among them, the
smallest rate is the most conservative choice).

Srivastava et al. (2014, Fig. 9) found the test error flat for retain probabilities 0.4-0.8
with fixed layer sizes, so a short sweep over a few rates at a small budget is usually enough
to find the plateau.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dropkit._validation import check_probability
from dropkit.engine.streams import manual_seed

__all__ = ["SweepPoint", "SweepResult", "sweep"]


@dataclass(frozen=True)
class SweepPoint:
    """The scores at one rate.

    Attributes:
        rate: the dropout rate.
        values: one score per seed, in the order of the seeds.
        mean: their mean.
        std: their standard deviation (Bessel-corrected; 0 for one seed).
        sem: the standard error of the mean, ``std / sqrt(len(values))``.
    """

    rate: float
    values: tuple[float, ...]
    mean: float
    std: float
    sem: float


@dataclass(frozen=True)
class SweepResult:
    """The curve of a :func:`sweep`.

    Attributes:
        points: one :class:`SweepPoint` per rate, in the order given.
        seeds: the seeds.
        budget: the budget passed to ``train_fn`` (``None``: none).
        minimize: whether a lower score is better.
        best_rate: the rate with the best mean score.
        within_one_se: the rates whose mean is within one standard error of the best mean.
    """

    points: tuple[SweepPoint, ...]
    seeds: tuple[int, ...]
    budget: Any
    minimize: bool
    best_rate: float
    within_one_se: tuple[float, ...]

    def table(self) -> str:
        """A text table: rate, mean, std, sem, and a mark at the best rate."""
        lines = ["    rate        mean         std         sem"]
        for point in self.points:
            mark = "  <- best" if point.rate == self.best_rate else ""
            lines.append(f"{point.rate:8.3g}{point.mean:12.4g}{point.std:12.4g}{point.sem:12.4g}{mark}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "points": [
                {"rate": p.rate, "values": list(p.values), "mean": p.mean, "std": p.std, "sem": p.sem}
                for p in self.points
            ],
            "seeds": list(self.seeds),
            "budget": self.budget
            if isinstance(self.budget, (int, float, str, type(None)))
            else repr(self.budget),
            "minimize": self.minimize,
            "best_rate": self.best_rate,
            "within_one_se": list(self.within_one_se),
        }


def _score(value: object, rate: float, seed: int) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"eval_fn must return a finite number, got {value!r} at rate={rate}, seed={seed}")
    return float(value)


def sweep(
    train_fn: Callable[..., Any],
    eval_fn: Callable[[Any], float],
    rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.5),
    *,
    seeds: Sequence[int] = (0, 1, 2),
    budget: Any = None,
    minimize: bool = True,
) -> SweepResult:
    """Train at each rate with each seed, score each model, and report the curve.

    Args:
        train_fn: ``train_fn(rate, seed)`` (or ``train_fn(rate, seed, budget)`` when ``budget``
            is given) builds and trains a model with dropout rate ``rate`` and returns it (or
            anything ``eval_fn`` takes).
        eval_fn: scores what ``train_fn`` returned: a finite number (a 1-element tensor is
            accepted), e.g. validation error or NLL.
        rates: the rates to try, each in ``[0, 1]``, no repeats.
        seeds: the seeds, at least one, no repeats.
        budget: passed to ``train_fn`` as its third argument when not ``None``.
        minimize: a lower score is better (``False``: higher is better, e.g. accuracy).

    Returns:
        A :class:`SweepResult`.

    Raises:
        ValueError: a rate outside ``[0, 1]``, no rates or seeds, repeats, or a score that is
            not a finite number.
        TypeError: ``train_fn`` / ``eval_fn`` not callable, a seed that is not an int.

    Example::

        >>> def train(rate, seed):
        ...     return rate
        >>> def evaluate(rate):
        ...     return (rate - 0.3) ** 2
        >>> result = sweep(train, evaluate, rates=(0.1, 0.3, 0.5), seeds=(0,))
        >>> result.best_rate
        0.3
    """
    if not callable(train_fn) or not callable(eval_fn):
        raise TypeError("train_fn and eval_fn must be callable")
    checked = [check_probability(rate, "rates") for rate in rates]
    if not checked or len(set(checked)) != len(checked):
        raise ValueError(f"rates must be a non-empty sequence without repeats, got {list(rates)}")
    seed_list = list(seeds)
    for seed in seed_list:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seeds must be ints, got {seed!r}")
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds must be a non-empty sequence without repeats, got {seed_list}")
    if not isinstance(minimize, bool):
        raise TypeError(f"minimize must be a bool, got {type(minimize).__name__}")
    points = []
    for rate in checked:
        values = []
        for seed in seed_list:
            torch.manual_seed(seed)
            manual_seed(seed)
            trained = train_fn(rate, seed) if budget is None else train_fn(rate, seed, budget)
            values.append(_score(eval_fn(trained), rate, seed))
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        points.append(SweepPoint(rate, tuple(values), mean, std, std / math.sqrt(len(values))))
    sign = 1.0 if minimize else -1.0
    best = min(points, key=lambda point: sign * point.mean)
    within = tuple(point.rate for point in points if sign * (point.mean - best.mean) <= best.sem)
    return SweepResult(tuple(points), tuple(seed_list), budget, minimize, best.rate, within)
