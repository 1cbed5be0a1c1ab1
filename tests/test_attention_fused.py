"""Attention dropout without materialised weights: the blocked CPU path and the fused Triton kernel
against the materialised engine path (outputs and gradients to float tolerance, masks exactly).

The mask of weight ``(b, i, j)`` is the engine's mask element ``(b L + i) S + j`` on every path
(:mod:`dropkit.kernels.attention`), so the masks are compared bit for bit: directly (the row-block
op against :func:`dropkit.engine.masks.threshold_keep_mask`), and end to end with an identity
``value`` (the output is then the dropped weights themselves, ``!= 0`` exactly where a weight
that takes part is kept) and an identity upstream gradient (``dV^T`` is the dropped weights of the
backward pass).

The Triton cases run in a child Python with ``TRITON_INTERPRET=1`` (as in
``tests/test_kernels_triton.py``, whose notes explain why this process never imports triton), in
which the CPU is given the fused kernels (``dropkit.kernels.attention._FUSED["cpu"]``), so that
:func:`dropkit.functional.scaled_dot_product_attention` dispatches CPU tensors to the interpreted
kernels exactly as it dispatches CUDA tensors to compiled ones.  A second child compiles the
kernels for sm_90 without a GPU, and on a machine with one, a third runs the cases on the GPU
(the harness: :mod:`tests.triton_workers`).  To debug directly, from the repository root::

    TRITON_INTERPRET=1 python -m tests.test_attention_fused interpret /tmp/report.json [CASE ...]
    python -m tests.test_attention_fused compile /tmp/report.json [CASE ...]
    python -m tests.test_attention_fused cuda /tmp/report.json [CASE ...]
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import dropkit
import dropkit.functional.attention as attention_module
from dropkit.engine.masks import threshold_keep_mask
from dropkit.engine.numerics import drop_threshold, inverted_scale
from dropkit.engine.streams import make_key
from dropkit.functional.attention import scaled_dot_product_attention as sdpa
from dropkit.kernels import KernelFallbackWarning, dispatch
from dropkit.kernels import attention as kernels_attention
from tests import triton_workers as workers
from tests.conftest import peak_cpu_bytes

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
HAS_NUMBA = importlib.util.find_spec("numba") is not None
F64 = torch.float64
P = 0.3
SEED = 11
# Where the cases build their tensors: the CPU here and in the interpreter child, the GPU in the
# CUDA child (which runs the same cases on the compiled kernels).
DEVICE = torch.device("cpu")
# What the worker children run (python -m, from the repository root).
MODULE = "tests.test_attention_fused"

# ---------------------------------------------------------------------------------------------
# Shared helpers (this process and the interpreter child)
# ---------------------------------------------------------------------------------------------


def _randn(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def _case(
    name: str, dtype: torch.dtype = F64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Query, key, value and keyword arguments of a named attention case (tiny sizes, odd lengths)."""
    batch, heads, kv_heads, length, source, dim, value_dim = 2, 3, 3, 13, 11, 8, 5
    kwargs: dict[str, Any] = {}
    if name == "causal_long_query":
        length, source = 17, 9
    if name.startswith("gqa"):
        heads, kv_heads = 4, 2
        kwargs["enable_gqa"] = True
    q = _randn(batch, heads, length, dim, dtype=dtype, seed=1)
    k = _randn(batch, kv_heads, source, dim, dtype=dtype, seed=2)
    v = _randn(batch, kv_heads, source, value_dim, dtype=dtype, seed=3)
    if name in ("causal", "causal_long_query", "gqa_causal"):
        kwargs["is_causal"] = True
    elif name == "scale":
        kwargs["scale"] = 0.3
    elif name == "bool_mask":
        mask = _randn(length, source, seed=4) > -0.3
        mask[:, 0] = True
        kwargs["attn_mask"] = mask
    elif name == "bool_mask_empty_rows":
        mask = _randn(batch, heads, length, source, seed=5) > 0.0
        mask[:, :, 3] = False  # a row that attends nowhere: zeros, finite zero gradients
        kwargs["attn_mask"] = mask
    elif name == "float_mask":
        kwargs["attn_mask"] = _randn(batch, 1, length, source, dtype=dtype, seed=6)
    elif name == "float_mask_minus_inf_row":
        mask = _randn(1, heads, length, source, dtype=dtype, seed=7)
        mask[..., 2, :] = float("-inf")
        mask[..., 5, 1::2] = float("-inf")
        kwargs["attn_mask"] = mask
    elif name == "row_broadcast_mask":
        kwargs["attn_mask"] = _randn(batch, heads, 1, source, seed=8) > -0.5
    elif name == "broadcast_batch":
        k, v = k[:1], v[:1]  # key and value shared by the batch
    elif name == "three_d":
        q, k, v = q[0], k[0], v[0]
    return q, k, v, kwargs


