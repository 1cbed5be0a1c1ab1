r"""The variance shift of dropout before BatchNorm (Li et al. 2019): predicted and measured.

A unit with mean :math:`c` and variance :math:`v` passed through inverted dropout with keep
probability :math:`q` has, while training,

.. math::

    \mathrm{Var}_{train} = \frac{c^2 + v}{q} - c^2 ,\qquad \mathrm{Var}_{test} = v ,\qquad
    \frac{\mathrm{Var}_{test}}{\mathrm{Var}_{train}} = \frac{q\,v}{v + (1 - q)\,c^2}

(:math:`= q` when :math:`c = 0`).  A BatchNorm after the dropout learns its running variance
on :math:`\mathrm{Var}_{train}` and then normalizes eval activations, whose variance is
:math:`\mathrm{Var}_{test}`, by it: they come out shrunk by the square root of the ratio.  The
same holds per channel for the statistics BatchNorm pools over the batch and spatial
positions, for element and channel (spatial) masks alike, and for Gaussian dropout of the same
variance :math:`p/(1-p)`: its multiplier also has :math:`E[\xi^2] = 1/q`, so it shifts the
variance exactly as much (only noise of smaller variance, such as Li et al.'s "Uout", shifts
it less).

:func:`measure_variance_shift` finds the BatchNorm layers fed directly by dropout (see
:mod:`dropkit.diagnostics.flow`), records each one's input over a batch in eval mode (dropout
off: :math:`c, v` per channel) and in ``repeats`` forwards with only the feeding dropout on
(:func:`dropkit.mc_predict`, BatchNorm in eval, so its statistics are not updated), and
reports the measured ratio per channel next to the prediction from the eval statistics.

Reference: Li, Chen, Hu, Yang, "Understanding the Disharmony between Dropout and Batch
Normalization by Variance Shift", CVPR 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dropkit._validation import check_int
from dropkit.diagnostics._calls import eval_forward, first_float_tensor, mc_samples
from dropkit.diagnostics.flow import Flow, trace_flow
from dropkit.diagnostics.sites import UNIT_VARIANTS, DropoutSite

__all__ = ["VarianceShift", "li_variance_ratio", "measure_variance_shift", "shift_pairs"]


def li_variance_ratio(mean: torch.Tensor | float, var: torch.Tensor | float, keep: float) -> torch.Tensor:
    r"""Li et al.'s ratio :math:`\mathrm{Var}_{test}/\mathrm{Var}_{train} = q v / (v + (1-q) c^2)`.

    Args:
        mean: the unit's mean :math:`c` (a float or a tensor, e.g. one value per channel).
        var: its variance :math:`v \ge 0` (same shape as ``mean`` or broadcastable).
        keep: the keep probability :math:`q = 1 - p`, in ``[0, 1]``.

    Returns:
        The ratio, a float64 tensor of the broadcast shape; ``1`` where the unit is constant
        (:math:`v = 0` and :math:`c = 0`) or nothing is dropped (:math:`q = 1`), ``0`` where a
        varying unit is always dropped (:math:`q = 0`).

    Raises:
        ValueError: ``keep`` is outside ``[0, 1]`` or a variance is negative.

    Example::

        >>> li_variance_ratio(0.0, 1.0, 0.5)  # c = 0: the ratio is q
        tensor(0.5000, dtype=torch.float64)
        >>> li_variance_ratio(1.0, 1.0, 0.5)  # 0.5 / (1 + 0.5)
        tensor(0.3333, dtype=torch.float64)
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 <= float(keep) <= 1.0:
        raise ValueError(f"keep must be a float in [0, 1], got {keep!r}")
    c = torch.as_tensor(mean, dtype=torch.float64)
    v = torch.as_tensor(var, dtype=torch.float64)
    if bool((v < 0).any()):
        raise ValueError("var must be >= 0, got a negative variance")
    q = float(keep)
    numerator = q * v
    denominator = v + (1.0 - q) * c.square()
    ratio = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, ratio, torch.ones_like(ratio))


@dataclass(frozen=True)
class VarianceShift:
    """The variance shift at one BatchNorm layer fed by dropout.

    Attributes:
        batchnorm: path of the BatchNorm module.
        sites: labels of the dropout sites that feed it.
        keep: the keep probability :math:`q` of those sites together (the product).
        mean: per-channel mean of the BatchNorm's input in eval (:math:`c`).
        var: per-channel variance of that input in eval (:math:`v`, over batch and space).
        train_var: per-channel variance with the dropout on, averaged over the repeats.
        measured: ``var / train_var`` per channel.
        predicted: Li et al.'s ratio per channel, from ``mean``, ``var`` and ``keep``.
        standard_error: per channel, of ``measured`` (spread over the repeats).
        repeats: how many dropout forwards were averaged.
    """

    batchnorm: str
    sites: tuple[str, ...]
    keep: float
    mean: torch.Tensor
    var: torch.Tensor
    train_var: torch.Tensor
    measured: torch.Tensor
    predicted: torch.Tensor
    standard_error: torch.Tensor
    repeats: int

    @property
    def measured_mean(self) -> float:
        """The measured ratio averaged over channels."""
        return float(self.measured.mean())

    @property
    def predicted_mean(self) -> float:
        """The predicted ratio averaged over channels."""
        return float(self.predicted.mean())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (channel means, and the per-channel lists)."""
        return {
            "batchnorm": self.batchnorm,
            "sites": list(self.sites),
            "keep": self.keep,
            "measured_mean": self.measured_mean,
            "predicted_mean": self.predicted_mean,
            "measured": self.measured.tolist(),
            "predicted": self.predicted.tolist(),
            "standard_error": self.standard_error.tolist(),
            "repeats": self.repeats,
        }


def shift_pairs(flow: Flow) -> dict[str, list[DropoutSite]]:
    """``batchnorm path -> sites`` for every BatchNorm that active dropout feeds directly."""
    pairs: dict[str, list[DropoutSite]] = {}
    for use in flow.uses:
        if not use.site.active or use.site.variant not in UNIT_VARIANTS | {"path"}:
            continue
        for path, kind in use.consumers.items():
            if kind == "batchnorm":
                pairs.setdefault(path, []).append(use.site)
    return pairs


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population variance over every dim but dim 1 (as BatchNorm pools)."""
    x = x.detach().to(torch.float64)
    if x.dim() < 2:
        raise ValueError(f"a BatchNorm input must have at least 2 dims, got shape {tuple(x.shape)}")
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, correction=0)


