r"""``concrete-rate``: the dropout rate that concrete dropout learns falls as the training set grows.

Gal, Hron & Kendall (NeurIPS 2017) learn the drop probability ``p`` of every layer by
gradient descent on the variational objective (the per-point negative ELBO).  Its dropout
regularizer is an entropy bonus ``K H(p)`` weighted by ``1/N``: with little data it pulls
``p`` up (more epistemic uncertainty), and as ``N`` grows the likelihood term wins and ``p``
falls.  The paper shows the converged ``p`` of each layer of an MNIST MLP against the
training-set size.

This experiment trains, per seed, one MLP with a :class:`dropkit.nn.ConcreteDropout` before
each of its three linear layers on nested, class-stratified subsets of increasing size ``N``
(:func:`~dropkit.experiments.reproduce.data.subsample`) and records the learned ``p`` of every
layer at every ``N``.

**Objective.**  With ``(λ_w, λ_p) = (l²/N, 2/N)`` (:func:`dropkit.nn.concrete_regularizers`,
prior length-scale :data:`LENGTH_SCALE`), the layers' regularizer
``Σ_l [λ_w ΣW_l²/(1 - p_l) + λ_p K_l (p_l log p_l + (1 - p_l) log(1 - p_l))]`` is twice the
KL term per training point (the authors' code pairs it with twice the NLL), so the loss
minimised is the per-point negative ELBO ``mean cross-entropy + ½ · regularizer``
(:func:`dropkit.nn.regularization.regularization_loss`).  Biases are not penalised.

**Training.**  Every size gets the same number of Adam steps (batches of
``min(batch_size, N)`` drawn in epochs of a fresh permutation), from the same initial weights
(seeded by the run seed) and ``p = 0.1`` (the authors' initial value), so that ``p`` is not
compared at different stages of convergence.  The rate logits use a learning rate ten times
the weights' (``1e-2`` against ``1e-3``): with the CPU budget of these runs a logit moving
``1e-3`` per step would not reach its equilibrium (a deviation from the paper, which trains
far longer at one rate).  After training, ``T`` MC passes (:func:`dropkit.mc.mc_predict`,
concrete noise at the training temperature) give the test accuracy, NLL (nats) and mean mutual
information (epistemic uncertainty) of each network.

**Sizes** (:func:`protocol`): a ``D-H-H-C`` MLP.  MNIST: tiny ``N`` in 100, 400 (``H = 32``,
30 steps, batch 64, ``T = 4``); quick ``N`` in 100 ... 10,000 (five sizes, half a decade
apart; ``H = 128``, 300 steps, batch 64, 500 test images, ``T = 10``); full ``N`` in 100 ...
60,000 (seven sizes; ``H = 512``, 5,000 steps, batch 128, 2,000 test images, ``T = 50``).
Digits: ``N`` in 50 ... 1,257 (six sizes; tiny 50 and 200), ``H = 16`` / 64 / 256, 30 / 500 /
5,000 steps.  The paper trains a wider network on MNIST for far longer at every size.

**Verdict** (fixed before any run): per seed and layer, the least-squares slope of ``p``
against ``log10 N``; the claim holds when every layer's mean slope is below 0 by more than two
standard errors over seeds (sample standard deviation, ``ddof = 1``), and does not hold
otherwise.  Undecided at the tiny scale and with a single seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

import dropkit
from dropkit.experiments._console import Progress, format_number
from dropkit.experiments.reproduce import _plots, _stats
from dropkit.experiments.reproduce._stats import mean_se, resolved_sign
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
from dropkit.mc import mc_predict
from dropkit.metrics import accuracy, mutual_information, nll
from dropkit.nn.concrete import ConcreteDropout, concrete_regularizers
from dropkit.nn.regularization import regularization_loss

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "EXPERIMENT",
    "INIT_P",
    "LAYERS",
    "LENGTH_SCALE",
    "TRACE_POINTS",
    "Protocol",
    "build_concrete_mlp",
    "learned_rates",
    "mean_se",
    "protocol",
    "run_seed",
    "slope",
    "summarize",
    "train_concrete",
    "verdict",
]

#: Prior length-scale ``l`` of the weights (``λ_w = l² / N``).
LENGTH_SCALE = 1e-2
#: Initial drop rate of every layer (the authors' code).
INIT_P = 0.1
#: Names of the three concrete-dropout layers, input first.
LAYERS = ("input", "hidden 1", "hidden 2")
#: Learning rate of the rate logits relative to the weights' (see the module docstring).
LOGIT_LR_FACTOR = 10.0
#: Points at which the rates are recorded during training (after each quarter of the steps).
TRACE_POINTS = 4
#: How many standard errors separate a slope from zero before it counts as resolved.
SIGNIFICANCE = 2.0


def _cell(values: Sequence[float], digits: int = 3) -> str:
    return _stats.format_cell(values, digits=digits)


def slope(sizes: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against ``log10(sizes)``.

    Example:
        >>> round(slope([10, 100, 1000], [0.5, 0.3, 0.1]), 6)
        -0.2
    """
    if len(sizes) != len(values) or len(sizes) < 2:
        raise ValueError(
            f"sizes and values must have the same length >= 2, got {len(sizes)} and {len(values)}"
        )
    xs = [math.log10(n) for n in sizes]
    mx, my = math.fsum(xs) / len(xs), math.fsum(values) / len(values)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0.0:
        raise ValueError(f"sizes must not all be equal, got {list(sizes)}")
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True)) / sxx


