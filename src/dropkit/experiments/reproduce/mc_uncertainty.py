r"""``mc-uncertainty``: Monte Carlo dropout against weight scaling, calibration and out-of-distribution.

Gal & Ghahramani (ICML 2016) read a network trained with dropout as an approximate Bayesian
model: keeping dropout on at test time and averaging ``T`` stochastic passes (MC dropout)
approximates the predictive distribution, and its spread is the model's (epistemic)
uncertainty, which grows away from the training data.  This experiment trains one dropout MLP
per seed and compares, on the same network, the two ways of predicting:

* **weight scaling**: the deterministic network in eval mode (inverted dropout, so no rescaling
  is needed), ``softmax(f(x))``;
* **MC dropout**: ``p̄ = (1/T) sum_t softmax(f_t(x))`` over ``T`` passes with fresh masks
  (:func:`dropkit.mc.mc_predict`, dropout on, nothing else changed).

**Conventions** (all from :mod:`dropkit.metrics`):

* NLL: mean negative log-likelihood of the true class, natural log (nats), lower is better
  (:func:`dropkit.metrics.nll`, probabilities clamped at ``finfo(float32).eps``).
* ECE: top-label expected calibration error with :data:`ECE_BINS` = 15 equal-width bins on
  ``[0, 1]``, right-closed (Guo et al. 2017; :func:`dropkit.metrics.expected_calibration_error`).
* Uncertainty scores, per input, in nats: predictive entropy ``H[p̄]`` and mutual information
  (BALD) ``H[p̄] - (1/T) sum_t H[p_t]`` (:func:`dropkit.metrics.uncertainty_scores`); weight
  scaling has only the entropy of its softmax.
* AUROC: out-of-distribution inputs are the **positive** class and a higher score means "more
  likely OOD" (:func:`dropkit.metrics.ood_detection`); 0.5 is chance, 1 a perfect separation.
* Error bars: mean ± standard error over seeds (sample standard deviation, ``ddof = 1``, over
  ``sqrt(n_seeds)``); differences are paired (same network, same inputs).

**Data.**  In-distribution: MNIST when ``--data`` holds it, else scikit-learn's 8x8 digits.
Out-of-distribution, in this order of preference:

1. Fashion-MNIST test images (``DATA/fashion-mnist`` or the Debian package), at 28x28 for
   MNIST and area-averaged to 8x8 for digits (``adaptive_avg_pool2d``, no renormalisation: the
   mean pixel is 0.29 against the digits' 0.31);
2. without Fashion-MNIST, the held-out classes 5-9 of the in-distribution set: the network is
   trained and scored on classes 0-4 only (a 5-class task) and the test images of 5-9 are the
   OOD inputs.

Each seed's result names the OOD set it used, and the report says it.

**Sizes** (:func:`protocol`): a ``D-H-H-C`` ReLU MLP with inverted dropout ``p = 0.5`` after
each hidden layer (none on the input, so the first layer is a trunk that
:func:`~dropkit.mc.mc_predict` computes once), Adam (lr ``1e-3``).  MNIST: tiny 2,000 training
images, ``H = 64``, 1 epoch, 200 + 200 test images, ``T = 5``; quick all 60,000, ``H = 256``, 3
epochs, 2,000 + 2,000 test images, ``T = 50``; full all 60,000, ``H = 512``, 20 epochs, the whole
test sets (10,000 + 10,000), ``T = 100``.  Digits: tiny 300 images, ``H = 32``, 20 epochs,
``T = 5``; quick and full the whole split (1,257 training and 540 test images), ``H = 128`` / 256,
60 / 200 epochs, ``T = 50`` / 100.  The paper's networks (LeNet-style convolutional nets) were
trained far longer; this is the largest reduction that keeps the quick run within a minute.

**Verdict** (fixed before any run): at the tiny scale, or with a single seed, undecided.
Otherwise the claim holds when all four paired comparisons are resolved in its favour at two
standard errors (``mean - 2 SE > 0``, as :func:`resolved_sign`): NLL(weight scaling) - NLL(MC)
and ECE(weight scaling) - ECE(MC) above 0, AUROC(predictive entropy) - 0.5 and
AUROC(mutual information) - 0.5 above 0.  It does not hold when any of them is not.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

import dropkit
from dropkit.experiments._console import Progress, format_number
from dropkit.experiments.reproduce import _stats
from dropkit.experiments.reproduce._stats import mean_se, resolved_sign
from dropkit.experiments.reproduce.api import (
    Claim,
    DataUnavailableError,
    Experiment,
    Figure,
    RunContext,
    Summary,
    Table,
    Verdict,
)
from dropkit.experiments.reproduce.data import (
    FASHION_MNIST_HINT,
    ImageSet,
    load_fashion_mnist,
    load_mnist_or_digits,
    subsample,
)
from dropkit.mc import mc_predict
from dropkit.metrics import (
    accuracy,
    expected_calibration_error,
    nll,
    ood_detection,
    reliability_diagram_data,
    uncertainty_scores,
)
from dropkit.metrics.classification import entropy

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "ECE_BINS",
    "EXPERIMENT",
    "HIST_BINS",
    "HELD_OUT_CLASSES",
    "Protocol",
    "Task",
    "build_mlp",
    "evaluate",
    "histogram",
    "load_task",
    "mean_se",
    "protocol",
    "resolved_sign",
    "run_seed",
    "score_predictions",
    "summarize",
    "train",
    "verdict",
]

#: Equal-width bins of the ECE and of the reliability diagram (Guo et al. 2017).
ECE_BINS = 15
#: Equal-width bins of the stored entropy / mutual-information histograms, over ``[0, log C]``.
HIST_BINS = 40
#: The classes held out as out-of-distribution inputs when Fashion-MNIST is not available.
HELD_OUT_CLASSES = (5, 6, 7, 8, 9)
#: How many standard errors separate a difference from zero before it counts as resolved.
SIGNIFICANCE = 2.0
#: The four paired comparisons of the verdict: result key -> what it means.
CHECKS = {
    "nll_gain": "NLL(weight scaling) - NLL(MC)",
    "ece_gain": "ECE(weight scaling) - ECE(MC)",
    "auroc_entropy_margin": "AUROC(MC predictive entropy) - 0.5",
    "auroc_mi_margin": "AUROC(MC mutual information) - 0.5",
}


# ---------------------------------------------------------------------------------------------
# statistics over seeds


_cell = _stats.format_cell
_metric = _stats.json_metric


# ---------------------------------------------------------------------------------------------
# protocol, data, model


@dataclass(frozen=True)
class Protocol:
    """The sizes of one run (see :func:`protocol`).

    Attributes:
        n_train: training images (``None``: the whole training split).
        n_test: in-distribution and OOD test images each (``None``: the whole test splits).
        hidden: units of each of the two hidden layers.
        p: drop probability after each hidden ReLU.
        epochs, batch_size, lr: Adam training.
        samples: MC passes ``T``.
    """

    n_train: int | None
    n_test: int | None
    hidden: int
    p: float
    epochs: int
    batch_size: int
    lr: float
    samples: int


def protocol(ctx: RunContext, data: str) -> Protocol:
    """The protocol for ``ctx.scale`` on ``data`` (``"mnist"`` or ``"digits"``).

    Example:
        >>> from pathlib import Path
        >>> protocol(RunContext("tiny", None, Path(".")), "digits").samples
        5
    """
    if data == "mnist":
        return Protocol(
            n_train=ctx.pick(2_000, None, None),
            n_test=ctx.pick(200, 2_000, None),
            hidden=ctx.pick(64, 256, 512),
            p=0.5,
            epochs=ctx.pick(1, 3, 20),
            batch_size=128,
            lr=1e-3,
            samples=ctx.pick(5, 50, 100),
        )
    return Protocol(
        n_train=ctx.pick(300, None, None),
        n_test=ctx.pick(100, None, None),
        hidden=ctx.pick(32, 128, 256),
        p=0.5,
        epochs=ctx.pick(20, 60, 200),
        batch_size=64,
        lr=1e-3,
        samples=ctx.pick(5, 50, 100),
    )


class Task(NamedTuple):
    """An in-distribution set and the out-of-distribution test images scored against it."""

    images: ImageSet
    x_out: torch.Tensor
    ood: str
    ood_source: str


def _keep_classes(images: ImageSet, classes: Sequence[int]) -> ImageSet:
    def keep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.isin(y, torch.tensor(list(classes)))
        return x[mask], y[mask]

    (x_tr, y_tr), (x_te, y_te) = keep(images.x_train, images.y_train), keep(images.x_test, images.y_test)
    return ImageSet(images.name, x_tr, y_tr, x_te, y_te, len(classes), images.source)


def _take(x: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    if n is None or n >= len(x):
        return x
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[order[:n].sort().values]


def load_task(ctx: RunContext, n_train: int | None, n_test: int | None, seed: int) -> Task:
    """In-distribution images (MNIST or digits) and the OOD images (see the module docstring).

    Fashion-MNIST test images are resized to the in-distribution side by area averaging; without
    Fashion-MNIST the classes :data:`HELD_OUT_CLASSES` become the OOD set.  Subsets are drawn
    with :func:`~dropkit.experiments.reproduce.data.subsample` (stratified) from ``seed``.
    """
    images = load_mnist_or_digits(ctx)
    side = images.x_train.shape[-1]
    try:
        fashion = load_fashion_mnist(ctx)
    except DataUnavailableError:
        kept = [c for c in range(images.classes) if c not in HELD_OUT_CLASSES]
        held = ", ".join(str(c) for c in HELD_OUT_CLASSES)
        inside = subsample(_keep_classes(images, kept), n_train, n_test, seed=seed)
        outside = images.x_test[torch.isin(images.y_test, torch.tensor(HELD_OUT_CLASSES))]
        source = f"{images.name} test images of classes {held}; Fashion-MNIST not found: {FASHION_MNIST_HINT}"
        return Task(inside, _take(outside, n_test, seed), f"{images.name} classes {held}", source)
    inside = subsample(images, n_train, n_test, seed=seed)
    outside = _take(fashion.x_test, n_test, seed)
    name = "fashion-mnist"
    if outside.shape[-1] != side:
        outside = F.adaptive_avg_pool2d(outside, side)
        name = f"fashion-mnist {side}x{side}"
    return Task(inside, outside.contiguous(), name, f"Fashion-MNIST test images ({fashion.source})")


def build_mlp(features: int, hidden: int, classes: int, p: float) -> nn.Sequential:
    """``Flatten -> Linear -> ReLU -> Dropout(p) -> Linear -> ReLU -> Dropout(p) -> Linear``.

    Inverted dropout (:class:`dropkit.nn.Dropout`), so eval mode is the weight-scaling rule.
    No dropout on the input: the deterministic first layer is the trunk that
    :func:`dropkit.mc.mc_predict` computes once for all ``T`` passes.

    Example:
        >>> [type(layer).__name__ for layer in build_mlp(64, 8, 10, 0.5)]
        ['Flatten', 'Linear', 'ReLU', 'Dropout', 'Linear', 'ReLU', 'Dropout', 'Linear']
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, hidden),
        nn.ReLU(),
        dropkit.nn.Dropout(p),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        dropkit.nn.Dropout(p),
        nn.Linear(hidden, classes),
    )


