"""``sparse-vd``: sparse variational dropout on LeNet-300-100 (Molchanov et al. 2017, Table 1).

The same experiment as ``dropkit sparse-vd`` (:mod:`dropkit.experiments.sparse_vd_mnist`):
``784 -> 300 -> 100 -> 10`` ReLU networks of
:class:`~dropkit.nn.sparse_variational.SparseVariationalLinear` layers trained with the official
recipe (Adam 1e-3, batch 100, learning rate linearly to 0 over the second half, KL warm-up), then
scored in eval mode with the weights of ``log_alpha >= 3`` pruned: test error and compression
(all weights / kept weights).

Sizes:

* **full**: the official 200-epoch recipe on MNIST (about 30 minutes per seed on two cores).
* **quick**: 8 epochs on MNIST, the recipe's schedule compressed by 8/200 (about 75 s on two
  idle cores).  Compression grows mostly while the learning rate decays late in the recipe, so
  this size reports our numbers but cannot decide the claim.
* **tiny**: 2 epochs on 300 training and 200 test images (MNIST when ``--data`` holds it, else
  scikit-learn's 8x8 digits upsampled to 28x28 so that the network is the same); no verdict.

Verdict (fixed before any run; full size only): the claim holds when the mean test error is at
most :data:`MAX_ERROR` (2.1 %, the published 1.92 % plus a fifth of a point) and the mean
compression at least :data:`MIN_COMPRESSION` (50x, about three quarters of the published 68x).

Needs ``--data DIR`` with the MNIST IDX files in ``DIR/mnist`` (or ``DIR``) at the quick and full
sizes: without them the experiment is skipped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from dropkit.experiments._console import format_mean_se, format_number
from dropkit.experiments.reproduce import _stats
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
from dropkit.experiments.reproduce.data import ImageSet, load_mnist_or_digits, subsample
from dropkit.experiments.sparse_vd_mnist import RECIPE_EPOCHS, MnistData, SparseVDConfig, run_experiment

__all__ = [
    "EXPERIMENT",
    "MAX_ERROR",
    "MIN_COMPRESSION",
    "PUBLISHED_COMPRESSION",
    "PUBLISHED_ERROR",
    "PUBLISHED_SPARSITY",
    "run_seed",
    "summarize",
]

#: Published test error (fraction), compression and per-layer sparsity (Molchanov et al. 2017).
PUBLISHED_ERROR = 0.0192
PUBLISHED_COMPRESSION = 68.0
PUBLISHED_SPARSITY = (0.989, 0.972, 0.620)
#: The verdict's bounds (full size): mean test error at most, mean compression at least.
MAX_ERROR = 0.021
MIN_COMPRESSION = 50.0
_QUICK_EPOCHS = 8
_TINY_EPOCHS = 2
_TINY_TRAIN, _TINY_TEST = 300, 200
_SIDE = 28
_NO_DATA = (
    "sparse VD's claim is about MNIST: pass --data DIR with the four MNIST IDX files in DIR/mnist "
    "(or DIR), gzip-compressed or plain; nothing is downloaded"
)


def _epochs(ctx: RunContext) -> int:
    epochs: int = ctx.pick(tiny=_TINY_EPOCHS, quick=_QUICK_EPOCHS, full=RECIPE_EPOCHS)
    return epochs


def _data(ctx: RunContext) -> tuple[MnistData, str]:
    images = load_mnist_or_digits(ctx)
    if ctx.scale != "tiny":
        if images.name != "mnist":
            raise DataUnavailableError(_NO_DATA)
    else:
        images = subsample(images, _TINY_TRAIN, _TINY_TEST, seed=0)
    source = images.source
    if images.x_train.shape[-1] != _SIDE:
        images = _upsample(images)
        source += f", upsampled to {_SIDE}x{_SIDE}"
    data = MnistData(images.x_train.flatten(1), images.y_train, images.x_test.flatten(1), images.y_test)
    return data, f"{images.name}: {source}"


def _upsample(images: ImageSet) -> ImageSet:
    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(_SIDE, _SIDE), mode="bilinear", align_corners=False).clamp(0.0, 1.0)

    return dataclasses.replace(images, x_train=up(images.x_train), x_test=up(images.x_test))


def _number(value: float) -> float | None:
    """JSON has no infinity (everything pruned gives an infinite compression)."""
    return value if math.isfinite(value) else None


def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
    """Train and score one LeNet-300-100 with seed ``seed``."""
    data, source = _data(ctx)
    config = SparseVDConfig.recipe(_epochs(ctx), seed=seed, threads=torch.get_num_threads())
    out = run_experiment(config, data, progress=ctx.progress)
    return {
        "data": source,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "config": dataclasses.asdict(config),
        "official_recipe": config.is_official,
        "test_error": out["test_error"],
        "compression": _number(out["compression"]),
        "sparsity": out["sparsity"],
        "kept": out["kept"],
        "total": out["total"],
        "layer_sparsity": [layer["sparsity"] for layer in out["layers"].values()],
        "train_seconds": out["train_seconds"],
        "history": [
            {
                "epoch": h["epoch"],
                "test_error": h["test_error"],
                "compression": _number(h["compression"]),
                "lr": h["lr"],
                "kl_weight": h["kl_weight"],
            }
            for h in out["history"]
        ],
    }


# ---------------------------------------------------------------------------------------------
# Summary


def _mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error over seeds (``ddof = 1``); no SE from one seed."""
    mean, se = _stats.mean_se(values, summation="numpy")
    return mean, None if len(values) < 2 else se


