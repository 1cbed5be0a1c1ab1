"""Registration is the test: every random layer of ``dropkit.nn.__all__`` and every random op of
``dropkit.functional.__all__`` must be registered in tests/layer_specs.py, where the contract
battery of tests/test_layer_contract.py runs on it.  A new layer or op that is not registered
fails here; so does an entry of the lists below that is stale.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import dropkit
from dropkit import functional as F
from dropkit.nn._base import _RandomLayer
from tests.layer_specs import SPECS

#: Public names of dropkit.nn that draw no randomness themselves, and why.
NN_NOT_RANDOM = {
    "KLWarmup": "a schedule of the KL weight (a plain object)",
    "concrete_regularizers": "a function: the regularizer weights of Gal et al.",
    "regularization_loss": "a function: sums the layers' regularization terms",
    "sparsity_report": "a function: reads the pruning masks",
}

#: Deprecated aliases: covered through what they alias (bit for bit, test_deprecations.py); they
#: warn when used, which the harness (warnings are errors) would have to silence everywhere.
NN_DEPRECATED = {
    "BiasDropoutAdd": "ResidualDropout with the former (input, bias, residual) order",
}

#: Public names of dropkit.functional that draw no randomness, and why.
FUNCTIONAL_NOT_RANDOM = {
    "alpha_dropout_coefficients": "the affine constants of a rate: a pure function of p",
    "gaussian_dropout_std": "the noise std of a rate: a pure function of p",
    "stochastic_depth_rates": "a per-block rate schedule: a list of floats",
}

FUNCTIONAL_DEPRECATED = {
    "bias_dropout_add": "residual_dropout(input, residual, p, training, bias=bias)",
}


def registered_classes() -> set[type[nn.Module]]:
    return {type(spec.make(spec.rate)) for spec in SPECS}


def registered_ops() -> set[object]:
    return {spec.functional.op for spec in SPECS if spec.functional is not None}


def public(module: object) -> list[tuple[str, object]]:
    return [(name, getattr(module, name)) for name in module.__all__]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "value"),
    [item for item in public(dropkit.nn) if item[0] not in NN_NOT_RANDOM | NN_DEPRECATED.keys()],
)
def test_every_random_layer_is_registered(name: str, value: object) -> None:
    assert isinstance(value, type), (
        f"dropkit.nn.{name} is not a class: list it in NN_NOT_RANDOM with the reason"
    )
    assert issubclass(value, nn.Module), f"dropkit.nn.{name} is not a module: list it in NN_NOT_RANDOM"
    assert value in registered_classes(), (
        f"dropkit.nn.{name} is a random layer that no spec of tests/layer_specs.py builds: register "
        "it (module factory, inputs, functional, probe, flags) to give it the contract battery"
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [item for item in public(F) if item[0] not in FUNCTIONAL_NOT_RANDOM | FUNCTIONAL_DEPRECATED.keys()],
)
def test_every_random_op_is_registered(name: str, value: object) -> None:
    assert value in registered_ops(), (
        f"dropkit.functional.{name} is a random op that no spec of tests/layer_specs.py calls: "
        "register it as a spec's functional"
    )


def test_every_random_layer_class_is_classified() -> None:
    # A class holding an RNG stream cannot be listed as drawing nothing.
    for name, value in public(dropkit.nn):
        if isinstance(value, type) and issubclass(value, _RandomLayer):
            assert name not in NN_NOT_RANDOM, f"dropkit.nn.{name} draws masks: register it"
    for name in NN_NOT_RANDOM:
        value = getattr(dropkit.nn, name)
        assert not (isinstance(value, type) and issubclass(value, nn.Module)), f"{name} is a module"


def test_non_random_ops_take_no_randomness() -> None:
    for name in FUNCTIONAL_NOT_RANDOM:
        parameters = inspect.signature(getattr(F, name)).parameters
        assert "seed" not in parameters, f"{name} draws: register it"
        assert "generator" not in parameters, f"{name} draws: register it"


def test_the_deprecated_aliases_left_out_are_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="BiasDropoutAdd.*deprecated"):
        dropkit.nn.BiasDropoutAdd(0.1)
    x = torch.ones(2, 3)
    with pytest.warns(DeprecationWarning, match="bias_dropout_add.*deprecated"):
        F.bias_dropout_add(x, torch.zeros(3), x, 0.1, seed=0)


def test_the_lists_are_not_stale() -> None:
    for listed, module in (
        (NN_NOT_RANDOM | NN_DEPRECATED, dropkit.nn),
        (FUNCTIONAL_NOT_RANDOM | FUNCTIONAL_DEPRECATED, F),
    ):
        missing = set(listed) - set(module.__all__)  # type: ignore[attr-defined]
        assert not missing, f"listed but no longer public: {sorted(missing)}"
    registered = registered_classes()
    for name in NN_NOT_RANDOM | NN_DEPRECATED:
        assert getattr(dropkit.nn, name) not in registered, f"{name} is listed and registered"
    ops = registered_ops()
    for name in FUNCTIONAL_NOT_RANDOM | FUNCTIONAL_DEPRECATED:
        assert getattr(F, name) not in ops, f"{name} is listed and registered"


def test_every_spec_builds_a_public_class() -> None:
    public_classes = {value for _, value in public(dropkit.nn)}
    for spec in SPECS:
        assert type(spec.make(spec.rate)) in public_classes, f"{spec.name} builds a private class"