def train(
    model: nn.Module,
    images: ImageSet,
    settings: Protocol,
    *,
    seed: int,
    label: str = "train",
    progress: bool = False,
) -> float:
    """Adam on the mean cross-entropy; returns the last epoch's mean training loss.

    The batch order comes from a generator seeded with ``seed``, the dropout masks from
    dropkit's global seed (set by the caller).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    x, y = images.x_train, images.y_train
    loss_value = math.nan
    model.train()
    with Progress(label, settings.epochs, unit="epochs", enabled=progress) as bar:
        for epoch in range(settings.epochs):
            total = 0.0
            for batch in torch.randperm(len(y), generator=generator).split(settings.batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            loss_value = total / len(y)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{label}: the training loss diverged at epoch {epoch + 1}")
            bar.update(epoch + 1, {"loss": format_number(loss_value)})
    model.eval()
    return loss_value


# ---------------------------------------------------------------------------------------------
# evaluation


def histogram(values: torch.Tensor, high: float, bins: int = HIST_BINS) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over ``[0, high]`` (values above ``high`` in
    the last bin, below 0 in the first).

    Example:
        >>> histogram(torch.tensor([0.0, 0.1, 0.6, 2.0]), 1.0, bins=2)
        [2, 2]
    """
    index = (values.double() / high * bins).floor().clamp(0, bins - 1).long()
    return [int(c) for c in torch.bincount(index, minlength=bins)]


