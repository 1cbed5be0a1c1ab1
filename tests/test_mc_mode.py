"""Monte Carlo dropout mode: what it turns on, what it leaves alone, and exact restoration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.mc.mode import (
    AttentionDropoutNotFoundWarning,
    MCDropoutWarning,
    NoDropoutFoundWarning,
    enable_mc_dropout,
    mc_dropout,
)
from dropkit.mc.patching import FRAME_ATTRIBUTE

FUNCTIONAL_NAMES = (
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "scaled_dot_product_attention",
)


def _functional_snapshot() -> dict[str, object]:
    return {name: getattr(F, name) for name in FUNCTIONAL_NAMES}


class ThirdPartyBlock(nn.Module):
    """Written like third-party code: functional dropout gated by ``self.training``."""

    def __init__(self, width: int = 8, p: float = 0.5) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.linear(x), self.p, self.training)


class TimmStyleAttention(nn.Module):
    """timm's pattern: ``dropout_p=self.attn_drop.p if self.training else 0.``."""

    def __init__(self, dim: int = 8, heads: int = 2, attn_drop: float = 0.5) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.attn_drop.p if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(batch, length, dim)


class HFStyleAttention(TimmStyleAttention):
    """Hugging Face's pattern: a float ``self.dropout`` passed only when training."""

    def __init__(self, dim: int = 8, heads: int = 2, dropout: float = 0.5) -> None:
        super().__init__(dim, heads, 0.0)
        del self.attn_drop
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(batch, length, dim)


def _differs(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return not torch.equal(model(x), model(x))


# -- what is turned on -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Dropout(0.5), (4, 16)),
        (nn.Dropout1d(0.5), (4, 16, 5)),
        (nn.Dropout2d(0.5), (4, 16, 3, 3)),
        (nn.Dropout3d(0.5), (4, 16, 2, 2, 2)),
        (nn.AlphaDropout(0.5), (4, 16)),
        (nn.FeatureAlphaDropout(0.5), (4, 16, 3)),
    ],
)
def test_torch_dropout_modules_are_on_in_mc_mode(layer: nn.Module, shape: tuple[int, ...]) -> None:
    model = nn.Sequential(nn.Identity(), layer).eval()
    x = torch.randn(shape)
    assert not _differs(model, x)
    with mc_dropout(model) as handle:
        assert _differs(model, x)
        assert not layer.training  # switched on by interception, the flag is untouched
    assert handle.modules == ["1"]
    assert not _differs(model, x)


def test_torch_dropout_value_set_is_dropout() -> None:
    model = nn.Sequential(nn.Dropout(0.25)).eval()
    x = torch.randn(64, 64)
    with mc_dropout(model):
        y = model(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1 / 0.75))


