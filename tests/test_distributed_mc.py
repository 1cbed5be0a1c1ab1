"""Distributed MC prediction: ``mc_predict(..., group=...)`` splits the T samples across ranks and
gives every rank the single-process result; the torchrun example scores a data set on 2 ranks.

One launch of 2 gloo processes (``_worker``) runs every case and returns the results; the
single-process references are computed here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dropkit
from dropkit.distributed.collectives import split_range
from dropkit.mc.streaming import MCSummary
from tests.distributed_harness import launch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mc_predict_distributed.py"
CASES: dict[str, dict[str, Any]] = {
    "samples, uneven shares": {"T": 7, "seed": 11, "chunk_size": 1},
    "samples, chunks of 2": {"T": 8, "seed": 12, "chunk_size": 2},
    "mean": {"T": 9, "seed": 13, "chunk_size": 1, "reduce": "mean"},
    "stats": {"T": 9, "seed": 14, "chunk_size": 2, "reduce": "stats", "transform": "softmax"},
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(),
        nn.Dropout(0.3),  # torch's dropout, run by dropkit's engine in MC mode
        nn.Linear(16, 16),
        nn.ReLU(),
        dropkit.nn.Dropout(0.2),
        nn.Linear(16, 4),
    )


def _inputs() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(3))


def _summary(summary: MCSummary) -> dict[str, Any]:
    return {
        "count": summary.count,
        "mean": summary.mean,
        "variance": summary.variance,
        "mean_entropy": summary.mean_entropy,
        "votes": summary.votes,
    }


def _run(case: dict[str, Any], group: dist.ProcessGroup | None) -> Any:
    result = dropkit.mc_predict(_model(), _inputs(), group=group, **case)
    return _summary(result) if isinstance(result, MCSummary) else result


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("mc_predict_distributed", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(rank: int, world: int) -> dict[str, Any]:
    group = dist.group.WORLD
    result: dict[str, Any] = {name: _run(case, group) for name, case in CASES.items()}
    dropkit.manual_seed(100 + rank)  # seed=None: each rank would draw its own seed
    result["drawn seed"] = dropkit.mc_predict(_model(), _inputs(), T=4, chunk_size=1, group=group)
    try:
        dropkit.mc_predict(_model(), _inputs(), T=1, group=group)
        result["T below world"] = None
    except ValueError as error:
        result["T below world"] = str(error)
    result["example"] = _load_example().main(["--samples", "16", "--check"])
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(_worker, 2, tmp_path_factory.mktemp("mc"))


@pytest.mark.slow
def test_split_samples_equal_the_single_process_samples(results: list[dict[str, Any]]) -> None:
    for name in ("samples, uneven shares", "samples, chunks of 2"):
        expected = _run(CASES[name], None)
        assert expected.shape == (CASES[name]["T"], 5, 4)
        for result in results:
            assert torch.equal(result[name], expected), name  # bit for bit


@pytest.mark.slow
def test_merged_statistics_equal_the_single_process_statistics(results: list[dict[str, Any]]) -> None:
    mean = _run(CASES["mean"], None)
    stats = _run(CASES["stats"], None)
    for result in results:
        torch.testing.assert_close(result["mean"], mean, rtol=1e-6, atol=1e-7)
        assert result["stats"]["count"] == 9
        assert torch.equal(result["stats"]["votes"], stats["votes"])
        for name in ("mean", "variance", "mean_entropy"):
            torch.testing.assert_close(result["stats"][name], stats[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(results[0]["stats"]["mean"], results[1]["stats"]["mean"])  # merged in one order


@pytest.mark.slow
def test_drawn_seed_is_rank_zeros_and_too_few_samples_are_refused(results: list[dict[str, Any]]) -> None:
    assert torch.equal(results[0]["drawn seed"], results[1]["drawn seed"])
    assert not torch.equal(results[0]["drawn seed"][0], results[0]["drawn seed"][1])  # samples differ
    for result in results:
        assert result["T below world"] == (
            "T must be at least the number of ranks of group (2) to split the samples across them, got 1"
        )


@pytest.mark.slow
def test_example_scores_a_data_set_on_two_ranks(results: list[dict[str, Any]]) -> None:
    first, second = (result["example"] for result in results)
    assert first["max_mean_difference"] == 0.0
    assert first["votes_equal"] is True
    assert first["metrics"] == second["metrics"]
    for name in ("mean", "votes", "expected_entropy"):
        assert torch.equal(first["scores"][name], second["scores"][name])
    assert first["scores"]["votes"].sum(dim=1).eq(16).all()  # T = 16 votes per test point
    assert first["metrics"]["accuracy"] > 0.5  # 5 classes: far above chance


# -- in-process tests ----------------------------------------------------------------------------


def test_summary_merge_equals_one_stream() -> None:
    probs = torch.softmax(torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    whole = MCSummary(probabilities=True).update(probs)
    merged = (
        MCSummary(probabilities=True).update(probs[:3]).merge(MCSummary(probabilities=True).update(probs[3:]))
    )
    assert merged.count == 10
    assert torch.equal(merged.votes, whole.votes)
    for name in ("mean", "variance", "mean_entropy"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-6, atol=1e-7)
    assert MCSummary().merge(MCSummary()).count == 0  # merging nothing into nothing
    with pytest.raises(TypeError, match="other must be an MCSummary, got RunningMoments"):
        MCSummary().merge(whole.moments)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="other must have probabilities=False"):
        MCSummary().merge(whole)


def test_group_must_be_a_process_group() -> None:
    with pytest.raises(TypeError, match=r"group must be a torch\.distributed\.ProcessGroup or None, got str"):
        dropkit.mc_predict(_model(), _inputs(), T=4, group="world")


def test_split_range_cuts_contiguous_near_equal_shares() -> None:
    for total in (2, 7, 64):
        for size in (1, 2, 3):
            shares = [split_range(total, index, size) for index in range(size)]
            assert [start for start, _ in shares] == [0] + [stop for _, stop in shares[:-1]]
            assert shares[-1][1] == total
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1
    with pytest.raises(ValueError, match=r"index must be in \[0, 2\), got 2"):
        split_range(4, 2, 2)


@pytest.mark.slow
def test_example_under_torchrun_equals_one_process() -> None:
    """The example as the docs run it: ``torchrun`` starts the two processes (its rendezvous and
    environment, not the tests' spawn harness); rank 0 rescores in one process and compares."""
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(root / "examples" / "mc_predict_distributed.py"), "--check", "--samples", "16",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=environment, cwd=root, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "2 processes" in completed.stdout
    assert "max |mean difference| = 0, votes equal: True" in completed.stdout
