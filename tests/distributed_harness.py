"""Launcher of the multi-process tests: ``launch(worker, world, tmp_path)`` runs
``worker(rank, world)`` in ``world`` processes (``torch.multiprocessing.spawn``, one CPU thread
each) joined by a gloo process group initialised from a file (no network port), and returns the
value each rank's worker returned (a picklable object, typically a dict of tensors).

The worker must be a module-level function, so that the spawned processes can import it; the
assertions belong in the parent process, on the returned values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[[int, int], Any]


def _entry(rank: int, worker: Worker, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = worker(rank, world)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(worker: Worker, world: int, tmp_path: Path) -> list[Any]:
    """Run ``worker`` on ``world`` gloo ranks; the values it returned, by rank."""
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    mp.spawn(_entry, args=(worker, world, str(tmp_path / "init"), str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
