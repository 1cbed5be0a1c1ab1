"""Sparse variational dropout on MNIST: IDX reading, config, and a tiny synthetic run (no real data)."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dropkit.experiments.sparse_vd_mnist import (
    MNIST_FILES,
    SparseVDConfig,
    build_lenet_300_100,
    learning_rate,
    load_mnist,
    main,
    read_idx,
    run_experiment,
)
from dropkit.nn.sparse_variational import SparseVariationalLinear

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
}


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_mnist(root: Path, n_train: int = 300, n_test: int = 100, *, compress: bool = True) -> Path:
    """A learnable synthetic MNIST: each class lights up its own block of pixels, plus noise."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 4, 4:24] = 255
        suffix = ".gz" if compress else ""
        write_idx(root / (MNIST_FILES[f"{split}_images"] + suffix), images, compress=compress)
        write_idx(root / (MNIST_FILES[f"{split}_labels"] + suffix), labels, compress=compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 7, 30000], dtype=np.int16),
        np.arange(6, dtype=np.int32).reshape(3, 2) - 2,
        np.linspace(-1, 1, 5, dtype=np.float32),
    ],
    ids=["uint8-3d", "int16", "int32-2d", "float32"],
)
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    path = write_idx(tmp_path / "data.idx", array, compress=compress)
    result = read_idx(path)
    assert result.shape == array.shape
    assert result.dtype == array.dtype
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize(
    "raw",
    [b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", b"\x00\x00\x42\x01\x00\x00\x00\x01\x05", b"\x00\x00"],
    ids=["nonzero-leading-byte", "unknown-type", "too-short"],
)
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_bad_magic(tmp_path: Path, raw: bytes, compress: bool) -> None:
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(ValueError, match=r"broken-idx1-ubyte.*(magic|IDX)"):
        read_idx(path)


def test_read_idx_size_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 9)
    with pytest.raises(ValueError, match=r"short\.idx.*size mismatch"):
        read_idx(path)


def test_load_mnist(tmp_path: Path) -> None:
    data = load_mnist(write_mnist(tmp_path / "mnist", compress=False))
    assert data.x_train.shape == (300, 784)
    assert data.x_test.shape == (100, 784)
    assert data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64
    assert float(data.x_train.min()) >= 0.0
    assert float(data.x_train.max()) == 1.0


def test_load_mnist_missing_file_never_downloads(tmp_path: Path) -> None:
    root = write_mnist(tmp_path / "mnist")
    (root / (MNIST_FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*never downloads"):
        load_mnist(root)


def test_load_mnist_rejects_swapped_files(tmp_path: Path) -> None:
    root = write_mnist(tmp_path / "mnist")
    images = root / (MNIST_FILES["train_images"] + ".gz")
    labels = root / (MNIST_FILES["train_labels"] + ".gz")
    images_bytes = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(images_bytes)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist(root)


def test_config_defaults_are_the_recipe() -> None:
    config = SparseVDConfig()
    assert (config.epochs, config.batch_size, config.lr) == (200, 100, 1e-3)
    assert (config.lr_decay_start, config.kl_start, config.kl_end) == (100.0, 5.0, 20.0)
    assert config.is_official
    assert SparseVDConfig.recipe() == config


def test_config_recipe_scales_the_schedule() -> None:
    config = SparseVDConfig.recipe(20, seed=3)
    assert (config.lr_decay_start, config.kl_start, config.kl_end) == (10.0, 0.5, 2.0)
    assert config.seed == 3
    assert not config.is_official


def test_learning_rate_schedule() -> None:
    config = SparseVDConfig()
    assert learning_rate(config, 0) == learning_rate(config, 100) == 1e-3
    assert math.isclose(learning_rate(config, 150), 5e-4)
    assert math.isclose(learning_rate(config, 199), 1e-5)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("epochs", 0, ValueError),
        ("epochs", 2.0, TypeError),
        ("epochs", True, TypeError),
        ("batch_size", 0, ValueError),
        ("lr", 0.0, ValueError),
        ("lr", math.nan, ValueError),
        ("lr", "0.1", TypeError),
        ("lr_decay_start", 201.0, ValueError),
        ("kl_start", -1.0, ValueError),
        ("kl_end", 4.0, ValueError),
        ("kl_end", 300.0, ValueError),
        ("threshold", math.inf, ValueError),
        ("seed", -1, ValueError),
        ("threads", 0, ValueError),
    ],
)
def test_config_validation(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        SparseVDConfig(**{field: value})  # type: ignore[arg-type]


def test_lenet_300_100_architecture() -> None:
    model = build_lenet_300_100()
    linear = [m for m in model if isinstance(m, SparseVariationalLinear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 300), (300, 100), (100, 10)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model) == 2


def test_one_epoch_on_synthetic_data(tmp_path: Path) -> None:
    data = load_mnist(write_mnist(tmp_path / "mnist"))
    config = SparseVDConfig.recipe(1, threads=1)
    records: list[dict[str, object]] = []
    threads = torch.get_num_threads()
    results = run_experiment(config, data, progress=False, on_epoch=records.append)
    assert torch.get_num_threads() == threads
    assert 0.0 <= results["test_error"] <= 1.0
    assert results["compression"] >= 1.0
    assert results["total"] == 784 * 300 + 300 * 100 + 100 * 10
    assert len(results["history"]) == len(records) == 1
    assert records[0]["kl_weight"] == 1.0  # the scaled warm-up (0.025 -> 0.1 epochs) is over
    again = run_experiment(config, data, progress=False)
    assert again["test_error"] == results["test_error"]  # the seed fixes the run


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_mnist(tmp_path / "mnist", n_train=200, n_test=50)
    output = tmp_path / "out" / "results.json"
    argv = ["--data", str(root), "--epochs", "1", "--threads", "1", "--output", str(output), "--no-progress"]
    assert main(argv) == 0
    payload = json.loads(output.read_text())
    assert payload["complete"] is True
    assert payload["official_recipe"] is False
    assert payload["config"]["epochs"] == 1
    assert 0.0 <= payload["results"]["test_error"] <= 1.0
    assert "scaled" in capsys.readouterr().err


def test_cli_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "nowhere"), "--epochs", "1"]) == 2
    assert "never downloads" in capsys.readouterr().err