def _reliability(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float] | list[int]]:
    data = reliability_diagram_data(probs, labels, n_bins=ECE_BINS)
    counts = data.counts.double()
    return {
        "counts": [int(c) for c in data.counts],
        "confidence_sum": (data.confidence.nan_to_num(0.0) * counts).tolist(),
        "correct_sum": (data.accuracy.nan_to_num(0.0) * counts).tolist(),
    }


def score_predictions(
    ws_in: torch.Tensor,
    ws_out: torch.Tensor,
    samples_in: torch.Tensor,
    samples_out: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, Any]:
    """Every metric of the experiment from the predicted probabilities (no model).

    Args:
        ws_in, ws_out: weight-scaling probabilities ``(N_in, C)`` and ``(N_out, C)``.
        samples_in, samples_out: MC probabilities ``(T, N_in, C)`` and ``(T, N_out, C)``.
        labels: classes of the in-distribution inputs, ``(N_in,)``.

    Returns:
        A JSON-ready dict: ``accuracy``, ``nll``, ``ece`` (each ``{"mc", "ws"}``), ``auroc``
        (``mc_entropy``, ``mc_mutual_information``, ``ws_entropy``; OOD positive), ``mean_score``
        (mean entropy and mutual information in and out), ``reliability`` (per-bin counts and
        sums, ``{"mc", "ws"}``) and ``histograms`` (counts over ``[0, log C]`` in
        :data:`HIST_BINS` bins).  See the module docstring for the conventions.

    Example:
        >>> certain = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])  # T = 2 passes agree
        >>> torn = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # T = 2 passes disagree
        >>> scores = score_predictions(certain[0], torn.mean(0), certain, torn, torch.tensor([0]))
        >>> scores["auroc"]["mc_mutual_information"], scores["nll"]["mc"]
        (1.0, 0.0)
    """
    scores_in, scores_out = uncertainty_scores(samples_in), uncertainty_scores(samples_out)
    mc_in = samples_in.mean(dim=0)
    high = math.log(ws_in.shape[-1])
    result: dict[str, Any] = {"accuracy": {}, "nll": {}, "ece": {}, "reliability": {}}
    for name, probs in (("mc", mc_in), ("ws", ws_in)):
        result["accuracy"][name] = float(accuracy(probs, labels))
        result["nll"][name] = float(nll(probs, labels))
        result["ece"][name] = float(expected_calibration_error(probs, labels, n_bins=ECE_BINS).value)
        result["reliability"][name] = _reliability(probs, labels)
    entropy_in, entropy_out = scores_in.predictive_entropy, scores_out.predictive_entropy
    mi_in, mi_out = scores_in.mutual_information, scores_out.mutual_information
    result["auroc"] = {
        "mc_entropy": float(ood_detection(entropy_in, entropy_out).auroc),
        "mc_mutual_information": float(ood_detection(mi_in, mi_out).auroc),
        "ws_entropy": float(ood_detection(entropy(ws_in), entropy(ws_out)).auroc),
    }
    result["mean_score"] = {
        "entropy_in": float(entropy_in.mean()),
        "entropy_out": float(entropy_out.mean()),
        "mi_in": float(mi_in.mean()),
        "mi_out": float(mi_out.mean()),
    }
    result["histograms"] = {
        "high": high,
        "entropy_in": histogram(entropy_in, high),
        "entropy_out": histogram(entropy_out, high),
        "mi_in": histogram(mi_in, high),
        "mi_out": histogram(mi_out, high),
    }
    return result


