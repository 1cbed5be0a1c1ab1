"""Image data for the reproductions: MNIST and Fashion-MNIST from IDX files, digits embedded.

Nothing is downloaded.  MNIST is read from ``DATA/mnist`` (or from ``DATA`` itself when the IDX
files lie there), Fashion-MNIST from ``DATA/fashion-mnist``, then from the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).  Without ``--data`` the
experiments fall back to scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn),
so every quick experiment runs with no data at all; the report names the data each used.

Every set is returned as float32 images ``(N, 1, H, W)`` in ``[0, 1]`` and int64 labels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dropkit.experiments.reproduce.api import DataUnavailableError, RunContext
from dropkit.experiments.sparse_vd_mnist import MNIST_FILES, load_mnist

__all__ = [
    "FASHION_MNIST_PACKAGE_DIR",
    "ImageSet",
    "load_digits",
    "load_fashion_mnist",
    "load_fashion_mnist_or_digits",
    "load_mnist_or_digits",
    "subsample",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_MNIST_PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "install it with 'apt-get install dataset-fashion-mnist' (files in "
    f"{FASHION_MNIST_PACKAGE_DIR}) or put its four IDX files in DATA/fashion-mnist"
)


@dataclass(frozen=True)
class ImageSet:
    """A classification image set.

    Attributes:
        name: ``"mnist"``, ``"fashion-mnist"`` or ``"digits"``.
        x_train, x_test: float32 images ``(N, 1, H, W)`` in ``[0, 1]``.
        y_train, y_test: int64 labels ``(N,)`` in ``[0, classes)``.
        classes: number of classes (10 for all three).
        source: where it was read from, for the report.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    source: str

    @property
    def features(self) -> int:
        """Pixels per image (784 for MNIST, 64 for digits)."""
        return int(self.x_train[0].numel())


def _has_idx_files(directory: Path) -> bool:
    names = MNIST_FILES.values()
    return all((directory / f"{n}.gz").is_file() or (directory / n).is_file() for n in names)


@functools.lru_cache(maxsize=4)
def _read_idx_set(directory: str, name: str) -> ImageSet:
    data = load_mnist(directory)
    side = math.isqrt(data.x_train.shape[1])

    def images(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, side, side).contiguous()

    return ImageSet(name, images(data.x_train), data.y_train, images(data.x_test), data.y_test, 10, directory)


@functools.lru_cache(maxsize=1)
def load_digits(test_fraction: float = 0.3, split_seed: int = 0) -> ImageSet:
    """scikit-learn's digits, 8x8, pixels scaled from ``0..16`` to ``[0, 1]``; a stratified split.

    Raises:
        DataUnavailableError: scikit-learn is not installed (``pip install 'dropkit[demo]'``).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as exc:
        raise DataUnavailableError(
            f"the embedded digits need scikit-learn ({exc}); pip install 'dropkit[demo]'"
        ) from exc
    bunch = sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    return ImageSet(
        "digits",
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        10,
        "scikit-learn digits (embedded)",
    )


def load_mnist_or_digits(ctx: RunContext) -> ImageSet:
    """MNIST when ``ctx.data_dir`` holds it (``DATA/mnist`` or ``DATA`` itself), else digits."""
    if ctx.data_dir is not None:
        for directory in (ctx.data_dir / "mnist", ctx.data_dir):
            if _has_idx_files(directory):
                return _read_idx_set(str(directory), "mnist")
    return load_digits()


def load_fashion_mnist(ctx: RunContext) -> ImageSet:
    """Fashion-MNIST from ``DATA/fashion-mnist``, else the Debian package's directory.

    Raises:
        DataUnavailableError: found in neither place; the message says how to get it.
    """
    candidates = [FASHION_MNIST_PACKAGE_DIR]
    if ctx.data_dir is not None:
        candidates.insert(0, ctx.data_dir / "fashion-mnist")
    for directory in candidates:
        if _has_idx_files(directory):
            return _read_idx_set(str(directory), "fashion-mnist")
    looked = ", ".join(str(c) for c in candidates)
    raise DataUnavailableError(f"Fashion-MNIST not found (looked in {looked}); {FASHION_MNIST_HINT}")


def load_fashion_mnist_or_digits(ctx: RunContext) -> tuple[ImageSet, str | None]:
    """Fashion-MNIST when found (:func:`load_fashion_mnist`), else scikit-learn's digits.

    For the experiments whose published setting is Fashion-MNIST but that still run without it
    (``conv-variants``, ``early-late``): the 8x8 digits stand in, and the second value says so
    for the report.

    Returns:
        ``(images, fallback)``: ``fallback`` is ``None`` when ``images`` is Fashion-MNIST, else
        why it was not used: the message of :func:`load_fashion_mnist`, which says where it
        looked and how to get it (the Debian package ``dataset-fashion-mnist`` or
        ``DATA/fashion-mnist``).

    Raises:
        DataUnavailableError: neither is available (no Fashion-MNIST and no scikit-learn); the
            message gives both reasons.
    """
    try:
        return load_fashion_mnist(ctx), None
    except DataUnavailableError as missing:
        try:
            return load_digits(), str(missing)
        except DataUnavailableError as exc:
            raise DataUnavailableError(f"{missing}; and the fallback: {exc}") from exc


def subsample(images: ImageSet, n_train: int | None, n_test: int | None, seed: int = 0) -> ImageSet:
    """A class-stratified random subset (``None`` keeps a split whole); deterministic in ``seed``."""

    def take(
        x: torch.Tensor, y: torch.Tensor, n: int | None, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if n is None or n >= len(y):
            return x, y
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        generator = torch.Generator().manual_seed(seed * 2 + offset)
        order = torch.randperm(len(y), generator=generator)
        # Round-robin over classes in a random order keeps the subset stratified.
        ranks = torch.empty_like(order)
        y_sorted = y[order]
        for label in range(images.classes):
            positions = (y_sorted == label).nonzero().flatten()
            ranks[positions] = torch.arange(len(positions))
        chosen = order[torch.argsort(ranks * images.classes + y_sorted, stable=True)[:n]]
        chosen = chosen.sort().values
        return x[chosen], y[chosen]

    x_train, y_train = take(images.x_train, images.y_train, n_train, 0)
    x_test, y_test = take(images.x_test, images.y_test, n_test, 1)
    return ImageSet(images.name, x_train, y_train, x_test, y_test, images.classes, images.source)
