"""EmbeddingDropout / embedding_dropout / word_dropout: whole-word masks, padding, UNK, lookup options."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import dropkit
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import realised_drop_probability
from dropkit.functional.embedding import embedding_dropout, word_dropout
from dropkit.nn.embedding import EmbeddingDropout
from tests.conftest import binomial_tolerance


def _embedding(num: int = 12, dim: int = 5, **kwargs: object) -> nn.Embedding:
    emb = nn.Embedding(num, dim, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        emb.weight.uniform_(0.5, 1.5)  # no zeros: a kept row is never all zero
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx] = 7.0  # a non-zero padding row must pass through as is
    return emb


# --- word-type masks ---------------------------------------------------------------------------


def test_every_occurrence_of_a_dropped_word_is_zero() -> None:
    p = 0.5
    weight = torch.rand(30, 4) + 0.5
    ids = torch.randint(0, 30, (20, 25))
    y = embedding_dropout(ids, weight, p, seed=1)
    keep = keep_mask(dropkit.make_key(1), p, (30,))
    for word in ids.unique().tolist():
        rows = y[ids == word]
        if keep[word]:
            torch.testing.assert_close(rows, (weight[word] / (1 - p)).expand_as(rows), rtol=1e-6, atol=0.0)
        else:
            assert bool((rows == 0).all())
    assert 0 < int((~keep[ids.unique()]).sum()) < ids.unique().numel()


def test_per_token_masks_each_occurrence() -> None:
    p, n = 0.3, 40_000
    weight = torch.rand(3, 2) + 0.5
    ids = torch.ones(n, dtype=torch.int64)  # one word everywhere
    y = embedding_dropout(ids, weight, p, per_token=True, seed=4)
    dropped = (y == 0).all(-1)
    assert torch.equal(dropped, ~keep_mask(dropkit.make_key(4), p, (n,)))
    rate = float(dropped.double().mean())
    assert abs(rate - realised_drop_probability(p)) <= binomial_tolerance(p, n)


def test_scale_false_keeps_raw_rows() -> None:
    weight = torch.rand(10, 3) + 0.5
    ids = torch.arange(10)
    y = embedding_dropout(ids, weight, 0.5, scale=False, seed=5)
    kept = (y != 0).all(-1)
    assert torch.equal(y[kept], weight[kept])
    assert torch.equal(kept, keep_mask(dropkit.make_key(5), 0.5, (10,)))


def test_eval_p0_and_p1() -> None:
    emb = _embedding(padding_idx=2)
    ids = torch.tensor([[0, 2, 5], [11, 2, 1]])
    assert torch.equal(EmbeddingDropout(emb, 0.9).eval()(ids), emb(ids))
    assert torch.equal(embedding_dropout(ids, emb.weight, 0.9, training=False, padding_idx=2), emb(ids))
    assert torch.equal(embedding_dropout(ids, emb.weight, 0.0, padding_idx=2, seed=1), emb(ids))
    with torch.no_grad():
        emb.weight[5] = float("inf")
    y = embedding_dropout(ids, emb.weight, 1.0, padding_idx=2)
    assert not bool(y.isnan().any()), "p = 1 gives exact zeros, never NaN"
    assert bool((y[ids != 2] == 0).all())
    assert torch.equal(y[ids == 2], emb.weight[2].expand(2, 5))


# --- padding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [0, 4, -1, -12])
def test_padding_rows_are_never_dropped_or_scaled(padding_idx: int) -> None:
    emb = _embedding(12, 5, padding_idx=padding_idx)
    pad = padding_idx % 12
    ids = torch.tensor([[pad, 3, pad, 8], [1, pad, 11, 0]])
    m = EmbeddingDropout(emb, 0.5)
    seen_dropped = 0
    for seed in range(40):
        y = m(ids, seed=seed)
        assert torch.equal(y[ids == pad], emb.weight[pad].expand(int((ids == pad).sum()), 5))
        # the functional takes the negative index too, with the same meaning
        assert torch.equal(embedding_dropout(ids, emb.weight, 0.5, padding_idx=padding_idx, seed=seed), y)
        seen_dropped += int((y[ids != pad] == 0).all(-1).sum())
    assert seen_dropped > 0


def test_zero_padding_row_stays_zero_and_gets_no_gradient() -> None:
    emb = nn.Embedding(6, 3, padding_idx=-1)
    ids = torch.tensor([5, 1, 5, 2, 5])
    y = EmbeddingDropout(emb, 0.5)(ids, seed=6)
    assert bool((y[ids == 5] == 0).all())
    y.sum().backward()
    assert emb.weight.grad is not None
    assert bool((emb.weight.grad[5] == 0).all()), "F.embedding's padding_idx keeps its gradient zero"


# --- UNK replacement ------------------------------------------------------------------------------


@pytest.mark.parametrize("unk_idx", [1, -11])
def test_dropped_words_read_the_unk_row(unk_idx: int) -> None:
    emb = _embedding(12, 5, padding_idx=0)
    unk = unk_idx % 12
    ids = torch.randint(0, 12, (30, 8))
    ids[:, 0] = 0
    m = EmbeddingDropout(emb, 0.5, unk_idx=unk_idx)
    assert m.unk_idx == unk
    y = m(ids, seed=7)
    keep = keep_mask(dropkit.make_key(7), 0.5, (12,))
    expected_ids = torch.where(keep[ids] | (ids == 0), ids, unk)
    assert torch.equal(y, emb(expected_ids))
    assert bool((y[ids == 0] == emb.weight[0]).all()), "padding tokens are never replaced"
    assert int((expected_ids != ids).sum()) > 0


def test_word_dropout_on_ids_matches_the_embedding_path() -> None:
    emb = _embedding(50, 4, padding_idx=3)
    ids = torch.randint(0, 50, (6, 10))
    for per_token in (False, True):
        new_ids = word_dropout(
            ids, 0.4, unk_idx=1, num_embeddings=50, per_token=per_token, padding_idx=3, seed=8
        )
        assert new_ids.dtype == ids.dtype
        assert bool(((new_ids == ids) | (new_ids == 1)).all())
        assert torch.equal(new_ids[ids == 3], ids[ids == 3])
        m = EmbeddingDropout(emb, 0.4, unk_idx=1, per_token=per_token)
        assert torch.equal(m(ids, seed=8), emb(new_ids))
    assert word_dropout(ids, 0.4, False, unk_idx=1, num_embeddings=50) is ids


def test_token_level_unk_rate() -> None:
    p, n = 0.1, 40_000
    ids = torch.full((n,), 7)
    out = word_dropout(ids, p, unk_idx=0, num_embeddings=10, per_token=True, seed=9)
    rate = float((out == 0).double().mean())
    assert abs(rate - realised_drop_probability(p)) <= binomial_tolerance(p, n)


# --- lookup options --------------------------------------------------------------------------------


def test_sparse_gradient_matches_dense() -> None:
    ids = torch.tensor([[1, 4, 1], [7, 4, 9]])
    dense = _embedding(10, 3)
    sparse = copy.deepcopy(dense)
    sparse.sparse = True
    EmbeddingDropout(dense, 0.5)(ids, seed=10).square().sum().backward()
    EmbeddingDropout(sparse, 0.5)(ids, seed=10).square().sum().backward()
    assert sparse.weight.grad is not None
    assert dense.weight.grad is not None
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)


def test_max_norm_renormalizes_the_raw_weight_like_nn_embedding() -> None:
    emb = _embedding(10, 4, max_norm=0.5)
    plain = copy.deepcopy(emb)
    ids = torch.tensor([2, 5, 5, 8])
    y = EmbeddingDropout(emb, 0.5)(ids, seed=11)
    plain(ids)
    assert torch.equal(emb.weight, plain.weight)
    assert bool((emb.weight[ids].norm(dim=-1) <= 0.5 + 1e-6).all())
    kept = (y != 0).all(-1)
    torch.testing.assert_close(y[kept], plain.weight[ids][kept] * 2.0)


def test_scale_grad_by_freq_is_kept() -> None:
    ids = torch.tensor([3, 3, 3, 5])
    a, b = _embedding(8, 2, scale_grad_by_freq=True), _embedding(8, 2)
    b.load_state_dict(a.state_dict())
    EmbeddingDropout(a, 0.0)(ids).sum().backward()
    EmbeddingDropout(b, 0.0)(ids).sum().backward()
    assert a.weight.grad is not None
    assert b.weight.grad is not None
    torch.testing.assert_close(a.weight.grad[3], b.weight.grad[3] / 3)


def test_gradcheck_float64() -> None:
    ids = torch.tensor([[0, 3, 2], [3, 1, 0]])
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for seed in (12, 13):

        def fn(w: torch.Tensor, seed: int = seed) -> torch.Tensor:
            return embedding_dropout(ids, w, 0.5, padding_idx=-1, seed=seed)

        assert torch.autograd.gradcheck(fn, (weight,))


# --- module and functional ---------------------------------------------------------------------


def test_module_equals_functional_and_stream_reproduces() -> None:
    dropkit.manual_seed(15)
    emb = _embedding(20, 3, padding_idx=-2)
    m = EmbeddingDropout(emb, 0.3)
    ids = torch.randint(0, 20, (4, 9))
    first = m(ids)
    key = dropkit.make_key(15, m.rng_stream, 0)
    assert torch.equal(first, embedding_dropout(ids, emb.weight, 0.3, padding_idx=18, seed=key))
    assert not torch.equal(m(ids), first)
    dropkit.manual_seed(15)
    assert torch.equal(m(ids), first)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        m(ids, generator=g1), embedding_dropout(ids, emb.weight, 0.3, padding_idx=18, generator=g2)
    )


def test_state_dict_round_trips_and_copies() -> None:
    emb = _embedding(10, 3)
    m = EmbeddingDropout(_embedding(10, 3), 0.2, unk_idx=4, scale=False)
    assert list(m.state_dict()) == ["weight"]
    m.load_state_dict(emb.state_dict())
    assert torch.equal(m.module.weight, emb.weight)
    model = nn.Sequential(nn.Embedding(10, 3))
    model.load_state_dict(nn.Sequential(m).state_dict())
    assert torch.equal(model[0].weight, emb.weight)
    ids = torch.arange(10)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(clone(ids, seed=3), m(ids, seed=3))
    assert "p=0.2, scale=False, unk_idx=4" in repr(m)


# --- errors ---------------------------------------------------------------------------------------


def test_bad_arguments() -> None:
    emb = nn.Embedding(10, 3, padding_idx=0)
    ids = torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"module must be an nn\.Embedding, got Linear"):
        EmbeddingDropout(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"padding_idx must be in \[-10, 10\).*got 10"):
        embedding_dropout(ids, emb.weight, 0.5, padding_idx=10)
    with pytest.raises(ValueError, match=r"padding_idx must be in \[-10, 10\).*got -11"):
        embedding_dropout(ids, emb.weight, 0.5, padding_idx=-11)
    with pytest.raises(ValueError, match=r"unk_idx must be in \[-10, 10\).*got 12"):
        EmbeddingDropout(emb, 0.5, unk_idx=12)
    with pytest.raises(ValueError, match="unk_idx must differ from padding_idx"):
        EmbeddingDropout(emb, 0.5, unk_idx=-10)
    with pytest.raises(ValueError, match="scale=True does not apply with unk_idx"):
        EmbeddingDropout(emb, 0.5, unk_idx=1, scale=True)
    with pytest.raises(TypeError, match=r"int64 or int32 indices, got dtype torch\.float32"):
        embedding_dropout(ids.float(), emb.weight, 0.5)
    with pytest.raises(ValueError, match=r"weight must be 2-D.*got shape \(10,\)"):
        embedding_dropout(ids, torch.ones(10), 0.5)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        embedding_dropout(ids, torch.ones(10, 2, dtype=torch.int64), 0.5)
    with pytest.raises(IndexError, match=r"input indices must be in \[0, 10\), got values in \[1, 10\]"):
        embedding_dropout(torch.tensor([1, 10]), emb.weight, 0.5, seed=1)
    with pytest.raises(ValueError, match="num_embeddings must be a positive int, got 0"):
        word_dropout(ids, 0.5, unk_idx=0, num_embeddings=0)
    with pytest.raises(TypeError, match="padding_idx must be an int or None"):
        embedding_dropout(ids, emb.weight, 0.5, padding_idx=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per_token must be a bool"):
        EmbeddingDropout(emb, 0.5, per_token=1)  # type: ignore[arg-type]
