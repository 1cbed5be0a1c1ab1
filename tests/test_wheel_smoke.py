"""The in-process checks of ``tests/wheel_smoke.py`` (which ``make wheel-smoke`` runs, with its
command-line checks, against the built wheel in a fresh virtual environment) hold in the
development environment too, so a change that breaks them fails here first."""

from __future__ import annotations

from tests import wheel_smoke


def test_installed_metadata() -> None:
    wheel_smoke.check_metadata()


def test_every_module_imports() -> None:
    assert wheel_smoke.check_imports() == []  # the test environment has every optional dependency


def test_layers_mc_and_diagnostics() -> None:
    wheel_smoke.check_layers()
    wheel_smoke.check_mc_and_diagnostics()
