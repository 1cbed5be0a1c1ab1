"""``dropkit reproduce``: the published claims about dropout, reproduced on one command.

Every experiment is a module of this package that defines ``EXPERIMENT``, an
:class:`~dropkit.experiments.reproduce.api.Experiment` (the contract is in :mod:`.api`).
:data:`EXPERIMENT_MODULES` registers them, in report order; :func:`get_experiment` imports one
on demand, so that an experiment whose optional dependency is missing (or whose module is
broken) fails alone and never keeps the others from running.  :mod:`.runner` runs them,
:mod:`.report` writes the combined report and :mod:`.cli` is ``dropkit reproduce``.

Example:
    >>> names()[:3]
    ('mnist-mlp', 'ensemble-vs-scaling', 'rate-and-size')
    >>> get_experiment("no-such-thing")
    Traceback (most recent call last):
    ...
    ValueError: experiment must be one of mnist-mlp, ..., sparse-vd, got 'no-such-thing'
"""

from __future__ import annotations

import importlib

from dropkit.experiments.reproduce.api import Experiment

__all__ = ["EXPERIMENT_MODULES", "PACKAGE", "get_experiment", "names"]

#: The package whose modules hold the experiments.
PACKAGE = __name__
#: Every experiment: command-line name -> module of this package defining ``EXPERIMENT``, in the
#: order of the report.
EXPERIMENT_MODULES: dict[str, str] = {
    "mnist-mlp": "mnist_mlp",
    "ensemble-vs-scaling": "ensemble_vs_scaling",
    "rate-and-size": "rate_and_size",
    "coadaptation": "coadaptation",
    "variance-shift": "variance_shift",
    "adaptive-l2": "adaptive_l2",
    "conv-variants": "conv_variants",
    "early-late": "early_late",
    "alpha-selu": "alpha_selu",
    "mc-uncertainty": "mc_uncertainty",
    "concrete-rate": "concrete_rate",
    "uci": "uci_table",
    "sparse-vd": "sparse_vd",
}


def names() -> tuple[str, ...]:
    """The registered experiment names, in report order."""
    return tuple(EXPERIMENT_MODULES)


def get_experiment(name: str) -> Experiment:
    """Import the module of experiment ``name`` and return its ``EXPERIMENT``.

    Args:
        name: a registered name (:func:`names`).

    Returns:
        The experiment.

    Raises:
        ValueError: ``name`` is not registered (the message lists the names).
        ImportError: the module, or something it needs, cannot be imported (propagated as is:
            :exc:`ModuleNotFoundError` names the missing module).
        TypeError: the module has no ``EXPERIMENT``, it is not an ``Experiment``, or it carries
            another name.
    """
    if name not in EXPERIMENT_MODULES:
        raise ValueError(f"experiment must be one of {', '.join(EXPERIMENT_MODULES)}, got {name!r}")
    module_name = f"{PACKAGE}.{EXPERIMENT_MODULES[name]}"
    module = importlib.import_module(module_name)
    experiment = getattr(module, "EXPERIMENT", None)
    if not isinstance(experiment, Experiment):
        found = "nothing" if experiment is None else type(experiment).__name__
        raise TypeError(f"{module_name}.EXPERIMENT must be an Experiment, got {found}")
    if experiment.name != name:
        raise TypeError(f"{module_name}.EXPERIMENT is named {experiment.name!r}, registered as {name!r}")
    return experiment
