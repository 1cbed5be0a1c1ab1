"""``measure``: every dropout measurement on a batch of the user's data, in one call."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dropkit._validation import check_int
from dropkit.diagnostics._calls import OutputSelector, eval_forward, select_output
from dropkit.diagnostics.activations import ActivationStats, measure_activations
from dropkit.diagnostics.adaptive_l2 import AdaptiveL2, measure_head_penalty
from dropkit.diagnostics.ensemble_gap import DEFAULT_T, EnsembleGap, infer_task, measure_ensemble_gap
from dropkit.diagnostics.flow import trace_flow
from dropkit.diagnostics.variance_shift import VarianceShift, measure_variance_shift

__all__ = ["Measurements", "measure"]


@dataclass
class Measurements:
    """What :func:`measure` found on a batch.

    Attributes:
        variance_shift: one entry per BatchNorm fed by dropout (Li et al. 2019).
        ensemble_gap: weight scaling against MC averages (Srivastava et al. 2014, Fig. 11),
            ``None`` when the model has no dropout.
        adaptive_l2: the dropout penalty of the linear head against Wager et al.'s quadratic
            approximation, ``None`` without a linear head fed by dropout.
        activations: activation statistics per dropout module, dropout off and on.
        notes: what was not measured, and why.
    """

    variance_shift: list[VarianceShift] = field(default_factory=list)
    ensemble_gap: EnsembleGap | None = None
    adaptive_l2: AdaptiveL2 | None = None
    activations: list[ActivationStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "variance_shift": [shift.to_dict() for shift in self.variance_shift],
            "ensemble_gap": None if self.ensemble_gap is None else self.ensemble_gap.to_dict(),
            "adaptive_l2": None if self.adaptive_l2 is None else self.adaptive_l2.to_dict(),
            "activations": [stats.to_dict() for stats in self.activations],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """The measurements as text."""
        lines = ["measurements:"]
        if self.variance_shift:
            lines.append("  variance shift at BatchNorm inputs (eval/train variance; 1 = none):")
            for shift in self.variance_shift:
                se = (
                    float(shift.standard_error.square().mean().sqrt()) / max(shift.measured.numel(), 1) ** 0.5
                )
                lines.append(
                    f"    {shift.batchnorm} <- {', '.join(shift.sites)}: measured {shift.measured_mean:.3f} "
                    f"(+- {se:.3f}), Li et al. predict {shift.predicted_mean:.3f} (q = {shift.keep:.3g})"
                )
        if self.ensemble_gap is not None:
            lines.append(f"  ensemble gap ({self.ensemble_gap.task}, {self.ensemble_gap.n} inputs):")
            lines += ["    " + line for line in self.ensemble_gap.table().splitlines()]
        if self.adaptive_l2 is not None:
            l2 = self.adaptive_l2
            se = f" +- {l2.exact_se:.3g}" if l2.exact_se else ""
            lines.append(
                f"  adaptive L2 of the head ({l2.family}, {l2.noise} noise, p = {l2.p:g}, {l2.n} rows): "
                "exact "
                f"penalty {l2.exact:.4g}{se} ({l2.method}), Wager's quadratic {l2.quadratic:.4g} "
                f"(relative gap {l2.relative_gap:+.1%})"
            )
        if self.activations:
            lines.append("  activations at dropout sites (eval -> dropout on): mean, zero fraction")
            for stats in self.activations:
                lines.append(
                    f"    {stats.site}: mean {stats.eval['mean']:.4g} -> {stats.dropout['mean']:.4g}, "
                    f"zeros {stats.eval['zero_fraction']:.3f} -> {stats.dropout['zero_fraction']:.3f}"
                )
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@contextmanager
def _steps(total: int, enabled: bool) -> Iterator[Any]:
    """A progress bar on stderr (tqdm when installed, else one line per step)."""
    if not enabled:
        yield lambda name: None
        return
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        yield lambda name: print(f"dropkit diagnostics: {name} done", file=sys.stderr)
        return
    bar = tqdm(total=total, desc="dropkit diagnostics", file=sys.stderr, leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(f"{name} done")
        bar.update(1)

    try:
        yield step
    finally:
        bar.close()


def measure(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None = None,
    *,
    T_values: Sequence[int] = DEFAULT_T,  # noqa: N803
    task: str | None = None,
    output: OutputSelector = None,
    seed: int = 0,
    repeats: int = 16,
    noise_var: float | None = None,
    progress: bool = False,
) -> Measurements:
    """Measure the model's dropout on a batch of data.

    Runs :func:`~dropkit.diagnostics.variance_shift.measure_variance_shift` (per BatchNorm fed
    by dropout), :func:`~dropkit.diagnostics.ensemble_gap.measure_ensemble_gap` (weight scaling
    against MC averages over ``T_values``), the adaptive-L2 view of the linear head
    (:func:`~dropkit.diagnostics.adaptive_l2.measure_head_penalty`) and
    :func:`~dropkit.diagnostics.activations.measure_activations`.  The model is left as it was
    (flags restored, BatchNorm statistics untouched, no global seed changed).

    Args:
        model: the model.
        inputs: the batch: a tensor, a tuple of positional inputs or a mapping of keyword inputs.
        targets: class indices or regression targets for the batch, optional (without them the
            ensemble gap has no error, NLL or matching ``T``).
        T_values: numbers of MC samples for the ensemble gap.
        task: ``"classification"``, ``"regression"`` or ``None`` (inferred: see
            :func:`~dropkit.diagnostics.ensemble_gap.ensemble_gap`).
        output: the prediction in the model's output (see
            :func:`~dropkit.diagnostics.ensemble_gap.measure_ensemble_gap`).
        seed: seed of every dropout mask drawn.
        repeats: dropout forwards averaged for the variance shift (``>= 2``).
        noise_var: regression observation noise variance, for the ensemble gap's NLL and KL.
        progress: show a progress bar on stderr.

    Returns:
        The :class:`Measurements`.

    Example::

        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        ...     torch.nn.Dropout(0.5), torch.nn.Linear(16, 3),
        ... ).eval()
        >>> x, y = torch.randn(128, 4), torch.randint(0, 3, (128,))
        >>> result = measure(model, x, y, T_values=(1, 10))
        >>> [shift.batchnorm for shift in result.variance_shift], result.adaptive_l2.family
        (['2'], 'multinomial')
        >>> [stats.site for stats in result.activations], result.ensemble_gap.T
        (['1', '4'], (1, 10))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor or None, got {type(targets).__name__}")
    repeats = check_int(repeats, "repeats", 2)
    result = Measurements()
    with _steps(5, progress) as step:
        flow = trace_flow(model, inputs)
        step("traced")
        result.variance_shift = measure_variance_shift(model, inputs, repeats=repeats, seed=seed, flow=flow)
        step("variance shift")
        active = [use for use in flow.uses if use.site.active and use.calls]
        kind = infer_task(task, targets, select_output(eval_forward(model, inputs), output))
        if active:
            result.ensemble_gap = measure_ensemble_gap(
                model,
                inputs,
                targets,
                T_values=T_values,
                task=kind,
                seed=seed,
                output=output,
                noise_var=noise_var,
            )
        else:
            result.notes.append("no active dropout ran in the forward: no ensemble gap")
        step("ensemble gap")
        result.adaptive_l2 = measure_head_penalty(model, inputs, flow, task=kind, seed=seed)
        if result.adaptive_l2 is None:
            result.notes.append(
                "adaptive L2: no linear head fed directly by standard or Gaussian dropout (Wager et al. "
                "apply to a linear or GLM head)"
            )
        step("adaptive L2")
        result.activations = measure_activations(model, inputs, seed=seed)
        step("activations")
    return result
