"""``dropkit.convert`` / ``dropkit.revert``: torch, timm, torchvision and Hugging Face dropout
modules become dropkit layers with the same rates and options (eval outputs bit for bit the
same, training runs, MC mode sees every converted site) and come back exactly; the report
lists what was replaced, what was skipped and why, and the functional calls seen."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.interop.convert import ConversionReport, FunctionalCall, Replacement, Skipped
from dropkit.nn._base import _RandomLayer
from tests.conftest import binomial_tolerance
from tests.layer_specs import realised
from tests.real_models import (
    fake_class,
    import_or_skip,
    tiny_bert,
    tiny_convnext,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
)

TORCH_TO_DROPKIT = {
    nn.Dropout: dropkit.nn.Dropout,
    nn.Dropout1d: dropkit.nn.Dropout1d,
    nn.Dropout2d: dropkit.nn.Dropout2d,
    nn.Dropout3d: dropkit.nn.Dropout3d,
    nn.AlphaDropout: dropkit.nn.AlphaDropout,
    nn.FeatureAlphaDropout: dropkit.nn.FeatureAlphaDropout,
}


class AllTorchDropouts(nn.Module):
    """One of every torch dropout class, each on an input of the rank it reads like dropkit."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.2)
        self.alpha = nn.AlphaDropout(0.1)
        self.conv1 = nn.Conv1d(3, 4, 3)
        self.drop1d = nn.Dropout1d(0.3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.drop2d = nn.Dropout2d(0.4, inplace=True)
        self.feature_alpha = nn.FeatureAlphaDropout(0.25)
        self.drop3d = nn.Dropout3d(0.5)

    def forward(
        self, x: torch.Tensor, seq: torch.Tensor, image: torch.Tensor, volume: torch.Tensor
    ) -> torch.Tensor:
        a = self.alpha(self.drop(self.linear(x))).sum()
        b = self.drop1d(self.conv1(seq)).sum()
        c = self.feature_alpha(self.drop2d(self.norm(self.conv2(image)))).sum()
        return a + b + c + self.drop3d(volume).sum()


def _inputs(batch: int = 4) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(batch, 6),
        torch.randn(batch, 3, 10),
        torch.randn(batch, 3, 8, 8),
        torch.randn(batch, 2, 3, 3, 3),
    )


DROPOUT_NAMES = ["drop", "alpha", "drop1d", "drop2d", "feature_alpha", "drop3d"]


def _dropout_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) in TORCH_TO_DROPKIT]


def _grads_finite(model: nn.Module) -> bool:
    grads = [param.grad for param in model.parameters() if param.requires_grad]
    return any(grad is not None for grad in grads) and all(
        bool(torch.isfinite(grad).all()) for grad in grads if grad is not None
    )


# ---------------------------------------------------------------------------------------------
# torch.nn dropout modules


@pytest.mark.parametrize("cls", list(TORCH_TO_DROPKIT), ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_each_torch_class_becomes_its_dropkit_layer_with_the_same_options(
    cls: type[nn.Module], p: float, inplace: bool
) -> None:
    model = nn.Sequential(nn.Identity(), cls(p, inplace)).eval()
    report = dropkit.convert(model)
    layer = model[1]
    assert type(layer) is TORCH_TO_DROPKIT[cls]
    assert (layer.p, layer.inplace, layer.training) == (p, inplace, False)
    assert report.replaced == [Replacement("1", f"torch.nn.{cls.__name__}", f"dropkit.nn.{cls.__name__}", p)]
    assert report.skipped == []
    assert report.unchanged == []
    assert report.functional_calls is None


def test_in_place_conversion_keeps_training_flags_and_structure() -> None:
    model = AllTorchDropouts()
    model.drop1d.eval()
    before = {name: module.training for name, module in model.named_modules()}
    report = dropkit.convert(model)
    assert report.model is model
    assert [item.name for item in report.replaced] == DROPOUT_NAMES
    assert {name: module.training for name, module in model.named_modules()} == before
    for name in DROPOUT_NAMES:
        assert isinstance(getattr(model, name), _RandomLayer), name
    assert _dropout_names(model) == []


def test_copy_leaves_the_original_untouched() -> None:
    model = AllTorchDropouts()
    modules = dict(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    report = dropkit.convert(model, copy=True)
    assert report.model is not model
    assert dict(model.named_modules()) == modules  # the very same objects
    assert _dropout_names(model) == DROPOUT_NAMES
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert _dropout_names(report.model) == []
    assert report.model.linear.weight is not model.linear.weight
    assert torch.equal(report.model.linear.weight, model.linear.weight)


def test_revert_restores_the_exact_modules_attributes_and_state_dict() -> None:
    model = AllTorchDropouts()
    originals = {name: getattr(model, name) for name in DROPOUT_NAMES}
    attributes = {name: dict(vars(module)) for name, module in originals.items()}
    state = copy.deepcopy(model.state_dict())
    dropkit.convert(model)
    assert model.state_dict().keys() == state.keys()  # dropkit's counters are not persistent
    report = dropkit.revert(model)
    assert [item.name for item in report.replaced] == DROPOUT_NAMES
    assert [item.new_class for item in report.replaced] == [
        f"torch.nn.{type(module).__name__}" for module in originals.values()
    ]
    for name, module in originals.items():
        assert getattr(model, name) is module
        assert type(module) in TORCH_TO_DROPKIT
        assert vars(module) == attributes[name]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert dropkit.revert(model).replaced == []  # nothing left to revert


def test_revert_keeps_the_current_training_flag_and_a_changed_rate() -> None:
    model = nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.2))
    dropkit.convert(model)
    model.eval()
    model[0].p = 0.35  # e.g. a rate schedule
    report = dropkit.revert(model)
    assert [type(module) for module in model] == [nn.Dropout, nn.Dropout]
    assert (model[0].p, model[1].p) == (0.35, 0.2)
    assert not model[0].training
    assert not model[1].training
    assert [item.rate for item in report.replaced] == [0.35, 0.2]


