"""Monte Carlo dropout prediction: dropkit's ``mc_predict`` against baal and a plain Python loop.

Scenarios (T = 100 samples of one batch, CPU):

* ``head``: a small CNN whose only dropout is in the classifier head; dropkit caches the
  convolutional trunk (found automatically with ``torch.fx``) and runs only the head T times.
* ``every``: an MLP with dropout after every hidden layer (no trunk to cache); dropkit runs the
  batch repeated T times in memory-budgeted chunks, like baal's batched mode.

Methods: a Python loop over T forwards (dropout modules in train mode, the rest in eval);
baal's ``MCDropoutModule`` in batched (``replicate_in_memory=True``) and loop mode; baal's
``MCCachingModule`` (loop mode, caches Linear/Conv outputs); dropkit ``mc_predict`` with and
without trunk caching.  Times are medians of ``--repeats`` runs after a warm-up, all in this
process, so the ratios compare like with like.  Peak memory is the growth of the peak resident
set size (``VmHWM`` minus ``VmRSS`` before the call, after a warm-up with T = 2 and a reset of
the high-water mark) of a fresh subprocess that runs the method once.  One thread by default:
on a loaded machine, small ops with several threads stall on thread synchronisation, which
distorts every method's small-batch forwards.  baal methods are skipped when baal is not installed.

Usage: ``python benchmarks/bench_mc.py [--T 100] [--repeats 3] [--no-memory]``; prints a table
and writes ``benchmarks/results/bench_mc.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dropkit.mc.sampling import mc_predict

try:
    from baal.bayesian.caching_utils import MCCachingModule
    from baal.bayesian.dropout import MCDropoutModule
    from baal.modelwrapper import ModelWrapper, TrainingArgs

    HAVE_BAAL = True
except ImportError:  # pragma: no cover - optional comparison
    HAVE_BAAL = False

RESULTS = Path(__file__).resolve().parent / "results"
Method = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]


def head_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, 10),
    ).eval()
    return model, torch.randn(16, 3, 32, 32)


def every_layer_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Dropout(0.2)]
    width = 784
    for _ in range(3):
        layers += [nn.Linear(width, 256), nn.ReLU(), nn.Dropout(0.5)]
        width = 256
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers).eval(), torch.randn(32, 784)


SCENARIOS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "head": head_model,
    "every": every_layer_model,
}


def python_loop(model: nn.Module, x: torch.Tensor, samples: int) -> torch.Tensor:
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(samples)])


def _baal(model: nn.Module, replicate: bool, caching: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    wrapped: nn.Module = MCDropoutModule(copy.deepcopy(model))
    if caching:
        wrapped = MCCachingModule(wrapped)
    wrapper = ModelWrapper(wrapped.eval(), TrainingArgs(replicate_in_memory=replicate, use_cuda=False))

    def run(x: torch.Tensor, samples: int) -> torch.Tensor:
        out: torch.Tensor = wrapper.predict_on_batch(x, iterations=samples)
        return out

    return run


def methods() -> dict[str, Callable[[nn.Module], Callable[[torch.Tensor, int], torch.Tensor]]]:
    """Each entry builds, from the model, a function of ``(x, T)`` (setup is not timed)."""
    table: dict[str, Callable[[nn.Module], Callable[[torch.Tensor, int], torch.Tensor]]] = {
        "python loop": lambda model: lambda x, t: python_loop(model, x, t),
        "dropkit mc_predict": lambda model: lambda x, t: mc_predict(model, x, t, seed=0),  # type: ignore[return-value]
        "dropkit mc_predict (no trunk cache)": lambda model: (
            lambda x, t: mc_predict(  # type: ignore[return-value]
                model, x, t, seed=0, trunk=None
            )
        ),
    }
    if HAVE_BAAL:
        table["baal MCDropoutModule batched"] = lambda model: _baal(model, True, False)
        table["baal MCDropoutModule loop"] = lambda model: _baal(model, False, False)
        table["baal MCCachingModule loop"] = lambda model: _baal(model, False, True)
    return table


def time_method(
    run: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, samples: int, repeats: int
) -> float:
    run(x, 2)  # warm-up (lazy init, allocator, tracing caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x, samples)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(scenario: str, method: str, samples: int) -> None:
    """Run one method once and print the growth of the peak RSS in bytes (subprocess entry)."""
    model, x = SCENARIOS[scenario]()
    run = methods()[method](model)
    run(x, 2)  # warm-up: imports, kernel compilation and lazy initialisation are not counted
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run(x, samples)
    print(max(0, _status_kib("VmHWM") - before) * 1024)


def peak_memory(scenario: str, method: str, samples: int) -> int | None:
    if not Path("/proc/self/status").exists():
        return None
    command = [sys.executable, __file__, "--child", scenario, method, "--T", str(samples)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return None
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "METHOD"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        peak_memory_child(args.child[0], args.child[1], args.T)
        return
    rows = []
    for scenario, factory in SCENARIOS.items():
        model, x = factory()
        timings: dict[str, float] = {}
        for name, build in methods().items():
            timings[name] = time_method(build(model), x, args.T, args.repeats)
        baal_batched = "baal MCDropoutModule batched"
        for name, seconds in timings.items():
            memory = None if args.no_memory else peak_memory(scenario, name, args.T)
            rows.append(
                {
                    "scenario": scenario,
                    "method": name,
                    "median_s": seconds,
                    "speedup_vs_baal_batched": timings.get(baal_batched, float("nan")) / seconds,
                    "speedup_vs_python_loop": timings["python loop"] / seconds,
                    "peak_rss_growth_bytes": memory,
                }
            )
    header = f"{'scenario':<8} {'method':<38} {'median ms':>10} {'x baal-b':>9} {'x loop':>7} {'peak MiB':>9}"
    print(f"T = {args.T}, torch {torch.__version__}, {torch.get_num_threads()} threads, baal: {HAVE_BAAL}")
    print(header)
    print("-" * len(header))
    for row in rows:
        memory = row["peak_rss_growth_bytes"]
        memory_text = "n/a" if memory is None else f"{memory / 2**20:.1f}"
        print(
            f"{row['scenario']:<8} {row['method']:<38} {row['median_s'] * 1e3:>10.1f} "
            f"{row['speedup_vs_baal_batched']:>9.2f} {row['speedup_vs_python_loop']:>7.2f} {memory_text:>9}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = RESULTS / "bench_mc.json"
    payload = {
        "T": args.T,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "baal": HAVE_BAAL,
        "rows": rows,
    }
    output.write_text(json.dumps(payload, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
