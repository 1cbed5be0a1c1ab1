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
