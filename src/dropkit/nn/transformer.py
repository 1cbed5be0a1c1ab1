"""A reference transformer encoder block and an embedding layer with every dropout placement of
Vaswani et al. (2017) individually configurable."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as torch_F
from torch import nn

from dropkit._validation import check_bool, check_int, check_probability
from dropkit.nn.attention import ResidualDropout, ScaledDotProductAttention
from dropkit.nn.dropout import Dropout

__all__ = ["TokenAndPositionEmbedding", "TransformerEncoderBlock", "sinusoidal_positions"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch_F.relu,
    "gelu": torch_F.gelu,
}


def _optional_dropout(p: float) -> nn.Module:
    """A :class:`Dropout` of rate ``p``, or ``nn.Identity`` for ``p = 0`` (no draws, no cost)."""
    return Dropout(p) if p > 0.0 else nn.Identity()


def _check_activation(activation: object) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}"
            )
        return _ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a str or a callable, got {type(activation).__name__}")
    return activation


def _residual_rates(residual_dropout: object) -> tuple[float, float]:
    if isinstance(residual_dropout, tuple):
        if len(residual_dropout) != 2:
            raise ValueError(
                "residual_dropout must be a float or a pair (after attention, after FFN), "
                f"got a tuple of length {len(residual_dropout)}"
            )
        return (
            check_probability(residual_dropout[0], "residual_dropout[0]"),
            check_probability(residual_dropout[1], "residual_dropout[1]"),
        )
    rate = check_probability(residual_dropout, "residual_dropout")
    return rate, rate


class TransformerEncoderBlock(nn.Module):
    r"""A transformer encoder layer (self-attention + feed-forward) with every dropout placement.

    Pre-LN (``norm_first=True``, the default):

    .. math::
        h &= x + \mathrm{RD}_1\big(\mathrm{MHA}(\mathrm{LN}_1(x))\big) \\
        y &= h + \mathrm{RD}_2\big(W_2\, \mathrm{D}_{ffn}(\sigma(W_1 \mathrm{LN}_2(h) + b_1)) + b_2\big)

    Post-LN (``norm_first=False``, Vaswani et al.'s original):
    :math:`h = \mathrm{LN}_1(x + \mathrm{RD}_1(\mathrm{MHA}(x)))`,
    :math:`y = \mathrm{LN}_2(h + \mathrm{RD}_2(\mathrm{FFN}(h)))`.

    The dropout placements, each with its own rate (a rate of 0 removes that dropout):

    * ``attention_dropout``: on the attention weights after the softmax, inside
      :class:`ScaledDotProductAttention` (module ``self.attention``);
    * ``residual_dropout``: on each sub-layer's output before the residual add, via
      :class:`ResidualDropout` modules ``self.attention_residual`` and ``self.ffn_residual``;
      a float sets both, a pair ``(after_attention, after_ffn)`` sets them separately.  The last
      projection of each sub-layer (``out_proj``, ``linear2``) is computed without its bias,
      which goes to the fused bias-dropout-add (so forward hooks of those two linears do not
      run: hook the residual modules instead);
    * ``ffn_dropout``: on the feed-forward activation, between ``linear1`` and ``linear2``
      (module ``self.ffn_dropout``, ``nn.Identity`` at rate 0);
    * embedding dropout belongs to the layer before the first block: see
      :class:`TokenAndPositionEmbedding`.

    Rates left as ``None`` take ``dropout``.  All randomness follows ``self.training`` (train vs
    eval) and comes from dropkit's engine (``use_engine=False`` hands the attention dropout to
    torch's fused SDPA kernels and their RNG), so masks reproduce under
    :func:`dropkit.manual_seed` and the block compiles with ``torch.compile(fullgraph=True)``.
    The parameters mirror :class:`torch.nn.TransformerEncoderLayer` (``in_proj`` holds its
    ``self_attn.in_proj_weight``/``in_proj_bias``), so weights copy over one to one; in eval the
    two compute the same function.

    Args:
        d_model: model width :math:`E`.
        n_heads: number of attention heads; must divide ``d_model``.
        d_ff: hidden width of the feed-forward network.
        dropout: default rate of every placement left as ``None``. Default: 0.1
        attention_dropout: rate on the attention weights. Default: ``dropout``
        residual_dropout: rate on the sub-layer outputs before the residual adds, a float or a
            pair (after attention, after FFN). Default: ``dropout``
        ffn_dropout: rate on the feed-forward activation. Default: ``dropout``
        activation: ``"relu"``, ``"gelu"`` or a callable. Default: ``"relu"``
        norm_first: pre-LN (``True``) or post-LN (``False``). Default: ``True``
        bias: linear and LayerNorm layers learn a bias. Default: ``True``
        layer_norm_eps: LayerNorm epsilon. Default: 1e-5
        batch_first: input is :math:`(N, S, E)` (``True``) or :math:`(S, N, E)`. Default: ``True``
        use_engine: draw attention-weight masks with dropkit's engine. Default: ``True``

    Shape:
        - Input: :math:`(N, S, E)` (or :math:`(S, N, E)` with ``batch_first=False``).
        - ``attn_mask``: :math:`(S, S)` or :math:`(N \cdot H, S, S)`; ``key_padding_mask``:
          :math:`(N, S)`.  As in :class:`torch.nn.TransformerEncoderLayer`: bool True = *not*
          allowed to attend (padding), float = added to the scores.
        - Output: same shape as the input.

    Examples::

        >>> dropkit.manual_seed(0)
        >>> block = dropkit.nn.transformer.TransformerEncoderBlock(
        ...     32, 4, 64, attention_dropout=0.1, residual_dropout=(0.1, 0.2), ffn_dropout=0.0
        ... )
        >>> x = torch.randn(2, 10, 32)
        >>> block(x).shape
        torch.Size([2, 10, 32])
        >>> _ = block.eval()
        >>> torch.equal(block(x), block(x))  # no dropout in eval
        True

    Reference: Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (§5.4: residual
    dropout on each sub-layer output before the add and norm, dropout on the embedding sums,
    :math:`P_{drop} = 0.1`; attention-weight dropout in the reference implementation);
    Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020 (pre-LN).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        *,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        residual_dropout: float | tuple[float, float] | None = None,
        ffn_dropout: float | None = None,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = "relu",
        norm_first: bool = True,
        bias: bool = True,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        use_engine: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = check_int(d_model, "d_model", 1)
        self.n_heads = check_int(n_heads, "n_heads", 1)
        check_int(d_ff, "d_ff", 1)
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}"
            )
        dropout = check_probability(dropout, "dropout")
        attention_rate = check_probability(
            dropout if attention_dropout is None else attention_dropout, "attention_dropout"
        )
        attention_residual_rate, ffn_residual_rate = _residual_rates(
            dropout if residual_dropout is None else residual_dropout
        )
        ffn_rate = check_probability(dropout if ffn_dropout is None else ffn_dropout, "ffn_dropout")
        self.activation = _check_activation(activation)
        self.norm_first = check_bool(norm_first, "norm_first")
        check_bool(bias, "bias")
        self.batch_first = check_bool(batch_first, "batch_first")

        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.attention = ScaledDotProductAttention(attention_rate, use_engine=use_engine)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.attention_residual = ResidualDropout(attention_residual_rate)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.ffn_dropout = _optional_dropout(ffn_rate)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)
        self.ffn_residual = ResidualDropout(ffn_residual_rate)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, norm_first={self.norm_first}, "
            f"batch_first={self.batch_first}"
        )

    def _attention_mask(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> tuple[torch.Tensor | None, bool]:
        """One SDPA mask (bool: True = attend, or float: added) from torch's MHA-style masks."""
        batch, length = x.shape[0], x.shape[1]
        masks: list[torch.Tensor] = []
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor):
                raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
            if attn_mask.shape == (length, length):
                masks.append(attn_mask)
            elif attn_mask.shape == (batch * self.n_heads, length, length):
                masks.append(attn_mask.view(batch, self.n_heads, length, length))
            else:
                raise ValueError(
                    f"attn_mask must have shape {(length, length)} or "
                    f"{(batch * self.n_heads, length, length)}, got {tuple(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor):
                raise TypeError(
                    f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}"
                )
            if key_padding_mask.shape != (batch, length):
                raise ValueError(
                    f"key_padding_mask must have shape {(batch, length)}, got {tuple(key_padding_mask.shape)}"
                )
            masks.append(key_padding_mask.view(batch, 1, 1, length))
        if is_causal:
            if not masks:
                return None, True
            masks.append(torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1))
        merged: torch.Tensor | None = None
        for mask in masks:
            if mask.dtype == torch.bool:
                if any(other.dtype != torch.bool for other in masks):
                    # Mixed bool and float masks: masked positions become -inf.
                    mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                        mask, float("-inf")
                    )
                else:
                    mask = ~mask  # to SDPA's convention, True = attend
            elif not mask.is_floating_point():
                raise TypeError(f"attention masks must be bool or floating-point, got dtype {mask.dtype}")
            else:
                mask = mask.to(x.dtype)
            if merged is None:
                merged = mask
            else:
                merged = merged & mask if merged.dtype == torch.bool else merged + mask
        return merged, False

    def _self_attention(
        self, h: torch.Tensor, residual: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        batch, length, width = h.shape
        head_dim = width // self.n_heads
        qkv = self.in_proj(h).view(batch, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        context = self.attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, is_causal=is_causal)
        context = context.transpose(1, 2).reshape(batch, length, width)
        out = torch_F.linear(context, self.out_proj.weight)
        return self.attention_residual(out, residual, bias=self.out_proj.bias)

    def _feed_forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = self.ffn_dropout(self.activation(self.linear1(h)))
        out = torch_F.linear(hidden, self.linear2.weight)
        return self.ffn_residual(out, residual, bias=self.linear2.bias)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Apply the block; masks follow :class:`torch.nn.TransformerEncoderLayer`'s convention.

        ``is_causal=True`` adds a causal mask (position ``i`` attends to ``j <= i``), combined
        with the other masks if any.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            layout = "(N, S, E)" if self.batch_first else "(S, N, E)"
            raise ValueError(f"input must be a 3-D tensor {layout} with E = {self.d_model}, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        check_bool(is_causal, "is_causal")
        if not self.batch_first:
            x = x.transpose(0, 1)
        mask, causal = self._attention_mask(x, attn_mask, key_padding_mask, is_causal)
        if self.norm_first:
            x = self._self_attention(self.norm1(x), x, mask, causal)
            x = self._feed_forward(self.norm2(x), x)
        else:
            x = self.norm1(self._self_attention(x, x, mask, causal))
            x = self.norm2(self._feed_forward(x, x))
        return x if self.batch_first else x.transpose(0, 1)


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """Vaswani et al.'s positional encodings, ``(length, d_model)`` float32:
    ``PE[pos, 2i] = sin(pos / 10000^(2i/d))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/d))``."""
    check_int(length, "length", 0)
    check_int(d_model, "d_model", 1)
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
    return table.to(torch.float32)


class TokenAndPositionEmbedding(nn.Module):
    r"""Token embeddings plus positional encodings, followed by dropout (embedding dropout).

    .. math::
        y = \mathrm{dropout}_p\big(s \cdot W_{\mathrm{tok}}[t] + P[\mathrm{pos}]\big),
        \qquad s = \sqrt{E} \text{ if } \texttt{scale\_embeddings} \text{ else } 1,

    the input layer of Vaswani et al.: "we apply dropout to the sums of the embeddings and the
    positional encodings" (§5.4), with token embeddings multiplied by :math:`\sqrt{E}` (§3.4)
    and fixed sinusoidal positions (§3.5); ``positions="learned"`` uses a learned table
    (BERT/GPT style, usually with ``scale_embeddings=False``).  Dropout is a
    :class:`dropkit.nn.Dropout` (``self.dropout``, ``nn.Identity`` for ``p = 0``), one draw per
    element, on only in training.  ``p`` is the dropout's rate: assigning it (a schedule, say)
    validates it and reaches the dropout, also for a layer built with ``p = 0`` (whose
    ``nn.Identity`` then becomes a :class:`dropkit.nn.Dropout`, with the next RNG stream).

    Args:
        num_embeddings: vocabulary size.
        d_model: embedding width :math:`E`.
        max_len: longest sequence accepted.
        p: embedding dropout rate, in ``[0, 1]``. Default: 0.1
        positions: ``"sinusoidal"`` (fixed, a non-persistent buffer) or ``"learned"``.
            Default: ``"sinusoidal"``
        scale_embeddings: multiply token embeddings by :math:`\sqrt{E}`. Default: ``True``
        padding_idx: as in :class:`torch.nn.Embedding`. Default: ``None``
        batch_first: tokens are :math:`(N, S)` (``True``) or :math:`(S, N)`. Default: ``True``

    Shape:
        - Input: :math:`(N, S)` integer token ids (:math:`(S, N)` with ``batch_first=False``),
          :math:`S \le` ``max_len``.
        - Output: :math:`(N, S, E)` (:math:`(S, N, E)` with ``batch_first=False``).

    Examples::

        >>> dropkit.manual_seed(0)
        >>> embed = dropkit.nn.transformer.TokenAndPositionEmbedding(100, 16, max_len=32, p=0.1)
        >>> tokens = torch.randint(0, 100, (2, 10))
        >>> embed(tokens).shape
        torch.Size([2, 10, 16])

    Reference: Vaswani et al., "Attention Is All You Need", NeurIPS 2017, §3.4, §3.5, §5.4.
    """

    positional_table: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        d_model: int,
        max_len: int,
        *,
        p: float = 0.1,
        positions: str = "sinusoidal",
        scale_embeddings: bool = True,
        padding_idx: int | None = None,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        check_int(num_embeddings, "num_embeddings", 1)
        self.d_model = check_int(d_model, "d_model", 1)
        self.max_len = check_int(max_len, "max_len", 1)
        rate = check_probability(p)
        if positions not in ("sinusoidal", "learned"):
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {positions!r}")
        self.positions = positions
        self.scale_embeddings = check_bool(scale_embeddings, "scale_embeddings")
        self.batch_first = check_bool(batch_first, "batch_first")
        self.token = nn.Embedding(num_embeddings, d_model, padding_idx=padding_idx)
        self.position: nn.Embedding | None = None
        if positions == "learned":
            self.position = nn.Embedding(max_len, d_model)
        else:
            self.register_buffer("positional_table", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = _optional_dropout(rate)

    @property
    def p(self) -> float:
        """The embedding dropout rate, in ``[0, 1]``: the rate of ``self.dropout`` (0 for
        ``nn.Identity``).  Assigning it validates the value and sets the dropout's rate; a block
        built with ``p = 0`` gets its :class:`Dropout` on the first assignment of a rate > 0."""
        return float(getattr(self.dropout, "p", 0.0))

    @p.setter
    def p(self, value: object) -> None:
        rate = check_probability(value)
        if not isinstance(self.dropout, nn.Identity):
            setattr(self.dropout, "p", rate)  # noqa: B010  # a Dropout (or what replaced it)
        elif rate > 0.0:
            weight = self.token.weight
            self.dropout = Dropout(rate).to(weight.device).train(self.training)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, p={self.p}, positions={self.positions!r}"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed ``tokens`` and add positions, then apply embedding dropout while training."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"tokens must be an int32/int64 tensor, got {got}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be 2-D, got shape {tuple(tokens.shape)}")
        length = tokens.shape[1] if self.batch_first else tokens.shape[0]
        if length > self.max_len:
            raise ValueError(f"sequence length must be at most max_len={self.max_len}, got {length}")
        embedded = self.token(tokens)
        if self.scale_embeddings:
            embedded = embedded * math.sqrt(self.d_model)
        if self.position is not None:
            table = self.position.weight[:length]
        else:
            table = self.positional_table[:length].to(embedded.dtype)
        embedded = embedded + (table if self.batch_first else table.unsqueeze(1))
        return self.dropout(embedded)
