"""Dropout sites: where a model drops something, what kind of dropout it is, and at what rate.

A *site* is one place in a model where dropout happens: a module (``torch.nn.Dropout``, a
dropkit layer, a timm / torchvision / Hugging Face drop-path or DropBlock module,
``torch.nn.MultiheadAttention``'s attention dropout, the between-layer dropout of a stacked
``torch.nn.LSTM``) or a functional call (``torch.nn.functional.dropout`` and its siblings,
``scaled_dot_product_attention`` with a rate) made from a module's forward, which only a traced
forward finds (see :mod:`dropkit.diagnostics.flow`).

Each site has a *variant*, the geometry of what it drops, which is what the rules of
:mod:`dropkit.diagnostics.rules` reason about:

============== ==================================================================================
``element``    one Bernoulli draw per element (``nn.Dropout``, ``F.dropout``)
``channel``    one draw per (sample, channel), spatial dropout (``Dropout1d/2d/3d``; Tompson 2015)
``alpha``      alpha dropout for SELU networks (Klambauer 2017); ``feature_alpha`` per channel
``gaussian``   multiplicative Gaussian noise of variance ``p/(1-p)`` (Srivastava 2014 §10)
``noise``      additive Gaussian noise (its rate is a standard deviation, not a probability)
``block``      DropBlock (Ghiasi 2018)
``path``       a whole residual branch per sample: DropPath / stochastic depth / LayerDrop
``locked``     one mask per sequence, tied over time (Gal & Ghahramani 2016)
``attention``  dropout of attention weights (inside SDPA, ``MultiheadAttention``, ...)
``residual``   dropout of a sub-layer's output fused with the residual add
``recurrent``  between the layers of a stacked ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``
``weight``     dropout of weights or embedding rows (DropConnect, weight drop, variational)
``zoneout``    zoneout of a recurrent state (Krueger 2016)
``learned``    concrete dropout: the rate is learned
``unknown``    a leaf module with "drop" in its class name that dropkit does not know
============== ==================================================================================

Foreign modules are recognised as :func:`dropkit.convert` recognises them (by module path and
class name, without importing timm, torchvision or ``transformers``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import dropkit.nn as dk_nn
from dropkit.nn._base import _RandomLayer
from dropkit.nn.foreign import TORCH_DROPOUT_MODULES, class_name, foreign_class, is_hf_drop_path

__all__ = ["UNIT_VARIANTS", "DropoutSite", "find_module_sites", "module_site"]

# Variants that drop units of an activation and hand the dropped tensor on as it is (the
# rules about what a dropout *feeds* apply to them).
UNIT_VARIANTS = frozenset(
    {"element", "channel", "alpha", "feature_alpha", "gaussian", "block", "locked", "unknown"}
)


@dataclass(frozen=True)
class DropoutSite:
    """One place where a model drops something.

    Attributes:
        path: qualified name of the module (``""`` for the model itself); for a functional
            call, the module whose forward made it.
        kind: ``"module"`` or ``"function"``.
        name: the class (``"torch.nn.Dropout"``) or function
            (``"torch.nn.functional.scaled_dot_product_attention"``).
        variant: what it drops; see :mod:`dropkit.diagnostics.sites`.
        rate: the drop probability, ``None`` when unknown (a functional call that passes ``0``
            in eval, from a module that holds no recognisable rate) or not a probability
            (additive noise, variational layers).
    """

    path: str
    kind: str
    name: str
    variant: str
    rate: float | None

    @property
    def label(self) -> str:
        """How reports name the site (the module path, plus the function for a functional call)."""
        where = self.path if self.path else "(model)"
        return where if self.kind == "module" else f"{where} [{self.name.rsplit('.', 1)[-1]}]"

    @property
    def active(self) -> bool:
        """Whether the site can drop anything (its rate is positive or unknown)."""
        return self.rate is None or self.rate > 0.0


def _float_rate(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    rate = float(value)
    return rate if 0.0 <= rate <= 1.0 else None


_DROPKIT_VARIANTS: tuple[tuple[type[nn.Module], str], ...] = (
    # Most specific first: AttentionDropout subclasses Dropout, BiasDropoutAdd ResidualDropout.
    (dk_nn.AttentionDropout, "attention"),
    (dk_nn.ScaledDotProductAttention, "attention"),
    (dk_nn.ResidualDropout, "residual"),
    (dk_nn.FeatureAlphaDropout, "feature_alpha"),
    (dk_nn.AlphaDropout, "alpha"),
    (dk_nn.DropBlock1d, "block"),
    (dk_nn.DropBlock2d, "block"),
    (dk_nn.DropBlock3d, "block"),
    (dk_nn.DropPath, "path"),
    (dk_nn.StochasticDepth, "path"),
    (dk_nn.LayerDrop, "path"),
    (dk_nn.GaussianDropout, "gaussian"),
    (dk_nn.GaussianNoise, "noise"),
    (dk_nn.LockedDropout, "locked"),
    (dk_nn.Dropout1d, "channel"),
    (dk_nn.Dropout2d, "channel"),
    (dk_nn.Dropout3d, "channel"),
    (dk_nn.ConcreteDropout, "learned"),
    (dk_nn.ZoneoutCell, "zoneout"),
    (dk_nn.DropConnect, "weight"),
    (dk_nn.WeightDrop, "weight"),
    (dk_nn.EmbeddingDropout, "weight"),
    (dk_nn.VariationalLinear, "weight"),
    (dk_nn.VariationalConv1d, "weight"),
    (dk_nn.VariationalConv2d, "weight"),
    (dk_nn.VariationalConv3d, "weight"),
    (dk_nn.SparseVariationalLinear, "weight"),
    (dk_nn.SparseVariationalConv1d, "weight"),
    (dk_nn.SparseVariationalConv2d, "weight"),
    (dk_nn.SparseVariationalConv3d, "weight"),
    (dk_nn.Dropout, "element"),
)
_TORCH_VARIANTS: dict[type[nn.Module], str] = {
    nn.Dropout: "element",
    nn.Dropout1d: "channel",
    nn.Dropout2d: "channel",
    nn.Dropout3d: "channel",
    nn.AlphaDropout: "alpha",
    nn.FeatureAlphaDropout: "feature_alpha",
}
_UNKNOWN_RATE_ATTRIBUTES = ("p", "drop_prob", "drop_rate", "rate", "dropout")


def _dropkit_site(module: nn.Module) -> tuple[str, float | None] | None:
    for cls, variant in _DROPKIT_VARIANTS:
        if isinstance(module, cls):
            dims: object = getattr(module, "broadcast_dims", None)
            if variant == "element" and dims:
                variant = "locked"  # one draw shared along the listed dims (a time-tied mask)
            if variant == "noise":
                return variant, None
            return variant, _float_rate(getattr(module, "p", None))
    if isinstance(module, _RandomLayer):
        return "unknown", _float_rate(getattr(module, "p", None))
    return None


def module_site(module: nn.Module) -> tuple[str, str, float | None] | None:
    """``(class name, variant, rate)`` when ``module`` is a dropout site, else ``None``.

    Args:
        module: any module.

    Returns:
        The class as reports write it, the variant (see :mod:`dropkit.diagnostics.sites`) and
        the rate (``None`` when unknown), or ``None`` for a module that drops nothing itself.

    Example::

        >>> import torch, dropkit
        >>> from dropkit.diagnostics.sites import module_site
        >>> module_site(torch.nn.Dropout2d(0.2))
        ('torch.nn.Dropout2d', 'channel', 0.2)
        >>> module_site(dropkit.nn.Dropout(0.3, broadcast_dims=0))
        ('dropkit.nn.Dropout', 'locked', 0.3)
        >>> module_site(torch.nn.Linear(2, 2)) is None
        True
    """
    name = class_name(type(module))
    found = _dropkit_site(module)
    if found is not None:
        return name, found[0], found[1]
    if isinstance(module, TORCH_DROPOUT_MODULES):
        base = next(base for base in type(module).__mro__ if base in _TORCH_VARIANTS)
        return name, _TORCH_VARIANTS[base], _float_rate(getattr(module, "p", None))
    if isinstance(module, nn.MultiheadAttention):
        return name, "attention", _float_rate(module.dropout)
    if isinstance(module, nn.RNNBase):
        if module.num_layers > 1 and module.dropout > 0:
            return name, "recurrent", _float_rate(module.dropout)
        return None
    for path, cls_name, variant in (
        ("timm.layers.drop", "DropPath", "path"),
        ("timm.layers.drop", "DropBlock2d", "block"),
        ("torchvision.ops.stochastic_depth", "StochasticDepth", "path"),
    ):
        if foreign_class(module, path, cls_name):
            rate = _float_rate(getattr(module, "drop_prob", getattr(module, "p", None)))
            if cls_name == "DropBlock2d" and rate is not None:
                rate = _float_rate(rate * float(getattr(module, "gamma_scale", 1.0)))
            return name, variant, rate
    if is_hf_drop_path(module):
        return name, "path", _float_rate(getattr(module, "drop_prob", None))
    if "drop" in type(module).__name__.lower() and not module._modules:
        for attribute in _UNKNOWN_RATE_ATTRIBUTES:
            rate = _float_rate(getattr(module, attribute, None))
            if rate is not None:
                return name, "unknown", rate
        return name, "unknown", None
    return None


def find_module_sites(model: nn.Module) -> dict[nn.Module, DropoutSite]:
    """Every module of ``model`` that is a dropout site, in ``named_modules()`` order.

    Args:
        model: the model.

    Returns:
        ``module -> site``; a module shared by several parents appears once, under its first name.

    Example::

        >>> import torch
        >>> from dropkit.diagnostics.sites import find_module_sites
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
        >>> [site.label for site in find_module_sites(model).values()]
        ['1']
    """
    sites: dict[nn.Module, DropoutSite] = {}
    for path, module in model.named_modules():
        found = module_site(module)
        if found is not None:
            sites[module] = DropoutSite(path, "module", found[0], found[1], found[2])
    return sites
