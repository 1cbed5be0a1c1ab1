"""The calling convention of the README, checked on every public op and layer by signature.

* A functional op of ``dropkit.functional.__all__`` takes ``(input, p, training=True,
  inplace=False, *, options..., seed=None, generator=None)``.
* A random layer of ``dropkit.nn.__all__`` has ``forward(input, *, seed=None, generator=None)``;
  its constructor is ``(p, inplace=False, *, options...)``, or, for a wrapper, the wrapped module
  first, as ``module``; where it has a functional twin, the two agree on the rate's default and
  on the defaults of the options they share.

Every departure is listed below with its reason.  A new op or layer that departs without being
listed fails here; so does a listed exception that no longer departs (remove it from the list).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

import dropkit
from dropkit import functional as F
from dropkit.nn._base import _RandomLayer

EMPTY = inspect.Parameter.empty
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY

# --- functional ops ---------------------------------------------------------------------------------

#: Public functions that are not random ops on a tensor: nothing to check.
FUNCTIONAL_HELPERS = {
    "alpha_dropout_coefficients": "the affine constants of a rate: a pure function of p",
    "gaussian_dropout_std": "the noise std of a rate: a pure function of p",
    "stochastic_depth_rates": "a per-block rate schedule: a list of floats",
}

#: Random ops whose signature departs from ``(input, p, training=True, inplace=False, *, ...,
#: seed=None, generator=None)``, and why.
FUNCTIONAL_EXCEPTIONS = {
    # Several tensor inputs: the extra ones come before the rate, and the output is a new tensor
    # (a sum, a lookup, a mix of two states), so there is no in-place form.
    "residual_dropout": "two tensor inputs (input, residual); the output is a new sum: no inplace",
    "bias_dropout_add": "deprecated alias of residual_dropout in its former (input, bias, residual) order",
    "embedding_dropout": "two tensor inputs (ids, weight); the output is a lookup: no inplace",
    "zoneout": "two tensor inputs (prev, new); the output mixes them: no inplace",
    "zoneout_states": "sequences of states and one rate per state",
    "moment_matching_linear": "DropConnect's inference (input, weight, bias, p, activation)",
    # torch's own signature, kept so that it is a drop-in replacement.
    "scaled_dot_product_attention": "torch's (query, key, value, attn_mask, dropout_p, ...); training=",
    # No training flag or no in-place form for a reason of the op itself.
    "concrete_dropout": "the rate is a learned logit tensor, differentiated through: no inplace",
    "drop_connect_weight": "drops a weight: no training flag (its module decides), no inplace",
    "word_dropout": "integer ids in, integer ids out: no inplace form",
}

#: The name of the rate where it is not ``p``.
RATE_NAMES = {"gaussian_noise": "std"}


def _functionals() -> list[str]:
    return sorted(name for name in F.__all__ if name not in FUNCTIONAL_HELPERS)


def _departures_of_functional(name: str) -> list[str]:
    parameters = list(inspect.signature(getattr(F, name)).parameters.values())
    positional = [p for p in parameters if p.kind in POSITIONAL]
    keyword = {p.name: p for p in parameters if p.kind == KEYWORD_ONLY}
    rate = RATE_NAMES.get(name, "p")
    problems = []
    if [p.name for p in positional] != ["input", rate, "training", "inplace"]:
        problems.append(f"positional parameters {[p.name for p in positional]}")
    else:
        defaults = [p.default for p in positional]
        if defaults[0] is not EMPTY or defaults[1] is EMPTY or defaults[2:] != [True, False]:
            problems.append(
                f"defaults {positional}: want (input, {rate}=<rate>, training=True, inplace=False)"
            )
    for option in ("seed", "generator"):
        if option not in keyword or keyword[option].default is not None:
            problems.append(f"no keyword-only {option}=None")
    return problems


@pytest.mark.parametrize("name", _functionals())
def test_functional_signature(name: str) -> None:
    problems = _departures_of_functional(name)
    if name in FUNCTIONAL_EXCEPTIONS:
        assert problems, f"{name} now follows the convention: remove it from FUNCTIONAL_EXCEPTIONS"
    else:
        assert not problems, f"{name} departs from the convention: {problems}"


@pytest.mark.parametrize("name", _functionals())
def test_every_functional_defaults_to_training_and_takes_seed_and_generator(name: str) -> None:
    # What no exception may break: the mode defaults to training, and the key is overridable.
    parameters = inspect.signature(getattr(F, name)).parameters
    if "training" in parameters:
        assert parameters["training"].default is True
    for option in ("seed", "generator"):
        assert parameters[option].kind == KEYWORD_ONLY
        assert parameters[option].default is None


def test_exception_lists_name_public_functions() -> None:
    assert set(FUNCTIONAL_EXCEPTIONS) | set(FUNCTIONAL_HELPERS) <= set(F.__all__)


# --- modules -------------------------------------------------------------------------------------

#: Public names of dropkit.nn that are not random layers (no stream, no per-call key).
NN_NOT_RANDOM_LAYERS = {
    "KLWarmup": "a schedule of the KL weight",
    "TokenAndPositionEmbedding": "a composite: its Dropout carries the per-call overrides",
    "TransformerEncoderBlock": "a composite: its dropout layers carry the per-call overrides",
    "concrete_regularizers": "a function",
    "regularization_loss": "a function",
    "sparsity_report": "a function",
}

#: Random layers whose ``forward`` takes more than ``(input, *, seed=None, generator=None)``.
FORWARD_EXCEPTIONS = {
    "ResidualDropout": "(input, residual, bias=None): the residual add is part of the op",
    "BiasDropoutAdd": "deprecated alias of ResidualDropout: (input, bias, residual)",
    "ScaledDotProductAttention": "torch's (query, key, value, attn_mask, is_causal, scale, enable_gqa)",
    "LockedDropout": "(input, padding_mask=None): padded sequences share no mask with padding",
    "ZoneoutCell": "(input, hx=None): a recurrent cell's step",
    "WeightDrop": "(*args, **kwargs): whatever the wrapped module takes",
}

#: Wrappers: the wrapped module comes first, named ``module``.
WRAPPERS = {
    "ConcreteDropout",
    "DropConnect",
    "EmbeddingDropout",
    "StochasticDepth",
    "WeightDrop",
    "ZoneoutCell",
}

#: Random layers whose constructor departs from ``(p, inplace=False, *, options...)``, and why.
CONSTRUCTOR_EXCEPTIONS = {
    **{name: "a wrapper: the wrapped module first, then its rate" for name in WRAPPERS},
    "LayerDrop": "a wrapper of a sequence: `layers` first (nn.Module.modules is a method)",
    "ResidualDropout": "no in-place form (the output is a new sum)",
    "BiasDropoutAdd": "deprecated alias of ResidualDropout",
    "ScaledDotProductAttention": "no in-place form (attention makes a new tensor)",
    "VariationalLinear": "a layer with learned rates, built like torch.nn.Linear",
    "VariationalConv1d": "a layer with learned rates, built like torch.nn.Conv1d",
    "VariationalConv2d": "a layer with learned rates, built like torch.nn.Conv2d",
    "VariationalConv3d": "a layer with learned rates, built like torch.nn.Conv3d",
    "SparseVariationalLinear": "a layer with learned rates, built like torch.nn.Linear",
    "SparseVariationalConv1d": "a layer with learned rates, built like torch.nn.Conv1d",
    "SparseVariationalConv2d": "a layer with learned rates, built like torch.nn.Conv2d",
    "SparseVariationalConv3d": "a layer with learned rates, built like torch.nn.Conv3d",
}

#: A layer and its functional twin: they must agree on the defaults of the rate and of shared options.
TWINS: dict[str, Callable[..., Any]] = {
    "Dropout": F.dropout,
    "Dropout1d": F.dropout1d,
    "Dropout2d": F.dropout2d,
    "Dropout3d": F.dropout3d,
    "AlphaDropout": F.alpha_dropout,
    "FeatureAlphaDropout": F.feature_alpha_dropout,
    "GaussianDropout": F.gaussian_dropout,
    "GaussianNoise": F.gaussian_noise,
    "DropBlock1d": F.drop_block1d,
    "DropBlock2d": F.drop_block2d,
    "DropBlock3d": F.drop_block3d,
    "DropPath": F.drop_path,
    "StochasticDepth": F.drop_path,
    "LockedDropout": F.locked_dropout,
    "EmbeddingDropout": F.embedding_dropout,
    "ZoneoutCell": F.zoneout,
    "ResidualDropout": F.residual_dropout,
    "BiasDropoutAdd": F.bias_dropout_add,
    "DropConnect": F.drop_connect_weight,
}

#: Twins whose rate defaults differ on purpose.
RATE_DEFAULT_EXCEPTIONS = {
    "AttentionDropout": "Dropout under its placement's name, with Vaswani et al.'s 0.1 (dropout: 0.5)",
    "ScaledDotProductAttention": "the module's 0.1 is Vaswani et al.'s; the functional keeps torch's 0.0",
}
TWINS.update({"AttentionDropout": F.dropout, "ScaledDotProductAttention": F.scaled_dot_product_attention})


def _random_layers() -> list[str]:
    return sorted(name for name in dropkit.nn.__all__ if name not in NN_NOT_RANDOM_LAYERS)


def test_every_public_layer_is_classified() -> None:
    for name in dropkit.nn.__all__:
        value = getattr(dropkit.nn, name)
        is_random_layer = isinstance(value, type) and issubclass(value, _RandomLayer)
        assert is_random_layer == (name not in NN_NOT_RANDOM_LAYERS), (
            f"{name}: a random layer derives from _RandomLayer and is checked here; anything else "
            "is listed in NN_NOT_RANDOM_LAYERS with a reason"
        )
    listed = set(FORWARD_EXCEPTIONS) | set(CONSTRUCTOR_EXCEPTIONS) | set(TWINS) | WRAPPERS
    assert listed <= set(_random_layers())


def _forward_departures(cls: type[nn.Module]) -> list[str]:
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # self
    problems = []
    positional = [p.name for p in parameters if p.kind in POSITIONAL]
    if positional != ["input"]:
        problems.append(f"positional parameters {positional}")
    if any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in parameters):
        problems.append("variadic parameters")
    return problems


@pytest.mark.parametrize("name", _random_layers())
def test_forward_signature(name: str) -> None:
    cls = getattr(dropkit.nn, name)
    parameters = inspect.signature(cls.forward).parameters
    for option in ("seed", "generator"):  # no exception: every random layer takes both
        assert option in parameters, f"{name}.forward has no {option}"
        assert parameters[option].kind == KEYWORD_ONLY
        assert parameters[option].default is None
    problems = _forward_departures(cls)
    if name in FORWARD_EXCEPTIONS:
        assert problems, f"{name}.forward now follows the convention: remove it from FORWARD_EXCEPTIONS"
    else:
        assert not problems, f"{name}.forward departs from the convention: {problems}"


def _constructor_departures(name: str, cls: type[nn.Module]) -> list[str]:
    parameters = list(inspect.signature(cls).parameters.values())
    positional = [p for p in parameters if p.kind in POSITIONAL]
    rate = RATE_NAMES.get(TWINS[name].__name__, "p") if name in TWINS else "p"
    problems = []
    if [p.name for p in positional] != [rate, "inplace"]:
        problems.append(f"positional parameters {[p.name for p in positional]}")
    elif positional[0].default is EMPTY or positional[1].default is not False:
        problems.append(f"defaults {positional[0]}, {positional[1]}")
    return problems


@pytest.mark.parametrize("name", _random_layers())
def test_constructor_signature(name: str) -> None:
    cls = getattr(dropkit.nn, name)
    first = next(iter(inspect.signature(cls).parameters))
    if name in WRAPPERS:
        assert first == "module", f"{name} must take the wrapped module as `module`, got {first!r}"
    problems = _constructor_departures(name, cls)
    if name in CONSTRUCTOR_EXCEPTIONS:
        assert problems, f"{name}() now follows the convention: remove it from CONSTRUCTOR_EXCEPTIONS"
    else:
        assert not problems, f"{name}() departs from the convention: {problems}"


@pytest.mark.parametrize("name", sorted(TWINS))
def test_layer_and_functional_twin_agree_on_defaults(name: str) -> None:
    layer = inspect.signature(getattr(dropkit.nn, name)).parameters
    functional = inspect.signature(TWINS[name]).parameters
    rate = RATE_NAMES.get(TWINS[name].__name__, "p")
    functional_rate = "dropout_p" if TWINS[name] is F.scaled_dot_product_attention else rate
    same = layer[rate].default == functional[functional_rate].default
    if name in RATE_DEFAULT_EXCEPTIONS:
        assert not same, f"{name} now agrees with its functional: remove it from RATE_DEFAULT_EXCEPTIONS"
    else:
        assert same, f"{name}({rate}={layer[rate].default}) but {TWINS[name].__name__}({functional[rate]})"
    shared = (set(layer) & set(functional)) - {rate, "input", "training", "seed", "generator"}
    for option in sorted(shared):
        assert layer[option].default == functional[option].default, (
            f"{name}({option}={layer[option].default!r}) but "
            f"{TWINS[name].__name__}({option}={functional[option].default!r})"
        )
    if "inplace" in layer and "inplace" in functional:
        assert layer["inplace"].kind in POSITIONAL
        assert functional["inplace"].kind in POSITIONAL
