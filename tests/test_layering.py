"""Dependencies run one way: nn -> functional -> ops -> kernels -> engine, and nothing below
imports anything above it (read from the import statements of every module, lazy imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dropkit

PACKAGE = Path(dropkit.__file__).parent
# Lower number = lower layer.  A module may import its own layer and the layers below it.
LAYERS = {
    "_validation": 0,
    "_deprecation": 0,
    "_version": 0,
    "engine": 1,
    "kernels": 2,
    "ops": 3,
    "functional": 4,
    "nn": 5,
    "distributed": 5,
    "schedules": 6,
    "mc": 6,
    "metrics": 6,
    "interop": 7,
    "experiments": 7,
    "diagnostics": 7,
    "__main__": 8,
    "__init__": 8,
}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "dropkit":
        return None
    return LAYERS.get(parts[1] if len(parts) > 1 else "__init__")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            # ``from dropkit import ops`` imports the module dropkit.ops.
            names += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "dropkit"]
    return names


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_part_has_a_layer() -> None:
    parts = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in SOURCES}
    assert parts <= set(LAYERS), f"give these a layer: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    relative = path.relative_to(PACKAGE)
    own = LAYERS[relative.parts[0].removesuffix(".py")]
    upward = []
    for name in _imports(path):
        layer = _layer_of(name)
        if layer is not None and layer > own and name != "dropkit":
            upward.append(name)
    assert not upward, f"{relative} (layer {own}) imports from above: {upward}"