@pytest.mark.parametrize(
    "layer",
    [
        dropkit.nn.Dropout(0.5),
        dropkit.nn.GaussianDropout(0.5),
        dropkit.nn.DropConnect(nn.Linear(16, 16), p=0.5),
        dropkit.nn.VariationalLinear(16, 16),
        dropkit.nn.DropPath(0.5),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_dropkit_layers_are_on_in_mc_mode(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(16, 16), layer).eval()
    x = torch.randn(8, 16)
    assert not _differs(model, x)
    with mc_dropout(model) as handle:
        assert layer.training
        assert not model[0].training
        assert _differs(model, x)
    assert handle.modules == ["1"]
    assert not layer.training
    assert not _differs(model, x)


def test_functional_dropout_in_third_party_module_is_caught() -> None:
    model = nn.Sequential(ThirdPartyBlock(), nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    assert not _differs(model, x)
    with mc_dropout(model) as handle:
        assert _differs(model, x)
        assert not model[0].training
    assert handle.modules == ["0"]  # the module whose forward made the calls...
    assert handle.intercepted_calls == 2  # ...both of them turned on


@pytest.mark.parametrize("attention", [TimmStyleAttention, HFStyleAttention])
def test_sdpa_attention_dropout_is_caught(attention: type[nn.Module]) -> None:
    model = nn.Sequential(attention()).eval()
    x = torch.randn(3, 5, 8)
    reference = model(x)
    with mc_dropout(model, include=attention) as handle:
        assert _differs(model, x)
    assert handle.intercepted_calls == 2
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_sdpa_with_rate_zero_found_matches_fused_attention() -> None:
    model = nn.Sequential(TimmStyleAttention(attn_drop=0.0), nn.Dropout(0.5)).eval()
    x = torch.randn(3, 5, 8)
    with pytest.warns(NoDropoutFoundWarning), mc_dropout(model, exclude="1") as handle:
        torch.testing.assert_close(model(x), model.eval()(x), rtol=0, atol=0)
    assert handle.intercepted_calls == 0
    assert handle.ops == 0


def test_sdpa_attention_p_forms_and_missing_rate_warning() -> None:
    class Bare(TimmStyleAttention):
        def __init__(self) -> None:
            super().__init__()
            del self.attn_drop
            self.rate = 0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = k = v = x.unsqueeze(1)
            return F.scaled_dot_product_attention(q, k, v).squeeze(1)

    model = nn.Sequential(Bare()).eval()
    x = torch.randn(3, 5, 8)
    with pytest.warns(MCDropoutWarning) as record, mc_dropout(model):
        assert not _differs(model, x)
    kinds = [type(entry.message) for entry in record]
    assert kinds == [AttentionDropoutNotFoundWarning, NoDropoutFoundWarning]  # once per module
    assert "attention_p" in str(record[0].message)
    for spec in (0.5, "rate", lambda module: module.rate):
        with mc_dropout(model, attention_p=spec) as handle:
            y = model(x)
            assert _differs(model, x)
        assert handle.intercepted_calls == 3
        # Attention weights were dropped and rescaled: rows no longer average the values.
        assert not torch.allclose(y, model(x))


def test_multihead_attention_and_transformer_layers_are_on() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.5, batch_first=True)
    model = nn.Sequential(layer).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        reference = model(x)
    with mc_dropout(model) as handle:
        assert _differs(model, x)
        assert not layer.norm1.training
    assert "0.self_attn" in handle.modules
    assert "0.dropout1" in handle.modules
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference)


# -- what is left alone ------------------------------------------------------------------------


def test_batchnorm_statistics_untouched() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 6, 6))  # materialize, and move the statistics away from their init
    model.train()  # the classic bug: MC sampling in train mode would update them
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with mc_dropout(model):
        assert not model[1].training
        for _ in range(3):
            model(torch.randn(5, 3, 6, 6) * 10)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert all(module.training for module in model.modules())  # flags restored


def test_spectral_norm_power_iteration_off() -> None:
    linear = nn.utils.parametrizations.spectral_norm(nn.Linear(6, 6))
    model = nn.Sequential(linear, nn.Dropout(0.5)).train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with mc_dropout(model):
        model(torch.randn(4, 6))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_unrelated_calls_are_not_intercepted() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    x = torch.randn(4, 4)
    with mc_dropout(model):
        assert torch.equal(F.dropout(x, 0.5, training=False), x)  # outside the model's forward
        other = nn.Sequential(nn.Dropout(0.5)).eval()
        assert torch.equal(other(x), x)  # another model, not in MC mode


# -- selection ---------------------------------------------------------------------------------


def _two_branch() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)),
        nn.Sequential(ThirdPartyBlock(), dropkit.nn.Dropout(0.5)),
    ).eval()


