"""``mnist-mlp``: the same MLP without dropout, with dropout, and with dropout and max-norm.

Srivastava et al. (JMLR 2014), Table 2 and Table 9: on MNIST a fully connected ReLU network
reaches 1.60 % test error without dropout, 1.25 % with dropout (retain probability 0.8 on the
input, 0.5 on the hidden units) and 1.05 % with dropout and a max-norm constraint on the
incoming weight vector of every hidden unit.  This experiment trains the three variants from
the same initial weights on the same mini-batches and checks the ordering
no dropout > dropout > dropout + max-norm in test error.

Protocol (Appendix B.1, reduced where the scale asks for it): no preprocessing (pixels in
``[0, 1]``), mini-batches of 100, SGD with momentum rising linearly from 0.5 to 0.95 over the
first third of the epochs and a learning rate decaying exponentially to a tenth, in Hinton's
form ``v <- m v - (1 - m) eps grad``.  Max-norm projects each hidden unit's incoming weights
onto the ball of radius ``c`` after every update.  ``eps`` of each variant and ``c`` (2, in the
paper's range 2-4) were chosen once on held-out training images (see :data:`LEARNING_RATES`)
and are the same at every scale and seed.  Dropout is the paper's formulation
(:class:`dropkit.nn.Dropout` with ``inverted=False``: ``r * x`` while training, ``q * x`` at
test time), so that ``c`` bounds the same weights as in the paper.

Scales (MNIST with ``--data``; scikit-learn's 8x8 digits without):

* ``tiny``: 64-64 hidden units; digits: 500 training images, 20 epochs; MNIST: 1,000
  training and 1,000 test images, 5 epochs.
* ``quick``: 256-256 hidden units; MNIST: 3,000 training images (stratified, drawn with the
  seed) and the whole test set, 40 epochs (1,200 updates); digits: 100 epochs.
* ``full``: MNIST: Table 9's 784-1024-1024-2048-10 on all 60,000 images for 30 epochs (18,000
  updates; the paper trains for about 10^6); digits: 1024-1024, 300 epochs.  About 70 s of
  one CPU thread per epoch and network: some 5 hours for the three seeds (not run here).

The module also holds what the other Srivastava reproductions share (``ensemble-vs-scaling``,
``rate-and-size``, ``coadaptation``): the MLP, the SGD schedule and its training loop, the
test error, and mean ± standard error over seeds.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import dropkit
from dropkit._validation import check_int
from dropkit.experiments._console import Progress, format_number
from dropkit.experiments._files import write_atomic
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

__all__ = [
    "EXPERIMENT",
    "LEARNING_RATES",
    "MAX_NORM",
    "MODELS",
    "MLPProtocol",
    "SGDSchedule",
    "apply_max_norm",
    "build_mlp",
    "classification_error",
    "data_note",
    "drop_probability",
    "flat",
    "format_percent",
    "mean_paired_se",
    "mean_se",
    "misclassified",
    "paired_se",
    "resolved_sign",
    "run_label",
    "run_seed",
    "summarize",
    "train_sgd",
]

#: The max-norm bound of the reproduction (Srivastava et al. use c in 2-4), and ``eps`` of
#: each variant: the best on held-out training images in a pilot (MNIST, 3,000 training
#: examples, 256-256 hidden units, 40 epochs, seed 0; eps in {0.5, 1, 2} without dropout,
#: {1, 2, 3, 5} with dropout, and c in {2, 2.5, 3} with eps in {2, 3, 5, 10} with max-norm).
MAX_NORM = 2.0
LEARNING_RATES = {"no dropout": 1.0, "dropout": 3.0, "dropout + max-norm": 3.0}
#: The three variants, in the order of the published claim (highest error first).
MODELS = ("no dropout", "dropout", "dropout + max-norm")
#: Published test errors (%) of Table 9 (784-1024-1024-2048-10) for the three variants; the
#: network without dropout is the L2-regularized one (1.62 %), Table 2's standard net has 1.60 %.
PUBLISHED = {"no dropout": 1.60, "dropout": 1.25, "dropout + max-norm": 1.05}
#: How many standard errors separate a difference from zero before it counts as resolved.
SIGNIFICANCE = _stats.SIGNIFICANCE
#: An SE at most this fraction of the mean is float rounding, reported as 0 (:func:`mean_se`).
ZERO_RELATIVE = 1e-12


# ---------------------------------------------------------------------------------------------
# Shared by the Srivastava reproductions


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation over ``sqrt(n)``);
    the standard error is NaN for fewer than two values.

    Example:
        >>> mean, se = mean_se([1.0, 2.0, 3.0])
        >>> mean, round(se, 6)
        (2.0, 0.57735)
        >>> mean_se([4.0])
        (4.0, nan)
        >>> mean_se([0.0634 - 0.0544, 0.0701 - 0.0611])[1]
        0.0
    """
    # Equal values computed along different paths (0.0634 - 0.0544 and 0.0701 - 0.0611)
    # differ by rounding only: their spread is 0, not 1e-18.
    return _stats.mean_se(values, zero_relative=ZERO_RELATIVE)


