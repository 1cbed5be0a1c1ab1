"""MC dropout on the models people use: every dropout site acts, zero-rate sites do not.

Hugging Face BERT (eager and SDPA attention), ViT and ConvNext run here; timm and torchvision are
tested where they import (skipped with the import error otherwise).  Plain-torch stand-ins of
timm's ViT pattern (a ``pos_drop`` with ``p = 0`` before the blocks, fused attention that never
calls ``attn_drop``) and of timm's and torchvision's drop-path modules test the rate-zero, trunk,
stochastic-depth and ``handle.modules`` rules without those libraries.

Realised rates are measured at each site on what the site's op received and returned (every
op of an MC mode goes through ``MCDropoutHandle._per_sample``), with fixed seeds and the
binomial tolerance of ``tests.conftest``.  An intercepted SDPA call keeps no attention weights
(it runs :func:`dropkit.functional.scaled_dot_product_attention` per sample, on its fused or
blocked path where they apply), so at those sites each per-sample call is run again with the
same key on identity values, whose output is the dropped weights themselves.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.functional._common import resolve_key
from dropkit.functional.attention import _attention_weights_and_values
from dropkit.mc.mode import (
    MCDropoutHandle,
    MCDropoutWarning,
    NoDropoutFoundWarning,
    enable_mc_dropout,
    mc_dropout,
)
from dropkit.mc.sampling import mc_predict
from dropkit.mc.trunk import split_trunk
from tests.conftest import binomial_tolerance
from tests.real_models import (
    fake_class,
    import_or_skip,
    tiny_bert,
    tiny_convnext,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
)

Records = dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]


SDPA = "scaled_dot_product_attention"  # what the MC mode calls an intercepted SDPA op


@pytest.fixture
def record_ops(monkeypatch: pytest.MonkeyPatch) -> Callable[[], contextlib.AbstractContextManager[Records]]:
    """``with record_ops() as records``: per site, the input and output of every stochastic op;
    for an intercepted SDPA op, the attention weights and the dropped weights of each of its
    per-sample calls (see :func:`_sdpa_weights`)."""

    @contextlib.contextmanager
    def recording() -> Iterator[Records]:
        records: Records = {}
        running: list[tuple[str, nn.Module]] = []  # the ops running, innermost last
        original = MCDropoutHandle._per_sample
        functional_sdpa = dropkit.functional.scaled_dot_product_attention

        def per_sample(
            self: MCDropoutHandle, call: Any, args: Any, split: Any, what: str, site: nn.Module
        ) -> Any:
            pairs = records.setdefault(site, [])
            running.append((what, site))
            try:
                output = original(self, call, args, split, what, site)
            finally:
                running.pop()
            if what != SDPA:
                pairs.append((args[0].detach().clone(), output.detach().clone()))
            return output

        def sdpa(*args: Any, **kwargs: Any) -> Any:
            if not running or running[-1][0] != SDPA:  # not an intercepted op (a dropkit layer)
                return functional_sdpa(*args, **kwargs)
            output, weights, dropped = _sdpa_weights(functional_sdpa, *args, **kwargs)
            records[running[-1][1]].append((weights, dropped))
            return output

        with monkeypatch.context() as patch:
            patch.setattr(MCDropoutHandle, "_per_sample", per_sample)
            patch.setattr(dropkit.functional, "scaled_dot_product_attention", sdpa)
            yield records

    return recording


def _sdpa_weights(
    functional: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A per-sample call of an intercepted SDPA op, run as the op runs it: ``(output, weights,
    dropped)``, with the attention weights, and the dropped weights that the same call (same key)
    on identity values outputs.  The output is checked to be the dropped weights times the values.

    Outside a sampling plan the op passes no key: the one its call would draw from the functional
    stream is drawn here and given to both runs."""
    if seed is None:
        seed = resolve_key(query, None, None)
    output = functional(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed=seed)
    source = key.shape[-2]
    identity = torch.eye(source, dtype=value.dtype, device=value.device).expand(*value.shape[:-2], -1, -1)
    dropped = functional(query, key, identity, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed=seed)
    weights, values = _attention_weights_and_values(
        query, key, value, attn_mask, is_causal, scale, enable_gqa
    )
    torch.testing.assert_close(output, torch.matmul(dropped.to(values.dtype), values).to(output.dtype))
    return output, weights, dropped


