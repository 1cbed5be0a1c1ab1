"""EmbeddingDropout: word dropout as a wrapper around an existing ``nn.Embedding``."""

from __future__ import annotations

import torch
from torch import nn

from dropkit._deprecation import renamed_arguments
from dropkit._validation import check_bool
from dropkit.functional._common import SeedLike
from dropkit.functional.embedding import check_index, embedding_dropout
from dropkit.nn._base import _ProbabilityRate, _RandomLayer
from dropkit.nn.weight_drop import make_state_dict_transparent

__all__ = ["EmbeddingDropout"]


class EmbeddingDropout(_ProbabilityRate, _RandomLayer):
    r"""Drop whole words (rows of the embedding matrix) of a wrapped ``nn.Embedding`` while training.

    Each forward draws one Bernoulli(:math:`q`) variable per vocabulary entry,
    :math:`q = 1 - p`; a dropped word is zero at **every** occurrence in the batch and kept
    words are scaled by :math:`1/q`:

    .. math::

        y_{i} = \frac{r_{w_i}}{q}\, E_{w_i}, \qquad r_w \sim \mathrm{Bernoulli}(q)
        \text{ for each word type } w,

    which is dropout on the rows of :math:`E` (Gal & Ghahramani's word dropout, AWD-LSTM's
    ``embedded_dropout``) without building a masked copy of the matrix: the lookup runs on the
    raw weight and the per-token mask is read at each token's index, so the gradient of a
    dropped row is zero and ``sparse`` gradients still work.  Eval is the embedding as it is.

    Options:

    * ``scale=False``: kept rows are not rescaled (the expectation then shrinks by :math:`q`).
    * ``unk_idx``: dropped words are looked up as the UNK row instead of zeroed (nothing is
      rescaled; ``scale`` must then be left unset or ``False``).
    * ``per_token=True``: one draw per token occurrence instead of per word type.
    * ``padding_idx`` (the embedding's, negative values already resolved by ``nn.Embedding``):
      padding tokens are never dropped, never rescaled and never replaced by UNK: they read
      their row as it is.

    The wrapped embedding keeps ``max_norm`` / ``norm_type`` (rows renormalized in place as
    ``nn.Embedding`` does, before masking), ``scale_grad_by_freq`` and ``sparse``.
    ``state_dict`` holds the embedding's own keys (``weight``), so this wrapper is a drop-in
    replacement in checkpoints, in both directions.

    ``torch.compile``: the forward traces into one graph (``fullgraph=True``) that reads the rate
    from ``p_tensor`` when it runs, so assigning ``p`` does not recompile; the masks are the
    eager ones.  While tracing, the host-side range check of CPU ids is skipped (reading values
    would break the graph): out-of-range ids still fail, in torch's lookup.

    Args:
        module: the ``nn.Embedding`` to wrap, held as ``self.module``. (Formerly
            ``embedding``, a deprecated keyword alias for one release.)
        p: probability of a word being dropped, in ``[0, 1]`` (AWD-LSTM uses 0.1). Default: 0.1
        per_token: draw per token occurrence instead of per word type. Default: ``False``
        scale: rescale kept words by :math:`1/q`; ``None`` means ``True`` without ``unk_idx``
            and ``False`` with it. Default: ``None``
        unk_idx: index that dropped words are replaced by, in ``[-V, V)``, or ``None`` to zero
            them. Default: ``None``

    Shape:
        - Input: :math:`(*)`, int64 or int32 indices.
        - Output: :math:`(*, D)`, ``D = module.embedding_dim``.

    Examples::

        >>> from dropkit.nn.embedding import EmbeddingDropout
        >>> dropkit.manual_seed(0)
        >>> emb = torch.nn.Embedding(10, 3, padding_idx=0)
        >>> m = EmbeddingDropout(emb, p=0.5)
        >>> ids = torch.tensor([[4, 7, 4, 0], [7, 4, 0, 0]])
        >>> y = m(ids)
        >>> torch.equal(y[0, 0], y[0, 2]) and torch.equal(y[0, 0], y[1, 1])  # word 4 alike everywhere
        True
        >>> bool((y[ids == 0] == 0).all())  # padding stays zero
        True
        >>> torch.equal(m.eval()(ids), emb(ids))
        True
        >>> unk = EmbeddingDropout(emb, p=0.5, unk_idx=1)  # dropped words read row 1
        >>> unk(ids).shape
        torch.Size([2, 4, 3])

    Per call, ``m(x, seed=123)`` or ``m(x, generator=g)`` fix the mask explicitly.

    Reference: Gal & Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
    Neural Networks", NeurIPS 2016; Merity, Keskar, Socher, "Regularizing and Optimizing LSTM
    Language Models", ICLR 2018.
    """

    module: nn.Embedding

    @renamed_arguments(embedding="module")
    def __init__(
        self,
        module: nn.Embedding,
        p: float = 0.1,
        *,
        per_token: bool = False,
        scale: bool | None = None,
        unk_idx: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"module must be an nn.Embedding, got {type(module).__name__}")
        self.p = p
        self.per_token = check_bool(per_token, "per_token")
        if scale is not None:
            check_bool(scale, "scale")
        num_embeddings = module.num_embeddings
        unk = check_index(unk_idx, num_embeddings, "unk_idx")
        if unk is not None:
            if scale:
                raise ValueError("scale=True does not apply with unk_idx: dropped words read the UNK row")
            if unk == check_index(module.padding_idx, num_embeddings, "padding_idx"):
                raise ValueError(f"unk_idx must differ from padding_idx, got {unk_idx}")
        self.scale = scale
        self.unk_idx = unk
        self.module = module
        make_state_dict_transparent(self)

    def extra_repr(self) -> str:
        extra = f"p={self.p}"
        if self.per_token:
            extra += ", per_token=True"
        if self.scale is not None:
            extra += f", scale={self.scale}"
        if self.unk_idx is not None:
            extra += f", unk_idx={self.unk_idx}"
        return extra

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Look up ``input`` with dropped words; ``seed`` (int or key) or ``generator`` fix the mask."""
        emb = self.module
        if self.training:
            seed = self._key(emb.weight, seed, generator)
        return embedding_dropout(
            input,
            emb.weight,
            self.p_tensor,
            self.training,
            per_token=self.per_token,
            scale=self.scale,
            unk_idx=self.unk_idx,
            padding_idx=emb.padding_idx,
            max_norm=emb.max_norm,
            norm_type=emb.norm_type,
            scale_grad_by_freq=emb.scale_grad_by_freq,
            sparse=emb.sparse,
            seed=seed,
            generator=generator,
        )
