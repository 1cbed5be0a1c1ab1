"""Root conftest: names available to the docstring examples that pytest runs as doctests."""

from typing import Any

import pytest
import torch

import dropkit


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict[str, Any]) -> None:
    doctest_namespace["torch"] = torch
    doctest_namespace["dropkit"] = dropkit
