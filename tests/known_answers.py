"""Known-answer cases: the exact bits every random op and layer produced when they were pinned.

Each case runs one public op or layer on fixed inputs with a fixed key and returns its outputs
(and input gradients); :func:`digest` hashes their bytes.  ``tests/data/known_answers.json`` holds
the digests recorded before the rate/ops refactor of issue 12, and ``test_known_answers.py``
checks that today's code reproduces every one, so a refactor that changes a single mask bit or a
single rounding fails loudly.  Regenerate (only for a deliberate, documented change of bits) with
``python -m tests.known_answers``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import nn

import dropkit
from dropkit import functional as F

DATA = Path(__file__).parent / "data" / "known_answers.json"
SEED = 0x5EED_1234
_T = TypeVar("_T")


def _deprecated(call: Callable[[], _T]) -> _T:
    """A call of a deprecated alias (pinned until it is removed), which must warn."""
    with pytest.warns(DeprecationWarning, match="deprecated"):
        return call()


def _input(*shape: int, dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + offset)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + 0.25).to(dtype)


def _with_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = fn(x)
    upstream = _input(*y.shape, dtype=y.dtype, offset=7)
    (grad,) = torch.autograd.grad(y, x, upstream)
    return y.detach(), grad


def _functional_cases() -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    x2 = _input(37, 53)
    x4 = _input(4, 6, 9, 11)
    x5 = _input(2, 3, 4, 5, 6)
    cases: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {}
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        xd = x2.to(dtype)
        cases[f"dropout[{name}]"] = lambda xd=xd: _with_grad(lambda t: F.dropout(t, 0.3, seed=SEED), xd)
    cases["dropout[p=0.9999]"] = lambda: _with_grad(lambda t: F.dropout(t, 0.9999, seed=SEED), x2)
    cases["dropout[original]"] = lambda: _with_grad(
        lambda t: F.dropout(t, 0.4, inverted=False, seed=SEED), x2
    )
    cases["dropout[original,eval]"] = lambda: (F.dropout(x2, 0.4, False, inverted=False),)
    cases["dropout[broadcast]"] = lambda: _with_grad(
        lambda t: F.dropout(t, 0.5, broadcast_dims=(0, 2), seed=SEED), x4
    )
    cases["dropout[noncontiguous]"] = lambda: (F.dropout(x4.transpose(1, 3), 0.25, seed=SEED),)
    cases["dropout[channels_last]"] = lambda: (
        F.dropout(x4.contiguous(memory_format=torch.channels_last), 0.25, seed=SEED),
    )
    cases["dropout1d"] = lambda: _with_grad(lambda t: F.dropout1d(t, 0.5, seed=SEED), x4[0])
    cases["dropout2d"] = lambda: _with_grad(lambda t: F.dropout2d(t, 0.5, seed=SEED), x4)
    cases["dropout2d[channels_last]"] = lambda: (F.dropout2d(x4, 0.5, channels_last=True, seed=SEED),)
    cases["dropout3d"] = lambda: _with_grad(lambda t: F.dropout3d(t, 0.5, seed=SEED), x5)
    cases["alpha_dropout"] = lambda: _with_grad(lambda t: F.alpha_dropout(t, 0.2, seed=SEED), x2)
    cases["alpha_dropout[bf16]"] = lambda: (F.alpha_dropout(x2.bfloat16(), 0.2, seed=SEED),)
    cases["feature_alpha_dropout"] = lambda: _with_grad(
        lambda t: F.feature_alpha_dropout(t, 0.2, seed=SEED), x4
    )
    cases["gaussian_dropout"] = lambda: _with_grad(lambda t: F.gaussian_dropout(t, 0.3, seed=SEED), x2)
    cases["gaussian_dropout[f16]"] = lambda: (F.gaussian_dropout(x2.half(), 0.3, seed=SEED),)
    cases["gaussian_noise"] = lambda: _with_grad(lambda t: F.gaussian_noise(t, 0.7, seed=SEED), x2)
    cases["drop_block2d"] = lambda: _with_grad(lambda t: F.drop_block2d(t, 0.2, block_size=3, seed=SEED), x4)
    cases["drop_block2d[exact]"] = lambda: (
        F.drop_block2d(x4, 0.2, block_size=3, exact_rate=True, seed=SEED),
    )
    cases["drop_block2d[shared,renorm]"] = lambda: (
        F.drop_block2d(x4, 0.2, block_size=3, shared_channels=True, per_sample_renorm=True, seed=SEED),
    )
    cases["drop_block1d"] = lambda: (F.drop_block1d(x4[0], 0.2, block_size=3, seed=SEED),)
    cases["drop_block3d"] = lambda: (F.drop_block3d(x5, 0.2, block_size=2, seed=SEED),)
    cases["drop_path[row]"] = lambda: _with_grad(lambda t: F.drop_path(t, 0.4, seed=SEED), x4)
    cases["drop_path[batch]"] = lambda: (F.drop_path(x4, 0.4, mode="batch", seed=SEED),)
    cases["drop_connect_weight"] = lambda: _with_grad(lambda t: F.drop_connect_weight(t, 0.3, seed=SEED), x2)
    weight, bias = _input(5, 53, offset=3), _input(5, offset=4)
    cases["moment_matching_linear"] = lambda: (
        F.moment_matching_linear(x2, weight, bias, 0.3, torch.relu, samples=16, seed=SEED),
    )
    residual, bias53 = _input(37, 53, offset=5), _input(53, offset=6)
    cases["bias_dropout_add"] = lambda: _with_grad(
        lambda t: _deprecated(lambda: F.bias_dropout_add(t, bias53, residual, 0.3, seed=SEED)), x2
    )
    cases["residual_dropout"] = lambda: _with_grad(
        lambda t: F.residual_dropout(t, residual, 0.3, seed=SEED), x2
    )
    cases["residual_dropout[bias]"] = lambda: (F.residual_dropout(x2, residual, 0.3, bias=bias53, seed=SEED),)
    q, k, v = _input(2, 3, 7, 8, offset=8), _input(2, 3, 9, 8, offset=9), _input(2, 3, 9, 8, offset=10)
    cases["scaled_dot_product_attention"] = lambda: _with_grad(
        lambda t: F.scaled_dot_product_attention(t, k, v, dropout_p=0.3, seed=SEED), q
    )
    cases["scaled_dot_product_attention[causal]"] = lambda: (
        F.scaled_dot_product_attention(q, k[:, :, :7], v[:, :, :7], dropout_p=0.3, is_causal=True, seed=SEED),
    )
    seq = _input(6, 4, 10, offset=11)
    cases["locked_dropout"] = lambda: _with_grad(lambda t: F.locked_dropout(t, 0.3, seed=SEED), seq)
    cases["locked_dropout[batch_first]"] = lambda: (F.locked_dropout(seq, 0.3, batch_first=True, seed=SEED),)
    ids = torch.tensor([[1, 2, 3, 0], [4, 4, 5, 9]])
    emb = _input(10, 6, offset=12)
    cases["embedding_dropout"] = lambda: _with_grad(
        lambda t: F.embedding_dropout(ids, t, 0.3, padding_idx=0, seed=SEED), emb
    )
    cases["embedding_dropout[per_token]"] = lambda: (
        F.embedding_dropout(ids, emb, 0.3, per_token=True, seed=SEED),
    )
    cases["word_dropout"] = lambda: (F.word_dropout(ids, 0.4, unk_idx=1, num_embeddings=10, seed=SEED),)
    prev, new = _input(5, 7, offset=13), _input(5, 7, offset=14)
    cases["zoneout"] = lambda: _with_grad(lambda t: F.zoneout(prev, t, 0.3, seed=SEED), new)
    cases["zoneout_states"] = lambda: F.zoneout_states((prev, new), (new, prev), (0.2, 0.4), seed=SEED)
    logit = torch.tensor(-1.2, dtype=torch.float64)
    cases["concrete_dropout"] = lambda: _with_grad(
        lambda t: F.concrete_dropout(t, logit.to(t.dtype), seed=SEED), x2
    )
    return cases


def _steps(build: Callable[[], nn.Module], *inputs: torch.Tensor, steps: int = 2) -> tuple[torch.Tensor, ...]:
    """Seed, build, and run ``steps`` training forwards (the module's own key sequence)."""
    dropkit.manual_seed(SEED)
    torch.manual_seed(0)  # parameter initialisation of wrapped layers
    module = build().train()
    outputs = []
    for _ in range(steps):
        out = module(*inputs)
        if isinstance(out, tuple):
            outputs.extend(o.detach() for o in out if isinstance(o, torch.Tensor))
        else:
            outputs.append(out.detach())
    return tuple(outputs)


def _module_cases() -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    x2 = _input(16, 12)
    x4 = _input(2, 4, 8, 8)
    seq = _input(5, 3, 12, offset=2)
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]])
    h = (_input(3, 12, offset=3), _input(3, 12, offset=4))
    return {
        "nn.Dropout": lambda: _steps(lambda: dropkit.nn.Dropout(0.3), x2),
        "nn.Dropout2d": lambda: _steps(lambda: dropkit.nn.Dropout2d(0.3), x4),
        "nn.AlphaDropout": lambda: _steps(lambda: dropkit.nn.AlphaDropout(0.3), x2),
        "nn.GaussianDropout": lambda: _steps(lambda: dropkit.nn.GaussianDropout(0.3), x2),
        "nn.GaussianNoise": lambda: _steps(lambda: dropkit.nn.GaussianNoise(0.5), x2),
        "nn.DropBlock2d": lambda: _steps(lambda: dropkit.nn.DropBlock2d(0.2, block_size=3), x4),
        "nn.DropPath": lambda: _steps(lambda: dropkit.nn.DropPath(0.3), x4),
        "nn.StochasticDepth": lambda: _steps(
            lambda: dropkit.nn.StochasticDepth(nn.Linear(12, 12), 0.5), x2, steps=4
        ),
        "nn.LayerDrop": lambda: _steps(
            lambda: dropkit.nn.LayerDrop([nn.Linear(12, 12) for _ in range(4)], 0.5), x2, steps=3
        ),
        "nn.LockedDropout": lambda: _steps(lambda: dropkit.nn.LockedDropout(0.3), seq),
        "nn.WeightDrop": lambda: _steps(lambda: dropkit.nn.WeightDrop(nn.LSTM(12, 12), 0.4), seq),
        "nn.DropConnect": lambda: _steps(lambda: dropkit.nn.DropConnect(nn.Linear(12, 7), 0.4), x2),
        "nn.DropConnect[per_example]": lambda: _steps(
            lambda: dropkit.nn.DropConnect(nn.Linear(12, 7), 0.4, per_example=True), x2
        ),
        "nn.EmbeddingDropout": lambda: _steps(
            lambda: dropkit.nn.EmbeddingDropout(nn.Embedding(5, 12), 0.4), ids
        ),
        "nn.ZoneoutCell": lambda: _steps(
            lambda: dropkit.nn.ZoneoutCell(nn.LSTMCell(12, 12), 0.3, 0.2), x2[:3], h
        ),
        "nn.ConcreteDropout": lambda: _steps(lambda: dropkit.nn.ConcreteDropout(nn.Linear(12, 7)), x2),
        "nn.VariationalLinear": lambda: _steps(lambda: dropkit.nn.VariationalLinear(12, 7), x2),
        "nn.SparseVariationalLinear": lambda: _steps(lambda: dropkit.nn.SparseVariationalLinear(12, 7), x2),
        "nn.BiasDropoutAdd": lambda: _steps(
            lambda: _deprecated(lambda: dropkit.nn.BiasDropoutAdd(0.3)), x2, x2[0], x2.flip(0)
        ),
        "nn.ResidualDropout": lambda: _steps(lambda: dropkit.nn.ResidualDropout(0.3), x2, x2.flip(0)),
        "nn.AttentionDropout": lambda: _steps(lambda: dropkit.nn.AttentionDropout(0.3), x4),
        "nn.TransformerEncoderBlock": lambda: _steps(
            lambda: dropkit.nn.TransformerEncoderBlock(12, 2, 24, dropout=0.2), seq
        ),
        "nn.TokenAndPositionEmbedding": lambda: _steps(
            lambda: dropkit.nn.TokenAndPositionEmbedding(5, 12, 8, p=0.3), ids
        ),
    }


def cases() -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    return {**_functional_cases(), **_module_cases()}


def digest(tensors: tuple[torch.Tensor, ...]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def compute() -> dict[str, str]:
    return {name: digest(run()) for name, run in cases().items()}


if __name__ == "__main__":
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {DATA}")