def test_revert_of_a_copy_leaves_the_converted_model() -> None:
    model = nn.Sequential(nn.Dropout(0.1))
    dropkit.convert(model)
    report = dropkit.revert(model, copy=True)
    assert type(report.model[0]) is nn.Dropout
    assert report.model[0].p == 0.1
    assert isinstance(model[0], dropkit.nn.Dropout)


def test_converted_models_survive_deepcopy_and_pickle_and_still_revert() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.3))
    dropkit.convert(model)
    for twin in (copy.deepcopy(model), _pickled(model)):
        dropkit.revert(twin)
        assert type(twin[1]) is nn.Dropout
        assert twin[1].p == 0.3
    assert isinstance(model[1], dropkit.nn.Dropout)


def _pickled(model: nn.Module) -> nn.Module:
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded: nn.Module = torch.load(buffer, weights_only=False)
    return loaded


def test_converting_twice_replaces_nothing_the_second_time() -> None:
    model = AllTorchDropouts()
    first = dropkit.convert(model)
    layers = [getattr(model, name) for name in DROPOUT_NAMES]
    second = dropkit.convert(model)
    assert len(first.replaced) == 6
    assert second.replaced == []
    assert second.skipped == []
    assert second.unchanged == DROPOUT_NAMES
    assert [getattr(model, name) for name in DROPOUT_NAMES] == layers


def test_native_dropkit_layers_are_left_alone_both_ways() -> None:
    native = dropkit.nn.Dropout2d(0.3, channels_last=True)
    assert isinstance(native, nn.Dropout2d)  # why "already dropkit" is checked first
    model = nn.Sequential(native, nn.Dropout(0.1))
    report = dropkit.convert(model)
    assert model[0] is native
    assert report.unchanged == ["0"]
    assert [item.name for item in report.replaced] == ["1"]
    reverted = dropkit.revert(model)
    assert model[0] is native
    assert reverted.unchanged == ["0"]
    assert type(model[1]) is nn.Dropout


def test_a_subclass_with_code_of_its_own_is_skipped() -> None:
    class ScaledDropout(nn.Dropout):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(input)

    model = nn.Sequential(ScaledDropout(0.2))
    report = dropkit.convert(model)
    assert type(model[0]) is ScaledDropout
    assert report.replaced == []
    assert report.skipped == [Skipped("0", report.skipped[0].module_class, report.skipped[0].reason)]
    assert "subclass of torch.nn.Dropout" in report.skipped[0].reason


def test_an_unknown_dropout_like_class_is_listed_as_skipped() -> None:
    class MyDropout(nn.Module):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return input

    report = dropkit.convert(nn.Sequential(nn.Linear(2, 2), MyDropout()))
    assert [(skip.name, skip.reason) for skip in report.skipped] == [
        ("1", "not a dropout class that dropkit.convert knows")
    ]


def test_a_module_shared_by_two_parents_stays_shared() -> None:
    shared = nn.Dropout(0.2)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    report = dropkit.convert(model)
    assert model[0][0] is model[1][0]
    assert isinstance(model[0][0], dropkit.nn.Dropout)
    assert [item.name for item in report.replaced] == ["0.0"]
    dropkit.revert(model)
    assert model[0][0] is shared
    assert model[1][0] is shared


def test_a_model_that_is_itself_a_dropout_module() -> None:
    module = nn.Dropout(0.4)
    report = dropkit.convert(module)
    assert type(report.model) is dropkit.nn.Dropout
    assert report.model.p == 0.4
    assert [item.name for item in report.replaced] == [""]
    assert "(model): torch.nn.Dropout -> dropkit.nn.Dropout (p=0.4)" in str(report)
    assert dropkit.revert(report.model).model is module


def test_hooks_move_with_the_module() -> None:
    calls: list[str] = []
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    handle = model[1].register_forward_hook(
        lambda module, args, output: calls.append(type(module).__module__)
    )
    x = torch.randn(3, 2)
    dropkit.convert(model)
    model(x)
    dropkit.revert(model)
    model(x)
    handle.remove()
    model(x)
    assert calls == ["dropkit.nn.dropout", "torch.nn.modules.dropout"]