CASE_NAMES = [
    "plain",
    "causal",
    "causal_long_query",
    "scale",
    "bool_mask",
    "bool_mask_empty_rows",
    "float_mask",
    "float_mask_minus_inf_row",
    "row_broadcast_mask",
    "gqa",
    "gqa_causal",
    "broadcast_batch",
    "three_d",
]


def _leaves(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 9) -> tuple[torch.Tensor, ...]:
    upstream = _randn(*out.shape, dtype=out.dtype, seed=seed)
    return torch.autograd.grad(out, inputs, upstream)


def _expected_kept(
    q: torch.Tensor, k: torch.Tensor, kwargs: dict[str, Any], key: torch.Tensor, p: float = P
) -> torch.Tensor:
    """Where the dropped weights are non-zero: the engine's mask of the whole ``(..., L, S)``
    weights, and a weight that takes part (positive probability)."""
    weights, _ = attention_module._attention_weights_and_values(
        q.double(),
        k.double(),
        k.double(),
        kwargs.get("attn_mask"),
        kwargs.get("is_causal", False),
        kwargs.get("scale"),
        kwargs.get("enable_gqa", False),
    )
    keep = threshold_keep_mask(key.cpu(), drop_threshold(p), list(weights.shape))
    return keep & (weights.cpu() > 0)


