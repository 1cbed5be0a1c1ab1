"""The placement and rate rules: pure functions from what is known about a model to findings.

Each ``dk1xx`` function takes a :class:`Context` (the model's :class:`~.flow.Flow`, each site's
position, the training-set size) and returns the findings of one rule; :data:`CHECKS` lists
them all.  The codes, severities and sources are in :mod:`dropkit.diagnostics.findings`.

What each rule needs: DK101, DK102, DK104, DK106 (loops, sequence inputs) and DK107 need the
order of the forward (a traced forward, or an ``nn.Sequential``); DK110 needs a traced forward;
DK103, DK105, DK106 (``nn.LSTM`` dropout) and DK108 / DK109 work on the module tree alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dropkit.diagnostics.findings import RULES, Finding
from dropkit.diagnostics.flow import Flow, SiteUse
from dropkit.diagnostics.positions import RANGES
from dropkit.diagnostics.sites import UNIT_VARIANTS
from dropkit.diagnostics.variance_shift import VarianceShift

__all__ = ["CHECKS", "LARGE_DATA_EXAMPLES_PER_PARAMETER", "SMALL_DATA_EXAMPLES", "Context", "run_rules"]

# Srivastava et al. 2014, Fig. 10: no gain from dropout on 100 or 500 MNIST training examples.
SMALL_DATA_EXAMPLES = 500
# A heuristic, not a published threshold: at least as many training examples as parameters.
LARGE_DATA_EXAMPLES_PER_PARAMETER = 1.0

_STANDARD = frozenset({"element", "channel", "gaussian", "block", "locked", "unknown"})
_ELEMENTWISE = frozenset({"element", "alpha", "gaussian", "unknown"})
_BN_NETWORK = frozenset({"element", "channel", "alpha", "feature_alpha", "gaussian", "locked", "unknown"})


@dataclass
class Context:
    """What the rules read.

    Attributes:
        flow: the model's flow.
        positions: each site's position (see :mod:`dropkit.diagnostics.positions`).
        n_train: training-set size, if given.
        n_params: parameter count (the model's when not given).
        shifts: measured variance shifts, by BatchNorm path (when example inputs were given).
        absorbed: sites that only hold a rate for a functional call (not checked twice).
    """

    flow: Flow
    positions: dict[SiteUse, str | None]
    n_train: int | None = None
    n_params: int = 0
    shifts: dict[str, VarianceShift] = field(default_factory=dict)
    absorbed: set[SiteUse] = field(default_factory=set)

    def active(self) -> list[SiteUse]:
        """The sites that can drop something and are not just a rate holder."""
        return [use for use in self.flow.uses if use.site.active and use not in self.absorbed]

    def ran(self) -> list[SiteUse]:
        """The active sites that the forward ran (all of them when nothing was traced)."""
        if self.flow.method == "static":
            return []
        return [use for use in self.active() if use.calls > 0]


def _finding(
    code: str, use_or_path: SiteUse | str, message: str, reason: str, fix: str, **data: object
) -> Finding:
    path = use_or_path if isinstance(use_or_path, str) else use_or_path.site.label
    return Finding(code, RULES[code].severity, path, message, reason, fix, dict(data))


def _describe(use: SiteUse) -> str:
    rate = "p unknown" if use.site.rate is None else f"p={use.site.rate:g}"
    return f"{use.site.name} ({rate}) at '{use.site.label}'"


def dk101(context: Context) -> list[Finding]:
    """Dropout feeding a BatchNorm (variance shift), with the measured shift when available."""
    findings = []
    for use in context.ran():
        if use.site.variant not in UNIT_VARIANTS | {"path"}:
            continue
        for path, kind in use.consumers.items():
            if kind != "batchnorm":
                continue
            message = f"{_describe(use)} feeds the BatchNorm '{path}'"
            data: dict[str, object] = {"site": use.site.label, "batchnorm": path, "rate": use.site.rate}
            shift = context.shifts.get(path)
            if shift is not None:
                message += (
                    f"; on the example batch its input's eval/train variance ratio is "
                    f"{shift.measured_mean:.3f} (Li et al. predict {shift.predicted_mean:.3f}; 1 = no shift)"
                )
                data.update(measured_ratio=shift.measured_mean, predicted_ratio=shift.predicted_mean)
            findings.append(
                _finding(
                    "DK101",
                    use,
                    message,
                    "BatchNorm learns its running variance on the training-time input, whose variance "
                    "dropout inflates to (c^2 + v)/q - c^2; in eval the input has variance v, so "
                    "BatchNorm mis-normalizes it by the ratio q*v / (v + (1 - q)*c^2) (Li et al. 2019), "
                    "and every later layer sees shifted activations. dropkit's reproduction "
                    "(REPRODUCTIONS.md, variance-shift: a small conv net on MNIST) measured the shift "
                    "within 0.3 % of this formula; moving dropout after the last BatchNorm won back "
                    "2.7 of the 3.0 accuracy points lost, re-estimating BatchNorm's statistics won back "
                    "none.",
                    "Move the dropout after the last BatchNorm (Linear/Conv -> BatchNorm -> activation -> "
                    "dropout), or keep dropout only in the classifier head; or remove it (BatchNorm "
                    "already regularizes). dropkit.diagnostics.measure reports the shift on your data.",
                    **data,
                )
            )
    return findings


def dk102(context: Context) -> list[Finding]:
    """Dropout on the network's output."""
    return [
        _finding(
            "DK102",
            use,
            f"{_describe(use)} is applied to the model's output: no learned layer comes after it",
            "Dropout regularizes input and hidden units, which the next layer learns to combine; "
            "dropped outputs are zeroed predictions (logits) in training that no layer can "
            "compensate for, and the output layer's rate is 0 (Srivastava et al. 2014).",
            "Remove this dropout, or move it before the last layer (e.g. Dropout -> Linear head).",
            rate=use.site.rate,
        )
        for use in context.ran()
        if use.reaches_output and use.site.variant in UNIT_VARIANTS | {"path"}
    ]


def dk103(context: Context) -> list[Finding]:
    """A rate above the usual range for the site's position."""
    findings = []
    for use in context.active():
        position = context.positions.get(use)
        rate = use.site.rate
        if position is None or rate is None:
            continue
        usual = RANGES[position]
        if rate <= usual.high + 1e-12:
            continue
        where = "" if context.flow.traced else " (position not traced: pass example_inputs for a sharper one)"
        extra = " p = 1 drops everything: the layer's output is all zeros in training." if rate >= 1.0 else ""
        findings.append(
            _finding(
                "DK103",
                use,
                f"{_describe(use)} is above the usual range {usual.low:g}-{usual.high:g} for a "
                f"{position.replace('_', ' ')} site{where}",
                f"Usual rates at this position: {usual.low:g}-{usual.high:g} ({usual.source}). Higher "
                f"rates remove more signal than the network can average out and make it underfit.{extra}",
                f"Use p in [{usual.low:g}, {usual.high:g}] (start at {usual.default:g}); to regularize "
                "more, widen the layer or add data, and confirm with dropkit.diagnostics.sweep.",
                rate=rate,
                position=position,
                low=usual.low,
                high=usual.high,
            )
        )
    return findings


def dk104(context: Context) -> list[Finding]:
    """Element-wise dropout on convolutional feature maps."""
    findings = []
    for use in context.ran():
        if use.site.variant not in _ELEMENTWISE or context.positions.get(use) != "conv":
            continue
        shape = use.input_shapes[0] if use.input_shapes else None
        spatial = len(shape) - 2 if shape is not None else 2
        spatial = spatial if spatial in (1, 2, 3) else 2
        alpha = use.site.variant == "alpha"
        layer = "dropkit.nn.FeatureAlphaDropout" if alpha else f"dropkit.nn.Dropout{spatial}d"
        blocks = (
            "" if alpha else f", or dropkit.nn.DropBlock{spatial}d(p, block_size=...) (contiguous blocks)"
        )
        findings.append(
            _finding(
                "DK104",
                use,
                f"element-wise {_describe(use)} drops single elements of convolutional feature maps"
                + (f" of shape {tuple(shape)}" if shape is not None else ""),
                "Neighbouring activations of a feature map are strongly correlated, so the next "
                "convolution recovers a dropped element from its neighbours and element-wise dropout "
                "hardly regularizes (Tompson et al. 2015); dropping whole channels or contiguous "
                "regions removes the information (Ghiasi et al. 2018). Those gains were measured on "
                "large networks (ImageNet ResNet-50, pose estimation); on a small conv net trained on "
                "5,000 Fashion-MNIST images dropkit's reproduction (REPRODUCTIONS.md, conv-variants) "
                "found element-wise dropout best, and spatial dropout and DropBlock 0.5-1 points "
                "worse.",
                f"Use {layer} (one mask per channel) with p in 0.1-0.3{blocks}, "
                "and keep the change where a validation run (dropkit.diagnostics.sweep) confirms it.",
                rate=use.site.rate,
                shape=list(shape) if shape is not None else None,
            )
        )
    return findings


def dk105(context: Context) -> list[Finding]:
    """Standard dropout in a SELU network."""
    if not context.flow.selu:
        return []
    findings = []
    for use in context.active():
        if use.site.variant not in _STANDARD:
            continue
        channel = use.site.variant in ("channel", "block")
        findings.append(
            _finding(
                "DK105",
                use,
                f"{_describe(use)} is standard dropout in a network with SELU activations",
                "SELU networks keep activations near zero mean and unit variance; standard dropout's "
                "zeros and 1/q scaling shift both and break the self-normalization. Alpha dropout sets "
                "dropped units to SELU's negative saturation value and restores mean and variance with "
                "an affine map (Klambauer et al. 2017). dropkit's reproduction (REPRODUCTIONS.md, "
                "alpha-selu) confirms it at initialization in a 32-layer SELU MLP, but with either "
                "dropout at p = 0.1 that network diverged in training.",
                f"Use {'dropkit.nn.FeatureAlphaDropout' if channel else 'dropkit.nn.AlphaDropout'} "
                "with a small rate (Klambauer et al. use 0.05-0.1), and watch the activations' "
                "variance in training (dropkit.diagnostics.measure).",
                rate=use.site.rate,
            )
        )
    return findings


def dk106(context: Context) -> list[Finding]:
    """Per-time-step masks in a recurrence: loops, ``nn.LSTM(dropout=...)``, sequence inputs."""
    findings = []
    fix = (
        "Draw one mask per sequence: dropkit.nn.LockedDropout on the (T, B, H) sequence between "
        "single-layer recurrent modules, and dropkit.nn.WeightDrop on the hidden-to-hidden weights "
        "for the recurrent connections (AWD-LSTM)."
    )
    reason = (
        "A new mask at every time step injects noise that accumulates along the recurrence and "
        "hurts long-range memory; the variational RNN of Gal & Ghahramani (2016) ties one mask "
        "per sequence to inputs, outputs and recurrent connections, and AWD-LSTM (Merity et al. "
        "2018) drops the recurrent weights once per forward."
    )
    for use in context.active():
        if use.site.variant == "recurrent":
            findings.append(
                Finding(
                    "DK106",
                    "info",
                    use.site.label,
                    f"{_describe(use)} drops the output of every layer but the last with a new "
                    "element-wise mask at each time step",
                    reason,
                    fix,
                    {"rate": use.site.rate},
                )
            )
            continue
        if use.calls == 0 or use.site.variant in ("locked", "path", "weight", "zoneout", "learned"):
            continue
        recurrent = {
            path: kind
            for path, kind in {**use.mixed_consumers, **use.consumers}.items()
            if kind == "recurrent"
        }
        looped = [path for path in recurrent if use.calls > 1 and context.flow.calls.get(path, 0) > 1]
        if looped:
            findings.append(
                _finding(
                    "DK106",
                    use,
                    f"{_describe(use)} runs {use.calls} times in one forward and feeds the recurrent "
                    f"module '{looped[0]}' (run {context.flow.calls[looped[0]]} times): a new mask at "
                    "every step",
                    reason,
                    fix,
                    rate=use.site.rate,
                    recurrent=looped[0],
                )
            )
            continue
        sequence = [
            path
            for path, kind in use.consumers.items()
            if kind == "recurrent" and any(len(shape) == 3 for shape in use.input_shapes)
        ]
        if sequence and use.site.variant in _ELEMENTWISE:
            findings.append(
                Finding(
                    "DK106",
                    "info",
                    use.site.label,
                    f"element-wise {_describe(use)} on the sequence fed to the recurrent module "
                    f"'{sequence[0]}' draws a new mask for every time step",
                    reason,
                    fix,
                    {"rate": use.site.rate, "recurrent": sequence[0]},
                )
            )
    return findings


def dk107(context: Context) -> list[Finding]:
    """Dropout inside a network that normalizes with BatchNorm."""
    ops = context.flow.ops
    total = sum(kind == "batchnorm" for kind, _ in ops)
    if total < 2:
        return []
    findings = []
    for use in context.ran():
        if use.site.variant not in _BN_NETWORK or "batchnorm" in use.consumers.values():
            continue  # a site feeding a BatchNorm directly is DK101
        after = sum(kind == "batchnorm" for kind, _ in ops[use.order :])
        if after == 0:
            continue
        findings.append(
            _finding(
                "DK107",
                use,
                f"{_describe(use)} sits inside a BatchNorm network: {after} of its {total} BatchNorm "
                "layers run after it",
                "BatchNorm already regularizes (Ioffe & Szegedy trained BN-Inception without dropout), "
                "and dropout before BatchNorm layers shifts the variance they learn (Li et al. 2019), "
                "which often costs accuracy: 3 points in a small conv net in dropkit's reproduction "
                "(REPRODUCTIONS.md, variance-shift), nearly all of it won back by moving the dropout "
                "after the last BatchNorm.",
                "Keep dropout only after the last BatchNorm (the classifier head), or remove it; "
                "measure first: dropkit.diagnostics.sweep with p = 0 among the rates.",
                rate=use.site.rate,
                batchnorms_after=after,
            )
        )
    return findings


def dk108(context: Context) -> list[Finding]:
    """A training set so small that whether dropout helps is uncertain."""
    if context.n_train is None or context.n_train > SMALL_DATA_EXAMPLES or not context.active():
        return []
    return [
        _finding(
            "DK108",
            "(model)",
            f"n_train = {context.n_train} training examples (at most {SMALL_DATA_EXAMPLES}): on "
            "training sets this small the evidence on dropout goes both ways",
            "Srivastava et al. (2014, Fig. 10) saw no gain from dropout on 100 and 500 MNIST "
            "examples (784-1024-1024-2048-10): the network still overfits the few examples through "
            "the noise. dropkit's reproduction (REPRODUCTIONS.md, rate-and-size: a 512-512 MLP, "
            "10,000 updates) measured gains of about 2 and 3 points at the same sizes. Which one "
            "you get depends on the model and the training, and on so few examples the spread "
            "between runs is large.",
            "Decide with a validation sweep over p, 0 included (dropkit.diagnostics.sweep), "
            "repeated over seeds; data augmentation, a smaller model and weight decay are the "
            "other levers.",
            n_train=context.n_train,
        )
    ]


def dk109(context: Context) -> list[Finding]:
    """A training set large for the model."""
    if context.n_train is None or context.n_params <= 0 or not context.active():
        return []
    if context.n_train <= SMALL_DATA_EXAMPLES:  # DK108's territory, whatever the model's size
        return []
    if context.n_train < LARGE_DATA_EXAMPLES_PER_PARAMETER * context.n_params:
        return []
    return [
        _finding(
            "DK109",
            "(model)",
            f"n_train = {context.n_train} training examples for {context.n_params} parameters: a model "
            "with more examples than parameters rarely overfits",
            "Dropout trades fit for regularization; with enough data the model underfits instead, "
            "and large models trained on very large data sets do without dropout (PaLM, Chowdhery "
            "et al. 2022), where it helps at most early in training (Liu et al. 2023). The threshold "
            "(examples >= parameters) is a rule of thumb. In dropkit's reproduction (REPRODUCTIONS.md, "
            "early-late) constant dropout cost a small underfitting MLP 1.2 points of test error "
            "and early dropout did not help it.",
            "Try p = 0, or early dropout (dropkit.schedules.EarlyDropout) if the model underfits; "
            "compare with dropkit.diagnostics.sweep.",
            n_train=context.n_train,
            n_params=context.n_params,
        )
    ]


def dk110(context: Context) -> list[Finding]:
    """Dropout that stays on in eval mode."""
    findings = []
    for use in context.flow.uses:
        if not use.eval_rates:
            continue
        rates = [rate for rate in use.eval_rates if rate is not None]
        rate = max(rates) if rates else None
        shown = "an unknown rate" if rate is None else f"p={rate:g}"
        attention = use.site.variant == "attention"
        what = "dropout_p" if attention else "dropout"
        findings.append(
            _finding(
                "DK110",
                use,
                f"{use.site.name} from '{use.site.path or '(model)'}' dropped with {shown} although "
                f"the model was in eval mode ({len(use.eval_rates)} call(s) in the example forward)",
                "scaled_dot_product_attention applies dropout_p whenever it is positive and "
                "torch.nn.functional.dropout defaults to training=True: such dropout stays on at "
                "test time, making predictions random and evaluation wrong.",
                f"Pass {what} only in training: dropout_p=self.p if self.training else 0.0 "
                "(F.dropout(x, p, training=self.training)); for Monte Carlo dropout use "
                "dropkit.mc_dropout / dropkit.mc_predict, which turn dropout on explicitly.",
                rate=rate,
                calls=len(use.eval_rates),
            )
        )
    return findings


CHECKS: tuple[Callable[[Context], list[Finding]], ...] = (
    dk101,
    dk102,
    dk103,
    dk104,
    dk105,
    dk106,
    dk107,
    dk108,
    dk109,
    dk110,
)


def run_rules(context: Context) -> list[Finding]:
    """Every rule's findings, errors first, then warnings, then infos (each in rule order)."""
    findings = [finding for check in CHECKS for finding in check(context)]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda finding: order[finding.severity])
