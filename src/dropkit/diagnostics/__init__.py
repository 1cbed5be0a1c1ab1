"""Diagnostics and advice: what the field knows about using dropout, as tools to run on a model.

* :func:`check`: placement and rate rules (codes ``DK101``-``DK110``, each with severity,
  module path, reason with the paper, and a fix; see :mod:`.findings`), from the module tree
  and a traced forward (:mod:`.flow`) on example inputs.
* :func:`measure`: on a batch of data, the dropout/BatchNorm variance shift measured against
  Li et al.'s formula (:mod:`.variance_shift`), the gap between weight scaling and MC averages
  (:mod:`.ensemble_gap`), the adaptive-L2 view of the head against Wager et al.'s quadratic
  approximation (:mod:`.adaptive_l2`), and activation statistics per site (:mod:`.activations`).
* :func:`suggest_rates`: a rate or range, and variant, for every site (:mod:`.positions` holds
  the ranges and their sources); :func:`sweep`: a short training sweep over rates with error
  bars over seeds.
* Reports: ``str(report)`` (a table), ``report.to_json()``, and :func:`render_html` /
  :func:`render_markdown` with plots; ``dropkit doctor`` on the command line (:mod:`.cli`).
"""

from dropkit.diagnostics.activations import ActivationStats as ActivationStats
from dropkit.diagnostics.activations import measure_activations as measure_activations
from dropkit.diagnostics.adaptive_l2 import AdaptiveL2 as AdaptiveL2
from dropkit.diagnostics.adaptive_l2 import dropout_penalty as dropout_penalty
from dropkit.diagnostics.check import check as check
from dropkit.diagnostics.ensemble_gap import EnsembleGap as EnsembleGap
from dropkit.diagnostics.ensemble_gap import ensemble_gap as ensemble_gap
from dropkit.diagnostics.ensemble_gap import measure_ensemble_gap as measure_ensemble_gap
from dropkit.diagnostics.findings import RULES as RULES
from dropkit.diagnostics.findings import Finding as Finding
from dropkit.diagnostics.findings import Rule as Rule
from dropkit.diagnostics.measure import Measurements as Measurements
from dropkit.diagnostics.measure import measure as measure
from dropkit.diagnostics.positions import RANGES as RANGES
from dropkit.diagnostics.positions import RateRange as RateRange
from dropkit.diagnostics.render import render_html as render_html
from dropkit.diagnostics.render import render_markdown as render_markdown
from dropkit.diagnostics.render import write_report as write_report
from dropkit.diagnostics.report import DiagnosticReport as DiagnosticReport
from dropkit.diagnostics.report import SiteReport as SiteReport
from dropkit.diagnostics.sites import DropoutSite as DropoutSite
from dropkit.diagnostics.suggest import RateAdvice as RateAdvice
from dropkit.diagnostics.suggest import suggest_rates as suggest_rates
from dropkit.diagnostics.sweep import SweepPoint as SweepPoint
from dropkit.diagnostics.sweep import SweepResult as SweepResult
from dropkit.diagnostics.sweep import sweep as sweep
from dropkit.diagnostics.variance_shift import VarianceShift as VarianceShift
from dropkit.diagnostics.variance_shift import li_variance_ratio as li_variance_ratio
from dropkit.diagnostics.variance_shift import measure_variance_shift as measure_variance_shift

__all__ = [
    "RANGES",
    "RULES",
    "ActivationStats",
    "AdaptiveL2",
    "DiagnosticReport",
    "DropoutSite",
    "EnsembleGap",
    "Finding",
    "Measurements",
    "RateAdvice",
    "RateRange",
    "Rule",
    "SiteReport",
    "SweepPoint",
    "SweepResult",
    "VarianceShift",
    "check",
    "dropout_penalty",
    "ensemble_gap",
    "li_variance_ratio",
    "measure",
    "measure_activations",
    "measure_ensemble_gap",
    "measure_variance_shift",
    "render_html",
    "render_markdown",
    "suggest_rates",
    "sweep",
    "write_report",
]