def _identity_value(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A value whose every key row is a unit vector: attention then returns the dropped weights."""
    source = k.shape[-2]
    return torch.eye(source, dtype=q.dtype, device=q.device).expand(*k.shape[:-2], source, source)


# ---------------------------------------------------------------------------------------------
# The blocked path (this process)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("block_size", [1, 4, 13, 64])
def test_blocked_path_equals_materialised_path(name: str, block_size: int) -> None:
    q, k, v, kwargs = _case(name)
    inputs = _leaves(q, k, v)
    expected = sdpa(*inputs, dropout_p=P, seed=SEED, **kwargs)
    got = sdpa(*inputs, dropout_p=P, seed=SEED, block_size=block_size, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got_grad, expected_grad in zip(_grads(got, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-11, atol=1e-11)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_blocked_path_masks_are_the_engine_masks_exactly(name: str) -> None:
    q, k, _, kwargs = _case(name)
    eye = _identity_value(q, k)
    key = make_key(SEED).to(DEVICE)
    expected = _expected_kept(q, k, kwargs, key)
    for block_size in (1, 3, 5, 100):
        dropped = sdpa(q, k, eye, dropout_p=P, seed=key, block_size=block_size, **kwargs)
        assert torch.equal(dropped != 0, expected), f"block_size={block_size}"


@pytest.mark.parametrize("reference", [False, True], ids=["numba", "reference"])
@pytest.mark.parametrize(
    ("batch", "length", "source", "row0", "rows", "cols"),
    [
        (3, 9, 7, 2, 5, 7),
        (2, 13, 11, 0, 13, 11),
        (4, 33, 29, 5, 7, 12),
        (1, 5, 8200, 1, 2, 8200),  # runs longer than a task (8192 elements)
        (2, 40, 1030, 3, 20, 1030),  # enough elements for the parallel kernel
    ],
)
def test_drop_rows_reads_the_mask_of_the_whole_weights(
    reference: bool, batch: int, length: int, source: int, row0: int, rows: int, cols: int
) -> None:
    if not reference and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    key = make_key(0x5EED)
    weights = _randn(batch, length, source, dtype=torch.float32, seed=1)
    block = weights[:, row0 : row0 + rows, :cols].contiguous()
    for p in (0.0, 1e-6, 0.5, 0.999, 1.0):
        threshold = drop_threshold(p)
        keep = threshold_keep_mask(key, threshold, [batch, length, source])[:, row0 : row0 + rows, :cols]
        scale = torch.tensor(inverted_scale(p), dtype=torch.float32)
        expected = torch.where(keep, block * scale, torch.zeros((), dtype=torch.float32))
        with dropkit.use_reference_engine(reference):
            got = kernels_attention.drop_rows(
                block.clone(), key, threshold, inverted_scale(p), (batch, length, source), row0
            )
            in_place = block.clone()
            kernels_attention.drop_rows(
                in_place, key, threshold, inverted_scale(p), (batch, length, source), row0, inplace=True
            )
        assert torch.equal(got, expected), f"p={p}"
        assert torch.equal(in_place, expected), f"p={p} in place"


def test_blocked_path_bits_do_not_depend_on_the_backend_or_threads() -> None:
    # Blocks of 2 x 2 x 40 x 600 weights: the numba kernel splits them over threads.
    q, k, v = (
        _randn(2, 2, length, 8, dtype=torch.float32, seed=s) for s, length in ((1, 80), (2, 600), (3, 600))
    )
    expected = sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=40)
    with dropkit.use_reference_engine():
        assert torch.equal(sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=40), expected)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            assert torch.equal(sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=40), expected), count
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocked_path_low_precision(dtype: torch.dtype) -> None:
    q, k, v, kwargs = _case("bool_mask_empty_rows", dtype=dtype)
    expected = sdpa(q, k, v, dropout_p=P, seed=SEED, **kwargs)
    got = sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=4, **kwargs)
    assert got.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


GRADCHECK_CASES: dict[str, dict[str, Any]] = {
    "causal": {"is_causal": True},
    "bool_mask_empty_rows": {
        "attn_mask": torch.tensor([[True, False, True, True, False]] * 2 + [[False] * 5] * 2)
    },
    "float_mask": {"attn_mask": _randn(1, 1, 4, 5, seed=6)},
    "gqa_causal": {"is_causal": True, "enable_gqa": True},
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_blocked_path_gradcheck(name: str) -> None:
    kwargs = GRADCHECK_CASES[name]
    kv_heads = 1 if kwargs.get("enable_gqa") else 2
    q = _randn(1, 2, 4, 3, seed=1).requires_grad_()
    k = _randn(1, kv_heads, 5, 3, seed=2).requires_grad_()
    v = _randn(1, kv_heads, 5, 2, seed=3).requires_grad_()

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, dropout_p=0.4, seed=3, block_size=3, **kwargs)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_blocked_path_rate_edges_and_tensor_rates() -> None:
    q, k, v, kwargs = _case("causal")
    inputs = _leaves(q, k, v)
    dropped_all = sdpa(*inputs, dropout_p=1.0, seed=SEED, block_size=4, **kwargs)
    assert torch.equal(dropped_all, torch.zeros_like(dropped_all))
    for grad in _grads(dropped_all, inputs):
        assert torch.equal(grad, torch.zeros_like(grad))
    # A rate below 2**-17 has threshold 0: nothing dropped, scale exactly 1.
    kept_all = sdpa(q, k, v, dropout_p=1e-6, seed=SEED, block_size=4, **kwargs)
    torch.testing.assert_close(kept_all, sdpa(q, k, v, **kwargs), rtol=1e-12, atol=1e-12)
    rate = torch.tensor(P, dtype=F64)
    assert torch.equal(
        sdpa(q, k, v, dropout_p=rate, seed=SEED, block_size=4, **kwargs),
        sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=4, **kwargs),
    )
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=torch.tensor(1.5), seed=SEED, block_size=4)


def _saved_numels(fn: Callable[[], torch.Tensor]) -> list[int]:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


def test_blocked_path_is_automatic_above_the_threshold_and_keeps_nothing_per_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q, k, v, kwargs = _case("causal")
    weights = 2 * 3 * 13 * 11
    inputs = _leaves(q, k, v)
    materialised = _saved_numels(lambda: sdpa(*inputs, dropout_p=P, seed=SEED, **kwargs))
    assert max(materialised) >= weights  # below the threshold: the weights are kept
    monkeypatch.setattr(attention_module, "BLOCKED_MIN_ELEMENTS", weights)
    blocked = _saved_numels(lambda: sdpa(*inputs, dropout_p=P, seed=SEED, **kwargs))
    # The inputs, the key and an empty log-sum-exp: nothing per weight.
    assert sorted(blocked) == sorted([q.numel(), k.numel(), v.numel(), 3, 0])
    monkeypatch.setattr(attention_module, "BLOCKED_MIN_ELEMENTS", weights + 1)
    assert max(_saved_numels(lambda: sdpa(*inputs, dropout_p=P, seed=SEED, **kwargs))) >= weights


def test_blocked_path_peak_memory_is_per_block() -> None:
    heads, length, dim = 2, 512, 16
    q, k, v = (_randn(1, heads, length, dim, dtype=torch.float32, seed=s).requires_grad_() for s in (1, 2, 3))
    upstream = _randn(1, heads, length, dim, dtype=torch.float32, seed=4)

    def step(block_size: int | None) -> Callable[[], None]:
        def run() -> None:
            sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=block_size).backward(upstream)

        return run

    weights_bytes = heads * length * length * 4
    materialised = peak_cpu_bytes(step(None))
    blocked = peak_cpu_bytes(step(32))
    assert materialised >= 2 * weights_bytes  # weights and dropped weights, kept for backward
    # Blocks of 32 rows: a few (32 x 512) blocks per head and the O(L) gradients.
    assert blocked <= weights_bytes // 2, (blocked, materialised)
    assert blocked <= peak_cpu_bytes(step(128))


def test_paths_that_cannot_run_blocked_fall_back_to_materialised() -> None:
    q, k, v, kwargs = _case("float_mask")
    # A float mask that requires grad: its gradient comes from the materialised path.
    mask = kwargs["attn_mask"].clone().requires_grad_()
    expected_mask = kwargs["attn_mask"].clone().requires_grad_()
    got = sdpa(q, k, v, mask, P, seed=SEED, block_size=2)
    expected = sdpa(q, k, v, expected_mask, P, seed=SEED)
    assert torch.equal(got, expected)
    (grad,) = _grads(got, (mask,))
    (expected_grad,) = _grads(expected, (expected_mask,))
    assert torch.equal(grad, expected_grad)
    # torch.func transforms (no forward-AD or vmap rule on the blocked path).
    tangent = _randn(*q.shape, seed=12)
    out, jvp = torch.func.jvp(
        lambda t: sdpa(t, k, v, dropout_p=P, seed=SEED, block_size=2), (q,), (tangent,)
    )[:2]
    torch.testing.assert_close(
        out, sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=2), rtol=1e-12, atol=1e-12
    )
    assert torch.isfinite(jvp).all()


@pytest.mark.slow
def test_compiled_calls_run_the_custom_op_with_the_same_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile (fullgraph) the blocked path runs as dropkit::engine_attention: the eager
    masks, and nothing per weight kept (the op's backward recomputes)."""
    calls = []
    original = attention_module.attention_forward

    def counted(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(attention_module, "attention_forward", counted)
    q, k, _, kwargs = _case("gqa_causal", dtype=torch.float32)
    eye = _identity_value(q, k)
    key = make_key(SEED)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, dropout_p=P, seed=key, block_size=4, **kwargs)

    compiled = torch.compile(attend, fullgraph=True, dynamic=False)
    dropped = compiled(q, k, eye)
    assert calls == [4]
    assert torch.equal(dropped != 0, _expected_kept(q, k, kwargs, key))
    torch.testing.assert_close(dropped, attend(q, k, eye), rtol=1e-6, atol=1e-6)
    inputs = _leaves(*_case("gqa_causal", dtype=torch.float32)[:3])
    got = compiled(*inputs)
    expected = attend(*inputs)
    for got_grad, expected_grad in zip(_grads(got, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["causal", "bool_mask_empty_rows", "gqa"])
def test_custom_ops_pass_opcheck(name: str) -> None:
    q, k, v, kwargs = _case(name, dtype=torch.float32)
    q = q.transpose(-2, -1).contiguous().transpose(-2, -1).requires_grad_()  # not contiguous
    k, v = k.requires_grad_(), v.requires_grad_()
    args = (q, k, v, kwargs.get("attn_mask"), make_key(SEED), torch.tensor(P, dtype=F64))
    options = (kwargs.get("is_causal", False), None, kwargs.get("enable_gqa", False), False, 4)
    torch.library.opcheck(torch.ops.dropkit.engine_attention.default, (*args, *options))
    out, lse = torch.ops.dropkit.engine_attention(*args, *options)
    backward_args = (
        torch.randn_like(out),
        q.detach(),
        k.detach(),
        v.detach(),
        *args[3:],
        out.detach(),
        lse.detach(),
    )
    torch.library.opcheck(torch.ops.dropkit.engine_attention_backward.default, (*backward_args, *options))


def test_block_size_is_checked() -> None:
    q, k, v, _ = _case("plain")
    with pytest.raises(ValueError, match=r"block_size must be >= 1, got 0"):
        sdpa(q, k, v, dropout_p=P, block_size=0)
    with pytest.raises(TypeError, match=r"block_size must be an int, got float \(2.0\)"):
        sdpa(q, k, v, dropout_p=P, block_size=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="block_size must be an int, got bool"):
        dropkit.nn.ScaledDotProductAttention(0.1, block_size=True)


def test_module_takes_block_size() -> None:
    q, k, v, kwargs = _case("gqa_causal")
    module = dropkit.nn.ScaledDotProductAttention(P, block_size=3)
    assert repr(module) == "ScaledDotProductAttention(p=0.3, block_size=3)"
    materialised = dropkit.nn.ScaledDotProductAttention(P)
    torch.testing.assert_close(
        module(q, k, v, seed=SEED, **kwargs),
        materialised(q, k, v, seed=SEED, **kwargs),
        rtol=1e-12,
        atol=1e-12,
    )


class _BrokenKernels:
    name = "triton"
    calls = 0

    @staticmethod
    def supports(*args: Any) -> bool:
        return True

    @classmethod
    def forward(cls, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cls.calls += 1
        raise RuntimeError("simulated kernel failure")


def test_a_failing_fused_kernel_is_switched_off_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, kwargs = _case("causal", dtype=torch.float32)
    expected = sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=3, **kwargs)
    backend = dispatch._Backend("triton", "dropkit.kernels.triton_attention", None)
    backend.module = _BrokenKernels  # type: ignore[assignment]
    monkeypatch.setitem(kernels_attention._FUSED, "cpu", backend)
    with pytest.warns(KernelFallbackWarning, match="simulated kernel failure"):
        got = sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=3, **kwargs)
    assert torch.equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=3, **kwargs), expected)
    assert _BrokenKernels.calls == 1


