"""Structured and noise variants on convolutional feature maps: dropkit's against PyTorch's and a floor.

Usage::

    python benchmarks/bench_variants.py [--quick] [--threads 1] [--repeats N] [--json PATH]

Times one training-mode forward and backward (``torch.autograd.grad`` with a preallocated
upstream gradient) of each layer on a float32 CPU feature map ``(N, C, H, W)``:

* the floor, ``x * 2.0`` (one read and one write each way: what any element-wise layer pays);
* ``Dropout``, ``Dropout2d`` and ``AlphaDropout`` of dropkit and of ``torch.nn``;
* dropkit's ``DropBlock2d`` with blocks of 3 and 7 (and ``torchvision.ops.DropBlock2d`` beside
  them where torchvision imports);
* dropkit's ``GaussianDropout``.

Every layer has rate 0.1.  The layers take turns, repeat by repeat, in this one process, so a
change of background load hits them alike; a repeat is the median of ``calls`` back-to-back calls'
wall times, each layer warmed up first.  Figures are medians over repeats, in milliseconds, with
the ratio to the floor.  Prints a Markdown table and writes the figures, every repeat's sample
and the machine (as ``bench_dropout.py`` records it) to ``--json`` (default
``benchmarks/results/bench_variants.json``).  ``--quick`` (3 repeats, the small map only) is for
smoke checks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dropkit
from bench_dropout import format_table, print_load, start_run, write_results

RESULTS = Path(__file__).resolve().parent / "results"
P = 0.1
#: (N, C, H, W): the second conv block of a small CIFAR-style net, and an early ResNet stage.
SHAPES = ((64, 32, 28, 28), (16, 64, 56, 56))
COLUMNS = [("shape", "shape"), ("layer", "layer"), ("ms", "fwd+bwd ms"), ("vs_floor", "/ floor")]


class _Floor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def layers() -> dict[str, nn.Module]:
    """The candidates, built once (rate 0.1 each)."""
    candidates: dict[str, nn.Module] = {
        "floor x * 2.0": _Floor(),
        "dropkit Dropout": dropkit.nn.Dropout(P),
        "torch Dropout": nn.Dropout(P),
        "dropkit Dropout2d": dropkit.nn.Dropout2d(P),
        "torch Dropout2d": nn.Dropout2d(P),
        "dropkit DropBlock2d(3)": dropkit.nn.DropBlock2d(P, block_size=3),
        "dropkit DropBlock2d(7)": dropkit.nn.DropBlock2d(P, block_size=7),
        "dropkit GaussianDropout": dropkit.nn.GaussianDropout(P),
        "dropkit AlphaDropout": dropkit.nn.AlphaDropout(P),
        "torch AlphaDropout": nn.AlphaDropout(P),
    }
    try:  # torchvision must be built for this torch; skipped where it is not
        from torchvision.ops import DropBlock2d as VisionDropBlock2d

        candidates["torchvision DropBlock2d(3)"] = VisionDropBlock2d(P, 3)
        candidates["torchvision DropBlock2d(7)"] = VisionDropBlock2d(P, 7)
    except Exception as error:  # any import failure (a torchvision built for another torch) means "not here"
        print(f"# torchvision.ops.DropBlock2d not timed: {type(error).__name__}: {error}", file=sys.stderr)
    for module in candidates.values():
        module.train()
    return candidates


def _step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        (grad,) = torch.autograd.grad(module(x), x, upstream)
        del grad

    return run


def measure(shape: tuple[int, ...], repeats: int, calls: int) -> list[dict[str, Any]]:
    """Median ms per forward+backward of every candidate on ``shape``, round-robin."""
    x = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(shape)
    steps = {name: _step(module, x, upstream) for name, module in layers().items()}
    for run in steps.values():
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            times = []
            for _ in range(calls):
                start = time.perf_counter_ns()
                run()
                times.append((time.perf_counter_ns() - start) / 1e6)
            samples[name].append(statistics.median(times))
    floor = statistics.median(samples["floor x * 2.0"])
    rows = []
    for name, values in samples.items():
        ms = statistics.median(values)
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "layer": name,
                "ms": round(ms, 3),
                "vs_floor": round(ms / floor, 2),
                "samples_ms": [round(v, 4) for v in values],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, the small map only (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch (and kernel) threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 11, quick 3)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_variants.json")
    args = parser.parse_args(argv)

    repeats = args.repeats or (3 if args.quick else 11)
    calls = 3 if args.quick else 7
    shapes = SHAPES[:1] if args.quick else SHAPES
    run_load, info = start_run(args.threads)
    rows = []
    for shape in shapes:
        rows += measure(shape, repeats, calls)
        print(f"  measured {shape}", file=sys.stderr)
    print(f"\n## Forward + backward, median ms per call (p = {P}, float32, CPU, training mode)\n")
    print(format_table(rows, COLUMNS))
    conditions = run_load.finish()
    print_load(conditions)
    result = {
        "machine": info | conditions,
        "config": {"p": P, "threads": args.threads, "repeats": repeats, "calls": calls, "quick": args.quick},
        "variants": rows,
    }
    write_results(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
