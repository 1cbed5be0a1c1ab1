"""The documentation's code examples run: every ```python block of ``docs/**/*.md``.

The blocks of a page run in order in one namespace (a page's examples build on each other),
after ``torch.manual_seed(0)`` and ``dropkit.manual_seed(0)``.  A block that cannot run here (it
needs a GPU, several processes, a data set or a long compilation) is preceded by the line
``<!-- docs-test: skip (the reason) -->``; the reason is required, and every such marker must
stand right before a python block.  Warnings are errors, as everywhere in the suite.  The
docstrings' examples run separately, as doctests (``--doctest-modules``).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch

import dropkit

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(
    path for path in DOCS.rglob("*.md") if "_build" not in path.parts and "_generated" not in path.parts
)

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*(?P<reason>\(.*\))?\s*-->$")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language (first word of the info string), first line, code."""

    language: str
    line: int
    code: str
    skip_reason: str | None


def read_blocks(text: str) -> list[Block]:
    """The top-level fenced blocks of a Markdown page (blocks nested in a directive's fence
    belong to that directive and are not returned)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    previous = ""
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i].strip())
        if opening is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence = opening.group("fence")
        start = i
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0])
        ):
            i += 1
        words = opening.group("info").split()
        skip = _SKIP.match(previous)
        if skip is not None:
            reason = skip.group("reason")
            if not reason or not reason.strip("() "):
                raise ValueError(f"line {start + 1}: a docs-test skip marker needs a reason in parentheses")
        blocks.append(
            Block(
                language=words[0] if words else "",
                line=start + 2,  # 1-based number of the first code line
                code="\n".join(lines[start + 1 : i]) + "\n",
                skip_reason=skip.group("reason") if skip else None,
            )
        )
        previous = ""
        i += 1
    return blocks


def page_id(path: Path) -> str:
    return path.relative_to(DOCS).as_posix()


def test_docs_have_pages() -> None:
    assert len(PAGES) >= 10, [page_id(p) for p in PAGES]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_skip_markers_stand_before_python_blocks(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    markers = [line for line in text.splitlines() if line.strip().startswith("<!--") and "docs-test:" in line]
    skipped = [block for block in read_blocks(text) if block.skip_reason is not None]
    assert len(markers) == len(skipped), f"{page_id(page)}: a docs-test marker is not right before a block"
    assert all(block.language == "python" for block in skipped)


def python_blocks(page: Path) -> list[Block]:
    """The python blocks of ``page`` that run (not marked to skip)."""
    blocks = read_blocks(page.read_text(encoding="utf-8"))
    return [block for block in blocks if block.language == "python" and block.skip_reason is None]


EXAMPLE_PAGES = [page for page in PAGES if python_blocks(page)]


def test_guides_and_families_have_examples() -> None:
    with_examples = {page_id(page) for page in EXAMPLE_PAGES}
    for page in PAGES:
        if page.parent.name in ("families", "guides") and page.name != "index.md":
            assert page_id(page) in with_examples, f"{page_id(page)} has no python example"


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=page_id)
def test_python_examples_run(page: Path) -> None:
    runnable = python_blocks(page)
    torch.manual_seed(0)
    dropkit.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    threads = torch.get_num_threads()
    try:
        for block in runnable:
            # Padding keeps the page's line numbers in tracebacks.
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, str(page), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


def test_read_blocks() -> None:
    text = (
        "intro\n\n```python\nx = 1\n```\n\n<!-- docs-test: skip (needs a GPU) -->\n```python\ncuda()\n```\n"
        "````{note}\n```python\nnested = True\n```\n````\n```bash\nmake test\n```\n"
    )
    blocks = read_blocks(text)
    assert [(b.language, b.line, b.code, b.skip_reason) for b in blocks] == [
        ("python", 4, "x = 1\n", None),
        ("python", 9, "cuda()\n", "(needs a GPU)"),
        ("{note}", 12, "```python\nnested = True\n```\n", None),
        ("bash", 17, "make test\n", None),
    ]
    with pytest.raises(ValueError, match="needs a reason"):
        read_blocks("<!-- docs-test: skip -->\n```python\nx = 1\n```\n")


def load_conf() -> ModuleType:
    """docs/conf.py as a module (it imports only the standard library and dropkit)."""
    spec = importlib.util.spec_from_file_location("dropkit_docs_conf", DOCS / "conf.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gallery_lays_the_committed_report_and_its_images(tmp_path: Path) -> None:
    source = tmp_path / "repo"
    (source / "reproductions" / "mnist").mkdir(parents=True)
    (source / "reproductions" / "mnist" / "error.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (source / "reproductions" / "README.md").write_text(
        "# Report\n\nSee [the JSON](mnist/seed-0.json), [`index.html`](index.html) and "
        "[the paper](https://example.org/paper).\n\n![Error](mnist/error.png)\n\n"
        "```python\n# not a heading\n```\n",
        encoding="utf-8",
    )
    target = tmp_path / "generated"
    load_conf().generate_reproductions(source, target)
    report = (target / "reproductions" / "report.md").read_text(encoding="utf-8")
    assert report.startswith("## Report\n")
    assert "the JSON (`mnist/seed-0.json`)" in report
    assert "`index.html`" in report
    assert "[`index.html`]" not in report
    assert "[the paper](https://example.org/paper)" in report
    assert "![Error](mnist/error.png)" in report
    assert "\n# not a heading\n" in report
    assert (target / "reproductions" / "mnist" / "error.png").is_file()
    earlier = (target / "reproductions" / "earlier.md").read_text(encoding="utf-8")
    assert earlier.startswith("```{note}")


def test_gallery_builds_without_a_report(tmp_path: Path) -> None:
    target = tmp_path / "generated"
    (target / "reproductions").mkdir(parents=True)
    (target / "reproductions" / "stale.png").write_bytes(b"")
    load_conf().generate_reproductions(tmp_path / "empty", target)
    assert sorted(p.name for p in (target / "reproductions").iterdir()) == ["earlier.md", "report.md"]
    assert "dropkit reproduce" in (target / "reproductions" / "report.md").read_text(encoding="utf-8")


def test_api_reference_documents_every_public_module() -> None:
    text = "\n".join(page.read_text(encoding="utf-8") for page in sorted((DOCS / "api").glob("*.md")))
    with_members = ("nn", "functional", "mc", "metrics", "diagnostics", "schedules", "kernels")
    for name in ("dropkit", *(f"dropkit.{module}" for module in with_members)):
        assert re.search(rf"^\.\. automodule:: {re.escape(name)}\n   :members:", text, re.M), name
    for name in ("dropkit.engine", "dropkit.interop"):
        assert re.search(rf"^\.\. automodule:: {re.escape(name)}$", text, re.M), name