def format_percent(values: Sequence[float]) -> str:
    """Fractions as ``mean ± SE`` in percent (just the mean with one value).

    Example:
        >>> format_percent([0.0125, 0.0131]), format_percent([0.02])
        ('1.28 ± 0.03', '2.00')
    """
    return _stats.format_cell(values, scale=100.0, zero_relative=ZERO_RELATIVE)


def resolved_sign(values: Sequence[float], margin: float = 0.0, floor: float = 0.0) -> int | None:
    """The sign of a quantity measured once per seed, when its error bar resolves it.

    The error bar is ``SE = sqrt(SE_seeds**2 + floor**2)``: the standard error over seeds and a
    noise ``floor`` that seeds do not average away, such as that of a test set shared by every
    seed (:func:`paired_se`).  Returns ``1`` when ``mean - 2 SE > margin``, ``-1`` when
    ``mean + 2 SE < -margin``, ``0`` when neither, and ``None`` for a single value (no error bar
    over seeds).

    Example:
        >>> resolved_sign([0.3, 0.4, 0.5]), resolved_sign([0.3, -0.4]), resolved_sign([1.0])
        (1, 0, None)
        >>> resolved_sign([0.3, 0.4, 0.5], floor=0.2)
        0
    """
    return _stats.resolved_sign(values, margin=margin, floor=floor, zero_relative=ZERO_RELATIVE)


def paired_se(wrong_a: Sequence[int], wrong_b: Sequence[int], n: int) -> float:
    """Standard error of the difference of two error rates on the same ``n`` test examples.

    McNemar's: with ``b`` examples only model A gets wrong and ``c`` only model B,
    ``sqrt(b + c - (b - c)**2 / n) / n``.  Examples both get right or both get wrong carry no
    information about the difference, so two similar models are compared far more precisely
    than their error rates alone would allow.

    Args:
        wrong_a, wrong_b: indices of the examples each model misclassifies.
        n: number of test examples, >= 1.

    Example:
        >>> paired_se([1, 2, 3], [1, 2, 3], 100), round(paired_se([1, 2, 3, 4], [1], 100), 4)
        (0.0, 0.0171)
    """
    check_int(n, "n", 1)
    a, b = set(wrong_a), set(wrong_b)
    only_a, only_b = len(a - b), len(b - a)
    return math.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n


def mean_paired_se(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n: int) -> float:
    """:func:`paired_se` averaged over seeds (one pair of misclassified-index lists each)."""
    return math.fsum(paired_se(a, b, n) for a, b in pairs) / len(pairs)