def test_private_framework_attributes_are_carried_over() -> None:
    module = nn.Dropout(0.1)
    module._is_hf_initialized = True
    model = nn.Sequential(module)
    dropkit.convert(model)
    assert model[0]._is_hf_initialized is True


def test_an_unknown_public_attribute_means_an_unknown_version() -> None:
    module = nn.Dropout(0.1)
    module.mode = "fancy"
    report = dropkit.convert(nn.Sequential(module))
    assert report.replaced == []
    assert "unknown ['mode']" in report.skipped[0].reason


def test_report_summary() -> None:
    report = dropkit.convert(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.25), nn.AlphaDropout(0.5)))
    assert isinstance(report, ConversionReport)
    assert (
        str(report)
        == report.summary()
        == textwrap.dedent(
            """\
        dropkit.convert: 2 replaced, 0 skipped, 0 dropkit layers unchanged
        replaced:
          1: torch.nn.Dropout -> dropkit.nn.Dropout (p=0.25)
          2: torch.nn.AlphaDropout -> dropkit.nn.AlphaDropout (p=0.5)
        functional dropout calls: not inspected (pass example_inputs= to record them)"""
        )
    )
    assert repr(report).startswith("ConversionReport(direction='convert', replaced=[")  # no model


def test_eval_outputs_are_bit_identical_after_conversion() -> None:
    model = AllTorchDropouts().eval()
    inputs = _inputs()
    with torch.no_grad():
        before = model(*inputs)
    converted = dropkit.convert(model, copy=True).model
    with torch.no_grad():
        assert torch.equal(converted(*inputs), before)


def test_a_training_step_runs_with_finite_gradients() -> None:
    model = dropkit.convert(AllTorchDropouts(), copy=True).model.train()
    loss = model(*_inputs())
    loss.backward()
    assert torch.isfinite(loss)
    assert _grads_finite(model)
    assert all(int(getattr(model, name).rng_step) == 1 for name in DROPOUT_NAMES)


def test_mc_dropout_sees_every_converted_site() -> None:
    model = AllTorchDropouts()
    report = dropkit.convert(model)
    model.eval()
    inputs = _inputs()
    with dropkit.mc_dropout(model) as handle:
        first, second = model(*inputs), model(*inputs)
    assert {item.name for item in report.replaced} <= set(handle.modules)
    assert not torch.equal(first, second)


def test_converted_layers_drop_at_the_original_rate() -> None:
    dropkit.manual_seed(7)
    model = dropkit.convert(nn.Sequential(nn.Dropout(0.3), nn.Dropout2d(0.6)), copy=True).model.train()
    x = torch.ones(50_000)
    zeros = float((model[0](x) == 0).float().mean())
    assert abs(zeros - 0.3) < binomial_tolerance(0.3, x.numel())
    maps = model[1](torch.ones(200, 100, 2, 2))
    channel_zeros = float((maps[:, :, 0, 0] == 0).float().mean())
    assert abs(channel_zeros - 0.6) < binomial_tolerance(0.6, 200 * 100)
    assert bool(((maps == 0) | (maps == 1 / (1 - realised(0.6)))).all())  # the realised keep rate


def test_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        dropkit.convert("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got int"):
        dropkit.revert(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"copy must be a bool, got str \('yes'\)"):
        dropkit.convert(nn.Dropout(), copy="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor, a tuple .* got list"):
        dropkit.convert(nn.Dropout(), example_inputs=[torch.ones(2)])


def test_refused_inside_an_mc_mode() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    with dropkit.mc_dropout(model), pytest.raises(RuntimeError, match="in an MC dropout mode"):
        dropkit.convert(model[1])
    assert type(model[1]) is nn.Dropout


# ---------------------------------------------------------------------------------------------
# Functional calls