def measure_variance_shift(
    model: nn.Module,
    inputs: Any,
    *,
    repeats: int = 16,
    seed: int = 0,
    flow: Flow | None = None,
) -> list[VarianceShift]:
    """Measure, per BatchNorm fed by dropout, the eval/train variance ratio of its input.

    See :mod:`dropkit.diagnostics.variance_shift`.  The statistics are over the batch (and
    spatial positions), so a larger batch gives a tighter measurement; the prediction uses the
    same batch's eval statistics, so the two agree up to the noise of the dropout masks alone.

    Args:
        model: the model.
        inputs: a batch: a tensor, a tuple of positional inputs or a mapping of keyword inputs.
        repeats: forwards with dropout on to average (``>= 2``, for the standard error).
        seed: seed of the dropout masks (:func:`dropkit.mc_predict`'s ``seed``).
        flow: the model's flow on these inputs, if already traced.

    Returns:
        One :class:`VarianceShift` per BatchNorm module fed directly by dropout (a functional
        ``batch_norm`` call is not measured), in the order the forward runs them.

    Raises:
        ValueError: ``repeats`` below 2, or a BatchNorm input with fewer than 2 dims.
        TypeError: ``inputs`` is not a tensor, tuple or mapping.

    Example::

        >>> import torch
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(3))
        >>> x = torch.randn(4096, 3)  # mean 0: the ratio is q = 0.5
        >>> (shift,) = measure_variance_shift(model, x, repeats=4)
        >>> shift.batchnorm, round(shift.predicted_mean, 2), round(shift.measured_mean, 1)
        ('1', 0.5, 0.5)
    """
    repeats = check_int(repeats, "repeats", 2)
    flow = trace_flow(model, inputs) if flow is None else flow
    pairs = shift_pairs(flow)
    modules = dict(model.named_modules())
    targets = {
        path: modules[path]
        for path in pairs
        if isinstance(modules.get(path), nn.modules.batchnorm._BatchNorm)
    }
    if not targets:
        return []
    captured: dict[str, list[torch.Tensor]] = {path: [] for path in targets}
    hooks = []

    def capture(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                captured[path].append(args[0].detach().clone())

        return hook

    try:
        for path, module in targets.items():
            hooks.append(module.register_forward_pre_hook(capture(path)))
        eval_forward(model, inputs)
        eval_inputs = {path: tensors[0] for path, tensors in captured.items() if tensors}
        train_inputs: dict[str, list[torch.Tensor]] = {}
        for path in targets:
            for tensors in captured.values():
                tensors.clear()
            # Only the sites that feed this BatchNorm are on (their modules, or the modules
            # that make the functional calls).
            site_modules = {modules[site.path] for site in pairs[path] if site.path in modules}

            def selected(name: str, module: nn.Module, chosen: set[nn.Module] = site_modules) -> bool:
                return module in chosen

            mc_samples(model, inputs, repeats, seed, include=selected, output=first_float_tensor)
            shape = eval_inputs[path].shape
            train_inputs[path] = [tensor for tensor in captured[path] if tensor.shape == shape][:repeats]
    finally:
        for hook in hooks:
            hook.remove()

    shifts = []
    for path in targets:
        if path not in eval_inputs or len(train_inputs[path]) < 2:
            continue
        mean, var = _channel_stats(eval_inputs[path])
        train = torch.stack([_channel_stats(tensor)[1] for tensor in train_inputs[path]])
        train_var = train.mean(0)
        safe = torch.where(train_var > 0, train_var, torch.ones_like(train_var))
        measured = torch.where(train_var > 0, var / safe, torch.ones_like(var))
        count = train.shape[0]
        spread = train.std(0, correction=1) / math.sqrt(count)
        standard_error = torch.where(train_var > 0, var * spread / safe.square(), torch.zeros_like(var))
        keep = math.prod(1.0 - (site.rate or 0.0) for site in pairs[path])
        shifts.append(
            VarianceShift(
                batchnorm=path,
                sites=tuple(site.label for site in pairs[path]),
                keep=keep,
                mean=mean,
                var=var,
                train_var=train_var,
                measured=measured,
                predicted=li_variance_ratio(mean, var, keep),
                standard_error=standard_error,
                repeats=count,
            )
        )
    return shifts
