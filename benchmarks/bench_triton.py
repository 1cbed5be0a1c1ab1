"""GPU benchmark of dropkit's Triton dropout kernels against torch and a memory-bandwidth floor.

Times, for float32 and bfloat16 at 16M and 256M elements (by default):

* ``copy``: ``y.copy_(x)``: the bandwidth floor every elementwise op is measured against;
* ``multiply``: ``torch.mul(x, s, out=y)``: the same traffic through an arithmetic kernel;
* ``triton``: :func:`dropkit.kernels.triton_gpu.masked_affine` (inverted dropout), backward
  being the same kernel on the gradient: nothing per element is kept for backward;
* ``torch-eager``: ``F.dropout`` (keeps a one-byte-per-element mask for backward);
* ``torch-compiled``: ``torch.compile`` of ``F.dropout``;
* ``dropkit-op`` (``--with-op``): the ``dropkit::masked_affine`` custom op through autograd,
  i.e. whatever kernel the dispatcher picks for CUDA tensors.

Each is timed forward and forward+backward; a timing is the median of ``--repeats`` batches,
each bracketed by CUDA events (a batch is several calls at small sizes, so that the GPU queue
stays fed; the host time to issue a call is reported next to it, to spot launch-bound paths).
Throughput is reported as *useful* bandwidth, the bytes the op must move at least (read x,
write y; the same again for backward) over the time, and as a percentage of the copy floor's
bandwidth at the same size and dtype.  "Kept for backward" is the device
memory still allocated after the forward, beyond the output itself.

Before timing, a bit-exactness check compares the Triton kernels with the reference engine on
the GPU (skip with ``--skip-check``).  Prints a table and writes JSON (``--json``).

Usage: ``python benchmarks/bench_triton.py [--sizes 16M 256M] [--dtypes float32 bfloat16]
[--json OUT.json] [--methods ...] [--block-counters N --num-warps W]``.  The defaults take a few
minutes on an H100, most of it ``torch.compile``; ``--methods copy triton torch-eager`` skips it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
METHODS = ["copy", "multiply", "triton", "torch-eager", "torch-compiled", "dropkit-op"]


@dataclass
class Result:
    method: str
    mode: str  # "fwd" or "fwd+bwd"
    dtype: str
    numel: int
    median_ms: float
    min_ms: float
    host_ms: float  # median time to issue one call from Python
    useful_gbps: float
    pct_of_copy: float | None
    kept_for_backward_bytes: int | None


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper()
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def time_cuda(
    fn: Callable[[], Any], repeats: int, warmup: int, inner: int, before: Callable[[], None] | None = None
) -> tuple[list[float], list[float]]:
    """Per-call milliseconds of ``repeats`` batches of ``inner`` calls: GPU time between CUDA
    events, and host time to issue the calls.

    Batches keep the GPU queue fed when one call is short; a host time close to the GPU time
    means the path is launch-bound at that size.  ``before`` runs untimed before each call
    (e.g. to clear ``.grad``), so it should be cheap.
    """
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        issued = time.perf_counter()
        for _ in range(inner):
            if before is not None:
                before()
            fn()
        host.append((time.perf_counter() - issued) * 1e3 / inner)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / inner)
    return gpu, host


def kept_for_backward(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes still allocated after ``forward`` beyond its output: what autograd keeps."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes()
    del out
    return max(kept, 0)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (tells -0.0 from 0.0), dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def bit_check() -> list[str]:
    """Mismatches between the Triton kernels and the reference engine on this GPU (empty = exact)."""
    from dropkit.engine import reference
    from dropkit.engine.masks import keep_mask
    from dropkit.engine.numerics import compute_dtype, drop_threshold, inverted_scale
    from dropkit.kernels import triton_gpu as tg

    failures = []
    key = torch.tensor([-0x0123456789ABCDEF, 0xFFFFFFF0, (1 << 32) + 5], dtype=torch.int64, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    cases = [
        ((1037,), []),
        ((3, 5, 67), []),
        ((4, 6, 9, 9), [2, 3]),
        ((4, 6, 9, 9), [1]),
        ((2, 3, 2, 3, 2), [1, 3]),
    ]
    for dtype in DTYPES.values():
        for shape, dims in cases:
            x = torch.randn(shape, device="cuda", generator=generator).to(dtype)
            for p in (0.0, 1e-5, 0.5, 0.999, 1.0):
                for scale, shift, drop in (
                    (inverted_scale(p), 0.0, 0.0),
                    (0.809, 0.1234567891, -1.758),
                ):
                    args = (x, key, drop_threshold(p), dims, scale, shift, drop)
                    if not same_bits(tg.masked_affine(*args), reference.masked_affine(*args)):
                        failures.append(
                            f"masked_affine {dtype} {shape} bd={dims} p={p} ({scale}, {shift}, {drop})"
                        )
        x = torch.randn(37, 129, device="cuda", generator=generator).to(dtype)
        bias = torch.randn(129, device="cuda", generator=generator).to(dtype)
        residual = torch.randn(37, 129, device="cuda", generator=generator).to(dtype)
        compute = compute_dtype(dtype)
        for p in (0.0, 0.5, 0.999):
            threshold, scale = drop_threshold(p), inverted_scale(p)
            keep = keep_mask(key, p, x.shape)
            kept = (x.to(compute) + bias.to(compute)) * torch.tensor(scale, dtype=compute, device="cuda")
            expected = (residual.to(compute) + torch.where(keep, kept, 0.0)).to(dtype)
            args = (x, bias, residual, key, threshold, scale)
            if not same_bits(tg.bias_dropout_add(*args), expected):
                failures.append(f"bias_dropout_add {dtype} p={p}")
            if not same_bits(reference.bias_dropout_add(*args), expected):
                failures.append(f"bias_dropout_add {dtype} p={p} (reference engine)")
    return failures


def bench_one(
    dtype: torch.dtype, numel: int, p: float, repeats: int, warmup: int, methods: list[str]
) -> list[Result]:
    from dropkit import ops
    from dropkit.engine.numerics import drop_threshold, inverted_scale
    from dropkit.kernels import triton_gpu as tg

    threshold, scale = drop_threshold(p), inverted_scale(p)
    key = torch.tensor([1234, 0, 0], dtype=torch.int64, device="cuda")
    x = torch.randn(numel, device="cuda", dtype=torch.float32).to(dtype)
    dy = torch.randn(numel, device="cuda", dtype=torch.float32).to(dtype)
    y = torch.empty_like(x)
    dx = torch.empty_like(x)
    leaf = x.detach().clone().requires_grad_(True)
    compiled_dropout = torch.compile(lambda t: F.dropout(t, p, training=True), dynamic=False)

    def clear_grad() -> None:
        leaf.grad = None

    # Per method: (forward, forward+backward, forward-with-autograd for the memory probe or None).
    forward_backward: dict[
        str, tuple[Callable[[], Any], Callable[[], Any], Callable[[], torch.Tensor] | None]
    ] = {
        "copy": (lambda: y.copy_(x), lambda: (y.copy_(x), dx.copy_(dy)), None),
        "multiply": (
            lambda: torch.mul(x, scale, out=y),
            lambda: (torch.mul(x, scale, out=y), torch.mul(dy, scale, out=dx)),
            None,
        ),
        "triton": (
            lambda: tg.masked_affine(x, key, threshold, [], scale, 0.0, 0.0),
            lambda: (
                tg.masked_affine(x, key, threshold, [], scale, 0.0, 0.0),
                tg.masked_affine(dy, key, threshold, [], scale, 0.0, 0.0),
            ),
            None,
        ),
        "torch-eager": (
            lambda: F.dropout(x, p, training=True),
            lambda: F.dropout(leaf, p, training=True).backward(dy),
            lambda: F.dropout(leaf, p, training=True),
        ),
        "torch-compiled": (
            lambda: compiled_dropout(x),
            lambda: compiled_dropout(leaf).backward(dy),
            lambda: compiled_dropout(leaf),
        ),
        "dropkit-op": (
            lambda: ops.masked_affine(x, key, p, [], "inverted", "p"),
            lambda: ops.masked_affine(leaf, key, p, [], "inverted", "p").backward(dy),
            lambda: ops.masked_affine(leaf, key, p, [], "inverted", "p"),
        ),
    }
    results = []
    copy_gbps: dict[str, float] = {}
    element = x.element_size()
    # About 64M elements of work per timed batch (4 calls at 16M, 1 at 256M), at most 16 calls.
    inner = min(16, max(1, 2**26 // numel))
    for method in methods:
        fwd, fwd_bwd, probe = forward_backward[method]
        if method == "triton":
            kept: int | None = key.numel() * key.element_size()  # the key, by construction
        else:
            kept = kept_for_backward(probe) if probe is not None else None
        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            times, host = time_cuda(fn, repeats, warmup, inner, before=clear_grad)
            median = statistics.median(times)
            useful = (2 if mode == "fwd" else 4) * numel * element
            gbps = useful / (median * 1e-3) / 1e9
            if method == "copy":
                copy_gbps[mode] = gbps
            pct = 100.0 * gbps / copy_gbps[mode] if mode in copy_gbps else None
            results.append(
                Result(
                    method=method,
                    mode=mode,
                    dtype=str(dtype).removeprefix("torch."),
                    numel=numel,
                    median_ms=round(median, 4),
                    min_ms=round(min(times), 4),
                    host_ms=round(statistics.median(host), 4),
                    useful_gbps=round(gbps, 1),
                    pct_of_copy=None if pct is None else round(pct, 1),
                    kept_for_backward_bytes=kept if mode == "fwd+bwd" else None,
                )
            )
    return results


def launch_overhead(numel: int = 4096, calls: int = 2000) -> list[tuple[str, float]]:
    """Host microseconds per call on a tiny tensor (the GPU work is negligible), per layer of the
    call path: raw Triton launch, the kernel wrapper, dropkit's functional, torch's F.dropout."""
    import dropkit
    from dropkit.engine.numerics import drop_threshold
    from dropkit.kernels import triton_gpu as tg

    threshold = drop_threshold(0.1)
    x = torch.randn(numel, device="cuda")
    key = torch.tensor([1, 2, 3], dtype=torch.int64, device="cuda")
    out = torch.empty_like(x)

    def raw_launch() -> None:
        tg.launch_unchecked(x, out, key, threshold, 1 / 0.9)

    paths: list[tuple[str, Callable[[], Any]]] = [
        ("triton launch (JITFunction[grid](...))", raw_launch),
        (
            "kernels.triton_gpu.masked_affine",
            lambda: tg.masked_affine(x, key, threshold, [], 1 / 0.9, 0.0, 0.0),
        ),
        ("dropkit.functional.dropout(seed=key)", lambda: dropkit.functional.dropout(x, 0.1, seed=key)),
        ("dropkit.nn.Dropout (module, no grad)", dropkit.nn.Dropout(0.1).cuda().__call__),
        ("torch.nn.functional.dropout", lambda: F.dropout(x, 0.1, training=True)),
        ("torch.mul (one ATen kernel)", lambda: torch.mul(x, 2.0)),
    ]
    rows = []
    with torch.no_grad():
        for name, fn in paths:
            call = (lambda fn=fn: fn(x)) if name.startswith("dropkit.nn") else fn
            for _ in range(50):
                call()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(calls // 5):
                    call()
                times.append((time.perf_counter() - start) * 1e6 / (calls // 5))
                torch.cuda.synchronize()
            rows.append((name, statistics.median(times)))
    return rows


def format_table(results: list[Result]) -> str:
    header = (
        f"{'dtype':<9} {'numel':>11} {'method':<15} {'mode':<8} {'median ms':>10} {'host ms':>8} {'GB/s':>8} "
    )
    header += f"{'% copy':>7} {'kept for bwd':>14}"
    lines = [header, "-" * len(header)]
    for r in results:
        pct = "" if r.pct_of_copy is None else f"{r.pct_of_copy:.1f}"
        kept = "" if r.kept_for_backward_bytes is None else f"{r.kept_for_backward_bytes:,}"
        lines.append(
            f"{r.dtype:<9} {r.numel:>11,} {r.method:<15} {r.mode:<8} {r.median_ms:>10.4f} {r.host_ms:>8.4f} "
            f"{r.useful_gbps:>8.1f} {pct:>7} {kept:>14}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["16M", "256M"], help="element counts (K/M/G suffixes)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--p", type=float, default=0.1, help="drop probability")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--methods", nargs="+", default=[m for m in METHODS if m != "dropkit-op"], choices=METHODS
    )
    parser.add_argument("--with-op", action="store_true", help="also time the dropkit custom op via autograd")
    parser.add_argument("--skip-check", action="store_true", help="skip the bit-exactness check")
    parser.add_argument(
        "--launch-overhead", action="store_true", help="also time the host cost per call of each call path"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "bench_triton.json",
        help="where to write results (default: benchmarks/results/bench_triton.json)",
    )
    parser.add_argument("--block-counters", type=int, help="Triton launch: counters (8 elements) per program")
    parser.add_argument("--num-warps", type=int, help="Triton launch: warps per program")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device is available; this benchmark needs a GPU.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_triton: the 'triton' package is not installed.", file=sys.stderr)
        return 2
    if not 0.0 <= args.p < 1.0:
        parser.error("--p must be in [0, 1)")
    methods = list(args.methods)
    if args.with_op and "dropkit-op" not in methods:
        methods.append("dropkit-op")
    # The copy floor first: every other row is a percentage of it.
    methods.sort(key=lambda m: m != "copy")
    if "copy" not in methods:
        methods.insert(0, "copy")

    from dropkit.kernels import triton_gpu as tg

    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; p={args.p}")
    bit_exact: bool | None = None
    results: list[Result] = []
    with tg.launch_overrides(block_counters=args.block_counters, num_warps=args.num_warps):
        if not args.skip_check:
            failures = bit_check()
            bit_exact = not failures
            if failures:
                print("bit check FAILED (Triton kernels differ from the reference engine):")
                print("\n".join(f"  {failure}" for failure in failures))
                return 1
            print("bit check: Triton kernels match the reference engine bit for bit")
        for dtype_name in args.dtypes:
            for size in args.sizes:
                numel = parse_size(size)
                results += bench_one(DTYPES[dtype_name], numel, args.p, args.repeats, args.warmup, methods)
                torch.cuda.empty_cache()
    print(format_table(results))
    overhead = launch_overhead() if args.launch_overhead else []
    if overhead:
        print("\nhost time per call, 4096 float32 elements (launch overhead):")
        for name, micros in overhead:
            print(f"  {name:<42} {micros:8.1f} us")
    payload = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "p": args.p,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bit_exact": bit_exact,
        "triton_launch": {"block_counters": args.block_counters, "num_warps": args.num_warps},
        "results": [asdict(r) for r in results],
        "launch_overhead_us": dict(overhead),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.json}")
    return 0 if all(math.isfinite(r.median_ms) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
