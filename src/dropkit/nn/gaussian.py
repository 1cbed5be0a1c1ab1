"""Multiplicative Gaussian dropout and additive Gaussian noise modules."""

from __future__ import annotations

import torch

from dropkit import functional as F
from dropkit._validation import check_bool, check_nonnegative
from dropkit.nn._base import RateAttribute, _DropoutBase, _UnaryRandomLayer

__all__ = ["GaussianDropout", "GaussianNoise"]


class GaussianDropout(_DropoutBase):
    r"""Multiply each element by Gaussian noise with the variance of Bernoulli dropout.

    .. math::
        y = x \odot \xi,\qquad \xi \sim \mathcal{N}(1, \sigma^2),\quad \sigma^2 = \frac{p}{1 - p},

    which matches the mean and variance of inverted Bernoulli dropout with drop rate ``p``.
    Under ``torch.compile`` the std is computed from ``p_tensor`` when the graph runs, so a
    changed ``p`` does not recompile.
    Eval mode is the identity; ``p = 1`` (infinite variance) outputs zeros.  Noise is drawn by
    dropkit's engine in float32 (float64 for float64 input).

    Args:
        p: the equivalent drop probability. Default: 0.5
        inplace: write the result into the input. Default: ``False``

    Shape:
        - Input: :math:`(*)`, any shape.
        - Output: same shape as the input.

    Examples::

        >>> m = dropkit.nn.GaussianDropout(p=0.5)
        >>> m(torch.ones(3, 4)).shape
        torch.Size([3, 4])

    Reference: Srivastava et al., JMLR 2014, section 10 (multiplicative Gaussian noise);
    Wang & Manning, "Fast dropout training", ICML 2013.
    """

    _functional = staticmethod(F.gaussian_dropout)


class GaussianNoise(_UnaryRandomLayer):
    r"""Add zero-mean Gaussian noise during training: :math:`y = x + \varepsilon`,
    :math:`\varepsilon \sim \mathcal{N}(0, \mathrm{std}^2)`.

    Any finite ``std >= 0`` is allowed (no arbitrary cap).  Eval mode is the identity.
    ``std`` is validated on every assignment and mirrored into ``std_tensor`` (a float64 CPU
    tensor of shape ``(1,)``, not a buffer), which a ``torch.compile``-d forward reads as a graph
    input: assigning ``std`` between calls (a schedule) does not recompile.

    Args:
        std: standard deviation of the noise. Default: 0.1
        inplace: write the result into the input. Default: ``False``

    Shape:
        - Input: :math:`(*)`, any shape.
        - Output: same shape as the input.

    Examples::

        >>> m = dropkit.nn.GaussianNoise(std=0.05)
        >>> m(torch.zeros(2, 3)).shape
        torch.Size([2, 3])

    Reference: Bishop, "Training with Noise is Equivalent to Tikhonov Regularization", 1995.
    """

    _functional = staticmethod(F.gaussian_noise)
    _rate_holder = "std_tensor"
    std = RateAttribute(check_nonnegative, "The standard deviation of the noise, a finite float ``>= 0``.")
    std_tensor: torch.Tensor

    def __init__(self, std: float = 0.1, inplace: bool = False) -> None:
        super().__init__()
        self.std = std
        self.inplace = check_bool(inplace, "inplace")

    def extra_repr(self) -> str:
        return f"std={self.std}, inplace={self.inplace}"