def _text(values: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    """Mean ± SE over seeds (the mean alone from one seed), times ``scale``, with ``unit``."""
    mean, se = _mean_se([v * scale for v in values])
    return f"{format_number(mean) if se is None else format_mean_se(mean, se)}{unit}"


def _seeds_text(count: int) -> str:
    return "1 seed" if count == 1 else f"mean ± SE over {count} seeds"


def _compressions(results: Sequence[Mapping[str, Any]]) -> list[float]:
    return [math.inf if r["compression"] is None else float(r["compression"]) for r in results]


def _verdict(ctx: RunContext, results: Sequence[Mapping[str, Any]], ours: str) -> Verdict:
    if ctx.scale != "full" or not all(r["official_recipe"] for r in results):
        epochs = results[0]["config"]["epochs"]
        return Verdict(
            None,
            f"Undecided: {epochs} of the recipe's {RECIPE_EPOCHS} epochs (schedule compressed to fit); "
            f"compression grows mostly while the learning rate decays late in the recipe. Ours: {ours}; "
            f"published 1.92 % at 68x.",
        )
    error = float(np.mean([r["test_error"] for r in results]))
    compression = float(np.mean(_compressions(results)))
    held = error <= MAX_ERROR and compression >= MIN_COMPRESSION
    bounds = f"bounds: error ≤ {100 * MAX_ERROR:g} %, compression ≥ {MIN_COMPRESSION:g}x"
    if held:
        return Verdict(True, f"Held: {ours} against the published 1.92 % at 68x ({bounds}).")
    return Verdict(False, f"Did not hold: {ours} against the published 1.92 % at 68x ({bounds}).")


def _figure(results: Sequence[Mapping[str, Any]]) -> Figure:
    def draw(fig: Any) -> None:
        ax_error, ax_comp = fig.subplots(1, 2)
        for r in results:
            epochs = [h["epoch"] for h in r["history"]]
            label = f"seed {r['config']['seed']}"
            ax_error.plot(epochs, [100 * h["test_error"] for h in r["history"]], label=label)
            comp = [math.nan if h["compression"] is None else h["compression"] for h in r["history"]]
            ax_comp.plot(epochs, comp, label=label)
        ax_error.axhline(100 * PUBLISHED_ERROR, color="grey", linestyle="--", label="published")
        ax_comp.axhline(PUBLISHED_COMPRESSION, color="grey", linestyle="--", label="published")
        ax_error.set_xlabel("epoch")
        ax_error.set_ylabel("test error (%)")
        ax_comp.set_xlabel("epoch")
        ax_comp.set_ylabel("compression (x)")
        ax_comp.set_yscale("log")
        ax_comp.legend(fontsize="small")

    return Figure(
        "training",
        "Test error (left) and compression (right, log scale) after each epoch, pruned mean weights in "
        "eval mode; dashed: the published 1.92 % and 68x after the 200-epoch recipe.",
        draw,
    )


def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
    """Test error, compression and layer sparsity against the published numbers."""
    errors = [r["test_error"] for r in results]
    compressions = _compressions(results)
    ours = f"{_text(errors, 100, ' %')} at {_text(compressions, 1, 'x')} ({_seeds_text(len(results))})"
    layers = list(zip(*(r["layer_sparsity"] for r in results), strict=True))
    rows = [
        ["test error (%)", format_number(100 * PUBLISHED_ERROR), _text(errors, 100)],
        ["compression (x)", format_number(PUBLISHED_COMPRESSION), _text(compressions)],
    ]
    for i, values in enumerate(layers):
        published = format_number(100 * PUBLISHED_SPARSITY[i]) if i < len(PUBLISHED_SPARSITY) else "-"
        rows.append([f"sparsity of layer {i + 1} (%)", published, _text(values, 100)])
    rows.append(["epochs", str(RECIPE_EPOCHS), str(results[0]["config"]["epochs"])])
    first = results[0]
    config = first["config"]
    notes = [
        f"Data: {first['data']}; {first['n_train']} training and {first['n_test']} test images.",
        (
            "The official recipe: 200 epochs, batch 100, Adam 1e-3 then linearly to 0 from epoch 100, "
            "KL weight 0 until epoch 5 and 1 from epoch 20, pruning at log_alpha >= 3."
            if first["official_recipe"]
            else f"NOT the published recipe: {config['epochs']} epochs, the schedule compressed by "
            f"{config['epochs']}/{RECIPE_EPOCHS} (lr decay from epoch {config['lr_decay_start']:g}, "
            f"KL warm-up {config['kl_start']:g} -> {config['kl_end']:g})."
        ),
        f"Seeds: {len(results)}; mean ± SE over seeds (ddof = 1).",
        f"Held means (full size only): mean test error ≤ {100 * MAX_ERROR:g} % and mean compression ≥ "
        f"{MIN_COMPRESSION:g}x.",
        "Published: Molchanov, Ashukha & Vetrov 2017, 'Variational Dropout Sparsifies Deep Neural Networks', "
        "ICML, Table 1 (LeNet-300-100: 1.92 % error, 68x; layers 98.9 / 97.2 / 62.0 % sparse).",
    ]
    return Summary(
        verdict=_verdict(ctx, results, ours),
        tables=[
            Table(
                "Published vs ours: LeNet-300-100 with sparse VD",
                ["quantity", "published", f"ours ({_seeds_text(len(results))})"],
                rows,
            )
        ],
        figures=[_figure(results)],
        notes=notes,
        metrics={
            "test_error": list(_mean_se(errors)),
            "compression": list(_mean_se([c for c in compressions if math.isfinite(c)] or [math.nan])),
            "epochs": results[0]["config"]["epochs"],
        },
        ours=ours,
    )


EXPERIMENT = Experiment(
    name="sparse-vd",
    title="Sparse variational dropout compresses LeNet-300-100 (Molchanov et al. 2017)",
    claim=Claim(
        statement=(
            "Sparse variational dropout prunes LeNet-300-100 on MNIST 68-fold (98.9 / 97.2 / 62.0 % of the "
            "weights of its three layers) at 1.92 % test error."
        ),
        source=(
            "Molchanov, Ashukha & Vetrov 2017, 'Variational Dropout Sparsifies Deep Neural Networks', "
            "ICML, Table 1"
        ),
        published="1.92 % test error at 68x compression",
    ),
    run_seed=run_seed,
    summarize=summarize,
    default_seeds={"tiny": 1, "quick": 1, "full": 1},
    data=("MNIST from DATA/mnist (tiny: scikit-learn digits upsampled to 28x28 without it)",),
)
