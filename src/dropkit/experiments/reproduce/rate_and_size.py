"""``rate-and-size``: test error against the retain probability and the training-set size.

Srivastava et al. (JMLR 2014), §7.3-7.4, Fig. 9 and Fig. 10, on MNIST:

* Fig. 9a, layer widths ``n`` fixed, retain probability ``q`` of the hidden units varied (no
  input dropout): the test error is flat for ``0.4 <= q <= 0.8`` and rises for small ``q``.
* Fig. 9b, ``q * n`` fixed (a smaller ``q`` gets wider layers): the optimum is near ``q = 0.6``.
* Fig. 10, training sets of 100 ... 50,000 examples, with and without dropout (retain 0.8
  input, 0.5 hidden): on 100 and 500 examples dropout gives no gain; on larger sets it does.

The experiment runs the three sweeps on a coarse grid with the MLP and SGD schedule of
``mnist-mlp`` (:mod:`.mnist_mlp`), on MNIST with ``--data`` and on scikit-learn's digits without.
Each sweep shares one training subset per seed; the size sweep draws a stratified subset of each
size with the seed, and trains every size for the same number of updates.  The claim holds when
all four parts of :data:`CLAIMS` hold (the fourth, a gain on the largest set, is the contrast of
Fig. 10 that keeps "no gain on small sets" from passing with a dropout that does nothing).

Scales (MNIST with ``--data``; the digits without; two hidden layers unless noted):

* ``tiny``: width 32 (q·n = 16), q in {0.4, 0.8, 1}, 500 training images for 10 epochs (MNIST:
  5), sizes 100 and 500 for 60 updates (MNIST: 30).
* ``quick``: MNIST: width 256 (q·n = 128), q in {0.2, 0.4, 0.6, 0.8, 1}, 3,000 training images
  for 15 epochs, sizes 100, 500, 2,000 and 10,000 for 400 updates each; digits: width 128
  (q·n = 64), all 1,257 images for 40 epochs, sizes 100, 500 and 1,257 for 600 updates.
* ``full``: MNIST: width 512 (q·n = 256, as in the paper's first two layers), q = 0.1 ... 1 in
  steps of 0.1, 20,000 training images for 30 epochs, sizes 100, 500, 1,000, 5,000, 10,000 and
  50,000 for 10,000 updates each; the paper's networks have three wider layers (2,048 units,
  or 1,024-1,024-2,048 for the size sweep), a reduction that keeps a seed to about 45 minutes
  of one CPU thread (not run here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import dropkit
from dropkit.experiments._console import format_mean_se, format_number
from dropkit.experiments.reproduce import _plots
from dropkit.experiments.reproduce.api import (
    Claim,
    Experiment,
    Figure,
    RunContext,
    Summary,
    Table,
    Verdict,
)
from dropkit.experiments.reproduce.data import ImageSet, load_mnist_or_digits, subsample
from dropkit.experiments.reproduce.mnist_mlp import (
    LEARNING_RATES,
    ZERO_RELATIVE,
    SGDSchedule,
    build_mlp,
    data_note,
    flat,
    format_percent,
    mean_paired_se,
    mean_se,
    misclassified,
    resolved_sign,
    run_label,
    scale_note,
    train_sgd,
)

__all__ = ["EXPERIMENT", "FLAT_MARGIN", "RateSizeProtocol", "protocol", "run_seed", "summarize", "verdict"]

#: "Flat" allows this relative excess of any q in 0.4-0.8 over the best of them (Fig. 9a varies
#: by about a tenth of its level between q = 0.4 and 0.8).
FLAT_MARGIN = 0.10
#: The range of q in which Fig. 9a is flat, and in which Fig. 9b has its optimum (0.6 ± 0.2).
FLAT_RANGE = (0.4, 0.8)
OPTIMUM = 0.6
#: ``eps`` of every network of the two rate sweeps, so that they vary q only: between the
#: pilot's best without dropout (1) and with dropout (3) of :data:`.mnist_mlp.LEARNING_RATES`
#: (3 made the nets with little dropout, q = 0.8, unstable).  The size sweep uses those two.
RATE_SWEEP_LR = 2.0
BATCH_SIZE = SGDSchedule(epochs=1, lr=1.0, lr_decay=1.0).batch_size
#: Training-set sizes on which Fig. 10 shows no gain from dropout.
SMALL_SIZES = (100, 500)
CLAIMS = (
    "flat for 0.4 <= q <= 0.8 (n fixed)",
    "optimum near q = 0.6 (q·n fixed)",
    "no gain on 100 and 500 examples",
    "a gain on the largest training set",
)


@dataclass(frozen=True)
class RateSizeProtocol:
    """Grid, network and schedule of one scale.

    Attributes:
        n_train: training examples of the two rate sweeps (``None``: the whole split).
        n_test: test examples (``None``: the whole test split).
        width: hidden width ``n`` of the fixed-``n`` sweep.
        qn: ``q * n`` of the fixed-``q * n`` sweep.
        depth: number of hidden layers.
        q: retain probabilities of the hidden units.
        sizes: training-set sizes (capped at the data's training split).
        size_width: hidden width of the size sweep.
        epochs: epochs of the rate sweeps.
        updates: updates per run of the size sweep.
    """

    n_train: int | None
    n_test: int | None
    width: int
    qn: int
    depth: int
    q: tuple[float, ...]
    sizes: tuple[int, ...]
    size_width: int
    epochs: int
    updates: int

    @staticmethod
    def schedule(epochs: int, lr: float) -> SGDSchedule:
        """The SGD schedule of ``mnist-mlp`` for ``epochs`` epochs with ``eps = lr``."""
        return SGDSchedule(
            epochs=epochs, lr=lr, lr_decay=0.1 ** (1.0 / epochs), momentum_epochs=max(1, epochs // 3)
        )


def protocol(ctx: RunContext, images: ImageSet) -> RateSizeProtocol:
    """The protocol of ``ctx.scale`` for ``images``."""
    coarse = (0.2, 0.4, 0.6, 0.8, 1.0)
    fine = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    if images.name == "digits":
        return ctx.pick(
            tiny=RateSizeProtocol(500, None, 32, 16, 2, (0.4, 0.8, 1.0), (100, 500), 32, 10, 60),
            quick=RateSizeProtocol(None, None, 128, 64, 2, coarse, (100, 500, 1257), 128, 40, 600),
            full=RateSizeProtocol(None, None, 256, 128, 2, fine, (100, 250, 500, 1000, 1257), 256, 200, 3000),
        )
    return ctx.pick(
        tiny=RateSizeProtocol(500, 500, 32, 16, 2, (0.4, 0.8, 1.0), (100, 500), 32, 5, 30),
        quick=RateSizeProtocol(3000, None, 256, 128, 2, coarse, (100, 500, 2000, 10_000), 256, 15, 400),
        full=RateSizeProtocol(
            20_000, None, 512, 256, 2, fine, (100, 500, 1000, 5000, 10_000, 50_000), 512, 30, 10_000
        ),
    )


def _train(
    ctx: RunContext,
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: Sequence[int],
    input_retain: float,
    hidden_retain: float,
    schedule: SGDSchedule,
    seed: int,
    label: str,
) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    dropkit.manual_seed(seed)
    model = build_mlp(x.shape[1], hidden, 10, input_retain=input_retain, hidden_retain=hidden_retain)
    train_sgd(model, x, y, schedule, seed=seed, label=f"{ctx.label} {label}".strip(), progress=ctx.progress)
    return model


def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
    """The three sweeps for one seed."""
    images = load_mnist_or_digits(ctx)
    p = protocol(ctx, images)
    rate_set = subsample(images, p.n_train, p.n_test, seed=seed)
    x_train, y_train, x_test, y_test = flat(rate_set)
    sweeps: dict[str, dict[str, list[Any]]] = {}
    for sweep in ("fixed_n", "fixed_qn"):
        widths = [p.width if sweep == "fixed_n" else round(p.qn / q) for q in p.q]
        wrong: list[list[int]] = []
        for q, width in zip(p.q, widths, strict=True):
            model = _train(
                ctx,
                x_train,
                y_train,
                [width] * p.depth,
                1.0,
                q,
                p.schedule(p.epochs, RATE_SWEEP_LR),
                seed,
                f"{sweep} q={q:g}",
            )
            wrong.append(misclassified(model, x_test, y_test))
        sweeps[sweep] = {
            "q": list(p.q),
            "width": [float(w) for w in widths],
            "test_error": [len(w) / len(y_test) for w in wrong],
            "wrong": wrong,
        }
    sizes = [n for n in p.sizes if n <= len(images.y_train)]
    by_size: dict[str, Any] = {"n": [float(n) for n in sizes], "no dropout": [], "dropout": []}
    by_size_wrong: dict[str, list[list[int]]] = {"no dropout": [], "dropout": []}
    for n in sizes:
        subset = subsample(images, n, p.n_test, seed=seed)
        x_n, y_n, x_test_n, y_test_n = flat(subset)
        epochs = max(1, math.ceil(p.updates / math.ceil(n / BATCH_SIZE)))
        for name, (input_retain, hidden_retain) in (("no dropout", (1.0, 1.0)), ("dropout", (0.8, 0.5))):
            model = _train(
                ctx,
                x_n,
                y_n,
                [p.size_width] * p.depth,
                input_retain,
                hidden_retain,
                p.schedule(epochs, LEARNING_RATES[name]),
                seed,
                f"{name} n={n}",
            )
            wrong_n = misclassified(model, x_test_n, y_test_n)
            by_size[name].append(len(wrong_n) / len(y_test_n))
            by_size_wrong[name].append(wrong_n)
    by_size["wrong"] = by_size_wrong
    return {
        "data": images.name,
        "source": images.source,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "depth": p.depth,
        "epochs": p.epochs,
        "updates": p.updates,
        "size_width": p.size_width,
        "fixed_n": sweeps["fixed_n"],
        "fixed_qn": sweeps["fixed_qn"],
        "sizes": by_size,
    }


# ---------------------------------------------------------------------------------------------
# Summary


def _curve(results: Sequence[Mapping[str, Any]], sweep: str, key: str = "test_error") -> list[list[float]]:
    """``[point][seed]`` values of a sweep."""
    return [list(values) for values in zip(*(r[sweep][key] for r in results), strict=True)]


def _floor(
    results: Sequence[Mapping[str, Any]], wrong: Callable[[Mapping[str, Any]], tuple[Any, Any]]
) -> float:
    """Test-set noise of a difference of two errors, averaged over seeds (:func:`mean_paired_se`);
    ``wrong(record)`` gives the two models' misclassified indices."""
    return mean_paired_se([wrong(r) for r in results], int(results[0]["n_test"]))


def _sweep_pair(sweep: str, i: int, j: int) -> Callable[[Mapping[str, Any]], tuple[Any, Any]]:
    """The misclassified indices of points ``i`` and ``j`` of a rate sweep, from a record."""

    def pair(record: Mapping[str, Any]) -> tuple[Any, Any]:
        return record[sweep]["wrong"][i], record[sweep]["wrong"][j]

    return pair


def _flat(results: Sequence[Mapping[str, Any]]) -> tuple[bool | None, str]:
    q = results[0]["fixed_n"]["q"]
    errors = _curve(results, "fixed_n")
    inside = [i for i, value in enumerate(q) if FLAT_RANGE[0] - 1e-9 <= value <= FLAT_RANGE[1] + 1e-9]
    if len(inside) < 2:
        return None, "the grid has fewer than two q in 0.4-0.8"
    means = [mean_se(errors[i])[0] for i in inside]
    best = inside[min(range(len(inside)), key=means.__getitem__)]
    best_mean = mean_se(errors[best])[0]
    excess = {i: [a - b for a, b in zip(errors[i], errors[best], strict=True)] for i in inside if i != best}
    signs = {
        i: resolved_sign(d, FLAT_MARGIN * best_mean, _floor(results, _sweep_pair("fixed_n", i, best)))
        for i, d in excess.items()
    }
    spread = 100.0 * (max(means) - min(means))
    text = (
        f"spread {format_number(spread)} pp over q = {', '.join(f'{q[i]:g}' for i in inside)} "
        f"(best {format_percent(errors[best])} % at q = {q[best]:g})"
    )
    if any(sign is None for sign in signs.values()):
        return None, text
    worse = [f"q = {q[i]:g} ({format_percent(excess[i])} pp)" for i, s in signs.items() if s == 1]
    if worse:
        return False, f"{text}; resolved worse by more than {FLAT_MARGIN:.0%}: {', '.join(worse)}"
    return True, text


def _best_q(record: Mapping[str, Any]) -> float:
    """The retain probability with the lowest test error in one seed's fixed-q·n sweep."""
    sweep = record["fixed_qn"]
    errors = sweep["test_error"]
    return float(sweep["q"][min(range(len(errors)), key=errors.__getitem__)])


def _optimum(results: Sequence[Mapping[str, Any]]) -> tuple[bool | None, str]:
    q = results[0]["fixed_qn"]["q"]
    per_seed = [_best_q(r) for r in results]
    mean, se = mean_se(per_seed)
    errors = _curve(results, "fixed_qn")
    curve_best = q[min(range(len(q)), key=lambda i: mean_se(errors[i])[0])]
    text = (
        f"best q per seed {format_number(mean) if math.isnan(se) else format_mean_se(mean, se)}; "
        f"best q of the mean curve {curve_best:g}"
    )
    if math.isnan(se):
        return None, text
    low, high = OPTIMUM - 0.2, OPTIMUM + 0.2
    return bool(low - 1e-9 <= mean <= high + 1e-9), text


def _size_gain(results: Sequence[Mapping[str, Any]], n: float) -> list[float]:
    gains = []
    for r in results:
        index = r["sizes"]["n"].index(n)
        gains.append(float(r["sizes"]["no dropout"][index]) - float(r["sizes"]["dropout"][index]))
    return gains


def _size_sign(results: Sequence[Mapping[str, Any]], n: float) -> int | None:
    """:func:`.mnist_mlp.resolved_sign` of the gain at ``n`` examples, test-set noise included."""

    def wrong(record: Mapping[str, Any]) -> tuple[Any, Any]:
        index = record["sizes"]["n"].index(n)
        pair = record["sizes"]["wrong"]
        return pair["no dropout"][index], pair["dropout"][index]

    return resolved_sign(_size_gain(results, n), floor=_floor(results, wrong))


def _no_small_gain(results: Sequence[Mapping[str, Any]]) -> tuple[bool | None, str]:
    sizes = [n for n in results[0]["sizes"]["n"] if int(n) in SMALL_SIZES]
    if not sizes:
        return None, "no training set of 100 or 500 examples in the grid"
    gains = {n: _size_gain(results, n) for n in sizes}
    text = "; ".join(f"gain at {int(n)}: {format_percent(g)} pp" for n, g in gains.items())
    signs = [_size_sign(results, n) for n in gains]
    if any(sign is None for sign in signs):
        return None, text
    return all(sign != 1 for sign in signs), text


def _large_gain(results: Sequence[Mapping[str, Any]]) -> tuple[bool | None, str]:
    n = results[0]["sizes"]["n"][-1]
    if int(n) in SMALL_SIZES:
        return None, "no training set larger than 500 examples in the grid"
    gain = _size_gain(results, n)
    sign = _size_sign(results, n)
    return (None if sign is None else sign == 1), f"gain at {int(n):,}: {format_percent(gain)} pp"


def _checks(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, bool | None, str]]:
    """``(claim, published, held, ours)`` for each part of the claim."""
    return [
        (CLAIMS[0], "flat (Fig. 9a)", *_flat(results)),
        (CLAIMS[1], "q ≈ 0.6 (Fig. 9b)", *_optimum(results)),
        (CLAIMS[2], "no gain (Fig. 10)", *_no_small_gain(results)),
        (CLAIMS[3], "a gain (Fig. 10)", *_large_gain(results)),
    ]


