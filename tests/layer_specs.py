"""The registry of random layers that the contract tests run against.

Registering a layer here gives it the whole battery of tests/test_layer_contract.py: identities,
value sets, drop rates, expectation preservation, gradients, gradcheck, layouts, dtypes,
serialization and argument checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import dropkit
from dropkit import functional as F
from dropkit.functional.alpha import SELU_ALPHA_PRIME, alpha_dropout_coefficients


@dataclass(frozen=True)
class LayerSpec:
    name: str
    module: Callable[..., nn.Module]
    functional: Callable[..., torch.Tensor]
    shape: tuple[int, ...]
    # Dims over which one draw is shared (the mask is constant along them).
    shared_dims: tuple[int, ...] = ()
    # "bernoulli": outputs are drop_value or keep_scale * x + keep_shift; "gaussian": noise.
    kind: str = "bernoulli"
    kwargs: dict[str, Any] = field(default_factory=dict)
    rate_arg: str = "p"

    def make(self, rate: float, **extra: Any) -> nn.Module:
        return self.module(**{self.rate_arg: rate}, **self.kwargs, **extra)

    def call(self, x: torch.Tensor, rate: float, **extra: Any) -> torch.Tensor:
        return self.functional(x, rate, **self.kwargs, **extra)


def affine(spec: LayerSpec, p: float) -> tuple[float, float, float]:
    """(keep_scale, keep_shift, drop_value) of a Bernoulli layer at drop rate p."""
    if spec.name.startswith(("AlphaDropout", "FeatureAlphaDropout")):
        a, b = alpha_dropout_coefficients(p)
        return a, b, a * SELU_ALPHA_PRIME + b
    return 1.0 / (1.0 - p), 0.0, 0.0


BERNOULLI_SPECS = [
    LayerSpec("Dropout", dropkit.nn.Dropout, F.dropout, (64, 48)),
    LayerSpec(
        "Dropout[time-tied]",
        dropkit.nn.Dropout,
        F.dropout,
        (12, 40, 16),
        shared_dims=(0,),
        kwargs={"broadcast_dims": (0,)},
    ),
    LayerSpec("Dropout1d", dropkit.nn.Dropout1d, F.dropout1d, (40, 24, 5), shared_dims=(2,)),
    LayerSpec(
        "Dropout1d[channels_last]",
        dropkit.nn.Dropout1d,
        F.dropout1d,
        (40, 5, 24),
        shared_dims=(1,),
        kwargs={"channels_last": True},
    ),
    LayerSpec("Dropout2d", dropkit.nn.Dropout2d, F.dropout2d, (32, 30, 3, 4), shared_dims=(2, 3)),
    LayerSpec(
        "Dropout2d[channels_last]",
        dropkit.nn.Dropout2d,
        F.dropout2d,
        (32, 3, 4, 30),
        shared_dims=(1, 2),
        kwargs={"channels_last": True},
    ),
    LayerSpec("Dropout3d", dropkit.nn.Dropout3d, F.dropout3d, (24, 40, 2, 3, 2), shared_dims=(2, 3, 4)),
    LayerSpec(
        "Dropout3d[channels_last]",
        dropkit.nn.Dropout3d,
        F.dropout3d,
        (24, 2, 3, 2, 40),
        shared_dims=(1, 2, 3),
        kwargs={"channels_last": True},
    ),
    LayerSpec("DropPath", dropkit.nn.DropPath, F.drop_path, (256, 6, 4), shared_dims=(1, 2)),
    LayerSpec("AlphaDropout", dropkit.nn.AlphaDropout, F.alpha_dropout, (64, 48)),
    LayerSpec(
        "FeatureAlphaDropout",
        dropkit.nn.FeatureAlphaDropout,
        F.feature_alpha_dropout,
        (32, 30, 3, 4),
        shared_dims=(2, 3),
    ),
]

GAUSSIAN_SPECS = [
    LayerSpec("GaussianDropout", dropkit.nn.GaussianDropout, F.gaussian_dropout, (64, 48), kind="gaussian"),
    LayerSpec(
        "GaussianNoise",
        dropkit.nn.GaussianNoise,
        F.gaussian_noise,
        (64, 48),
        kind="gaussian",
        rate_arg="std",
    ),
]

ALL_SPECS = BERNOULLI_SPECS + GAUSSIAN_SPECS


def ids(specs: list[LayerSpec]) -> list[str]:
    return [spec.name for spec in specs]
