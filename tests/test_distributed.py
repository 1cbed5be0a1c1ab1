"""Two gloo processes: data-parallel ranks draw different masks by default, equal ones when asked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dropkit

pytestmark = pytest.mark.slow

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        dropkit.manual_seed(2024)
        layer = dropkit.nn.Dropout(0.5)
        x = torch.ones(4096)
        folded = layer(x)
        dropkit.manual_seed(2024)
        with dropkit.share_masks_across_ranks():
            shared = layer(x)
        torch.save({"folded": folded, "shared": shared}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_fold_the_seed_by_default_and_share_on_request(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert not torch.equal(results[0]["folded"], results[1]["folded"])
    assert torch.equal(results[0]["shared"], results[1]["shared"])
    # Rank 0 draws what a single process draws.
    dropkit.manual_seed(2024)
    assert torch.equal(results[0]["folded"], dropkit.nn.Dropout(0.5)(torch.ones(4096)))
    for result in results:  # both are genuine masks, not all-kept or all-dropped
        kept = (result["folded"] != 0).float().mean().item()
        assert 0.4 < kept < 0.6


def _layerdrop_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, object] = {}
        for zero_grad_skipped in (True, False):
            dropkit.manual_seed(7)
            torch.manual_seed(0)  # same initial weights on both ranks
            stack = dropkit.nn.LayerDrop(
                [nn.Linear(8, 8) for _ in range(6)], 0.5, zero_grad_skipped=zero_grad_skipped
            )
            calls = [0]
            for layer in stack.layers:
                layer.register_forward_hook(lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
            model = DistributedDataParallel(stack)  # find_unused_parameters=False, the default
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
            try:
                for _ in range(4):
                    optimizer.zero_grad()
                    x = torch.randn(4, 8, generator=data)
                    model(x).square().mean().backward()
                    optimizer.step()
                results[str(zero_grad_skipped)] = {
                    "state": {k: v.clone() for k, v in stack.state_dict().items()},
                    "skipped": 4 * 6 - calls[0],
                }
            except RuntimeError as error:
                results[str(zero_grad_skipped)] = {"error": str(error)}
        torch.save(results, os.path.join(out_dir, f"layerdrop{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_layerdrop_under_ddp_without_find_unused_parameters(tmp_path: Path) -> None:
    mp.spawn(_layerdrop_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"layerdrop{rank}.pt") for rank in range(WORLD)]
    for result in results:
        assert "error" not in result["True"], result["True"]
        # Without the zero-gradient anchor DDP's reducer fails: the check is not vacuous.
        assert "error" in result["False"]
        assert "unused" in result["False"]["error"].lower()
    first, second = (result["True"] for result in results)
    assert first["skipped"] > 0
    for name, value in first["state"].items():
        assert torch.equal(value, second["state"][name]), f"{name} diverged between ranks"
