"""mc_predict on the models people use: pytree and keyword inputs, ModelOutput outputs, Hugging
Face BERT and ViT, the chunk plan and the peak-memory budget (ResNet-like and ViT-like stand-ins)."""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.mc.mode import mc_dropout
from dropkit.mc.plan import MCPlan, PeakMemoryMeter
from dropkit.mc.sampling import (
    DEFAULT_CPU_MEMORY_BUDGET,
    DEFAULT_MEMORY_BUDGET,
    default_memory_budget,
    iter_mc_samples,
    last_plan,
    mc_predict,
)
from dropkit.mc.streaming import MCSummary
from tests.real_models import tiny_gpt2, tiny_llama

# -- plain-torch stand-ins ---------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock with a dropout after the second BatchNorm (no trunk to cache)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.1)
        self.down = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if stage and not index else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class Attention(nn.Module):
    """timm's Attention: fused SDPA with ``dropout_p=self.attn_drop.p if self.training else 0``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.1)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, length, dim)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim), nn.Dropout(0.1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTLike(nn.Module):
    def __init__(self, depth: int = 4, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.pos_drop = nn.Dropout(0.1)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(self.pos_drop(x)))[:, 0])


def _leaf_output_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Sum (what the old budget added up: input plus every leaf-module output) and largest leaf
    output, in bytes, of one eval forward."""
    total, largest = [x.nelement() * x.element_size()], [0]

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        size = output.nelement() * output.element_size()
        total[0] += size
        largest[0] = max(largest[0], size)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not any(m.children())]
    with torch.no_grad():
        model(x)
    for handle in hooks:
        handle.remove()
    return total[0], largest[0]


def _image_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ResNetLike() if name == "resnet" else ViTLike()
    return model.eval(), torch.randn(2, 3, 32, 32)


# -- peak memory and the chunk plan ------------------------------------------------------------


