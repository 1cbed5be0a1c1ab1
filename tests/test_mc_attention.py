"""Attention dropout intercepted by the MC mode runs by the functional's maths.

The MC path and :func:`dropkit.functional.scaled_dot_product_attention` share the computation of
the attention weights, so for the same key they agree bit for bit: in float32 for half inputs
(rounded once), and with zeros, never NaN, for query rows that attend nowhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit import functional as dk_F
from dropkit.mc.mode import mc_dropout
from dropkit.mc.plan import op_stream

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EMPTY_ROW = 1  # the query row that attends nowhere in every mask below
RATE = 0.1


class MaskedAttention(nn.Module):
    """Calls torch's SDPA with a mask: with the rate given (``dropout_p=0.1``), or timm-style
    (``dropout_p=0`` in eval, the rate found on ``attn_drop``)."""

    def __init__(self, explicit_rate: bool) -> None:
        super().__init__()
        self.explicit_rate = explicit_rate
        self.attn_drop = nn.Dropout(RATE)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.explicit_rate:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=RATE)
        p = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # q, k, v, attn_mask


def _inputs(dtype: torch.dtype, mask_kind: str) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 5, 4, generator=generator)
    k = torch.randn(2, 2, 7, 4, generator=generator)
    v = torch.randn(2, 2, 7, 3, generator=generator)
    if mask_kind == "bool":
        mask = torch.rand(5, 7, generator=generator) > 0.5
        mask[:, 0] = True  # every other row attends somewhere
        mask[EMPTY_ROW] = False
    else:
        mask = torch.randn(2, 1, 5, 7, generator=generator)
        mask[:, :, EMPTY_ROW] = float("-inf")
        mask = mask.to(dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def _mc_forward(model: nn.Module, inputs: Inputs, seed: int, sample: int) -> torch.Tensor:
    """One MC sample of ``model``: its (only) op keyed ``make_key(seed, op_stream((0,)), sample)``."""
    with mc_dropout(model) as handle, handle.sampling(seed, sample, 1), torch.no_grad():
        out: torch.Tensor = model(*inputs)
    assert handle.intercepted_calls == 1
    return out


@pytest.mark.parametrize("explicit_rate", [True, False], ids=["dropout_p", "found_rate"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mc_attention_equals_functional_with_zero_empty_rows(
    dtype: torch.dtype, mask_kind: str, explicit_rate: bool
) -> None:
    inputs = _inputs(dtype, mask_kind)
    out = _mc_forward(MaskedAttention(explicit_rate).eval(), inputs, seed=5, sample=2)
    key = dropkit.make_key(5, op_stream((0,)), 2)
    expected = dk_F.scaled_dot_product_attention(*inputs, dropout_p=RATE, seed=key)
    assert out.dtype == dtype
    assert not out.isnan().any()
    assert torch.equal(out[:, :, EMPTY_ROW], torch.zeros_like(out[:, :, EMPTY_ROW]))
    assert torch.equal(out, expected)
    # Some weights are dropped and others kept: the path did run dropout.
    undropped = dk_F.scaled_dot_product_attention(*inputs, dropout_p=0.0)
    assert not torch.equal(out, undropped)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mc_attention_computes_half_inputs_in_float32(dtype: torch.dtype, mask_kind: str) -> None:
    q, k, v, mask = _inputs(dtype, mask_kind)
    out = _mc_forward(MaskedAttention(explicit_rate=True).eval(), (q, k, v, mask), seed=9, sample=0)
    key = dropkit.make_key(9, op_stream((0,)), 0)
    in_float32 = dk_F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), mask if mask.dtype == torch.bool else mask.float(), RATE, seed=key
    )
    assert torch.equal(out, in_float32.to(dtype))


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_mc_attention_on_the_functional_stream_equals_functional(mask_kind: str) -> None:
    """Outside a sampling plan the intercepted call draws from the functional stream, as the
    functional does with no seed."""
    inputs = _inputs(torch.float32, mask_kind)
    model = MaskedAttention(explicit_rate=True).eval()
    dropkit.manual_seed(17)
    with mc_dropout(model), torch.no_grad():
        out = model(*inputs)
    dropkit.manual_seed(17)
    assert torch.equal(out, dk_F.scaled_dot_product_attention(*inputs, dropout_p=RATE))


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_mc_attention_empty_rows_have_zero_finite_gradients(mask_kind: str) -> None:
    q, k, v, mask = _inputs(torch.float32, mask_kind)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    model = MaskedAttention(explicit_rate=True).eval()
    with mc_dropout(model):
        model(q, k, v, mask).sum().backward()
    for grad in (q.grad, k.grad, v.grad):
        assert grad is not None
        assert torch.isfinite(grad).all()
    assert q.grad is not None
    assert torch.equal(q.grad[:, :, EMPTY_ROW], torch.zeros_like(q.grad[:, :, EMPTY_ROW]))


def test_mc_attention_checks_its_arguments_like_the_functional() -> None:
    q, k, v, mask = _inputs(torch.float32, "bool")
    model = MaskedAttention(explicit_rate=True).eval()
    with pytest.raises(ValueError, match="attn_mask of shape"), mc_dropout(model):
        model(q, k, v, mask[:, :3])
