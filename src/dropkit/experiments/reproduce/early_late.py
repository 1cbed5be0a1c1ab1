"""``early-late``: early dropout against underfitting, late dropout against overfitting.

Liu, Xu, Jin, Shen, Darrell, "Dropout Reduces Underfitting" (ICML 2023): dropout applied only
at the start of training (early dropout: the rate falls from ``p`` to 0 over the first part of
training, then stays 0) lets an *underfitting* model reach a lower final training loss and test
error than training without dropout (ImageNet ViT-T 73.9 -> 74.3 % top-1, ``p = 0.1`` over the
first 50 of 300 epochs); dropout switched on only after that point (late dropout) regularizes
*overfitting* models (ViT-B 81.6 -> 82.3 % with late stochastic depth).

Two regimes, each trained with four schedules of the rate of every :class:`dropkit.nn.Dropout`
(:data:`SCHEDULES`: none, constant ``p``, early and late), set every optimizer step by
:func:`dropkit.schedules.attach` following the optimizer:

* ``"underfitting"``: a narrow ReLU MLP (two hidden layers of ``width`` units, dropout after
  each) on the whole training set of Fashion-MNIST, a few epochs;
* ``"overfitting"``: a wide MLP on a small training subset, many epochs.

Training lengths are counted in optimizer steps, so that the fallback data (scikit-learn's
1,257 training digits) get as many updates as Fashion-MNIST's 60,000 images.

The early schedule is :class:`dropkit.schedules.EarlyDropout` (``mode="linear"``: ``p``
falling linearly to 0 over the first ``K`` steps, as the authors' ``drop_scheduler``), the late
one :class:`dropkit.schedules.LateDropout` (0 before step ``K``, ``p`` from it on), with ``K`` a
sixth of all steps (50 of 300 epochs in the paper).  AdamW without weight decay and a cosine
learning-rate decay per step, as the paper's recipe (without its warm-up, augmentation and
other regularizers).  Within a regime the four schedules share initial weights and mini-batches.

Recorded at evenly spaced steps: the training loss and error in eval mode on a fixed training
subset, the test loss and error; per interval between those steps, the rate the dropout layers
had and the fraction of their non-zero inputs they actually zeroed, so the report (and the
tests) can check that the model followed its schedule.

Sizes (width on training examples, optimizer steps; seeds): tiny 8 on 128 and 32 on 48, 12
steps each, 1 seed, evaluated after every step (the tests check every step's rate); quick 16 on
all 60,000 for 1,400 steps (3 epochs) and 256 on 500 for 300 steps (30 epochs), 3 seeds (about
a minute on two cores); full 16 on 60,000 for 14,000 steps (30 epochs) and 512 on 2,000 for
6,000 steps (150 epochs), 5 seeds (under an hour).  The paper's ViTs train on ImageNet for 300
epochs.

Verdict rule (fixed in advance, as ``conv-variants``): three paired differences over seeds,
underfitting early minus none in final training loss and in test error, overfitting late minus
none in test error; each holds when below 0 by two standard errors, fails when its mean is not
below 0, and is unresolved otherwise.  The claim holds when all three hold.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn import functional as F

import dropkit
from dropkit.experiments._console import Progress, format_mean_se, format_number
from dropkit.experiments.reproduce import data as image_data
from dropkit.experiments.reproduce.api import Claim, Experiment, Figure, RunContext, Summary, Table, Verdict
from dropkit.experiments.reproduce.conv_variants import (
    check,
    combine,
    data_info,
    data_notes,
    mean_se,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "EXPERIMENT",
    "REGIMES",
    "SCHEDULES",
    "Regime",
    "build_mlp",
    "eval_steps",
    "make_schedule",
    "run_seed",
    "summarize",
    "verdict",
]

#: The rate schedules, in the order of the report.
SCHEDULES = ("none", "constant", "early", "late")
LABELS = {"none": "no dropout", "constant": "constant p", "early": "early (p -> 0)", "late": "late (0 -> p)"}
#: The regimes: a narrow model on much data, a wide one on little.
REGIMES = ("underfitting", "overfitting")

CLAIM = Claim(
    statement=(
        "Early dropout (p decreasing to 0 over the first part of training) lowers the final "
        "training loss and the test error of underfitting models compared with no dropout; "
        "late dropout (0 first, then p) helps overfitting models."
    ),
    source="Liu, Xu, Jin, Shen, Darrell, 'Dropout Reduces Underfitting', ICML 2023 (ImageNet-1K results)",
    published=(
        "ImageNet top-1: ViT-T 73.9 % -> 74.3 % with early dropout (p = 0.1, first 50 of 300 "
        "epochs); ViT-B 81.6 % -> 82.3 % with late stochastic depth"
    ),
)


@dataclass(frozen=True)
class Regime:
    """The settings of one regime at one scale.

    Attributes:
        n_train: training examples (a stratified subset; ``None``: all).
        width: units of each of the two hidden layers.
        steps: optimizer steps (``steps * batch_size / n_train`` epochs).
        batch_size: examples per optimizer step.
        lr: peak learning rate of AdamW (cosine decay to 0 over all steps).
        p: the drop rate of the constant, early and late schedules.
        cutoff: ``K`` as a fraction of all steps (the early schedule's end, the late one's start).
        evaluations: evenly spaced steps at which the losses and errors are measured.
        n_eval: training examples whose loss and error are measured (the first of the subset).
    """

    n_train: int | None
    width: int
    steps: int
    batch_size: int
    lr: float
    p: float
    cutoff: float
    evaluations: int
    n_eval: int


def protocol(ctx: RunContext) -> dict[str, Regime]:
    """The two regimes at ``ctx.scale``."""
    under: Regime = ctx.pick(
        tiny=Regime(128, 8, 12, 32, 3e-3, 0.1, 1 / 6, 1000, 128),
        quick=Regime(None, 16, 1400, 128, 3e-3, 0.1, 1 / 6, 12, 10_000),
        full=Regime(None, 16, 14_000, 128, 3e-3, 0.1, 1 / 6, 30, 20_000),
    )
    over: Regime = ctx.pick(
        tiny=Regime(48, 32, 12, 16, 1e-3, 0.3, 1 / 6, 1000, 48),
        quick=Regime(500, 256, 300, 50, 1e-3, 0.3, 1 / 6, 10, 500),
        full=Regime(2000, 512, 6000, 50, 1e-3, 0.3, 1 / 6, 30, 2000),
    )
    return {"underfitting": under, "overfitting": over}


def n_test(ctx: RunContext) -> int | None:
    """Test examples at ``ctx.scale`` (``None``: all)."""
    count: int | None = ctx.pick(tiny=64, quick=None, full=None)
    return count


def build_mlp(features: int, width: int, classes: int = 10) -> nn.Sequential:
    """``features -> width -> width -> classes`` ReLU MLP with a :class:`dropkit.nn.Dropout`
    after each hidden layer, built with rate 0 (the schedule sets it).

    Example:
        >>> build_mlp(4, 3)
        Sequential(
          (0): Flatten(start_dim=1, end_dim=-1)
          (1): Linear(in_features=4, out_features=3, bias=True)
          (2): ReLU()
          (3): Dropout(p=0.0, inplace=False)
          (4): Linear(in_features=3, out_features=3, bias=True)
          (5): ReLU()
          (6): Dropout(p=0.0, inplace=False)
          (7): Linear(in_features=3, out_features=10, bias=True)
        )
    """
    for name, value in (("features", features), ("width", width), ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, width),
        nn.ReLU(),
        dropkit.nn.Dropout(0.0),
        nn.Linear(width, width),
        nn.ReLU(),
        dropkit.nn.Dropout(0.0),
        nn.Linear(width, classes),
    )


def cutoff_steps(total_steps: int, cutoff: float) -> int:
    """``K``: the cutoff fraction of ``total_steps``, at least 1 and at most ``total_steps``."""
    return min(total_steps, max(1, round(cutoff * total_steps)))


def make_schedule(name: str, p: float, cutoff: int) -> dropkit.schedules.Schedule:
    """The rate schedule ``name`` (one of :data:`SCHEDULES`) with rate ``p`` and cutoff step ``K``.

    Example:
        >>> s = make_schedule("early", 0.2, cutoff=3)
        >>> [s(t) for t in range(5)], [make_schedule("late", 0.2, 3)(t) for t in range(5)]
        ([0.2, 0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.2, 0.2])
    """
    if name == "none":
        return dropkit.schedules.Constant(0.0)
    if name == "constant":
        return dropkit.schedules.Constant(p)
    if name == "early":
        return dropkit.schedules.EarlyDropout(p, steps=cutoff, mode="linear")
    if name == "late":
        return dropkit.schedules.LateDropout(p, start=cutoff)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def eval_steps(total_steps: int, evaluations: int) -> list[int]:
    """``evaluations`` evenly spaced steps in ``1..total_steps``, the last one included.

    Example:
        >>> eval_steps(12, 4), eval_steps(3, 6)
        ([3, 6, 9, 12], [1, 2, 3])
    """
    count = min(total_steps, evaluations)
    return sorted({math.ceil(k * total_steps / count) for k in range(1, count + 1)})


class _RateMeter:
    """Counts, over the training forwards of the dropout layers, the non-zero inputs, those the
    layer zeroed, and their expectation and variance under the rate the layer had."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, dropkit.nn.Dropout)]
        self.handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        self.reset()

    def reset(self) -> None:
        self.eligible = 0
        self.dropped = 0
        self.expected = 0.0
        self.variance = 0.0
        self.rates: list[float] = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not module.training:
            return
        with torch.no_grad():
            nonzero = inputs[0] != 0
            eligible = int(nonzero.sum())
            p = float(cast(dropkit.nn.Dropout, module).p)
            self.eligible += eligible
            self.dropped += int((nonzero & (output == 0)).sum())
            self.expected += p * eligible
            self.variance += p * (1.0 - p) * eligible
            self.rates.append(p)

    def record(self) -> dict[str, Any]:
        record = {
            "rate": statistics.fmean(self.rates) if self.rates else 0.0,
            "eligible": self.eligible,
            "dropped": self.dropped,
            "expected": self.expected,
            "variance": self.variance,
        }
        self.reset()
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 5000) -> tuple[float, float]:
    """Mean cross-entropy and error of ``model`` in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    loss, wrong = 0.0, 0
    try:
        with torch.no_grad():
            for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
                logits = model(xb)
                loss += float(F.cross_entropy(logits, yb, reduction="sum"))
                wrong += int((logits.argmax(1) != yb).sum())
    finally:
        model.train(was_training)
    return loss / len(y), wrong / len(y)


def train_schedule(
    images: image_data.ImageSet,
    regime: Regime,
    schedule: str,
    *,
    seed: int,
    label: str = "train",
    progress: bool = False,
) -> dict[str, Any]:
    """Train one MLP of ``regime`` with ``schedule``; returns its curves and rate records."""
    x, y = images.x_train, images.y_train
    x_eval, y_eval = x[: regime.n_eval], y[: regime.n_eval]
    total = regime.steps
    cutoff = cutoff_steps(total, regime.cutoff)
    torch.manual_seed(seed)  # the same initial weights for every schedule
    model = build_mlp(images.features, regime.width, images.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=regime.lr, weight_decay=0.0)
    rates = dropkit.schedules.attach(model, make_schedule(schedule, regime.p, cutoff), optimizer=optimizer)
    meter = _RateMeter(model)
    evaluated = set(eval_steps(total, regime.evaluations))
    generator = torch.Generator().manual_seed(seed)  # the same batches for every schedule
    curve: dict[str, list[Any]] = {
        k: []
        for k in ("step", "train_loss", "train_error", "test_loss", "test_error", "rate_at_step", "dropout")
    }
    step = 0
    model.train()
    with Progress(label, total, unit="steps", enabled=progress, lines=2) as bar:
        while step < total:
            for batch in torch.randperm(len(y), generator=generator).split(regime.batch_size):
                if step == total:
                    break
                for group in optimizer.param_groups:  # cosine decay, per step
                    group["lr"] = regime.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()  # the schedule advances with it
                step += 1
                if not math.isfinite(loss.detach().item()):
                    raise FloatingPointError(f"{label}: the training loss diverged at step {step}")
                if step in evaluated:
                    train_loss, train_error = _evaluate(model, x_eval, y_eval)
                    test_loss, test_error = _evaluate(model, images.x_test, images.y_test)
                    curve["step"].append(step)
                    curve["train_loss"].append(train_loss)
                    curve["train_error"].append(train_error)
                    curve["test_loss"].append(test_loss)
                    curve["test_error"].append(test_error)
                    curve["rate_at_step"].append(rates.rates()["0"])
                    curve["dropout"].append(meter.record())
                    bar.update(step, {"loss": format_number(train_loss)})
    meter.remove()
    return {"cutoff_step": cutoff, "total_steps": total, **curve}


def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
    """Both regimes, four schedules each, on one seed; see the module docstring."""
    dropkit.manual_seed(seed)
    torch.manual_seed(seed)
    full, fallback = image_data.load_fashion_mnist_or_digits(ctx)
    regimes = protocol(ctx)
    result: dict[str, Any] = {"seed": seed, "scale": ctx.scale, "regimes": {}}
    for name in REGIMES:
        regime = regimes[name]
        images = image_data.subsample(full, regime.n_train, n_test(ctx), seed=0)
        runs = {
            schedule: train_schedule(
                images,
                regime,
                schedule,
                seed=seed,
                label=f"{ctx.label or f'early-late seed {seed}'} {name} {schedule}",
                progress=ctx.progress,
            )
            for schedule in SCHEDULES
        }
        result["regimes"][name] = {
            "protocol": asdict(regime),
            "data": data_info(images, fallback),
            "schedules": runs,
        }
    return result


def _final(results: Sequence[Mapping[str, Any]], regime: str, schedule: str, key: str) -> list[float]:
    return [float(r["regimes"][regime]["schedules"][schedule][key][-1]) for r in results]


def _differences(results: Sequence[Mapping[str, Any]], regime: str, schedule: str, key: str) -> list[float]:
    ours, base = _final(results, regime, schedule, key), _final(results, regime, "none", key)
    return [a - b for a, b in zip(ours, base, strict=True)]


def verdict(
    scale: str, results: Sequence[Mapping[str, Any]]
) -> tuple[Verdict, list[tuple[bool | None, str]]]:
    """The verdict and each comparison's ``(held, text)`` from the final evaluations (pure)."""
    checks = [
        check(
            "underfitting, early - none, training loss",
            _differences(results, "underfitting", "early", "train_loss"),
            unit="nats",
            scale=1.0,
        ),
        check(
            "underfitting, early - none, test error",
            _differences(results, "underfitting", "early", "test_error"),
        ),
        check(
            "overfitting, late - none, test error", _differences(results, "overfitting", "late", "test_error")
        ),
    ]
    ours = "; ".join(text for _, text in checks)
    if scale == "tiny":
        return Verdict(None, f"Undecided: the tiny scale only checks that the run works ({ours})."), checks
    held = combine([h for h, _ in checks])
    if held is True:
        return Verdict(True, f"Held: {ours}."), checks
    if held is None:
        return Verdict(None, f"Undecided: not every difference is resolved at this size ({ours})."), checks
    under = results[0]["regimes"]["underfitting"]["protocol"]
    over = results[0]["regimes"]["overfitting"]["protocol"]
    failed = "; ".join(text for h, text in checks if h is False)
    tried = (
        f"Tried: a {under['width']}-unit MLP for {under['steps']:,} steps with p = {under['p']} "
        f"(underfitting) and a {over['width']}-unit MLP on {over['n_train']} examples for "
        f"{over['steps']:,} steps with p = {over['p']} (overfitting), K = {under['cutoff']:.3g} of "
        f"the steps, {len(results)} seed(s); the paper trains ViTs on ImageNet for 300 epochs."
    )
    return Verdict(False, f"Not held at this size: {failed}. All: {ours}. {tried}"), checks


