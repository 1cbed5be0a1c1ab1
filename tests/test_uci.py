"""The UCI MC-dropout benchmark: data layout, exact splits, batched training, protocol, resume."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dropkit.experiments.uci import cli, protocol, report
from dropkit.experiments.uci.data import (
    dataset_folder,
    list_datasets,
    load_dataset,
    locate_dataset,
    no_datasets_message,
    regenerate_splits,
    select_splits,
    train_validation,
)
from dropkit.experiments.uci.model import ModelSpec, fused_available, predict_blocks, train_models
from dropkit.metrics.regression import mc_rmse, mixture_log_likelihood


def _write_dataset(
    root: Path,
    name: str = "toy",
    n: int = 40,
    d: int = 3,
    n_splits: int = 3,
    rates: tuple[float, ...] = (0.05, 0.1),
    taus: tuple[float, ...] = (0.5, 1.0),
    seed: int = 0,
) -> Path:
    """A synthetic data set in the benchmark's layout (target in the last column)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
    folder = root / name
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", np.column_stack([x, y]), fmt="%.6f")
    (folder / "index_features.txt").write_text("\n".join(str(i) for i in range(d)) + "\n")
    (folder / "index_target.txt").write_text(f"{d}\n")
    (folder / "n_splits.txt").write_text(f"{n_splits}\n")
    (folder / "n_hidden.txt").write_text("6\n")
    (folder / "n_epochs.txt").write_text("1")  # no trailing newline, as some shipped files
    (folder / "dropout_rates.txt").write_text("\n".join(map(str, rates)) + "\n")
    (folder / "tau_values.txt").write_text(" ".join(map(str, taus)) + "\n")
    return folder


# --- splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 306, 1031])
def test_regenerated_splits_follow_documented_procedure(n: int) -> None:
    state = np.random.get_state()
    try:
        np.random.seed(1)
        expected = []
        for _ in range(4):
            perm = np.random.choice(range(n), n, replace=False)
            expected.append((perm[: round(0.9 * n)], perm[round(0.9 * n) :]))
        after = np.random.get_state()
        np.random.seed(12345)
        splits = regenerate_splits(n, 4)
        assert np.random.get_state()[1][0] == np.random.RandomState(12345).get_state()[1][0]  # type: ignore[index]
    finally:
        np.random.set_state(state)
    assert after is not None
    for split, (train, test) in zip(splits, expected, strict=True):
        np.testing.assert_array_equal(split.train, train)
        np.testing.assert_array_equal(split.test, test)
        assert sorted(np.r_[split.train, split.test].tolist()) == list(range(n))


def test_train_validation_is_last_20_percent_in_order() -> None:
    train = np.array([9, 4, 7, 1, 0, 3, 8, 2, 6, 5, 11])
    fit, val = train_validation(train)
    assert fit.tolist() == [9, 4, 7, 1, 0, 3, 8, 2]  # int(0.8 * 11) = 8
    assert val.tolist() == [6, 5, 11]


def test_load_dataset(tmp_path: Path) -> None:
    _write_dataset(tmp_path, n=30, d=2)
    data = load_dataset(tmp_path, "toy")
    assert data.x.shape == (30, 2)
    assert data.y.shape == (30,)
    assert (data.n_splits, data.n_hidden, data.n_epochs) == (3, 6, 1)
    assert data.dropout_rates == (0.05, 0.1)
    assert data.tau_values == (0.5, 1.0)
    assert data.splits_source == "regenerated"
    np.testing.assert_array_equal(data.splits[2].train, regenerate_splits(30, 3)[2].train)
    assert [s.index for s in select_splits(data, [2, 0])] == [2, 0]
    with pytest.raises(ValueError, match="splits entry 3 is out of range for toy"):
        select_splits(data, [3])


