"""UCI regression data in the layout of the MC-dropout benchmark, and its exact splits.

A data set is a directory under a root (nothing is shipped or downloaded; the user points at
the root), in either of two layouts (:data:`LAYOUTS`):

* ``<root>/<name>/data.txt`` and the other files beside it;
* ``<root>/<name>/data/data.txt`` and the other files beside it: the layout of the published
  MC-dropout experiment repository (Gal & Ghahramani, ``UCI_Datasets/<name>/data/``), whose
  ``UCI_Datasets`` folder can be passed as the root unchanged.

When both exist, ``<name>/data.txt`` is used.  The files of a data set:

=====================  ========================================================================
``data.txt``           whitespace-separated numbers, one row per sample, in benchmark row order
``index_features.txt`` 0-based feature column indices, one per line
``index_target.txt``   0-based target column index
``n_splits.txt``       number of train/test splits (20)
``n_hidden.txt``       hidden units of the network (50)
``n_epochs.txt``       base epoch count (40; the grid-search protocol trains 100 x this)
``dropout_rates.txt``  the dropout-rate grid
``tau_values.txt``     the model-precision grid
=====================  ========================================================================

Optional ``index_train_<i>.txt`` / ``index_test_<i>.txt`` files (the published split files)
are used when present, after checking them against the regeneration below.

Splits (Gal & Ghahramani's benchmark): numpy's legacy generator seeded with 1, then for split
``i = 0 .. n_splits - 1`` in order ``perm = choice(range(n), n, replace=False)``,
train = ``perm[:round(0.9 n)]``, test = ``perm[round(0.9 n):]``.  The validation set of the
grid search is the last 20 % of the training indices, in order: the first ``int(0.8 n_train)``
train, the rest validate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LAYOUTS",
    "REQUIRED_FILES",
    "SPLIT_SEED",
    "Split",
    "UCIDataset",
    "dataset_folder",
    "list_datasets",
    "locate_dataset",
    "no_datasets_message",
    "load_dataset",
    "regenerate_splits",
    "select_splits",
    "train_validation",
]

#: Files every data-set directory must contain.
REQUIRED_FILES = (
    "data.txt",
    "index_features.txt",
    "index_target.txt",
    "n_splits.txt",
    "n_hidden.txt",
    "n_epochs.txt",
    "dropout_rates.txt",
    "tau_values.txt",
)
#: Where a data set's files are looked for, relative to the root, in this order.
LAYOUTS = ("<name>/data.txt", "<name>/data/data.txt")
_LAYOUT_NOTE = (
    "dropkit uci reads a data set from <name>/data.txt or, as in the UCI_Datasets folder of the "
    "MC-dropout benchmark repository, from <name>/data/data.txt"
)
#: Seed of numpy's legacy generator for the split permutations.
SPLIT_SEED = 1


@dataclass(frozen=True)
class Split:
    """One train/test split: 0-based row indices, in the benchmark's order."""

    index: int
    train: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class UCIDataset:
    """A data set of the benchmark with its protocol constants.

    Attributes:
        name: directory name (``bostonHousing``, ``concrete``, ...).
        x: features, ``(n, d)`` float64.
        y: target, ``(n,)`` float64.
        n_splits, n_hidden, n_epochs: from the text files (``n_epochs`` is the base count).
        dropout_rates, tau_values: the grid.
        splits: the train/test splits.
        splits_source: ``"regenerated"`` or ``"index files (equal to the regeneration)"`` /
            ``"index files (differ from the regeneration)"``.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    n_splits: int
    n_hidden: int
    n_epochs: int
    dropout_rates: tuple[float, ...]
    tau_values: tuple[float, ...]
    splits: tuple[Split, ...]
    splits_source: str


def regenerate_splits(n: int, n_splits: int, seed: int = SPLIT_SEED) -> list[Split]:
    """The benchmark's train/test splits, regenerated exactly.

    ``np.random.seed(seed)`` (a private ``RandomState``, the same stream, leaving numpy's global
    state alone); for each split in order ``perm = choice(range(n), n, replace=False)``; train is
    ``perm[:round(0.9 n)]`` and test the rest.

    Args:
        n: number of rows (>= 2).
        n_splits: number of splits (>= 1).
        seed: the legacy seed (1 in the benchmark).

    Returns:
        ``n_splits`` :class:`Split` objects.

    Example:
        >>> s = regenerate_splits(10, 2)
        >>> len(s[0].train), len(s[0].test), sorted(np.r_[s[1].train, s[1].test].tolist()) == list(range(10))
        (9, 1, True)
    """
    for name, value, low in (("n", n, 2), ("n_splits", n_splits, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    rng = np.random.RandomState(seed)
    n_train = round(0.9 * n)
    splits = []
    for i in range(n_splits):
        perm = rng.choice(range(n), n, replace=False)
        splits.append(Split(i, perm[:n_train].astype(np.int64), perm[n_train:].astype(np.int64)))
    return splits


def train_validation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into the grid search's (train, validation): the last 20 %, in order.

    As the benchmark code: the first ``int(0.8 * len(train))`` indices train, the rest validate.

    Example:
        >>> a, b = train_validation(np.arange(10))
        >>> a.tolist(), b.tolist()
        ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    cut = int(0.8 * len(train))
    return train[:cut], train[cut:]


def _read_numbers(path: Path) -> list[list[float]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing (a UCI benchmark directory needs {', '.join(REQUIRED_FILES)})"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            row = []
            for field in fields:
                try:
                    value = float(field)
                except ValueError:
                    raise ValueError(f"{path}, line {line_no}: not a number: {field!r}") from None
                if not math.isfinite(value):
                    raise ValueError(f"{path}, line {line_no}: not a finite number: {field!r}")
                row.append(value)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty file")
    return rows


def _read_vector(path: Path) -> list[float]:
    rows = _read_numbers(path)
    return [value for row in rows for value in row]


def _read_int(path: Path, low: int) -> int:
    values = _read_vector(path)
    if len(values) != 1:
        raise ValueError(f"{path}: expected one integer, got {len(values)} values")
    value = values[0]
    if value != int(value) or value < low:
        raise ValueError(f"{path}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _read_indices(path: Path, limit: int, what: str) -> list[int]:
    values = _read_vector(path)
    out = []
    for value in values:
        if value != int(value) or not 0 <= value < limit:
            raise ValueError(f"{path}: {what} {value!r} is not an integer in [0, {limit})")
        out.append(int(value))
    return out


def _candidates(folder: Path) -> tuple[Path, Path]:
    """The folders that may hold a data set's files, in the order of :data:`LAYOUTS`."""
    return folder, folder / "data"


