"""``suggest_rates``: a recommended rate (or range) and variant for every dropout site.

The advice follows the site's position (see :mod:`dropkit.diagnostics.positions` for the
ranges and their sources) and the findings of :func:`~dropkit.diagnostics.check` about it:

* a site that feeds a BatchNorm (DK101) or the model's output (DK102): rate 0 there, move it;
* element-wise dropout on feature maps (DK104): spatial dropout or DropBlock;
* standard dropout in a SELU network (DK105): alpha dropout at 0.05-0.1;
* per-step masks in a recurrence (DK106): locked dropout, weight drop;
* otherwise the current rate if it lies in the usual range, else the nearest end of it; a site
  at rate 0 gets the range's default.  Given ``n_train`` with as many examples as parameters
  or more (DK109), the low end: the model is unlikely to overfit.

Rates below the usual range are not findings (lowering the rate is the standard answer to
underfitting), but the advice names the range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dropkit.diagnostics.check import check
from dropkit.diagnostics.positions import RANGES

__all__ = ["RateAdvice", "suggest_rates"]


@dataclass(frozen=True)
class RateAdvice:
    """The advice for one dropout site.

    Attributes:
        site: the site's label.
        name: its class or function.
        variant: what it drops now.
        rate: its rate now (``None``: unknown).
        position: its position (``None`` for weight-level sites, which have no rule of thumb).
        low: lower end of the usual range (``None`` without a position).
        high: upper end of the usual range.
        suggested: the rate to use at this site (``None``: keep what it is).
        layer: the dropkit layer to use (``None``: keep the current kind).
        reason: why, with the source.
    """

    site: str
    name: str
    variant: str
    rate: float | None
    position: str | None
    low: float | None
    high: float | None
    suggested: float | None
    layer: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return dict(self.__dict__)


def _layer_for(codes: set[str], variant: str, shape_rank: int | None) -> str | None:
    if "DK105" in codes:
        return (
            "dropkit.nn.FeatureAlphaDropout" if variant in ("channel", "block") else "dropkit.nn.AlphaDropout"
        )
    if "DK104" in codes:
        spatial = shape_rank - 2 if shape_rank in (3, 4, 5) else 2
        return f"dropkit.nn.Dropout{spatial}d or dropkit.nn.DropBlock{spatial}d"
    if "DK106" in codes:
        return "dropkit.nn.LockedDropout (and dropkit.nn.WeightDrop for recurrent weights)"
    return None


def suggest_rates(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    n_train: int | None = None,
    n_params: int | None = None,
) -> list[RateAdvice]:
    """A recommended rate or range, and variant, for every dropout site of ``model``.

    Args:
        model: the model.
        example_inputs: inputs for one traced forward (see :func:`~dropkit.diagnostics.check`);
            without them positions are read from an ``nn.Sequential``'s order or the module
            types.
        n_train: training-set size (more examples than parameters: the low end of each range).
        n_params: parameter count; default: the model's.

    Returns:
        One :class:`RateAdvice` per site, in the order of :func:`~dropkit.diagnostics.check`'s
        site list (sites that only hold the rate of a functional call are left out).

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Dropout(0.5), torch.nn.Linear(8, 8), torch.nn.ReLU(),
        ...     torch.nn.Dropout(0.2), torch.nn.Linear(8, 2),
        ... )
        >>> [(advice.site, advice.position, advice.suggested) for advice in suggest_rates(model)]
        [('0', 'input', 0.2), ('3', 'dense', 0.3)]
    """
    report = check(model, example_inputs, n_train=n_train, n_params=n_params, measure_shift=False)
    codes: dict[str, set[str]] = {}
    for finding in report.findings:
        codes.setdefault(finding.path, set()).add(finding.code)
    plenty = "DK109" in report.codes()
    advice = []
    for site in report.sites:
        if site.note.startswith("holds the rate"):
            continue
        found = codes.get(site.path, set())
        usual = RANGES.get(site.position) if site.position is not None else None
        low = usual.low if usual is not None else None
        high = usual.high if usual is not None else None
        layer = _layer_for(found, site.variant, None)
        if "DK101" in found or "DK102" in found:
            suggested: float | None = 0.0
            where = (
                "feeds a BatchNorm (variance shift, Li et al. 2019)"
                if "DK101" in found
                else "is on the output"
            )
            reason = (
                f"this dropout {where}: remove it here, and if needed put it after the last "
                "BatchNorm / before the last layer"
            )
        elif "DK110" in found:
            suggested = site.rate
            reason = "stays on in eval: pass the rate only in training (DK110); the rate itself is fine"
        elif usual is None:
            suggested = None
            reason = (
                f"{site.variant} dropout acts on weights or states, where the activation ranges do not apply"
            )
        elif "DK105" in found:
            suggested = 0.05 if site.rate is None else min(max(site.rate, 0.05), 0.1)
            reason = "SELU network: alpha dropout at 0.05-0.1 (Klambauer et al. 2017)"
        else:
            if plenty:
                suggested = usual.low
                why = "a training set at least as large as the parameter count (DK109): the low end"
            elif site.rate is None or site.rate == 0.0:
                suggested = usual.default
                why = f"no rate yet: start at {usual.default:g}"
            else:
                suggested = min(max(site.rate, usual.low), usual.high)
                why = (
                    "in range: keep it" if suggested == site.rate else "moved to the nearest end of the range"
                )
            where = usual.position.replace("_", " ")
            reason = f"{where} site, usual {usual.low:g}-{usual.high:g} ({usual.source}); {why}"
            if layer is not None:
                reason += f"; use {layer} instead (see the findings {', '.join(sorted(found))})"
        advice.append(
            RateAdvice(
                site=site.path,
                name=site.name,
                variant=site.variant,
                rate=site.rate,
                position=site.position,
                low=low,
                high=high,
                suggested=suggested,
                layer=layer,
                reason=reason,
            )
        )
    return advice