def test_fused_kernels_take_half_and_float_inputs_up_to_head_dim_128() -> None:
    q = torch.zeros(2, 3, 5, 128)
    assert kernels_attention.fused_supports(q, q, q, None)
    assert kernels_attention.fused_supports(q.half(), q.half(), q.half(), torch.ones(5, 5, dtype=torch.bool))
    assert kernels_attention.fused_supports(q.bfloat16(), q.bfloat16(), q.bfloat16()[..., :7], q[0, 0, :, :5])
    assert not kernels_attention.fused_supports(q.double(), q.double(), q.double(), None)
    wide = torch.zeros(2, 3, 5, 129)
    assert not kernels_attention.fused_supports(wide, wide, q, None)
    assert not kernels_attention.fused_supports(q, q, wide, None)
    assert not kernels_attention.fused_supports(q[..., :0, :], q, q, None)
    # Only devices with fused kernels (CUDA here) and loadable kernels take them.
    assert not kernels_attention.fused_applies(q, q, q, None)
    assert not kernels_attention.fused_applies(q, q, q, None, traced=True)


def test_a_traced_call_whose_kernel_fails_answers_with_the_blocked_path_and_its_lse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q, k, v, kwargs = _case("bool_mask_empty_rows", dtype=torch.float32)
    inputs = _leaves(q, k, v)
    expected = sdpa(*inputs, dropout_p=P, seed=SEED, block_size=4, **kwargs)
    backend = dispatch._Backend("triton", "dropkit.kernels.triton_attention", None)
    backend.module = _BrokenKernels  # type: ignore[assignment]
    monkeypatch.setitem(kernels_attention._FUSED, "cpu", backend)
    rate = torch.tensor(P, dtype=F64)
    with pytest.warns(KernelFallbackWarning, match="simulated kernel failure"):
        out, lse = torch.ops.dropkit.engine_attention(
            *inputs, kwargs["attn_mask"], make_key(SEED), rate, False, None, False, True, 4
        )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    scores = kernels_attention.masked_scores(q, k, kwargs["attn_mask"], False, 8**-0.5)
    expected_lse = torch.logsumexp(scores, dim=-1)
    expected_lse = torch.where(expected_lse == float("-inf"), float("inf"), expected_lse)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)
    # The backward finds the kernels switched off: the blocked path's gradients (same masks).
    for got, want in zip(_grads(out, inputs), _grads(expected, inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_failing_row_kernel_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        @staticmethod
        def drop_rows(*args: Any) -> torch.Tensor:
            raise RuntimeError("simulated numba failure")

    backend = dispatch._Backend("numba", "dropkit.kernels.attention_cpu", None)
    backend.module = Broken  # type: ignore[assignment]
    monkeypatch.setitem(kernels_attention._ROW_KERNELS, "cpu", backend)
    q, k, v, kwargs = _case("plain")
    with dropkit.use_reference_engine():
        expected = sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=3, **kwargs)
    with pytest.warns(KernelFallbackWarning, match="simulated numba failure"):
        assert torch.equal(sdpa(q, k, v, dropout_p=P, seed=SEED, block_size=3, **kwargs), expected)


# ---------------------------------------------------------------------------------------------
# The Triton kernels (run in the child, under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------

CASES = workers.CaseRegistry()
case = CASES.case


def _triton_attention() -> Any:
    from dropkit.kernels import triton_attention

    return triton_attention


class _Spy:
    """Counts the forward calls that reach the fused kernels."""

    def __init__(self) -> None:
        self.module = _triton_attention()
        self.calls = 0
        self.original = self.module.forward

    def __enter__(self) -> _Spy:
        def counted(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.calls += 1
            result: tuple[torch.Tensor, torch.Tensor] = self.original(*args)
            return result

        self.module.forward = counted
        return self

    def __exit__(self, *exc: object) -> None:
        self.module.forward = self.original


TOLERANCES = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _check_kernel(
    name: str,
    dtype: torch.dtype,
    tiles: tuple[int, int] = (16, 16),
    p: float = P,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]] | None = None,
) -> None:
    """The functional on the fused kernel (CPU tensors, interpreted) against the materialised
    engine path: outputs and gradients to tolerance, and the kernel actually ran."""
    q, k, v, kwargs = _case(name, dtype) if inputs is None else inputs
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].to(dtype)
    leaves = _leaves(q, k, v)
    with dropkit.use_reference_engine():  # no fused kernels: the materialised path
        expected = sdpa(*leaves, dropout_p=p, seed=SEED, **kwargs)
        expected_grads = _grads(expected, leaves)
    with _Spy() as spy, _triton_attention().block_sizes(*tiles):
        got = sdpa(*leaves, dropout_p=p, seed=SEED, **kwargs)
        got_grads = _grads(got, leaves)
    assert spy.calls == 1, "the functional did not run the fused kernel"
    assert got.dtype == dtype
    assert got.shape == expected.shape
    tolerance = TOLERANCES[dtype]
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance * scale)
    for label, a, b in zip("qkv", got_grads, expected_grads, strict=True):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(
            a.float(),
            b.float(),
            rtol=tolerance,
            atol=tolerance * scale,
            msg=functools.partial("d{}: {}".format, label),
        )


