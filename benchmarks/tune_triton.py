"""Sweep the launch shape of the Triton dropout kernel on a GPU and rank the configurations.

For every combination of ``--block-counters``, ``--num-warps``, load hoisting and tile width
(see :func:`dropkit.kernels.triton_gpu.launch_overrides`), the forward kernel is first checked
bit for bit against the reference engine on the GPU (a ragged size, so the masked tail runs too),
then timed at each size and dtype against ``y.copy_(x)`` on the same tensors.  Prints a table
sorted by the worst percentage of copy bandwidth across sizes and dtypes and writes JSON.

Usage: ``python benchmarks/tune_triton.py [--sizes 16M 256M] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_triton import DTYPES, bench_one, format_table, parse_size, same_bits, time_cuda


def copy_of(x: torch.Tensor) -> Callable[[], object]:
    y = torch.empty_like(x)
    return lambda: y.copy_(x)


def dropout_of(x: torch.Tensor, key: torch.Tensor, threshold: int, scale: float) -> Callable[[], object]:
    from dropkit.kernels import triton_gpu as tg

    return lambda: tg.masked_affine(x, key, threshold, [], scale, 0.0, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["16M", "256M"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--block-counters", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--num-warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "tune_triton.json"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_triton: no CUDA device is available.", file=sys.stderr)
        return 2

    from dropkit.engine import reference
    from dropkit.engine.numerics import drop_threshold, inverted_scale
    from dropkit.kernels import triton_gpu as tg

    p = args.p
    threshold, scale = drop_threshold(p), inverted_scale(p)
    key = torch.tensor([1234, 5, 6], dtype=torch.int64, device="cuda")
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        default_width = tg.vector_width(dtype)
        widths = sorted({default_width, 8})
        ragged = torch.randn(3 * 2**20 + 37, device="cuda").to(dtype)
        for size in args.sizes:
            numel = parse_size(size)
            x = torch.randn(numel, device="cuda").to(dtype)
            inner = min(16, max(1, 2**26 // numel))
            copy_ms = statistics.median(time_cuda(copy_of(x), args.repeats, 3, inner)[0])
            for block_c, warps, hoist, width in itertools.product(
                args.block_counters, args.num_warps, (True, False), widths
            ):
                with tg.launch_overrides(
                    block_counters=block_c, num_warps=warps, hoist_loads=hoist, tile_width=width
                ):
                    exact = same_bits(
                        tg.masked_affine(ragged, key, threshold, [], scale, 0.0, 0.0),
                        reference.masked_affine(ragged, key, threshold, [], scale, 0.0, 0.0),
                    )
                    times, _ = time_cuda(dropout_of(x, key, threshold, scale), args.repeats, 3, inner)
                median = statistics.median(times)
                row = {
                    "dtype": dtype_name,
                    "numel": numel,
                    "block_counters": block_c,
                    "num_warps": warps,
                    "hoist_loads": hoist,
                    "tile_width": width,
                    "default_width": width == default_width,
                    "bit_exact": exact,
                    "median_ms": round(median, 4),
                    "copy_ms": round(copy_ms, 4),
                    "pct_of_copy": round(100 * copy_ms / median, 1),
                }
                rows.append(row)
                launch = f"bc={block_c:<5} warps={warps} hoist={hoist!s:<5} width={width}"
                print(
                    f"{dtype_name:<9} {numel:>11,} {launch} exact={exact} {median:.4f} ms "
                    f"{row['pct_of_copy']:.1f} % of copy",
                    flush=True,
                )
            del x
            torch.cuda.empty_cache()
    # Rank a launch shape by its worst case over dtypes and sizes (a full-row tile, width 8,
    # and one 16-byte access per row, "16B", are the same shape for 2-byte dtypes).
    shapes: dict[tuple, list[float]] = {}
    for r in rows:
        labels = {"16B" if r["default_width"] else "w8", "w8" if r["tile_width"] == 8 else "16B"}
        for label in labels:
            shape = (r["block_counters"], r["num_warps"], r["hoist_loads"], label)
            shapes.setdefault(shape, []).append(r["pct_of_copy"])
    ranking = sorted(shapes.items(), key=lambda item: -min(item[1]))
    print("\nlaunch shape (block_counters, num_warps, hoist, width)   worst % of copy   all")
    for shape, pcts in ranking:
        print(f"{shape!s:<55} {min(pcts):>8.1f}   {pcts}")
    # The winner through bench_triton's comparison (forward and forward+backward).
    (block_c, warps, hoist, label), _ = ranking[0]
    print(f"\nbest launch shape: block_counters={block_c} num_warps={warps} hoist={hoist} width={label}")
    results = []
    for dtype_name in args.dtypes:
        with tg.launch_overrides(
            block_counters=block_c,
            num_warps=warps,
            hoist_loads=hoist,
            tile_width=8 if label == "w8" else None,
        ):
            for size in args.sizes:
                methods = ["copy", "multiply", "triton", "torch-eager"]
                results += bench_one(DTYPES[dtype_name], parse_size(size), p, 30, 5, methods)
                torch.cuda.empty_cache()
    print(format_table(results))
    payload = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "sweep": rows,
        "best": {"block_counters": block_c, "num_warps": warps, "hoist_loads": hoist, "width": label},
        "best_results": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1))
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