class FunctionalBlock(nn.Module):
    """Dropout as functional calls (not replaceable), next to a module that is."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.p = 0.15
        self.attn_drop = nn.Dropout(0.2)  # a rate holder, never called
        self.out_drop = nn.Dropout(0.3)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(x))
        x = F.dropout(x, self.p, self.training)
        x = F.alpha_dropout(x, 0.05, self.training)
        q = x.view(x.shape[0], 2, 2, 2)  # (batch, heads, tokens, dim)
        p = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, q, q, dropout_p=p).reshape(x.shape)
        # No dropout even in training; in eval (dropout_p=0 in both) it cannot be told apart from
        # the call above, so it is counted with the rate found on the module, as mc_dropout would.
        x = F.scaled_dot_product_attention(q, q, q).reshape(x.shape)
        return self.out_drop(x)


def test_functional_calls_are_listed_with_example_inputs() -> None:
    model = nn.Sequential(FunctionalBlock(), nn.Linear(8, 2))
    report = dropkit.convert(model, example_inputs=torch.randn(4, 8))
    block = "tests.test_convert.FunctionalBlock"
    assert report.functional_calls == [
        FunctionalCall("0", block, "torch.nn.functional.dropout", 0.15, 1),
        FunctionalCall("0", block, "torch.nn.functional.alpha_dropout", 0.05, 1),
        FunctionalCall("0", block, "torch.nn.functional.scaled_dot_product_attention", 0.2, 2),
    ]
    assert [(item.name, item.called) for item in report.replaced] == [
        ("0.attn_drop", False),
        ("0.out_drop", True),
    ]
    text = str(report)
    assert (
        "0.attn_drop: torch.nn.Dropout -> dropkit.nn.Dropout (p=0.2; not called by the example forward)"
        in text
    )
    assert (
        "0 (tests.test_convert.FunctionalBlock): "
        "torch.nn.functional.scaled_dot_product_attention, p=0.2, 2 calls" in text
    )


def test_functional_calls_in_eval_with_an_unknown_rate() -> None:
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, 0.1 if self.training else 0.0, self.training)

    report = dropkit.convert(nn.Sequential(Block()), example_inputs=(torch.ones(2, 3),))
    assert report.functional_calls is not None
    assert [(call.function, call.rate, call.calls) for call in report.functional_calls] == [
        ("torch.nn.functional.dropout", None, 1)
    ]
    assert "p unknown (0 in eval)" in str(report)


def test_example_inputs_as_keyword_arguments() -> None:
    class Keywords(nn.Module):
        def forward(self, *, x: torch.Tensor, scale: float) -> torch.Tensor:
            return F.dropout(x * scale, 0.4, self.training)

    report = dropkit.convert(Keywords(), example_inputs={"x": torch.ones(2), "scale": 2.0})
    assert report.functional_calls is not None
    assert [call.rate for call in report.functional_calls] == [0.4]


def test_inspection_changes_no_state() -> None:
    model = nn.Sequential(FunctionalBlock(), dropkit.nn.Dropout(0.5)).train()
    model[0].norm.eval()
    flags = {name: module.training for name, module in model.named_modules()}
    stats = copy.deepcopy(model[0].norm.state_dict())
    x = torch.randn(4, 8)
    rng = torch.get_rng_state()
    functions = {
        name: getattr(F, name) for name in ("dropout", "alpha_dropout", "scaled_dot_product_attention")
    }
    dropkit.convert(model, example_inputs=x)
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert all(torch.equal(stats[key], value) for key, value in model[0].norm.state_dict().items())
    assert int(model[1].rng_step) == 0  # the dropkit layer drew nothing
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: getattr(F, name) for name in functions} == functions  # patches removed


def test_multihead_attention_dropout_is_reported_as_skipped_not_as_calls() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1)
    report = dropkit.convert(layer, example_inputs=torch.randn(5, 3, 8))
    assert [item.name for item in report.replaced] == ["dropout", "dropout1", "dropout2"]
    assert [(skip.name, skip.module_class) for skip in report.skipped] == [
        ("self_attn", "torch.nn.MultiheadAttention")
    ]
    assert "p=0.1" in report.skipped[0].reason
    assert report.functional_calls == []
    layer.train()
    layer(torch.randn(5, 3, 8)).sum().backward()
    assert _grads_finite(layer)


def test_dropout2d_that_gets_3d_input_is_skipped() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Dropout2d(0.2))
    with pytest.warns(UserWarning, match="dropout2d: Received a 3D input"):
        report = dropkit.convert(model, example_inputs=torch.randn(2, 2, 9))
    assert report.replaced == []
    assert "3-D input, which torch and dropkit.nn.Dropout2d read differently" in report.skipped[0].reason
    assert type(model[1]) is nn.Dropout2d


# ---------------------------------------------------------------------------------------------
# timm and torchvision, recognised by module path and class name (stand-ins; the real
# libraries are tested further down when they import)


def _per_sample(x: torch.Tensor, p: float, training: bool, scale: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype) >= p
    return x * keep / ((1 - p) if scale and p < 1 else 1)


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand-ins of ``timm.layers.drop.DropPath`` / ``DropBlock2d`` and
    ``torchvision.ops.stochastic_depth.StochasticDepth``, registered under timm's and
    torchvision's module names (so the identity check finds them)."""

    def drop_path_init(self: Any, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        nn.Module.__init__(self)
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def drop_path_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return _per_sample(x, self.drop_prob, self.training, self.scale_by_keep)

    def drop_block_init(
        self: Any,
        drop_prob: float = 0.1,
        block_size: int = 7,
        gamma_scale: float = 1.0,
        with_noise: bool = False,
        inplace: bool = False,
        batchwise: bool = False,
        fast: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        self.drop_prob, self.gamma_scale, self.block_size = drop_prob, gamma_scale, block_size
        self.with_noise, self.inplace, self.batchwise, self.fast = with_noise, inplace, batchwise, fast

    def identity_in_eval(self: Any, x: torch.Tensor) -> torch.Tensor:
        assert not self.training, "the stand-in only runs in eval"
        return x

    def depth_init(self: Any, p: float, mode: str) -> None:
        nn.Module.__init__(self)
        self.p, self.mode = p, mode

    def depth_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return _per_sample(x, self.p, self.training) if self.mode == "row" else x

    timm_drop = types.ModuleType("timm.layers.drop")
    timm_drop.DropPath = fake_class("timm.layers.drop", "DropPath", drop_path_init, drop_path_forward)
    timm_drop.DropBlock2d = fake_class("timm.layers.drop", "DropBlock2d", drop_block_init, identity_in_eval)
    vision = types.ModuleType("torchvision.ops.stochastic_depth")
    vision.StochasticDepth = fake_class(
        "torchvision.ops.stochastic_depth", "StochasticDepth", depth_init, depth_forward
    )
    monkeypatch.setitem(sys.modules, "timm.layers.drop", timm_drop)
    monkeypatch.setitem(sys.modules, "torchvision.ops.stochastic_depth", vision)
    return types.SimpleNamespace(
        DropPath=timm_drop.DropPath, DropBlock2d=timm_drop.DropBlock2d, StochasticDepth=vision.StochasticDepth
    )


def test_timm_drop_path_becomes_dropkit_drop_path(fake_timm: types.SimpleNamespace) -> None:
    model = nn.Sequential(fake_timm.DropPath(0.25), fake_timm.DropPath(0.1, scale_by_keep=False))
    original = model[0]
    report = dropkit.convert(model)
    assert type(model[0]) is dropkit.nn.DropPath
    assert (model[0].p, model[0].mode) == (0.25, "row")
    assert report.replaced == [Replacement("0", "timm.layers.drop.DropPath", "dropkit.nn.DropPath", 0.25)]
    assert [skip.name for skip in report.skipped] == ["1"]
    assert "scale_by_keep=False" in report.skipped[0].reason
    dropkit.revert(model)
    assert model[0] is original
    assert vars(original)["drop_prob"] == 0.25


def test_timm_drop_path_is_not_recognised_by_name_alone(fake_timm: types.SimpleNamespace) -> None:
    impostor = fake_class(
        "timm.layers.drop", "DropPath", fake_timm.DropPath.__init__, fake_timm.DropPath.forward
    )
    report = dropkit.convert(nn.Sequential(impostor(0.2)))
    assert report.replaced == []  # same path and name, but not the class that module holds


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"fast": True}, "fast=True draws block seeds over the whole map"),
        ({"fast": False, "with_noise": True}, "with_noise=True"),
        ({"fast": False, "batchwise": True}, "batchwise=True shares one mask over the batch"),
        ({"fast": False, "block_size": 4}, "block_size=4"),
        ({"fast": False, "drop_prob": 0.5, "gamma_scale": 4.0}, "drop_prob * gamma_scale = 2 is above 1"),
    ],
)
def test_timm_drop_block_without_a_faithful_equivalent_is_skipped(
    fake_timm: types.SimpleNamespace, options: dict[str, Any], reason: str
) -> None:
    module = fake_timm.DropBlock2d(**{"drop_prob": 0.1, "block_size": 5, **options})
    report = dropkit.convert(nn.Sequential(module))
    assert report.replaced == []
    assert len(report.skipped) == 1
    assert reason in report.skipped[0].reason
    assert report.skipped[0].module_class == "timm.layers.drop.DropBlock2d"