def _check_kernel_masks(
    dtype: torch.dtype, source: int, kwargs: dict[str, Any], tiles: tuple[int, int] = (16, 16), heads: int = 2
) -> None:
    """Forward and backward masks of the kernel are the engine's, exactly (identity value and
    identity upstream gradient: the output and ``dV^T`` are the dropped weights)."""
    length = source
    q = _randn(2, heads, length, 16, dtype=dtype, seed=1)
    k = _randn(2, heads, source, 16, dtype=dtype, seed=2)
    v = _identity_value(q, k).clone().requires_grad_()
    key = make_key(SEED).to(DEVICE)
    expected = _expected_kept(q, k, kwargs, key)
    with _Spy() as spy, _triton_attention().block_sizes(*tiles):
        dropped = sdpa(q, k, v, dropout_p=P, seed=key, **kwargs)
        (grad_v,) = torch.autograd.grad(dropped, v, _identity_value(q, q))
    assert spy.calls == 1
    assert torch.equal((dropped != 0).cpu(), expected), "forward mask"
    assert torch.equal((grad_v.transpose(-2, -1) != 0).cpu(), expected), "backward mask"


def _register_kernel_cases() -> None:
    for name in CASE_NAMES:
        case(f"kernel-{name}-float32")(functools.partial(_check_kernel, name, torch.float32))
    for dtype in (torch.float16, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        for name in ("causal", "bool_mask_empty_rows", "float_mask", "gqa"):
            case(f"kernel-{name}-{label}")(functools.partial(_check_kernel, name, dtype))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        # 24 keys: tile rows of whole Philox counters; 21: every weight its own counter.
        for source in (24, 21):
            case(f"masks-{source}-keys-{label}")(functools.partial(_check_kernel_masks, dtype, source, {}))
    case("masks-causal")(lambda: _check_kernel_masks(torch.float32, 40, {"is_causal": True}))
    case("masks-bool-mask")(
        lambda: _check_kernel_masks(torch.float32, 24, {"attn_mask": _randn(2, 1, 24, 24, seed=3) > 0.0})
    )
    case("masks-one-tile")(
        lambda: _check_kernel_masks(torch.float32, 40, {"is_causal": True}, tiles=(64, 64))
    )


_register_kernel_cases()


@case("kernels-active")
def _kernels_active() -> None:
    import triton

    kernel_class = _triton_attention()._forward_kernel.__class__.__name__
    if DEVICE.type == "cuda":  # compiled kernels on the GPU
        assert not triton.knobs.runtime.interpret, "the CUDA worker must run without TRITON_INTERPRET"
        assert kernel_class == "JITFunction", kernel_class
    else:
        assert triton.knobs.runtime.interpret, "the worker must run with TRITON_INTERPRET=1"
        assert kernel_class == "InterpretedFunction", kernel_class


@case("kernel-many-tiles-and-default-tiles")
def _many_tiles() -> None:
    q = _randn(1, 2, 45, 16, dtype=torch.float16, seed=1)
    k = _randn(1, 2, 50, 16, dtype=torch.float16, seed=2)
    v = _randn(1, 2, 50, 24, dtype=torch.float16, seed=3)
    for tiles in ((16, 16), (32, 16), (16, 32)):
        _check_kernel("", torch.float16, tiles=tiles, inputs=(q, k, v, {"is_causal": True}))
    # The default tiles of every kernel (one tile here, padded).
    module = _triton_attention()
    for kernel in ("forward", "backward_kv", "backward_q"):
        assert module._TILES[(kernel, True, True)][0] >= 16
    _check_kernel("", torch.float16, tiles=module._TILES[("forward", True, True)][:2], inputs=(q, k, v, {}))


@case("kernel-head-dim-128")
def _head_dim_128() -> None:
    q = _randn(1, 2, 20, 128, dtype=torch.bfloat16, seed=1)
    k = _randn(1, 1, 24, 128, dtype=torch.bfloat16, seed=2)
    v = _randn(1, 1, 24, 128, dtype=torch.bfloat16, seed=3)
    _check_kernel("", torch.bfloat16, inputs=(q, k, v, {"is_causal": True, "enable_gqa": True}))
    q, k, v = (t.float() for t in (q, k, v))
    _check_kernel("", torch.float32, inputs=(q, k, v, {"attn_mask": _randn(20, 24, seed=4) > -0.5}))


@case("kernel-output-layout")
def _output_layout() -> None:
    # (batch, heads, L, Dv) outputs are laid out as torch's flash kernel lays them out, so that
    # merging the heads for the output projection is a view (no copy beside the saved output).
    q, k, v, kwargs = _case("causal", torch.float16)
    with _Spy() as spy:
        out = sdpa(q, k, v, dropout_p=P, seed=SEED, **kwargs)
    assert spy.calls == 1
    merged = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
    assert merged.data_ptr() == out.data_ptr(), "merging the heads copied"
    with dropkit.use_reference_engine():
        expected = sdpa(q, k, v, dropout_p=P, seed=SEED, **kwargs)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)