@dataclass(frozen=True)
class Protocol:
    """The sizes of one run (see :func:`protocol`).

    Attributes:
        sizes: training-set sizes ``N``, increasing (nested subsets).
        n_test: test images (``None``: the whole test split).
        hidden: units of each of the two hidden layers.
        steps: Adam steps per size.
        batch_size: examples per step (``min(batch_size, N)``).
        lr: learning rate of the weights (the rate logits: ``LOGIT_LR_FACTOR`` times it).
        samples: MC passes ``T`` on the test set.
    """

    sizes: tuple[int, ...]
    n_test: int | None
    hidden: int
    steps: int
    batch_size: int
    lr: float
    samples: int


def protocol(ctx: RunContext, data: str) -> Protocol:
    """The protocol for ``ctx.scale`` on ``data`` (``"mnist"`` or ``"digits"``).

    Example:
        >>> from pathlib import Path
        >>> protocol(RunContext("tiny", None, Path(".")), "digits").sizes
        (50, 200)
    """
    if data == "mnist":
        return Protocol(
            sizes=ctx.pick(
                (100, 400), (100, 300, 1_000, 3_000, 10_000), (100, 300, 1_000, 3_000, 10_000, 30_000, 60_000)
            ),
            n_test=ctx.pick(200, 500, 2_000),
            hidden=ctx.pick(32, 128, 512),
            steps=ctx.pick(30, 300, 5_000),
            batch_size=ctx.pick(64, 64, 128),
            lr=1e-3,
            samples=ctx.pick(4, 10, 50),
        )
    return Protocol(
        sizes=ctx.pick((50, 200), (50, 100, 200, 400, 800, 1_257), (50, 100, 200, 400, 800, 1_257)),
        n_test=ctx.pick(100, None, None),
        hidden=ctx.pick(16, 64, 256),
        steps=ctx.pick(30, 500, 5_000),
        batch_size=ctx.pick(64, 64, 128),
        lr=1e-3,
        samples=ctx.pick(4, 20, 50),
    )


def build_concrete_mlp(features: int, hidden: int, classes: int, num_train: int) -> nn.Sequential:
    """``Flatten -> CD(Linear) -> ReLU -> CD(Linear) -> ReLU -> CD(Linear)``, ``CD`` =
    :class:`~dropkit.nn.ConcreteDropout` with ``(λ_w, λ_p) = concrete_regularizers(LENGTH_SCALE, num_train)``
    and ``init_p = INIT_P``.

    Example:
        >>> model = build_concrete_mlp(64, 8, 10, num_train=100)
        >>> [round(p, 3) for p in learned_rates(model)]
        [0.1, 0.1, 0.1]
    """
    weight_regularizer, dropout_regularizer = concrete_regularizers(LENGTH_SCALE, num_train)

    def layer(n_in: int, n_out: int) -> ConcreteDropout:
        return ConcreteDropout(
            nn.Linear(n_in, n_out),
            init_p=INIT_P,
            weight_regularizer=weight_regularizer,
            dropout_regularizer=dropout_regularizer,
        )

    return nn.Sequential(
        nn.Flatten(),
        layer(features, hidden),
        nn.ReLU(),
        layer(hidden, hidden),
        nn.ReLU(),
        layer(hidden, classes),
    )


