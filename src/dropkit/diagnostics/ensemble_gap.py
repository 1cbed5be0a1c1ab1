r"""The ensemble gap: weight scaling against Monte Carlo averages of :math:`T` dropout passes.

A network trained with (inverted) dropout is evaluated by *weight scaling*: one deterministic
pass, which approximates the average over the :math:`2^n` thinned networks.  Srivastava et al.
(2014, Fig. 11) compare it with the Monte Carlo average of :math:`T` stochastic passes: on
MNIST, MC averaging reaches the weight-scaling test error at about :math:`T \approx 50`.

For classification (logits, softmax over the last dim; a single logit is a sigmoid) the
predictive distribution of :math:`T` passes is the mean of their probabilities,
:math:`\bar p_T = \frac1T\sum_{t\le T} p_t`, and for each :math:`T` the gap reports

* the error :math:`1 - \mathrm{accuracy}` and the NLL (with targets, from
  :mod:`dropkit.metrics`), next to weight scaling's;
* :math:`\mathrm{KL}(p_{ws} \,\|\, \bar p_T)`, averaged over inputs, and the fraction of
  inputs whose arg-max agrees.

For regression it reports the RMSE (with targets) and the root mean square distance between
the MC mean and the weight-scaled prediction; with an observation noise variance
:math:`\sigma^2`, also the Gaussian NLL (weight scaling: :math:`N(\hat y, \sigma^2)`; MC: the
moment-matched :math:`N(\bar y_T, \sigma^2 + \widehat{\mathrm{Var}}_T)`) and the KL between
those two Gaussians.

The *matching* :math:`T` is the smallest :math:`T` from which on the MC error stays within a
tolerance of weight scaling's (at most the tolerance above it): by default one standard error
of the weight-scaled error, :math:`\sqrt{e(1-e)/N}` (at least :math:`1/N`) for a classification
error rate and the delta-method standard error of the RMSE for regression.  The :math:`T`
values are prefixes of one sequence of :math:`\max T` samples, so the curve is nested as in
Srivastava's figure.

Reference: Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
Overfitting", JMLR 2014, §7.5 and Fig. 11.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dropkit.diagnostics._calls import OutputSelector, eval_forward, mc_samples, select_output
from dropkit.metrics import classification as classification_metrics

__all__ = ["DEFAULT_T", "EnsembleGap", "ensemble_gap", "infer_task", "measure_ensemble_gap"]

DEFAULT_T = (1, 2, 5, 10, 20, 50, 100)
_TASKS = ("classification", "regression")


@dataclass(frozen=True)
class EnsembleGap:
    """Weight scaling against MC averages, for each number of samples ``T``.

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        T: the numbers of samples, increasing.
        weight_scaling: the weight-scaled prediction's metrics (``"error"``, ``"nll"``; each
            only when it can be computed).
        mc: ``metric -> one value per T``: ``"error"``, ``"nll"``, ``"kl"``, and
            ``"agreement"`` (classification) or ``"distance"`` (regression).
        matching_T: the smallest ``T`` from which on the MC error is at most ``tolerance``
            above weight scaling's, ``None`` without targets or when no ``T`` gets there.
        tolerance: the tolerance used (``None`` without targets).
        n: number of inputs.
    """

    task: str
    T: tuple[int, ...]
    weight_scaling: dict[str, float]
    mc: dict[str, list[float]]
    matching_T: int | None  # noqa: N815 - T is the number of samples in the literature
    tolerance: float | None
    n: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "task": self.task,
            "T": list(self.T),
            "weight_scaling": dict(self.weight_scaling),
            "mc": {name: list(values) for name, values in self.mc.items()},
            "matching_T": self.matching_T,
            "tolerance": self.tolerance,
            "n": self.n,
        }

    def table(self) -> str:
        """A text table: one row per ``T``, weight scaling last."""
        names = list(self.mc)
        header = "T".rjust(5) + "".join(name.rjust(12) for name in names)
        lines = [header]
        for index, count in enumerate(self.T):
            lines.append(str(count).rjust(5) + "".join(f"{self.mc[name][index]:12.4g}" for name in names))
        ws = "".join(
            (f"{self.weight_scaling[name]:12.4g}" if name in self.weight_scaling else "-".rjust(12))
            for name in names
        )
        lines.append("ws".rjust(5) + ws)
        match = "never" if self.matching_T is None else str(self.matching_T)
        if self.tolerance is not None:
            lines.append(f"MC matches weight scaling from T = {match} (tolerance {self.tolerance:.3g})")
        return "\n".join(lines)


def _check_t_values(values: object) -> tuple[int, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise TypeError(f"T_values must be a non-empty sequence of ints, got {values!r}")
    result = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"T_values must hold ints >= 1, got {value!r}")
        result.append(value)
    if sorted(set(result)) != result:
        raise ValueError(f"T_values must be strictly increasing, got {list(values)}")
    return tuple(result)


def infer_task(task: object, targets: torch.Tensor | None, output: torch.Tensor) -> str:
    """``task`` checked, or inferred: integer targets (or 2-D outputs with >= 2 columns) mean
    classification, floating-point targets (or other outputs) regression."""
    if task is not None:
        if task not in _TASKS:
            raise ValueError(f"task must be 'classification', 'regression' or None, got {task!r}")
        return str(task)
    if targets is not None:
        return "regression" if targets.is_floating_point() else "classification"
    return "classification" if output.dim() == 2 and output.shape[-1] >= 2 else "regression"


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits ``(..., C)``; a single logit (``(..., 1)`` or no class
    dim is handled by the caller) becomes the two classes of a sigmoid."""
    logits = logits.to(torch.float64)
    if logits.shape[-1] == 1:
        positive = torch.sigmoid(logits)
        return torch.cat([1.0 - positive, positive], dim=-1)
    return torch.softmax(logits, dim=-1)