@case("kernel-rate-edges")
def _rate_edges() -> None:
    for p in (1.0, 1e-6, 0.999):
        _check_kernel("causal", torch.float32, p=p)


@case("kernel-module-and-tensor-rate")
def _module() -> None:
    q, k, v, kwargs = _case("gqa_causal", torch.float32)
    module = dropkit.nn.ScaledDotProductAttention(P)
    with dropkit.use_reference_engine():
        expected = module(q, k, v, seed=SEED, **kwargs)
    with _Spy() as spy, _triton_attention().block_sizes(16, 16):
        got = module(q, k, v, seed=SEED, **kwargs)  # the module passes its rate as a tensor
    assert spy.calls == 1
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


@case("kernel-unsupported-falls-back")
def _unsupported() -> None:
    q = _randn(1, 1, 5, 130, dtype=torch.float32, seed=1)
    with _Spy() as spy:
        sdpa(q, q, q, dropout_p=P, seed=SEED)  # head dim 130
        sdpa(q[..., :8].double(), q[..., :8].double(), q[..., :8].double(), dropout_p=P, seed=SEED)
    assert spy.calls == 0


@case("kernel-lse-is-the-blocked-fallback-lse")
def _lse() -> None:
    # A traced call that finds the kernels switched off at run time answers with the blocked path
    # and its log-sum-exp: it must be the kernel's (natural log, +inf for a row attending nowhere).
    for name in ("bool_mask_empty_rows", "float_mask_minus_inf_row", "gqa_causal"):
        q, k, v, kwargs = _case(name, torch.float32)
        args = (
            kwargs.get("attn_mask"), kwargs.get("is_causal", False), None, kwargs.get("enable_gqa", False),
            make_key(SEED).to(DEVICE), drop_threshold(P), inverted_scale(P),
        )  # fmt: skip
        _, lse = _triton_attention().forward(q, k, v, *args)
        with dropkit.use_reference_engine():  # the kernels off: the blocked path
            _, fallback = kernels_attention.forward(q, k, v, *args, True, 4)
        assert torch.equal(lse == float("inf"), fallback == float("inf")), name
        torch.testing.assert_close(lse, fallback, rtol=1e-6, atol=1e-6)