def test_timm_drop_block_with_a_faithful_equivalent_is_converted(fake_timm: types.SimpleNamespace) -> None:
    module = fake_timm.DropBlock2d(drop_prob=0.1, block_size=5, gamma_scale=0.25, fast=False, inplace=True)
    model = nn.Sequential(module)
    report = dropkit.convert(model)
    layer = model[0]
    assert type(layer) is dropkit.nn.DropBlock2d
    assert (layer.p, layer.block_size, layer.inplace) == (0.1 * 0.25, 5, True)
    options = ("shared_channels", "per_sample_renorm", "exact_rate", "channels_last")
    assert [getattr(layer, option) for option in options] == [False] * 4
    assert report.replaced[0].rate == 0.1 * 0.25
    dropkit.revert(model)
    assert model[0] is module
    assert vars(module)["drop_prob"] == 0.1


def test_torchvision_stochastic_depth_becomes_drop_path(fake_timm: types.SimpleNamespace) -> None:
    model = nn.Sequential(fake_timm.StochasticDepth(0.2, "row"), fake_timm.StochasticDepth(0.3, "batch"))
    report = dropkit.convert(model)
    assert [(type(m), m.p, m.mode) for m in model] == [
        (dropkit.nn.DropPath, 0.2, "row"),
        (dropkit.nn.DropPath, 0.3, "batch"),
    ]
    assert [item.old_class for item in report.replaced] == [
        "torchvision.ops.stochastic_depth.StochasticDepth"
    ] * 2


