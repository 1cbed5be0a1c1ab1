"""Embedding (word) dropout as functions; documentation lives on
:class:`dropkit.nn.embedding.EmbeddingDropout`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dropkit._validation import check_bool, check_floating_tensor
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import compute_dtype, inverted_scale_of
from dropkit.functional._common import SeedLike, check_rate, is_zero, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate

__all__ = ["embedding_dropout", "word_dropout"]

_INDEX_DTYPES = (torch.int64, torch.int32)


def check_index(index: object, num_embeddings: int, name: str) -> int | None:
    """``None``, or an int in ``[-num_embeddings, num_embeddings)`` made non-negative."""
    if index is None:
        return None
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"{name} must be an int or None, got {type(index).__name__} ({index!r})")
    if not -num_embeddings <= index < num_embeddings:
        raise ValueError(
            f"{name} must be in [-{num_embeddings}, {num_embeddings}) for {num_embeddings} embeddings, "
            f"got {index}"
        )
    return index % num_embeddings


def _check_ids(input: object) -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor of indices, got {type(input).__name__}")
    if input.dtype not in _INDEX_DTYPES:
        raise TypeError(f"input must hold int64 or int32 indices, got dtype {input.dtype}")
    return input


def _check_num_embeddings(num_embeddings: object) -> int:
    if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings < 1:
        raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
    return num_embeddings


def _token_keep(
    input: torch.Tensor,
    key: torch.Tensor,
    p: Rate,
    num_embeddings: int,
    per_token: bool,
    padding_idx: int | None,
) -> torch.Tensor:
    """Per token: kept (True) or dropped; padding tokens are always kept.

    Word-type masks are one draw per row of the vocabulary, ``keep_mask(key, p, (V,))``, read at
    each token's index; token masks are ``keep_mask(key, p, input.shape)``.
    """
    if per_token:
        keep = keep_mask(key, p, tuple(input.shape))
    else:
        # Checked on the CPU only: reading the range of device indices would stall the host.  Not
        # while torch.compile traces either: reading values is a graph break, and out-of-range ids
        # still fail in the lookup below, only with torch's message instead of this one.
        if (
            input.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and input.numel()
            and (int(input.min()) < 0 or int(input.max()) >= num_embeddings)
        ):
            raise IndexError(
                f"input indices must be in [0, {num_embeddings}), got values in "
                f"[{int(input.min())}, {int(input.max())}]"
            )
        keep = keep_mask(key, p, (num_embeddings,))[input]
    if padding_idx is not None:
        keep = keep | (input == padding_idx)
    return keep


def word_dropout(
    input: torch.Tensor,
    p: Rate = 0.1,
    training: bool = True,
    *,
    unk_idx: int,
    num_embeddings: int,
    per_token: bool = False,
    padding_idx: int | None = None,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace dropped words of an index tensor by ``unk_idx``; padding tokens are never replaced.

    Drops word types (every occurrence of a dropped vocabulary entry, one draw per entry of
    ``num_embeddings``) or, with ``per_token=True``, each token independently.  The result
    looked up in an embedding equals :func:`embedding_dropout` with the same ``unk_idx`` and
    key.  See :class:`dropkit.nn.embedding.EmbeddingDropout`.

    Examples::

        >>> from dropkit.functional.embedding import word_dropout
        >>> ids = torch.tensor([[5, 6, 5, 0], [6, 5, 0, 0]])
        >>> out = word_dropout(ids, 0.5, unk_idx=1, num_embeddings=10, padding_idx=0, seed=3)
        >>> bool(((out == ids) | (out == 1)).all()) and bool((out[ids == 0] == 0).all())
        True
    """
    input = _check_ids(input)
    p = check_rate(p)
    check_bool(training, "training")
    check_bool(per_token, "per_token")
    num_embeddings = _check_num_embeddings(num_embeddings)
    padding_idx = check_index(padding_idx, num_embeddings, "padding_idx")
    unk = check_index(unk_idx, num_embeddings, "unk_idx")
    if unk is None:
        raise TypeError("unk_idx must be an int, got None")
    if unk == padding_idx:
        raise ValueError(f"unk_idx must differ from padding_idx, got {unk_idx} and {padding_idx}")
    check_seed(seed, generator)
    if not training or is_zero(p):
        return input
    key = resolve_key(input, seed, generator)
    keep = _token_keep(input, key, p, num_embeddings, per_token, padding_idx)
    return torch.where(keep, input, torch.full((), unk, dtype=input.dtype, device=input.device))