def test_selection_by_name_and_type() -> None:
    x = torch.randn(4, 8)
    model = _two_branch()
    with mc_dropout(model, include="0") as handle:
        assert _differs(model[0], x)
        assert not _differs(model[1], x)
    assert handle.modules == ["0.1"]
    with mc_dropout(model, exclude=["0", dropkit.nn.Dropout]) as handle:
        assert not _differs(model[0], x)
        out = model[1][0](x)
        assert _differs(model[1][0], x)  # the functional dropout of the third-party block
        assert torch.equal(model[1][1](out), out)
    assert handle.modules == ["1.0"]  # the third-party block, whose functional dropout acted
    with mc_dropout(model, include=nn.Dropout) as handle:  # dropkit's Dropout is an nn.Dropout too
        assert handle.modules == ["0.1", "1.1"]  # before any forward: the sites that would act
        assert _differs(model[1], x)
    assert handle.modules == ["1.1"]  # after: those that acted
    with mc_dropout(model, include=lambda name, module: name.startswith("1")) as handle:
        assert not _differs(model[0], x)
    assert handle.modules == ["1.1"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"include": 3}, TypeError, "include"),
        ({"exclude": [int]}, TypeError, "exclude"),
        ({"attention_p": 1.5}, ValueError, "attention_p"),
        ({"attention_p": True}, TypeError, "attention_p"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        enable_mc_dropout(nn.Dropout(), **kwargs)  # type: ignore[arg-type]


def test_model_must_be_a_module() -> None:
    with (
        pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"),
        mc_dropout(F.relu),
    ):  # type: ignore[arg-type]
        pass


# -- restoring ---------------------------------------------------------------------------------


def test_restore_after_exception_is_exact() -> None:
    model = _two_branch()
    model[0].train()
    flags = [module.training for module in model.modules()]
    functions = _functional_snapshot()
    x = torch.randn(4, 8)

    def run_and_fail() -> None:
        with mc_dropout(model):
            model(x)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_and_fail()
    assert [module.training for module in model.modules()] == flags
    assert _functional_snapshot() == functions
    for module in model.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert "forward" not in module.__dict__
        assert FRAME_ATTRIBUTE not in module.__dict__
    model.eval()
    assert not _differs(model, x)


def test_restore_after_exception_inside_forward() -> None:
    class Failing(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("inside")

    model = nn.Sequential(nn.Dropout(0.5), Failing()).eval()
    with pytest.raises(ValueError, match="inside"), mc_dropout(model):
        model(torch.randn(2, 2))
    assert _functional_snapshot() == {name: getattr(F, name) for name in FUNCTIONAL_NAMES}
    assert all(not module._forward_hooks for module in model.modules())


def test_function_form_restore_is_idempotent_and_nesting_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), dropkit.nn.Dropout(0.5)).eval()
    functions = _functional_snapshot()
    handle = enable_mc_dropout(model)
    assert handle.active
    assert model[1].training
    with pytest.raises(RuntimeError, match="already in an MC dropout mode"):
        enable_mc_dropout(model[1])
    assert F.dropout is not functions["dropout"]
    handle.restore()
    handle.restore()
    assert not handle.active
    assert not model[1].training
    assert _functional_snapshot() == functions


def test_two_models_at_once() -> None:
    first = nn.Sequential(nn.Dropout(0.5)).eval()
    second = nn.Sequential(nn.Dropout(0.5)).eval()
    x = torch.randn(4, 4)
    functions = _functional_snapshot()
    a = enable_mc_dropout(first)
    b = enable_mc_dropout(second)
    a.restore()
    assert torch.equal(first(x), x)
    assert _differs(second, x)
    b.restore()
    assert _functional_snapshot() == functions


def test_warns_when_nothing_was_turned_on() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.warns(NoDropoutFoundWarning, match="turned nothing on"), mc_dropout(model):
        model(torch.randn(3, 4))
    handle = enable_mc_dropout(model)
    with pytest.warns(NoDropoutFoundWarning):
        handle.restore()


def test_reproducible_with_manual_seed() -> None:
    model = nn.Sequential(ThirdPartyBlock(), nn.Dropout(0.5), dropkit.nn.Dropout(0.5)).eval()
    x = torch.randn(4, 8)
    outputs = []
    for _ in range(2):
        dropkit.manual_seed(7)
        with mc_dropout(model):
            outputs.append(model(x))
    assert torch.equal(outputs[0], outputs[1])


def test_frames_left_by_an_exception_are_dropped_at_the_next_forward() -> None:
    class Failing(nn.Module):
        fail = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise ValueError("inside")
            return x

    failing = Failing()
    model = nn.Sequential(nn.Dropout(0.5), nn.Sequential(failing)).eval()
    x = torch.ones(4, 64)
    with mc_dropout(model):
        with pytest.raises(ValueError, match="inside"):
            model(x)
        failing.fail = False
        model(x)  # the next forward of the model drops the frames that the failed one left
        assert torch.equal(F.dropout(x, 0.5, training=False), x)  # outside any module: not intercepted
