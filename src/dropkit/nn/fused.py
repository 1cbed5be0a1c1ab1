"""Fused neighbours of dropout as modules."""

from __future__ import annotations

import torch

from dropkit import functional as F
from dropkit.functional._common import SeedLike
from dropkit.functional._tensor_rate import TENSOR_RATE_VARIANTS
from dropkit.nn._base import _ProbabilityRate, _RandomLayer

__all__ = ["BiasDropoutAdd"]


class BiasDropoutAdd(_ProbabilityRate, _RandomLayer):
    r"""Bias add, dropout and residual add in one pass: the transformer's residual branch.

    .. math::
        y = \mathrm{residual} + \frac{r \odot (x + b)}{q},\qquad r \sim \mathrm{Bernoulli}(q),
        \quad q = 1 - p,

    while training, and :math:`y = \mathrm{residual} + x + b` in eval.  The sum is computed in
    float32 (float64 for float64 input) and rounded once to the input dtype, so bfloat16 and
    float16 lose less than three separate ops would.  The mask is the one
    :class:`dropkit.nn.Dropout` draws for ``x + b`` with the same key (bit for bit, float32 and
    float64 results too), and backward regenerates it: nothing per element is kept, where the
    unfused ``residual + F.dropout(x + bias)`` keeps a mask.  Gradients: :math:`\partial y/\partial x
    = r/q`, the bias gradient is that summed over the broadcast dims, and the residual gradient
    is the incoming gradient.  Under ``torch.compile`` the rate is read from ``p_tensor`` when
    the graph runs, so assigning ``p`` between calls does not recompile.

    Args:
        p: probability of an element of ``x + b`` being zeroed. Default: 0.5

    Shape:
        - Input ``x``: :math:`(*, H)`, any shape.
        - Bias: broadcastable to the input, typically :math:`(H)`.
        - Residual: same shape as the input.
        - Output: same shape as the input.

    All three tensors share dtype and device.

    Examples::

        >>> import torch, dropkit
        >>> m = dropkit.nn.BiasDropoutAdd(p=0.1)
        >>> x, residual = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
        >>> bias = torch.zeros(16)
        >>> m(x, bias, residual).shape
        torch.Size([2, 5, 16])
        >>> _ = m.eval()
        >>> torch.allclose(m(x, bias, residual), residual + x)
        True

    Per call, ``m(x, bias, residual, seed=123)`` or ``generator=g`` fix the mask explicitly.

    Reference: Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models
    Using Model Parallelism", arXiv:1909.08053, 2019 (``bias_dropout_add`` fusion).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(
        self,
        input: torch.Tensor,
        bias: torch.Tensor,
        residual: torch.Tensor,
        *,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if self.training:
            seed = self._key(input, seed, generator)
        if torch.compiler.is_compiling():  # the rate as a graph input: no recompile when it changes
            variant = TENSOR_RATE_VARIANTS[F.bias_dropout_add]
            return variant(
                input, bias, residual, self.p_tensor, self.training, seed=seed, generator=generator
            )
        return F.bias_dropout_add(
            input, bias, residual, self.p, self.training, seed=seed, generator=generator
        )