def embedding_dropout(
    input: torch.Tensor,
    weight: torch.Tensor,
    p: Rate = 0.1,
    training: bool = True,
    *,
    per_token: bool = False,
    scale: bool | None = None,
    unk_idx: int | None = None,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Embedding lookup with whole word types (rows of ``weight``) dropped; see
    :class:`dropkit.nn.embedding.EmbeddingDropout`.

    The lookup options (``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq``,
    ``sparse``) mean what they mean for :func:`torch.nn.functional.embedding`; ``padding_idx``
    may be negative (counted from the end).  ``seed`` (an int or a key from
    :func:`dropkit.make_key`) or ``generator`` fix the mask of this call.

    Examples::

        >>> from dropkit.functional.embedding import embedding_dropout
        >>> ids = torch.tensor([[1, 2, 1], [2, 3, 1]])
        >>> y = embedding_dropout(ids, torch.ones(4, 2), 0.5, seed=0)
        >>> bool((y[0, 0] == y[0, 2]).all() and (y[0, 0] == y[1, 2]).all())  # word 1 everywhere alike
        True
    """
    input, weight, padding_idx, unk = _check_embedding_args(
        input, weight, training, per_token, scale, unk_idx, padding_idx, max_norm
    )
    p = check_rate(p)
    options = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    check_seed(seed, generator)
    if not training or is_zero(p):
        return F.embedding(input, weight, *options)
    key = resolve_key(weight, seed, generator)
    keep = _token_keep(input, key, p, weight.shape[0], per_token, padding_idx)
    factor = inverted_scale_of(p) if scale is None or scale else 1.0
    return _drop_words(input, weight, keep, unk, factor, options)


def _check_embedding_args(
    input: object,
    weight: object,
    training: object,
    per_token: object,
    scale: object,
    unk_idx: object,
    padding_idx: object,
    max_norm: object,
) -> tuple[torch.Tensor, torch.Tensor, int | None, int | None]:
    """The checked ids and weight, and ``padding_idx`` and ``unk_idx`` resolved to ``[0, V)``."""
    input = _check_ids(input)
    weight = check_floating_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}"
        )
    check_bool(training, "training")
    check_bool(per_token, "per_token")
    if scale is not None:
        check_bool(scale, "scale")
    num_embeddings = weight.shape[0]
    padding = check_index(padding_idx, num_embeddings, "padding_idx")
    unk = check_index(unk_idx, num_embeddings, "unk_idx")
    if unk is not None:
        if scale:
            raise ValueError("scale=True does not apply with unk_idx: dropped words read the UNK row")
        if unk == padding:
            raise ValueError(f"unk_idx must differ from padding_idx, got {unk_idx} and {padding_idx}")
    if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive float or None, got {max_norm!r}")
    return input, weight, padding, unk


def _drop_words(
    input: torch.Tensor,
    weight: torch.Tensor,
    keep: torch.Tensor,
    unk: int | None,
    factor: float | torch.Tensor,
    options: tuple[Any, ...],
) -> torch.Tensor:
    """The lookup with the dropped tokens zeroed (or read as UNK) and the kept ones scaled by
    ``factor`` (a float, or a 0-dim float64 tensor holding the same value)."""
    padding_idx = options[0]
    if unk is not None:
        replaced = torch.where(keep, input, torch.full((), unk, dtype=input.dtype, device=input.device))
        return F.embedding(replaced, weight, *options)
    output = F.embedding(input, weight, *options)
    compute = compute_dtype(output.dtype)
    if isinstance(factor, torch.Tensor):  # float64 -> compute dtype: the rounding torch.tensor does
        scale = factor.to(dtype=compute, device=output.device)
    else:
        scale = torch.tensor(factor, dtype=compute, device=output.device)
    kept = output.to(compute) * scale
    if padding_idx is not None:  # padding rows pass through as they are, never rescaled
        kept = torch.where((input == padding_idx).unsqueeze(-1), output.to(compute), kept)
    zero = torch.zeros((), dtype=compute, device=output.device)
    return torch.where(keep.unsqueeze(-1), kept, zero).to(output.dtype)
