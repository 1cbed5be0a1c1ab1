"""``dropkit.diagnostics.check``: every rule DK101-DK110 fires on a model built to break it, not on
its repaired twin, and on nothing in the clean-architecture set (Hugging Face BERT / ViT /
ConvNext from tiny configs, dropkit's and torch's transformer blocks, timm and torchvision
models where importable).  Also: what the traced flow records, the static (nn.Sequential)
mode, the report's text and JSON, and argument checks."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.diagnostics import RULES, DiagnosticReport, check
from dropkit.diagnostics.flow import sequential_flow, trace_flow
from dropkit.diagnostics.sites import module_site
from tests.real_models import import_or_skip, tiny_bert, tiny_convnext, tiny_vit


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small models run fastest, and steadiest on a shared machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Minimal models that break one rule each, and their repaired twins


class LoopRNN(nn.Module):
    """An LSTM cell unrolled by hand, with ``dropout`` applied to the input at every step."""

    def __init__(self, dropout: nn.Module) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(4, 8)
        self.drop = dropout
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(x.shape[1], 8)
        if isinstance(self.drop, dropkit.nn.LockedDropout):
            x = self.drop(x)  # one mask for the whole sequence
            for t in range(x.shape[0]):
                h, c = self.cell(x[t], (h, c))
        else:
            for t in range(x.shape[0]):
                h, c = self.cell(self.drop(x[t]), (h, c))
        return self.out(h)


class SequenceLSTM(nn.Module):
    def __init__(self, before: nn.Module, layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.before = before
        self.lstm = nn.LSTM(4, 8, num_layers=layers, dropout=dropout)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.before(x))[0][-1])


class Attention(nn.Module):
    """Self-attention calling SDPA with ``dropout_p`` always (``broken``) or only in training."""

    def __init__(self, broken: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)
        self.broken = broken
        self.dropout_p = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        rate = self.dropout_p if (self.broken or self.training) else 0.0
        return self.out(F.scaled_dot_product_attention(q, k, v, dropout_p=rate))


class FunctionalDropout(nn.Module):
    """``F.dropout`` without ``training=`` (``broken``: on in eval) or with it."""

    def __init__(self, broken: bool) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.broken = broken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        h = F.dropout(h, 0.2) if self.broken else F.dropout(h, 0.2, training=self.training)
        return self.out(h)


def _mlp(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def _conv_net(dropout: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        dropout,
        nn.Conv2d(8, 8, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def _bn_net(dropout: nn.Module, head_dropout: float = 0.5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        dropout,
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(head_dropout),
        nn.Linear(8, 2),
    )


VECTOR = torch.randn(16, 8)
IMAGE = torch.randn(4, 3, 12, 12)
SEQUENCE = torch.randn(5, 3, 4)
TOKENS = torch.randn(2, 6, 8)

# code -> (broken model, repaired model, example inputs, check keywords, site path of the finding)
Case = tuple[Callable[[], nn.Module], Callable[[], nn.Module], Any, dict[str, Any], str]
CASES: dict[str, Case] = {
    "DK101": (
        lambda: _mlp(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)),
        lambda: _mlp(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)),
        VECTOR,
        {},
        "1",
    ),
    "DK102": (
        lambda: _mlp(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2), nn.Dropout(0.2)),
        lambda: _mlp(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2)),
        VECTOR,
        {},
        "3",
    ),
    "DK103": (
        lambda: _mlp(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.8), nn.Linear(8, 2)),
        lambda: _mlp(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)),
        VECTOR,
        {},
        "2",
    ),
    "DK104": (
        lambda: _conv_net(nn.Dropout(0.2)),
        lambda: _conv_net(nn.Dropout2d(0.2)),
        IMAGE,
        {},
        "2",
    ),
    "DK105": (
        lambda: _mlp(nn.Linear(8, 8), nn.SELU(), nn.Dropout(0.1), nn.Linear(8, 2)),
        lambda: _mlp(nn.Linear(8, 8), nn.SELU(), nn.AlphaDropout(0.1), nn.Linear(8, 2)),
        VECTOR,
        {},
        "2",
    ),
    "DK106": (
        lambda: LoopRNN(nn.Dropout(0.3)),
        lambda: LoopRNN(dropkit.nn.LockedDropout(0.3)),
        SEQUENCE,
        {},
        "drop",
    ),
    "DK107": (
        lambda: _bn_net(nn.Dropout2d(0.1)),
        lambda: _bn_net(nn.Identity()),
        IMAGE,
        {},
        "3",
    ),
    "DK108": (
        lambda: _mlp(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 2)),
        lambda: _mlp(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)),
        VECTOR,
        {"n_train": 100},
        "(model)",
    ),
    "DK109": (
        lambda: _mlp(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 2)),
        lambda: _mlp(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2)),
        VECTOR,
        {"n_train": 100_000},
        "(model)",
    ),
    "DK110": (
        lambda: Attention(broken=True),
        lambda: Attention(broken=False),
        TOKENS,
        {},
        "(model) [scaled_dot_product_attention]",
    ),
}


def test_every_rule_has_a_case() -> None:
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_rule_fires_on_the_broken_model_and_not_on_the_repaired_one(code: str) -> None:
    broken, repaired, inputs, options, path = CASES[code]
    report = check(broken(), inputs, **options)
    found = [finding for finding in report.findings if finding.code == code]
    assert len(found) == 1, report
    finding = found[0]
    assert finding.path == path
    assert finding.severity == RULES[code].severity
    assert finding.reason
    assert finding.fix
    assert check(repaired(), inputs, **options).findings == [], check(repaired(), inputs, **options)


@pytest.mark.parametrize("code", sorted(CASES))
def test_a_finding_quotes_the_reproductions_of_its_rule(code: str) -> None:
    """A rule that names ``dropkit reproduce`` experiments cites each one in its finding's
    reason, next to REPRODUCTIONS.md where their numbers are; the names are registered ones."""
    from dropkit.experiments.reproduce import names

    broken, _, inputs, options, _ = CASES[code]
    (finding,) = [f for f in check(broken(), inputs, **options).findings if f.code == code]
    reproductions = RULES[code].reproductions
    assert set(reproductions) <= set(names()), reproductions
    for name in reproductions:
        assert name in finding.reason, (name, finding.reason)
    assert ("REPRODUCTIONS.md" in finding.reason) == bool(reproductions), finding.reason


def test_rules_quote_the_reproductions_that_bear_on_them() -> None:
    # The claims behind these rules were reproduced; the ones without a reproduction stay empty.
    quoted = {code for code, rule in RULES.items() if rule.reproductions}
    assert quoted == {"DK101", "DK104", "DK105", "DK107", "DK108", "DK109"}


def test_each_finding_names_its_rule_source_and_data() -> None:
    broken, _, inputs, _, _ = CASES["DK103"]
    (finding,) = check(broken(), inputs).findings
    record = finding.to_dict()
    assert record["rule"] == "rate-above-usual-range"
    assert record["data"] == {"rate": 0.8, "position": "dense", "low": 0.3, "high": 0.5}
    assert "Srivastava" in finding.reason
    assert "[0.3, 0.5]" in finding.fix


def test_dk101_reports_the_measured_variance_shift_with_data() -> None:
    torch.manual_seed(0)
    model = _mlp(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    report = check(model, torch.randn(512, 8))
    (finding,) = report.findings
    assert finding.code == "DK101"
    measured, predicted = finding.data["measured_ratio"], finding.data["predicted_ratio"]
    # Linear outputs of standard-normal inputs have mean ~0, so both are close to q = 0.5 (the
    # exact agreement, within derived bounds, is in test_diagnostics_measure.py).
    assert 0.4 < predicted <= 0.5 + 1e-9
    assert abs(measured - predicted) < 0.05
    assert "Li et al. predict" in finding.message
    assert check(model, torch.randn(8, 8), measure_shift=False).findings[0].data.keys() == {
        "site",
        "batchnorm",
        "rate",
    }


@pytest.mark.parametrize(
    ("model", "severity", "text"),
    [
        (SequenceLSTM(nn.Identity(), layers=2, dropout=0.3), "info", "every layer but the last"),
        (SequenceLSTM(nn.Dropout(0.3)), "info", "on the sequence fed to"),
    ],
    ids=["lstm-dropout", "sequence-input"],
)
def test_dk106_also_covers_lstm_dropout_and_elementwise_sequence_dropout(
    model: nn.Module, severity: str, text: str
) -> None:
    (finding,) = check(model, SEQUENCE).findings
    assert (finding.code, finding.severity) == ("DK106", severity)
    assert text in finding.message
    assert check(SequenceLSTM(dropkit.nn.LockedDropout(0.3)), SEQUENCE).findings == []


def test_dk106_for_lstm_dropout_needs_no_inputs() -> None:
    assert check(SequenceLSTM(nn.Identity(), layers=2, dropout=0.3)).codes() == ["DK106"]


def test_dk110_catches_functional_dropout_left_on_in_eval() -> None:
    (finding,) = check(FunctionalDropout(broken=True), VECTOR).findings
    assert finding.code == "DK110"
    assert finding.path == "(model) [dropout]"
    assert finding.data == {"rate": 0.2, "calls": 1}
    assert check(FunctionalDropout(broken=False), VECTOR).findings == []


def test_dk104_suggests_the_spatial_layer_of_the_map_rank() -> None:
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Dropout(0.2), nn.Conv1d(8, 8, 3))
    (finding,) = check(model, torch.randn(2, 3, 16)).findings
    assert finding.code == "DK104"
    assert "dropkit.nn.Dropout1d" in finding.fix
    assert "DropBlock1d" in finding.fix
    assert finding.data["shape"] == [2, 8, 14]


def test_dk109_is_not_reported_for_a_small_training_set() -> None:
    model = _mlp(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    assert check(model, n_train=400).codes() == ["DK108"]  # 400 > 12 parameters, but tiny data
    assert check(model, n_train=400, n_params=10**6).codes() == ["DK108"]
    assert check(model, n_train=10**5, n_params=10**6).codes() == []


def test_zero_rate_sites_are_never_reported() -> None:
    model = _mlp(nn.Linear(8, 8), nn.Dropout(0.0), nn.BatchNorm1d(8), nn.Linear(8, 2), nn.Dropout(0.0))
    report = check(model, VECTOR, n_train=10)
    assert report.findings == []
    assert [site.rate for site in report.sites] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Without example inputs


def test_sequential_models_are_checked_without_inputs() -> None:
    model = _mlp(
        nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2), nn.Dropout(0.1)
    )
    report = check(model)
    assert report.method == "sequential"
    assert report.codes() == ["DK101", "DK102"]
    assert [site.calls for site in report.sites] == [None, None]
    assert check(_conv_net(nn.Dropout(0.2))).codes() == ["DK104"]


def test_other_containers_without_inputs_get_the_module_rules_and_a_note() -> None:
    model = LoopRNN(nn.Dropout(0.9))
    report = check(model)
    assert report.method == "static"
    assert report.codes() == ["DK103"]  # the rate (at an unknown position); the loop needs a trace
    assert "pass example_inputs" in report.notes[0]
    assert "not traced" in report.findings[0].message


# ---------------------------------------------------------------------------------------------
# What the flow records


def test_the_trace_follows_dropout_through_parameter_free_functions_only() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)
            self.drop = nn.Dropout(0.5)
            self.norm = nn.BatchNorm1d(8)
            self.skip_norm = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(self.linear(x))
            a = self.norm(F.relu(h) * 2.0 + 1.0)  # the dropped tensor itself: direct
            b = self.skip_norm(h + x)  # mixed with un-dropped data
            return self.head(a + b)

    flow = trace_flow(Net(), VECTOR)
    (use,) = flow.uses
    assert use.consumers == {"norm": "batchnorm"}
    assert use.mixed_consumers == {"skip_norm": "batchnorm"}
    assert [producer.kind for producer in use.producers] == ["linear"]
    assert use.input_shapes == [(16, 8)]
    assert not use.reaches_output
    assert [kind for kind, _ in flow.ops] == ["linear", "batchnorm", "batchnorm", "linear"]
    assert check(Net(), VECTOR).codes() == ["DK101"]


def test_the_trace_restores_flags_and_changes_no_state() -> None:
    model = _bn_net(nn.Dropout2d(0.1))
    model[1].train()
    model[3].eval()
    flags = {name: module.training for name, module in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    check(model, IMAGE)
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())


def test_a_failing_example_forward_raises_with_context() -> None:
    with pytest.raises(RuntimeError, match="the example forward of Sequential failed") as info:
        check(_mlp(nn.Linear(8, 2)), torch.randn(3, 5))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_model_in_mc_mode_is_refused() -> None:
    model = _mlp(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    with dropkit.mc_dropout(model), pytest.raises(RuntimeError, match="the model is in an MC dropout mode"):
        check(model, VECTOR)
    assert check(model, VECTOR).findings == []


def test_sites_of_every_library_are_recognised() -> None:
    assert module_site(nn.Dropout1d(0.1)) == ("torch.nn.Dropout1d", "channel", 0.1)
    assert module_site(dropkit.nn.DropBlock2d(0.1, block_size=3)) == ("dropkit.nn.DropBlock2d", "block", 0.1)
    assert module_site(dropkit.nn.GaussianNoise(0.3)) == ("dropkit.nn.GaussianNoise", "noise", None)
    assert module_site(nn.MultiheadAttention(8, 2, dropout=0.2)) == (
        "torch.nn.MultiheadAttention",
        "attention",
        0.2,
    )
    assert module_site(nn.LSTM(2, 2, num_layers=2, dropout=0.4)) == ("torch.nn.LSTM", "recurrent", 0.4)
    assert module_site(nn.LSTM(2, 2)) is None

    class DropEverything(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop_rate = 0.7

    assert module_site(DropEverything()) == (f"{__name__}.{DropEverything.__qualname__}", "unknown", 0.7)


def test_sequential_flow_matches_the_trace_on_a_sequential() -> None:
    model = _bn_net(nn.Dropout2d(0.1))
    traced, ordered = trace_flow(model, IMAGE), sequential_flow(model)
    assert [(use.site, use.consumers, use.order) for use in traced.uses] == [
        (use.site, use.consumers, use.order) for use in ordered.uses
    ]
    assert traced.ops == ordered.ops


# ---------------------------------------------------------------------------------------------
# Clean architectures: no finding


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_bert_has_no_finding(transformers: Any, attn_implementation: str) -> None:
    model = tiny_bert(transformers, attn_implementation)
    report = check(model, {"input_ids": torch.randint(0, 99, (2, 7))}, n_train=10_000)
    assert report.findings == [], report
    attention = [site for site in report.sites if site.variant == "attention"]
    assert len(attention) == 2
    assert all(site.rate == 0.1 for site in attention)
    assert sum(site.note.startswith("holds the rate") for site in report.sites) in (0, 2)
    assert {site.position for site in report.sites} <= {"transformer", "attention"}


def test_vit_and_convnext_have_no_finding(transformers: Any) -> None:
    vit = tiny_vit(transformers)
    report = check(vit, {"pixel_values": torch.randn(2, 3, 16, 16)})
    assert report.findings == [], report
    assert len(report.sites) >= 3
    convnext = tiny_convnext(transformers)
    report = check(convnext, {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert report.findings == [], report
    assert {site.variant for site in report.sites} == {"path"}


@pytest.mark.parametrize("norm_first", [True, False])
def test_dropkit_transformer_block_has_no_finding(norm_first: bool) -> None:
    block = dropkit.nn.TransformerEncoderBlock(32, 4, 64, norm_first=norm_first)
    report = check(block, torch.randn(2, 10, 32))
    assert report.findings == [], report
    assert {site.path: site.position for site in report.sites} == {
        "attention": "attention",
        "attention_residual": "transformer",
        "ffn_dropout": "transformer",
        "ffn_residual": "transformer",
    }


def test_torch_transformer_encoder_has_no_finding() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    report = check(encoder, torch.randn(2, 10, 32))
    assert report.findings == []
    assert all(site.calls == 1 for site in report.sites)  # the fused eval fast path was avoided


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("resnet18", {"drop_rate": 0.2, "drop_path_rate": 0.1}),
        ("vit_tiny_patch16_224", {"drop_rate": 0.1, "drop_path_rate": 0.1, "img_size": 32}),
        ("convnext_atto", {"drop_rate": 0.1, "drop_path_rate": 0.1}),
    ],
)
def test_timm_models_have_no_finding(name: str, options: dict[str, Any]) -> None:
    timm = import_or_skip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=3, **options)
    report = check(model, torch.randn(2, 3, 32, 32))
    assert report.findings == [], report
    assert report.sites


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_models_have_no_finding(name: str) -> None:
    models = import_or_skip("torchvision.models")
    model = getattr(models, name)(weights=None, num_classes=3)
    report = check(model, torch.randn(2, 3, 64, 64))
    assert report.findings == [], report


# ---------------------------------------------------------------------------------------------
# The report


def test_report_text_and_json() -> None:
    broken, _, inputs, _, _ = CASES["DK101"]
    report = check(broken(), inputs, n_train=200)
    text = str(report)
    assert "DK101 warning 1:" in text
    assert "DK108 info" in text
    assert "why: " in text
    assert "fix: " in text
    assert "findings: 1 warning, 1 info" in text
    data = json.loads(report.to_json())
    assert data["counts"] == {"error": 0, "warning": 1, "info": 1}
    assert [finding["code"] for finding in data["findings"]] == ["DK101", "DK108"]
    assert data["findings"][0]["source"].startswith("Li, Chen, Hu, Yang")
    assert data["sites"][0] == {
        "path": "1",
        "name": "torch.nn.Dropout",
        "variant": "element",
        "rate": 0.5,
        "position": "dense",
        "calls": 1,
        "note": "",
    }
    assert report.worst() == "warning"


def test_findings_are_ordered_by_severity() -> None:
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention(broken=True)
            self.drop = nn.Dropout(0.9)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(self.drop(x))

    report = check(Both(), TOKENS, n_train=10)
    assert [finding.severity for finding in report.findings] == ["error", "warning", "info"]
    assert report.codes() == ["DK110", "DK103", "DK108"]
    assert isinstance(report, DiagnosticReport)
    assert report.worst() == "error"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "not a model"}, TypeError, "model must be a torch.nn.Module, got str"),
        ({"example_inputs": [1, 2]}, TypeError, "example_inputs must be a tensor, a tuple"),
        ({"n_train": 0}, ValueError, "n_train must be >= 1, got 0"),
        ({"n_train": 1.5}, TypeError, "n_train must be an int"),
        ({"n_params": -3}, ValueError, "n_params must be >= 1, got -3"),
        ({"repeats": 1}, ValueError, "repeats must be >= 2, got 1"),
        ({"measure_shift": 1}, TypeError, "measure_shift must be a bool"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments: dict[str, Any] = {"model": _mlp(nn.Linear(2, 2)), **kwargs}
    with pytest.raises(error, match=match):
        check(**arguments)