def test_peak_meter_counts_live_allocations_only() -> None:
    before = torch.ones(1000)  # made before the block: not counted, nor its views
    with PeakMemoryMeter() as meter:
        view = before[:10]
        before.add_(1)  # in place on an outside tensor
        a = torch.ones(1000)  # 4000 bytes
        b = a.view(10, 100)  # a view: no new bytes
        del a
        c = b * 2  # 4000 more
        del b  # its storage is freed: 4000 live
        d = c + 1  # 8000 live, the peak so far
        del c, d
    assert meter.peak == 8000
    assert meter.live == 0
    assert view.shape == (10,)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_default_chunk_is_as_large_as_the_budget_allows(name: str) -> None:
    model, x = _image_model(name)
    samples = 50
    total, largest = _leaf_output_bytes(model, x)
    # A budget that holds T times a few of the largest activations: the old rule, which added up
    # every activation, would have run this model in chunks of at most 20 (1, 5, 11 in the issue).
    budget = samples * 8 * largest
    assert budget // total <= 20
    result = mc_predict(model, x, T=samples, seed=0, trunk=None, memory_budget=budget)
    plan = last_plan()
    assert isinstance(plan, MCPlan)
    assert result.shape == (samples, 2, 10)
    assert plan.peak_bytes is not None
    assert largest <= plan.peak_bytes <= 8 * largest  # the peak: a few activations, not their sum
    assert plan.chunks == (samples,)
    assert plan.measured
    # Without a budget, inputs on the CPU get the CPU default, in chunks as large as it allows.
    mc_predict(model, x, T=samples, seed=0, trunk=None)
    default = last_plan()
    assert default is not None
    assert default.memory_budget == DEFAULT_CPU_MEMORY_BUDGET
    chunk = min(samples, DEFAULT_CPU_MEMORY_BUDGET // plan.peak_bytes)
    assert chunk >= 10  # these small models: a few chunks at most
    assert default.chunks[0] == chunk
    assert sum(default.chunks) == samples
    assert str(default).startswith(f"no trunk (trunk=None); chunks of {chunk}")


def test_default_budget_depends_on_the_device_of_the_inputs() -> None:
    assert default_memory_budget("cpu") == DEFAULT_CPU_MEMORY_BUDGET == 32 * 1024 * 1024
    assert default_memory_budget(torch.device("cuda", 1)) == DEFAULT_MEMORY_BUDGET == 256 * 1024 * 1024
    assert default_memory_budget("meta") == DEFAULT_MEMORY_BUDGET
    # A model without tensor inputs or parameters runs on the CPU.
    model = nn.Sequential(nn.Dropout(0.5))
    mc_predict(model, torch.ones(2, 3), T=3, seed=0)
    plan = last_plan()
    assert plan is not None
    assert plan.memory_budget == DEFAULT_CPU_MEMORY_BUDGET


def test_a_chunk_of_k_samples_peaks_at_k_times_the_measured_peak() -> None:
    model, x = _image_model("vit")
    mc_predict(model, x, T=2, seed=0, trunk=None)
    plan = last_plan()
    assert plan is not None
    assert plan.peak_bytes is not None
    with PeakMemoryMeter() as meter:
        mc_predict(model, x, T=10, seed=0, trunk=None, chunk_size=10)
    assert 0.95 * 10 * plan.peak_bytes <= meter.peak <= 1.05 * 10 * plan.peak_bytes


def test_peak_does_not_grow_with_depth() -> None:
    x = torch.randn(2, 3, 32, 32)
    peaks, totals = [], []
    for depth in (2, 6):
        torch.manual_seed(0)
        model = ViTLike(depth=depth).eval()
        mc_predict(model, x, T=2, seed=0, trunk=None)  # T = 2: the measuring forward is the result
        plan = last_plan()
        assert plan is not None
        assert plan.peak_bytes is not None
        assert plan.chunks == (2,)
        peaks.append(plan.peak_bytes)
        totals.append(_leaf_output_bytes(model, x)[0])
    assert totals[1] > 2.5 * totals[0]
    assert peaks[1] <= 1.05 * peaks[0]


def test_chunks_follow_a_small_budget_and_equal_one_forward_bit_for_bit() -> None:
    model, x = _image_model("vit")
    one_chunk = mc_predict(model, x, T=12, seed=4, trunk=None, chunk_size=12)
    plan = last_plan()
    assert plan is not None
    assert plan.peak_bytes is None
    assert plan.memory_budget is None
    mc_predict(model, x, T=2, seed=4, trunk=None)
    peak = last_plan().peak_bytes  # type: ignore[union-attr]
    assert peak is not None
    chunked = mc_predict(model, x, T=12, seed=4, trunk=None, memory_budget=5 * peak)
    plan = last_plan()
    assert plan is not None
    assert plan.chunks == (5, 5, 2)
    assert not plan.measured  # the same input signature: the peak comes from the cache
    assert torch.equal(chunked, one_chunk)
    for options in ({"chunk_size": 1}, {"chunk_size": 7}, {}):
        assert torch.equal(mc_predict(model, x, T=12, seed=4, **options), one_chunk)  # type: ignore[arg-type]


def test_plan_reports_the_trunk_and_logs_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 2)
    ).eval()
    x = torch.randn(3, 6)
    with caplog.at_level(logging.DEBUG, logger="dropkit.mc.sampling"):
        mc_predict(model, x, T=40, seed=0)
    plan = last_plan()
    assert plan is not None
    assert (plan.trunk, plan.trunk_modules, plan.head_modules) == ("auto", 3, 2)
    assert (plan.samples, plan.batch, plan.chunks) == (40, 3, (40,))
    assert str(plan).startswith("trunk: 3 modules, head: 2; chunks of 40; peak ")
    messages = [r.getMessage() for r in caplog.records if r.name == "dropkit.mc.sampling"]
    assert messages == [f"MC plan for Sequential, T = 40, N = 3: {plan}"]
    mc_predict(model, x, T=5, seed=0, trunk=model[:3], head=model[3:], chunk_size=2)
    manual = last_plan()
    assert manual is not None
    assert str(manual) == "trunk: given (trunk=, head=); chunks of 2, last 1"
    # A new input shape is measured again; the same one is not.
    mc_predict(model, torch.randn(5, 6), T=4, seed=0)
    assert last_plan().measured  # type: ignore[union-attr]
    mc_predict(model, torch.randn(5, 6), T=9, seed=0)
    assert not last_plan().measured  # type: ignore[union-attr]


