"""The UCI benchmark's two implementations: fused numba kernels against the torch path.

Times one Adam step of ``G`` networks on a mini-batch (``train_models`` over a few epochs,
divided by the steps) and one MC prediction block (``predict_blocks``) of each implementation
of :mod:`dropkit.experiments.uci.model` at a data set's size (default: Wine, the largest of the
five: 11 inputs, 50 hidden units, 1151 training rows, 288 validation points, 240 grid networks).
Both implementations draw the same masks; their outputs are checked to agree to float32
rounding before timing.  Times are medians of ``--repeats`` runs after a warm-up (which also
loads or compiles the numba kernels), all in this process, so the ratios compare like with like.

Usage: ``python benchmarks/bench_uci.py [--threads 1] [--repeats 5]``; prints a table and writes
``benchmarks/results/bench_uci.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dropkit.experiments.uci.model import BatchedMLP, ModelSpec, fused_available, predict_blocks, train_models

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (0.005, 0.01, 0.05, 0.1)


def grid_specs(splits: int, taus: int) -> list[ModelSpec]:
    """The protocol's layout: rates major, then splits, then τ values (one mask stream per rate)."""
    return [
        ModelSpec(
            data_index=split,
            p=p,
            weight_decay=1e-4 * (1 + ti),
            init_seed=1000 * pi + 10 * split + ti,
            shuffle_seed=split,
            mask_stream=pi,
            slot=split * taus + ti,
        )
        for pi, p in enumerate(RATES)
        for split in range(splits)
        for ti in range(taus)
    ]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: numba's cache, allocator, first-touch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch (and kernel) threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--taus", type=int, default=3)
    parser.add_argument("--inputs", type=int, default=11)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--train-rows", type=int, default=1151)
    parser.add_argument("--eval-points", type=int, default=288)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed training run")
    parser.add_argument("--block", type=int, default=10, help="MC passes per prediction block")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_uci.json")
    args = parser.parse_args()
    if not fused_available():
        raise SystemExit("the fused kernels need numba: pip install 'dropkit[fast]'")
    torch.set_num_threads(args.threads)

    specs = grid_specs(args.splits, args.taus)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.splits, args.train_rows, args.inputs, generator=g)
    y = torch.randn(args.splits, args.train_rows, generator=g)
    x_eval = torch.randn(args.splits, args.eval_points, args.inputs, generator=g)
    steps = args.epochs * math.ceil(args.train_rows / 128)

    def train(fused: bool) -> BatchedMLP:
        return train_models(specs, x, y, n_hidden=args.hidden, epochs=args.epochs, seed=0, fused=fused)

    def predict(fused: bool, model: BatchedMLP) -> list[torch.Tensor]:
        blocks: list[torch.Tensor] = []
        predict_blocks(
            model,
            specs,
            x_eval,
            samples=args.block,
            seed=0,
            block=args.block,
            consume=blocks.append,
            fused=fused,
        )
        return blocks

    # Agreement first: the same masks, float32 sums in another order.
    models = {fused: train(fused) for fused in (True, False)}
    for a, b in zip(models[True].parameters(), models[False].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    same_model = models[False]
    torch.testing.assert_close(
        predict(True, same_model)[0], predict(False, same_model)[0], rtol=1e-4, atol=1e-4
    )

    rows = []
    for name, timed in (
        ("training step", lambda fused: median_seconds(lambda: train(fused), args.repeats) / steps),
        ("prediction block", lambda fused: median_seconds(lambda: predict(fused, same_model), args.repeats)),
    ):
        fused_s, torch_s = timed(True), timed(False)
        rows.append(
            {"what": name, "fused_ms": fused_s * 1e3, "torch_ms": torch_s * 1e3, "speedup": torch_s / fused_s}
        )

    print(
        f"{len(specs)} networks, {args.inputs} inputs, {args.hidden} hidden, batch 128, "
        f"{args.eval_points} points x {args.block} passes per block, {args.threads} thread(s)"
    )
    print(f"{'':18} {'fused (ms)':>11} {'torch (ms)':>11} {'speed-up':>9}")
    for row in rows:
        print(f"{row['what']:18} {row['fused_ms']:11.2f} {row['torch_ms']:11.2f} {row['speedup']:8.2f}x")
    payload = {
        "settings": vars(args) | {"json": str(args.json)},
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
