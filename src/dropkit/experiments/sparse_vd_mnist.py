"""Sparse variational dropout on MNIST: LeNet-300-100 of Molchanov et al. (2017), Table 1.

The experiment trains ``784 -> 300 -> 100 -> 10`` ReLU networks built from
:class:`dropkit.nn.sparse_variational.SparseVariationalLinear` with the official recipe and
reports the test error in eval mode (mean weights, pruned weights set to 0) and the compression
of :func:`dropkit.nn.sparse_variational.sparsity_report`.  The paper reports 1.92 % error at
68x compression (layer sparsity 98.9 / 97.2 / 62.0 %).

The official recipe (:meth:`SparseVDConfig.recipe` with ``epochs=200``):

- 200 epochs of mini-batches of 100, Adam;
- learning rate 1e-3 for the first 100 epochs, then linearly down to 0 at epoch 200;
- KL weight 0 until epoch 5, then linearly up to 1 at epoch 20
  (:class:`dropkit.nn.regularization.KLWarmup`, updated every step);
- per-example loss ``CE + kl_weight * KL / N`` (the ELBO ``N * mean NLL + kl_weight * KL``
  divided by the number ``N`` of training examples).

A shorter run, ``SparseVDConfig.recipe(epochs=E)`` (``--epochs E`` on the command line), scales
every epoch of the schedule by ``E / 200``: constant learning rate for ``E / 2`` epochs, KL
warm-up from ``E / 40`` to ``E / 10``.  It is a compressed recipe, not the published one.

MNIST is read from local IDX files (``train-images-idx3-ubyte[.gz]`` etc.); nothing is ever
downloaded.  Run it as a module::

    python -m dropkit.experiments.sparse_vd_mnist --data /path/to/mnist --epochs 200 \\
        --output results.json

It is also ``dropkit sparse-vd`` (the same arguments and help).  Progress goes to stderr
(:class:`~dropkit.experiments._console.Progress`): a tqdm bar on a terminal (tqdm is optional,
``pip install 'dropkit[demo]'``), one plain line per twentieth of the epochs otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import dropkit
from dropkit._validation import check_int
from dropkit.experiments._cli import HelpFormatter, error
from dropkit.experiments._console import Progress, format_duration, format_number
from dropkit.experiments._files import prepare_output_file, seal, write_atomic
from dropkit.nn.regularization import KLWarmup, regularization_loss
from dropkit.nn.sparse_variational import SparseVariationalLinear, sparsity_report

__all__ = [
    "IDX_DTYPES",
    "LENET_300_100",
    "MNIST_FILES",
    "DESCRIPTION",
    "RECIPE_EPOCHS",
    "SUMMARY",
    "MnistData",
    "SparseVDConfig",
    "build_lenet_300_100",
    "build_parser",
    "evaluate_error",
    "learning_rate",
    "load_mnist",
    "main",
    "read_idx",
    "run",
    "run_experiment",
    "write_results",
]

#: IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
#: Base names of the four MNIST files; each is looked up as ``name.gz`` first, then ``name``.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
#: Layer widths of LeNet-300-100.
LENET_300_100 = (784, 300, 100, 10)
#: Length of the official recipe, in epochs; shorter runs scale the schedule by ``epochs / 200``.
RECIPE_EPOCHS = 200
_RECIPE_LR_DECAY_START = 100.0
_RECIPE_KL_START = 5.0
_RECIPE_KL_END = 20.0
_SEED_LIMIT = 1 << 63
_GZIP_MAGIC = b"\x1f\x8b"
_EVAL_BATCH = 10_000
# Off a terminal, one progress line per twentieth of the epochs (every 10 epochs of the recipe).
_PROGRESS_LINES = 20


# ---------------------------------------------------------------------------------------------
# IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the format of the MNIST files), gzip-compressed or plain.

    The file starts with the magic number: two zero bytes, a type code (see :data:`IDX_DTYPES`)
    and the number of dimensions; then one big-endian 32-bit size per dimension, then the data
    in C order.  Compression is recognized from the gzip magic bytes, not from the file name.

    Args:
        path: the file.

    Returns:
        The array, with the file's shape and the native-endian version of its dtype.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid IDX file (bad magic number, unknown type code,
            truncated header, or a data size that does not match the header); the message
            names the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a valid gzip file ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: bad magic number 0x{magic:08x} (the first two bytes must be 0)"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise ValueError(
            f"{path}: not an IDX file: bad magic number 0x{magic:08x} (unknown type code 0x{code:02x}; "
            f"known: {known})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} bytes, got {len(raw)}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header says shape {shape} of {dtype.name} "
            f"({expected} bytes in all), file holds {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {name}[.gz] not found in {root} (this experiment never downloads; "
        f"put the four IDX files {', '.join(MNIST_FILES.values())} there, gzip-compressed or plain)"
    )


class MnistData(NamedTuple):
    """MNIST as tensors: float32 images ``(N, 784)`` in ``[0, 1]``, int64 labels ``(N,)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _load_split(root: Path, images_name: str, labels_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = _find_file(root, images_name)
    labels_path = _find_file(root, labels_name)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected a 3-d uint8 IDX file (magic 0x00000803), "
            f"got {images.ndim}-d {images.dtype}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{labels_path}: expected a 1-d uint8 IDX file (magic 0x00000801), "
            f"got {labels.ndim}-d {labels.dtype}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= LENET_300_100[-1]:
        raise ValueError(f"{labels_path}: labels must be in [0, 9], got max {int(labels.max())}")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(root: str | Path) -> MnistData:
    """Load MNIST from the IDX files in ``root``; never downloads.

    Each file is looked up as ``name.gz`` first, then as plain ``name`` (names in
    :data:`MNIST_FILES`).  Pixels are scaled from ``0..255`` to ``[0, 1]`` and flattened.

    Args:
        root: the directory holding the four files.

    Returns:
        The training and test sets.

    Raises:
        FileNotFoundError: ``root`` or a file is missing.
        ValueError: a file is not a valid IDX file, or the files do not fit together.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MNIST directory {root} does not exist (this experiment never downloads)")
    x_train, y_train = _load_split(root, MNIST_FILES["train_images"], MNIST_FILES["train_labels"])
    x_test, y_test = _load_split(root, MNIST_FILES["test_images"], MNIST_FILES["test_labels"])
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train images have {x_train.shape[1]} pixels, test images {x_test.shape[1]}")
    return MnistData(x_train, y_train, x_test, y_test)


# ---------------------------------------------------------------------------------------------
# Configuration


def _check_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return as_float


@dataclass(frozen=True)
class SparseVDConfig:
    """Settings of the sparse variational dropout experiment; the defaults are the official recipe.

    Epoch fields may be fractional; the KL weight is updated every step (``epoch + step /
    steps_per_epoch``), the learning rate once per epoch.

    Args:
        epochs: passes over the training set, >= 1.
        batch_size: mini-batch size, >= 1.
        lr: initial Adam learning rate, a finite float > 0.
        lr_decay_start: epoch after which the learning rate falls linearly to 0 at ``epochs``,
            in ``[0, epochs]``.
        kl_start: last epoch with KL weight 0, >= 0.
        kl_end: first epoch with KL weight 1, in ``[kl_start, epochs]``.
        threshold: ``log_alpha`` threshold of pruning, finite.
        seed: seeds torch (initial weights, batch order) and dropkit (noise), in ``[0, 2**63)``.
        threads: torch intra-op threads during the run, >= 1.

    Raises:
        TypeError: a field has the wrong type.
        ValueError: a field is out of range; the message names the field and the value.
    """

    epochs: int = RECIPE_EPOCHS
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay_start: float = _RECIPE_LR_DECAY_START
    kl_start: float = _RECIPE_KL_START
    kl_end: float = _RECIPE_KL_END
    threshold: float = 3.0
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        if not _check_float(self.lr, "lr") > 0.0:
            raise ValueError(f"lr must be a finite float > 0, got {self.lr!r}")
        if not 0.0 <= _check_float(self.lr_decay_start, "lr_decay_start") <= self.epochs:
            raise ValueError(
                f"lr_decay_start must be in [0, epochs={self.epochs}], got {self.lr_decay_start!r}"
            )
        kl_start = _check_float(self.kl_start, "kl_start")
        if kl_start < 0.0:
            raise ValueError(f"kl_start must be >= 0, got {self.kl_start!r}")
        if not kl_start <= _check_float(self.kl_end, "kl_end") <= self.epochs:
            raise ValueError(
                f"kl_end must be in [kl_start={self.kl_start}, epochs={self.epochs}], got {self.kl_end!r}"
            )
        _check_float(self.threshold, "threshold")
        check_int(self.seed, "seed", 0, _SEED_LIMIT - 1)
        check_int(self.threads, "threads", 1)

    @classmethod
    def recipe(cls, epochs: int = RECIPE_EPOCHS, **overrides: Any) -> SparseVDConfig:
        """The official recipe, with its schedule scaled by ``epochs / 200`` for other lengths.

        ``recipe()`` is the published schedule (lr decay from epoch 100, KL warm-up 5 -> 20);
        ``recipe(20)`` decays the lr from epoch 10 and warms the KL up from epoch 0.5 to 2.

        Args:
            epochs: length of the run.
            overrides: other fields (``batch_size``, ``seed``, ...), or explicit schedule epochs.
        """
        check_int(epochs, "epochs", 1)
        scale = epochs / RECIPE_EPOCHS
        schedule: dict[str, Any] = {
            "lr_decay_start": _RECIPE_LR_DECAY_START * scale,
            "kl_start": _RECIPE_KL_START * scale,
            "kl_end": _RECIPE_KL_END * scale,
        }
        schedule.update(overrides)
        return cls(epochs=epochs, **schedule)

    @property
    def is_official(self) -> bool:
        """Whether the schedule is the published 200-epoch one (other fields aside)."""
        return (self.epochs, self.lr_decay_start, self.kl_start, self.kl_end) == (
            RECIPE_EPOCHS,
            _RECIPE_LR_DECAY_START,
            _RECIPE_KL_START,
            _RECIPE_KL_END,
        )


def learning_rate(config: SparseVDConfig, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch``: ``lr`` until ``lr_decay_start``, then linear to 0.

    The rate of epoch ``e`` is the schedule's value at the epoch's start, so the last epoch of
    the official recipe runs at ``lr / 100`` and the rate reaches 0 at ``epochs``.
    """
    if epoch <= config.lr_decay_start:
        return config.lr
    span = config.epochs - config.lr_decay_start
    return config.lr * max(0.0, (config.epochs - epoch) / span)


# ---------------------------------------------------------------------------------------------
# Model, training, evaluation


def build_lenet_300_100(widths: Sequence[int] = LENET_300_100, *, threshold: float = 3.0) -> nn.Sequential:
    """LeNet-300-100 (by default ``784 -> 300 -> 100 -> 10``) of sparse variational linear layers.

    Args:
        widths: input width, hidden widths, number of classes.
        threshold: ``log_alpha`` pruning threshold of every layer.

    Returns:
        The model, in training mode: ``SparseVariationalLinear`` layers with ReLUs between them.
    """
    if len(widths) < 2:
        raise ValueError(f"widths needs at least an input and an output width, got {tuple(widths)}")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(SparseVariationalLinear(fan_in, fan_out, threshold=threshold))
    return nn.Sequential(*layers)


def evaluate_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Classification error of ``model`` on ``(x, y)`` in eval mode (pruned mean weights), in ``[0, 1]``.

    The model's training/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            wrong = sum(
                int((model(xb).argmax(dim=1) != yb).sum())
                for xb, yb in zip(x.split(_EVAL_BATCH), y.split(_EVAL_BATCH), strict=True)
            )
    finally:
        model.train(was_training)
    return wrong / max(1, y.shape[0])