def test_a_failed_split_is_not_tried_again() -> None:
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 4)).eval()  # nothing before the first dropout
    x = torch.randn(3, 4)
    first = mc_predict(model, x, T=4, seed=0)
    assert last_plan().reason.startswith("no split: ")  # type: ignore[union-attr]
    again = mc_predict(model, x, T=4, seed=0)
    assert last_plan().reason == "no split, as in an earlier call with these inputs"  # type: ignore[union-attr]
    assert torch.equal(first, again)
    mc_predict(model, torch.randn(5, 4), T=4, seed=0)  # another input signature: tried again
    assert last_plan().reason.startswith("no split: ")  # type: ignore[union-attr]


def test_iter_mc_samples_sets_the_plan_at_the_first_chunk() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    chunks = iter_mc_samples(model, torch.randn(2, 4), T=6, chunk_size=4, seed=0)
    assert [tuple(chunk.shape) for chunk in chunks] == [(4, 2, 4), (2, 2, 4)]
    assert last_plan().chunks == (4, 2)  # type: ignore[union-attr]


# -- pytrees in and out, keywords --------------------------------------------------------------


class DictModel(nn.Module):
    """Dict input with non-tensor leaves and a keyword flag; tuple output with non-tensor leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.25)

    def forward(self, batch: dict[str, Any], *, double: bool = False) -> tuple[Any, ...]:
        assert batch["scale"] == 2.0 and batch["name"] == "points" and batch["nothing"] is None  # noqa: PT018
        hidden = self.drop(batch["x"] * batch["scale"] + batch["offset"])
        logits = self.fc(hidden)
        return (logits * 2 if double else logits), {"hidden": hidden, "tag": "v1"}, None


def _dict_inputs() -> dict[str, Any]:
    return {
        "x": torch.randn(4, 8),
        "offset": torch.randn(4, 8),
        "scale": 2.0,
        "name": "points",
        "nothing": None,
    }


def test_pytree_inputs_and_outputs() -> None:
    model = DictModel().double().eval()
    inputs = _dict_inputs()
    inputs["x"], inputs["offset"] = inputs["x"].double(), inputs["offset"].double()
    logits, aux, nothing = mc_predict(model, inputs, T=9, seed=1, double=True)
    assert logits.shape == (9, 4, 3)
    assert aux["hidden"].shape == (9, 4, 8)
    assert aux["tag"] == "v1"
    assert nothing is None
    assert not torch.equal(logits[0], logits[1])
    # Bit for bit whatever the chunking, and the keyword flag reached the model.
    for options in ({"chunk_size": 1}, {"chunk_size": 4}, {"memory_budget": 1}):
        again = mc_predict(model, inputs, T=9, seed=1, double=True, **options)  # type: ignore[arg-type]
        assert torch.equal(again[0], logits)
        assert torch.equal(again[1]["hidden"], aux["hidden"])
    single = mc_predict(model, inputs, T=9, seed=1)[0]
    torch.testing.assert_close(single * 2, logits, rtol=0, atol=1e-12)
    # reduce per leaf; non-tensor leaves passed through.
    mean = mc_predict(model, inputs, T=9, seed=1, double=True, reduce="mean")
    torch.testing.assert_close(mean[0], logits.mean(0), rtol=0, atol=1e-12)
    assert mean[1]["tag"] == "v1"
    stats = mc_predict(model, inputs, T=9, seed=1, double=True, reduce="stats", transform="softmax")
    assert isinstance(stats[0], MCSummary)
    assert isinstance(stats[1]["hidden"], MCSummary)
    assert stats[0].probabilities
    torch.testing.assert_close(stats[0].mean, torch.softmax(logits, -1).mean(0), rtol=0, atol=1e-12)
    chunks = list(iter_mc_samples(model, inputs, T=5, chunk_size=3, seed=1, output=lambda out: out[1]))
    assert [chunk["hidden"].shape[0] for chunk in chunks] == [3, 2]
    assert all(chunk["tag"] == "v1" for chunk in chunks)


def test_mc_mean_and_drop_rate_match_dropout_within_5_sigma() -> None:
    p, samples = 0.25, 400
    model = DictModel().double().eval()
    inputs = _dict_inputs()
    inputs["x"], inputs["offset"] = inputs["x"].double(), inputs["offset"].double()
    dropkit.manual_seed(0)
    stats = mc_predict(model, inputs, T=samples, reduce="stats", output=0, chunk_size=100)
    with torch.no_grad():
        expected = model(inputs)[0]  # eval output = the expectation of inverted dropout before a linear layer
    standard_error = stats.std / math.sqrt(samples)
    assert bool(((stats.mean - expected).abs() <= 5 * standard_error + 1e-9).all())
    hidden = mc_predict(model, inputs, T=50, seed=3, output=lambda out: out[1]["hidden"])
    dropped = float((hidden == 0).double().mean())
    draws = hidden.numel()
    assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / draws)


class Pair(NamedTuple):
    logits: torch.Tensor
    n: int


class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, seed: int = 0) -> Pair:
        h = self.fc1(x)
        if mask is not None:
            h = h * mask
        return Pair(self.fc2(self.drop(h)) + seed, seed)


def test_keyword_inputs_output_selectors_and_model_kwargs() -> None:
    model = KeywordModel().double().eval()
    x, mask = torch.randn(3, 4, dtype=torch.float64), torch.ones(3, 8, dtype=torch.float64)
    by_keyword = mc_predict(model, T=6, seed=2, x=x, mask=mask, output="logits", model_kwargs={"seed": 0})
    assert last_plan().trunk == "auto"  # type: ignore[union-attr]  # keywords mapped onto forward's parameters
    positional = mc_predict(model, x, mask, T=6, seed=2, output=0)
    assert last_plan().trunk == "auto"  # type: ignore[union-attr]  # seed traced at its default
    assert torch.equal(by_keyword, positional)
    uncached = mc_predict(model, x, mask, T=6, seed=2, output=lambda out: out.logits, trunk=None)
    assert torch.equal(uncached, positional)
    whole = mc_predict(model, x, T=6, seed=2, model_kwargs={"mask": mask, "seed": 10})
    assert isinstance(whole, Pair)
    assert whole.n == 10
    torch.testing.assert_close(whole.logits, positional + 10, rtol=0, atol=1e-12)
    assert last_plan().trunk == "auto"  # type: ignore[union-attr]
    # A parameter left to its default before a given one: a traced mask would take the other
    # branch (a proxy is not None), so no trunk; the samples are the same.
    gap = mc_predict(model, x, T=6, seed=2, output="logits", model_kwargs={"seed": 10})
    plan = last_plan()
    assert plan is not None
    assert (plan.trunk, plan.reason) == (
        None,
        "forward parameter 'mask' left to its default before a given one",
    )
    no_mask = mc_predict(model, x, T=6, seed=2, output="logits")
    assert last_plan().trunk == "auto"  # type: ignore[union-attr]
    assert torch.equal(gap, no_mask + 10)
    with pytest.raises(ValueError, match="has no attribute 'probs'"):
        mc_predict(model, x, T=2, output="probs")
    with pytest.raises(TypeError, match=r"both directly and in model_kwargs"):
        mc_predict(model, x, T=2, mask=mask, model_kwargs={"mask": mask})
    with pytest.raises(ValueError, match=r"input mask must have a non-empty batch dim first"):
        mc_predict(model, x, T=2, mask=torch.tensor(1.0))


def test_nested_tensor_inputs_run_without_the_auto_trunk() -> None:
    model = DictModel().eval()
    mc_predict(model, _dict_inputs(), T=3, seed=0)
    plan = last_plan()
    assert plan is not None
    assert (plan.trunk, plan.reason) == (None, "tensors nested in containers")


def test_reduce_rejects_integer_outputs() -> None:
    class Votes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.drop(x)
            return {"y": y, "vote": y.argmax(-1)}

    x = torch.randn(2, 5)
    assert mc_predict(Votes(), x, T=3, seed=0)["vote"].dtype == torch.int64
    with pytest.raises(
        TypeError, match=r"needs floating-point outputs, got torch.int64 for output\['vote'\]"
    ):
        mc_predict(Votes(), x, T=3, seed=0, reduce="mean")
    assert mc_predict(Votes(), x, T=3, seed=0, reduce="mean", output="y").shape == (2, 5)


# -- Hugging Face ------------------------------------------------------------------------------


def _bert(implementation: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99,
        num_labels=3, attn_implementation=implementation,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_hugging_face_bert_with_keywords_and_model_output(implementation: str) -> None:
    model = _bert(implementation)
    torch.manual_seed(1)
    ids = torch.randint(99, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        eval_logits = model(input_ids=ids, attention_mask=mask).logits
    output = mc_predict(model, T=10, seed=0, input_ids=ids, attention_mask=mask)
    assert type(output).__name__ == "SequenceClassifierOutput"
    assert output.logits.shape == (10, 4, 3)
    assert not torch.equal(output.logits[0], output.logits[1])
    logits = mc_predict(
        model, T=10, seed=0, input_ids=ids, attention_mask=mask, output="logits", chunk_size=3
    )
    assert torch.equal(logits, output.logits)
    stats = mc_predict(
        model, T=10, seed=0, input_ids=ids, attention_mask=mask, reduce="stats", transform="softmax"
    )  # fmt: skip
    assert isinstance(stats.logits, MCSummary)
    assert stats.logits.votes.sum() == 40
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, eval_logits)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_causal_lm_logits_per_token(family: str, implementation: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family](transformers, implementation).eval()
    torch.manual_seed(1)
    ids = torch.randint(99, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad():
        eval_logits = model(input_ids=ids, attention_mask=mask).logits
    logits = mc_predict(model, T=4, input_ids=ids, attention_mask=mask, output="logits", seed=0)
    assert logits.shape == (4, 3, 6, 99)
    assert bool(torch.isfinite(logits).all())
    # Every pair of samples differs, at every sequence (LLaMA: through the attention dropout alone).
    for i in range(4):
        for j in range(i):
            assert all(not torch.equal(logits[i, b], logits[j, b]) for b in range(3)), (i, j)
    assert not any(torch.equal(logits[t], eval_logits) for t in range(4))
    # Same seed, same samples; in chunks of 3 the same masks, the values up to the last bits
    # (torch's vectorised SiLU of LLaMA's MLP rounds the tail of a tensor differently, so a
    # sample's values depend on the chunk's size by an ulp: a kernel's, not the masks').
    again = mc_predict(model, T=4, input_ids=ids, attention_mask=mask, output="logits", seed=0)
    assert torch.equal(again, logits)
    chunked = mc_predict(
        model, T=4, input_ids=ids, attention_mask=mask, output="logits", seed=0, chunk_size=3
    )  # fmt: skip
    torch.testing.assert_close(chunked, logits, rtol=0, atol=1e-6)
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3  # far above that tolerance
    # Another seed, other samples.
    other = mc_predict(model, T=4, input_ids=ids, attention_mask=mask, output="logits", seed=1)
    assert not torch.equal(other, logits)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, eval_logits)


def test_hugging_face_vit() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=5,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).eval()
    pixels = torch.randn(3, 3, 32, 32)
    logits = mc_predict(model, pixels, T=8, seed=0, output="logits")
    assert logits.shape == (8, 3, 5)
    assert not torch.equal(logits[0], logits[1])
    assert torch.equal(
        mc_predict(model, T=8, seed=0, pixel_values=pixels, output="logits", chunk_size=3), logits
    )
    with mc_dropout(model) as handle:
        inside = mc_predict(model, pixels, T=8, seed=0, output=0)
        assert handle.active
    assert torch.equal(inside, logits)
