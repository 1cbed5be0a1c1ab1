"""``check``: run the placement and rate rules on a model."""

from __future__ import annotations

from typing import Any

from torch import nn

from dropkit._validation import check_int
from dropkit.diagnostics.flow import Flow, SiteUse, sequential_flow, trace_flow
from dropkit.diagnostics.positions import is_transformer, site_position
from dropkit.diagnostics.report import DiagnosticReport, SiteReport
from dropkit.diagnostics.rules import Context, run_rules
from dropkit.diagnostics.variance_shift import measure_variance_shift, shift_pairs
from dropkit.mc.mode import active_handle

__all__ = ["analyse", "check"]


def _optional_count(value: object, name: str) -> int | None:
    return None if value is None else check_int(value, name, 1)


def _absorbed(flow: Flow) -> set[SiteUse]:
    """Module sites the forward never ran whose parent made functional dropout calls: they only
    hold the rate of those calls (the attention dropout of Hugging Face models)."""
    if flow.method != "trace":
        return set()
    callers = {use.site.path for use in flow.uses if use.site.kind == "function"}
    absorbed = set()
    for use in flow.uses:
        if use.calls == 0 and use.site.kind == "module":
            parent = use.site.path.rsplit(".", 1)[0] if "." in use.site.path else ""
            if parent in callers:
                absorbed.add(use)
    return absorbed


def analyse(
    model: nn.Module, example_inputs: Any = None
) -> tuple[Flow, dict[SiteUse, str | None], set[SiteUse]]:
    """The model's flow, each site's position, and the sites that only hold a rate.

    The shared first step of :func:`check` and :func:`~dropkit.diagnostics.suggest_rates`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if active_handle(module) is not None:
            # Its dropout runs whatever the training flags say: the eval-mode trace would be wrong.
            raise RuntimeError(
                f"{name or 'the model'} is in an MC dropout mode; check the model outside the mode"
            )
    flow = sequential_flow(model) if example_inputs is None else trace_flow(model, example_inputs)
    transformer = is_transformer(model, flow)
    positions = {use: site_position(use, flow, transformer) for use in flow.uses}
    return flow, positions, _absorbed(flow)


def check(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    n_train: int | None = None,
    n_params: int | None = None,
    measure_shift: bool = True,
    repeats: int = 16,
    seed: int = 0,
) -> DiagnosticReport:
    """Check where and how ``model`` uses dropout against what the field knows works.

    Finds every dropout site (modules of torch, dropkit, timm, torchvision and Hugging Face;
    with ``example_inputs``, functional calls too), follows what each feeds through one traced
    eval-mode forward (see :mod:`dropkit.diagnostics.flow`; without inputs, the order of an
    ``nn.Sequential``), and applies the rules DK101-DK110 of
    :mod:`dropkit.diagnostics.findings`.  With ``example_inputs``, the variance shift of every
    BatchNorm fed by dropout is measured on them (Li et al. 2019) and reported in the finding.

    The model is left as it was: every ``training`` flag is restored, and no parameter,
    buffer (BatchNorm statistics included) or global seed changes.

    Args:
        model: the model.
        example_inputs: inputs for one forward: a tensor, a tuple of positional arguments or a
            mapping of keyword arguments (``{"input_ids": ids}``).  A batch of a few dozen
            examples gives a meaningful measured variance shift.
        n_train: size of the training set, for the data-size rules (DK108, DK109).
        n_params: parameter count for DK109; default: the model's.
        measure_shift: measure the variance shift of BatchNorms fed by dropout on
            ``example_inputs``.
        repeats: dropout forwards for that measurement (``>= 2``).
        seed: seed of its dropout masks.

    Returns:
        A :class:`~dropkit.diagnostics.report.DiagnosticReport`; ``str(report)`` is a table,
        ``report.codes()`` the codes found.

    Raises:
        TypeError: ``model`` is not a module, or bad argument types.
        ValueError: ``n_train`` / ``n_params`` below 1, or ``repeats`` below 2.
        RuntimeError: the example forward failed (the original error is chained), or the model
            (or one of its modules) is inside an MC dropout mode.

    Example::

        >>> import torch
        >>> from dropkit.diagnostics import check
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        ...     torch.nn.Linear(16, 2), torch.nn.Dropout(0.1),
        ... )
        >>> check(model).codes()
        ['DK101', 'DK102']
        >>> clean = torch.nn.Sequential(
        ...     torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)
        ... )
        >>> check(clean, torch.randn(4, 8)).findings
        []
    """
    train = _optional_count(n_train, "n_train")
    params = _optional_count(n_params, "n_params")
    if not isinstance(measure_shift, bool):
        raise TypeError(f"measure_shift must be a bool, got {type(measure_shift).__name__}")
    repeats = check_int(repeats, "repeats", 2)
    flow, positions, absorbed = analyse(model, example_inputs)
    shifts = {}
    if example_inputs is not None and measure_shift and shift_pairs(flow):
        measured = measure_variance_shift(model, example_inputs, repeats=repeats, seed=seed, flow=flow)
        shifts = {shift.batchnorm: shift for shift in measured}
    count = params if params is not None else sum(parameter.numel() for parameter in model.parameters())
    context = Context(flow, positions, train, count, shifts, absorbed)
    report = DiagnosticReport(
        type(model).__name__, flow.method, run_rules(context), n_train=train, n_params=count
    )
    for use in flow.uses:
        note = ""
        if use in absorbed:
            note = "holds the rate of its parent's functional call"
        elif flow.method == "trace" and use.calls == 0:
            note = "not run by the example forward"
        report.sites.append(
            SiteReport(
                use.site.label,
                use.site.name,
                use.site.variant,
                use.site.rate,
                positions[use],
                use.calls if flow.method == "trace" else None,
                note,
            )
        )
    if flow.method == "static":
        report.notes.append(
            "no example inputs and not an nn.Sequential: the rules about what each dropout feeds "
            "(DK101, DK102, DK104, DK106 loops, DK107, DK110) were not checked; pass example_inputs"
        )
    unknown = [use.site.label for use in flow.uses if use.site.rate is None and use.site.variant != "noise"]
    if unknown:
        report.notes.append(
            f"rate unknown (0 passed in eval, no rate found on the module): {', '.join(unknown)}"
        )
    return report