@case("kernel-compiled")
def _compiled() -> None:
    # torch.compile traces the call as dropkit::engine_attention, which runs the kernels.
    q, k, v, kwargs = _case("gqa_causal", torch.float32)
    leaves = _leaves(q, k, v)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q, k, v, dropout_p=P, seed=SEED, **kwargs)

    with dropkit.use_reference_engine():
        expected = attend(*leaves)
        expected_grads = _grads(expected, leaves)
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    with _Spy() as spy, _triton_attention().block_sizes(16, 16):
        got = compiled(*leaves)
        got_grads = _grads(got, leaves)
    assert spy.calls == 1
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


CUDA_ONLY = {"kernel-compiled-inductor": "Inductor's code for the GPU: the CUDA worker only"}


@case("kernel-compiled-inductor")
def _compiled_inductor() -> None:
    # On the GPU, Inductor compiles the model around dropkit::engine_attention: the fused kernels
    # run inside the compiled graph, forward and backward, with the eager masks.
    q, k, v, kwargs = _case("causal", torch.float16)
    leaves = _leaves(q, k, v)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa(q * 2.0, k, v, dropout_p=P, seed=SEED, **kwargs) * 3.0

    with _triton_attention().block_sizes(16, 16):
        expected = attend(*leaves)
        expected_grads = _grads(expected, leaves)
        compiled = torch.compile(attend, fullgraph=True, dynamic=False)
        with _Spy() as spy:
            got = compiled(*leaves)
            got_grads = _grads(got, leaves)
    assert spy.calls == 1
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Compiled for sm_90 without a GPU (the compile child)
# ---------------------------------------------------------------------------------------------