def _is_drop_path(module: nn.Module) -> bool:
    name = type(module).__name__
    return "DropPath" in name or name == "StochasticDepth"


def _dropped(module: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    """``(dropped, draws)`` at a site: elements (or, for drop paths, samples) that had a non-zero
    input and a zero output, out of those with a non-zero input."""
    dropped = draws = 0
    for inputs, outputs in pairs:
        if isinstance(module, dropkit.nn.StochasticDepth):  # x + drop_path(branch(x)): x where dropped
            rows = inputs.flatten(1)
            dropped += int((outputs.flatten(1) == rows).all(1).sum())
            draws += rows.shape[0]
        elif _is_drop_path(module):
            live = (inputs.flatten(1) != 0).any(1)
            dropped += int(((outputs.flatten(1) == 0).all(1) & live).sum())
            draws += int(live.sum())
        else:
            live = inputs != 0
            dropped += int(((outputs == 0) & live).sum())
            draws += int(live.sum())
    return dropped, draws


def _check_sites(
    model: nn.Module,
    run: Callable[[], object],
    expected: dict[str, float],
    recorder: Callable[[], contextlib.AbstractContextManager[Records]],
    *,
    rounds: int = 3,
    unmeasured: frozenset[str] | set[str] = frozenset(),
    **mode: Any,
) -> MCDropoutHandle:
    """Run ``run`` ``rounds`` times in MC mode and check that exactly the sites of ``expected``
    (name -> rate) acted, each at its rate (but those in ``unmeasured``, whose op is more than a
    dropout: only that they acted); that the buffers (BatchNorm statistics) did not change and
    every ``training`` flag came back."""
    names = {module: name for name, module in model.named_modules()}
    flags = [module.training for module in model.modules()]
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with recorder() as records, mc_dropout(model, **mode) as handle, torch.no_grad():
        for _ in range(rounds):
            run()
    assert {names[site] for site in records} == set(expected)
    assert set(handle.modules) == set(expected)
    for site, pairs in records.items():
        if names[site] in unmeasured:
            continue
        rate = expected[names[site]]
        dropped, draws = _dropped(site, pairs)
        assert draws > 0, names[site]
        assert dropped > 0, names[site]
        assert abs(dropped / draws - rate) <= binomial_tolerance(rate, draws), (names[site], dropped, draws)
    assert [module.training for module in model.modules()] == flags
    for name, buffer in model.named_buffers():
        if not name.endswith("rng_step"):
            assert torch.equal(buffer, buffers[name]), name
    return handle


# ---------------------------------------------------------------------------------------------
# Stand-ins: timm's and torchvision's drop-path modules, and timm's ViT pattern


def _torch_drop_path(x: torch.Tensor, p: float, training: bool, scale: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype) >= p
    return x * keep / ((1 - p) if scale else 1)


@pytest.fixture
def foreign(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """``timm.layers.drop.DropPath`` and ``torchvision.ops.stochastic_depth.StochasticDepth``
    stand-ins, registered under those module names (the recognisers check class identity)."""

    def drop_path_init(self: Any, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        nn.Module.__init__(self)
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def drop_path_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return _torch_drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def depth_init(self: Any, p: float, mode: str) -> None:
        nn.Module.__init__(self)
        self.p, self.mode = p, mode

    def depth_forward(self: Any, input: torch.Tensor) -> torch.Tensor:
        return _torch_drop_path(input, self.p, self.training) if self.mode == "row" else input

    timm_drop: Any = types.ModuleType("timm.layers.drop")
    timm_drop.DropPath = fake_class("timm.layers.drop", "DropPath", drop_path_init, drop_path_forward)
    vision: Any = types.ModuleType("torchvision.ops.stochastic_depth")
    vision.StochasticDepth = fake_class(
        "torchvision.ops.stochastic_depth", "StochasticDepth", depth_init, depth_forward
    )
    monkeypatch.setitem(sys.modules, "timm.layers.drop", timm_drop)
    monkeypatch.setitem(sys.modules, "torchvision.ops.stochastic_depth", vision)
    return types.SimpleNamespace(DropPath=timm_drop.DropPath, StochasticDepth=vision.StochasticDepth)


class FusedAttention(nn.Module):
    """timm's ``Attention`` with ``fused_attn``: SDPA with ``dropout_p=self.attn_drop.p if
    self.training else 0.``; ``attn_drop`` itself is never called."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, dim)))


class Block(nn.Module):
    def __init__(self, dim: int, rates: dict[str, float], drop_path: nn.Module | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FusedAttention(dim, 2, rates["attn_drop"], rates["proj_drop"])
        self.drop_path1 = drop_path if drop_path is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(rates["proj_drop"]), nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm's ViT layout: a (BatchNorm) patch stem, ``pos_drop`` before the blocks, ``head_drop``."""

    def __init__(
        self,
        depth: int = 3,
        dim: int = 16,
        drop_path: Callable[[int], nn.Module | None] | None = None,
        **rates: float,
    ) -> None:
        super().__init__()
        rates = {"pos_drop": 0.0, "attn_drop": 0.0, "proj_drop": 0.0, "drop": 0.0, **rates}
        self.patch_embed = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), nn.BatchNorm2d(dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.pos_drop = nn.Dropout(rates["pos_drop"])
        self.blocks = nn.Sequential(
            *[Block(dim, rates, drop_path(i) if drop_path else None) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(rates["drop"])
        self.head = nn.Linear(dim, 5)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(self.pos_drop(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(x[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _trained_vit(**kwargs: Any) -> TinyViT:
    """A stand-in ViT whose BatchNorm has statistics of its own, left in train mode (MC mode must
    put BatchNorm in eval and restore the flag)."""
    model = TinyViT(**kwargs)
    with torch.no_grad():
        model.patch_embed(torch.randn(8, 3, 16, 16) * 3)
    return model.double().train()


def _count_calls(modules: list[nn.Module]) -> list[int]:
    calls = [0] * len(modules)
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


# ---------------------------------------------------------------------------------------------
# Rate zero: deterministic for the trunk, the keys and the warning


def test_zero_rate_sites_do_not_cut_the_trunk_and_blocks_run_once() -> None:
    """timm's ViT with its default rates and a head dropout: ``pos_drop`` (p = 0) and the unused
    ``attn_drop`` (p = 0) are not random ops, so the automatic trunk holds every block."""
    model = _trained_vit(drop=0.25)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with mc_dropout(model) as handle:
        assert handle.modules == ["head_drop"]
        split = split_trunk(model, handle, (x,))
    assert split is not None
    assert split.head_modules == ["head_drop", "head"]
    assert {f"blocks.{index}" for index in range(3)} <= set(split.trunk_modules)
    calls = _count_calls(list(model.blocks))
    samples = mc_predict(model, x, 50, seed=1)
    assert calls == [1, 1, 1]  # the blocks ran once, on the batch, for all 50 samples
    assert samples.shape == (50, 4, 5)
    assert not torch.equal(samples[0], samples[1])
    # The same samples without the trunk cache, and with a manual split that contains pos_drop.
    torch.testing.assert_close(mc_predict(model, x, 50, seed=1, trunk=None), samples, rtol=0, atol=1e-12)
    manual = mc_predict(model, x, 50, seed=1, trunk=model.forward_features, head=model.forward_head)
    torch.testing.assert_close(manual, samples, rtol=0, atol=1e-12)


def test_zero_rate_sites_do_not_change_the_keys() -> None:
    model = _trained_vit(drop=0.25, attn_drop=0.1)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    samples = mc_predict(model, x, 6, seed=4, trunk=None, chunk_size=2)
    excluded = mc_predict(
        model, x, 6, seed=4, trunk=None, chunk_size=2, exclude=["pos_drop", "*proj_drop", "*mlp.2"]
    )
    assert torch.equal(samples, excluded)


def test_a_model_whose_rates_are_all_zero_warns_and_is_deterministic() -> None:
    model = _trained_vit()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with pytest.warns(NoDropoutFoundWarning, match="turned nothing on"), mc_dropout(model) as handle:
        model(x)
    assert handle.modules == []
    assert handle.ops == 0
    with pytest.warns(NoDropoutFoundWarning):
        samples = mc_predict(model, x, 4, seed=0)  # the whole model is the trunk: one forward
    assert torch.equal(samples[0], samples[3])
    with (
        pytest.warns(NoDropoutFoundWarning),
        mc_dropout(nn.Sequential(dropkit.nn.Dropout(0.0), dropkit.nn.DropPath(0.0))) as handle,
    ):
        pass
    assert handle.modules == []


def test_fused_attention_rate_lives_on_attn_drop(record_ops: Any) -> None:
    """``attn_drop`` is never called, but its rate is what the fused attention's dropout uses:
    it is listed, and the attention weights are dropped at that rate; ``exclude`` turns it off."""
    model = _trained_vit(attn_drop=0.2)
    x = torch.randn(16, 3, 16, 16, dtype=torch.float64)
    expected = {f"blocks.{index}.attn.attn_drop": 0.2 for index in range(3)}
    _check_sites(model, lambda: model(x), expected, record_ops)
    with pytest.warns(NoDropoutFoundWarning), mc_dropout(model, exclude="*.attn_drop") as handle:
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert handle.intercepted_calls == 0


# ---------------------------------------------------------------------------------------------
# Attention dropout, every path, and attention_p


class EagerAttention(nn.Module):
    """Hugging Face's eager attention: ``F.dropout(weights, p=0.0 if not module.training else
    module.dropout.p, training=module.training)``, the ``nn.Dropout`` kept for its rate."""

    def __init__(self, dim: int = 8, rate: float = 0.1) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.dropout = nn.Dropout(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        weights = F.dropout(weights, p=0.0 if not self.training else self.dropout.p, training=self.training)
        return (weights @ v).squeeze(1)


class ZeroRateBlock(nn.Module):
    """Calls ``F.dropout`` with a configured rate of 0 and holds no attention rate."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.p = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.linear(x), self.p, self.training)


def _eager_only(module: nn.Module) -> float | None:
    return 0.4 if isinstance(module, EagerAttention) else None


@pytest.mark.parametrize(
    ("attention_p", "rate"), [(None, 0.1), (0.3, 0.3), ("dropout.p", 0.1), (_eager_only, 0.4)]
)
def test_eager_attention_dropout_gets_the_configured_rate_or_attention_p(
    record_ops: Any, attention_p: Any, rate: float
) -> None:
    model = nn.Sequential(EagerAttention(), ZeroRateBlock()).eval()
    x = torch.randn(64, 12, 8)
    _check_sites(model, lambda: model(x), {"0.dropout": rate}, record_ops, attention_p=attention_p)


def test_attention_p_zero_turns_eager_and_sdpa_attention_off() -> None:
    model = nn.Sequential(EagerAttention(), FusedAttention(8, 2, 0.3, 0.0)).eval()
    x = torch.randn(4, 6, 8)
    with pytest.warns(NoDropoutFoundWarning), mc_dropout(model, attention_p=0.0) as handle:
        assert torch.equal(model(x), model(x))
    assert handle.ops == 0


@pytest.mark.parametrize("attention_p", [None, 0.3])
def test_attention_p_on_sdpa_mha_and_dropkit_attention(record_ops: Any, attention_p: float | None) -> None:
    """A positive ``dropout_p`` passed to SDPA, torch's ``MultiheadAttention`` (rate 0 or not) and
    dropkit's attention layers: their own rates by default, ``attention_p`` replacing them all."""

    class ExplicitRate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = x.unsqueeze(1)
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.2).squeeze(1)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.explicit = ExplicitRate()
            self.mha = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
            self.mha_without = nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True)
            self.weights_drop = dropkit.nn.AttentionDropout(0.15)
            self.sdpa = dropkit.nn.ScaledDotProductAttention(0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.explicit(x)
            x = self.mha(x, x, x, need_weights=False)[0]
            x = self.mha_without(x, x, x)[0]
            x = self.weights_drop(torch.softmax(x @ x.transpose(-1, -2), dim=-1)) @ x
            return x + self.sdpa(x.unsqueeze(1), x.unsqueeze(1), x.unsqueeze(1)).squeeze(1)

    model = Attention().eval()
    x = torch.randn(32, 10, 8)

    def run() -> None:
        # dropkit's fused attention layer takes attention_p as its rate for the mode
        assert model.sdpa.p == (0.0 if attention_p is None else attention_p)
        model(x)

    if attention_p is None:
        expected = {"explicit": 0.2, "mha": 0.1, "weights_drop": 0.15}
    else:
        expected = dict.fromkeys(["explicit", "mha", "mha_without", "weights_drop", "sdpa"], attention_p)
    _check_sites(model, run, expected, record_ops, attention_p=attention_p, unmeasured={"sdpa"})
    assert (model.mha.dropout, model.mha_without.dropout, model.weights_drop.p, model.sdpa.p) == (
        0.1,
        0.0,
        0.15,
        0.0,
    )


# ---------------------------------------------------------------------------------------------
# Stochastic depth


def _drop_path_model(foreign: types.SimpleNamespace) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 8),
        foreign.DropPath(0.2),
        foreign.StochasticDepth(0.3, "row"),
        dropkit.nn.DropPath(0.25),
        dropkit.nn.StochasticDepth(nn.Linear(8, 8), p=0.35),
        foreign.DropPath(0.0),  # rate 0: deterministic, not listed
        nn.Dropout(0.1),
    ).double()


def test_stochastic_depth_is_on_by_default_at_its_rates(
    record_ops: Any, foreign: types.SimpleNamespace
) -> None:
    model = _drop_path_model(foreign).train()
    x = torch.randn(600, 8, dtype=torch.float64)
    expected = {"1": 0.2, "2": 0.3, "3": 0.25, "4": 0.35, "6": 0.1}
    _check_sites(model, lambda: model(x), expected, record_ops)


def test_drop_path_false_leaves_every_stochastic_depth_deterministic(foreign: types.SimpleNamespace) -> None:
    model = _drop_path_model(foreign).eval()
    x = torch.randn(16, 8, dtype=torch.float64)
    with pytest.warns(NoDropoutFoundWarning), mc_dropout(model, drop_path=False, exclude="6"):  # noqa: PT031
        assert torch.equal(model(x), model(x))
        assert not model[3].training
    with mc_dropout(model, drop_path=False) as handle:
        model(x)
    assert handle.modules == ["6"]
    with pytest.raises(TypeError, match=r"drop_path must be a bool, got int \(1\)"):
        enable_mc_dropout(model, drop_path=1)  # type: ignore[arg-type]


def test_foreign_drop_paths_are_keyed_per_sample(foreign: types.SimpleNamespace) -> None:
    model = _drop_path_model(foreign).eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    loop = mc_predict(model, x, 6, seed=2, chunk_size=1, trunk=None)
    torch.testing.assert_close(
        mc_predict(model, x, 6, seed=2, chunk_size=4, trunk=None), loop, rtol=0, atol=1e-12
    )
    torch.testing.assert_close(mc_predict(model, x, 6, seed=2), loop, rtol=0, atol=1e-12)


def test_foreign_drop_path_without_an_exact_equivalent_runs_its_own_code(
    foreign: types.SimpleNamespace,
) -> None:
    unscaled = foreign.DropPath(0.5, scale_by_keep=False)
    model = nn.Sequential(unscaled).eval()
    x = torch.ones(200, 3)
    with pytest.warns(MCDropoutWarning, match=r"0 \(scale_by_keep=False"), mc_dropout(model) as handle:  # noqa: PT031
        y = model(x)
        assert unscaled.training
    assert handle.modules == ["0"]
    rows = (y == 0).all(1)
    assert 0 < int(rows.sum()) < 200
    assert torch.equal(y[~rows], x[~rows])  # kept paths not rescaled: its own code ran
    assert not unscaled.training


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
# Dynamo's own: it reads .grad of the non-leaf tensors a resumed frame takes, at graph breaks.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_model_does_not_recompile_and_matches_eager() -> None:
    counter = pytest.importorskip("torch._dynamo.testing").CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    model = nn.Sequential(
        nn.Linear(8, 8),
        nn.Dropout(0.0),
        FusedAttention(8, 2, 0.2, 0.1),
        EagerAttention(),
        dropkit.nn.Dropout(0.3),
        nn.Linear(8, 2),
    ).eval()
    compiled: Any = torch.compile(model, backend=counter)
    x = torch.randn(3, 5, 8)
    try:
        first = mc_predict(compiled, x, 6, seed=0, chunk_size=3, trunk=None)
        frames = counter.frame_count
        for seed in (1, 2):
            samples = mc_predict(compiled, x, 6, seed=seed, chunk_size=3, trunk=None)
            assert torch.equal(samples, mc_predict(model, x, 6, seed=seed, chunk_size=3, trunk=None))
        with mc_dropout(compiled), torch.no_grad():
            compiled(x.repeat(3, 1, 1))  # a chunk's shape: 3 samples of the batch
        assert counter.frame_count == frames  # no recompiles: new modes, seeds and chunks
        assert torch.equal(first, mc_predict(model, x, 6, seed=0, chunk_size=3, trunk=None))
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))  # after the modes: the eval model again
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Hugging Face (transformers is a test dependency)


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("attention_p", [None, 0.3])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_bert_every_dropout_site_acts(
    transformers: Any, record_ops: Any, attn_implementation: str, attention_p: float | None
) -> None:
    model = tiny_bert(transformers, attn_implementation).train()
    ids = torch.randint(0, 99, (16, 16))
    mask = torch.ones(16, 16, dtype=torch.long)
    mask[:, 12:] = 0
    expected = {name: 0.1 for name, module in model.named_modules() if type(module) is nn.Dropout}
    assert len(expected) == 8
    if attention_p is not None:
        expected.update(
            {f"bert.encoder.layer.{index}.attention.self.dropout": attention_p for index in range(2)}
        )
    _check_sites(
        model,
        lambda: model(input_ids=ids, attention_mask=mask),
        expected,
        record_ops,
        attention_p=attention_p,
    )


def _causal_lm_inputs(padding: bool) -> dict[str, torch.Tensor]:
    """16 sequences of 16 tokens; with ``padding`` the last 4 of each are padding (right padding:
    every query still attends to its first token), else there is no mask (causal attention only:
    SDPA gets ``is_causal=True`` and no mask)."""
    ids = torch.randint(0, 99, (16, 16))
    if not padding:
        return {"input_ids": ids}
    mask = torch.ones(16, 16, dtype=torch.long)
    mask[:, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("padding", [True, False])
@pytest.mark.parametrize("attention_p", [None, 0.3])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gpt2_every_dropout_site_acts(
    transformers: Any, record_ops: Any, attn_implementation: str, attention_p: float | None, padding: bool
) -> None:
    model = tiny_gpt2(transformers, attn_implementation).train()
    inputs = _causal_lm_inputs(padding)
    # Embeddings 0.1, attention 0.2 (the rate held by attn_dropout: a module call in the eager
    # attention of transformers 4.x, the rate of a functional call in 5.x and with SDPA), and the
    # residual dropouts after the attention and the MLP 0.15: each site at its own rate.
    attention = 0.2 if attention_p is None else attention_p
    expected = {"transformer.drop": 0.1}
    for index in range(2):
        block = f"transformer.h.{index}"
        expected[f"{block}.attn.attn_dropout"] = attention
        expected[f"{block}.attn.resid_dropout"] = 0.15
        expected[f"{block}.mlp.dropout"] = 0.15
    assert expected.keys() == {name for name, module in model.named_modules() if type(module) is nn.Dropout}
    handle = _check_sites(
        model, lambda: model(**inputs), expected, record_ops, rounds=2, attention_p=attention_p
    )
    assert handle.intercepted_calls == 2 * len(expected)  # the torch modules call F.dropout too


@pytest.mark.parametrize("attention_p", [None, 0.3])
@pytest.mark.parametrize(("key_value_heads", "padding"), [(2, True), (1, False)])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_llama_attention_dropout_acts(
    transformers: Any,
    record_ops: Any,
    attn_implementation: str,
    key_value_heads: int,
    padding: bool,
    attention_p: float | None,
) -> None:
    model = tiny_llama(transformers, attn_implementation, num_key_value_heads=key_value_heads).train()
    inputs = _causal_lm_inputs(padding)
    # No dropout module: the functional attention dropout is the only site, its rate the
    # attention's attention_dropout float (grouped-query attention with one key/value head too).
    assert not any(isinstance(module, nn.Dropout) for module in model.modules())
    rate = 0.2 if attention_p is None else attention_p
    expected = {f"model.layers.{index}.self_attn": rate for index in range(2)}
    handle = _check_sites(
        model, lambda: model(**inputs), expected, record_ops, rounds=2, attention_p=attention_p
    )
    assert handle.intercepted_calls == 2 * 2


def test_bert_with_keywords_and_model_output(transformers: Any) -> None:
    model = tiny_bert(transformers, "eager").eval()
    ids = torch.randint(0, 99, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    samples = mc_predict(model, T=5, input_ids=ids, attention_mask=mask, output="logits", seed=0)
    assert samples.shape == (5, 3, 3)
    assert not torch.equal(samples[0], samples[1])
    assert torch.equal(
        samples, mc_predict(model, T=5, input_ids=ids, attention_mask=mask, output="logits", seed=0)
    )


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_vit_every_dropout_site_acts(transformers: Any, record_ops: Any, attn_implementation: str) -> None:
    model = tiny_vit(
        transformers, attention_probs_dropout_prob=0.15, attn_implementation=attn_implementation
    ).train()
    pixels = torch.randn(16, 3, 16, 16)
    expected = {name: 0.1 for name, module in model.named_modules() if type(module) is nn.Dropout}
    expected.update(
        {name: 0.15 for name, module in model.named_modules() if hasattr(module, "attention_dropout")}
    )
    assert len(expected) == 5
    _check_sites(model, lambda: model(pixel_values=pixels), expected, record_ops)


def test_convnext_drop_paths_act(transformers: Any, record_ops: Any) -> None:
    model = tiny_convnext(transformers).train()
    pixels = torch.randn(128, 3, 32, 32)
    expected = {
        name: module.drop_prob
        for name, module in model.named_modules()
        if type(module).__name__ == "ConvNextDropPath"
    }
    assert len(expected) == 3  # the first block's rate is 0: an nn.Identity there
    _check_sites(model, lambda: model(pixel_values=pixels), expected, record_ops, rounds=4)
    with pytest.warns(NoDropoutFoundWarning), mc_dropout(model, drop_path=False), torch.no_grad():
        assert torch.equal(model(pixel_values=pixels[:4]).logits, model(pixel_values=pixels[:4]).logits)


# ---------------------------------------------------------------------------------------------
# timm and torchvision (skipped where they do not import)


def _rates(model: nn.Module, rate_of: Callable[[nn.Module], float | None]) -> dict[str, float]:
    sites = {name: rate_of(module) for name, module in model.named_modules()}
    return {name: rate for name, rate in sites.items() if rate}


def _dropout_or_drop_path_rate(module: Any) -> float | None:
    if type(module) is nn.Dropout:
        return float(module.p)
    if type(module).__name__ == "DropPath":
        return float(module.drop_prob)
    if type(module).__name__ == "StochasticDepth":
        return float(module.p)
    return None


def _called(model: nn.Module, run: Callable[[], object]) -> set[str]:
    """Names of the modules that one (eval, no-grad) call of ``run`` calls."""
    called: set[str] = set()
    hooks = [
        module.register_forward_hook(lambda *_, name=name: called.add(name))
        for name, module in model.named_modules()
    ]
    with torch.no_grad():
        run()
    for hook in hooks:
        hook.remove()
    return called


def test_timm_resnet18(record_ops: Any) -> None:
    timm = import_or_skip("timm")
    model = timm.create_model(  # zero_init_last=False: else each residual branch is 0 at init
        "resnet18", pretrained=False, num_classes=5, drop_rate=0.2, drop_path_rate=0.5, zero_init_last=False
    )
    x = torch.randn(128, 3, 16, 16)
    model.train()(x)  # BatchNorm statistics of its own
    expected = _rates(model, _dropout_or_drop_path_rate)
    expected[""] = 0.2  # the head's F.dropout(x, p=drop_rate, training=self.training), made by the root
    _check_sites(model, lambda: model(x), expected, record_ops)


def test_timm_vit(record_ops: Any) -> None:
    timm = import_or_skip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        num_classes=5,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        drop_path_rate=0.5,  # linear over the blocks: at least 0.045, for enough dropped samples
    ).train()
    x = torch.randn(128, 3, 32, 32)
    expected = _rates(model, _dropout_or_drop_path_rate)
    assert "pos_drop" not in expected  # p = 0: not a site
    assert "blocks.0.attn.attn_drop" in expected  # never called by the fused attention: its rate acts
    _check_sites(model, lambda: model(x), expected, record_ops, rounds=2)


def test_timm_vit_trunk_runs_the_blocks_once() -> None:
    """The issue's case: timm's ViT at its default rates (``pos_drop`` with p = 0, attention
    and drop path off), with a head dropout: the trunk holds every block."""
    timm = import_or_skip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5, drop_rate=0.1
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with mc_dropout(model) as handle:
        split = split_trunk(model, handle, (x,))
    assert split is not None
    assert split.head_modules == ["head_drop", "head"]
    calls = _count_calls(list(model.blocks))
    samples = mc_predict(model, x, 50, seed=0)
    assert calls == [1] * len(calls)
    manual = mc_predict(model, x, 50, seed=0, trunk=model.forward_features, head=model.forward_head)
    torch.testing.assert_close(manual, samples)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "vit"])
def test_torchvision_models(record_ops: Any, name: str) -> None:
    models = import_or_skip("torchvision.models")
    if name == "vit":
        model = models.VisionTransformer(
            image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=37,
            dropout=0.1, attention_dropout=0.15, num_classes=5,
        )  # fmt: skip
    else:
        # efficientnet: stochastic depth up to 0.8 (0.05 in the second block) for enough dropped samples
        options = {"stochastic_depth_prob": 0.8} if name == "efficientnet_b0" else {}
        model = getattr(models, name)(weights=None, num_classes=5, **options)
    x = torch.randn(128, 3, 8, 8) if name != "vit" else torch.randn(64, 3, 32, 32)
    model.train()(x)
    expected = _rates(model, _dropout_or_drop_path_rate)
    expected.update(
        _rates(model, lambda m: float(m.dropout) if isinstance(m, nn.MultiheadAttention) else None)
    )
    # efficientnet's first block of a stage has no residual: its drop path is never called
    called = _called(model.eval(), lambda: model(x))
    expected = {name: rate for name, rate in expected.items() if name in called}
    _check_sites(model.train(), lambda: model(x), expected, record_ops)
