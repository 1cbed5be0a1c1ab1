"""Smoke test of an installed dropkit (``make wheel-smoke`` runs it in a fresh virtual environment
that holds torch, the wheel and nothing else; ``tests/test_wheel_smoke.py`` runs its in-process
checks in the development environment).

Checks: the ``dropkit`` console script and its ``--version``; the installed metadata; ``py.typed``;
every module of the package imports, or fails only for want of an optional dependency that is not
installed; a forward and backward pass of a few layers, reproducible from a seed and the identity
in eval; MC prediction and diagnostics; ``dropkit doctor`` on the command line; ``dropkit demo``
with two epochs when scikit-learn is installed, else its one-line missing-dependency error.

Usage: ``python tests/wheel_smoke.py [--expect-installed]``; with ``--expect-installed`` dropkit
must come from site-packages (not from a checkout), as a wheel installs it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

import dropkit

#: Optional dependencies: a module may fail to import only for want of one of these.
OPTIONAL = {
    "numba",
    "triton",
    "lightning",
    "pytorch_lightning",
    "sklearn",
    "tqdm",
    "matplotlib",
    "transformers",
}


def check_console_script() -> None:
    """``dropkit --version`` prints the package's version (the script next to this Python)."""
    script = Path(sys.executable).with_name("dropkit")
    command = [str(script)] if script.exists() else [shutil.which("dropkit") or "dropkit"]
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"dropkit {dropkit.__version__}", result.stdout
    assert importlib.metadata.version("dropkit") == dropkit.__version__


def check_metadata() -> None:
    meta = importlib.metadata.metadata("dropkit")
    assert meta["License-Expression"] == "BSD-3-Clause", meta["License-Expression"]
    assert meta["Requires-Python"] == ">=3.10"
    assert "dropkit developers" in (meta["Author"] or "") + (meta["Author-email"] or "")
    assert any(c.startswith("Development Status") for c in meta.get_all("Classifier") or [])
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"fast", "demo", "plot", "lightning", "docs", "test"} <= extras, extras
    package = Path(dropkit.__file__).parent
    assert (package / "py.typed").is_file(), "py.typed is missing"


def check_installed_location() -> None:
    """dropkit comes from site-packages, and nothing of the test suite or benchmarks came along."""
    package = Path(dropkit.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert package.parent == site, f"dropkit imported from {package}, not from {site}"
    for stray in ("tests", "benchmarks", "docs"):
        assert not (site / stray).exists(), f"the wheel installed a top-level {stray!r}"


def check_imports() -> list[str]:
    """Import every module of the package; returns those skipped for a missing optional dependency."""
    skipped = []
    for info in pkgutil.walk_packages(dropkit.__path__, "dropkit."):
        try:
            importlib.import_module(info.name)
        except ImportError as error:
            # A missing module, or an ImportError that says so and chains the missing module.
            missing = error if isinstance(error, ModuleNotFoundError) else error.__cause__
            if not isinstance(missing, ModuleNotFoundError):
                raise
            root = (missing.name or "").split(".")[0]
            if root not in OPTIONAL or importlib.util.find_spec(root) is not None:
                raise
            skipped.append(f"{info.name} (needs {root})")
    for name in ("nn", "functional", "mc", "metrics", "diagnostics", "schedules"):
        module = importlib.import_module(f"dropkit.{name}")
        for public in module.__all__:
            assert hasattr(module, public), f"dropkit.{name}.{public}"
    return skipped


def check_layers() -> None:
    """Forward and backward of a few layers: reproducible, identity in eval, finite gradients."""
    layers = {
        "Dropout": (dropkit.nn.Dropout(0.3), (8, 16)),
        "Dropout2d": (dropkit.nn.Dropout2d(0.2), (2, 4, 8, 8)),
        "DropBlock2d": (dropkit.nn.DropBlock2d(0.1, block_size=3), (2, 4, 8, 8)),
        "DropPath": (dropkit.nn.DropPath(0.2), (4, 16)),
        "GaussianDropout": (dropkit.nn.GaussianDropout(0.2), (8, 16)),
        "AlphaDropout": (dropkit.nn.AlphaDropout(0.1), (8, 16)),
        "LockedDropout": (dropkit.nn.LockedDropout(0.3), (5, 2, 16)),
        "ConcreteDropout": (dropkit.nn.ConcreteDropout(torch.nn.Linear(16, 4)), (8, 16)),
        "TransformerEncoderBlock": (dropkit.nn.TransformerEncoderBlock(16, 2, 32), (2, 5, 16)),
    }
    for name, (layer, shape) in layers.items():
        x = torch.randn(*shape, requires_grad=True)
        dropkit.manual_seed(0)
        y = layer.train()(x)
        y.square().sum().backward()
        assert x.grad is not None, name
        assert bool(torch.isfinite(x.grad).all()), name
        if not isinstance(layer, (dropkit.nn.ConcreteDropout, dropkit.nn.TransformerEncoderBlock)):
            dropkit.manual_seed(0)
            assert torch.equal(layer(x), y), f"{name}: the same seed gave another mask"
            assert torch.equal(layer.eval()(x), x), f"{name}: eval is not the identity"


def check_mc_and_diagnostics() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), dropkit.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    )
    x = torch.randn(4, 8)
    samples = dropkit.mc_predict(model, x, T=10, seed=0, transform="softmax")
    assert samples.shape == (10, 4, 3)
    assert torch.equal(samples, dropkit.mc_predict(model, x, T=10, seed=0, transform="softmax", chunk_size=3))
    entropy = dropkit.metrics.predictive_entropy(samples)
    assert entropy.shape == (4,)
    assert dropkit.diagnostics.check(model, x).findings == []


def check_commands() -> None:
    """``dropkit doctor`` runs; ``dropkit demo`` trains two epochs, or names its missing extra."""
    doctor = [
        sys.executable, "-m", "dropkit", "doctor", "dropkit.experiments.digits:build_mlp",
        "--factory-arg", "hidden=32", "--factory-arg", "hidden_dropout=0.5", "--input-shape", "4,64",
        "--fail-on", "never", "--no-progress",
    ]  # fmt: skip
    subprocess.run(doctor, check=True, capture_output=True, text=True)
    demo = [sys.executable, "-m", "dropkit", "demo", "--epochs", "2", "--hidden", "32", "--no-progress"]
    result = subprocess.run(demo, capture_output=True, text=True)
    if importlib.util.find_spec("sklearn") is not None and importlib.util.find_spec("tqdm") is not None:
        assert result.returncode == 0, result.stderr
        assert "test" in result.stdout, result.stdout
    else:
        assert result.returncode == 1, (result.returncode, result.stderr)
        assert "dropkit[demo]" in result.stderr, result.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--expect-installed", action="store_true", help="dropkit must come from site-packages"
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", dropkit.kernels.KernelFallbackWarning)  # no numba: reference engine
    if args.expect_installed:
        check_installed_location()
    check_console_script()
    check_metadata()
    skipped = check_imports()
    check_layers()
    check_mc_and_diagnostics()
    check_commands()
    print(f"wheel smoke test passed: dropkit {dropkit.__version__} from {Path(dropkit.__file__).parent}")
    for name in skipped:
        print(f"  not imported, optional dependency missing: {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
