"""On a CUDA machine: dropkit's masks and gradients are the same on the GPU as on the CPU.

The mission promises masks that are identical across devices.  This script runs every
single-input layer of the contract registry (``tests/layer_specs.py``, ``LayerSpec.unary``) plus
DropBlock2d, DropConnect and the fused bias-dropout-add once on the CPU and once on the GPU, from
the same seed, and compares forward outputs and input gradients:

* Bernoulli and structured (DropBlock) layers (the mask is integer arithmetic on Philox words):
  bit for bit, float32 and bfloat16, through the default kernels (numba on the CPU, Triton on the
  GPU) and through the reference engine on the GPU;
* Gaussian layers (Box-Muller goes through ``log``/``cos``, whose last bits are the device's own
  library): the largest relative difference, expected at float32 rounding level.

Then it compiles a small model with ``torch.compile(fullgraph=True)`` on the GPU and checks that
its outputs and gradients equal eager ones over three training steps.  Prints one line per check
and exits non-zero on any mismatch.  Usage: ``python benchmarks/check_cuda.py [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import dropkit  # noqa: E402
from bench_triton import same_bits  # noqa: E402
from dropkit.kernels.dispatch import use_reference_engine  # noqa: E402
from layer_specs import SPECS  # noqa: E402

# How the registry's kinds of layer are compared across devices (a kind missing here fails loudly).
COMPARISON = {"bernoulli": "bernoulli", "structured": "bernoulli", "gaussian": "gaussian"}


def normwise_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: elementwise relative differences blow up where 1 + sigma * eps
    cancels to near zero, so they say nothing about whether the noise agrees."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_layer(
    make: Callable[[], nn.Module], inputs: list[torch.Tensor], device: str, reference: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward of a fresh module on ``device``: (output, input gradients)."""
    dropkit.manual_seed(2026)
    module = make().to(device=device, dtype=inputs[0].dtype)
    leaves = [x.detach().to(device).requires_grad_(x.is_floating_point()) for x in inputs]
    with use_reference_engine(reference):
        out = module(*leaves)
        weight = torch.linspace(-1.0, 1.0, out.numel(), device=device).reshape(out.shape).to(out.dtype)
        (out * weight).sum().backward()
    return out.cpu(), [leaf.grad.cpu() for leaf in leaves if leaf.grad is not None]


def layer_cases() -> list[
    tuple[str, str, Callable[[], nn.Module], Callable[[torch.dtype], list[torch.Tensor]]]
]:
    cases = []
    for spec in SPECS:
        if not spec.unary:  # the multi-input layers wrap matmuls and cells: see the cases below
            continue

        def make(spec=spec) -> nn.Module:
            return spec.make(spec.rate)

        def inputs(dtype: torch.dtype, spec=spec) -> list[torch.Tensor]:
            torch.manual_seed(1)  # the registry draws its inputs from torch's global generator
            return list(spec.inputs(dtype, False))

        cases.append((spec.name, COMPARISON[spec.kind], make, inputs))

    def dropblock_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.randn(8, 6, 17, 23, generator=torch.Generator().manual_seed(2)).to(dtype)]

    cases.append(
        (
            "DropBlock2d[block_size=5]",
            "bernoulli",
            lambda: dropkit.nn.DropBlock2d(0.2, block_size=5),
            dropblock_inputs,
        )
    )

    def dropconnect() -> nn.Module:
        torch.manual_seed(3)
        return dropkit.nn.DropConnect(nn.Linear(48, 32), p=0.3)

    def dropconnect_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.randn(16, 48, generator=torch.Generator().manual_seed(4)).to(dtype)]

    # A dropped weight changes outputs by O(|w x|), far above the float32 tolerance.
    cases.append(("DropConnect[Linear]", "matmul", dropconnect, dropconnect_inputs))

    def fused_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        return [torch.randn(37, 129, generator=g).to(dtype), torch.randn(37, 129, generator=g).to(dtype)]

    class FusedResidualDropoutModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.linspace(-0.5, 0.5, 129))
            self.fused = dropkit.nn.ResidualDropout(0.3)

        def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return self.fused(x, residual, bias=self.bias.to(x.dtype))

    cases.append(("ResidualDropout[bias]", "bernoulli", FusedResidualDropoutModel, fused_inputs))
    return cases