def test_shipped_index_files_are_used_and_checked(tmp_path: Path) -> None:
    folder = _write_dataset(tmp_path, n=20, n_splits=2)
    for split in regenerate_splits(20, 2):
        np.savetxt(folder / f"index_train_{split.index}.txt", split.train, fmt="%d")
        np.savetxt(folder / f"index_test_{split.index}.txt", split.test, fmt="%d")
    assert load_dataset(tmp_path, "toy").splits_source == "index files (equal to the regeneration)"
    np.savetxt(folder / "index_test_1.txt", regenerate_splits(20, 2)[1].test[::-1], fmt="%d")
    data = load_dataset(tmp_path, "toy")
    assert data.splits_source == "index files (differ from the regeneration)"
    np.testing.assert_array_equal(data.splits[1].test, regenerate_splits(20, 2)[1].test[::-1])


@pytest.mark.parametrize(
    ("file", "content", "error", "match"),
    [
        ("data.txt", None, FileNotFoundError, r"data\.txt: missing"),
        ("tau_values.txt", None, FileNotFoundError, r"tau_values\.txt: missing"),
        ("data.txt", "1 2 3 4\n5 6 7\n", ValueError, r"data\.txt, row 2: 3 columns, expected 4"),
        ("data.txt", "1 2 3 4\n5 6 x 8\n", ValueError, r"data\.txt, line 2: not a number: 'x'"),
        ("data.txt", "1 2 3 nan\n", ValueError, r"data\.txt, line 1: not a finite number"),
        (
            "index_target.txt",
            "7\n",
            ValueError,
            r"index_target\.txt: target column 7\.0 is not an integer in",
        ),
        ("index_features.txt", "0\n1.5\n", ValueError, r"index_features\.txt: feature column 1\.5"),
        ("index_features.txt", "0\n3\n", ValueError, r"target column 3 is also listed as a feature"),
        ("n_splits.txt", "2.5\n", ValueError, r"n_splits\.txt: expected an integer >= 1"),
        ("n_hidden.txt", "5 6\n", ValueError, r"n_hidden\.txt: expected one integer, got 2"),
        ("dropout_rates.txt", "0.1\n1.0\n", ValueError, r"dropout_rates\.txt: dropout rate 1\.0"),
        ("tau_values.txt", "0.5 -1\n", ValueError, r"tau_values\.txt: tau -1\.0 is not > 0"),
        ("tau_values.txt", "\n\n", ValueError, r"tau_values\.txt: empty file"),
    ],
)
def test_malformed_directories_are_rejected(
    tmp_path: Path, file: str, content: str | None, error: type[Exception], match: str
) -> None:
    folder = _write_dataset(tmp_path)
    if content is None:
        (folder / file).unlink()
    else:
        (folder / file).write_text(content)
    with pytest.raises(error, match=match):
        load_dataset(tmp_path, "toy")


def test_missing_dataset_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such data-set directory"):
        load_dataset(tmp_path, "nope")


def _write_published_layout(root: Path, name: str = "toy", **kwargs: Any) -> Path:
    """The same synthetic data set in the published repository's layout, ``<name>/data/``, with
    the published split files beside it (as ``UCI_Datasets/<name>/data/`` holds them)."""
    folder = _write_dataset(root / name, name="data", **kwargs)
    n = np.loadtxt(folder / "data.txt").shape[0]
    n_splits = int((folder / "n_splits.txt").read_text())
    for split in regenerate_splits(n, n_splits):
        np.savetxt(folder / f"index_train_{split.index}.txt", split.train, fmt="%d")
        np.savetxt(folder / f"index_test_{split.index}.txt", split.test, fmt="%d")
    return folder


