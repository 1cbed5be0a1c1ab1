"""Dropout against overfitting: the same MLP trained with and without dropout on sklearn's digits.

The demo trains ``64 -> hidden -> hidden -> 10`` ReLU networks on a small, stratified training
subset of the 8x8 handwritten digits that ship inside scikit-learn (no download), once without
dropout and once with :class:`dropkit.nn.Dropout` on the input and hidden layers (Srivastava et
al., JMLR 2014), and reports train accuracy, test accuracy and the generalization gap of each.

Both runs start from the same initial weights and see the same mini-batches: each run seeds
:func:`torch.manual_seed` and :func:`dropkit.manual_seed` with ``config.seed`` before building
its model, so a config reproduces its results exactly in the same environment.

scikit-learn and tqdm are optional dependencies (``pip install 'dropkit[demo]'``); they are
imported when first needed, so this module and :class:`DigitsConfig` import without them.
Progress goes to stderr: a tqdm bar per run on a terminal, one line per tenth of the epochs
otherwise (:class:`~dropkit.experiments._console.Progress`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

import dropkit
from dropkit._validation import check_int
from dropkit.experiments._console import Progress, format_number
from dropkit.experiments._files import write_atomic

__all__ = [
    "DIGITS_CLASSES",
    "DIGITS_FEATURES",
    "DIGITS_SAMPLES",
    "INSTALL_HINT",
    "MODEL_NAMES",
    "DigitsConfig",
    "DigitsSplit",
    "build_mlp",
    "evaluate",
    "format_table",
    "load_digits_split",
    "require_demo_dependencies",
    "run_demo",
    "train",
    "write_results",
]

DIGITS_SAMPLES = 1797
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
INSTALL_HINT = "pip install 'dropkit[demo]'"
OPTIMIZERS = ("adam", "sgd")
MODEL_NAMES = ("no dropout", "dropout")
_SGD_MOMENTUM = 0.9
_SEED_LIMIT = 1 << 63


def require_demo_dependencies() -> None:
    """Check that the demo's optional dependencies, scikit-learn and tqdm, are installed.

    Raises:
        ModuleNotFoundError: one is missing; the message names it and the install command.
    """
    for module, package in (("sklearn", "scikit-learn"), ("tqdm", "tqdm")):
        try:
            __import__(module)
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                f"the digits demo needs {package}, which is not installed ({exc}); "
                f"install the demo dependencies with: {INSTALL_HINT}",
                name=module,
            ) from exc


def _check_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    return float(value)


@dataclass(frozen=True)
class DigitsConfig:
    """Settings of the digits demo; every field is checked when the config is built.

    The defaults train 1024-unit hidden layers on 100 of the 1797 digits (10 per class) for 200
    epochs of SGD: enough capacity and epochs for the plain network to fit its training set
    perfectly while its test accuracy lags far behind.  Dropout narrows that gap by a point or
    two of test accuracy (less than it does on larger problems), and the demo runs in seconds.

    Args:
        epochs: passes over the training subset, >= 1.
        hidden: width of both hidden layers, >= 1.
        input_dropout: drop probability of the input features in the dropout model, in ``[0, 1)``.
        hidden_dropout: drop probability after each hidden layer in the dropout model, in ``[0, 1)``.
        train_size: number of training samples (stratified); the other samples are the test set.
            Between 10 and 1787, so that both sets hold every one of the 10 classes.
        batch_size: mini-batch size, >= 1.
        lr: learning rate, a finite float > 0.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
        seed: seeds torch (initial weights, batch order) and dropkit (dropout masks), in
            ``[0, 2**63)``.
        split_seed: seeds the stratified train/test split, in ``[0, 2**32)``; kept apart from
            ``seed`` so that the split stays fixed while the training seed varies.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: a field is out of range; the message names the field and the value.
    """

    epochs: int = 200
    hidden: int = 1024
    input_dropout: float = 0.2
    hidden_dropout: float = 0.5
    train_size: int = 100
    batch_size: int = 20
    lr: float = 0.01
    optimizer: str = "sgd"
    seed: int = 0
    split_seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.epochs, "epochs", 1)
        check_int(self.hidden, "hidden", 1)
        for name in ("input_dropout", "hidden_dropout"):
            p = _check_float(getattr(self, name), name)
            if not 0.0 <= p < 1.0:  # also refuses NaN
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_int(self.train_size, "train_size", DIGITS_CLASSES, DIGITS_SAMPLES - DIGITS_CLASSES)
        check_int(self.batch_size, "batch_size", 1)
        lr = _check_float(self.lr, "lr")
        if not (math.isfinite(lr) and lr > 0.0):
            raise ValueError(f"lr must be a finite float > 0, got {self.lr!r}")
        if not isinstance(self.optimizer, str):
            raise TypeError(f"optimizer must be a str, got {type(self.optimizer).__name__}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_int(self.seed, "seed", 0, _SEED_LIMIT - 1)
        check_int(self.split_seed, "split_seed", 0, (1 << 32) - 1)


class DigitsSplit(NamedTuple):
    """A standardized train/test split: float32 features ``(N, 64)``, int64 labels ``(N,)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(train_size: int, split_seed: int = 0) -> DigitsSplit:
    """Load sklearn's digits, split them stratified, and standardize with training statistics.

    Each feature is shifted and scaled by the mean and standard deviation of the *training*
    samples only (features that are constant on the training set are only shifted), so nothing
    about the test set leaks into training.

    Args:
        train_size: number of training samples; the rest form the test set.
        split_seed: seed of the split; the same seed gives the same split.

    Returns:
        The standardized split.
    """
    require_demo_dependencies()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, train_size=train_size, stratify=digits.target, random_state=split_seed
    )
    x_train_t = torch.as_tensor(x_train, dtype=torch.float32)
    x_test_t = torch.as_tensor(x_test, dtype=torch.float32)
    mean = x_train_t.mean(dim=0)
    std = x_train_t.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return DigitsSplit(
        x_train=(x_train_t - mean) / std,
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=(x_test_t - mean) / std,
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
    )


