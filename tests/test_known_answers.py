"""Every random op and layer reproduces the bits pinned before the issue-12 refactor
(tests/known_answers.py), on the fused kernels and on the reference engine."""

from __future__ import annotations

import json

import pytest

import dropkit
from tests.known_answers import DATA, cases, digest

PINNED: dict[str, str] = json.loads(DATA.read_text())
CASES = cases()


def test_every_case_is_pinned() -> None:
    assert sorted(CASES) == sorted(PINNED)


@pytest.mark.parametrize("engine", ["kernels", "reference"])
@pytest.mark.parametrize("name", sorted(PINNED))
def test_known_answer(name: str, engine: str) -> None:
    with dropkit.use_reference_engine(engine == "reference"):
        got = digest(CASES[name]())
    assert got == PINNED[name], f"{name} on the {engine} engine changed its bits"