def flat(images: ImageSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_test, y_test`` with each image flattened to ``(N, H * W)``."""
    return (
        images.x_train.reshape(len(images.x_train), -1),
        images.y_train,
        images.x_test.reshape(len(images.x_test), -1),
        images.y_test,
    )


def data_note(record: Mapping[str, Any]) -> str:
    """A sentence for the report: which data set, how many examples, from where (from a stored
    result with ``data``, ``source``, ``n_train`` and ``n_test``)."""
    sizes = f"{int(record['n_train']):,} training and {int(record['n_test']):,} test examples"
    if record["data"] == "digits":
        return f"Data: scikit-learn's 8x8 digits, not MNIST (no --data given; {sizes})."
    return f"Data: {record['data']} ({sizes}; {record['source']})."


def drop_probability(retain: float) -> float:
    """``1 - retain`` without the rounding noise of the subtraction (0.2, not 0.19999999999999996).

    Example:
        >>> drop_probability(0.8)
        0.2
    """
    return round(1.0 - retain, 12)


def run_label(results: Sequence[Mapping[str, Any]]) -> str:
    """``"2 seeds, mnist"``: how many seeds and which data, for the report's overview."""
    count = len(results)
    return f"{count} seed{'s' if count != 1 else ''}, {results[0]['data']}"


def build_mlp(
    features: int,
    hidden: Sequence[int],
    classes: int,
    *,
    input_retain: float = 1.0,
    hidden_retain: float = 1.0,
) -> nn.Sequential:
    """A ReLU MLP ``features -> hidden[0] -> ... -> classes`` with the paper's dropout.

    A :class:`dropkit.nn.Dropout` with drop probability ``1 - input_retain`` goes before the
    first linear layer and one with ``1 - hidden_retain`` after every hidden ReLU; a retain
    probability of 1 leaves that layer out.  The dropout is Srivastava's formulation
    (``inverted=False``: ``r * x`` while training, ``q * x`` in eval).  Building the dropout
    layers draws nothing from torch's generator, so under the same :func:`torch.manual_seed`
    every variant starts from the same weights.

    Example:
        >>> build_mlp(4, [8], 3, input_retain=0.8, hidden_retain=0.5)
        Sequential(
          (0): Dropout(p=0.2, inplace=False, inverted=False)
          (1): Linear(in_features=4, out_features=8, bias=True)
          (2): ReLU()
          (3): Dropout(p=0.5, inplace=False, inverted=False)
          (4): Linear(in_features=8, out_features=3, bias=True)
        )
    """
    for name, value in (("input_retain", input_retain), ("hidden_retain", hidden_retain)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be a retain probability in (0, 1], got {value!r}")
    layers: list[nn.Module] = []
    if input_retain < 1.0:
        layers.append(dropkit.nn.Dropout(drop_probability(input_retain), inverted=False))
    width = features
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        if hidden_retain < 1.0:
            layers.append(dropkit.nn.Dropout(drop_probability(hidden_retain), inverted=False))
        width = units
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _check_real(
    value: object, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float in the interval, else a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    number = float(value)
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite float in {interval}, got {value!r}")
    return number


@dataclass(frozen=True)
class SGDSchedule:
    """SGD with momentum as in Srivastava et al., Appendix B.1 (Hinton et al. 2012).

    Each update is ``v <- m v - (1 - m) eps grad; w <- w + v`` (PyTorch's SGD with learning
    rate ``(1 - m) eps``), with the momentum ``m`` rising linearly from ``momentum_start`` to
    ``momentum_end`` over the first ``momentum_epochs`` epochs and ``eps = lr * lr_decay**epoch``.

    Attributes:
        epochs: passes over the training set.
        lr: ``eps`` at the first epoch.
        lr_decay: factor applied to ``eps`` after each epoch.
        batch_size: examples per update.
        momentum_start, momentum_end, momentum_epochs: the momentum ramp.
        max_norm: the bound on the L2 norm of each hidden unit's incoming weights, or ``None``.
    """

    epochs: int
    lr: float
    lr_decay: float
    batch_size: int = 100
    momentum_start: float = 0.5
    momentum_end: float = 0.95
    momentum_epochs: int = 1
    max_norm: float | None = None

    def __post_init__(self) -> None:
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.momentum_epochs, "momentum_epochs", 0)
        _check_real(self.lr, "lr", 0.0, math.inf, low_open=True, high_open=True)
        _check_real(self.lr_decay, "lr_decay", 0.0, 1.0, low_open=True)
        _check_real(self.momentum_start, "momentum_start", 0.0, 1.0, high_open=True)
        _check_real(self.momentum_end, "momentum_end", 0.0, 1.0, high_open=True)
        if self.max_norm is not None:
            _check_real(self.max_norm, "max_norm", 0.0, math.inf, low_open=True, high_open=True)

    def momentum(self, epoch: int) -> float:
        """The momentum of ``epoch`` (0-based)."""
        ramp = min(1.0, epoch / max(self.momentum_epochs, 1))
        return self.momentum_start + ramp * (self.momentum_end - self.momentum_start)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return asdict(self)


def apply_max_norm(model: nn.Module, c: float) -> None:
    """Project the incoming weight vector of every hidden unit onto the ball of radius ``c``.

    Every :class:`torch.nn.Linear` but the last (the output layer) is a hidden layer; its
    weight rows are the units' incoming weights (biases are not constrained).
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    with torch.no_grad():
        for layer in linears[:-1]:
            layer.weight.copy_(torch.renorm(layer.weight, p=2, dim=0, maxnorm=c))


def train_sgd(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    schedule: SGDSchedule,
    *,
    seed: int,
    loss: str = "cross-entropy",
    label: str = "train",
    progress: bool = False,
) -> list[float]:
    """Train ``model`` on ``(x, target)`` with ``schedule``; returns each epoch's mean loss.

    The batch order comes from a generator seeded with ``seed``; dropout masks from dropkit's
    global seed, which the caller sets.  ``loss``: ``"cross-entropy"`` (class targets) or
    ``"mse"`` (squared error summed over outputs, averaged over examples).
    """
    if loss not in ("cross-entropy", "mse"):
        raise ValueError(f"loss must be 'cross-entropy' or 'mse', got {loss!r}")
    optimizer = torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum_start)
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    history: list[float] = []
    model.train()
    with Progress(label, schedule.epochs, unit="epochs", enabled=progress) as bar:
        for epoch in range(schedule.epochs):
            momentum = schedule.momentum(epoch)
            for group in optimizer.param_groups:
                group["momentum"] = momentum
                group["lr"] = (1.0 - momentum) * schedule.lr * schedule.lr_decay**epoch
            total = 0.0
            for batch in torch.randperm(n, generator=generator).split(schedule.batch_size):
                optimizer.zero_grad(set_to_none=True)
                output = model(x[batch])
                if loss == "mse":
                    value = (output - target[batch]).square().sum(1).mean()
                else:
                    value = F.cross_entropy(output, target[batch])
                value.backward()
                optimizer.step()
                if schedule.max_norm is not None:
                    apply_max_norm(model, schedule.max_norm)
                total += float(value.detach()) * len(batch)
            history.append(total / n)
            if not math.isfinite(history[-1]):
                raise FloatingPointError(f"{label}: the training loss diverged at epoch {epoch + 1}")
            bar.update(epoch + 1, {"loss": format_number(history[-1])})
    return history


def misclassified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 10_000) -> list[int]:
    """Indices of the examples ``model`` misclassifies in eval mode (weight scaling), sorted."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            wrong = torch.cat(
                [
                    model(xb).argmax(1) != yb
                    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
                ]
            )
    finally:
        model.train(was_training)
    return wrong.nonzero().flatten().tolist()


def classification_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification error of ``model`` in eval mode (weight scaling), a fraction in ``[0, 1]``."""
    return len(misclassified(model, x, y)) / len(y)


def scale_note(ctx: RunContext) -> str | None:
    """A note for the report when this run's size cannot decide the claim."""
    if ctx.scale == "tiny":
        return "tiny scale: a check that the pipeline runs, too small to decide the claim"
    return None


# ---------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class MLPProtocol:
    """Data size, network and schedule of one scale.

    Attributes:
        n_train, n_test: examples (class-stratified subsets; ``None`` for the whole split).
        hidden: widths of the hidden layers.
        schedule: the SGD schedule (without max-norm; the max-norm variant adds it).
        lr: ``eps`` of each variant (Srivastava et al., Appendix A.2: dropout nets want a
            larger learning rate, and max-norm allows a larger one still).
    """

    n_train: int | None
    n_test: int | None
    hidden: tuple[int, ...]
    schedule: SGDSchedule
    lr: Mapping[str, float]


def mlp_protocol(ctx: RunContext, images: ImageSet) -> MLPProtocol:
    """The protocol of ``ctx.scale`` for ``images`` (MNIST or the 8x8 digits)."""
    if images.name == "digits":
        n_train, n_test, hidden, epochs = ctx.pick(
            tiny=(500, None, (64, 64), 20),
            quick=(None, None, (256, 256), 100),
            full=(None, None, (1024, 1024), 300),
        )
    else:
        n_train, n_test, hidden, epochs = ctx.pick(
            tiny=(1000, 1000, (64, 64), 5),
            quick=(3000, None, (256, 256), 40),
            full=(None, None, (1024, 1024, 2048), 30),
        )
    schedule = SGDSchedule(
        epochs=epochs,
        lr=LEARNING_RATES["no dropout"],
        lr_decay=0.1 ** (1.0 / epochs),
        momentum_epochs=max(1, epochs // 3),
    )
    return MLPProtocol(n_train, n_test, tuple(hidden), schedule, dict(LEARNING_RATES))


def load_protocol_data(
    ctx: RunContext, seed: int
) -> tuple[ImageSet, MLPProtocol, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """MNIST or digits, subsampled to this scale's protocol (the subset drawn with ``seed``)."""
    images = load_mnist_or_digits(ctx)
    protocol = mlp_protocol(ctx, images)
    images = subsample(images, protocol.n_train, protocol.n_test, seed=seed)
    return images, protocol, flat(images)


def variant_retain(name: str) -> tuple[float, float]:
    """``(input_retain, hidden_retain)`` of a variant of :data:`MODELS`."""
    return (1.0, 1.0) if name == "no dropout" else (0.8, 0.5)


def _trained_path(
    trained_dir: Path,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    name: str,
    seed: int,
    schedule: SGDSchedule,
    hidden: Sequence[int],
) -> Path:
    """The file of the network that :func:`train_variant` trains from these inputs.

    The name carries a SHA-256 of everything training depends on (the data itself, the
    variant, network, schedule and seed, and the torch and dropkit versions), so a network is
    reused only where retraining would reproduce it."""
    digest = hashlib.sha256()
    recipe = {
        "variant": name,
        "seed": seed,
        "hidden": list(hidden),
        "schedule": schedule.to_dict(),
        "torch": torch.__version__,
        "dropkit": dropkit.__version__,
    }
    digest.update(json.dumps(recipe, sort_keys=True).encode("utf-8"))
    for tensor in data:
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode("utf-8"))
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    slug = "".join(c if c.isalnum() else "-" for c in name)
    return trained_dir / f"mnist-mlp-{slug}-seed{seed}-{digest.hexdigest()[:20]}.pt"


def _load_trained(path: Path, model: nn.Module) -> dict[str, Any] | None:
    """The result stored with a trained network (its weights loaded into ``model``), or
    ``None`` when there is none or it cannot be read (then the caller trains)."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(stored["state_dict"])
        return dict(stored["result"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
        return None


def train_variant(
    ctx: RunContext,
    protocol: MLPProtocol,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    name: str,
    seed: int,
) -> tuple[nn.Sequential, dict[str, Any]]:
    """Seed torch and dropkit with ``seed``, build the variant ``name`` and train it.

    The trained network and its result are kept in ``ctx.trained_dir`` when it is set:
    ``mnist-mlp`` and ``ensemble-vs-scaling`` train the same dropout network for a seed (35
    minutes of one thread at full scale), and the second to run loads it instead of training it
    again."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    dropkit.manual_seed(seed)
    input_retain, hidden_retain = variant_retain(name)
    model = build_mlp(
        x_train.shape[1], protocol.hidden, 10, input_retain=input_retain, hidden_retain=hidden_retain
    )
    schedule = SGDSchedule(
        **{
            **protocol.schedule.to_dict(),
            "lr": protocol.lr[name],
            "max_norm": MAX_NORM if name == "dropout + max-norm" else None,
        }
    )
    path = None
    if ctx.trained_dir is not None:
        path = _trained_path(ctx.trained_dir, data, name, seed, schedule, protocol.hidden)
    stored = _load_trained(path, model) if path is not None else None
    if stored is not None:
        if ctx.progress:
            print(f"{ctx.label} {name}: trained network reused from {path}".strip(), file=sys.stderr)
        return model, stored
    history = train_sgd(
        model,
        x_train,
        y_train,
        schedule,
        seed=seed,
        label=f"{ctx.label} {name}".strip(),
        progress=ctx.progress,
    )
    hidden_norms = [
        module.weight.detach().norm(dim=1) for module in model.modules() if isinstance(module, nn.Linear)
    ][:-1]
    norms = torch.cat(hidden_norms)
    wrong = misclassified(model, x_test, y_test)
    result = {
        "test_error": len(wrong) / len(y_test),
        "wrong": wrong,
        "train_error": classification_error(model, x_train, y_train),
        "final_loss": history[-1],
        "max_unit_norm": float(norms.max()),
        "units_at_max_norm": float((norms >= MAX_NORM * (1.0 - 1e-4)).to(torch.float64).mean()),
        "schedule": schedule.to_dict(),
    }
    if path is not None:
        buffer = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "result": result}, buffer)
        write_atomic(path, buffer.getvalue())
    return model, result


