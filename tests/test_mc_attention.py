"""Attention dropout intercepted by the MC mode runs :func:`dropkit.functional.scaled_dot_product_attention`.

Each sample's slice of an intercepted SDPA call runs the functional with the sample's key, so for
the same key they agree bit for bit: in float32 for half inputs (rounded once), and with zeros,
never NaN, for query rows that attend nowhere.  The masks are those of the materialised weights
of the whole call cut per sample and dropped with each sample's key (what the mode computed
before it ran the functional), on every path the functional takes (materialised, blocked), for
every way the arguments broadcast over the batch; and above the blocked threshold nothing of
size ``L x S`` is kept for backward nor allocated under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
import dropkit.functional.attention as attention_module
import dropkit.kernels.attention as kernels_module
from dropkit import functional as dk_F
from dropkit.functional.attention import _attention_weights_and_values
from dropkit.mc.mode import MCDropoutHandle, NoDropoutFoundWarning, mc_dropout
from dropkit.mc.patching import Frame
from dropkit.mc.plan import op_stream
from dropkit.mc.sampling import mc_predict
from tests.conftest import peak_cpu_bytes
from tests.real_models import tiny_bert, tiny_vit

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


# ---------------------------------------------------------------------------------------------
# Per sample, on the functional's paths: the masks of the materialised weights


class Attention(nn.Module):
    """Calls torch's SDPA with ``dropout_p=RATE`` and the given options."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=RATE, **self.options)


