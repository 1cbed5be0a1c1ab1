"""Attention-weight dropout, residual dropout and the dropout-aware scaled dot-product attention."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as torch_F

import dropkit
from dropkit.functional.attention import residual_dropout, scaled_dot_product_attention
from dropkit.nn._base import _RandomLayer
from dropkit.nn.attention import AttentionDropout, ResidualDropout, ScaledDotProductAttention

F64 = torch.float64


def qkv(
    batch: int = 2,
    heads: int = 3,
    length: int = 5,
    source: int = 7,
    dim: int = 8,
    value_dim: int = 4,
    kv_heads: int | None = None,
    dtype: torch.dtype = F64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kv = heads if kv_heads is None else kv_heads
    return (
        torch.randn(batch, heads, length, dim, dtype=dtype),
        torch.randn(batch, kv, source, dim, dtype=dtype),
        torch.randn(batch, kv, source, value_dim, dtype=dtype),
    )


def torch_weights(q: torch.Tensor, k: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """torch's attention weights: its SDPA (dropout 0) applied to an identity value matrix."""
    source = k.shape[-2]
    eye = torch.eye(source, dtype=q.dtype).expand(*k.shape[:-2], source, source)
    return torch_F.scaled_dot_product_attention(q, k, eye, **kwargs)


CASES: list[dict[str, Any]] = [
    {},
    {"is_causal": True},
    {"scale": 0.3},
    {"attn_mask": "bool"},
    {"attn_mask": "float"},
    {"attn_mask": "bool_with_empty_rows"},
    {"gqa": True},
    {"gqa": True, "is_causal": True},
]
CASE_IDS = ["plain", "causal", "scale", "bool_mask", "float_mask", "empty_rows", "gqa", "gqa_causal"]


def build_case(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    case = dict(case)
    gqa = case.pop("gqa", False)
    q, k, v = qkv(heads=4, kv_heads=2 if gqa else None)
    kwargs: dict[str, Any] = dict(case)
    if gqa:
        kwargs["enable_gqa"] = True
    mask_kind = kwargs.pop("attn_mask", None)
    if mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(5, 7) > 0.4
        kwargs["attn_mask"][:, 0] = True  # every row attends somewhere
    elif mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 7, dtype=F64)
    elif mask_kind == "bool_with_empty_rows":
        mask = torch.rand(2, 4, 5, 7) > 0.5
        mask[:, :, 1] = False  # row 1 attends nowhere: zero weights, as torch gives
        kwargs["attn_mask"] = mask
    return q, k, v, kwargs


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention: the explicit (engine) path against torch's kernel


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_engine_path_is_torch_weights_dropped_by_dropkit_mask(case: dict[str, Any]) -> None:
    """Training output = dropkit.functional.dropout(torch's weights, same key) @ v."""
    q, k, v, kwargs = build_case(case)
    p = 0.3
    weights = torch_weights(q, k, **kwargs)
    values = v.repeat_interleave(2, dim=1) if kwargs.get("enable_gqa") else v
    expected = dropkit.functional.dropout(weights, p, seed=11) @ values
    out = scaled_dot_product_attention(q, k, v, dropout_p=p, seed=11, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if "attn_mask" in kwargs and kwargs["attn_mask"].dtype == torch.bool:
        assert not out.isnan().any()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_dropout_is_torch_sdpa_exactly(case: dict[str, Any]) -> None:
    q, k, v, kwargs = build_case(case)
    expected = torch_F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(scaled_dot_product_attention(q, k, v, **kwargs), expected)
    assert torch.equal(
        scaled_dot_product_attention(q, k, v, dropout_p=0.0, training=True, **kwargs), expected
    )
    # Eval: dropout_p is ignored, whatever it is (the bug SDPA callers keep making).
    out = scaled_dot_product_attention(q, k, v, dropout_p=0.7, training=False, **kwargs)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_path_low_precision_matches_float64(dtype: torch.dtype) -> None:
    q, k, v = qkv()
    out = scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p=0.2, seed=3)
    assert out.dtype == dtype
    reference = scaled_dot_product_attention(
        q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), dropout_p=0.2, seed=3
    )
    tolerance = 1e-5 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance)


def test_engine_gradcheck_float64() -> None:
    q, k, v = (t.requires_grad_() for t in qkv(batch=1, heads=2, length=3, source=4, dim=3, value_dim=2))
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, False, True]])

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return scaled_dot_product_attention(q, k, v, mask, dropout_p=0.3, seed=4)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True, seed=1),
        (q, k, v),
    )
    fn(q, k, v).sum().backward()  # a fully masked row: zero, finite gradients
    assert torch.isfinite(q.grad).all()
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))


