"""Monte Carlo dropout prediction: dropkit's ``mc_predict`` against baal and hand-written loops.

Scenarios (T samples of one batch, CPU):

* ``head``: a small CNN whose only dropout is in the classifier head; dropkit caches the
  convolutional trunk (found automatically with ``torch.fx``) and runs only the head T times.
* ``every``: an MLP with dropout after every hidden layer (no trunk to cache); dropkit runs the
  batch repeated T times in memory-budgeted chunks, like baal's batched mode.
* ``vit``: a small Hugging Face ``ViTForImageClassification`` built from a config (64x64
  images, patch 8, 6 layers, hidden 96, 3 heads; hidden and attention dropout 0.1), batch 8,
  output ``logits``.
* ``bert``: a small Hugging Face ``BertForSequenceClassification`` from a config (4 layers,
  hidden 128, 2 heads, SDPA attention; dropout 0.1), batch 8 of 64 tokens, called with
  ``input_ids=`` and ``attention_mask=`` keywords, output ``logits``.

Methods: a Python loop over T forwards with the ``torch.nn`` dropout modules in train mode and
the rest in eval (what many users write; it misses dropout that is not a module, such as Hugging
Face attention dropout); a loop over T forwards inside ``with dropkit.mc_dropout(model)`` (the
same sites as ``mc_predict``, one forward per sample); baal's ``MCDropoutModule`` in batched
(``replicate_in_memory=True``) and loop mode and ``MCCachingModule`` (loop mode, caches
Linear/Conv outputs), for the ``head`` and ``every`` models; dropkit ``mc_predict`` with and
without trunk caching, default memory budget (its chunk plan is recorded), and with
``chunk_size=5`` (smaller batched forwards).  Times are medians of
``--repeats`` runs after a warm-up, all in this process and round-robin (one call of each method
per round), so the ratios compare like with like even when the machine's load changes.
Peak memory is the growth of the peak resident set size (``VmHWM`` minus ``VmRSS`` before the
call, after a warm-up with T = 2 and a reset of the high-water mark) of a fresh subprocess that
runs the method once.  One thread by default: on a loaded machine, small ops with several
threads stall on thread synchronisation, which distorts every method's small-batch forwards.
baal methods are listed as "not installed" when baal is not importable; the Hugging Face
scenarios are skipped when ``transformers`` is not.

Usage: ``python benchmarks/bench_mc.py [--T 100] [--repeats 3] [--scenarios vit bert]
[--no-memory]``; prints a Markdown table and writes ``benchmarks/results/bench_mc.json``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import dropkit
from dropkit.mc.sampling import last_plan, mc_predict

try:
    from baal.bayesian.caching_utils import MCCachingModule  # type: ignore[import-not-found,unused-ignore]
    from baal.bayesian.dropout import MCDropoutModule  # type: ignore[import-not-found,unused-ignore]
    from baal.modelwrapper import ModelWrapper, TrainingArgs  # type: ignore[import-not-found,unused-ignore]

    HAVE_BAAL = True
except ImportError:  # pragma: no cover - optional comparison
    HAVE_BAAL = False

try:
    import transformers

    HAVE_TRANSFORMERS = True
except ImportError:  # pragma: no cover - optional scenarios
    HAVE_TRANSFORMERS = False

RESULTS = Path(__file__).resolve().parent / "results"
Run = Callable[[int], torch.Tensor]


@dataclass
class Scenario:
    """A model and its inputs: ``model(*args, **kwargs)``, the tensor to sample selected by ``output``."""

    label: str
    model: nn.Module
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    baal: bool = True  # baal's wrapper takes one positional tensor

    def select(self, output: Any) -> torch.Tensor:
        selected: torch.Tensor = output if self.output is None else output[self.output]
        return selected


def head_model() -> Scenario:
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
    return Scenario("dropout in the head only", model, (torch.randn(16, 3, 32, 32),))


def every_layer_model() -> Scenario:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Dropout(0.2)]
    width = 784
    for _ in range(3):
        layers += [nn.Linear(width, 256), nn.ReLU(), nn.Dropout(0.5)]
        width = 256
    layers.append(nn.Linear(width, 10))
    return Scenario("dropout in every layer", nn.Sequential(*layers).eval(), (torch.randn(32, 784),))


def vit_model() -> Scenario:
    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "image_size": 64, "patch_size": 8, "hidden_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 3, "intermediate_size": 384, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "num_labels": 10,
    }  # fmt: skip
    config = transformers.ViTConfig(**settings)
    model = transformers.ViTForImageClassification(config).eval()
    return Scenario(
        "HF ViT (6 layers, 65 tokens)", model, (torch.randn(8, 3, 64, 64),), output="logits", baal=False
    )


def bert_model() -> Scenario:
    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 512,
        "vocab_size": 1000, "num_labels": 3, "attn_implementation": "sdpa",
    }  # fmt: skip
    config = transformers.BertConfig(**settings)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(1000, (8, 64))
    mask = torch.ones(8, 64, dtype=torch.long)
    mask[::2, 48:] = 0
    return Scenario(
        "HF BERT (4 layers, 64 tokens)", model, kwargs={"input_ids": ids, "attention_mask": mask},
        output="logits", baal=False,
    )  # fmt: skip


SCENARIOS: dict[str, Callable[[], Scenario]] = {"head": head_model, "every": every_layer_model}
if HAVE_TRANSFORMERS:
    SCENARIOS.update(vit=vit_model, bert=bert_model)


def python_loop(scenario: Scenario) -> Run:
    model = copy.deepcopy(scenario.model).eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()

    def run(samples: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [scenario.select(model(*scenario.args, **scenario.kwargs)) for _ in range(samples)]
            )

    return run


def mc_dropout_loop(scenario: Scenario) -> Run:
    def run(samples: int) -> torch.Tensor:
        with torch.no_grad(), dropkit.mc_dropout(scenario.model):
            outputs = [
                scenario.select(scenario.model(*scenario.args, **scenario.kwargs)) for _ in range(samples)
            ]
        return torch.stack(outputs)

    return run


def dropkit_mc_predict(
    trunk: Literal["auto"] | None, chunk_size: int | None = None
) -> Callable[[Scenario], Run]:
    def build(scenario: Scenario) -> Run:
        def run(samples: int) -> torch.Tensor:
            result: torch.Tensor = mc_predict(
                scenario.model, *scenario.args, T=samples, seed=0, trunk=trunk, output=scenario.output,
                chunk_size=chunk_size, **scenario.kwargs,
            )  # fmt: skip
            return result

        return run

    return build


def _baal(replicate: bool, caching: bool) -> Callable[[Scenario], Run]:
    def build(scenario: Scenario) -> Run:
        wrapped: nn.Module = MCDropoutModule(copy.deepcopy(scenario.model))
        if caching:
            wrapped = MCCachingModule(wrapped)
        wrapper = ModelWrapper(wrapped.eval(), TrainingArgs(replicate_in_memory=replicate, use_cuda=False))

        def run(samples: int) -> torch.Tensor:
            out: torch.Tensor = wrapper.predict_on_batch(scenario.args[0], iterations=samples)
            return out

        return run

    return build


BAAL_METHODS = ("baal MCDropoutModule batched", "baal MCDropoutModule loop", "baal MCCachingModule loop")


def methods() -> dict[str, Callable[[Scenario], Run]]:
    """Each entry builds, from the scenario, a function of ``T`` (setup is not timed)."""
    table: dict[str, Callable[[Scenario], Run]] = {
        "python loop": python_loop,
        "loop under dropkit.mc_dropout": mc_dropout_loop,
        "dropkit mc_predict": dropkit_mc_predict("auto"),
        "dropkit mc_predict (no trunk cache)": dropkit_mc_predict(None),
        "dropkit mc_predict (chunk_size=5)": dropkit_mc_predict("auto", 5),
    }
    if HAVE_BAAL:
        table[BAAL_METHODS[0]] = _baal(True, False)
        table[BAAL_METHODS[1]] = _baal(False, False)
        table[BAAL_METHODS[2]] = _baal(False, True)
    return table


def time_methods(runs: dict[str, Run], samples: int, repeats: int) -> tuple[dict[str, float], dict[str, str]]:
    """Median seconds of each run, timed round-robin (one call of each per round, so that a change
    in the machine's load hits every method alike), and the plan of each dropkit run."""
    plans = {}
    for name, run in runs.items():
        run(2)  # warm-up (lazy init, allocator, tracing caches, dropkit's peak measure)
        if name.startswith("dropkit"):
            run(samples)
            plans[name] = str(last_plan())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(samples)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, plans


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{name} not in /proc/self/status")


def peak_memory_child(scenario: str, method: str, samples: int) -> None:
    """Run one method once and print the growth of the peak RSS in bytes (subprocess entry)."""
    run = methods()[method](SCENARIOS[scenario]())
    run(2)  # warm-up: imports, kernel compilation and lazy initialisation are not counted
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    run(samples)
    print(max(0, _status_kib("VmHWM") - before) * 1024)


def peak_memory(scenario: str, method: str, samples: int, threads: int) -> int | None:
    if not Path("/proc/self/status").exists():
        return None
    command = [
        sys.executable,
        __file__,
        "--child",
        scenario,
        method,
        "--T",
        str(samples),
        "--threads",
        str(threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return None
    return int(result.stdout.strip().splitlines()[-1])


def _cell(value: float | None, digits: int, bold: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    return f"**{text}**" if bold else text


def markdown(rows: list[dict[str, Any]], samples: int) -> str:
    lines = [
        f"| scenario | method | ms (T = {samples}) | x baal batched | x Python loop "
        "| x loop under `mc_dropout` | peak MiB | dropkit plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for row in rows:
        label = row["label"] if row["label"] != previous else ""
        previous = row["label"]
        if row["median_s"] is None:
            lines.append(f"| {label} | {row['method']} | not installed | | | | | |")
            continue
        memory = row["peak_rss_growth_bytes"]
        dropkit_row = row["method"].startswith("dropkit")
        lines.append(
            f"| {label} | {row['method']} | {row['median_s'] * 1e3:.1f} "
            f"| {_cell(row['speedup_vs_baal_batched'], 2)} | {_cell(row['speedup_vs_python_loop'], 2)} "
            f"| {_cell(row['speedup_vs_mc_dropout_loop'], 2, bold=dropkit_row)} "
            f"| {_cell(None if memory is None else memory / 2**20, 1)} | {row.get('plan') or ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "METHOD"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        peak_memory_child(args.child[0], args.child[1], args.T)
        return
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    for name in args.scenarios:
        scenario = SCENARIOS[name]()
        runs = {
            method: build(scenario)
            for method, build in methods().items()
            if scenario.baal or not method.startswith("baal")
        }
        timings, plans = time_methods(runs, args.T, args.repeats)
        listed = list(timings) if HAVE_BAAL else [*timings, BAAL_METHODS[0]]
        for method in listed:
            seconds = timings.get(method)
            memory = (
                None if args.no_memory or seconds is None else peak_memory(name, method, args.T, args.threads)
            )
            nan = float("nan")
            rows.append(
                {
                    "scenario": name,
                    "label": scenario.label,
                    "method": method,
                    "median_s": seconds,
                    "speedup_vs_baal_batched": nan
                    if seconds is None
                    else timings.get(BAAL_METHODS[0], nan) / seconds,
                    "speedup_vs_python_loop": nan if seconds is None else timings["python loop"] / seconds,
                    "speedup_vs_mc_dropout_loop": (
                        nan if seconds is None else timings["loop under dropkit.mc_dropout"] / seconds
                    ),
                    "peak_rss_growth_bytes": memory,
                    "plan": plans.get(method),
                }
            )
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(
        f"T = {args.T}, medians of {args.repeats}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"baal: {'installed' if HAVE_BAAL else 'not installed'}, "
        f"transformers: {transformers.__version__ if HAVE_TRANSFORMERS else 'not installed'}, "
        f"1-minute load average {load_before} before, {load_after} after"
    )
    print()
    print(markdown(rows, args.T))
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = RESULTS / "bench_mc.json"
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "T": args.T,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__ if HAVE_TRANSFORMERS else None,
        "baal": HAVE_BAAL,
        "load_average_1min": [load_before, load_after],
        "rows": rows,
    }
    output.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
