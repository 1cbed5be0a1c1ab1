"""The deprecated ``BiasDropoutAdd`` module: :class:`dropkit.nn.ResidualDropout` under its former
name and argument order."""

from __future__ import annotations

import torch

from dropkit._deprecation import warn_deprecated
from dropkit._validation import check_floating_tensor
from dropkit.functional._common import SeedLike
from dropkit.nn.attention import ResidualDropout

__all__ = ["BiasDropoutAdd"]


class BiasDropoutAdd(ResidualDropout):
    r"""Deprecated alias of :class:`dropkit.nn.ResidualDropout`: ``residual + dropout(x + b)``.

    .. deprecated::
        ``BiasDropoutAdd(p)(x, bias, residual)`` is ``ResidualDropout(p)(x, residual, bias=bias)``
        (the same mask and bits for the same key); use that.  This alias keeps its former
        argument order and its default ``p = 0.5`` (``ResidualDropout``'s is 0.1), warns on
        construction, and will be removed in the next release.

    Args:
        p: probability of an element of ``x + b`` being zeroed. Default: 0.5

    Examples::

        >>> import torch, dropkit, warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     m = dropkit.nn.BiasDropoutAdd(p=0.1)
        >>> caught[0].category.__name__
        'DeprecationWarning'
        >>> x, bias, residual = torch.randn(2, 5, 16), torch.randn(16), torch.randn(2, 5, 16)
        >>> torch.equal(m(x, bias, residual, seed=3),
        ...             dropkit.nn.ResidualDropout(0.1)(x, residual, bias=bias, seed=3))
        True
    """

    def __init__(self, p: float = 0.5) -> None:
        warn_deprecated(
            "BiasDropoutAdd(p) is deprecated and will be removed in the next release; use "
            "ResidualDropout(p), called as m(input, residual, bias=bias)"
        )
        super().__init__(p)

    def forward(  # type: ignore[override]  # the former argument order, kept for one release
        self,
        input: torch.Tensor,
        bias: torch.Tensor,
        residual: torch.Tensor,
        *,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``residual + dropout(input + bias)``: :meth:`ResidualDropout.forward` with a bias."""
        check_floating_tensor(bias, "bias")  # required here, optional in ResidualDropout
        return super().forward(input, residual, bias, seed=seed, generator=generator)