def test_seed_and_generator_reproduce_and_global_stream_advances() -> None:
    q, k, v = qkv()
    a = scaled_dot_product_attention(q, k, v, dropout_p=0.5, seed=7)
    assert torch.equal(a, scaled_dot_product_attention(q, k, v, dropout_p=0.5, seed=7))
    assert not torch.equal(a, scaled_dot_product_attention(q, k, v, dropout_p=0.5, seed=8))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=g1),
        scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=g2),
    )
    dropkit.manual_seed(5)
    first = [scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(2)]
    dropkit.manual_seed(5)
    again = [scaled_dot_product_attention(q, k, v, dropout_p=0.5) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])


def test_fused_torch_path_uses_torch_rng_and_is_off_in_eval() -> None:
    q, k, v = qkv()
    torch.manual_seed(21)
    expected = torch_F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(21)
    out = scaled_dot_product_attention(q, k, v, dropout_p=0.4, use_engine=False)
    assert torch.equal(out, expected)
    assert not torch.equal(out, torch_F.scaled_dot_product_attention(q, k, v))
    off = scaled_dot_product_attention(q, k, v, dropout_p=0.4, training=False, use_engine=False)
    assert torch.equal(off, torch_F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="use_engine=True"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.4, use_engine=False, seed=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scale": "x"}, TypeError, "scale must be a float or None, got str"),
        ({"scale": math.inf}, ValueError, "scale must be finite, got inf"),
        ({"training": 1}, TypeError, "training must be a bool, got int"),
        ({"use_engine": None}, TypeError, "use_engine must be a bool"),
        ({"is_causal": True, "attn_mask": torch.ones(5, 7, dtype=torch.bool)}, ValueError, "at most one"),
        ({"attn_mask": torch.ones(5, 6, dtype=torch.bool)}, ValueError, r"attn_mask of shape \(5, 6\)"),
        ({"attn_mask": torch.ones(5, 7, dtype=torch.int64)}, TypeError, "attn_mask must be a bool or"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "at most one of seed and generator"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    q, k, v = qkv()
    kwargs.setdefault("dropout_p", 0.1)
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(q, k, v, **kwargs)


def test_bad_tensors_name_the_argument() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match="key must have the query's dtype"):
        scaled_dot_product_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="key must have the query's feature size 8"):
        scaled_dot_product_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="value must have the key's length 7"):
        scaled_dot_product_attention(q, k, v[..., :6, :])
    with pytest.raises(TypeError, match=r"query must be a torch\.Tensor, got list"):
        scaled_dot_product_attention([1.0], k, v)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch dims of query, key and value must broadcast"):
        scaled_dot_product_attention(q, k[:, :2], v[:, :2])
    q4, k2, v2 = qkv(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        scaled_dot_product_attention(q4, k2, v2, enable_gqa=True)


# ---------------------------------------------------------------------------------------------
# Modules


def test_modules_are_random_layers_and_repr() -> None:
    for module in (AttentionDropout(), ResidualDropout(), ScaledDotProductAttention()):
        assert isinstance(module, _RandomLayer)
        assert module.state_dict() == {}  # the step counter stays out of checkpoints
    assert isinstance(AttentionDropout(), dropkit.nn.Dropout)
    assert AttentionDropout().p == ResidualDropout().p == ScaledDotProductAttention().p == 0.1
    assert ScaledDotProductAttention(0.3).dropout_p == 0.3
    assert (
        repr(ScaledDotProductAttention(0.2, use_engine=False))
        == "ScaledDotProductAttention(p=0.2, use_engine=False)"
    )
    assert repr(ResidualDropout(0.3)) == "ResidualDropout(p=0.3)"
    assert repr(AttentionDropout(0.2)) == "AttentionDropout(p=0.2, inplace=False)"


def test_attention_dropout_draws_the_key_of_its_stream_and_step() -> None:
    p = 0.2
    weights = torch.softmax(torch.randn(8, 4, 16, 16), dim=-1)
    m = AttentionDropout(p)
    y = m(weights)
    assert torch.equal(
        y, dropkit.functional.dropout(weights, p, seed=dropkit.make_key(1234, m.rng_stream, 0))
    )


def test_sdpa_module_uses_self_training_and_matches_attention_dropout() -> None:
    q, k, v = qkv()
    module = ScaledDotProductAttention(0.3)
    out = module(q, k, v, seed=5)
    torch.testing.assert_close(
        out, AttentionDropout(0.3)(torch_weights(q, k), seed=5) @ v, rtol=1e-12, atol=1e-12
    )
    assert torch.equal(out, scaled_dot_product_attention(q, k, v, dropout_p=0.3, seed=5))
    module.eval()
    assert torch.equal(
        module(q, k, v, is_causal=True), torch_F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
    assert int(module.rng_step) == 0  # per-call seeds and eval forwards draw nothing from the stream


def test_sdpa_module_masks_follow_manual_seed_and_step() -> None:
    q, k, v = qkv()

    def run() -> list[torch.Tensor]:
        dropkit.manual_seed(3)
        module = ScaledDotProductAttention(0.5)
        return [module(q, k, v) for _ in range(3)]

    first, again = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
    dropkit.manual_seed(3)
    module = ScaledDotProductAttention(0.5)
    key = dropkit.make_key(3, module.rng_stream, 1)
    module(q, k, v)
    assert torch.equal(module(q, k, v), scaled_dot_product_attention(q, k, v, dropout_p=0.5, seed=key))
    assert int(module.rng_step) == 2


# ---------------------------------------------------------------------------------------------
# ResidualDropout / residual_dropout


def test_residual_dropout_without_bias_is_residual_plus_dropout() -> None:
    x, residual = torch.randn(4, 6, 16), torch.randn(4, 6, 16)
    out = residual_dropout(x, residual, 0.4, seed=2)
    assert torch.equal(out, residual + dropkit.functional.dropout(x, 0.4, seed=2))
    module = ResidualDropout(0.4)
    assert torch.equal(module(x, residual, seed=2), out)


class _ResidualBlock(torch.nn.Module):
    def __init__(self, deprecated_order: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(4))
        self.deprecated_order = deprecated_order
        if deprecated_order:
            with pytest.warns(DeprecationWarning, match="BiasDropoutAdd"):
                self.residual_drop: ResidualDropout = dropkit.nn.BiasDropoutAdd(0.5)
        else:
            self.residual_drop = ResidualDropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deprecated_order:  # (input, bias, residual)
            output: torch.Tensor = self.residual_drop(self.linear(x), self.bias, x)
        else:
            output = self.residual_drop(self.linear(x), x, self.bias)
        return output


@pytest.mark.parametrize("deprecated_order", [False, True])
def test_residual_dropout_under_mc_predict_splits_the_residual_like_the_input(deprecated_order: bool) -> None:
    # Batched MC sampling stacks the samples along dim 0: the residual is split with the input.
    block = _ResidualBlock(deprecated_order).eval()
    x = torch.randn(3, 4)
    samples = dropkit.mc_predict(block, x, 6, seed=0)
    one_at_a_time = dropkit.mc_predict(block, x, 6, seed=0, chunk_size=1)
    assert isinstance(samples, torch.Tensor)
    assert isinstance(one_at_a_time, torch.Tensor)
    assert samples.shape == (6, 3, 4)
    assert torch.equal(samples, one_at_a_time)
    assert not torch.equal(samples[0], samples[1])


def test_residual_dropout_bad_input() -> None:
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(3, 8\), got \(3, 7\)"):
        residual_dropout(x, torch.randn(3, 7))
    with pytest.raises(TypeError, match="residual must have the input's dtype"):
        residual_dropout(x, torch.randn(3, 8, dtype=F64))
    with pytest.raises(ValueError, match="bias of shape"):
        residual_dropout(x, x, 0.1, bias=torch.randn(5))
    with pytest.raises(TypeError, match=r"residual must be a torch\.Tensor"):
        residual_dropout(x, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the engine's masks do not depend on the device.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_path_on_cuda_matches_cpu(dtype: torch.dtype) -> None:
    q, k, v = (t.to(dtype) for t in qkv())
    cpu = scaled_dot_product_attention(q, k, v, dropout_p=0.3, seed=5)
    gpu = scaled_dot_product_attention(q.cuda(), k.cuda(), v.cuda(), dropout_p=0.3, seed=5)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(gpu.cpu().double(), cpu.double(), rtol=tolerance, atol=tolerance)
    x, residual, bias = (torch.randn(4, 6, 16), torch.randn(4, 6, 16), torch.randn(16))
    on_gpu = residual_dropout(x.cuda(), residual.cuda(), 0.3, bias=bias.cuda(), seed=2)
    torch.testing.assert_close(on_gpu.cpu(), residual_dropout(x, residual, 0.3, bias=bias, seed=2))


@cuda
def test_fused_torch_path_on_cuda_is_off_in_eval() -> None:
    q, k, v = (t.to("cuda", torch.bfloat16) for t in qkv(dim=64, value_dim=64))
    clean = torch_F.scaled_dot_product_attention(q, k, v)
    module = ScaledDotProductAttention(0.5, use_engine=False)
    assert not torch.equal(module(q, k, v), clean)
    assert torch.equal(module.eval()(q, k, v), clean)