def evaluate(
    model: nn.Module,
    x_in: torch.Tensor,
    y_in: torch.Tensor,
    x_out: torch.Tensor,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """Weight scaling (eval mode) and ``samples`` MC passes (:func:`dropkit.mc.mc_predict`, key
    ``seed``) of ``model`` on in-distribution and OOD inputs, scored by :func:`score_predictions`."""
    model.eval()
    n_in = len(y_in)
    inputs = torch.cat([x_in, x_out])
    with torch.no_grad():
        ws = torch.softmax(model(inputs), dim=-1)
    mc = mc_predict(model, inputs, T=samples, seed=seed, transform="softmax")
    return score_predictions(ws[:n_in], ws[n_in:], mc[:, :n_in], mc[:, n_in:], y_in)


def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
    """Train one dropout MLP and compare weight scaling with MC dropout (see the module docstring)."""
    dropkit.manual_seed(seed)
    torch.manual_seed(seed)
    images = load_mnist_or_digits(ctx)
    settings = protocol(ctx, images.name)
    task = load_task(ctx, settings.n_train, settings.n_test, seed)
    data = task.images
    model = build_mlp(data.features, settings.hidden, data.classes, settings.p)
    label = f"{ctx.label or 'mc-uncertainty'} train"
    loss = train(model, data, settings, seed=seed, label=label, progress=ctx.progress)
    result = evaluate(model, data.x_test, data.y_test, task.x_out, settings.samples, seed)
    return {
        "seed": seed,
        "scale": ctx.scale,
        "data": data.name,
        "data_source": data.source,
        "ood": task.ood,
        "ood_source": task.ood_source,
        "classes": data.classes,
        "side": int(data.x_train.shape[-1]),
        "n_train": len(data.y_train),
        "n_test_in": len(data.y_test),
        "n_test_out": len(task.x_out),
        "protocol": asdict(settings),
        "final_train_loss": loss,
        **result,
    }


# ---------------------------------------------------------------------------------------------
# summary


def _values(results: Sequence[Mapping[str, Any]], *path: str) -> list[float]:
    out = []
    for result in results:
        value: Any = result
        for key in path:
            value = value[key]
        out.append(float(value))
    return out


def _differences(results: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    return {
        "nll_gain": [r["nll"]["ws"] - r["nll"]["mc"] for r in results],
        "ece_gain": [r["ece"]["ws"] - r["ece"]["mc"] for r in results],
        "auroc_entropy_margin": [r["auroc"]["mc_entropy"] - 0.5 for r in results],
        "auroc_mi_margin": [r["auroc"]["mc_mutual_information"] - 0.5 for r in results],
    }


def verdict(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Verdict:
    """The rule of the module docstring applied to the seeds' results."""
    diffs = _differences(results)
    ours = (
        f"NLL {_cell(_values(results, 'nll', 'ws'))} (weight scaling) vs "
        f"{_cell(_values(results, 'nll', 'mc'))} (MC), ECE {_cell(_values(results, 'ece', 'ws'))} vs "
        f"{_cell(_values(results, 'ece', 'mc'))}, OOD AUROC of predictive entropy "
        f"{_cell(_values(results, 'auroc', 'mc_entropy'))} and of mutual information "
        f"{_cell(_values(results, 'auroc', 'mc_mutual_information'))} ({results[0]['ood']} as OOD)"
    )
    if ctx.scale == "tiny":
        return Verdict(None, f"Undecided: the tiny scale only checks that the pipeline runs. Ours: {ours}.")
    if len(results) < 2:
        return Verdict(None, f"Undecided: one seed gives no error bar. Ours: {ours}.")
    failed = [CHECKS[key] for key, values in diffs.items() if resolved_sign(values) != 1]
    if not failed:
        return Verdict(
            True, f"Held: MC dropout beats weight scaling on both scores and flags OOD inputs. {ours}."
        )
    tried = (
        f"{len(results)} seeds, T = {results[0]['protocol']['samples']} passes, "
        f"p = {results[0]['protocol']['p']}, {results[0]['n_train']} training images"
    )
    return Verdict(
        False,
        f"Not held: not above 0 at {SIGNIFICANCE:g} standard errors: {'; '.join(failed)}. {ours}. "
        f"Tried: {tried}.",
    )


def _pooled(results: Sequence[Mapping[str, Any]], *path: str) -> list[float]:
    total: list[float] = []
    for result in results:
        value: Any = result
        for key in path:
            value = value[key]
        total = [a + b for a, b in zip(total, value, strict=True)] if total else [float(v) for v in value]
    return total


def _draw_reliability(results: Sequence[Mapping[str, Any]]) -> Any:
    def draw(fig: MplFigure) -> None:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        edges = [i / ECE_BINS for i in range(ECE_BINS + 1)]
        centers = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        width = 1.0 / ECE_BINS
        for name, label, color, shift in (
            ("ws", "weight scaling", "tab:orange", -0.25),
            ("mc", f"MC dropout (T = {results[0]['protocol']['samples']})", "tab:blue", 0.25),
        ):
            counts = _pooled(results, "reliability", name, "counts")
            conf = _pooled(results, "reliability", name, "confidence_sum")
            correct = _pooled(results, "reliability", name, "correct_sum")
            filled = [i for i, c in enumerate(counts) if c > 0]
            ece = _cell(_values(results, "ece", name))
            top.plot(
                [conf[i] / counts[i] for i in filled],
                [correct[i] / counts[i] for i in filled],
                marker="o",
                color=color,
                label=f"{label}, ECE {ece}",
            )
            bottom.bar(
                [centers[i] + shift * width for i in filled],
                [counts[i] for i in filled],
                width=width / 2,
                color=color,
            )
        top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
        top.set_xlim(0.0, 1.0)
        top.set_ylim(0.0, 1.0)
        top.set_ylabel("accuracy in bin")
        top.legend(loc="upper left")
        bottom.set_yscale("log")
        bottom.set_xlabel("confidence (top-label predictive probability)")
        bottom.set_ylabel("count")

    return draw


def _draw_histograms(results: Sequence[Mapping[str, Any]]) -> Any:
    def draw(fig: MplFigure) -> None:
        high = float(results[0]["histograms"]["high"])
        edges = [high * i / HIST_BINS for i in range(HIST_BINS + 1)]
        axes = fig.subplots(1, 2)
        for ax, key, title in (
            (axes[0], "entropy", "predictive entropy H[p̄] (nats)"),
            (axes[1], "mi", "mutual information (nats)"),
        ):
            for side, label, color in (("in", "in-distribution", "tab:blue"), ("out", "OOD", "tab:red")):
                counts = _pooled(results, "histograms", f"{key}_{side}")
                total = sum(counts) or 1.0
                density = [c / total / (edges[1] - edges[0]) for c in counts]
                ax.stairs(
                    density, edges, fill=True, alpha=0.4, color=color, label=f"{label} (n={int(total)})"
                )
            ax.set_yscale("log")
            ax.set_xlabel(title)
            ax.set_ylabel("density")
            ax.legend()

    return draw


def _confidence_note(results: Sequence[Mapping[str, Any]]) -> str:
    """Mean top-label confidence against accuracy of both predictions, pooled over seeds."""
    parts = []
    for name, label in (("ws", "weight scaling"), ("mc", "MC dropout")):
        counts = sum(_pooled(results, "reliability", name, "counts"))
        confidence = sum(_pooled(results, "reliability", name, "confidence_sum")) / counts
        correct = sum(_pooled(results, "reliability", name, "correct_sum")) / counts
        gap = format_number(confidence - correct, 2)
        parts.append(
            f"{label} {format_number(confidence)} against accuracy {format_number(correct)} "
            f"(confidence - accuracy = {'' if gap.startswith('-') else '+'}{gap})"
        )
    return (
        f"Mean top-label confidence, pooled over seeds: {'; '.join(parts)}; a negative gap is "
        "underconfidence."
    )


def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
    """Tables, figures, notes and the verdict from every seed's result (no training)."""
    if not results:
        raise ValueError("results must hold at least one seed's result, got none")
    first = results[0]
    settings = first["protocol"]
    samples = settings["samples"]
    rows = []
    for key, label in (("accuracy", "accuracy"), ("nll", "NLL (nats)"), ("ece", f"ECE ({ECE_BINS} bins)")):
        ws, mc = _values(results, key, "ws"), _values(results, key, "mc")
        rows.append([label, _cell(ws), _cell(mc), _cell([b - a for a, b in zip(ws, mc, strict=True)])])
    detail = Table(
        f"Weight scaling vs MC dropout (T = {samples}) on {first['data']} test images",
        ["metric", "weight scaling", "MC dropout", "MC - weight scaling"],
        rows,
    )
    ood_rows = [
        [
            "AUROC (OOD positive)",
            _cell(_values(results, "auroc", "ws_entropy")),
            _cell(_values(results, "auroc", "mc_entropy")),
            _cell(_values(results, "auroc", "mc_mutual_information")),
        ]
    ]
    for side, label in (("in", "mean score, in-distribution"), ("out", f"mean score, OOD ({first['ood']})")):
        ood_rows.append(
            [
                label,
                "",
                _cell(_values(results, "mean_score", f"entropy_{side}")),
                _cell(_values(results, "mean_score", f"mi_{side}")),
            ]
        )
    ood = Table(
        f"Out-of-distribution detection: {first['data']} (in) vs {first['ood']} (out)",
        ["", "softmax entropy (weight scaling)", "MC predictive entropy", "MC mutual information"],
        ood_rows,
    )
    diffs = _differences(results)
    marks = {1: "yes", 0: "not resolved", -1: "no (reversed)", None: "undecided"}
    claim_rows = []
    for key, values in diffs.items():
        # The AUROC rows show the AUROC itself (the verdict tests its margin over 0.5).
        shown = [v + 0.5 for v in values] if key.startswith("auroc") else values
        label = CHECKS[key].removesuffix(" - 0.5")
        claim_rows.append(
            [
                label,
                "> 0.5" if key.startswith("auroc") else "> 0",
                "qualitative",
                _cell(shown),
                marks[resolved_sign(values)] if ctx.scale != "tiny" else "undecided",
            ]
        )
    published = Table(
        "Published vs ours",
        ["quantity", "supports the claim when (at 2 SE)", "published", "ours", "held"],
        claim_rows,
    )
    side, hidden = first["side"], settings["hidden"]
    network = f"{side * side}-{hidden}-{hidden}-{first['classes']}"
    notes = [
        f"In-distribution: {first['data']} ({side}x{side}, {first['classes']} classes, {first['n_train']:,} "
        f"training and {first['n_test_in']:,} test images; {first['data_source']}).",
        f"Out-of-distribution: {first['ood']}, {first['n_test_out']:,} images ({first['ood_source']}).",
        f"Network: {network} ReLU MLP, inverted dropout p = {settings['p']} after each hidden layer (none on "
        f"the input), Adam lr {settings['lr']}, batch {settings['batch_size']}, {settings['epochs']} epochs; "
        "the paper's models (LeNet, longer training) are larger.",
        f"MC dropout: T = {samples} passes with dropkit.mc.mc_predict; weight scaling: the same network in "
        "eval mode.",
        f"NLL in nats (natural log); ECE with {ECE_BINS} equal-width bins (top label); AUROC with OOD as the "
        "positive class; mean ± SE over seeds (ddof = 1); differences paired per seed.",
        "Verdict rule (fixed in advance): all four comparisons above 0 at 2 standard errors.",
        _confidence_note(results),
    ]
    if ctx.scale == "tiny":
        notes.append("Tiny scale: a pipeline check on a few hundred digits, not a measurement.")
    metrics: dict[str, Any] = {
        f"{key}_{name}": _metric(_values(results, key, name))
        for key in ("accuracy", "nll", "ece")
        for name in ("ws", "mc")
    }
    for name in ("mc_entropy", "mc_mutual_information", "ws_entropy"):
        metrics[f"auroc_{name}"] = _metric(_values(results, "auroc", name))
    figures = [
        Figure(
            "reliability",
            f"Reliability diagram of the {first['data']} test predictions, pooled over seeds: accuracy "
            f"against mean confidence per bin ({ECE_BINS} equal-width bins), weight scaling vs MC dropout; "
            "below, inputs per bin (log scale). Points under the diagonal are overconfident.",
            _draw_reliability(results),
        ),
        Figure(
            "uncertainty-histograms",
            f"Predictive entropy and mutual information of MC dropout on in-distribution ({first['data']}) "
            f"and OOD ({first['ood']}) test inputs, pooled over seeds (density, log scale). Gal & Ghahramani "
            "show the same qualitatively: uncertainty grows away from the training data.",
            _draw_histograms(results),
        ),
    ]
    return Summary(
        verdict=verdict(ctx, results),
        tables=[published, detail, ood],
        figures=figures,
        notes=notes,
        metrics=metrics,
    )


EXPERIMENT = Experiment(
    name="mc-uncertainty",
    title="MC dropout: calibration and out-of-distribution uncertainty",
    claim=Claim(
        statement=(
            "Averaging T stochastic dropout passes (MC dropout) gives better-calibrated predictions than the "
            "weight-scaling rule, and its uncertainty (predictive entropy, mutual information) is higher on "
            "out-of-distribution inputs, so it detects them."
        ),
        source=(
            "Gal & Ghahramani 2016, 'Dropout as a Bayesian Approximation', ICML, §5 (uncertainty grows away "
            "from the training data); scored with ECE (Guo et al. 2017) and OOD AUROC of mutual information"
        ),
        published="qualitative (figures): no NLL, ECE or AUROC for this setting in the paper",
    ),
    run_seed=run_seed,
    summarize=summarize,
    default_seeds={"tiny": 1, "quick": 3, "full": 5},
    data=("mnist or digits", "fashion-mnist (else held-out classes 5-9)"),
)