def list_datasets(root: str | Path) -> list[str]:
    """Names of the subdirectories of ``root`` that hold a data set in either layout (sorted).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and any((c / "data.txt").is_file() for c in _candidates(p))
    )


def locate_dataset(path: str | Path) -> tuple[Path, str] | None:
    """Where ``path`` sits when it is itself a data-set folder, not a folder of them.

    Args:
        path: a folder.

    Returns:
        ``(root, name)`` such that ``load_dataset(root, name)`` reads ``path``'s data set, or
        ``None`` when ``path`` holds no ``data.txt`` in either layout.  ``UCI_Datasets/yacht``
        and ``UCI_Datasets/yacht/data`` both give ``(UCI_Datasets, "yacht")``.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):  # a name is needed: "." -> /abs/yacht
        path = path.resolve()
    if (path / "data.txt").is_file():
        full = path.resolve()
        if full.name == "data" and full.parent.name:  # <root>/<name>/data/data.txt
            return full.parent.parent, full.parent.name
        return path.parent, path.name
    if (path / "data" / "data.txt").is_file():
        return path.parent, path.name
    return None


def no_datasets_message(root: str | Path) -> str:
    """The error for a ``root`` that is not a folder of data-set folders: the layouts looked for
    and, where it applies, the likely fix."""
    root = Path(root)
    message = (
        f"{root}: no data-set folders: looked for {root}/<name>/data.txt and {root}/<name>/data/data.txt"
    )
    found = locate_dataset(root)
    if found is not None:
        message += f"; {root} is itself a data-set folder: use --data {found[0]} --datasets {found[1]}"
    elif (root / "UCI_Datasets").is_dir():
        message += f"; did you mean --data {root / 'UCI_Datasets'}?"
    return message


def dataset_folder(root: str | Path, name: str) -> Path:
    """The folder holding the files of data set ``name``: ``<root>/<name>`` or
    ``<root>/<name>/data`` (see :data:`LAYOUTS`), the first that holds a ``data.txt``.

    Raises:
        FileNotFoundError: ``<root>/<name>`` is not a directory, or neither layout has a
            ``data.txt``; the message names the paths looked at.
    """
    base = Path(root) / name
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such data-set directory ({_LAYOUT_NOTE})")
    for folder in _candidates(base):
        if (folder / "data.txt").is_file():
            return folder
    raise FileNotFoundError(
        f"{base / 'data.txt'}: missing, and so is {base / 'data' / 'data.txt'} ({_LAYOUT_NOTE})"
    )