def _nonnegative(value: object, name: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite float >= 0 or None, got {value!r}")
    return float(value)


def ensemble_gap(
    weight_scaled: torch.Tensor,
    samples: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    T_values: Sequence[int] = DEFAULT_T,  # noqa: N803
    task: str | None = None,
    tolerance: float | None = None,
    noise_var: float | None = None,
) -> EnsembleGap:
    """The ensemble gap from outputs already computed; see :mod:`dropkit.diagnostics.ensemble_gap`.

    Args:
        weight_scaled: the eval-mode output, ``(N, C)`` logits (``(N,)`` or ``(N, 1)`` for one
            binary logit) or ``(N, *out)`` regression predictions.
        samples: MC outputs with the sample axis first, ``(T_max, *weight_scaled.shape)``,
            ``T_max >= max(T_values)``.
        targets: class indices ``(N,)`` or regression targets of the output's shape; optional.
        T_values: numbers of samples to compare, strictly increasing.
        task: ``"classification"`` or ``"regression"``; ``None`` infers it from the targets'
            dtype (integer: classification), else from the output (2-D with >= 2 columns:
            classification).
        tolerance: how far above weight scaling's error the MC error may stay and count as
            matching; ``None`` for one standard error (see the module).
        noise_var: regression only: the observation noise variance, for the NLL and KL.

    Returns:
        An :class:`EnsembleGap`.

    Raises:
        ValueError: shapes that do not fit, too few samples, a bad task or tolerance.
        TypeError: ``T_values`` is not a sequence of ints.

    Example::

        >>> ws = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> samples = ws.expand(4, 2, 2)  # every pass equal to weight scaling
        >>> gap = ensemble_gap(ws, samples, torch.tensor([0, 1]), T_values=(1, 4))
        >>> gap.mc["kl"], gap.matching_T
        ([0.0, 0.0], 1)
    """
    values = _check_t_values(T_values)
    if not isinstance(weight_scaled, torch.Tensor) or not isinstance(samples, torch.Tensor):
        raise TypeError("weight_scaled and samples must be tensors")
    if samples.shape[1:] != weight_scaled.shape:
        raise ValueError(
            f"samples must have shape (T, *weight_scaled.shape) = (T, {tuple(weight_scaled.shape)}), "
            f"got {tuple(samples.shape)}"
        )
    if samples.shape[0] < values[-1]:
        raise ValueError(f"samples holds {samples.shape[0]} samples, fewer than max(T_values) = {values[-1]}")
    if weight_scaled.dim() < 1 or weight_scaled.shape[0] < 1:
        raise ValueError(
            f"weight_scaled must have the batch on dim 0, got shape {tuple(weight_scaled.shape)}"
        )
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor or None, got {type(targets).__name__}")
    kind = infer_task(task, targets, weight_scaled)
    tol = _nonnegative(tolerance, "tolerance")
    noise = _nonnegative(noise_var, "noise_var")
    n = weight_scaled.shape[0]
    if kind == "classification":
        return _classification(weight_scaled, samples, targets, values, tol, n)
    return _regression(weight_scaled, samples, targets, values, tol, noise, n)


def _prefix_means(samples: torch.Tensor, values: tuple[int, ...]) -> list[torch.Tensor]:
    total = samples[: values[-1]].to(torch.float64).cumsum(0)
    return [total[count - 1] / count for count in values]


def _matching(errors: list[float], ws: float, tolerance: float, values: tuple[int, ...]) -> int | None:
    match = None
    for count, error in zip(reversed(values), reversed(errors), strict=True):
        if error <= ws + tolerance:
            match = count
        else:
            break
    return match


def _classification(
    ws: torch.Tensor,
    samples: torch.Tensor,
    targets: torch.Tensor | None,
    values: tuple[int, ...],
    tolerance: float | None,
    n: int,
) -> EnsembleGap:
    if ws.dim() == 1:
        ws, samples = ws[:, None], samples[..., None]
    if ws.dim() != 2:
        raise ValueError(
            f"classification outputs must be (N, C) logits or (N,) binary logits, got {tuple(ws.shape)}"
        )
    p_ws = _probabilities(ws)
    means = _prefix_means(_probabilities(samples), values)
    eps = torch.finfo(torch.float64).eps
    log_ws = p_ws.clamp_min(eps).log()
    mc: dict[str, list[float]] = {"kl": [], "agreement": []}
    result_ws: dict[str, float] = {}
    if targets is not None:
        mc = {"error": [], "nll": [], **mc}
        result_ws["error"] = 1.0 - float(classification_metrics.accuracy(p_ws, targets))
        result_ws["nll"] = float(classification_metrics.nll(p_ws, targets))
    for mean in means:
        mc["kl"].append(float((p_ws * (log_ws - mean.clamp_min(eps).log())).sum(-1).mean()))
        mc["agreement"].append(float((mean.argmax(-1) == p_ws.argmax(-1)).to(torch.float64).mean()))
        if targets is not None:
            mc["error"].append(1.0 - float(classification_metrics.accuracy(mean, targets)))
            mc["nll"].append(float(classification_metrics.nll(mean, targets)))
    match, tol = None, None
    if targets is not None:
        error = result_ws["error"]
        tol = tolerance if tolerance is not None else max(math.sqrt(error * (1.0 - error) / n), 1.0 / n)
        match = _matching(mc["error"], error, tol, values)
    return EnsembleGap("classification", values, result_ws, mc, match, tol, n)


def _regression(
    ws: torch.Tensor,
    samples: torch.Tensor,
    targets: torch.Tensor | None,
    values: tuple[int, ...],
    tolerance: float | None,
    noise: float | None,
    n: int,
) -> EnsembleGap:
    ws64 = ws.to(torch.float64)
    draws = samples[: values[-1]].to(torch.float64)
    if targets is not None:
        if targets.shape != ws.shape:
            raise ValueError(
                f"regression targets must have the output's shape {tuple(ws.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        y = targets.to(torch.float64)
    mc: dict[str, list[float]] = {"distance": []}
    result_ws: dict[str, float] = {}
    if targets is not None:
        mc = {"error": [], **mc}
        squared = (y - ws64).square().reshape(n, -1).mean(1)
        rmse = float(squared.mean().sqrt())
        result_ws["error"] = rmse
    if noise is not None:
        if noise <= 0:
            raise ValueError(f"noise_var must be > 0 for the NLL and KL, got {noise}")
        mc["kl"] = []
        if targets is not None:
            mc["nll"] = []
            result_ws["nll"] = float(_gaussian_nll(y, ws64, torch.full_like(ws64, noise)))
    for count in values:
        mean = draws[:count].mean(0)
        mc["distance"].append(float((mean - ws64).square().mean().sqrt()))
        if targets is not None:
            mc["error"].append(float((y - mean).square().mean().sqrt()))
        if noise is not None:
            var = draws[:count].var(0, correction=0) + noise
            per_point = 0.5 * ((var / noise).log() + (noise + (ws64 - mean).square()) / var - 1.0)
            mc["kl"].append(float(per_point.reshape(n, -1).sum(1).mean()))
            if targets is not None:
                mc["nll"].append(float(_gaussian_nll(y, mean, var)))
    match, tol = None, None
    if targets is not None:
        rmse = result_ws["error"]
        if tolerance is not None:
            tol = tolerance
        else:
            squared = (y - ws64).square().reshape(n, -1).mean(1)
            spread = float(squared.std(correction=1)) if n > 1 else 0.0
            tol = spread / math.sqrt(n) / (2.0 * rmse) if rmse > 0 else 0.0
        match = _matching(mc["error"], rmse, tol, values)
    return EnsembleGap("regression", values, result_ws, mc, match, tol, n)


def _gaussian_nll(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    per_point = 0.5 * (math.log(2 * math.pi) + var.log() + (y - mean).square() / var)
    return per_point.reshape(y.shape[0], -1).sum(1).mean()


def measure_ensemble_gap(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None = None,
    *,
    T_values: Sequence[int] = DEFAULT_T,  # noqa: N803
    task: str | None = None,
    seed: int = 0,
    output: OutputSelector = None,
    tolerance: float | None = None,
    noise_var: float | None = None,
) -> EnsembleGap:
    """Run ``model`` once in eval mode and ``max(T_values)`` times in MC mode, and compare.

    The MC passes come from :func:`dropkit.mc_predict` (every dropout on, BatchNorm and the
    rest in eval) with ``seed``; the model's ``training`` flags are restored.

    Args:
        model: the model; its (selected) output holds the batch on dim 0.
        inputs: a batch: a tensor, a tuple of positional inputs or a mapping of keyword inputs.
        targets: class indices or regression targets, optional.
        T_values: numbers of samples to compare. Default: 1, 2, 5, 10, 20, 50, 100
        task: ``"classification"``, ``"regression"`` or ``None`` (inferred; see
            :func:`ensemble_gap`).
        seed: seed of the MC samples.
        output: which part of the output is the prediction (``None``: the tensor itself, a
            mapping's ``"logits"``, a tuple's first element; or a key, index or callable).
        tolerance: see :func:`ensemble_gap`.
        noise_var: see :func:`ensemble_gap`.

    Returns:
        An :class:`EnsembleGap`.

    Example::

        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
        ... )
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> gap = measure_ensemble_gap(model, x, y, T_values=(1, 10, 50))
        >>> gap.mc["kl"][0] > gap.mc["kl"][-1]  # more samples, closer to weight scaling
        True
    """
    values = _check_t_values(T_values)
    ws = select_output(eval_forward(model, inputs), output)
    samples = mc_samples(model, inputs, values[-1], seed, output=output, one_by_one=False)
    return ensemble_gap(
        ws, samples, targets, T_values=values, task=task, tolerance=tolerance, noise_var=noise_var
    )