def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
    """Tables, figures and the verdict from every seed's result (pure)."""
    if not results:
        raise ValueError("results must hold at least one seed's result, got none")
    decision, checks = verdict(ctx.scale, results)
    tiny = ctx.scale == "tiny"
    rows = []
    for regime in REGIMES:
        for schedule in SCHEDULES:
            rows.append(
                [
                    regime,
                    LABELS[schedule],
                    _cell(_final(results, regime, schedule, "train_loss"), 1.0),
                    _cell(_final(results, regime, schedule, "train_error")),
                    _cell(_final(results, regime, schedule, "test_error")),
                    _cell(_final(results, regime, schedule, "test_loss"), 1.0),
                ]
            )
    published = [
        "a lower final training loss with early dropout (reported for ViT-T; no number quoted)",
        "ViT-T ImageNet top-1 73.9 % -> 74.3 % (early dropout)",
        "ViT-B ImageNet top-1 81.6 % -> 82.3 % (late stochastic depth)",
    ]
    held_cells = [
        "undecided (tiny)" if tiny else {True: "yes", False: "no", None: "undecided"}[h] for h, _ in checks
    ]
    tables = [
        Table(
            "Final values per regime and schedule (mean ± SE over seeds; losses and errors in eval mode)",
            ["regime", "schedule", "training loss", "training error (%)", "test error (%)", "test loss"],
            rows,
        ),
        Table(
            "Published vs ours (differences paired per seed)",
            ["published", "ours", "held"],
            [[pub, text, cell] for pub, (_, text), cell in zip(published, checks, held_cells, strict=True)],
        ),
        Table(
            "Dropout the models actually had: mean rate and fraction of non-zero inputs zeroed, "
            "before and after the cutoff step K (first seed)",
            ["regime", "schedule", "rate before K", "zeroed before K", "rate after K", "zeroed after K"],
            [_rate_row(results[0], regime, schedule) for regime in REGIMES for schedule in SCHEDULES],
        ),
    ]
    figures = [
        Figure(
            "early-late-curves",
            "Training loss (eval mode, left) and test error (right) against optimizer steps, mean over "
            "seeds, for the underfitting (top) and overfitting (bottom) regime; the dotted line is the "
            "cutoff K. Liu et al. report early dropout ending with a lower training loss.",
            _draw_curves(results),
        )
    ]
    under = results[0]["regimes"]["underfitting"]
    over = results[0]["regimes"]["overfitting"]
    notes = [
        *data_notes(under["data"]),
        _regime_note("Underfitting", under, results),
        _regime_note("Overfitting", over, results),
        "Schedules per optimizer step (dropkit.schedules.attach following AdamW): early = "
        "EarlyDropout(p, K, mode='linear'), late = LateDropout(p, start=K), K = a sixth of all "
        "steps as in the paper (50 of 300 epochs); AdamW without weight decay, cosine learning-rate "
        "decay, no warm-up, augmentation or other regularizers.",
        "Training loss and error are measured in eval mode on a fixed training subset; the paper's "
        "models (ViT-T, ImageNet, 300 epochs) are far larger and a small MLP may show no effect.",
        "Verdict rule (fixed in advance): each paired difference must be below 0 by 2 SE to hold; a "
        "mean not below 0 fails; the claim needs all three.",
    ]
    metrics: dict[str, Any] = {}
    for regime in REGIMES:
        for schedule in SCHEDULES:
            for key in ("train_loss", "test_error"):
                metrics[f"{regime}_{schedule}_{key}"] = _pair(_final(results, regime, schedule, key))
    return Summary(decision, tables, figures, notes, metrics)