def learned_rates(model: nn.Module) -> list[float]:
    """The drop rate ``p`` of every :class:`~dropkit.nn.ConcreteDropout` of ``model``, input first."""
    return [module.p for module in model.modules() if isinstance(module, ConcreteDropout)]


def train_concrete(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: Protocol,
    *,
    seed: int,
    label: str = "train",
    progress: bool = False,
) -> tuple[float, list[list[float]]]:
    """``settings.steps`` Adam steps on ``mean cross-entropy + ½ regularization_loss(model)``.

    Batches of ``min(batch_size, N)`` come from successive random permutations drawn from a
    generator seeded with ``seed``; the concrete noise from dropkit's global seed.

    Returns:
        The mean objective over the last tenth of the steps, and the rates of every layer after
        each quarter of the steps (:data:`TRACE_POINTS` rows; the last row is the final ``p``),
        to show how far ``p`` still moved at the end.
    """
    logits = [p for name, p in model.named_parameters() if name.endswith("p_logit")]
    weights = [p for name, p in model.named_parameters() if not name.endswith("p_logit")]
    optimizer = torch.optim.Adam(
        [{"params": weights, "lr": settings.lr}, {"params": logits, "lr": settings.lr * LOGIT_LR_FACTOR}]
    )
    generator = torch.Generator().manual_seed(seed)
    batch = min(settings.batch_size, len(y))
    order = torch.empty(0, dtype=torch.long)
    tail = max(1, settings.steps // 10)
    checkpoints = {max(1, round(settings.steps * k / TRACE_POINTS)) for k in range(1, TRACE_POINTS + 1)}
    recent: list[float] = []
    trace: list[list[float]] = []
    model.train()
    with Progress(label, settings.steps, unit="steps", enabled=progress) as bar:
        for step in range(settings.steps):
            if len(order) < batch:
                order = torch.randperm(len(y), generator=generator)
            index, order = order[:batch], order[batch:]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[index]), y[index]) + 0.5 * regularization_loss(model)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{label}: the objective diverged at step {step + 1}")
            if step >= settings.steps - tail:
                recent.append(value)
            if step + 1 in checkpoints:
                trace.append(learned_rates(model))
            if progress:
                bar.update(step + 1, {"p": "/".join(format_number(p, 2) for p in learned_rates(model))})
    model.eval()
    return math.fsum(recent) / len(recent), trace


def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
    """Train one concrete-dropout MLP per training-set size; record the learned rates."""
    dropkit.manual_seed(seed)
    torch.manual_seed(seed)
    images: ImageSet = load_mnist_or_digits(ctx)
    settings = protocol(ctx, images.name)
    sizes = tuple(n for n in settings.sizes if n <= len(images.y_train))
    test = subsample(images, None, settings.n_test, seed=seed)
    rows: dict[str, list[Any]] = {
        "p": [],
        "p_trace": [],
        "accuracy": [],
        "nll": [],
        "mutual_information": [],
        "objective": [],
    }
    for index, size in enumerate(sizes):
        subset = subsample(images, size, None, seed=seed)  # nested: a prefix of one stratified order
        torch.manual_seed(seed)  # the same initial weights at every size
        model = build_concrete_mlp(images.features, settings.hidden, images.classes, len(subset.y_train))
        label = f"{ctx.label or 'concrete-rate'} N={size}"
        objective, trace = train_concrete(
            model,
            subset.x_train,
            subset.y_train,
            settings,
            seed=seed * 1_000 + index,
            label=label,
            progress=ctx.progress,
        )
        probs = mc_predict(model, test.x_test, T=settings.samples, seed=seed, transform="softmax")
        mean = probs.mean(dim=0)
        rows["p"].append(learned_rates(model))
        rows["p_trace"].append(trace)
        rows["accuracy"].append(float(accuracy(mean, test.y_test)))
        rows["nll"].append(float(nll(mean, test.y_test)))
        rows["mutual_information"].append(float(mutual_information(probs).mean()))
        rows["objective"].append(objective)
    return {
        "seed": seed,
        "scale": ctx.scale,
        "data": images.name,
        "data_source": images.source,
        "side": int(images.x_train.shape[-1]),
        "classes": images.classes,
        "n_test": len(test.y_test),
        "layers": list(LAYERS),
        "protocol": {**asdict(settings), "sizes": list(sizes)},
        "length_scale": LENGTH_SCALE,
        "init_p": INIT_P,
        "logit_lr_factor": LOGIT_LR_FACTOR,
        "sizes": list(sizes),
        **rows,
    }


