"""Per-call host overhead: dropkit's dropout module and function against PyTorch's, on small CPU inputs.

Usage::

    python benchmarks/bench_overhead.py [--quick] [--threads 1] [--json PATH]

Times, in training mode with grad mode on, four calls at p = 0.1 on float32 CPU tensors:
``dropkit.nn.Dropout(0.1)(x)``, ``dropkit.functional.dropout(x, 0.1)``,
``torch.nn.Dropout(0.1)(x)`` and ``torch.nn.functional.dropout(x, 0.1)``.  Cases: forward of a
one-element input (almost pure host overhead: argument checks, key and stream handling,
dispatch), forward+backward of it (the same with autograd recording the call and the backward
replaying the mask), forward of a ``(128, 1024)`` input, and forward+backward of that input
(``torch.autograd.grad`` with a preallocated upstream gradient).  In the forward cases the input
does not require grad, so autograd records nothing, for dropkit as for torch.  Modules are built
once, outside the timing.  A repeat times ``calls`` back-to-back calls with ``time.perf_counter_ns``;
the four candidates take turns, repeat by repeat, in this one process (so a change of background
load hits them alike and their ratios compare like with like), each after an untimed call and a
warm-up before the first repeat.  Figures are the median over repeats of the microseconds per
call; ratios are dropkit / torch, module against module and function against function.  It
prints a Markdown table and writes the figures, every repeat's sample, the machine (as
``bench_dropout.py`` records it, plus the path dropkit was imported from), the load average and
the CPU share other processes took to ``--json`` (default
``benchmarks/results/bench_overhead.json``).  ``--quick`` (5 repeats of fewer calls) is for smoke
checks.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import dropkit
from bench_dropout import format_table, print_load, start_run, write_results

RESULTS = Path(__file__).resolve().parent / "results"
P = 0.1
CANDIDATES = ("dropkit_module", "dropkit_functional", "torch_module", "torch_functional")
COLUMNS = [
    ("shape", "shape"), ("pass", "pass"), ("calls", "calls"),
    ("dropkit_module_us", "dropkit module"), ("torch_module_us", "torch module"),
    ("module_ratio", "module dk/torch"),
    ("dropkit_functional_us", "dropkit functional"), ("torch_functional_us", "torch functional"),
    ("functional_ratio", "functional dk/torch"),
]  # fmt: skip


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    backward: bool
    calls: int  # calls per timed repeat
    quick_calls: int


CASES = (
    Case((1,), backward=False, calls=200, quick_calls=50),
    Case((1,), backward=True, calls=100, quick_calls=25),
    Case((128, 1024), backward=False, calls=50, quick_calls=10),
    Case((128, 1024), backward=True, calls=50, quick_calls=10),
)


def interleaved_us_per_call(
    candidates: dict[str, Callable[[], object]], calls: int, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Microseconds per call of each candidate in every repeat, the candidates timed round-robin.

    Each repeat of a candidate starts with an untimed call, so that the timed calls find the
    caches and the allocator in the state of back-to-back calls of that candidate."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            fn()
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter_ns() - start) / calls / 1e3)
    return samples


def case_candidates(case: Case) -> dict[str, Callable[[], object]]:
    """The four calls of one case, each a closure over its own module or function and input."""
    dropkit_module = dropkit.nn.Dropout(P).train()
    torch_module = torch.nn.Dropout(P).train()
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "dropkit_module": dropkit_module,
        "dropkit_functional": lambda t: dropkit.functional.dropout(t, P),
        "torch_module": torch_module,
        "torch_functional": lambda t: torch.nn.functional.dropout(t, P),
    }
    x = torch.randn(case.shape)
    x_grad = x.clone().requires_grad_(True)
    dy = torch.randn(case.shape)

    def forward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: fn(x)

    def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(x_grad), x_grad, dy)

    timed = fwd_bwd if case.backward else forward
    return {name: timed(fn) for name, fn in calls.items()}


def check_outputs(candidates: dict[str, Callable[[], object]], shape: tuple[int, ...]) -> None:
    """Every candidate returns a tensor (or a gradient) of the input's shape."""
    for name, fn in candidates.items():
        out = fn()
        tensor = out[0] if isinstance(out, tuple) else out
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise RuntimeError(f"{name} returned {type(out).__name__}, not a tensor of shape {shape}")


def measure(case: Case, quick: bool, repeats: int, warmup: int) -> dict[str, Any]:
    candidates = case_candidates(case)
    check_outputs(candidates, case.shape)
    calls = case.quick_calls if quick else case.calls
    samples = interleaved_us_per_call(candidates, calls, repeats, warmup)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "shape": str(case.shape),
        "numel": math.prod(case.shape),
        "pass": "forward+backward" if case.backward else "forward",
        "calls": calls,
        "repeats": repeats,
        **{f"{name}_us": round(medians[name], 3) for name in CANDIDATES},
        "module_ratio": round(medians["dropkit_module"] / medians["torch_module"], 3),
        "functional_ratio": round(medians["dropkit_functional"] / medians["torch_functional"], 3),
        "samples_us": {name: [round(v, 3) for v in values] for name, values in samples.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 repeats of fewer calls (a few seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch (and kernel) threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 15, quick 5)")
    parser.add_argument("--json", type=Path, default=RESULTS / "bench_overhead.json")
    args = parser.parse_args(argv)

    repeats = args.repeats or (5 if args.quick else 15)
    warmup = 20 if args.quick else 100
    run_load, info = start_run(args.threads)

    rows = []
    for case in CASES:
        rows.append(measure(case, args.quick, repeats, warmup))
        print(f"  measured {case.shape} backward={case.backward}", file=sys.stderr)
    print(f"\n## Per-call overhead, median µs per call (p = {P}, float32, CPU, training mode)\n")
    print(format_table(rows, COLUMNS))

    conditions = run_load.finish()
    print_load(conditions)

    result = {
        "machine": info | conditions,
        "config": {
            "p": P,
            "dtype": "float32",
            "device": "cpu",
            "threads": args.threads,
            "repeats": repeats,
            "warmup": warmup,
            "quick": args.quick,
            "candidates": list(CANDIDATES),
        },
        "overhead": rows,
    }
    write_results(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