def _pair(values: Sequence[float]) -> list[float | None]:
    mean, se = mean_se(values)
    return [mean, None if math.isnan(se) else se]


def _cell(values: Sequence[float], scale: float = 100.0) -> str:
    mean, se = mean_se([scale * v for v in values])
    return format_number(mean) if math.isnan(se) else format_mean_se(mean, se)


def _regime_note(title: str, regime: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> str:
    """The regime's settings, and whether it is what it is called: the no-dropout model's final
    training and test error (a small gap: underfitting; a large one: overfitting)."""
    p, d = regime["protocol"], regime["data"]
    run = regime["schedules"]["none"]
    name = title.lower()
    train = statistics.fmean(_final(results, name, "none", "train_error"))
    test = statistics.fmean(_final(results, name, "none", "test_error"))
    return (
        f"{title}: {d['side'] ** 2}-{p['width']}-{p['width']}-10 ReLU MLP on {d['n_train']:,} "
        f"examples, {run['total_steps']:,} steps of batch {p['batch_size']} "
        f"({run['total_steps'] * p['batch_size'] / d['n_train']:.3g} epochs, K = {run['cutoff_step']:,}), "
        f"peak lr {p['lr']:g}, p = {p['p']}; without dropout it ends at {format_number(100 * train)} % "
        f"training and {format_number(100 * test)} % test error "
        f"(gap {format_number(100 * (test - train))} pp)."
    )


def _split(run: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The rate records of the intervals wholly before and wholly after the cutoff step."""
    before, after, previous = [], [], 0
    for step, record in zip(run["step"], run["dropout"], strict=True):
        if step <= run["cutoff_step"]:
            before.append(record)
        elif previous >= run["cutoff_step"]:
            after.append(record)
        previous = step
    return before, after


def _rate_row(result: Mapping[str, Any], regime: str, schedule: str) -> list[str]:
    before, after = _split(result["regimes"][regime]["schedules"][schedule])

    def cells(records: Sequence[Mapping[str, Any]]) -> list[str]:
        if not records:
            return ["-", "-"]
        eligible = sum(r["eligible"] for r in records)
        zeroed = sum(r["dropped"] for r in records) / eligible if eligible else 0.0
        return [format_number(statistics.fmean(r["rate"] for r in records)), format_number(zeroed)]

    return [regime, LABELS[schedule], *cells(before), *cells(after)]


def _draw_curves(results: Sequence[Mapping[str, Any]]) -> Callable[[MplFigure], None]:
    def mean_curve(regime: str, schedule: str, key: str) -> list[float]:
        curves = [r["regimes"][regime]["schedules"][schedule][key] for r in results]
        return [statistics.fmean(v) for v in zip(*curves, strict=True)]

    def draw(fig: MplFigure) -> None:
        fig.set_size_inches(9.0, 6.5)
        fig.set_layout_engine("constrained")
        for row, regime in enumerate(REGIMES):
            run = results[0]["regimes"][regime]["schedules"]["none"]
            for col, (key, ylabel, scale) in enumerate(
                (("train_loss", "training loss", 1.0), ("test_error", "test error (%)", 100.0))
            ):
                axes = fig.add_subplot(2, 2, 2 * row + col + 1)
                for schedule in SCHEDULES:
                    values = [scale * v for v in mean_curve(regime, schedule, key)]
                    axes.plot(run["step"], values, marker=".", label=LABELS[schedule])
                axes.axvline(run["cutoff_step"], color="gray", linestyle=":", linewidth=1.0)
                axes.set_title(regime, fontsize="small")
                axes.set_xlabel("optimizer step")
                axes.set_ylabel(ylabel)
                if row == 0 and col == 1:
                    axes.legend(fontsize="small")

    return draw


EXPERIMENT = Experiment(
    name="early-late",
    title="Early dropout against underfitting, late dropout against overfitting",
    claim=CLAIM,
    run_seed=run_seed,
    summarize=summarize,
    default_seeds={"tiny": 1, "quick": 3, "full": 5},
    data=("fashion-mnist (digits when absent)",),
)
