"""CPU dropout benchmark: dropkit's fused kernel vs PyTorch eager, torch.compile and the
memory-bandwidth floor, plus bytes kept for backward and one MLP training epoch.

Usage::

    python benchmarks/bench_dropout.py [--quick] [--output benchmarks/results/latest.json]

Every figure is the median of repeated calls, all measured in this one run.  The floor is the
cheapest op that moves the same bytes and allocates its output as dropout does: ``x * s``
forward, and autograd of it (``dy * s``) for forward+backward; ``torch.mul(x, s, out=y)`` is
reported too (no allocation).  Threads are set with ``torch.set_num_threads`` and
``numba.set_num_threads`` (dropkit's kernels follow PyTorch's setting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.kernels import backend_for

P = 0.5
MLP_BATCH = 128
MLP_SAMPLES = 60_000
MLP_BLOCK = 20
DROPOUT_COLUMNS = [
    ("dtype", "dtype"), ("numel", "numel"), ("threads", "thr"), ("pass", "pass"),
    ("dropkit_ms", "dropkit"), ("eager_ms", "eager"), ("compiled_ms", "compiled"),
    ("floor_ms", "floor x*s"), ("mul_out_ms", "mul(out=)"), ("floor_ratio", "dropkit/floor"),
    ("eager_speedup", "vs eager"), ("compiled_speedup", "vs compiled"),
]  # fmt: skip
FUSED_COLUMNS = [
    ("dtype", "dtype"), ("numel", "numel"), ("dropkit_fused_ms", "dropkit fused"),
    ("torch_unfused_ms", "torch unfused"), ("floor_add_ms", "floor r+x"),
    ("speedup", "speedup"), ("floor_ratio", "fused/floor"),
]  # fmt: skip
TARGETS = {
    "floor_ratio_max": 1.5,
    "eager_speedup_min": 10.0,
    "compiled_speedup_min": 4.0,
    "mlp_overhead_max": 0.10,
}


def interleaved_medians_ms(
    candidates: dict[str, tuple[Callable[[], object], int]], warmup: int = 2
) -> dict[str, float]:
    """Median ms per call of each candidate, timed round-robin, so that a change of background
    load during the measurement hits every candidate alike.  In each round a candidate gets an
    untimed call first, so that its timed call finds the caches and the allocator in the steady
    state of back-to-back calls rather than in the state the previous candidate left."""
    for fn, _ in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(max(repeats for _, repeats in candidates.values())):
        for name, (fn, repeats) in candidates.items():
            if round_index < repeats:
                fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def set_threads(count: int) -> None:
    torch.set_num_threads(count)
    try:
        import numba

        numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine, the versions and the date of a run; with a CUDA ``device``, its GPU too."""
    device = torch.device(device)
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        import numba

        numba_version: str | None = numba.__version__
    except ImportError:
        numba_version = None
    info: dict[str, Any] = {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba_version,
        "dropkit": dropkit.__version__,
        "dropkit_cpu_backend": backend_for("cpu"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    info["dropkit_backend"] = backend_for(device)  # the backend of the device measured
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


class RunLoad:
    """How loaded the machine was during a run: made before measuring, :meth:`finish` after."""

    def __init__(self) -> None:
        self.load_before = load_average()
        self.busy_before = busy_cpu_seconds()
        self.wall_before = time.perf_counter()

    def finish(self) -> dict[str, Any]:
        """The machine-record fields of the run (load averages, other processes' CPU share, time)."""
        busy_after, wall = busy_cpu_seconds(), time.perf_counter() - self.wall_before
        other_share = None
        if self.busy_before is not None and busy_after is not None:
            others = (busy_after[0] - self.busy_before[0]) - (busy_after[1] - self.busy_before[1])
            other_share = round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)
        return {
            "load_average_before": self.load_before,
            "load_average_after": load_average(),
            "other_processes_cpu_share": other_share,
            "run_seconds": round(wall, 1),
        }

    def print_start(self, info: dict[str, Any]) -> None:
        backend = info["dropkit_cpu_backend"]
        print(f"# dropkit CPU backend: {backend}; load average before: {self.load_before}")


def start_run(threads: int) -> tuple[RunLoad, dict[str, Any]]:
    """Set ``threads``, seed torch and dropkit with 0, print the run's header and start its load
    record: the opening of every benchmark that times dropkit against torch in one process."""
    set_threads(threads)
    torch.manual_seed(0)
    dropkit.manual_seed(0)
    run_load = RunLoad()
    info = machine_info() | {"dropkit_file": dropkit.__file__, "threads": torch.get_num_threads()}
    print(
        f"# dropkit {info['dropkit']} from {info['dropkit_file']}; torch {info['torch']}; "
        f"{info['threads']} thread(s); {info['cpu_model']}, {info['logical_cpus']} CPUs"
    )
    run_load.print_start(info)
    return run_load, info


def write_results(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as indented JSON to ``path`` (parents created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# wrote {path}")


def print_load(conditions: dict[str, Any]) -> None:
    print(
        f"\n# load average after: {conditions['load_average_after']} (includes this benchmark's own threads)"
    )
    share = conditions["other_processes_cpu_share"]
    if share is not None:
        print(f"# CPU share taken by other processes during the run: {share * 100:.1f}%")


def busy_cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have been busy, CPU seconds used by this one), from /proc/stat.

    Their difference over the run is the work other processes did meanwhile: the honest measure
    of whether the machine was loaded (the load average counts this benchmark's own threads)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def torch_dropout(x: torch.Tensor) -> torch.Tensor:
    return F.dropout(x, P, True)


def micro(
    dtype: torch.dtype, numel: int, threads: int, repeats: int, compiled: Callable | None
) -> list[dict]:
    """Forward and forward+backward rows for one (dtype, size, threads) configuration."""
    set_threads(threads)
    x = torch.randn(numel).to(dtype)
    dy = torch.randn(numel).to(dtype)
    y_out = torch.empty_like(x)
    dx_out = torch.empty_like(x)
    x_grad = x.clone().requires_grad_(True)
    key = dropkit.make_key(1234)
    scale = 1.0 / (1.0 - P)
    slow_repeats = max(3, repeats // 3)  # eager / compiled take up to half a second a call at 16M

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(x_grad), x_grad, dy)

    def dropkit_fn(t: torch.Tensor) -> torch.Tensor:
        return dropkit.functional.dropout(t, P, seed=key)

    def floor_fn(t: torch.Tensor) -> torch.Tensor:
        return t * scale

    def mul_out_fwd_bwd() -> None:
        torch.mul(x, scale, out=y_out)
        torch.mul(dy, scale, out=dx_out)

    rows = []
    for mode in ("forward", "forward+backward"):
        candidates: dict[str, tuple[Callable[[], object], int]]
        if mode == "forward":
            candidates = {
                "dropkit": (lambda: dropkit_fn(x), repeats),
                "eager": (lambda: torch_dropout(x), slow_repeats),
                "floor": (lambda: floor_fn(x), repeats),
                "mul_out": (lambda: torch.mul(x, scale, out=y_out), repeats),
            }
            if compiled is not None:
                candidates["compiled"] = (lambda: compiled(x), slow_repeats)
        else:
            candidates = {
                "dropkit": (fwd_bwd(dropkit_fn), repeats),
                "eager": (fwd_bwd(torch_dropout), slow_repeats),
                "floor": (fwd_bwd(floor_fn), repeats),
                "mul_out": (mul_out_fwd_bwd, repeats),
            }
            if compiled is not None:
                candidates["compiled"] = (fwd_bwd(compiled), slow_repeats)
        figures = {"compiled": math.nan} | interleaved_medians_ms(candidates)
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "numel": numel,
                "threads": threads,
                "pass": mode,
                **{f"{name}_ms": round(value, 4) for name, value in figures.items()},
                "floor_ratio": round(figures["dropkit"] / figures["floor"], 3),
                "eager_speedup": round(figures["eager"] / figures["dropkit"], 2),
                "compiled_speedup": round(figures["compiled"] / figures["dropkit"], 2),
            }
        )
    return rows


def saved_bytes_per_element(numel: int, compiled: Callable | None) -> dict[str, float]:
    """Bytes autograd keeps between forward and backward, per input element."""
    x = torch.randn(numel, requires_grad=True)
    bias = torch.randn(1024, requires_grad=True)
    residual = torch.randn(numel, requires_grad=True)

    def measure(fn: Callable[[], object]) -> float:
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(saved) / numel

    result = {
        "dropkit_dropout": measure(lambda: dropkit.functional.dropout(x, P, seed=1)),
        "torch_eager_dropout": measure(lambda: F.dropout(x, P, True)),
        "dropkit_bias_dropout_add": measure(
            lambda: dropkit.functional.residual_dropout(
                x.view(-1, 1024), residual.view(-1, 1024), P, bias=bias, seed=1
            )
        ),
        "torch_eager_bias_dropout_add": measure(
            lambda: residual.view(-1, 1024) + F.dropout(x.view(-1, 1024) + bias, P, True)
        ),
    }
    if compiled is not None:
        result["torch_compiled_dropout"] = measure(lambda: compiled(x))
    return result


def fused_row(dtype: torch.dtype, numel: int, threads: int, repeats: int) -> dict:
    """bias + dropout + residual: dropkit's fused op vs the three eager PyTorch ops."""
    set_threads(threads)
    x = torch.randn(numel // 1024, 1024).to(dtype)
    bias = torch.randn(1024).to(dtype)
    residual = torch.randn(numel // 1024, 1024).to(dtype)
    figures = interleaved_medians_ms(
        {
            "fused": (
                lambda: dropkit.functional.residual_dropout(x, residual, P, bias=bias, seed=7),
                repeats,
            ),
            "unfused": (lambda: residual + F.dropout(x + bias, P, True), max(3, repeats // 3)),
            "floor": (lambda: residual + x, repeats),
        }
    )
    fused, unfused, floor = figures["fused"], figures["unfused"], figures["floor"]
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "numel": numel,
        "threads": threads,
        "dropkit_fused_ms": round(fused, 4),
        "torch_unfused_ms": round(unfused, 4),
        "floor_add_ms": round(floor, 4),
        "speedup": round(unfused / fused, 2),
        "floor_ratio": round(fused / floor, 3),
    }


def mlp_epoch(samples: int, repeats: int, threads: int) -> dict[str, Any]:
    """One epoch of a 784-1024-1024-10 ReLU MLP (input dropout 0.2, hidden 0.5), SGD+momentum."""
    set_threads(threads)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, 784, generator=generator)
    labels = torch.randint(0, 10, (samples,), generator=generator)

    def build(dropout: Callable[[float], nn.Module]) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            dropout(0.2), nn.Linear(784, 1024), nn.ReLU(),
            dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(),
            dropout(0.5), nn.Linear(1024, 10),
        )  # fmt: skip

    variants: dict[str, Callable[[float], nn.Module]] = {
        "no_dropout": lambda p: nn.Identity(),
        "torch_dropout": nn.Dropout,
        "dropkit_dropout": dropkit.nn.Dropout,
    }
    models = {name: build(factory) for name, factory in variants.items()}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in models.items()}

    batches = range(0, samples, MLP_BATCH)

    def run(name: str, firsts: Sequence[int]) -> float:
        model, optimizer = models[name], optimizers[name]
        model.train()
        start = time.perf_counter()
        for first in firsts:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(
                model(inputs[first : first + MLP_BATCH]), labels[first : first + MLP_BATCH]
            )
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    for name in models:
        run(name, batches[:10])  # warm-up: allocator, kernels loaded from the numba cache
    # The variants take turns every MLP_BLOCK steps, so that a drift of background load (or of
    # the host under this VM) hits them alike; an epoch's time is the sum of its blocks.
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        epoch = dict.fromkeys(models, 0.0)
        for block in range(0, len(batches), MLP_BLOCK):
            for name in models:
                epoch[name] += run(name, batches[block : block + MLP_BLOCK])
        for name, seconds in epoch.items():
            times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["no_dropout"]
    return {
        "samples": samples,
        "batch": MLP_BATCH,
        "threads": threads,
        "repeats": repeats,
        "epoch_s": {name: round(value, 3) for name, value in medians.items()},
        "overhead_vs_no_dropout": {
            name: round(value / base - 1.0, 4) for name, value in medians.items() if name != "no_dropout"
        },
    }


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` as (key, title), right-aligned; a missing
    value is an empty cell, a float below 10 has three decimals, a larger one is printed as is."""
    header = [title for _, title in columns]
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if value is None:
                cells.append("")
            elif isinstance(value, float) and abs(value) < 10:
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [
        "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |" for cells in body
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1M elements only, fewer repeats, 1/10 MLP epoch"
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/latest.json"))
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 15, quick 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)

    repeats = args.repeats or (5 if args.quick else 15)
    sizes = [1 << 20] if args.quick else [1 << 20, 1 << 24]
    max_threads = min(2, os.cpu_count() or 1)
    thread_counts = sorted({1, max_threads})
    run_load = RunLoad()
    info = machine_info()
    print(f"# {info['cpu_model']}, {info['logical_cpus']} CPUs, torch {info['torch']}, numba {info['numba']}")
    run_load.print_start(info)

    compiled = None if args.no_compile else torch.compile(torch_dropout, dynamic=True)
    micro_rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for numel in sizes:
            for threads in thread_counts:
                micro_rows += micro(dtype, numel, threads, repeats, compiled)
                print(f"  measured {dtype} numel={numel} threads={threads}", file=sys.stderr)
    print("\n## Dropout, median ms per call (p = 0.5)\n")
    print(format_table(micro_rows, DROPOUT_COLUMNS))

    fused = [fused_row(dtype, sizes[-1], max_threads, repeats) for dtype in (torch.float32, torch.bfloat16)]
    print(f"\n## bias + dropout + residual ({max_threads} threads), median ms\n")
    print(format_table(fused, FUSED_COLUMNS))

    saved = saved_bytes_per_element(1 << 20, compiled)
    print("\n## Bytes kept for backward, per element (float32)\n")
    for name, value in saved.items():
        print(f"  {name:32s} {value:g}")

    samples = MLP_SAMPLES // 10 if args.quick else MLP_SAMPLES
    mlp = mlp_epoch(samples, 1 if args.quick else 3, max_threads)
    print(f"\n## MLP 784-1024-1024-10, one epoch of {samples} samples, batch {MLP_BATCH}", end="")
    print(f", {max_threads} threads\n")
    for name, seconds in mlp["epoch_s"].items():
        overhead = mlp["overhead_vs_no_dropout"].get(name)
        extra = f"  ({overhead * 100:+.1f}% vs no dropout)" if overhead is not None else ""
        print(f"  {name:16s} {seconds:.3f} s{extra}")

    checks = {
        "forward_and_backward_within_1.5x_floor": all(
            r["floor_ratio"] <= TARGETS["floor_ratio_max"] for r in micro_rows
        ),
        "10x_faster_than_eager": all(r["eager_speedup"] >= TARGETS["eager_speedup_min"] for r in micro_rows),
        "4x_faster_than_compiled": None
        if compiled is None
        else all(r["compiled_speedup"] >= TARGETS["compiled_speedup_min"] for r in micro_rows),
        "zero_bytes_per_element": saved["dropkit_dropout"] * (1 << 20) <= 64
        and saved["dropkit_bias_dropout_add"] * (1 << 20) <= 64,
        "mlp_overhead_at_most_10pct": mlp["overhead_vs_no_dropout"]["dropkit_dropout"]
        <= TARGETS["mlp_overhead_max"],
    }
    conditions = run_load.finish()
    print("\n## Targets (all rows)\n")
    for name, ok in checks.items():
        print(f"  {name:42s} {'n/a' if ok is None else ('met' if ok else 'MISSED')}")
    print_load(conditions)

    result = {
        "machine": info | conditions,
        "config": {"p": P, "repeats": repeats, "quick": args.quick, "sizes": sizes, "threads": thread_counts},
        "dropout": micro_rows,
        "bias_dropout_add": fused,
        "saved_bytes_per_element": saved,
        "mlp_epoch": mlp,
        "targets": TARGETS,
        "checks": checks,
    }
    write_results(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