def run_seed(ctx: RunContext, seed: int) -> dict[str, Any]:
    """Train the three variants of :data:`MODELS` from the same initial weights."""
    images, protocol, data = load_protocol_data(ctx, seed)
    models = {name: train_variant(ctx, protocol, data, name, seed)[1] for name in MODELS}
    return {
        "data": images.name,
        "source": images.source,
        "n_train": len(images.y_train),
        "n_test": len(images.y_test),
        "hidden": list(protocol.hidden),
        "models": models,
    }


def _errors(results: Sequence[Mapping[str, Any]], key: str = "test_error") -> dict[str, list[float]]:
    return {name: [float(r["models"][name][key]) for r in results] for name in MODELS}


def _gaps(results: Sequence[Mapping[str, Any]]) -> list[tuple[list[float], float]]:
    """For each step of the ordering (no dropout -> dropout, dropout -> dropout + max-norm):
    the gain in test error per seed (paired by seed) and the test-set noise floor of its error
    bar (:func:`mean_paired_se`)."""
    errors = _errors(results)
    steps = []
    for high, low in itertools.pairwise(MODELS):
        gains = [a - b for a, b in zip(errors[high], errors[low], strict=True)]
        pairs = [(r["models"][high]["wrong"], r["models"][low]["wrong"]) for r in results]
        steps.append((gains, mean_paired_se(pairs, int(results[0]["n_test"]))))
    return steps