def check_layers(results: list[dict]) -> None:
    for name, kind, make, inputs in layer_cases():
        for dtype in (torch.float32, torch.bfloat16):
            xs = inputs(dtype)
            cpu_out, cpu_grads = run_layer(make, xs, "cpu")
            for path, reference in (("kernels", False), ("reference", True)):
                gpu_out, gpu_grads = run_layer(make, xs, "cuda", reference=reference)
                row = {"check": "cpu-vs-cuda", "layer": name, "dtype": str(dtype), "cuda_path": path}
                if kind == "bernoulli":
                    row["ok"] = same_bits(cpu_out, gpu_out) and all(
                        same_bits(a, b) for a, b in zip(cpu_grads, gpu_grads, strict=True)
                    )
                    row["detail"] = "bit-identical" if row["ok"] else "bits differ"
                else:  # "gaussian" noise or a "matmul" (cuBLAS and CPU BLAS sum in different orders)
                    diff = max(
                        normwise_diff(cpu_out, gpu_out),
                        *(normwise_diff(a, b) for a, b in zip(cpu_grads, gpu_grads, strict=True)),
                    )
                    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
                    row["ok"] = diff <= tolerance
                    row["detail"] = f"normwise difference {diff:.2e} (tolerance {tolerance:g})"
                results.append(row)
                verdict = "ok  " if row["ok"] else "FAIL"
                print(f"{verdict} {name:<26} {dtype!s:<14} cuda={path:<9} {row['detail']}")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.drop2d = dropkit.nn.Dropout2d(0.2)
        self.block = dropkit.nn.DropBlock2d(0.1, block_size=3)
        self.path = dropkit.nn.DropPath(0.2)
        self.head = nn.Linear(8 * 12 * 12, 10)
        self.drop = dropkit.nn.Dropout(0.5)
        self.noise = dropkit.nn.GaussianDropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.path(self.block(self.drop2d(torch.relu(self.conv(x)))))
        return self.head(self.noise(self.drop(x.flatten(1))))


def check_compile(results: list[dict]) -> None:
    torch.manual_seed(0)
    # One module for both: its layers' stream ids (hence masks) come from construction order.
    model = Block().cuda()
    x = torch.randn(16, 8, 12, 12, device="cuda")
    ok = True
    worst = 0.0

    def steps(fn: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dropkit.manual_seed(7)  # restarts every live module's step counter
        outs = []
        for _ in range(3):
            model.zero_grad()
            out = fn(x)
            out.square().mean().backward()
            outs.append((out.detach().clone(), model.conv.weight.grad.clone()))
        return outs

    eager_outs = steps(model)
    compiled_outs = steps(torch.compile(model, fullgraph=True))
    for (a, ga), (b, gb) in zip(eager_outs, compiled_outs, strict=True):
        worst = max(worst, float((a - b).abs().max()), float((ga - gb).abs().max()))
        # The masks must agree exactly: a position dropped in one and kept in the other would
        # differ by O(1), far above the float32 reassociation of Inductor's fused kernels.
        ok = ok and torch.equal(a == 0, b == 0) and worst < 1e-4
    row = {"check": "compile-vs-eager", "ok": ok, "detail": f"max abs difference {worst:.2e} over 3 steps"}
    results.append(row)
    print(f"{'ok  ' if ok else 'FAIL'} torch.compile(fullgraph=True) vs eager on CUDA: {row['detail']}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "check_cuda.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_cuda: no CUDA device is available.", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    results: list[dict] = []
    check_layers(results)
    check_compile(results)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, indent=1
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