def load_dataset(root: str | Path, name: str) -> UCIDataset:
    """Read ``<root>/<name>/`` or ``<root>/<name>/data/`` (see the module docstring) and build
    its splits.

    Args:
        root: the directory holding one subdirectory per data set.
        name: the data set's directory name.

    Returns:
        The :class:`UCIDataset`.

    Raises:
        FileNotFoundError: the directory or a required file is missing (the message says which
            layouts were looked for when there is no ``data.txt``).
        ValueError: malformed content; the message names the file and, where it applies, the
            line (non-numeric values, rows of different lengths, bad indices, bad grids).
    """
    path = dataset_folder(root, name)
    data_path = path / "data.txt"
    rows = _read_numbers(data_path)
    width = len(rows[0])
    for line_no, row in enumerate(rows, start=1):
        if len(row) != width:
            raise ValueError(
                f"{data_path}, row {line_no}: {len(row)} columns, expected {width} (as the first row)"
            )
    data = np.asarray(rows, dtype=np.float64)
    features = _read_indices(path / "index_features.txt", width, "feature column")
    target = _read_indices(path / "index_target.txt", width, "target column")
    if len(target) != 1:
        raise ValueError(f"{path / 'index_target.txt'}: expected one column index, got {len(target)}")
    if not features:
        raise ValueError(f"{path / 'index_features.txt'}: no feature columns")
    if target[0] in features:
        raise ValueError(f"{path}: the target column {target[0]} is also listed as a feature")
    n_splits = _read_int(path / "n_splits.txt", 1)
    n_hidden = _read_int(path / "n_hidden.txt", 1)
    n_epochs = _read_int(path / "n_epochs.txt", 1)
    rates = tuple(_read_vector(path / "dropout_rates.txt"))
    for p in rates:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{path / 'dropout_rates.txt'}: dropout rate {p!r} is not in [0, 1)")
    taus = tuple(_read_vector(path / "tau_values.txt"))
    for tau in taus:
        if not tau > 0.0:
            raise ValueError(f"{path / 'tau_values.txt'}: tau {tau!r} is not > 0")
    n = data.shape[0]
    if n < 10:
        raise ValueError(f"{data_path}: {n} rows, need at least 10")
    splits = regenerate_splits(n, n_splits)
    source = "regenerated"
    files = [(path / f"index_train_{i}.txt", path / f"index_test_{i}.txt") for i in range(n_splits)]
    if any(a.exists() or b.exists() for a, b in files):
        loaded = []
        for i, (a, b) in enumerate(files):
            train = np.asarray(_read_indices(a, n, "row index"), dtype=np.int64)
            test = np.asarray(_read_indices(b, n, "row index"), dtype=np.int64)
            loaded.append(Split(i, train, test))
        same = all(
            np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test)
            for x, y in zip(loaded, splits, strict=True)
        )
        splits = loaded
        source = f"index files ({'equal to' if same else 'differ from'} the regeneration)"
    return UCIDataset(
        name=name,
        x=np.ascontiguousarray(data[:, features]),
        y=np.ascontiguousarray(data[:, target[0]]),
        n_splits=n_splits,
        n_hidden=n_hidden,
        n_epochs=n_epochs,
        dropout_rates=rates,
        tau_values=taus,
        splits=tuple(splits),
        splits_source=source,
    )


def select_splits(dataset: UCIDataset, splits: Sequence[int] | None) -> list[Split]:
    """The requested splits, in the order given (all when ``None``).

    Args:
        dataset: the data set.
        splits: split indices, each in ``[0, dataset.n_splits)`` and listed once; ``None``: all.

    Returns:
        The :class:`Split` objects.

    Raises:
        ValueError: an index is out of range or listed twice (a split trains once per run; two
            copies would also collide in the batched model's mask slots).
    """
    if splits is None:
        return list(dataset.splits)
    out = []
    seen: set[int] = set()
    for i in splits:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < dataset.n_splits:
            raise ValueError(
                f"splits entry {i!r} is out of range for {dataset.name} ({dataset.n_splits} splits)"
            )
        if i in seen:
            raise ValueError(f"splits entry {i} is listed twice (got {list(splits)})")
        seen.add(i)
        out.append(dataset.splits[i])
    return out
