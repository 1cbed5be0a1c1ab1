"""Alpha dropout modules for self-normalizing (SELU) networks."""

from __future__ import annotations

import torch

from dropkit import functional as F
from dropkit.nn._base import _ChannelDropoutBase, _DropoutBase

__all__ = ["AlphaDropout", "FeatureAlphaDropout"]


class AlphaDropout(_DropoutBase, torch.nn.AlphaDropout):
    r"""Dropout that keeps a SELU network self-normalizing.

    Dropped units are set to SELU's negative saturation value
    :math:`\alpha' = -\lambda\alpha \approx -1.7581` instead of 0, then an affine correction
    restores zero mean and unit variance of a standard-normal input:

    .. math::
        y = a\,(x \odot r + \alpha'(1 - r)) + b,\quad
        a = (q + \alpha'^2 q p)^{-1/2},\quad b = -a\,\alpha' p .

    In eval mode the layer is the identity; at ``p = 1`` it outputs zeros (the correction
    diverges there).  ``inplace`` is honoured.  Under ``torch.compile``, :math:`a` and :math:`b`
    are computed from ``p_tensor`` when the graph runs, so a changed ``p`` does not recompile.

    Args:
        p: probability of an element being dropped. Default: 0.5
        inplace: write the result into the input. Default: ``False``

    Shape:
        - Input: :math:`(*)`, any shape.
        - Output: same shape as the input.

    Examples::

        >>> m = dropkit.nn.AlphaDropout(p=0.1)
        >>> torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SELU(), m)(torch.randn(4, 8)).shape
        torch.Size([4, 8])

    Reference: Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    """

    _functional = staticmethod(F.alpha_dropout)
    _zero_rate_passes_through = True


class FeatureAlphaDropout(_ChannelDropoutBase, torch.nn.FeatureAlphaDropout):
    r"""Alpha dropout of whole channels: one draw per (sample, channel), shared over space.

    The same correction as :class:`AlphaDropout`, with a channel mask as in
    :class:`Dropout2d`.  Eval mode is the identity.

    Args:
        p: probability of a channel being dropped. Default: 0.5
        inplace: write the result into the input. Default: ``False``
        channels_last: the channel axis is the last one, ``(N, *, C)``. Default: ``False``

    Shape:
        - Input: :math:`(N, C, *)` (or :math:`(N, *, C)` with ``channels_last``), at least 2-D.
        - Output: same shape as the input.

    Examples::

        >>> m = dropkit.nn.FeatureAlphaDropout(p=0.2)
        >>> m(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])

    Reference: Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017.
    """

    _functional = staticmethod(F.feature_alpha_dropout)
    _zero_rate_passes_through = True