def _describe_gap(step: tuple[list[float], float], published: float) -> str:
    values, floor = step
    sign = resolved_sign(values, floor=floor)
    state = {1: "resolved", 0: "not resolved", -1: "reversed", None: "no error bar"}[sign]
    return (
        f"{format_percent(values)} pp (test-set SE {100 * floor:.2g} pp; {state}; published "
        f"{published:.2f} pp)"
    )


def verdict(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Verdict:
    """Held when both steps of the ordering are resolved: each gain above 2 SE, the SE combining
    the spread over seeds and the test-set noise (McNemar, :func:`paired_se`)."""
    errors = _errors(results)
    first, second = _gaps(results)
    ours = "; ".join(f"{name} {format_percent(errors[name])} %" for name in MODELS)
    gaps = (
        f"gains: dropout {_describe_gap(first, PUBLISHED['no dropout'] - PUBLISHED['dropout'])}, "
        f"max-norm {_describe_gap(second, PUBLISHED['dropout'] - PUBLISHED['dropout + max-norm'])}"
    )
    bound = [float(r["models"]["dropout + max-norm"]["units_at_max_norm"]) for r in results]
    if max(bound) == 0.0:
        gaps += f"; the max-norm constraint never bound (c = {MAX_NORM:g})"
    note = scale_note(ctx)
    if note is not None:
        return Verdict(None, f"Not decided ({note}). Ours: {ours}.")
    if len(results) < 2:
        return Verdict(None, f"Not decided: one seed gives no error bar. Ours: {ours}; {gaps}.")
    held = all(resolved_sign(values, floor=floor) == 1 for values, floor in (first, second))
    first_record = results[0]
    tried = (
        f"tried: {first_record['data']}, {first_record['n_train']:,} training examples, hidden "
        f"{'-'.join(str(w) for w in first_record['hidden'])}, "
        f"{first_record['models']['dropout']['schedule']['epochs']} epochs, max-norm c = {MAX_NORM:g}, "
        f"{len(results)} seeds"
    )
    if held:
        return Verdict(True, f"Held: test error (%) ordered as published. Ours: {ours}; {gaps}.")
    return Verdict(False, f"Did not hold at this size. Ours: {ours}; {gaps}; {tried}.")


def _draw_errors(errors: Mapping[str, Sequence[float]]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        positions = list(range(len(MODELS)))
        stats = [mean_se([100.0 * v for v in errors[name]]) for name in MODELS]
        means = [m for m, _ in stats]
        bars = [0.0 if math.isnan(se) else se for _, se in stats]
        ax.errorbar(positions, means, yerr=bars, fmt="o", capsize=4, label="ours (mean ± SE)")
        ax.plot(positions, [PUBLISHED[name] for name in MODELS], "s", mfc="none", label="published")
        ax.set_xticks(positions)
        ax.set_xticklabels(MODELS)
        ax.set_ylabel("test error (%)")
        ax.legend()

    return draw


def summarize(ctx: RunContext, results: Sequence[Mapping[str, Any]]) -> Summary:
    """Tables of test error and gaps, the figure, the verdict."""
    if not results:
        raise ValueError("results must hold at least one seed's result, got none")
    errors = _errors(results)
    train = _errors(results, "train_error")
    (first, first_floor), (second, second_floor) = _gaps(results)
    errors_table = Table(
        title="Test error (%), published (Srivastava et al. 2014, Tables 2 and 9) and ours",
        columns=("model", "published", "ours: test", "ours: train", "largest hidden-unit norm"),
        rows=[
            (
                name,
                f"{PUBLISHED[name]:.2f}",
                format_percent(errors[name]),
                format_percent(train[name]),
                format_number(max(float(r["models"][name]["max_unit_norm"]) for r in results)),
            )
            for name in MODELS
        ],
    )
    gaps_table = Table(
        title="Gains in test error (percentage points, paired by seed)",
        columns=("step", "published", "ours", "test-set SE (McNemar)"),
        rows=[
            (
                "no dropout -> dropout",
                f"{PUBLISHED['no dropout'] - PUBLISHED['dropout']:.2f}",
                format_percent(first),
                format_number(100 * first_floor),
            ),
            (
                "dropout -> dropout + max-norm",
                f"{PUBLISHED['dropout'] - PUBLISHED['dropout + max-norm']:.2f}",
                format_percent(second),
                format_number(100 * second_floor),
            ),
        ],
    )
    first_record = results[0]
    schedule = first_record["models"]["dropout"]["schedule"]
    lrs = ", ".join(f"{name} {r['schedule']['lr']:g}" for name, r in first_record["models"].items())
    notes = [
        data_note(first_record),
        f"Network: {'-'.join(str(w) for w in first_record['hidden'])} ReLU hidden units; the paper's "
        "Table 9 net is 784-1024-1024-2048-10.",
        f"{schedule['epochs']} epochs of mini-batches of {schedule['batch_size']}: momentum "
        f"{schedule['momentum_start']:g} -> {schedule['momentum_end']:g} over {schedule['momentum_epochs']} "
        f"epochs, learning rate eps (Hinton's form) {lrs}, decaying by {schedule['lr_decay']:.4g} per "
        "epoch; the paper trains for about 10^6 updates.",
        "Dropout is the paper's formulation (dropkit.nn.Dropout(inverted=False)), retain 0.8 on the "
        f"input and 0.5 on hidden units; max-norm c = {MAX_NORM:g} on each hidden unit's incoming weights.",
        "The no-dropout net has no weight penalty (Table 9's 1.62 % net used L2; Table 2's standard "
        "net reports 1.60 %).",
        f"Seeds: {len(results)}; errors are mean ± SE over seeds; a gain counts as resolved when it "
        f"exceeds {SIGNIFICANCE:g} SE, the SE combining the spread over seeds with the noise of the "
        "shared test set (McNemar's, from the examples only one of the two nets gets wrong).",
    ]
    note = scale_note(ctx)
    if note is not None:
        notes.append(note[0].upper() + note[1:] + ".")
    metrics: dict[str, Any] = {
        f"test_error_pct[{name}]": list(mean_se([100.0 * v for v in errors[name]])) for name in MODELS
    }
    metrics["gain_pp[dropout]"] = list(mean_se([100.0 * v for v in first]))
    metrics["gain_pp[max-norm]"] = list(mean_se([100.0 * v for v in second]))
    figure = Figure(
        name="test-error",
        caption=(
            "Test error of the three variants, ours (mean ± SE over seeds) against Table 9 of "
            "Srivastava et al. (2014). The published ordering is no dropout > dropout > dropout + max-norm."
        ),
        draw=_draw_errors(errors),
    )
    ours = ", ".join(f"{name} {format_percent(errors[name])} %" for name in MODELS)
    return Summary(
        verdict=verdict(ctx, results),
        ours=f"{ours} ({run_label(results)})",
        tables=(errors_table, gaps_table),
        figures=(figure,),
        notes=notes,
        metrics=metrics,
    )


EXPERIMENT = Experiment(
    name="mnist-mlp",
    title="Dropout and max-norm on an MNIST MLP (Srivastava et al. 2014, Tables 2 and 9)",
    claim=Claim(
        statement=(
            "The same MLP has a lower test error with dropout than without, and lower still with "
            "dropout and a max-norm constraint."
        ),
        source="Srivastava et al. 2014, JMLR, Table 2 and Table 9",
        published="1.60 % (no dropout) > 1.25 % (dropout) > 1.05 % (dropout + max-norm)",
    ),
    run_seed=run_seed,
    summarize=summarize,
    default_seeds={"tiny": 1, "quick": 2, "full": 3},
    data=("MNIST (--data) or scikit-learn digits",),
)