def test_timm_drop_path_rate_is_kept_in_training(fake_timm: types.SimpleNamespace) -> None:
    dropkit.manual_seed(3)
    torch.manual_seed(3)
    original = fake_timm.DropPath(0.3)
    converted = dropkit.convert(original, copy=True).model
    x = torch.ones(20_000, 4)
    for layer in (original, converted):
        y = layer(x)
        dropped = (y == 0).all(1)
        assert abs(float(dropped.float().mean()) - 0.3) < binomial_tolerance(0.3, x.shape[0])
        assert torch.allclose(y[~dropped], torch.full_like(y[~dropped], 1 / 0.7))


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers (tiny models from configs, no downloads)


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("attn_implementation", "function"),
    [("eager", "dropout"), ("sdpa", "scaled_dot_product_attention")],
)
def test_bert_every_dropout_module_is_converted_and_attention_dropout_is_listed(
    transformers: Any, attn_implementation: str, function: str
) -> None:
    model = tiny_bert(transformers, attn_implementation).eval()
    ids = torch.randint(0, 99, (2, 7))
    dropout_names = _dropout_names(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = dropkit.convert(model, example_inputs={"input_ids": ids})

    assert [item.name for item in report.replaced] == dropout_names
    assert len(dropout_names) == 8
    assert _dropout_names(model) == []
    assert report.skipped == []
    assert all(item.rate == 0.1 for item in report.replaced)
    # Attention dropout: a module call in the eager attention of transformers 4.x; a functional
    # call (F.dropout or SDPA's dropout_p) in 5.x, where the self-attention's nn.Dropout only
    # holds the rate.  Either way every site is converted or listed.
    assert report.functional_calls is not None
    calls = {call.module: call for call in report.functional_calls}
    called = {item.name: item.called for item in report.replaced}
    attention = [f"bert.encoder.layer.{index}.attention.self" for index in range(2)]
    assert set(calls) <= set(attention)
    for name in attention:
        if called[f"{name}.dropout"]:
            assert name not in calls
        else:
            assert (calls[name].function, calls[name].rate) == (f"torch.nn.functional.{function}", 0.1)
    assert [name for name, flag in called.items() if not flag] == [
        f"{name}.dropout" for name in attention if name in calls
    ]
    if attn_implementation == "sdpa":
        assert set(calls) == set(attention)

    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    with dropkit.mc_dropout(model) as handle:
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert {item.name for item in report.replaced} <= set(handle.modules)
    if calls:
        assert handle.intercepted_calls > 0  # the functional attention dropout, turned on by MC mode
    assert not torch.equal(first, second)

    model.train()
    loss = F.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert _grads_finite(model)


def test_bert_revert_round_trip(transformers: Any) -> None:
    model = tiny_bert(transformers, "eager", classify=False)
    classes = {name: type(module) for name, module in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    converted = dropkit.convert(model, copy=True).model
    assert converted.state_dict().keys() == state.keys()
    reverted = dropkit.revert(converted).model
    assert {name: type(module) for name, module in reverted.named_modules()} == classes
    assert reverted.state_dict().keys() == state.keys()
    assert all(torch.equal(state[key], value) for key, value in reverted.state_dict().items())
    assert all(vars(module)["p"] == 0.1 for module in reverted.modules() if type(module) is nn.Dropout)


# The decoder-only families: GPT-2 keeps every rate on an nn.Dropout (embeddings 0.1, attention
# 0.2, residual 0.15), LLaMA its attention rate on a float attribute, with no dropout module at all.
GPT2_DROPOUTS = {"transformer.drop": 0.1} | {
    f"transformer.h.{index}.{site}": rate
    for index in range(2)
    for site, rate in (("attn.attn_dropout", 0.2), ("attn.resid_dropout", 0.15), ("mlp.dropout", 0.15))
}
GPT2_ATTENTION = [f"transformer.h.{index}.attn" for index in range(2)]
LLAMA_ATTENTION = [f"model.layers.{index}.self_attn" for index in range(2)]
ATTENTION_FUNCTIONS = [("eager", "dropout"), ("sdpa", "scaled_dot_product_attention")]


def _check_causal_lm(
    model: nn.Module, report: ConversionReport, ids: torch.Tensor, before: torch.Tensor, calls: int
) -> None:
    """After ``convert``: eval logits bit for bit ``before``; MC mode acts at every converted site
    and intercepts each of the ``calls`` functional calls once per forward; a training step with
    the language-modelling loss gives finite gradients everywhere."""
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    with dropkit.mc_dropout(model) as handle, torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert {item.name for item in report.replaced} <= set(handle.modules)
    assert handle.intercepted_calls == 2 * calls
    assert not torch.equal(first, second)
    assert not model.training
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert _grads_finite(model)
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(grad is not None and bool(grad.abs().sum() > 0) for grad in grads.values()), [
        name for name, grad in grads.items() if grad is None or not bool(grad.abs().sum() > 0)
    ]


@pytest.mark.parametrize(("attn_implementation", "function"), ATTENTION_FUNCTIONS)
def test_gpt2_every_dropout_module_is_converted_and_attention_dropout_is_listed(
    transformers: Any, attn_implementation: str, function: str
) -> None:
    model = tiny_gpt2(transformers, attn_implementation).eval()
    ids = torch.randint(0, 99, (2, 7))
    assert {name: module.p for name, module in model.named_modules() if type(module) is nn.Dropout} == (
        GPT2_DROPOUTS
    )
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = dropkit.convert(model, example_inputs={"input_ids": ids})

    assert [(item.name, item.rate) for item in report.replaced] == list(GPT2_DROPOUTS.items())
    assert all(item.new_class == "dropkit.nn.Dropout" for item in report.replaced)
    assert _dropout_names(model) == []
    assert all(type(module) is dropkit.nn.Dropout for module in map(model.get_submodule, GPT2_DROPOUTS))
    assert report.skipped == []
    # Attention dropout: a module call (attn_dropout) in the eager attention of transformers 4.x;
    # a functional call (F.dropout, or SDPA's dropout_p) in 5.x and with SDPA, where attn_dropout
    # only holds the rate.  Either way every site is converted or listed, at the rate 0.2.
    assert report.functional_calls is not None
    calls = {call.module: call for call in report.functional_calls}
    called = {item.name: item.called for item in report.replaced}
    assert set(calls) <= set(GPT2_ATTENTION)
    for name in GPT2_ATTENTION:
        if called[f"{name}.attn_dropout"]:
            assert name not in calls
        else:
            assert calls[name] == FunctionalCall(
                name,
                "transformers.models.gpt2.modeling_gpt2.GPT2Attention",
                f"torch.nn.functional.{function}",
                0.2,
                1,
            )
    assert [name for name, flag in called.items() if not flag] == [
        f"{name}.attn_dropout" for name in GPT2_ATTENTION if name in calls
    ]
    if attn_implementation == "sdpa" or int(transformers.__version__.split(".")[0]) >= 5:
        assert list(calls) == GPT2_ATTENTION
    _check_causal_lm(model, report, ids, before, len(calls))


@pytest.mark.parametrize(("attn_implementation", "function"), ATTENTION_FUNCTIONS)
def test_llama_attention_dropout_is_listed_as_functional_calls(
    transformers: Any, attn_implementation: str, function: str
) -> None:
    model = tiny_llama(transformers, attn_implementation).eval()
    ids = torch.randint(0, 99, (2, 7))
    assert [name for name, module in model.named_modules() if "Dropout" in type(module).__name__] == []
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = dropkit.convert(model, example_inputs={"input_ids": ids})

    assert report.replaced == report.skipped == []
    assert report.functional_calls == [
        FunctionalCall(
            name,
            "transformers.models.llama.modeling_llama.LlamaAttention",
            f"torch.nn.functional.{function}",
            0.2,  # the attention's attention_dropout float (transformers 5.x passes p=0 in eval)
            1,
        )
        for name in LLAMA_ATTENTION
    ]
    _check_causal_lm(model, report, ids, before, len(LLAMA_ATTENTION))


def test_gpt2_revert_round_trip(transformers: Any) -> None:
    model = tiny_gpt2(transformers, "eager")
    classes = {name: type(module) for name, module in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    converted = dropkit.convert(model, copy=True).model
    assert converted.state_dict().keys() == state.keys()
    assert {name: type(module) for name, module in converted.named_modules()} != classes
    report = dropkit.revert(converted)
    assert [(item.name, item.rate) for item in report.replaced] == list(GPT2_DROPOUTS.items())
    reverted = report.model
    assert {name: type(module) for name, module in reverted.named_modules()} == classes
    assert reverted.state_dict().keys() == state.keys()
    assert all(torch.equal(state[key], value) for key, value in reverted.state_dict().items())
    rates = {
        name: vars(module)["p"] for name, module in reverted.named_modules() if type(module) is nn.Dropout
    }
    assert rates == GPT2_DROPOUTS
    assert all(type(rate) is float for rate in rates.values())


def test_vit_is_converted_and_trains(transformers: Any) -> None:
    model = tiny_vit(transformers).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
    report = dropkit.convert(model, example_inputs={"pixel_values": pixels})
    assert len(report.replaced) >= 3
    assert _dropout_names(model) == []
    # Attention dropout is a listed functional call (SDPA) or a converted module that was called.
    assert report.functional_calls or all(item.called for item in report.replaced)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits, before)
    model.train()
    model(pixel_values=pixels).logits.sum().backward()
    assert _grads_finite(model)


@pytest.fixture
def convnext(transformers: Any) -> nn.Module:
    return tiny_convnext(transformers)


def test_convnext_drop_paths_become_dropkit_drop_paths(convnext: nn.Module) -> None:
    model = convnext.eval()
    paths = {
        name: module.drop_prob
        for name, module in model.named_modules()
        if type(module).__name__ == "ConvNextDropPath"
    }
    assert len(paths) == 3  # the first block's rate is 0: an nn.Identity there
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
    report = dropkit.convert(model, example_inputs={"pixel_values": pixels})
    assert {item.name: item.rate for item in report.replaced} == pytest.approx(paths)
    assert all(item.new_class == "dropkit.nn.DropPath" for item in report.replaced)
    assert all(item.called for item in report.replaced)
    converted = dict(model.named_modules())
    assert all(type(converted[name]) is dropkit.nn.DropPath for name in paths)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).logits, before)
    with dropkit.mc_dropout(model) as handle:
        assert set(paths) <= set(handle.modules)
    model.train()
    model(pixel_values=pixels).logits.sum().backward()
    assert _grads_finite(model)
    dropkit.revert(model)
    assert {name for name, m in model.named_modules() if type(m).__name__ == "ConvNextDropPath"} == set(paths)


