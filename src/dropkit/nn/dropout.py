"""Standard (element) dropout and spatial (channel) dropout modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dropkit import functional as F
from dropkit._validation import check_bool, normalize_dims
from dropkit.nn._base import _ChannelDropoutBase, _DropoutBase

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d"]


class Dropout(_DropoutBase, torch.nn.Dropout):
    r"""Randomly zero elements with probability ``p`` during training.

    Inverted dropout (the default) draws :math:`r \sim \mathrm{Bernoulli}(q)`, :math:`q = 1 - p`,
    and computes :math:`y = r \odot x / q` while training and :math:`y = x` in eval, so the
    expectation of every unit is preserved.  The original formulation of Srivastava et al.
    (``inverted=False``) trains with :math:`y = r \odot x` and evaluates :math:`y = q\,x`,
    which equals scaling the outgoing weights of the layer by :math:`q` (biases of the next layer
    are not scaled).

    Masks come from dropkit's counter-based engine: element ``j`` is kept when the 16-bit Philox
    draw of ``(seed, stream, step, j)`` is at least ``round(p * 2**16)``, so the realised rate is
    within ``2**-17`` of ``p``; backward regenerates the mask and keeps no per-element memory.

    Args:
        p: probability of an element being zeroed, in ``[0, 1]``. Default: 0.5
        inplace: write the result into the input. Default: ``False``
        inverted: scale by :math:`1/q` while training (``True``) or by :math:`q` in eval
            (``False``, Srivastava 2014). Default: ``True``
        broadcast_dims: dims along which one draw is shared, e.g. ``0`` for a mask tied over
            the time axis of ``(T, N, H)`` input, ``-1`` for whole-token dropout. Default: ``()``

    Shape:
        - Input: :math:`(*)`, any shape.
        - Output: :math:`(*)`, same shape as the input.

    Examples::

        >>> import torch, dropkit
        >>> dropkit.manual_seed(0)
        >>> m = dropkit.nn.Dropout(p=0.25)
        >>> y = m(torch.ones(2, 8))
        >>> bool(((y == 0) | (y == torch.tensor(4 / 3))).all())  # each unit is 0 or x / q
        True
        >>> m.eval()(y) is y  # eval mode is the identity
        True

    Per call, ``m(x, seed=123)`` or ``m(x, generator=g)`` fix the mask explicitly.

    Reference: Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
    Overfitting", JMLR 2014; Hinton et al., arXiv:1207.0580, 2012.
    """

    _functional = staticmethod(F.dropout)
    _zero_rate_passes_through = True

    def __init__(
        self,
        p: float = 0.5,
        inplace: bool = False,
        *,
        inverted: bool = True,
        broadcast_dims: int | Sequence[int] = (),
    ) -> None:
        super().__init__(p, inplace)
        self.inverted = check_bool(inverted, "inverted")
        if isinstance(broadcast_dims, int):
            broadcast_dims = (broadcast_dims,)
        normalize_dims(broadcast_dims, 64, "broadcast_dims")  # types checked now, range per call
        self.broadcast_dims = tuple(broadcast_dims)

    def extra_repr(self) -> str:
        extra = "" if self.inverted else ", inverted=False"
        if self.broadcast_dims:
            extra += f", broadcast_dims={self.broadcast_dims}"
        return super().extra_repr() + extra

    def _options(self) -> dict[str, Any]:
        return {"inverted": self.inverted, "broadcast_dims": self.broadcast_dims}


class Dropout1d(_ChannelDropoutBase, torch.nn.Dropout1d):
    r"""Randomly zero whole channels of 1-D feature maps (spatial dropout).

    One Bernoulli draw per (sample, channel) is broadcast over the length axis; kept channels are
    scaled by :math:`1/q`.  Use it after 1-D convolutions, where neighbouring positions are
    strongly correlated and element dropout barely regularizes.

    Args:
        p: probability of a channel being zeroed. Default: 0.5
        inplace: write the result into the input. Default: ``False``
        channels_last: the channel axis is the last one, ``(N, L, C)``. Default: ``False``

    Shape:
        - Input: :math:`(N, C, L)` or :math:`(C, L)`; with ``channels_last``, :math:`(N, L, C)`
          or :math:`(L, C)`. Any other rank is an error.
        - Output: same shape as the input.

    Examples::

        >>> m = dropkit.nn.Dropout1d(p=0.2)
        >>> m(torch.randn(20, 16, 32)).shape
        torch.Size([20, 16, 32])

    Reference: Tompson et al., "Efficient Object Localization Using Convolutional Networks", CVPR 2015.
    """

    _functional = staticmethod(F.dropout1d)
    _zero_rate_passes_through = True


class Dropout2d(_ChannelDropoutBase, torch.nn.Dropout2d):
    r"""Randomly zero whole channels of 2-D feature maps (spatial dropout).

    One Bernoulli draw per (sample, channel) is broadcast over height and width; kept channels are
    scaled by :math:`1/q`.  Unlike ``torch.nn.Dropout2d``, 3-D input always means an unbatched
    :math:`(C, H, W)` map, and other ranks are refused rather than reinterpreted.

    Args:
        p: probability of a channel being zeroed. Default: 0.5
        inplace: write the result into the input. Default: ``False``
        channels_last: the channel axis is the last one, ``(N, H, W, C)``. Default: ``False``

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`; with ``channels_last``,
          :math:`(N, H, W, C)` or :math:`(H, W, C)`. Tensors in ``torch.channels_last`` memory
          format are ordinary :math:`(N, C, H, W)` input.
        - Output: same shape as the input.

    Examples::

        >>> m = dropkit.nn.Dropout2d(p=0.2)
        >>> m(torch.randn(20, 16, 32, 32)).shape
        torch.Size([20, 16, 32, 32])

    Reference: Tompson et al., "Efficient Object Localization Using Convolutional Networks", CVPR 2015.
    """

    _functional = staticmethod(F.dropout2d)
    _zero_rate_passes_through = True


class Dropout3d(_ChannelDropoutBase, torch.nn.Dropout3d):
    r"""Randomly zero whole channels of 3-D feature maps (spatial dropout).

    One Bernoulli draw per (sample, channel) is broadcast over depth, height and width; kept
    channels are scaled by :math:`1/q`.

    Args:
        p: probability of a channel being zeroed. Default: 0.5
        inplace: write the result into the input. Default: ``False``
        channels_last: the channel axis is the last one, ``(N, D, H, W, C)``. Default: ``False``

    Shape:
        - Input: :math:`(N, C, D, H, W)` or :math:`(C, D, H, W)`; with ``channels_last``,
          :math:`(N, D, H, W, C)` or :math:`(D, H, W, C)`.
        - Output: same shape as the input.

    Examples::

        >>> m = dropkit.nn.Dropout3d(p=0.2)
        >>> m(torch.randn(4, 8, 6, 6, 6)).shape
        torch.Size([4, 8, 6, 6, 6])

    Reference: Tompson et al., "Efficient Object Localization Using Convolutional Networks", CVPR 2015.
    """

    _functional = staticmethod(F.dropout3d)
    _zero_rate_passes_through = True
