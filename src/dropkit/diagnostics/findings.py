"""Findings: the stable codes of the diagnostic rules, their severities and sources.

Every rule of :func:`dropkit.diagnostics.check` has a code that never changes meaning
(``DK101`` ...), so that a CI job can select or ignore it.  The codes, their default
severity, and the paper each comes from:

* ``DK101`` (warning) dropout feeds a BatchNorm: the variance BN learns in training is not the
  one it sees in eval. Li et al. 2019 (CVPR).
* ``DK102`` (warning) dropout on the network's output, with no learned layer after it.
  Srivastava et al. 2014.
* ``DK103`` (warning) a rate above the usual range for the site's position; ranges and sources
  in :mod:`dropkit.diagnostics.positions`.
* ``DK104`` (warning) element-wise dropout on convolutional feature maps. Tompson et al. 2015;
  Ghiasi et al. 2018.
* ``DK105`` (warning) standard dropout in a SELU network. Klambauer et al. 2017.
* ``DK106`` (warning; info for ``nn.LSTM(dropout=...)`` and sequence inputs) a new dropout mask
  at every step of a recurrence. Gal & Ghahramani 2016; Merity et al. 2018.
* ``DK107`` (info) dropout inside a network that normalizes with BatchNorm. Li et al. 2019;
  Ioffe & Szegedy 2015.
* ``DK108`` (info) a training set so small (at most 500 examples) that whether dropout helps is
  uncertain: no gain in Srivastava et al. 2014, Fig. 10; a gain in dropkit's reproduction.
* ``DK109`` (info) a training set large for the model (at least as many examples as
  parameters, a rule of thumb). Chowdhery et al. 2022; Liu et al. 2023.
* ``DK110`` (error) dropout that stays on in eval mode (functional dropout with
  ``training=True``, SDPA with ``dropout_p > 0``). PyTorch's documentation of both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RULES", "SEVERITIES", "Finding", "Rule", "severity_rank"]

SEVERITIES = ("info", "warning", "error")


def severity_rank(severity: str) -> int:
    """``0`` for ``"info"``, ``1`` for ``"warning"``, ``2`` for ``"error"``.

    Raises:
        ValueError: ``severity`` is none of these.

    Example::

        >>> severity_rank("warning") > severity_rank("info")
        True
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return SEVERITIES.index(severity)


@dataclass(frozen=True)
class Rule:
    """One diagnostic rule.

    Attributes:
        code: the stable code, ``"DK1xx"``.
        name: a short kebab-case name.
        severity: default severity (a rule may report some cases at a lower one).
        source: the paper (or document) the rule comes from.
        reproductions: the ``dropkit reproduce`` experiments whose results bear on the rule
            (their full-mode numbers are in REPRODUCTIONS.md; the finding's reason quotes them).
    """

    code: str
    name: str
    severity: str
    source: str
    reproductions: tuple[str, ...] = ()


RULES: dict[str, Rule] = {
    rule.code: rule
    for rule in (
        Rule(
            "DK101",
            "dropout-feeds-batchnorm",
            "warning",
            "Li, Chen, Hu, Yang, 'Understanding the Disharmony between Dropout and Batch "
            "Normalization by Variance Shift', CVPR 2019",
            reproductions=("variance-shift",),
        ),
        Rule(
            "DK102",
            "dropout-on-output",
            "warning",
            "Srivastava et al., 'Dropout: A Simple Way to Prevent Neural Networks from Overfitting', "
            "JMLR 2014 (dropout on input and hidden units; the output layer is not dropped)",
        ),
        Rule("DK103", "rate-above-usual-range", "warning", "see dropkit.diagnostics.positions.RANGES"),
        Rule(
            "DK104",
            "elementwise-dropout-on-feature-maps",
            "warning",
            "Tompson et al., 'Efficient Object Localization Using Convolutional Networks', CVPR 2015; "
            "Ghiasi, Lin, Le, 'DropBlock', NeurIPS 2018",
            reproductions=("conv-variants",),
        ),
        Rule(
            "DK105",
            "standard-dropout-in-selu-network",
            "warning",
            "Klambauer et al., 'Self-Normalizing Neural Networks', NeurIPS 2017",
            reproductions=("alpha-selu",),
        ),
        Rule(
            "DK106",
            "per-step-masks-in-recurrence",
            "warning",
            "Gal & Ghahramani, 'A Theoretically Grounded Application of Dropout in Recurrent Neural "
            "Networks', NeurIPS 2016; Merity, Keskar, Socher, 'Regularizing and Optimizing LSTM "
            "Language Models', ICLR 2018",
        ),
        Rule(
            "DK107",
            "dropout-in-batchnorm-network",
            "info",
            "Li et al., CVPR 2019; Ioffe & Szegedy, 'Batch Normalization', ICML 2015 (BN-Inception "
            "trained without dropout)",
            reproductions=("variance-shift",),
        ),
        Rule(
            "DK108",
            "training-set-too-small",
            "info",
            "Srivastava et al., JMLR 2014, Fig. 10 (no gain from dropout on 100 or 500 MNIST examples)",
            reproductions=("rate-and-size",),
        ),
        Rule(
            "DK109",
            "training-set-large-for-model",
            "info",
            "Chowdhery et al., 'PaLM', 2022 (trained without dropout); Liu et al., 'Dropout Reduces "
            "Underfitting', ICML 2023 (early dropout when a model underfits)",
            reproductions=("early-late",),
        ),
        Rule(
            "DK110",
            "dropout-active-in-eval",
            "error",
            "PyTorch documentation: torch.nn.functional.dropout defaults to training=True, and "
            "scaled_dot_product_attention applies dropout_p whenever it is positive",
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    """One problem found in a model.

    Attributes:
        code: the rule's stable code (a key of :data:`RULES`).
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        path: where: a site's label (module path, plus the function for a functional call) or
            ``"(model)"``.
        message: what was found, with the numbers.
        reason: why it matters, with the paper.
        fix: what to change.
        data: the numbers behind the message (rates, measured and predicted values), for JSON.
    """

    code: str
    severity: str
    path: str
    message: str
    reason: str
    fix: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def rule(self) -> Rule:
        """The :class:`Rule` of :attr:`code`."""
        return RULES[self.code]

    def to_dict(self) -> dict[str, Any]:
        """The finding as plain JSON-ready data (the rule's name and source included)."""
        return {
            "code": self.code,
            "rule": self.rule.name,
            "severity": self.severity,
            "path": self.path,
            "message": self.message,
            "reason": self.reason,
            "fix": self.fix,
            "source": self.rule.source,
            "data": dict(self.data),
        }