def verdict(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Verdict:
    """Held when every part of the claim held; see the module and :data:`CLAIMS`."""
    checks = _checks(results)
    ours = "; ".join(f"{claim}: {text}" for claim, _, _, text in checks)
    note = scale_note(ctx)
    if note is not None:
        return Verdict(None, f"Not decided ({note}). Ours: {ours}.")
    if len(results) < 2:
        return Verdict(None, f"Not decided: one seed gives no error bar. Ours: {ours}.")
    held = [h for _, _, h, _ in checks]
    if all(h is True for h in held):
        return Verdict(True, f"Held. Ours: {ours}.")
    failed = [claim for claim, _, h, _ in checks if h is False]
    if not failed:
        return Verdict(None, f"Not decided: the grid cannot test every part. Ours: {ours}.")
    first = results[0]
    tried = (
        f"tried: {first['data']}, {first['n_train']:,} training examples for the rate sweeps, "
        f"q = {', '.join(f'{q:g}' for q in first['fixed_n']['q'])}, sizes "
        f"{', '.join(f'{int(n):,}' for n in first['sizes']['n'])}, {len(results)} seeds"
    )
    return Verdict(False, f"Did not hold: {'; '.join(failed)}. Ours: {ours}; {tried}.")


def _band(ax: Any, x: Sequence[float], per_point: Sequence[Sequence[float]], label: str) -> None:
    _plots.errorbar(ax, x, per_point, label, scale=100.0, zero_relative=ZERO_RELATIVE)


def _draw_rate(results: Sequence[Mapping[str, Any]]) -> Any:
    def draw(fig: Any) -> None:
        for column, (sweep, title) in enumerate(
            (("fixed_n", "n fixed (Fig. 9a)"), ("fixed_qn", "q·n fixed (Fig. 9b)")), start=1
        ):
            ax = fig.add_subplot(1, 2, column)
            _band(ax, results[0][sweep]["q"], _curve(results, sweep), "test error")
            ax.axvspan(*FLAT_RANGE, color="grey", alpha=0.1)
            ax.set_title(title)
            ax.set_xlabel("retain probability q of hidden units")
            ax.set_ylabel("test error (%)")

    return draw


def _draw_size(results: Sequence[Mapping[str, Any]]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        sizes = results[0]["sizes"]["n"]
        for name in ("no dropout", "dropout"):
            per_point = [[float(r["sizes"][name][i]) for r in results] for i in range(len(sizes))]
            _band(ax, sizes, per_point, name)
        ax.set_xscale("log")
        ax.set_xlabel("training examples")
        ax.set_ylabel("test error (%)")
        ax.legend()

    return draw


def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
    """Tables of the three sweeps and of each part of the claim, two figures, the verdict."""
    if not results:
        raise ValueError("results must hold at least one seed's result, got none")
    first = results[0]
    mark = {True: "yes", False: "no", None: "undecided"}
    checks = _checks(results)
    claims = Table(
        title="Each part of the claim",
        columns=("claim", "published", "ours", "held"),
        rows=[(claim, published, text, mark[held]) for claim, published, held, text in checks],
    )
    rate = Table(
        title="Test error (%) against the retain probability q of the hidden units",
        columns=("q", "n fixed: width", "n fixed: error", "q·n fixed: width", "q·n fixed: error"),
        rows=[
            (
                f"{q:g}",
                str(round(first["fixed_n"]["width"][i])),
                format_percent(_curve(results, "fixed_n")[i]),
                str(round(first["fixed_qn"]["width"][i])),
                format_percent(_curve(results, "fixed_qn")[i]),
            )
            for i, q in enumerate(first["fixed_n"]["q"])
        ],
    )
    size = Table(
        title="Test error (%) against the training-set size",
        columns=("examples", "no dropout", "dropout", "gain (pp)"),
        rows=[
            (
                f"{int(n):,}",
                format_percent([r["sizes"]["no dropout"][i] for r in results]),
                format_percent([r["sizes"]["dropout"][i] for r in results]),
                format_percent(_size_gain(results, n)),
            )
            for i, n in enumerate(first["sizes"]["n"])
        ],
    )
    notes = [
        data_note(first),
        f"Rate sweeps: {first['depth']} hidden layers, width {round(first['fixed_n']['width'][0])} "
        f"(n fixed) or q·n = {round(first['fixed_qn']['width'][-1])} (q·n fixed), no input dropout, "
        f"{first['epochs']} epochs; the paper uses 784-2048-2048-2048-10 and q·n = 256, 256, 512.",
        f"Size sweep: {first['depth']} hidden layers of {first['size_width']}, retain 0.8 input / 0.5 hidden "
        f"against no dropout, {first['updates']} updates per run; the paper uses 784-1024-1024-2048-10 "
        "and sizes up to 50,000.",
        f"SGD with momentum 0.5 -> 0.95 and a decaying learning rate (see mnist-mlp), eps {RATE_SWEEP_LR:g} "
        f"for every q in the rate sweeps, {LEARNING_RATES['no dropout']:g} without and "
        f"{LEARNING_RATES['dropout']:g} with dropout in the size sweep; dropout is the paper's "
        "formulation (dropkit.nn.Dropout(inverted=False)).",
        f"'Flat': no q in 0.4-0.8 resolved (2 SE) more than {FLAT_MARGIN:.0%} worse than the best of "
        "them; 'near 0.6': the mean over seeds of each seed's best q within 0.4-0.8; a gain is "
        "resolved when it exceeds 2 SE. Each SE combines the spread over seeds with the noise of the "
        "shared test set (McNemar's, from the examples only one of the two nets gets wrong).",
        f"Seeds: {len(results)}; mean ± SE over seeds.",
    ]
    note = scale_note(ctx)
    if note is not None:
        notes.append(note[0].upper() + note[1:] + ".")
    metrics: dict[str, Any] = {}
    for n in first["sizes"]["n"]:
        metrics[f"gain_pp[n={int(n)}]"] = list(mean_se([100.0 * g for g in _size_gain(results, n)]))
    metrics["best_q[q·n fixed]"] = list(mean_se([_best_q(r) for r in results]))
    figures = (
        Figure(
            name="error-vs-rate",
            caption=(
                "Test error against the retain probability q of the hidden units (mean ± SE over seeds), "
                "with layer widths fixed (left) and with q·n fixed (right); shaded: 0.4 <= q <= 0.8. "
                "Srivastava et al. (2014, Fig. 9): flat in the shaded range on the left, optimum near "
                "q = 0.6 on the right."
            ),
            draw=_draw_rate(results),
        ),
        Figure(
            name="error-vs-size",
            caption=(
                "Test error against the number of training examples, with and without dropout (mean ± SE "
                "over seeds). Srivastava et al. (2014, Fig. 10): no gain on 100 and 500 examples, a gain "
                "on larger sets."
            ),
            draw=_draw_size(results),
        ),
    )
    ours = "; ".join(f"{claim}: {mark[held]}" for claim, _, held, _ in checks)
    return Summary(
        verdict=verdict(ctx, results),
        ours=f"{ours} ({run_label(results)})",
        tables=(claims, rate, size),
        figures=figures,
        notes=notes,
        metrics=metrics,
    )


EXPERIMENT = Experiment(
    name="rate-and-size",
    title="Dropout rate and training-set size (Srivastava et al. 2014, Fig. 9 and 10)",
    claim=Claim(
        statement=(
            "With layer widths fixed the test error is flat for retain probabilities 0.4-0.8; with q·n "
            "fixed the optimum is near q = 0.6; on 100 and 500 training examples dropout gives no gain."
        ),
        source="Srivastava et al. 2014, JMLR, §7.3-7.4, Fig. 9 and Fig. 10",
        published="flat for 0.4 <= q <= 0.8; optimum q ≈ 0.6 with q·n fixed; no gain at 100 and 500 examples",
    ),
    run_seed=run_seed,
    summarize=summarize,
    default_seeds={"tiny": 1, "quick": 2, "full": 3},
    data=("MNIST (--data) or scikit-learn digits",),
)