COMPILE_CASES = [
    ("forward", "fp16", 64, 0, True),
    ("forward", "bf16", 128, 1, False),
    ("forward", "fp32", 64, 2, True),
    ("backward_kv", "fp16", 64, 0, True),
    ("backward_kv", "bf16", 128, 2, False),
    ("backward_q", "fp16", 64, 1, True),
    ("backward_q", "bf16", 128, 0, False),
]


def _compile_case_id(kernel: str, dtype: str, head_dim: int, mask_kind: int, aligned: bool) -> str:
    return f"compile-{kernel}-{dtype}-d{head_dim}-mask{mask_kind}-{'aligned' if aligned else 'unaligned'}"


def _compile_for_sm90(kernel: str, dtype: str, head_dim: int, mask_kind: int, aligned: bool) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _triton_attention()
    fn = {
        "forward": module._forward_kernel,
        "backward_kv": module._backward_kv_kernel,
        "backward_q": module._backward_q_kernel,
    }[kernel]
    block_m, block_n, warps, stages = module._TILES[(kernel, dtype != "fp32", head_dim <= 64)]
    constants = {
        "MASK_KIND": mask_kind,
        "CAUSAL": mask_kind == 0,
        "DROPOUT": True,
        "ALIGNED": aligned,
        "PRECISION": "ieee" if dtype == "fp32" else "tf32",
        "WIDEN": False,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": head_dim,
        "BLOCK_DV": head_dim,
    }
    signature: dict[str, str] = {}
    for arg in fn.arg_names:
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in ("Q", "K", "V", "Out", "DO"):
            signature[arg] = f"*{dtype}"
        elif arg == "Mask":
            signature[arg] = "*u8" if mask_kind == 1 else f"*{dtype}"
        elif arg in ("LSE", "Delta", "DK", "DV", "DQ"):
            signature[arg] = "*fp32"
        elif arg == "key_ptr":
            signature[arg] = "*i64"
        elif arg in ("factor", "keep_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
    options = {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True}
    compiled = triton.compile(
        ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32), options=options
    )
    assert compiled.asm["cubin"], "no cubin"


# ---------------------------------------------------------------------------------------------
# The pytest side of the children
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, workers.Report]:
    root = tmp_path_factory.mktemp("attention_workers")
    return workers.run_workers(MODULE, ("interpret", "compile"), root, timeout=1500)


@pytest.fixture(scope="module")
def cuda_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, workers.Report]:
    """The cases run by a child on the GPU (the compiled kernels, the tensors on CUDA)."""
    root = tmp_path_factory.mktemp("attention_cuda_worker")
    return workers.run_workers(MODULE, ("cuda",), root, timeout=1500)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel(name: str, worker_reports: dict[str, workers.Report]) -> None:
    workers.report_case(worker_reports, "interpret", name)


@pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs CUDA and triton")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_kernel(name: str, cuda_report: dict[str, workers.Report]) -> None:
    """The same cases on a GPU: the compiled kernels against the materialised engine path there,
    masks against the CPU engine's bits."""
    workers.report_case(cuda_report, "cuda", name)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("spec", COMPILE_CASES, ids=[_compile_case_id(*c) for c in COMPILE_CASES])
def test_kernel_compiles_for_sm90(
    spec: tuple[str, str, int, int, bool], worker_reports: dict[str, workers.Report]
) -> None:
    workers.report_case(worker_reports, "compile", _compile_case_id(*spec))


# ---------------------------------------------------------------------------------------------
# The child side
# ---------------------------------------------------------------------------------------------


def _give_the_cpu_the_fused_kernels() -> None:
    """In the interpreter child: CPU tensors reach the (interpreted) fused kernels through the
    functional's dispatch, as CUDA tensors reach the compiled ones."""
    kernels_attention._FUSED["cpu"] = kernels_attention._FUSED["cuda"]


def _run_on_the_gpu() -> str | None:
    """In the CUDA child: the cases build their tensors on the GPU (the compiled kernels)."""
    global DEVICE
    if not torch.cuda.is_available():
        return "cuda mode needs a GPU"
    DEVICE = torch.device("cuda")
    return None


if __name__ == "__main__":
    compile_cases = {_compile_case_id(*c): functools.partial(_compile_for_sm90, *c) for c in COMPILE_CASES}
    modes = {
        "interpret": workers.Mode(CASES.cases, setup=_give_the_cpu_the_fused_kernels, unavailable=CUDA_ONLY),
        "compile": workers.Mode(compile_cases, skip_all=workers.offline_compile_unavailable),
        "cuda": workers.Mode(CASES.cases, setup=_run_on_the_gpu),
    }
    sys.exit(workers.main(sys.argv[1:], modes))
