r"""Activation statistics at each dropout site, with dropout off (eval) and on (MC mode).

For every dropout module that drops units of an activation (element, channel, alpha, Gaussian,
block and locked dropout), :func:`measure_activations` records the module's output over a batch
in eval mode (dropout off: the activation the next layer sees at test time) and with every
dropout of the model on (:func:`dropkit.mc_predict`, BatchNorm in eval: what it sees while
training), and reports for each the mean activation, the mean absolute activation, the fraction
of exact zeros and a histogram on common bins.  A model whose activations are not finite (one
that diverged in training) is measured too: the statistics are taken over the finite elements
and ``nonfinite_fraction`` says how many were NaN or infinite, layer by layer.

With inverted dropout at rate :math:`p`, the site's own mask keeps the expected mean and turns
a fraction :math:`p` of the non-zero units into zeros: the zero fraction goes from
:math:`z_0` to :math:`z_0 + p (1 - z_0)` (dropout upstream changes the input too).

The co-adaptation signature of Srivastava et al. (2014, Fig. 7 and 8) is a comparison of two
*trained* networks: the hidden units of a ReLU autoencoder trained with dropout are sparser
(mean activation about 0.7 against about 2.0 without, on MNIST), with fewer units active per
input.  Run this on a model trained with and one trained without dropout and compare the eval
columns.  Functional dropout calls have no module to hook and are not measured.

Reference: Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
Overfitting", JMLR 2014, §7.2 and Fig. 7-8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dropkit._validation import check_int
from dropkit.diagnostics._calls import eval_forward, first_float_tensor, mc_samples
from dropkit.diagnostics.sites import find_module_sites

__all__ = ["MEASURED_VARIANTS", "ActivationStats", "activation_summary", "measure_activations"]

MEASURED_VARIANTS = frozenset({"element", "channel", "alpha", "feature_alpha", "gaussian", "block", "locked"})


@dataclass(frozen=True)
class ActivationStats:
    """Statistics of one dropout site's output, dropout off and on.

    Attributes:
        site: the site's label (module path).
        rate: its drop rate.
        eval: summary with dropout off: ``mean``, ``mean_abs``, ``std``, ``zero_fraction`` and
            ``nonfinite_fraction`` (see :func:`activation_summary`).
        dropout: the same with every dropout on (averaged over the passes).
        edges: the common histogram bin edges, ``(bins + 1,)``.
        eval_histogram: fraction of elements per bin, dropout off (of all elements: the bins hold
            the finite ones, and sum to ``1 - nonfinite_fraction``).
        dropout_histogram: fraction of elements per bin, dropout on.
        count: elements per pass.
    """

    site: str
    rate: float | None
    eval: dict[str, float]
    dropout: dict[str, float]
    edges: torch.Tensor
    eval_histogram: torch.Tensor
    dropout_histogram: torch.Tensor
    count: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "site": self.site,
            "rate": self.rate,
            "eval": dict(self.eval),
            "dropout": dict(self.dropout),
            "edges": self.edges.tolist(),
            "eval_histogram": self.eval_histogram.tolist(),
            "dropout_histogram": self.dropout_histogram.tolist(),
            "count": self.count,
        }


def activation_summary(values: torch.Tensor) -> dict[str, float]:
    """``mean``, ``mean_abs``, ``std`` (population) and ``zero_fraction`` of a tensor's finite
    elements, and ``nonfinite_fraction``, the fraction of its elements that are NaN or infinite.

    The first four are NaN only when no element is finite (``nonfinite_fraction`` 1): a diverged
    activation is reported as such, not as a statistic of its NaNs.

    Example::

        >>> activation_summary(torch.tensor([0.0, 2.0, 0.0, 2.0]))
        {'mean': 1.0, 'mean_abs': 1.0, 'std': 1.0, 'zero_fraction': 0.5, 'nonfinite_fraction': 0.0}
        >>> activation_summary(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))["nonfinite_fraction"]
        0.5
    """
    if values.numel() == 0:
        raise ValueError("cannot summarize an empty tensor")
    finite = _finite(values)
    if finite.numel() == 0:
        nan = float("nan")
        return {"mean": nan, "mean_abs": nan, "std": nan, "zero_fraction": nan, "nonfinite_fraction": 1.0}
    return {
        "mean": float(finite.mean()),
        "mean_abs": float(finite.abs().mean()),
        "std": float(finite.std(correction=0)),
        "zero_fraction": float((finite == 0).to(torch.float64).mean()),
        "nonfinite_fraction": 1.0 - finite.numel() / values.numel(),
    }


def _finite(values: torch.Tensor) -> torch.Tensor:
    flat = values.detach().reshape(-1).to(torch.float64)
    return flat[torch.isfinite(flat)]


def _histogram(finite: torch.Tensor, total: int, edges: torch.Tensor) -> torch.Tensor:
    """Fractions of all ``total`` elements per bin, of which ``finite`` are the finite ones (the
    non-finite fall in no bin)."""
    counts = torch.histc(finite, bins=edges.numel() - 1, min=float(edges[0]), max=float(edges[-1]))
    return counts / max(total, 1)


def measure_activations(
    model: nn.Module, inputs: Any, *, repeats: int = 1, bins: int = 30, seed: int = 0
) -> list[ActivationStats]:
    """Activation statistics of every unit-dropping module site; see the module docstring.

    Args:
        model: the model.
        inputs: a batch: a tensor, a tuple of positional inputs or a mapping of keyword inputs.
        repeats: forwards with dropout on, pooled.
        bins: histogram bins.
        seed: seed of the dropout masks.

    Returns:
        One :class:`ActivationStats` per module site with a positive rate that the forward
        ran, in ``named_modules()`` order.

    Example::

        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5))
        >>> (stats,) = measure_activations(model, torch.randn(256, 8))
        >>> z0 = stats.eval["zero_fraction"]
        >>> abs(stats.dropout["zero_fraction"] - (z0 + 0.5 * (1 - z0))) < 0.02
        True
    """
    repeats = check_int(repeats, "repeats", 1)
    bins = check_int(bins, "bins", 1)
    sites = {
        module: site
        for module, site in find_module_sites(model).items()
        if site.variant in MEASURED_VARIANTS and site.rate
    }
    if not sites:
        return []
    captured: dict[nn.Module, list[torch.Tensor]] = {module: [] for module in sites}
    hooks = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor):
            captured[module].append(output.detach().clone())

    try:
        for module in sites:
            hooks.append(module.register_forward_hook(hook))
        eval_forward(model, inputs)
        eval_outputs = {module: tensors[0] for module, tensors in captured.items() if tensors}
        for tensors in captured.values():
            tensors.clear()
        mc_samples(model, inputs, repeats, seed, output=first_float_tensor)
    finally:
        for handle in hooks:
            handle.remove()

    results = []
    for module, site in sites.items():
        if module not in eval_outputs:
            continue
        off = eval_outputs[module]
        on = [tensor for tensor in captured[module] if tensor.shape == off.shape]
        if not on:
            continue
        pooled = torch.stack(on)
        # Bins over the finite values only (a diverged layer's NaN or inf has no place on them).
        off_finite, on_finite = _finite(off), _finite(pooled)
        finite = torch.cat([off_finite, on_finite])
        low = float(finite.min()) if finite.numel() else 0.0
        high = float(finite.max()) if finite.numel() else 1.0
        if high <= low:
            high = low + 1.0
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
        results.append(
            ActivationStats(
                site=site.label,
                rate=site.rate,
                eval=activation_summary(off),
                dropout=activation_summary(pooled),
                edges=edges,
                eval_histogram=_histogram(off_finite, off.numel(), edges),
                dropout_histogram=_histogram(on_finite, pooled.numel(), edges),
                count=off.numel(),
            )
        )
    return results
