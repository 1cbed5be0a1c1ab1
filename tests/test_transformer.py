"""The reference transformer encoder block and the embedding layer: placements, eval equivalence
with torch.nn.TransformerEncoderLayer, train vs eval, torch.compile, argument checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import dropkit
from dropkit.nn.attention import ResidualDropout, ScaledDotProductAttention
from dropkit.nn.transformer import TokenAndPositionEmbedding, TransformerEncoderBlock, sinusoidal_positions
from tests.conftest import binomial_tolerance

D_MODEL, N_HEADS, D_FF = 16, 4, 24


def paired(norm_first: bool, activation: str = "relu", bias: bool = True) -> tuple[nn.Module, nn.Module]:
    """A dropkit block and a torch layer with the same weights (dropkit's copied from torch's)."""
    reference = nn.TransformerEncoderLayer(
        D_MODEL,
        N_HEADS,
        D_FF,
        dropout=0.3,
        activation=activation,
        batch_first=True,
        norm_first=norm_first,
        bias=bias,
        dtype=torch.float64,
    )
    block = TransformerEncoderBlock(
        D_MODEL, N_HEADS, D_FF, dropout=0.3, activation=activation, norm_first=norm_first, bias=bias
    ).double()
    state = {
        "in_proj.weight": reference.self_attn.in_proj_weight,
        "out_proj.weight": reference.self_attn.out_proj.weight,
        "linear1.weight": reference.linear1.weight,
        "linear2.weight": reference.linear2.weight,
        "norm1.weight": reference.norm1.weight,
        "norm2.weight": reference.norm2.weight,
    }
    if bias:
        state |= {
            "in_proj.bias": reference.self_attn.in_proj_bias,
            "out_proj.bias": reference.self_attn.out_proj.bias,
            "linear1.bias": reference.linear1.bias,
            "linear2.bias": reference.linear2.bias,
            "norm1.bias": reference.norm1.bias,
            "norm2.bias": reference.norm2.bias,
        }
    block.load_state_dict({name: value.detach().clone() for name, value in state.items()})
    return block, reference


def padding_mask() -> torch.Tensor:
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 5:] = True
    mask[2, 3:] = True
    return mask


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize(("activation", "bias"), [("relu", True), ("gelu", False)])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "causal"])
def test_eval_equals_torch_encoder_layer(norm_first: bool, activation: str, bias: bool, masks: str) -> None:
    block, reference = paired(norm_first, activation, bias)
    block.eval()
    reference.eval()
    x = torch.randn(3, 7, D_MODEL, dtype=torch.float64)
    kwargs: dict[str, Any] = {}
    torch_kwargs: dict[str, Any] = {}
    if masks == "bool":
        attn_mask = torch.rand(7, 7) > 0.7
        attn_mask.fill_diagonal_(False)  # every query may attend to itself
        kwargs = {"attn_mask": attn_mask, "key_padding_mask": padding_mask()}
        torch_kwargs = {"src_mask": attn_mask, "src_key_padding_mask": padding_mask()}
    elif masks == "float":
        # A float attn_mask with a bool padding mask (merged here as -inf); torch wants both float.
        attn_mask = torch.randn(3 * N_HEADS, 7, 7, dtype=torch.float64)
        float_padding = torch.zeros(3, 7, dtype=torch.float64).masked_fill(padding_mask(), -math.inf)
        kwargs = {"attn_mask": attn_mask, "key_padding_mask": padding_mask()}
        torch_kwargs = {"src_mask": attn_mask, "src_key_padding_mask": float_padding}
    elif masks == "causal":
        kwargs = {"is_causal": True}
        causal = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
        torch_kwargs = {"src_mask": causal, "is_causal": True}
    expected = reference(x, **torch_kwargs)
    torch.testing.assert_close(block(x, **kwargs), expected, rtol=1e-10, atol=1e-10)
    # Training with every rate 0 is the same function.
    zero = TransformerEncoderBlock(
        D_MODEL, N_HEADS, D_FF, dropout=0.0, activation=activation, norm_first=norm_first, bias=bias
    ).double()
    zero.load_state_dict(block.state_dict())
    torch.testing.assert_close(zero(x, **kwargs), expected, rtol=1e-10, atol=1e-10)


def test_causal_flag_combines_with_padding_mask() -> None:
    block, reference = paired(True)
    block.eval()
    reference.eval()
    x = torch.randn(3, 7, D_MODEL, dtype=torch.float64)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    expected = reference(x, src_mask=causal, src_key_padding_mask=padding_mask())
    out = block(x, key_padding_mask=padding_mask(), is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_batch_first_false_is_the_transposed_block() -> None:
    block = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF).eval()
    seq_first = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF, batch_first=False).eval()
    seq_first.load_state_dict(block.state_dict())
    x = torch.randn(3, 7, D_MODEL)
    torch.testing.assert_close(seq_first(x.transpose(0, 1)).transpose(0, 1), block(x))


def test_submodules_and_defaults() -> None:
    block = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF, residual_dropout=(0.2, 0.3), ffn_dropout=0.0)
    assert isinstance(block.attention, ScaledDotProductAttention)
    assert block.attention.p == 0.1  # from dropout
    assert isinstance(block.attention_residual, ResidualDropout)
    assert (block.attention_residual.p, block.ffn_residual.p) == (0.2, 0.3)
    assert isinstance(block.ffn_dropout, nn.Identity)  # rate 0: no dropout module at all
    assert isinstance(TransformerEncoderBlock(8, 2, 8).ffn_dropout, dropkit.nn.Dropout)
    assert block.attention.use_engine
    assert "norm_first=True" in repr(block)


# ---------------------------------------------------------------------------------------------
# Placements: with one rate nonzero, exactly the documented intermediates change.

# Submodules in the order the block runs them.
PRE_LN_ORDER = ["norm1", "in_proj", "attention", "attention_residual", "norm2", "linear1", "ffn_dropout"]
PRE_LN_ORDER += ["ffn_residual"]
POST_LN_ORDER = ["in_proj", "attention", "attention_residual", "norm1", "linear1", "ffn_dropout"]
POST_LN_ORDER += ["ffn_residual", "norm2"]
PLACEMENTS = {
    "attention_dropout": "attention",
    "attention_residual": "attention_residual",
    "ffn_dropout": "ffn_dropout",
    "ffn_residual": "ffn_residual",
}


def rates_with_one(placement: str, p: float) -> dict[str, Any]:
    rates: dict[str, Any] = {"dropout": 0.0}
    if placement == "attention_dropout":
        rates["attention_dropout"] = p
    elif placement == "attention_residual":
        rates["residual_dropout"] = (p, 0.0)
    elif placement == "ffn_residual":
        rates["residual_dropout"] = (0.0, p)
    else:
        rates["ffn_dropout"] = p
    return rates


def record(block: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def hook(name: str) -> Any:
        def save(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            seen[name] = (args, kwargs, output.detach().clone())

        return save

    handles = [
        getattr(block, name).register_forward_hook(hook(name), with_kwargs=True) for name in PRE_LN_ORDER
    ]
    seen["output"] = ((), {}, block(x).detach())
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_each_placement_changes_only_its_own_intermediate(placement: str, norm_first: bool) -> None:
    p = 0.5
    block = TransformerEncoderBlock(
        D_MODEL, N_HEADS, D_FF, norm_first=norm_first, **rates_with_one(placement, p)
    )
    x = torch.randn(4, 9, D_MODEL)
    train = record(block, x)
    evaluated = record(block.eval(), x)
    where = PLACEMENTS[placement]
    order = PRE_LN_ORDER if norm_first else POST_LN_ORDER
    for name in order[: order.index(where)]:
        assert torch.equal(train[name][2], evaluated[name][2]), f"{name} changed before {where}"
    assert not torch.equal(train[where][2], evaluated[where][2])
    assert not torch.equal(train["output"][2], evaluated["output"][2])

    args, kwargs, output = train[where]
    if where == "ffn_dropout":  # inverted dropout of the activation: 0 or relu / q
        hidden = args[0]
        kept = output != 0
        torch.testing.assert_close(output[kept], hidden[kept] / (1 - p))
        assert ((hidden > 0) & ~kept).any()  # some positive activations were dropped
    elif where in ("attention_residual", "ffn_residual"):  # residual + (0 or (out + bias) / q)
        branch, residual = args
        bias = kwargs["bias"]
        expected_kept = residual + (branch + bias) / (1 - p)
        dropped = torch.isclose(output, residual, rtol=0, atol=1e-6)
        torch.testing.assert_close(output[~dropped], expected_kept[~dropped])
        rate = dropped.double().mean().item()
        assert abs(rate - p) < binomial_tolerance(p, output.numel())
    else:  # attention: the context differs, the q/k/v projections did not
        assert args[0].shape == (4, N_HEADS, 9, D_MODEL // N_HEADS)


def test_attention_dropout_drops_attention_weights() -> None:
    """The attention placement is on the weights: with v = I inside the module it is exactly
    dkdropout(softmax(...)) (checked at the module level, the block passes q, k, v through)."""
    block = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF, **rates_with_one("attention_dropout", 0.5))
    x = torch.randn(2, 5, D_MODEL)
    seen = record(block, x)
    (q, k, v), _, output = seen["attention"]
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    key = dropkit.make_key(1234, block.attention.rng_stream, 0)
    expected = dropkit.functional.dropout(weights, 0.5, seed=key) @ v
    torch.testing.assert_close(output, expected)


# ---------------------------------------------------------------------------------------------
# Train vs eval, reproducibility, gradients


def test_training_gradcheck_float64_with_every_dropout() -> None:
    block = TransformerEncoderBlock(
        4, 2, 6, attention_dropout=0.3, residual_dropout=(0.2, 0.4), ffn_dropout=0.3, norm_first=False
    ).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    random_layers = [m for m in block.modules() if isinstance(m, dropkit.nn._base._RandomLayer)]
    assert len(random_layers) == 4

    def fn(x: torch.Tensor) -> torch.Tensor:
        for layer in random_layers:  # the same masks in every evaluation
            layer.reset_rng_step()
        return block(x)

    assert not torch.equal(fn(x), block.eval()(x))
    block.train()
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.slow
def test_compiled_block_traces_in_one_frame_and_matches_eager() -> None:
    torch._dynamo.reset()
    dropkit.manual_seed(0)
    block = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF, dropout=0.2, residual_dropout=(0.3, 0.1))
    x = torch.randn(2, 6, D_MODEL)

    def steps(fn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dropkit.manual_seed(7)
        results = []
        for _ in range(3):
            block.zero_grad()
            y = fn(x, key_padding_mask=padding_mask()[:2, :6])
            y.square().sum().backward()
            results.append((y.detach(), block.in_proj.weight.grad.clone()))  # type: ignore[union-attr]
        return results

    eager = steps(block)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = steps(torch.compile(block, backend=counter, fullgraph=True))
    assert counter.frame_count == 1, "the advancing step counters must not trigger a recompile"
    for (y_e, g_e), (y_c, g_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)  # a different mask is O(1) off
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)
    assert int(block.attention.rng_step) == int(block.ffn_residual.rng_step) == 3


# ---------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_heads": 3}, ValueError, "d_model must be divisible by n_heads, got d_model=16, n_heads=3"),
        ({"d_model": 0}, ValueError, "d_model must be >= 1, got 0"),
        ({"d_ff": 2.5}, TypeError, "d_ff must be an int, got float"),
        ({"residual_dropout": (0.1, 1.1)}, ValueError, r"residual_dropout\[1\] must be in \[0, 1\], got 1.1"),
        ({"residual_dropout": (0.1,)}, ValueError, "a tuple of length 1"),
        ({"ffn_dropout": "0.1"}, TypeError, "ffn_dropout must be a float, got str"),
        ({"activation": "tanhh"}, ValueError, "activation must be one of .* got 'tanhh'"),
        ({"activation": 3}, TypeError, "activation must be a str or a callable, got int"),
        ({"norm_first": 1}, TypeError, "norm_first must be a bool, got int"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments = {"d_model": D_MODEL, "n_heads": N_HEADS, "d_ff": D_FF} | kwargs
    with pytest.raises(error, match=match):
        TransformerEncoderBlock(**arguments)


def test_bad_forward_arguments() -> None:
    block = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF)
    x = torch.randn(2, 5, D_MODEL)
    with pytest.raises(
        ValueError, match=r"input must be a 3-D tensor \(N, S, E\) with E = 16, got \(2, 5, 8\)"
    ):
        block(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(5, 5\) or \(8, 5, 5\), got \(4, 4\)"):
        block(x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\), got \(5,\)"):
        block(x, key_padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(
        TypeError, match=r"attention masks must be bool or floating-point, got dtype torch\.int64"
    ):
        block(x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        block(x, is_causal=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# TokenAndPositionEmbedding


def test_sinusoidal_positions_follow_vaswani() -> None:
    table = sinusoidal_positions(50, 6)
    pos = torch.arange(50, dtype=torch.float64)
    for i in range(3):
        angle = pos / 10000 ** (2 * i / 6)
        torch.testing.assert_close(table[:, 2 * i].double(), torch.sin(angle), rtol=0, atol=1e-6)
        torch.testing.assert_close(table[:, 2 * i + 1].double(), torch.cos(angle), rtol=0, atol=1e-6)
    assert sinusoidal_positions(4, 5).shape == (4, 5)  # odd widths end with a sine column


def test_embedding_eval_is_the_hand_built_sum() -> None:
    embed = TokenAndPositionEmbedding(30, 8, max_len=12, p=0.5).eval()
    tokens = torch.randint(0, 30, (3, 10))
    expected = embed.token.weight[tokens] * math.sqrt(8) + sinusoidal_positions(10, 8)
    torch.testing.assert_close(embed(tokens), expected)
    learned = TokenAndPositionEmbedding(30, 8, max_len=12, positions="learned", scale_embeddings=False).eval()
    assert learned.position is not None
    torch.testing.assert_close(learned(tokens), learned.token.weight[tokens] + learned.position.weight[:10])
    seq_first = TokenAndPositionEmbedding(30, 8, max_len=12, batch_first=False).eval()
    seq_first.load_state_dict(embed.state_dict())
    torch.testing.assert_close(seq_first(tokens.T), embed(tokens).transpose(0, 1))
    assert set(embed.state_dict()) == {"token.weight"}  # the sinusoid table is not a checkpoint entry


def test_embedding_without_dropout_holds_no_dropout_layer() -> None:
    assert isinstance(TokenAndPositionEmbedding(10, 4, 4, p=0.0).dropout, nn.Identity)


def test_embedding_bad_input() -> None:
    embed = TokenAndPositionEmbedding(10, 4, max_len=5)
    with pytest.raises(ValueError, match="sequence length must be at most max_len=5, got 6"):
        embed(torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"tokens must be an int32/int64 tensor, got torch\.float32"):
        embed(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="positions must be 'sinusoidal' or 'learned', got 'rotary'"):
        TokenAndPositionEmbedding(10, 4, 5, positions="rotary")


def test_block_state_dict_holds_no_step_counter() -> None:
    block = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF, activation="gelu")
    assert not any("rng_step" in name for name in block.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_on_cuda_matches_cpu_masks() -> None:
    dropkit.manual_seed(2)
    block = TransformerEncoderBlock(D_MODEL, N_HEADS, D_FF, dropout=0.3)
    x = torch.randn(2, 6, D_MODEL)
    dropkit.manual_seed(5)
    cpu = block(x)
    dropkit.manual_seed(5)
    gpu = block.cuda()(x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