def test_convnext_drop_path_keeps_its_distribution(convnext: nn.Module) -> None:
    dropkit.manual_seed(5)
    torch.manual_seed(5)
    original = next(m for m in convnext.modules() if type(m).__name__ == "ConvNextDropPath").train()
    converted = dropkit.convert(original, copy=True).model
    p = original.drop_prob
    x = torch.ones(20_000, 2, 2)
    for layer in (original, converted):
        y = layer(x).flatten(1)
        dropped = (y == 0).all(1)
        assert abs(float(dropped.float().mean()) - p) < binomial_tolerance(p, x.shape[0])
        # HF scales by 1/(1-p), dropkit by the realised keep rate: within 2**-16 of it.
        assert torch.allclose(y[~dropped], torch.full_like(y[~dropped], 1 / (1 - p)), rtol=1e-4)


LEGACY_HF_FILE = '''
import torch
from torch import nn


def drop_path(input: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """The helper of transformers 4.x model files."""
    if drop_prob == 0.0 or not training:
        return input
    keep_prob = 1 - drop_prob
    shape = (input.shape[0],) + (1,) * (input.ndim - 1)  # any rank
    random_tensor = keep_prob + torch.rand(shape, dtype=input.dtype, device=input.device)
    random_tensor.floor_()
    output = input.div(keep_prob) * random_tensor
    return output


class LegacyDropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states):
        return drop_path(hidden_states, self.drop_prob, self.training)


class UnscaledDropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states):
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        random_tensor = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        random_tensor = torch.floor(random_tensor + keep_prob)
        return hidden_states * random_tensor
'''