EpochCallback = Callable[[dict[str, Any]], None]


def _train(
    model: nn.Module,
    config: SparseVDConfig,
    data: MnistData,
    progress: bool,
    on_epoch: EpochCallback | None,
) -> list[dict[str, Any]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup = KLWarmup(config.kl_start, config.kl_end)
    generator = torch.Generator().manual_seed(config.seed)
    n = data.x_train.shape[0]
    steps = math.ceil(n / config.batch_size)
    history: list[dict[str, Any]] = []
    model.train()
    with Progress(
        "sparse VD LeNet-300-100", config.epochs, unit="epochs", enabled=progress, lines=_PROGRESS_LINES
    ) as bar:
        for epoch in range(config.epochs):
            start = time.perf_counter()
            lr = learning_rate(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total_loss = total_nll = 0.0
            kl_value = 0.0
            kl_weight = 0.0
            order = torch.randperm(n, generator=generator).split(config.batch_size)
            for step, batch in enumerate(order):
                kl_weight = warmup.weight(epoch + step / steps)
                optimizer.zero_grad(set_to_none=True)
                nll = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
                kl = regularization_loss(model)
                loss = nll + (kl_weight / n) * kl
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * batch.numel()
                total_nll += nll.item() * batch.numel()
                kl_value = kl.item()
            report = sparsity_report(model)
            record = {
                "epoch": epoch + 1,
                "lr": lr,
                "kl_weight": kl_weight,
                "loss": total_loss / n,
                "nll": total_nll / n,
                "kl": kl_value,
                "test_error": evaluate_error(model, data.x_test, data.y_test),
                "compression": report["compression"],
                "sparsity": report["sparsity"],
                "seconds": time.perf_counter() - start,
            }
            history.append(record)
            bar.update(
                epoch + 1,
                {
                    "loss": format_number(record["loss"]),
                    "err": f"{format_number(100 * record['test_error'])}%",
                    "comp": f"{format_number(record['compression'])}x",
                },
            )
            if on_epoch is not None:
                on_epoch(record)
    return history


def run_experiment(
    config: SparseVDConfig,
    data: MnistData,
    *,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train LeNet-300-100 with sparse variational dropout and evaluate it.

    Seeds :func:`torch.manual_seed` and :func:`dropkit.manual_seed` with ``config.seed`` first,
    and runs with ``config.threads`` torch threads (restored afterwards).

    Args:
        config: the settings.
        data: the data, e.g. from :func:`load_mnist`.
        progress: show progress on stderr with the loss, the test error and the compression
            (a bar on a terminal, else one line per twentieth of the epochs).
        on_epoch: called after every epoch with that epoch's record.

    Returns:
        ``test_error`` (eval mode, pruned weights), ``compression``, ``sparsity`` and per-layer
        ``layers`` from :func:`sparsity_report`, ``train_seconds``, and ``history`` (one record
        per epoch: ``epoch``, ``lr``, ``kl_weight``, ``loss``, ``nll``, ``kl``, ``test_error``,
        ``compression``, ``sparsity``, ``seconds``).
    """
    if not isinstance(config, SparseVDConfig):
        raise TypeError(f"config must be a SparseVDConfig, got {type(config).__name__}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        dropkit.manual_seed(config.seed)
        widths = (data.x_train.shape[1], *LENET_300_100[1:-1], LENET_300_100[-1])
        model = build_lenet_300_100(widths, threshold=config.threshold)
        start = time.perf_counter()
        history = _train(model, config, data, progress, on_epoch)
        train_seconds = time.perf_counter() - start
        report = sparsity_report(model)
        return {
            "test_error": evaluate_error(model, data.x_test, data.y_test),
            "compression": report["compression"],
            "sparsity": report["sparsity"],
            "kept": report["kept"],
            "total": report["total"],
            "layers": report["layers"],
            "train_seconds": train_seconds,
            "history": history,
        }
    finally:
        torch.set_num_threads(previous_threads)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf; "inf" when everything is pruned
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


def write_results(
    path: str | Path, config: SparseVDConfig, results: dict[str, Any], *, complete: bool = True
) -> Path:
    """Write the config and the results (or the history so far) as JSON, sealed.

    The file carries its identity (experiment, config, dropkit and torch versions) and a
    ``sha256`` checksum of everything else (:func:`dropkit.experiments._files.seal`), so a
    damaged or edited file can be told from a real result.

    Args:
        path: the file; missing parent directories are created.  Written atomically (a unique
            temporary file, fsync'ed, then renamed), so a reader never sees half a file and two
            runs never share a temporary file.
        config: the settings.
        results: the output of :func:`run_experiment`, or ``{"history": [...]}`` mid-run.
        complete: whether the run has finished.

    Returns:
        The path written.

    Raises:
        OSError: the file cannot be written.
    """
    payload = {
        "experiment": "sparse_vd_mnist",
        "model": "LeNet-300-100 (784-300-100-10, SparseVariationalLinear)",
        "paper": {"test_error": 0.0192, "compression": 68},
        "official_recipe": config.is_official,
        "complete": complete,
        "dropkit_version": dropkit.__version__,
        "torch_version": torch.__version__,
        "config": dataclasses.asdict(config),
        "results": _json_number(results),
    }
    return write_atomic(path, json.dumps(seal(payload), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Command line


#: One line for the list of commands of ``dropkit --help``.
SUMMARY = "sparse variational dropout, LeNet-300-100 on MNIST"
#: The description of the command's help (paragraphs).
DESCRIPTION = """\
Sparse variational dropout, LeNet-300-100 on MNIST (Molchanov et al. 2017): the official
recipe by default. --epochs other than 200 scales the recipe's schedule by epochs/200 (lr decay
from epochs/2, KL warm-up from epochs/40 to epochs/10): a shortened run, not the published one.

Data (--data DIR, never downloaded): the four MNIST IDX files, gzip-compressed or plain.
Progress goes to stderr: a bar on a terminal, one line per twentieth of the epochs otherwise.
"""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The experiment's arguments, description and help format, added to ``parser`` (a new one
    when ``None``; pass a sub-parser to mount it as ``dropkit sparse-vd``).  Both give the same
    help text."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m dropkit.experiments.sparse_vd_mnist")
    parser.description = DESCRIPTION
    parser.formatter_class = HelpFormatter
    parser.add_argument(
        "--data", required=True, type=Path, metavar="DIR", help="directory of the MNIST IDX files"
    )
    parser.add_argument("--epochs", type=int, default=RECIPE_EPOCHS, help="epochs (200: the recipe)")
    parser.add_argument("--batch-size", type=int, default=100, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="initial Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, batch order and noise")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output", type=Path, default=None, help="JSON file, rewritten after every epoch")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress on stderr (neither bar nor lines)"
    )
    return parser


class _OutputWriteError(Exception):
    """A write of ``--output`` failed mid-run (told apart from errors of the training itself)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m dropkit.experiments.sparse_vd_mnist``).

    Args:
        argv: the arguments; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status of :func:`run`.
    """
    parser = build_parser()
    return run(parser.parse_args(argv), prog=parser.prog)


def run(args: argparse.Namespace, prog: str = "dropkit sparse-vd") -> int:
    """Run the experiment from arguments parsed by a parser built with :func:`build_parser`.

    The settings, the data and the ``--output`` location (its directory created and proven
    writable) are all checked before training starts.

    Args:
        args: the parsed arguments.
        prog: the command's name, the prefix of error lines.

    Returns:
        The exit status: 0 on success, 2 after a one-line error on stderr (argparse itself exits
        with 2 on arguments it cannot parse).
    """
    try:
        config = SparseVDConfig.recipe(
            args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads
        )
        data = load_mnist(args.data)
        if args.output is not None:
            prepare_output_file(args.output, "--output")
    except (TypeError, ValueError, OSError) as exc:
        return error(prog, exc)
    if not config.is_official:
        print(
            f"note: {config.epochs} epochs: the recipe's schedule is scaled by "
            f"{config.epochs}/{RECIPE_EPOCHS} "
            f"(lr decay from epoch {config.lr_decay_start:g}, KL warm-up {config.kl_start:g} -> "
            f"{config.kl_end:g}); not the published 200-epoch run",
            file=sys.stderr,
        )
    history: list[dict[str, Any]] = []

    def save(results: dict[str, Any], complete: bool) -> None:
        if args.output is None:
            return
        try:
            write_results(args.output, config, results, complete=complete)
        except OSError as exc:
            raise _OutputWriteError(f"cannot write --output {args.output}: {exc}") from exc

    def checkpoint(record: dict[str, Any]) -> None:
        history.append(record)
        save({"history": history}, complete=False)

    try:
        results = run_experiment(config, data, progress=not args.no_progress, on_epoch=checkpoint)
        save(results, complete=True)
    except _OutputWriteError as exc:
        # --output was writable when the run started; a disk that fills up later still gets
        # one line, not a traceback.
        return error(prog, exc)
    print(
        f"test error {format_number(100 * results['test_error'])}%  "
        f"compression {format_number(results['compression'])}x  "
        f"(paper: 1.92% at 68x)  {format_duration(results['train_seconds'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
