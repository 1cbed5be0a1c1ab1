r"""``variance-shift``: dropout before BatchNorm shifts the variance (Li et al. 2019).

A small DenseNet-BC-style network (a stem convolution, ``layers`` dense layers of BN -> ReLU
-> 1x1 convolution -> BN -> ReLU -> 3x3 convolution whose output is concatenated to their
input, then BN -> ReLU -> global average pool -> linear) is trained on MNIST (``--data``) or
scikit-learn's digits in up to four variants, all from the same initial weights and on the
same mini-batches:

* ``no dropout``;
* ``dropout before BN``: :class:`dropkit.nn.Dropout` (``p = 0.5``) after both convolutions of
  every dense layer, as in the DenseNet bottlenecks of Li et al.: it feeds the layer's second
  BatchNorm directly and, through the concatenation, the BatchNorms of every later layer;
* ``dropout after last BN``: the same dropout once, after the last BatchNorm (before the
  classifier), the first fix of Li et al.;
* ``Gaussian dropout before BN`` (``full`` only): :class:`dropkit.nn.GaussianDropout` of the
  same rate in place of every dropout.  Its multiplier has the variance :math:`p/(1-p)` of
  inverted dropout, hence :math:`E[\xi^2] = 1/q` too, so Li et al.'s formula predicts the
  *same* shift; the experiment checks that prediction (only noise of smaller variance, such
  as Li et al.'s "Uout", shifts less).

Each trained network is scored on the test set twice: with the BatchNorm running statistics
learned in training, and after :func:`recalibrate_batchnorm` re-estimates them on the training
set with BatchNorm in train mode and dropout off (Li et al.'s adjustment of the moving
statistics).  The gap between the two is what the variance shift costs.  For the variants with
dropout before BatchNorm, :func:`dropkit.diagnostics.variance_shift.measure_variance_shift`
measures, per BatchNorm fed directly by dropout and per channel, the ratio
:math:`\mathrm{Var}_{test}/\mathrm{Var}_{train}` of its input on a test batch next to the
prediction :math:`q\,v/(v + (1-q)\,c^2)` from that batch's eval mean :math:`c` and variance
:math:`v` (the BatchNorms reached through a concatenation mix shifted and unshifted channels
and are not measured).

The concatenation matters.  A plain chain of BN -> ReLU -> conv -> dropout blocks was tried
first: there, re-estimating the statistics gained nothing (within a point, four sizes), the
shift presumably rescaling each channel's eval activations by a factor that the following
layers pass on nearly proportionally to the logits.  Mixing channels shifted once, several
times and never (the stem) through the concatenation, as Li et al.'s DenseNets do, is what
turns the shift into errors here.

Sizes: ``tiny`` (tests) growth 4, 2 layers, 1 epoch on 128 digits; ``quick`` growth 12, 3
layers, 8 epochs on all 1,257 training digits (MNIST: 2,000 images, 8 epochs); both without the
Gaussian variant (dropkit's Gaussian noise costs about ten times a Bernoulli mask on a CPU);
``full`` growth 12, 6 layers, 40 epochs on digits (MNIST: all 60,000 images, 10 epochs) with
all four variants.  Li et al. train DenseNet-BC (depth 100) on CIFAR-100 for 300 epochs: a
GPU-scale protocol this CPU reproduction reduces to a few dense layers on digit images.

Reference: Li, Chen, Hu, Yang, "Understanding the Disharmony between Dropout and Batch
Normalization by Variance Shift", CVPR 2019.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import dropkit
from dropkit.diagnostics.variance_shift import measure_variance_shift
from dropkit.experiments._console import Progress, format_number
from dropkit.experiments.reproduce import _stats
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

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

__all__ = [
    "EXPERIMENT",
    "DenseLayer",
    "P",
    "VARIANTS",
    "build_network",
    "recalibrate_batchnorm",
    "run_seed",
    "summarize",
]

#: The drop rate of every dropout layer (Li et al.'s DenseNet bottlenecks use 0.5).
P = 0.5
#: Variant key -> label, in table order.
VARIANTS: dict[str, str] = {
    "none": "no dropout",
    "before_bn": "dropout before BN",
    "after_last_bn": "dropout after last BN",
    "gaussian_before_bn": "Gaussian dropout before BN",
}
#: The variants whose dropout feeds a BatchNorm (their shift is measured).
SHIFTED = ("before_bn", "gaussian_before_bn")
#: The formula counts as followed when the mean relative error over channels is below this.
FORMULA_TOLERANCE = 0.05
_LR = 2e-3
_BATCH = 64

CLAIM = Claim(
    statement=(
        "Dropout before BatchNorm makes the variance of the BatchNorm input shift between "
        "training and inference by Var_test/Var_train = q·v/(v + (1-q)·c²), which costs test "
        "accuracy; putting dropout after the last BatchNorm, or re-estimating the BatchNorm "
        "statistics with dropout off, recovers it."
    ),
    source="Li, Chen, Hu, Yang 2019 (CVPR)",
    published=(
        "DenseNet-BC on CIFAR-100: 77.42 % accuracy without dropout in the bottlenecks vs 68.55 % "
        "with dropout 0.5 in each"
    ),
)


@dataclass(frozen=True)
class _Size:
    train: int | None
    test: int | None
    growth: int
    layers: int
    epochs: int
    measure_batch: int
    repeats: int
    gaussian: bool


def _size(ctx: RunContext, data: ImageSet) -> _Size:
    if data.name == "digits":
        size: _Size = ctx.pick(
            tiny=_Size(128, 64, 4, 2, 1, 64, 2, False),
            quick=_Size(None, None, 12, 3, 8, 270, 4, False),
            full=_Size(None, None, 12, 6, 40, 540, 8, True),
        )
    else:
        size = ctx.pick(
            tiny=_Size(128, 64, 4, 2, 1, 64, 2, False),
            quick=_Size(2000, 2000, 12, 3, 8, 500, 4, False),
            full=_Size(None, None, 12, 6, 10, 1000, 8, True),
        )
    return size


def _noise(variant: str) -> nn.Module:
    """The dropout that follows every convolution of a dense layer in this variant."""
    if variant == "before_bn":
        return dropkit.nn.Dropout(P)
    if variant == "gaussian_before_bn":
        return dropkit.nn.GaussianDropout(P)
    return nn.Identity()


class DenseLayer(nn.Module):
    """A DenseNet-BC layer: BN -> ReLU -> 1x1 conv -> [dropout] -> BN -> ReLU -> 3x3 conv ->
    [dropout], its ``growth`` new channels concatenated to its input.

    The first dropout feeds the second BatchNorm directly; the second one reaches the
    BatchNorms of every later layer through the concatenation (as in Li et al.'s DenseNets).
    """

    def __init__(self, channels: int, growth: int, variant: str) -> None:
        super().__init__()
        width = 4 * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, width, 1, bias=False),
            _noise(variant),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, growth, 3, padding=1, bias=False),
            _noise(variant),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def build_network(variant: str, growth: int, layers: int, side: int, classes: int = 10) -> nn.Sequential:
    """The DenseNet-BC-style network of one variant (see the module docstring).

    A 3x3 stem convolution to ``2 * growth`` channels (for images of side 16 or more with
    stride 2, then a 2x2 average pool), ``layers`` :class:`DenseLayer` s, then BN -> ReLU ->
    global average pool -> [dropout, in ``"after_last_bn"``] -> linear.

    Args:
        variant: a key of :data:`VARIANTS`.
        growth: channels each dense layer adds.
        layers: dense layers (>= 1).
        side: image height and width.
        classes: outputs.

    Raises:
        ValueError: unknown variant, or a size below 1.

    Example::

        >>> net = build_network("before_bn", growth=4, layers=2, side=8)
        >>> net(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    for name, value in (("growth", growth), ("layers", layers), ("side", side), ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    channels = 2 * growth
    modules: list[nn.Module] = []
    if side >= 16:
        modules += [nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False), nn.AvgPool2d(2)]
    else:
        modules.append(nn.Conv2d(1, channels, 3, padding=1, bias=False))
    for _ in range(layers):
        modules.append(DenseLayer(channels, growth, variant))
        channels += growth
    modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if variant == "after_last_bn":
        modules.append(dropkit.nn.Dropout(P))
    modules.append(nn.Linear(channels, classes))
    return nn.Sequential(*modules)


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch: int = 500) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``images``.

    Every BatchNorm's running mean and variance are reset and recomputed as the cumulative
    average over the batches of ``images`` (``momentum=None``), with the BatchNorm layers in
    train mode and everything else, dropout included, in eval mode.  The copy is returned in
    eval mode; ``model`` is not changed.

    Raises:
        ValueError: ``batch`` below 1 or no images.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    if len(images) == 0:
        raise ValueError("images must hold at least one image, got 0")
    copied = copy.deepcopy(model).eval()
    norms = [m for m in copied.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            copied(images[start : start + batch])
    return copied.eval()


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 1000):
            logits = model(images[start : start + 1000])
            correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / len(labels)


def _train(model: nn.Module, data: ImageSet, epochs: int, seed: int, label: str, progress: bool) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
    steps = epochs * math.ceil(len(data.y_train) / _BATCH)
    # Cosine decay to 0: the weights settle, so the running statistics are not stale at the end.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order = torch.Generator().manual_seed(seed)
    with Progress(label, epochs, unit="epochs", enabled=progress) as bar:
        for epoch in range(epochs):
            model.train()
            permutation = torch.randperm(len(data.y_train), generator=order)
            for start in range(0, len(permutation), _BATCH):
                index = permutation[start : start + _BATCH]
                loss = nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            bar.update(epoch + 1, {"loss": format_number(float(loss.detach()))})


def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
    """Train the variants from one seed; accuracies and the measured shifts."""
    images = load_mnist_or_digits(ctx)
    size = _size(ctx, images)
    data = subsample(images, size.train, size.test, seed=seed)
    side = int(data.x_train.shape[-1])
    variants: dict[str, Any] = {}
    for key, label in VARIANTS.items():
        if key == "gaussian_before_bn" and not size.gaussian:
            continue
        torch.manual_seed(seed)
        dropkit.manual_seed(seed)
        model = build_network(key, size.growth, size.layers, side, data.classes)
        _train(model, data, size.epochs, seed, f"{ctx.label or 'variance-shift'} {label}", ctx.progress)
        recalibrated = recalibrate_batchnorm(model, data.x_train)
        entry: dict[str, Any] = {
            "accuracy": _accuracy(model, data.x_test, data.y_test),
            "recalibrated_accuracy": _accuracy(recalibrated, data.x_test, data.y_test),
        }
        if key in SHIFTED:
            shifts = measure_variance_shift(
                model, data.x_test[: size.measure_batch], repeats=size.repeats, seed=seed
            )
            entry["shifts"] = [shift.to_dict() for shift in shifts]
        variants[key] = entry
    return {
        "data": data.name,
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "p": P,
        "growth": size.growth,
        "layers": size.layers,
        "epochs": size.epochs,
        "variants": variants,
    }


# ---------------------------------------------------------------------------------------------
# Summary


#: Mean ± SE over seeds, sums left to right.
_STATS = _stats.BUILTIN_SUM


def _present(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The variants every seed ran, in table order."""
    return [key for key in VARIANTS if all(key in r["variants"] for r in results)]


def _shift_means(result: Mapping[str, Any], key: str) -> tuple[float, float, float]:
    """Channel means of (measured, predicted) over every shifted BatchNorm of one seed, and the
    mean relative error |measured - predicted| / predicted over all their channels."""
    measured = [m for shift in result["variants"][key]["shifts"] for m in shift["measured"]]
    predicted = [m for shift in result["variants"][key]["shifts"] for m in shift["predicted"]]
    if not measured:
        return math.nan, math.nan, math.nan
    errors = [abs(m - p) / p for m, p in zip(measured, predicted, strict=True) if p > 0]
    return (
        sum(measured) / len(measured),
        sum(predicted) / len(predicted),
        sum(errors) / len(errors) if errors else math.nan,
    )


def _accuracies(results: Sequence[Mapping[str, Any]], key: str, field: str) -> list[float]:
    return [float(r["variants"][key][field]) for r in results]


def _paired(
    results: Sequence[Mapping[str, Any]], plus: tuple[str, str], minus: tuple[str, str]
) -> list[float]:
    return [
        float(r["variants"][plus[0]][plus[1]]) - float(r["variants"][minus[0]][minus[1]]) for r in results
    ]


def _verdict(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Verdict:
    n = len(results)
    worst_error = max(_shift_means(r, "before_bn")[2] for r in results)
    loss = _paired(results, ("none", "accuracy"), ("before_bn", "accuracy"))
    after = _paired(results, ("after_last_bn", "accuracy"), ("before_bn", "accuracy"))
    gain = _paired(results, ("before_bn", "recalibrated_accuracy"), ("before_bn", "accuracy"))
    published = "published (DenseNet-BC, CIFAR-100): 77.42 % without vs 68.55 % with dropout before BN"
    ours = (
        f"ours (mean ± SE over {_stats.seeds(n)}): dropout before BN loses "
        f"{_STATS.cell(loss, scale=100)} points against no dropout, dropout after the last BN gains "
        f"{_STATS.cell(after, scale=100)} points over it, re-estimating the BN statistics gains "
        f"{_STATS.cell(gain, scale=100)} points; the measured shift is within "
        f"{format_number(100 * worst_error, 2)} % of the formula"
    )
    if ctx.scale == "tiny":
        return Verdict(None, f"Undecided at the tiny scale (a smoke test): {ours}; {published}.")
    if n < 2:
        return Verdict(None, f"Undecided with one seed (no error bar): {ours}; {published}.")
    checks = (
        (
            worst_error <= FORMULA_TOLERANCE,
            f"the measured shift is off the formula by more than {100 * FORMULA_TOLERANCE:g} %",
        ),
        (_above_zero(loss), "dropout before BN did not cost accuracy by more than 2 SE"),
        (_above_zero(after), "dropout after the last BN did not beat dropout before BN by more than 2 SE"),
        (
            _above_zero(gain),
            "re-estimating the BN statistics (same weights) did not gain more than 2 SE, "
            "so the accuracy lost is not shown to be the shift's",
        ),
    )
    failed = [text for ok, text in checks if not ok]
    if not failed:
        return Verdict(True, f"Held: {ours}; {published}.")
    return Verdict(
        False,
        f"Did not hold: {'; '.join(failed)}. {ours}; {published}. Tried: the variants of the table from "
        "the same initial weights and mini-batches, each scored with learned and re-estimated BN "
        "statistics.",
    )


def _above_zero(values: Sequence[float]) -> bool:
    """The paired differences are positive by more than 2 standard errors."""
    mean, se = _STATS.mean_se(values)
    return not math.isnan(se) and mean - 2 * se > 0


def _scatter_points(results: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    points: dict[str, tuple[list[float], list[float]]] = {}
    for key in (k for k in _present(results) if k in SHIFTED):
        xs: list[float] = []
        ys: list[float] = []
        for r in results:
            for shift in r["variants"][key]["shifts"]:
                xs += [float(v) for v in shift["predicted"]]
                ys += [float(v) for v in shift["measured"]]
        points[key] = (xs, ys)
    return points


def _draw_scatter(results: Sequence[Mapping[str, Any]]) -> Any:
    points = _scatter_points(results)

    def draw(fig: MplFigure) -> None:
        ax = fig.add_subplot(1, 1, 1)
        low, high = 1.0, 0.0
        for (key, (xs, ys)), marker in zip(points.items(), ("o", "^"), strict=False):
            if xs:
                ax.scatter(xs, ys, s=12, alpha=0.6, marker=marker, label=VARIANTS[key])
                low, high = min(low, *xs, *ys), max(high, *xs, *ys)
        ax.plot([low, high], [low, high], color="black", linewidth=1, label="measured = formula")
        ax.set_xlabel("formula q·v / (v + (1-q)·c²)")
        ax.set_ylabel("measured Var_test / Var_train")
        ax.set_title("Variance shift at the BatchNorm inputs, per channel")
        ax.legend(loc="upper left")

    return draw


def _draw_bars(results: Sequence[Mapping[str, Any]]) -> Any:
    labels = [VARIANTS[key] for key in _present(results)]
    columns = {
        field: [
            _STATS.mean_se([100 * a for a in _accuracies(results, key, field)]) for key in _present(results)
        ]
        for field in ("accuracy", "recalibrated_accuracy")
    }

    def draw(fig: MplFigure) -> None:
        ax = fig.add_subplot(1, 1, 1)
        width = 0.38
        positions = list(range(len(labels)))
        for offset, field, name in (
            (-width / 2, "accuracy", "BN statistics from training"),
            (width / 2, "recalibrated_accuracy", "recalibrated"),
        ):
            means = [mean for mean, _ in columns[field]]
            errors = [0.0 if math.isnan(se) else se for _, se in columns[field]]
            ax.bar([x + offset for x in positions], means, width, yerr=errors, capsize=3, label=name)
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=15, ha="right")
        ax.set_ylabel("test accuracy (%)")
        lowest = min(mean for values in columns.values() for mean, _ in values)
        ax.set_ylim(max(0.0, lowest - 5.0), 100.0)
        ax.set_title("Test accuracy, mean ± SE over seeds")
        ax.legend(loc="lower left")

    return draw


def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
    """Tables, figures and the verdict from every seed's :func:`run_seed` result."""
    if not results:
        raise ValueError("results must hold at least one seed's result, got none")
    first = results[0]
    n = len(results)
    rows = []
    for key in _present(results):
        label = VARIANTS[key]
        if key in SHIFTED:
            means = [_shift_means(r, key) for r in results]
            measured = _STATS.cell([m[0] for m in means])
            predicted = _STATS.cell([m[1] for m in means])
        else:
            measured = predicted = "1 (no dropout feeds a BN)"
        rows.append(
            [
                label,
                measured,
                predicted,
                _STATS.cell(_accuracies(results, key, "accuracy"), scale=100),
                _STATS.cell(_accuracies(results, key, "recalibrated_accuracy"), scale=100),
            ]
        )
    detail = Table(
        title=f"Variance shift and test accuracy (%), mean ± SE over {_stats.seeds(n)}",
        columns=(
            "variant",
            "measured shift Var_test/Var_train",
            "formula q·v/(v+(1-q)c²)",
            "test accuracy",
            "test accuracy, BN recalibrated",
        ),
        rows=rows,
    )
    cost = _paired(results, ("before_bn", "recalibrated_accuracy"), ("before_bn", "accuracy"))
    errors = [_shift_means(r, "before_bn")[2] for r in results]
    comparison = Table(
        title="Published vs ours",
        columns=("quantity", "published", "ours"),
        rows=[
            [
                "accuracy without / with dropout before BN (%)",
                "77.42 / 68.55 (DenseNet-BC, CIFAR-100)",
                f"{_STATS.cell(_accuracies(results, 'none', 'accuracy'), scale=100)} / "
                f"{_STATS.cell(_accuracies(results, 'before_bn', 'accuracy'), scale=100)} ({first['data']})",
            ],
            [
                "accuracy recovered by dropout after the last BN (%)",
                "dropout after all BN layers avoids the shift",
                _STATS.cell(_accuracies(results, "after_last_bn", "accuracy"), scale=100),
            ],
            [
                "accuracy gained by recalibrating BN statistics (points)",
                "re-estimating the moving statistics with dropout off recovers accuracy",
                _STATS.cell(cost, scale=100),
            ],
            [
                "relative error of the formula, mean over channels",
                "Var_test/Var_train = q·v/(v+(1-q)c²)",
                f"{_STATS.cell([100 * e for e in errors])} %",
            ],
        ],
    )
    figures = [
        Figure(
            name="shift-vs-formula",
            caption=(
                "Measured Var_test/Var_train of every BatchNorm input fed by dropout, one point per "
                "channel and seed, against Li et al.'s formula from the channel's eval mean and "
                "variance; points on the diagonal follow the formula (Li et al. derive it for one "
                "unit and measure the shift in trained networks)."
            ),
            draw=_draw_scatter(results),
        ),
        Figure(
            name="accuracy",
            caption=(
                "Test accuracy of each variant with the BatchNorm statistics learned in training and "
                "re-estimated with dropout off; the gap of 'dropout before BN' is the cost of the shift."
            ),
            draw=_draw_bars(results),
        ),
    ]
    notes = [
        f"Data: {first['data']}, {first['n_train']} training and {first['n_test']} test images; "
        f"network: {first['layers']} DenseNet-BC layers of growth {first['growth']}, "
        f"{_stats.count(first['epochs'], 'epoch')} of Adam (lr {_LR:g}, batch {_BATCH}); "
        f"dropout p = {first['p']}.",
        "Reduced from Li et al.'s DenseNet-BC (depth 100) on CIFAR-100 (300 epochs) to a few dense "
        "layers on digit images; the mechanism (dropout feeding BatchNorm, channels concatenated) is "
        "the same, the accuracies are not comparable across data sets.",
        "Recalibration re-estimates every BatchNorm's running mean and variance on the training set "
        "(cumulative average over batches of 500) with BatchNorm in train mode and dropout off.",
        "Gaussian dropout of the same rate has the same second moment 1/q, so the formula predicts "
        "the same shift as Bernoulli dropout: it is not a fix at equal variance (Li et al.'s Uout "
        "lowers the variance instead)"
        + ("." if "gaussian_before_bn" in _present(results) else "; this scale does not run it (full does)."),
        "The shift is measured with dropkit.diagnostics.measure_variance_shift on a test batch, at the "
        "BatchNorm inside each dense layer (fed directly by dropout): only that dropout is on, "
        "BatchNorm in eval; BatchNorms behind a concatenation are not measured.",
    ]
    metrics: dict[str, Any] = {
        "accuracy_recalibration_gain": _STATS.json_pair(cost),
        "formula_relative_error": _STATS.json_pair(errors),
    }
    for key in _present(results):
        metrics[f"accuracy_{key}"] = _STATS.json_pair(_accuracies(results, key, "accuracy"))
    ours = (
        f"{_STATS.cell(_accuracies(results, 'none', 'accuracy'), scale=100)} % / "
        f"{_STATS.cell(_accuracies(results, 'before_bn', 'accuracy'), scale=100)} % "
        "without / with dropout before BN "
        f"({first['data']}); recalibrating BN: {_STATS.cell(cost, scale=100)} points; shift within "
        f"{format_number(100 * max(errors), 2)} % of the formula"
    )
    return Summary(
        verdict=_verdict(ctx, results),
        tables=(comparison, detail),
        figures=figures,
        notes=notes,
        metrics=metrics,
        ours=ours,
    )


EXPERIMENT = Experiment(
    name="variance-shift",
    title="Dropout before BatchNorm: the variance shift (Li et al. 2019)",
    claim=CLAIM,
    run_seed=run_seed,
    summarize=summarize,
    default_seeds={"tiny": 1, "quick": 3, "full": 5},
    data=("mnist or digits",),
)