def build_mlp(
    hidden: int,
    input_dropout: float = 0.0,
    hidden_dropout: float = 0.0,
    in_features: int = DIGITS_FEATURES,
    num_classes: int = DIGITS_CLASSES,
) -> nn.Sequential:
    """The MLP ``in_features -> hidden -> hidden -> num_classes`` with ReLU activations.

    A :class:`dropkit.nn.Dropout` layer goes before the first linear layer (``input_dropout``)
    and after each hidden ReLU (``hidden_dropout``); a rate of 0 leaves that layer out, so the
    model without dropout has only linear layers and ReLUs.  Building the dropout layers draws
    nothing from torch's RNG, so under the same :func:`torch.manual_seed` both variants start
    from the same weights.

    Args:
        hidden: width of both hidden layers.
        input_dropout: drop probability of the input features.
        hidden_dropout: drop probability of the hidden activations.
        in_features: input width.
        num_classes: number of output logits.

    Returns:
        The model, in training mode.
    """
    layers: list[nn.Module] = []
    if input_dropout > 0.0:
        layers.append(dropkit.nn.Dropout(input_dropout))
    layers += [nn.Linear(in_features, hidden), nn.ReLU()]
    if hidden_dropout > 0.0:
        layers.append(dropkit.nn.Dropout(hidden_dropout))
    layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    if hidden_dropout > 0.0:
        layers.append(dropkit.nn.Dropout(hidden_dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` with cross-entropy on shuffled mini-batches of ``(x, y)``.

    The batch order comes from a :class:`torch.Generator` seeded with ``seed``; dropout masks
    come from dropkit's global seed, which the caller sets (see :func:`run_demo`).

    Args:
        model: the classifier; it is left in training mode.
        x: features, ``(N, F)``.
        y: integer class labels, ``(N,)``.
        epochs: passes over the data.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        lr: learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
        seed: seed of the batch order.
        desc: label of the progress display.
        progress: show progress on stderr with the loss
            (:class:`~dropkit.experiments._console.Progress`: a bar on a terminal, else one
            line per tenth of the epochs).

    Returns:
        The mean training loss of each epoch.
    """
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=_SGD_MOMENTUM)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    n = x.shape[0]
    history: list[float] = []
    model.train()
    with Progress(desc, epochs, unit="epochs", enabled=progress) as bar:
        for epoch in range(epochs):
            total = 0.0
            for batch in torch.randperm(n, generator=generator).split(batch_size):
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[batch]), y[batch])
                loss.backward()
                opt.step()
                total += loss.item() * batch.numel()
            history.append(total / n)
            bar.update(epoch + 1, {"loss": format_number(history[-1])})
    return history


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in eval mode (dropout off), in ``[0, 1]``.

    Args:
        model: the classifier; its training/eval mode is restored afterwards.
        x: features, ``(N, F)``.
        y: integer class labels, ``(N,)``.

    Returns:
        The fraction of samples whose arg-max logit is the label.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            predictions = model(x).argmax(dim=1)
    finally:
        model.train(was_training)
    return float((predictions == y).float().mean().item())


def run_demo(
    config: DigitsConfig, *, progress: bool = True, threads: int | None = 1
) -> dict[str, dict[str, float]]:
    """Train the MLP without and with dropout on the same split and compare them.

    Each run seeds :func:`torch.manual_seed` and :func:`dropkit.manual_seed` with
    ``config.seed`` before building its model, so both start from the same weights and see the
    same batches, and the same config gives the same results.

    Args:
        config: the demo settings.
        progress: show each run's progress on stderr (a bar on a terminal, else plain lines).
        threads: torch intra-op threads while the demo runs (restored afterwards); ``None``
            keeps torch's setting.  The default, 1, is as fast as more threads for these small
            matrices on an idle machine, does not collapse when other processes compete for
            the cores (every parallel region then waits for a descheduled worker), and gives
            the same numbers whatever the core count.

    Returns:
        For each model name of :data:`MODEL_NAMES` (``"no dropout"``, ``"dropout"``): its
        ``train_accuracy``, ``test_accuracy``, ``gap`` (train minus test accuracy) and
        ``final_loss`` (mean training loss of the last epoch).
    """
    if not isinstance(config, DigitsConfig):
        raise TypeError(f"config must be a DigitsConfig, got {type(config).__name__}")
    if threads is not None:
        check_int(threads, "threads", 1)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_both(config, progress)
    finally:
        if threads is not None:
            torch.set_num_threads(previous_threads)


def _run_both(config: DigitsConfig, progress: bool) -> dict[str, dict[str, float]]:
    split = load_digits_split(config.train_size, config.split_seed)
    rates = {"no dropout": (0.0, 0.0), "dropout": (config.input_dropout, config.hidden_dropout)}
    results: dict[str, dict[str, float]] = {}
    for name in MODEL_NAMES:
        input_dropout, hidden_dropout = rates[name]
        torch.manual_seed(config.seed)
        dropkit.manual_seed(config.seed)
        model = build_mlp(config.hidden, input_dropout, hidden_dropout)
        history = train(
            model,
            split.x_train,
            split.y_train,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            optimizer=config.optimizer,
            seed=config.seed,
            desc=name,
            progress=progress,
        )
        train_accuracy = evaluate(model, split.x_train, split.y_train)
        test_accuracy = evaluate(model, split.x_test, split.y_test)
        results[name] = {
            "train_accuracy": train_accuracy,
            "test_accuracy": test_accuracy,
            "gap": train_accuracy - test_accuracy,
            "final_loss": history[-1],
        }
    return results


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A side-by-side text table of :func:`run_demo` results, accuracies in percent.

    Args:
        results: model name to its ``train_accuracy``, ``test_accuracy`` and ``gap``.

    Returns:
        The table, one line per model under a header, without a trailing newline.
    """
    width = max([len("model"), *(len(name) for name in results)])
    lines = [f"{'model':<{width}}  {'train acc':>9}  {'test acc':>9}  {'gap':>9}"]
    for name, row in results.items():
        lines.append(
            f"{name:<{width}}  {row['train_accuracy']:>9.2%}  {row['test_accuracy']:>9.2%}  "
            f"{100 * row['gap']:>6.2f} pp"
        )
    return "\n".join(lines)


def write_results(path: str | Path, config: DigitsConfig, results: Mapping[str, Any]) -> Path:
    """Write the config and the results of a demo run as JSON.

    Args:
        path: the file to write; missing parent directories are created.  Written atomically
            (:func:`dropkit.experiments._files.write_atomic`), so a reader never sees half a file.
        config: the settings the results came from.
        results: the output of :func:`run_demo`.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written.
    """
    payload = {
        "demo": "digits",
        "dropkit_version": dropkit.__version__,
        "torch_version": torch.__version__,
        "config": dataclasses.asdict(config),
        "results": dict(results),
    }
    return write_atomic(path, json.dumps(payload, indent=2) + "\n")