def _slopes(results: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Per layer, the slope of every seed."""
    return [
        [slope(r["sizes"], [row[layer] for row in r["p"]]) for r in results] for layer in range(len(LAYERS))
    ]


def _series(results: Sequence[Mapping[str, Any]], key: str, layer: int | None = None) -> list[list[float]]:
    """Per size, the values of every seed."""
    count = len(results[0]["sizes"])
    return [[float(r[key][i] if layer is None else r[key][i][layer]) for r in results] for i in range(count)]


def verdict(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Verdict:
    """The rule of the module docstring applied to the seeds' results."""
    slopes = _slopes(results)
    sizes = results[0]["sizes"]
    ours = "; ".join(
        f"{name}: p {_cell([r['p'][0][layer] for r in results])} at N = {sizes[0]:,} -> "
        f"{_cell([r['p'][-1][layer] for r in results])} at N = {sizes[-1]:,}, "
        f"slope {_cell(values)} per decade"
        for layer, (name, values) in enumerate(zip(LAYERS, slopes, strict=True))
    )
    if ctx.scale == "tiny":
        return Verdict(None, f"Undecided: the tiny scale only checks that the pipeline runs. Ours: {ours}.")
    if len(results) < 2:
        return Verdict(None, f"Undecided: one seed gives no error bar. Ours: {ours}.")
    failed = []
    for name, values in zip(LAYERS, slopes, strict=True):
        if resolved_sign(values, significance=SIGNIFICANCE) != -1:
            failed.append(name)
    if not failed:
        return Verdict(True, f"Held: the learned p falls with N in every layer. {ours}.")
    settings = results[0]["protocol"]
    return Verdict(
        False,
        f"Not held: the slope of p against log10 N is not below 0 at {SIGNIFICANCE:g} standard errors for "
        f"{', '.join(failed)}. {ours}. Tried: {len(results)} seeds, {settings['steps']} Adam steps per size, "
        f"sizes {', '.join(str(n) for n in sizes)}.",
    )


def _late_movement(results: Sequence[Mapping[str, Any]]) -> tuple[int, str, float] | None:
    """The largest change of p over the last quarter of training: ``(N, layer, |Δp|)``."""
    best: tuple[int, str, float] | None = None
    for result in results:
        for size, trace in zip(result["sizes"], result["p_trace"], strict=True):
            if len(trace) < 2:
                continue
            for layer, name in enumerate(LAYERS):
                change = abs(trace[-1][layer] - trace[-2][layer])
                if best is None or change > best[2]:
                    best = (size, name, change)
    return best


def _draw_rates(results: Sequence[Mapping[str, Any]]) -> Any:
    def draw(fig: MplFigure) -> None:
        ax = fig.add_subplot()
        sizes = results[0]["sizes"]
        for layer, name in enumerate(LAYERS):
            _plots.errorbar(ax, sizes, _series(results, "p", layer), name)
        ax.axhline(INIT_P, linestyle=":", color="gray", label=f"initial p = {INIT_P}")
        ax.set_xscale("log")
        ax.set_xlabel("training-set size N")
        ax.set_ylabel("learned drop probability p")
        ax.legend()

    return draw


def _draw_uncertainty(results: Sequence[Mapping[str, Any]]) -> Any:
    def draw(fig: MplFigure) -> None:
        left, right = fig.subplots(1, 2)
        sizes = results[0]["sizes"]
        _plots.errorbar(left, sizes, _series(results, "mutual_information"), "mutual information")
        _plots.errorbar(right, sizes, _series(results, "nll"), "test NLL")
        for ax, label in ((left, "mean mutual information (nats)"), (right, "test NLL (nats)")):
            ax.set_xscale("log")
            ax.set_xlabel("training-set size N")
            ax.set_ylabel(label)

    return draw


def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
    """Tables, figures, notes and the verdict from every seed's result (no training)."""
    if not results:
        raise ValueError("results must hold at least one seed's result, got none")
    first = results[0]
    sizes = first["sizes"]
    settings = first["protocol"]
    rows = []
    for i, size in enumerate(sizes):
        row = [f"{size:,}"]
        row += [_cell([r["p"][i][layer] for r in results]) for layer in range(len(LAYERS))]
        row += [
            _cell([r["accuracy"][i] for r in results]),
            _cell([r["nll"][i] for r in results]),
            _cell([r["mutual_information"][i] for r in results]),
        ]
        rows.append(row)
    detail = Table(
        f"Learned drop probability per layer against the training-set size ({first['data']})",
        ["N", *(f"p {name}" for name in LAYERS), "test accuracy", "test NLL (nats)", "mean MI (nats)"],
        rows,
    )
    slopes = _slopes(results)
    marks = []
    for values in slopes:
        sign = resolved_sign(values, significance=SIGNIFICANCE)
        if ctx.scale == "tiny" or sign is None:
            marks.append("undecided")
        else:
            marks.append("yes" if sign == -1 else "no")
    published = Table(
        "Published vs ours: slope of p per decade of N (< 0 supports the claim)",
        ["layer", "published", "ours", "held"],
        [
            [name, "p falls as N grows (figure)", _cell(values), mark]
            for name, values, mark in zip(LAYERS, slopes, marks, strict=True)
        ],
    )
    side = first["side"]
    width = settings["hidden"]
    notes = [
        f"Data: {first['data']} ({side}x{side}, {first['data_source']}); nested class-stratified "
        f"training subsets of {', '.join(f'{n:,}' for n in sizes)} images; {first['n_test']:,} test images.",
        f"Network: {side * side}-{width}-{width}-{first['classes']} ReLU MLP with concrete dropout "
        f"(temperature 0.1) before each linear layer, initial p = {first['init_p']}; the paper's MNIST "
        "network is larger (wider layers, far longer training).",
        f"Objective: mean cross-entropy + ½ Σ_l [l²/N ΣW²/(1-p) + 2K/N (p log p + (1-p) log(1-p))], "
        f"l = {first['length_scale']} (the per-point negative ELBO).",
        f"Training: {settings['steps']} Adam steps at every N (batch min({settings['batch_size']}, N)), lr "
        f"{settings['lr']} for the weights and {settings['lr'] * first['logit_lr_factor']:g} for the rate "
        "logits (a deviation to converge within the CPU budget); the same initial weights at every N.",
        f"Test metrics from T = {settings['samples']} MC passes with the concrete noise; mean ± SE over "
        "seeds (ddof = 1).",
        "Verdict rule (fixed in advance): every layer's slope of p against log10 N below 0 at 2 standard "
        "errors.",
    ]
    moved = _late_movement(results)
    if moved is not None:
        size, layer, change = moved
        notes.append(
            f"Convergence: over the last quarter of the steps p moved by at most {format_number(change, 2)} "
            f"(largest at N = {size:,}, {layer} layer); a rate still moving means more steps could lower the "
            "large-N rates further."
        )
    if ctx.scale == "tiny":
        notes.append("Tiny scale: a pipeline check with a few dozen steps, not a measurement.")
    metrics: dict[str, Any] = {}
    for name, values in zip(LAYERS, slopes, strict=True):
        metrics[f"slope_p_{name.replace(' ', '_')}"] = _stats.json_metric(values)
    figures = [
        Figure(
            "learned-p-vs-n",
            "Learned drop probability of each concrete-dropout layer against the training-set size (log "
            "scale), mean ± SE over seeds. Gal, Hron & Kendall show p falling as N grows in every layer.",
            _draw_rates(results),
        ),
        Figure(
            "uncertainty-vs-n",
            "Mean mutual information (epistemic uncertainty) and NLL of the MC predictive on the test set "
            "against the training-set size, mean ± SE over seeds.",
            _draw_uncertainty(results),
        ),
    ]
    return Summary(
        verdict=verdict(ctx, results),
        tables=[published, detail],
        figures=figures,
        notes=notes,
        metrics=metrics,
    )


EXPERIMENT = Experiment(
    name="concrete-rate",
    title="Concrete dropout: the learned rate against the training-set size",
    claim=Claim(
        statement=(
            "The dropout probability learned by concrete dropout decreases as the training set grows, as the "
            "epistemic uncertainty it models shrinks."
        ),
        source=(
            "Gal, Hron & Kendall 2017, 'Concrete Dropout', NeurIPS (MNIST: converged p per layer against N)"
        ),
        published="qualitative (figure): p falls with N in every layer",
    ),
    run_seed=run_seed,
    summarize=summarize,
    default_seeds={"tiny": 1, "quick": 2, "full": 3},
    data=("mnist or digits",),
)
