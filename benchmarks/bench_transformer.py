"""Training-step benchmark: a GPT-style decoder with dropout at every placement, dropkit against
``torch.nn.Dropout`` + torch SDPA dropout and against no dropout, eager and compiled.

The model: token + position embeddings, then *layers* pre-LayerNorm blocks (causal self-attention,
GELU MLP of width 4d), a final LayerNorm and a head tied to the token embedding; a step is
``zero_grad``, forward, cross-entropy against random targets, backward and an AdamW step.
Dropout (p = 0.1) sits at every placement of GPT-2: after the embeddings, on the attention
weights, on each sub-layer's output before the residual add, and (as in many GPT variants) on
the MLP's hidden activations.  Methods:

* ``dropkit``: ``dropkit.nn.Dropout`` (embeddings, MLP), ``dropkit.nn.ScaledDotProductAttention``
  (the fused Triton kernel on CUDA; on the CPU the blocked path above its size threshold, else the
  materialised weights) and ``dropkit.nn.ResidualDropout`` with the projection's bias passed to it
  (the fused bias-dropout-add);
* ``torch``: ``torch.nn.Dropout`` at the same places and
  ``F.scaled_dot_product_attention(dropout_p=p)``;
* ``none``: the same model without dropout (``nn.Identity``, SDPA with ``dropout_p=0``).

Each runs eager and under ``torch.compile`` (``--no-compile`` skips it).  Step times are medians
of ``--repeats`` steps timed round-robin over every method and mode (one untimed step of each
before its timed one in every round), so all ratios compare like with like under changing
background load.  Memory:
the peak growth of the bytes held by torch's allocator during one step (CPU: its allocation events
recorded by ``torch.profiler``; CUDA: ``torch.cuda.max_memory_allocated``), and, eager, the bytes
autograd keeps for backward (distinct storages seen by ``saved_tensors_hooks``): a method's
excess over ``none`` is what it keeps for its dropout masks.  A last table compares one attention
call (forward and backward, L = 1024, 12 heads, head dim 64, causal, batch 1): dropkit's
blocked path, dropkit's materialised path, torch with and without dropout (on CUDA: dropkit's
fused kernel).

Configurations: ``--device cpu`` (default) runs 4 layers, d = 256, 4 heads, L = 256, batch 8,
vocabulary 8192, float32, on ``--threads`` threads (default 1: on a shared machine small ops with
several threads stall on descheduled threads); ``--device cuda`` runs GPT-2 small (12 layers,
d = 768, 12 heads, L = 1024, batch 8, vocabulary 50257) in bfloat16.

Usage: ``python benchmarks/bench_transformer.py [--device cpu|cuda] [--repeats 7] [--no-compile]
[--threads 1] [--output benchmarks/results/bench_transformer.json]``; prints Markdown tables and
writes the figures with machine information to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dropkit
import dropkit.functional.attention as dropkit_attention
from bench_dropout import format_table, load_average, machine_info

P = 0.1
METHODS = ("dropkit", "torch", "none")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    layers: int
    d_model: int
    heads: int
    length: int
    batch: int
    vocab: int
    dtype: str


CONFIGS = {
    "cpu": Config(layers=4, d_model=256, heads=4, length=256, batch=8, vocab=8192, dtype="float32"),
    "cuda": Config(layers=12, d_model=768, heads=12, length=1024, batch=8, vocab=50257, dtype="bfloat16"),
}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LN decoder block: causal self-attention and a GELU MLP, dropout at every placement."""

    def __init__(self, config: Config, method: str) -> None:
        super().__init__()
        d = config.d_model
        self.heads = config.heads
        self.method = method
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        if method == "dropkit":
            self.attention = dropkit.nn.ScaledDotProductAttention(P)
            self.attention_residual = dropkit.nn.ResidualDropout(P)
            self.mlp_residual = dropkit.nn.ResidualDropout(P)
            self.mlp_dropout: nn.Module = dropkit.nn.Dropout(P)
        else:
            self.residual_dropout = nn.Dropout(P) if method == "torch" else nn.Identity()
            self.mlp_dropout = nn.Dropout(P) if method == "torch" else nn.Identity()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.method == "dropkit":
            out: torch.Tensor = self.attention(q, k, v, is_causal=True)
            return out
        rate = P if self.method == "torch" and self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=rate, is_causal=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, d = x.shape
        q, k, v = (
            self.qkv(self.ln1(x)).view(batch, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        attended = self._attend(q, k, v).transpose(1, 2).reshape(batch, length, d)
        if self.method == "dropkit":
            x = self.attention_residual(F.linear(attended, self.proj.weight), x, bias=self.proj.bias)
            hidden = self.mlp_dropout(F.gelu(self.fc(self.ln2(x))))
            return self.mlp_residual(F.linear(hidden, self.out.weight), x, bias=self.out.bias)
        x = x + self.residual_dropout(self.proj(attended))
        hidden = self.mlp_dropout(F.gelu(self.fc(self.ln2(x))))
        return x + self.residual_dropout(self.out(hidden))


class GPT(nn.Module):
    def __init__(self, config: Config, method: str) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab, config.d_model)
        self.position = nn.Embedding(config.length, config.d_model)
        if method == "dropkit":
            self.embedding_dropout: nn.Module = dropkit.nn.Dropout(P)
        else:
            self.embedding_dropout = nn.Dropout(P) if method == "torch" else nn.Identity()
        self.blocks = nn.ModuleList(Block(config, method) for _ in range(config.layers))
        self.ln = nn.LayerNorm(config.d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embedding_dropout(self.token(tokens) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln(x), self.token.weight)  # head tied to the token embedding


class Trainer:
    """One method's model, optimizer and batch; ``step()`` is one training step."""

    def __init__(self, config: Config, method: str, device: torch.device, compiled: bool) -> None:
        torch.manual_seed(0)
        dropkit.manual_seed(0)
        dtype = getattr(torch, config.dtype)
        self.model = GPT(config, method).to(device=device, dtype=dtype).train()
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model) if compiled else self.model
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        shape = (config.batch, config.length)
        self.tokens = torch.randint(config.vocab, shape, generator=generator).to(device)
        self.targets = torch.randint(config.vocab, shape, generator=generator).to(device)
        self.vocab = config.vocab
        self.device = device

    def loss(self) -> torch.Tensor:
        logits = self.forward(self.tokens)
        return F.cross_entropy(logits.view(-1, self.vocab).float(), self.targets.view(-1))

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def interleaved_medians_ms(candidates: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each candidate, timed round-robin (each timed call preceded by an
    untimed one of the same candidate, so it finds the caches in the steady state of repeated
    calls)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak growth of the bytes held by torch's allocator while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def saved_bytes(loss: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``loss()`` (parameters too)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    value.backward()
    return sum(storages.values())


def attention_call(device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict[str, Any]]:
    """One causal attention call (forward and backward) at L = 1024, 12 heads, head dim 64."""
    generator = torch.Generator().manual_seed(2)
    shape = (1, 12, 1024, 64)
    q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_() for _ in range(3))
    upstream = torch.randn(shape, generator=generator).to(device, dtype)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            q.grad = k.grad = v.grad = None
            fn().backward(upstream)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return call

    def dropkit_call() -> torch.Tensor:
        return dropkit.functional.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=True)

    def materialised() -> torch.Tensor:
        threshold = dropkit_attention.BLOCKED_MIN_ELEMENTS
        dropkit_attention.BLOCKED_MIN_ELEMENTS = 1 << 62  # the automatic choice: materialise
        try:
            return dropkit_call()
        finally:
            dropkit_attention.BLOCKED_MIN_ELEMENTS = threshold

    candidates = {
        "dropkit (fused kernel)" if device.type == "cuda" else "dropkit (blocked path)": run(dropkit_call),
        "torch SDPA, dropout": run(
            lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=True)
        ),
        "torch SDPA, no dropout": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    }
    if device.type == "cpu":
        candidates["dropkit (materialised)"] = run(materialised)
    times = interleaved_medians_ms(candidates, repeats)
    weights_mib = 12 * 1024 * 1024 * torch.finfo(dtype).bits / 8 / 2**20
    rows = []
    for name, fn in candidates.items():
        rows.append(
            {
                "method": name,
                "fwd_bwd_ms": round(times[name], 2),
                "peak_mib": round(peak_bytes(fn, device) / 2**20, 1),
                "weights_mib": round(weights_mib, 1),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method (default 7)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_transformer.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = CONFIGS[device.type]
    info = machine_info(device)
    info["load_average_before"] = load_average()
    machine = info.get("gpu", info["cpu_model"])
    print(f"# {machine}, torch {info['torch']}, dropkit backend {info['dropkit_backend']}")
    print(f"# config: {asdict(config)}, p = {P}, threads {args.threads}, repeats {args.repeats}")

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    trainers = {
        (mode, method): Trainer(config, method, device, mode == "compiled")
        for mode in modes
        for method in METHODS
    }
    for (mode, method), trainer in trainers.items():
        started = time.perf_counter()
        trainer.step()  # warm-up; compiles under torch.compile
        print(f"  {mode} {method}: first step {time.perf_counter() - started:.1f} s", file=sys.stderr)
    # Every method and mode in one round-robin: all ratios come from the same conditions.
    times = interleaved_medians_ms(
        {f"{mode} {method}": t.step for (mode, method), t in trainers.items()}, args.repeats
    )
    rows: list[dict[str, Any]] = []
    for (mode, method), trainer in trainers.items():
        row: dict[str, Any] = {
            "mode": mode,
            "method": method,
            "step_ms": round(times[f"{mode} {method}"], 1),
            "vs_torch": round(times[f"{mode} {method}"] / times[f"{mode} torch"], 3),
            "vs_none": round(times[f"{mode} {method}"] / times[f"{mode} none"], 3),
            "vs_eager": round(times[f"{mode} {method}"] / times[f"eager {method}"], 3),
            "peak_mib": round(peak_bytes(trainer.step, device) / 2**20, 1),
        }
        if mode == "eager":
            row["saved_mib"] = round(saved_bytes(trainer.loss) / 2**20, 1)
        rows.append(row)
    none_saved = next(r["saved_mib"] for r in rows if r["mode"] == "eager" and r["method"] == "none")
    for row in rows:
        if "saved_mib" in row:
            row["mask_mib"] = round(row["saved_mib"] - none_saved, 1)
    del trainers

    print("\n## Training step (median ms), peak allocator growth during a step, bytes kept for backward\n")
    columns = [
        ("mode", "mode"), ("method", "method"), ("step_ms", "step ms"), ("vs_torch", "/ torch"),
        ("vs_none", "/ none"), ("vs_eager", "/ eager"), ("peak_mib", "peak MiB"), ("saved_mib", "saved MiB"),
        ("mask_mib", "saved - none MiB"),
    ]  # fmt: skip
    print(format_table(rows, columns))

    dtype = getattr(torch, config.dtype) if device.type == "cuda" else torch.float32
    attention = attention_call(device, dtype, args.repeats)
    print(f"\n## One attention call, forward + backward, L = 1024, 12 heads, head dim 64, causal, {dtype}\n")
    print(
        format_table(
            attention,
            [
                ("method", "method"),
                ("fwd_bwd_ms", "ms"),
                ("peak_mib", "peak MiB"),
                ("weights_mib", "L x L weights MiB"),
            ],
        )
    )

    def row_of(mode: str, method: str) -> dict[str, Any]:
        return next(r for r in rows if r["mode"] == mode and r["method"] == method)

    checks: dict[str, bool] = {}
    for mode in modes:
        checks[f"{mode}: dropkit step time <= torch's"] = (
            row_of(mode, "dropkit")["step_ms"] <= row_of(mode, "torch")["step_ms"]
        )
    if device.type == "cuda":
        torch_masks = row_of("eager", "torch")["mask_mib"]
        for mode in modes:
            gain = row_of(mode, "torch")["peak_mib"] - row_of(mode, "dropkit")["peak_mib"]
            checks[f"{mode}: dropkit peak lower by >= torch's mask bytes"] = gain >= torch_masks
    print("\n## Targets\n")
    for name, ok in checks.items():
        print(f"  {name:52s} {'met' if ok else 'MISSED'}")
    info["load_average_after"] = load_average()
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "config": asdict(config) | {"p": P, "threads": args.threads, "repeats": args.repeats},
        "training_step": rows,
        "attention_call": attention,
        "checks": checks,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n# wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
