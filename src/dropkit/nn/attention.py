"""Transformer dropout placements as modules: attention-weight dropout, residual dropout, and
scaled dot-product attention whose dropout follows ``self.training``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dropkit._validation import check_bool, check_int
from dropkit.functional._common import SeedLike
from dropkit.functional.attention import residual_dropout, scaled_dot_product_attention
from dropkit.nn._base import _ProbabilityRate, _RandomLayer
from dropkit.nn.dropout import Dropout

__all__ = ["AttentionDropout", "ResidualDropout", "ScaledDotProductAttention"]


class AttentionDropout(Dropout):
    r"""Dropout on attention weights: zero each weight with probability ``p`` during training.

    Put it after the softmax of an attention layer, before the weights multiply the values:

    .. math::
        A = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}} + M\right), \qquad
        \tilde A = \frac{r \odot A}{q}, \quad r \sim \mathrm{Bernoulli}(q),\ q = 1 - p, \qquad
        y = \tilde A\, V

    while training, and :math:`\tilde A = A` in eval.  One independent draw is made per
    (batch, head, query, key) element, so a query position randomly ignores some of the keys
    it attends to; the rows of :math:`\tilde A` no longer sum to 1 but do so in expectation.
    This is :class:`dropkit.nn.Dropout` under a name that says where it goes (with Vaswani et
    al.'s default rate); ``broadcast_dims`` can tie the mask, e.g. ``-2`` for one draw per
    (batch, head, key) shared by every query.  :class:`ScaledDotProductAttention` applies the
    same mask without a separate module.

    Args:
        p: probability of an attention weight being zeroed, in ``[0, 1]``. Default: 0.1
        inplace: write the result into the input. Default: ``False``
        inverted: scale by :math:`1/q` while training (see :class:`dropkit.nn.Dropout`).
            Default: ``True``
        broadcast_dims: dims along which one draw is shared. Default: ``()``

    Shape:
        - Input: :math:`(N, H, L, S)` attention weights (any shape works).
        - Output: same shape as the input.

    Examples::

        >>> dropkit.manual_seed(0)
        >>> drop = dropkit.nn.attention.AttentionDropout(p=0.1)
        >>> q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)  # (N, H, L, E) each
        >>> weights = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
        >>> (drop(weights) @ v).shape
        torch.Size([2, 4, 5, 8])
        >>> drop.eval()(weights) is weights  # eval mode is the identity
        True

    Reference: Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (dropout on the
    attention weights, :math:`P_{drop} = 0.1`).
    """

    def __init__(
        self,
        p: float = 0.1,
        inplace: bool = False,
        *,
        inverted: bool = True,
        broadcast_dims: int | Sequence[int] = (),
    ) -> None:
        super().__init__(p, inplace, inverted=inverted, broadcast_dims=broadcast_dims)


class ResidualDropout(_ProbabilityRate, _RandomLayer):
    r"""Dropout on a sub-layer's output before the residual add: ``residual + dropout(x + b)``.

    .. math::
        y = \mathrm{residual} + \frac{r \odot (x + b)}{q}, \qquad r \sim \mathrm{Bernoulli}(q),
        \quad q = 1 - p,

    while training, and :math:`y = \mathrm{residual} + x + b` in eval.  This is the "residual
    dropout" of Vaswani et al.: applied to the output of every attention and feed-forward
    sub-layer before it is added to the sub-layer input (and normalized, in post-LN blocks).
    Pass the last linear layer's ``bias`` separately (compute the layer as
    ``F.linear(h, weight)``) to take the fused path (Megatron-LM's bias-dropout-add): bias add,
    dropout and residual add in one pass, computed in float32 (float64 for float64 input) and
    rounded once, with no mask kept for backward.  Without a bias the result is
    ``residual + dropkit.functional.dropout(x)``.  This is the one module of that operation:
    the deprecated :class:`dropkit.nn.BiasDropoutAdd` is it with the former argument order.
    The mask is the one :class:`dropkit.nn.Dropout` draws for ``x + b`` with the same key.
    Under ``torch.compile`` the rate is read from ``p_tensor`` when the graph runs (fused path
    included), so assigning ``p`` between calls does not recompile.

    Args:
        p: probability of an element of the sub-layer output being zeroed, in ``[0, 1]``.
            Default: 0.1

    Shape:
        - Input ``x``: :math:`(*, E)`, the sub-layer output.
        - Residual: same shape as the input (the sub-layer's input).
        - Bias (optional): broadcastable to the input, typically :math:`(E)`.
        - Output: same shape as the input.

    Examples::

        >>> dropkit.manual_seed(0)
        >>> linear = torch.nn.Linear(16, 16)
        >>> residual_drop = dropkit.nn.attention.ResidualDropout(p=0.1)
        >>> x = torch.randn(2, 5, 16)
        >>> h = torch.nn.functional.linear(x, linear.weight)  # the bias goes to the fused op
        >>> residual_drop(h, x, bias=linear.bias).shape
        torch.Size([2, 5, 16])
        >>> _ = residual_drop.eval()
        >>> torch.allclose(residual_drop(h, x, bias=linear.bias), x + linear(x), atol=1e-6)
        True

    Per call, ``m(x, residual, seed=123)`` or ``generator=g`` fix the mask explicitly.

    Reference: Vaswani et al., "Attention Is All You Need", NeurIPS 2017, §5.4 (residual
    dropout, :math:`P_{drop} = 0.1`); Shoeybi et al., "Megatron-LM", arXiv:1909.08053, 2019
    (the fused bias-dropout-add).
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(
        self,
        input: torch.Tensor,
        residual: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``residual + dropout(input + bias)``; ``seed`` or ``generator`` fix this call's mask."""
        if self.training:
            seed = self._key(input, seed, generator)
        return residual_dropout(
            input, residual, self.p_tensor, self.training, bias=bias, seed=seed, generator=generator
        )


class ScaledDotProductAttention(_ProbabilityRate, _RandomLayer):
    r"""Scaled dot-product attention with dropout on the attention weights while training.

    .. math::
        \mathrm{Attention}(Q, K, V) = \mathrm{dropout}_p\!\left(\mathrm{softmax}\!\left(
        s\,QK^\top + M\right)\right) V, \qquad s = 1/\sqrt{E} \text{ by default},

    with :math:`M` the mask (``-inf`` where a bool ``attn_mask`` is False, or a float mask
    added as is; ``is_causal`` keeps the lower triangle).  A thin module over
    :func:`dropkit.functional.scaled_dot_product_attention` holding the rate ``p``: dropout is on
    only in training mode (``self.training``), so the recurring bug of passing ``dropout_p`` to
    :func:`torch.nn.functional.scaled_dot_product_attention` in eval cannot happen.  In eval, or
    with ``p = 0``, the call is exactly torch's kernel with ``dropout_p=0``.

    With ``use_engine=True`` (default) the training forward drops the attention weights with
    dropkit's engine (scores, softmax in float32 for half inputs, dropout, multiply by
    :math:`V`): the mask has one draw per (batch, head, query, key) element from this module's
    stream, reproduces under :func:`dropkit.manual_seed` and per-call ``seed=``, and is the one
    :class:`AttentionDropout` draws for the materialised weights with the same key.  Three paths
    compute it, with the same mask (element :math:`(b, i, j)` of the weights reads the engine's
    draw number :math:`(b L + i) S + j` whatever the path), outputs equal to float rounding:

    * on CUDA, a fused FlashAttention-style Triton kernel (float16, bfloat16 or float32 inputs
      and head dims up to 128; causal, bool and float masks, grouped-query attention): the
      weights are never stored, the backward regenerates each tile's probabilities from the
      saved log-sum-exp and its mask from the key, so autograd keeps :math:`O(L)` per head,
      nothing per weight;
    * the blocked path (weights of at least
      :data:`dropkit.functional.attention.BLOCKED_MIN_ELEMENTS` elements, or ``block_size``
      given): the weights of ``block_size`` query rows at a time (causal blocks only up to their
      last key), dropped and multiplied by :math:`V`, recomputed block by block in backward:
      memory :math:`O(L \cdot \text{block})` per head, nothing kept per weight;
    * else the materialised weights (memory :math:`O(L S)` per head, as torch's math backend),
      also under ``torch.func`` transforms and forward-mode AD and for a float ``attn_mask``
      that requires grad.

    The first two run eagerly as an ``autograd.Function`` and, under ``torch.compile`` and
    ``torch.export``, as the custom op ``dropkit::engine_attention`` (with its backward op), so
    a compiled model keeps nothing per weight either.  Double backward is not supported on them.

    ``use_engine=False`` passes ``dropout_p`` to torch's fused kernels (flash / memory-efficient
    attention on GPUs) instead; their masks come from torch's global RNG, not from dropkit.
    Rows whose every position is masked give zeros, as torch's kernels do.

    ``torch.compile``: with ``use_engine=True`` a compiled training forward reads the rate from
    ``p_tensor`` when the graph runs, so assigning ``p`` does not recompile, and the masks are
    the eager ones.  The traced graph always takes the engine path, also at ``p = 0``, where
    eager calls torch's kernel: there the two agree to float rounding.  With
    ``use_engine=False`` torch's kernel takes ``dropout_p`` as a float, a constant of the
    compiled graph: every new ``p`` recompiles it.

    Args:
        p: probability of an attention weight being zeroed while training, in ``[0, 1]``.
            Default: 0.1
        use_engine: draw the mask with dropkit's engine (``True``) or use torch's fused
            kernel and RNG (``False``). Default: ``True``
        block_size: query rows per block of the blocked path, which then runs for every
            training call the fused kernel does not take; ``None`` picks the path by size.
            Default: ``None``

    Shape:
        - Query: :math:`(*, L, E)`; key: :math:`(*, S, E)`; value: :math:`(*, S, E_v)`, with
          batch dims that broadcast, typically :math:`(N, H, \cdot, \cdot)`.  With
          ``enable_gqa=True`` the key and value may have fewer heads (dim -3) than the query.
        - ``attn_mask``: broadcastable to :math:`(*, L, S)`, bool (True = attend) or float.
        - Output: :math:`(*, L, E_v)`.

    Examples::

        >>> dropkit.manual_seed(0)
        >>> attention = dropkit.nn.attention.ScaledDotProductAttention(p=0.1)
        >>> q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)  # (N, H, L, E) each
        >>> attention(q, k, v, is_causal=True).shape
        torch.Size([2, 4, 5, 8])
        >>> _ = attention.eval()  # no dropout: torch's kernel with dropout_p=0
        >>> expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> torch.equal(attention(q, k, v, is_causal=True), expected)
        True

    Per call, ``m(q, k, v, seed=123)`` or ``generator=g`` fix the mask explicitly.

    Reference: Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (scaled dot-product
    attention, dropout on the attention weights).
    """

    def __init__(self, p: float = 0.1, *, use_engine: bool = True, block_size: int | None = None) -> None:
        super().__init__()
        self.p = p
        self.use_engine = check_bool(use_engine, "use_engine")
        self.block_size = None if block_size is None else check_int(block_size, "block_size", 1)

    @property
    def dropout_p(self) -> float:
        """The rate under torch's SDPA argument name (where tools that look for an attention rate,
        such as dropkit's MC mode, find it)."""
        return self.p

    def extra_repr(self) -> str:
        text = f"p={self.p}" + ("" if self.use_engine else ", use_engine=False")
        return text + ("" if self.block_size is None else f", block_size={self.block_size}")

    def _rate_is_graph_input(self, attribute: str) -> bool:
        return super()._rate_is_graph_input(attribute) and self.use_engine

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        *,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Attend ``query`` to ``key``/``value``; ``seed`` or ``generator`` fix this call's mask."""
        if self.training and self.use_engine:
            seed = self._key(query, seed, generator)
        # dropkit's engine reads the holder when the op runs (a compiled graph does not recompile
        # when p changes); torch's fused kernel takes a float, and so does an eager call at
        # p = 0, which then keeps torch's fused kernel instead of materialising the weights.
        rate: float | torch.Tensor = self.p_tensor
        if not self.use_engine or (not torch.compiler.is_compiling() and self.p == 0.0):
            rate = self.p
        return scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask,
            rate,
            is_causal,
            scale,
            enable_gqa,
            training=self.training,
            seed=seed,
            generator=generator,
            use_engine=self.use_engine,
            block_size=self.block_size,
        )