@pytest.fixture
def legacy_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A model file in the style of transformers 4.x (a ``drop_path`` helper), under a
    ``transformers.`` module name."""
    path = tmp_path / "modeling_legacy.py"
    path.write_text(LEGACY_HF_FILE)
    name = "transformers.models.legacy_for_dropkit_tests.modeling_legacy"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_hf_drop_path_through_the_legacy_helper_is_recognised(legacy_hf: types.ModuleType) -> None:
    model = nn.Sequential(legacy_hf.LegacyDropPath(0.2), legacy_hf.LegacyDropPath(None))
    report = dropkit.convert(model)
    assert type(model[0]) is dropkit.nn.DropPath
    assert model[0].p == 0.2
    assert [(skip.name, skip.reason) for skip in report.skipped] == [("1", "drop_prob=None is not a rate")]


def test_hf_drop_path_with_other_code_is_skipped(legacy_hf: types.ModuleType) -> None:
    model = nn.Sequential(legacy_hf.UnscaledDropPath(0.2))
    report = dropkit.convert(model)
    assert report.replaced == []
    assert "does not match the Hugging Face drop-path pattern" in report.skipped[0].reason


# ---------------------------------------------------------------------------------------------
# The real timm and torchvision (skipped where they do not import)


def test_timm_resnet_with_drop_rates() -> None:
    timm = import_or_skip("timm")
    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=5, drop_rate=0.2, drop_path_rate=0.1, drop_block_rate=0.1
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = dropkit.convert(model, example_inputs=x)
    assert report.replaced
    assert all(item.new_class == "dropkit.nn.DropPath" for item in report.replaced)
    # timm's DropBlock2d has no faithful dropkit equivalent in either version: older timm builds
    # it with fast=True; timm 1.0.31 has a rewritten one (one mask shared across channels, block
    # centres anywhere; attributes couple_channels, scale_by_keep) that convert does not know.
    assert report.skipped
    assert all(skip.module_class == "timm.layers.drop.DropBlock2d" for skip in report.skipped)
    assert all(
        "fast=True" in skip.reason or "differ from the known version" in skip.reason
        for skip in report.skipped
    )
    assert report.functional_calls  # the head's F.dropout(x, p=drop_rate)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    model.train()
    model(x).sum().backward()
    assert _grads_finite(model)
    dropkit.revert(model)
    assert not any(isinstance(module, _RandomLayer) for module in model.modules())


def test_timm_vit_with_drop_rates() -> None:
    timm = import_or_skip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        num_classes=5,
        drop_rate=0.1,
        proj_drop_rate=0.1,
        attn_drop_rate=0.1,
        drop_path_rate=0.1,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    report = dropkit.convert(model, example_inputs=x)
    assert _dropout_names(model) == []
    assert report.skipped == []
    assert {item.new_class for item in report.replaced} == {"dropkit.nn.Dropout", "dropkit.nn.DropPath"}
    with torch.no_grad():
        assert torch.equal(model(x), before)
    with dropkit.mc_dropout(model) as handle:
        # Sites of rate 0 (timm's pos_drop) do not act in MC mode.
        assert {item.name for item in report.replaced if item.rate > 0} <= set(handle.modules)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_models(name: str) -> None:
    models = import_or_skip("torchvision.models")
    model = getattr(models, name)(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    report = dropkit.convert(model, example_inputs=x)
    assert report.replaced
    assert report.skipped == []
    assert _dropout_names(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), before)
    model.train()
    model(x).sum().backward()
    assert _grads_finite(model)
    assert math.isfinite(float(model(x).sum().detach()))