def _materialised_mc(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    seed: int,
    first: int,
    count: int,
    **options: Any,
) -> torch.Tensor:
    """The MC mode's attention before it ran the functional: the whole call's weights materialised,
    cut along dim 0 into ``count`` samples, each dropped with its sample's key (op ordinal 0)."""
    is_causal, scale = options.get("is_causal", False), options.get("scale")
    weights, values = _attention_weights_and_values(
        query, key, value, mask, is_causal, scale, options.get("enable_gqa", False)
    )
    pieces = weights.split(weights.shape[0] // count) if count > 1 else (weights,)
    dropped = [
        dk_F.dropout(piece, RATE, seed=dropkit.make_key(seed, op_stream((0,)), first + index))
        for index, piece in enumerate(pieces)
    ]
    return torch.matmul(torch.cat(dropped), values).to(query.dtype)


def _old_intercept_attention(
    self: MCDropoutHandle,
    frame: Frame,
    original: Callable[..., torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``MCDropoutHandle.intercept_attention`` as it was before it ran the functional per sample
    (the reference of the models' predictions)."""
    rate, site = self._attention_rate(frame.module, float(dropout_p), sdpa=True)
    if rate == 0.0:
        return original(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    weights, values = _attention_weights_and_values(
        query, key, value, attn_mask, is_causal, scale, enable_gqa
    )
    self.intercepted_calls += 1

    def call(call_args: list[Any], sample_key: torch.Tensor | None) -> torch.Tensor:
        return dk_F.dropout(call_args[0], rate, True, False, seed=sample_key)

    weights = self._per_sample(call, [weights], (0,), "scaled_dot_product_attention", site)
    return torch.matmul(weights, values).to(query.dtype)


@pytest.fixture(params=["materialised", "blocked"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The functional's CPU path: materialised (small weights), or blocked from every size on, in
    blocks of 32 query rows."""
    if request.param == "blocked":
        monkeypatch.setattr(attention_module, "BLOCKED_MIN_ELEMENTS", 0)
        monkeypatch.setattr(kernels_module, "_BLOCK_ELEMENTS", 1)
    return str(request.param)


LENGTH, SOURCE, FEATURES = 36, 41, 8  # 36 query rows: two blocks (32 + 4) on the blocked path

# name -> (query shape, key shape, mask shape or None, mask kind, options), float32 but for
# "float64"; the value is the identity over the keys (shaped as the key), so an output is its
# dropped weights.
CASES: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None, str, dict[str, Any]]] = {
    "no_mask": ((4, 2, LENGTH, FEATURES), (4, 2, SOURCE, FEATURES), None, "float", {}),
    "bool_mask_2d": ((4, 2, LENGTH, FEATURES), (4, 2, SOURCE, FEATURES), (LENGTH, SOURCE), "bool", {}),
    "mask_per_batch": (
        (4, 2, LENGTH, FEATURES),
        (4, 2, SOURCE, FEATURES),
        (4, 1, LENGTH, SOURCE),
        "float",
        {},
    ),
    "mask_batch_one": (
        (4, 2, LENGTH, FEATURES),
        (4, 2, SOURCE, FEATURES),
        (1, 2, LENGTH, SOURCE),
        "bool",
        {},
    ),
    "shared_key_value": (
        (4, 2, LENGTH, FEATURES),
        (1, 2, SOURCE, FEATURES),
        (4, 1, 1, SOURCE),
        "bool",
        {},
    ),
    "shared_query": ((1, 2, LENGTH, FEATURES), (4, 2, SOURCE, FEATURES), None, "float", {}),
    "gqa_scale": (
        (4, 4, LENGTH, FEATURES),
        (4, 2, SOURCE, FEATURES),
        None,
        "float",
        {"enable_gqa": True, "scale": 0.3},
    ),
    "causal": ((4, 2, LENGTH, FEATURES), (4, 2, LENGTH, FEATURES), None, "float", {"is_causal": True}),
    "three_d": ((4, LENGTH, FEATURES), (4, SOURCE, FEATURES), (SOURCE,), "float", {}),
    "two_d_rows": ((LENGTH, FEATURES), (SOURCE, FEATURES), (LENGTH, SOURCE), "bool", {}),
    "float64": (
        (4, 2, LENGTH, FEATURES),
        (4, 2, SOURCE, FEATURES),
        (4, 1, LENGTH, SOURCE),
        "float",
        {},
    ),
    "one_key": ((4, 2, LENGTH, FEATURES), (4, 2, 1, FEATURES), None, "float", {}),
    "no_queries": ((4, 2, 0, FEATURES), (4, 2, SOURCE, FEATURES), None, "float", {}),
}


def _case(
    name: str,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], dict[str, Any]]:
    query_shape, key_shape, mask_shape, mask_kind, options = CASES[name]
    dtype = torch.float64 if name == "float64" else torch.float32
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(query_shape, generator=generator, dtype=dtype)
    k = torch.randn(key_shape, generator=generator, dtype=dtype)
    source = key_shape[-2]
    v = torch.eye(source, dtype=dtype).expand(*key_shape[:-2], source, source)
    mask = None
    if mask_shape is not None and mask_kind == "bool":
        mask = torch.rand(mask_shape, generator=generator) > 0.3
        mask[..., 0] = True  # every row attends somewhere
    elif mask_shape is not None:
        mask = torch.randn(mask_shape, generator=generator, dtype=dtype)
    return (q, k, v, mask), options


@pytest.mark.parametrize("name", list(CASES))
def test_mc_attention_per_sample_has_the_masks_of_the_materialised_weights(path: str, name: str) -> None:
    """Two samples a chunk: every broadcast of the batch, GQA, causal, no batch dims (the query rows
    cut, as the weights were), float64, one key and no query rows, on both CPU paths."""
    inputs, options = _case(name)
    model = Attention(**options)
    with mc_dropout(model) as handle, handle.sampling(5, 3, 2), torch.no_grad():
        got = model(*inputs)
    expected = _materialised_mc(*inputs, seed=5, first=3, count=2, **options)
    assert handle.intercepted_calls == 1
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert torch.equal(got != 0, expected != 0)  # the same weights dropped, the same kept
    torch.testing.assert_close(got, expected)
    if expected.numel() > 1:  # the op did drop
        assert not torch.equal(got, _materialised_mc(*inputs, seed=6, first=3, count=2, **options))


def test_mc_attention_per_sample_gradients_are_the_materialised_ones(path: str) -> None:
    (q, k, _, mask), _ = _case("mask_per_batch")
    v = torch.randn(1, 2, SOURCE, 5)  # shared by the batch
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    upstream = torch.randn(4, 2, LENGTH, 5)
    model = Attention()
    with mc_dropout(model) as handle, handle.sampling(2, 0, 2):
        got = model(*leaves, mask)
    expected = _materialised_mc(*reference, mask, seed=2, first=0, count=2)
    torch.testing.assert_close(got, expected)
    got_grads = torch.autograd.grad(got, leaves, upstream)
    expected_grads = torch.autograd.grad(expected, reference, upstream)
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad)


def test_mc_attention_at_rate_zero_runs_torchs_function(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("a zero-rate call reached dropkit's functional")

    monkeypatch.setattr(dropkit.functional, "scaled_dot_product_attention", refuse)
    q, k, v, mask = _inputs(torch.float32, "additive")
    model = MaskedAttention(explicit_rate=False).eval()
    model.attn_drop.p = 0.0
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.warns(NoDropoutFoundWarning), mc_dropout(model) as handle, handle.sampling(0, 0, 2):
        assert torch.equal(model(q, k, v, mask), expected)
    assert handle.intercepted_calls == 0


# ---------------------------------------------------------------------------------------------
# Above the blocked threshold: nothing of size L x S


HEADS, LONG = 1, 2048  # per sample 1 x 2048 x 2048 weights: BLOCKED_MIN_ELEMENTS and more


def _long_inputs(requires_grad: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, HEADS, LONG, 8, generator=generator) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def test_mc_attention_above_the_threshold_keeps_nothing_per_weight_for_backward() -> None:
    assert HEADS * LONG * LONG >= attention_module.BLOCKED_MIN_ELEMENTS
    q, k, v = _long_inputs(requires_grad=True)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    model = Attention()
    with mc_dropout(model) as handle, handle.sampling(0, 0, 2):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(q, k, v, None)
        out.sum().backward()
    assert saved  # per sample: its query, key and value, the key, an empty log-sum-exp
    assert max(saved) <= q[0].numel(), saved
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()


def test_mc_attention_above_the_threshold_allocates_blocks_under_no_grad(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q, k, v = _long_inputs(requires_grad=False)
    model = Attention()

    def run() -> None:
        with mc_dropout(model) as handle, handle.sampling(0, 0, 2), torch.no_grad():
            model(q, k, v, None)

    sample_weights_bytes = HEADS * LONG * LONG * 4
    # Blocks of 32 rows (256 KiB of weights), so that a few blocks live at once stay far below
    # one sample's weights (the automatic 2 MiB blocks would be an eighth of them).
    monkeypatch.setattr(kernels_module, "_BLOCK_ELEMENTS", 32 * LONG)
    blocked = peak_cpu_bytes(run)
    assert blocked <= sample_weights_bytes // 8, blocked
    monkeypatch.setattr(MCDropoutHandle, "intercept_attention", _old_intercept_attention)
    assert peak_cpu_bytes(run) >= 2 * sample_weights_bytes  # the old path: both samples' weights


# ---------------------------------------------------------------------------------------------
# Hugging Face models: the predictions of the materialised path, chunked or not


@pytest.fixture(scope="module")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.mark.parametrize("model_name", ["bert", "vit"])
def test_mc_predict_on_hugging_face_sdpa_models_is_unchanged(
    transformers: Any, monkeypatch: pytest.MonkeyPatch, path: str, model_name: str
) -> None:
    if model_name == "bert":
        model = tiny_bert(transformers, "sdpa").eval()
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1:, 9:] = 0  # padding: a 4-D mask with the batch
        inputs: dict[str, Any] = {"input_ids": torch.randint(0, 99, (3, 12)), "attention_mask": mask}
    else:
        model = tiny_vit(transformers, attention_probs_dropout_prob=0.2, attn_implementation="sdpa").eval()
        inputs = {"pixel_values": torch.randn(3, 3, 16, 16)}

    def predict(chunk_size: int) -> torch.Tensor:
        samples: torch.Tensor = mc_predict(
            model, T=5, chunk_size=chunk_size, seed=4, output="logits", **inputs
        )
        return samples

    chunked, whole = predict(2), predict(5)
    with monkeypatch.context() as patch:
        patch.setattr(MCDropoutHandle, "intercept_attention", _old_intercept_attention)
        old = predict(2)
    torch.testing.assert_close(chunked, old)
    torch.testing.assert_close(whole, old)
    assert not torch.equal(chunked[0], chunked[1])