def test_both_layouts_read_the_same_data(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _write_dataset(flat)  # flat/toy/data.txt
    nested = tmp_path / "nested"
    folder = _write_published_layout(nested)  # nested/toy/data/data.txt
    assert folder == nested / "toy" / "data"
    assert dataset_folder(flat, "toy") == flat / "toy"
    assert dataset_folder(nested, "toy") == folder
    a, b = load_dataset(flat, "toy"), load_dataset(nested, "toy")
    assert a.name == b.name == "toy"
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert (a.n_splits, a.n_hidden, a.dropout_rates, a.tau_values) == (
        b.n_splits,
        b.n_hidden,
        b.dropout_rates,
        b.tau_values,
    )
    assert a.splits_source == "regenerated"
    assert b.splits_source == "index files (equal to the regeneration)"  # read from data/
    for x, y in zip(a.splits, b.splits, strict=True):
        np.testing.assert_array_equal(x.train, y.train)
        np.testing.assert_array_equal(x.test, y.test)


def test_list_datasets_finds_both_layouts(tmp_path: Path) -> None:
    _write_dataset(tmp_path, name="flat")
    _write_published_layout(tmp_path, name="nested")
    (tmp_path / "results").mkdir()  # a folder that holds no data set
    (tmp_path / "notes.txt").write_text("not a folder")
    assert list_datasets(tmp_path) == ["flat", "nested"]


def test_unreadable_folder_names_both_layouts(tmp_path: Path) -> None:
    (tmp_path / "empty" / "data").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset(tmp_path, "empty")
    message = str(info.value)
    assert (
        f"{tmp_path / 'empty' / 'data.txt'}: missing, and so is {tmp_path / 'empty' / 'data' / 'data.txt'}"
        in (message)
    )
    assert "<name>/data.txt" in message
    assert "<name>/data/data.txt" in message
    assert "UCI_Datasets" in message
    assert "<name>/data/data.txt" in no_datasets_message(tmp_path / "empty")


def test_a_dataset_folder_passed_as_root_is_located(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "flat")
    _write_published_layout(tmp_path / "nested")
    assert locate_dataset(tmp_path / "flat" / "toy") == (tmp_path / "flat", "toy")
    assert locate_dataset(tmp_path / "nested" / "toy") == (tmp_path / "nested", "toy")
    assert locate_dataset(tmp_path / "nested" / "toy" / "data") == ((tmp_path / "nested").resolve(), "toy")
    assert locate_dataset(tmp_path / "flat") is None
    message = no_datasets_message(tmp_path / "nested" / "toy")
    assert message.endswith(f"is itself a data-set folder: use --data {tmp_path / 'nested'} --datasets toy")
    (tmp_path / "repo" / "UCI_Datasets").mkdir(parents=True)
    assert no_datasets_message(tmp_path / "repo").endswith(
        f"did you mean --data {tmp_path / 'repo' / 'UCI_Datasets'}?"
    )


# --- batched training ---------------------------------------------------------------------------


def _specs() -> list[ModelSpec]:
    rates, taus = (0.05, 0.2), (0.5, 2.0)
    return [
        ModelSpec(
            data_index=s,
            p=p,
            weight_decay=protocol.regularization(p, tau, 25),
            init_seed=100 + s,
            shuffle_seed=200 + s,
            mask_stream=pi,
            slot=s * 2 + ti,
        )
        for pi, p in enumerate(rates)
        for s in range(2)
        for ti, tau in enumerate(taus)
    ]


needs_numba = pytest.mark.skipif(not fused_available(), reason="the fused kernels need numba")
KERNELS = [pytest.param(True, id="fused", marks=needs_numba), pytest.param(False, id="torch")]


@pytest.mark.parametrize("fused", KERNELS)
def test_batched_training_equals_one_at_a_time(fused: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 25, 3, generator=g)
    y = torch.randn(2, 25, generator=g)
    specs = _specs()
    kwargs: dict[str, Any] = {"n_hidden": 7, "epochs": 3, "seed": 5, "batch_size": 8, "fused": fused}
    batched = train_models(specs, x, y, **kwargs)
    x_eval = torch.randn(2, 4, 3, generator=g)
    blocks: list[torch.Tensor] = []
    predict_blocks(batched, specs, x_eval, samples=7, seed=5, block=3, consume=blocks.append, fused=fused)
    preds = torch.cat(blocks, dim=1)
    assert preds.shape == (8, 7, 4)
    for i, spec in enumerate(specs):
        alone = train_models([spec], x, y, **kwargs)
        for a, b in zip(alone.parameters(), batched.parameters(), strict=True):
            if fused:  # one network's arithmetic never depends on the others: the same bits
                assert torch.equal(a[0], b[i])
            else:
                torch.testing.assert_close(a[0], b[i], rtol=1e-5, atol=1e-6)
        mine: list[torch.Tensor] = []
        predict_blocks(alone, [spec], x_eval, samples=7, seed=5, block=3, consume=mine.append, fused=fused)
        torch.testing.assert_close(torch.cat(mine, dim=1)[0], preds[i], rtol=1e-5, atol=1e-5)
    # Training moved the weights and the models differ from each other.
    assert not torch.allclose(batched.w1[0], batched.w1[1])


@needs_numba
def test_fused_kernels_equal_the_torch_path() -> None:
    # The same masks and recipe; only the order of float32 sums differs.  Rates include 0 (no
    # mask) and a large one so dropped and kept units both matter.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 41, 5, generator=g)
    y = torch.randn(2, 41, generator=g)
    specs = [
        ModelSpec(data_index=s, p=p, weight_decay=1e-3 * (1 + s), init_seed=s, shuffle_seed=7 + s,
                  mask_stream=pi, slot=s)
        for pi, p in enumerate((0.0, 0.1, 0.5))
        for s in range(2)
    ]  # fmt: skip
    kwargs: dict[str, Any] = {"n_hidden": 9, "epochs": 4, "seed": 3, "batch_size": 16}
    fused = train_models(specs, x, y, fused=True, **kwargs)
    reference = train_models(specs, x, y, fused=False, **kwargs)
    for a, b in zip(fused.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused.w1, train_models(specs, x, y, fused=True, **{**kwargs, "epochs": 1}).w1)
    x_eval = torch.randn(2, 6, 5, generator=g)
    outputs = []
    for use in (True, False):
        blocks: list[torch.Tensor] = []
        predict_blocks(
            reference, specs, x_eval, samples=11, seed=3, block=4, consume=blocks.append, fused=use
        )
        outputs.append(torch.cat(blocks, dim=1))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    # MC passes differ from each other for p > 0 (the masks act), not for p = 0.
    assert torch.equal(outputs[0][0], outputs[0][0, :1].expand(11, 6))
    assert not torch.allclose(outputs[0][2], outputs[0][2, :1].expand(11, 6))


@needs_numba
def test_fused_kernels_ignore_the_thread_count() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1, 30, 4, generator=g), torch.randn(1, 30, generator=g)
    specs = [ModelSpec(0, 0.2, 1e-3, k, 0, 0, k) for k in range(5)]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = train_models(specs, x, y, n_hidden=6, epochs=2, seed=0, batch_size=8, fused=True)
            blocks: list[torch.Tensor] = []
            predict_blocks(model, specs, x, samples=5, seed=0, block=5, consume=blocks.append, fused=True)
            results.append((model.parameters(), blocks[0]))
            assert torch.get_num_threads() == threads  # numba's pool left PyTorch's setting alone
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(results[0][0], results[1][0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(results[0][1], results[1][1])


@needs_numba
def test_fused_kernels_run_serially_in_a_forked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    # A forked child of the process that started numba's pool must not launch it (GNU OpenMP
    # aborts); the serial build of the same source gives the same bits.
    from dropkit.kernels import cpu

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 20, 3, generator=g), torch.randn(1, 20, generator=g)
    specs = [ModelSpec(0, 0.3, 1e-3, k, 0, 0, k) for k in range(3)]

    def run() -> tuple[list[torch.Tensor], torch.Tensor]:
        model = train_models(specs, x, y, n_hidden=5, epochs=2, seed=1, batch_size=8, fused=True)
        blocks: list[torch.Tensor] = []
        predict_blocks(model, specs, x, samples=4, seed=1, block=4, consume=blocks.append, fused=True)
        return model.parameters(), blocks[0]

    parallel = run()
    monkeypatch.setattr(cpu, "_pool_pid", -1)  # as if the pool belonged to a parent process
    launched: list[object] = []
    monkeypatch.setattr(cpu, "_launch_lock", _RecordingLock(launched))
    serial = run()
    assert not launched  # the parallel kernels were not launched
    for a, b in zip(parallel[0], serial[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(parallel[1], serial[1])


class _RecordingLock:
    def __init__(self, entered: list[object]) -> None:
        self.entered = entered

    def __enter__(self) -> None:
        self.entered.append(self)

    def __exit__(self, *exc: object) -> None:
        return None


def test_fused_argument_is_checked() -> None:
    spec = ModelSpec(0, 0.1, 0.0, 0, 0, 0, 0)
    with pytest.raises(TypeError, match="fused must be a bool or None, got str"):
        train_models(
            [spec], torch.zeros(1, 4, 2), torch.zeros(1, 4), n_hidden=3, epochs=1, seed=0, fused="yes"
        )  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fused must be a bool or None"):
        protocol.ProtocolConfig(fused=1)  # type: ignore[arg-type]


def test_masks_follow_the_rate() -> None:
    # p = 0: no mask ever drops, so every MC pass gives the same prediction.
    spec = ModelSpec(0, 0.0, 0.0, 1, 2, 0, 0)
    model = train_models([spec], torch.randn(1, 9, 2), torch.randn(1, 9), n_hidden=4, epochs=1, seed=0)
    out: list[torch.Tensor] = []
    predict_blocks(model, [spec], torch.randn(1, 3, 2), samples=5, seed=0, block=2, consume=out.append)
    preds = torch.cat(out, dim=1)[0]
    assert torch.equal(preds, preds[:1].expand_as(preds))


def test_spec_and_stream_checks() -> None:
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        ModelSpec(0, 1.0, 0.0, 0, 0, 0, 0)
    bad = [ModelSpec(0, 0.1, 0.0, 0, 0, 0, 0), ModelSpec(0, 0.2, 0.0, 0, 0, 0, 1)]
    with pytest.raises(ValueError, match="must share p"):
        train_models(bad, torch.zeros(1, 4, 2), torch.zeros(1, 4), n_hidden=3, epochs=1, seed=0)


# --- protocol -----------------------------------------------------------------------------------


def _config(**overrides: Any) -> protocol.ProtocolConfig:
    base: dict[str, Any] = {
        "epochs_scale": 0.03,
        "samples": 30,
        "mc_block": 7,
        "tau_search_samples": 20,
    }
    base.update(overrides)
    return protocol.ProtocolConfig(**base)


def test_protocol_split_result_independent_of_batching(tmp_path: Path) -> None:
    _write_dataset(tmp_path)
    data = load_dataset(tmp_path, "toy")
    config = _config()
    assert config.epochs(data) == 3
    assert not config.is_protocol()
    together = protocol.run_splits(data, [data.splits[0], data.splits[2]], config)
    alone = protocol.run_splits(data, [data.splits[2]], config)
    a, b = together[1], alone[0]
    assert a["split"] == b["split"] == 2
    assert (a["p"], a["tau"]) == (b["p"], b["tau"])
    for key in ("rmse", "ll", "validation_ll", "ll_gaussian", "ll_tau_learned", "mpiw95"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert len(a["grid"]) == 4
    best = max(a["grid"], key=lambda r: r["validation_ll"])
    assert (best["p"], best["tau"]) == (a["p"], a["tau"])
    assert a["n_train"] == 36
    assert a["n_test"] == 4
    assert a["n_validation"] == 8


def test_protocol_stats_match_the_metrics() -> None:
    g = torch.Generator().manual_seed(3)
    samples = torch.randn(2, 50, 6, generator=g, dtype=torch.float64)
    targets = torch.randn(2, 6, generator=g, dtype=torch.float64)
    taus = torch.tensor([[0.5, 2.0], [1.0, 3.0]], dtype=torch.float64)
    stats = protocol._MixtureStats(targets, taus)
    for chunk in torch.split(samples, [7, 30, 13], dim=1):
        stats.update(chunk)
    ll = stats.log_likelihood()
    for g_ in range(2):
        for k in range(2):
            expected = mixture_log_likelihood(samples[g_], targets[g_], float(taus[g_, k]))
            assert ll[g_, k].item() == pytest.approx(expected.item(), rel=1e-12)
        assert stats.rmse()[g_].item() == pytest.approx(mc_rmse(samples[g_], targets[g_]).item(), rel=1e-12)


def test_stats_in_model_units_and_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # update(samples, scale, shift) converts to original units chunk by chunk of models; any
    # chunking gives the values of converting first and updating once (to float64 rounding:
    # torch's vectorized logsumexp may sum a smaller tensor in another order).
    g = torch.Generator().manual_seed(4)
    samples = torch.randn(5, 12, 3, generator=g)
    targets = torch.randn(5, 3, generator=g, dtype=torch.float64) * 4 + 10
    taus = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1
    scale = torch.rand(5, 1, 1, generator=g, dtype=torch.float64) + 1
    shift = torch.randn(5, 1, 1, generator=g, dtype=torch.float64) + 10
    whole = protocol._MixtureStats(targets, taus, limit=9)
    for chunk in torch.split(samples, [5, 7], dim=1):
        whole.update(chunk.to(torch.float64) * scale + shift)
    monkeypatch.setattr(protocol, "_MOMENT_CHUNK_ELEMENTS", 20)
    monkeypatch.setattr(protocol, "_LSE_CHUNK_ELEMENTS", 40)
    chunked = protocol._MixtureStats(targets, taus, limit=9)
    for chunk in torch.split(samples, [5, 7], dim=1):
        chunked.update(chunk, scale, shift)
    assert chunked.lse_count == whole.lse_count == 9
    for name in ("mean", "m2", "lse"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-13, atol=1e-13)


def test_config_checks() -> None:
    assert protocol.ProtocolConfig().is_protocol()
    with pytest.raises(ValueError, match="epochs_scale must be a finite float > 0, got 0"):
        protocol.ProtocolConfig(epochs_scale=0)
    with pytest.raises(ValueError, match="samples must be an int >= 1, got 0"):
        protocol.ProtocolConfig(samples=0)
    with pytest.raises(ValueError, match="extra_taus entries"):
        protocol.ProtocolConfig(extra_taus=(-1.0,))
    assert protocol.regularization(0.1, 0.5, 100) == pytest.approx(1e-4 * 0.9 / 100)


# --- CLI, resume, reports -----------------------------------------------------------------------


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--output",
        str(out),
        "--epochs-scale",
        "0.02",
        "--T",
        "20",
        "--tau-search-samples",
        "10",
        "--no-progress",
        *extra,
    ]


def test_cli_resume_after_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    full = tmp_path / "full"
    assert cli.main(_argv(data, full, "--split-batch", "1")) == 0

    real = protocol.run_splits
    calls: list[list[int]] = []

    def interrupted(dataset: Any, splits: Any, config: Any, progress: Any = None) -> Any:
        calls.append([s.index for s in splits])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(dataset, splits, config, progress)

    out = tmp_path / "out"
    monkeypatch.setattr(protocol, "run_splits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(_argv(data, out, "--split-batch", "1"))
    assert sorted(p.name for p in (out / "toy").iterdir()) == ["split_0.json"]  # no temp files left

    calls.clear()
    monkeypatch.setattr(
        protocol, "run_splits", lambda *a, **k: (calls.append([s.index for s in a[1]]), real(*a, **k))[1]
    )
    assert cli.main(_argv(data, out, "--split-batch", "1", "--resume")) == 0
    assert calls == [[1], [2]]
    for i in range(3):
        a = json.loads((full / "toy" / f"split_{i}.json").read_text())["result"]
        b = json.loads((out / "toy" / f"split_{i}.json").read_text())["result"]
        assert a["rmse"] == pytest.approx(b["rmse"], rel=1e-5)
        assert a["ll"] == pytest.approx(b["ll"], rel=1e-5)
    summary = json.loads((out / "summary.json").read_text())["summary"][0]
    assert summary["n_splits"] == 3
    assert math.isfinite(summary["ll"])
    assert (out / "results.csv").read_text().count("\n") == 4
    assert "NOT the published protocol" in (out / "summary.md").read_text()

    calls.clear()
    assert cli.main(_argv(data, out, "--resume")) == 0
    assert calls == []  # everything done


def test_cli_resume_recomputes_files_of_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _write_dataset(data, n_splits=1)
    out = tmp_path / "out"
    assert cli.main(_argv(data, out)) == 0
    capsys.readouterr()
    assert cli.main([*_argv(data, out, "--resume"), "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert (
        f"{out / 'toy' / 'split_0.json'}: written for other settings (config.seed=0, now 3); recomputing"
        in err
    )
    stored = json.loads((out / "toy" / "split_0.json").read_text())
    assert stored["settings"]["config"]["seed"] == 3


def test_cli_reports_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _write_dataset(tmp_path / "data")
    (folder / "data.txt").write_text("1 2 3 4\n1 2 3\n")
    assert cli.main(_argv(tmp_path / "data", tmp_path / "out")) == 2
    assert "data.txt, row 2: 3 columns, expected 4" in capsys.readouterr().err
    assert cli.main(_argv(tmp_path / "empty", tmp_path / "out")) == 2


def test_markdown_table_shows_published_numbers() -> None:
    result = {
        "dataset": "yacht",
        "rmse": 0.7,
        "ll": -1.3,
        "tau_at_grid_edge": True,
        "seconds": {"a": 1.0},
    }
    summary = report.summarize([result, {**result, "rmse": 0.9}])
    assert summary["rmse"] == pytest.approx(0.8)
    assert summary["rmse_se"] == pytest.approx(0.1 / math.sqrt(2))
    table = report.markdown_table([summary], {"protocol": True})
    assert "| Yacht | 2 | 0.800 ± 0.071 | 0.67 ± 0.05 [1] | -1.30 ± 0.00 | -1.25 ± 0.01 [1] |" in table
    assert "\n[1] Gal & Ghahramani, MC dropout, grid-search protocol" in table


def test_cli_mounts_as_subcommand(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_dataset(data, n_splits=1)
    parser = argparse.ArgumentParser(prog="dropkit")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.build_parser(commands.add_parser("uci"))
    args = parser.parse_args(["uci", *_argv(data, tmp_path / "out", "--datasets", "toy")])
    assert cli.run(args) == 0
    assert (tmp_path / "out" / "toy" / "split_0.json").is_file()


def test_wider_tau_grid_beyond_protocol(tmp_path: Path) -> None:
    _write_dataset(tmp_path, n_splits=1)
    data = load_dataset(tmp_path, "toy")
    config = _config(extra_taus=(4.0, 0.5))  # 0.5 is already in the grid
    assert config.taus(data) == (0.5, 1.0, 4.0)
    assert not protocol.ProtocolConfig(extra_taus=(4.0,)).is_protocol()
    (result,) = protocol.run_splits(data, [data.splits[0]], config)
    assert [(r["p"], r["tau"]) for r in result["grid"]] == [
        (p, t) for p in (0.05, 0.1) for t in (0.5, 1.0, 4.0)
    ]
    assert result["tau_learned"] in protocol.tau_search_grid((0.5, 1.0, 4.0))


def test_tau_span_widens_each_grid(tmp_path: Path) -> None:
    _write_dataset(tmp_path, n_splits=1)
    data = load_dataset(tmp_path, "toy")  # grid (0.5, 1.0)
    config = _config(tau_span=4.0, extra_taus=(2.0,))  # 2.0 = 1.0 * sqrt(4): listed once
    assert config.taus(data) == (0.5, 1.0, 0.125, 0.25, 2.0, 4.0)
    assert not protocol.ProtocolConfig(tau_span=4.0).is_protocol()
    assert protocol.ProtocolConfig(tau_span=1.0).is_protocol()
    (result,) = protocol.run_splits(data, [data.splits[0]], config)
    assert len(result["grid"]) == 2 * 6
    with pytest.raises(ValueError, match=r"tau_span must be a finite float >= 1, got 0\.5"):
        protocol.ProtocolConfig(tau_span=0.5)
    with pytest.raises(TypeError, match="tau_span must be a float, got str"):
        protocol.ProtocolConfig(tau_span="2")  # type: ignore[arg-type]
