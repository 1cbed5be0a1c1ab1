"""DropBlock modules (Ghiasi et al. 2018): drop contiguous blocks of 1-D, 2-D and 3-D feature maps."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

import torch

from dropkit._deprecation import warn_deprecated
from dropkit._validation import check_bool
from dropkit.functional.dropblock import _check_block_size, drop_block1d, drop_block2d, drop_block3d
from dropkit.nn._base import _DropoutBase

__all__ = ["DropBlock1d", "DropBlock2d", "DropBlock3d"]

_Init = TypeVar("_Init", bound=Callable[..., None])


def _accept_positional_block_size(init: _Init) -> _Init:
    """Accept, for one release, the former order ``(p, block_size, inplace)``: an int (not a bool)
    in the ``inplace`` slot is the old positional ``block_size`` and a third positional argument
    the old positional ``inplace``, with a DeprecationWarning."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) >= 2 and isinstance(args[1], int) and not isinstance(args[1], bool):
            name = type(self).__name__
            if "block_size" in kwargs:
                raise TypeError(f"{name}() got block_size by position and by keyword")
            if len(args) > 3:
                raise TypeError(f"{name}() takes at most 3 positional arguments, got {len(args)}")
            kwargs["block_size"] = args[1]
            if len(args) == 3:
                if "inplace" in kwargs:
                    raise TypeError(f"{name}() got inplace by position and by keyword")
                kwargs["inplace"] = args[2]
            warn_deprecated(
                f"{name}(p, block_size, inplace) is deprecated and will be removed in the next "
                f"release; the order is now {name}(p, inplace, *, block_size=...): pass "
                f"block_size={args[1]!r} by keyword",
                stacklevel=2,
            )
            args = args[:1]
        init(self, *args, **kwargs)

    return cast(_Init, wrapper)


class _DropBlockBase(_DropoutBase):
    """Holds ``block_size`` and the layout / mask options shared by the three ranks.

    The arguments are ordered as every module's, ``(p, inplace, *, options)``, and as the
    functionals' ``drop_block*d(input, p, training, inplace, *, block_size, ...)``.
    """

    _functional: ClassVar[Callable[..., torch.Tensor]]

    @_accept_positional_block_size
    def __init__(
        self,
        p: float = 0.1,
        inplace: bool = False,
        *,
        block_size: int = 7,
        channels_last: bool = False,
        shared_channels: bool = False,
        per_sample_renorm: bool = False,
        exact_rate: bool = False,
    ) -> None:
        super().__init__(p, inplace)
        self.block_size = _check_block_size(block_size)
        self.channels_last = check_bool(channels_last, "channels_last")
        self.shared_channels = check_bool(shared_channels, "shared_channels")
        self.per_sample_renorm = check_bool(per_sample_renorm, "per_sample_renorm")
        self.exact_rate = check_bool(exact_rate, "exact_rate")

    def extra_repr(self) -> str:
        extra = f"p={self.p}, inplace={self.inplace}, block_size={self.block_size}"
        for name in ("channels_last", "shared_channels", "per_sample_renorm", "exact_rate"):
            if getattr(self, name):
                extra += f", {name}=True"
        return extra

    def _options(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "channels_last": self.channels_last,
            "shared_channels": self.shared_channels,
            "per_sample_renorm": self.per_sample_renorm,
            "exact_rate": self.exact_rate,
        }


class DropBlock1d(_DropBlockBase):
    r"""DropBlock on 1-D feature maps: zero contiguous runs of ``block_size`` positions.

    The 1-D case of :class:`DropBlock2d` (see there for the math): seeds
    :math:`\sim \mathrm{Bernoulli}(\gamma)` with
    :math:`\gamma = \frac{p}{b}\,\frac{L}{L - b + 1}` are drawn where a whole block fits, each
    drops positions ``[i, i + b)``, and the kept units are rescaled by
    ``numel(mask) / sum(mask)``.

    Args:
        p: target fraction of dropped units (``1 - keep_prob`` of the paper). Default: 0.1
        inplace: write the result into the input. Default: ``False``
        block_size: block length :math:`b`, clamped to ``L`` for shorter inputs (keyword-only;
            see :class:`DropBlock2d` for the former positional order). Default: 7
        channels_last: the channel axis is the last one, ``(N, L, C)``. Default: ``False``
        shared_channels: one mask per sample shared by all channels (timm's default, not the
            paper's). Default: ``False``
        per_sample_renorm: rescale each sample by its own kept fraction instead of the batch's.
            Default: ``False``
        exact_rate: solve :math:`\gamma` numerically so that the expected fraction of dropped
            units is exactly :math:`p`, instead of the paper's formula (which realises slightly
            less, e.g. 0.094 for p = 0.1, block 7 on 32 x 32). Default: ``False``

    Shape:
        - Input: :math:`(N, C, L)` or :math:`(C, L)`; with ``channels_last``, :math:`(N, L, C)` or
          :math:`(L, C)`. Any other rank is an error.
        - Output: same shape as the input.

    Examples::

        >>> import torch
        >>> from dropkit.nn.dropblock import DropBlock1d
        >>> m = DropBlock1d(p=0.2, block_size=3)
        >>> m(torch.randn(4, 8, 50), seed=0).shape
        torch.Size([4, 8, 50])

    Reference: Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
    NeurIPS 2018.
    """

    _functional = staticmethod(drop_block1d)


class DropBlock2d(_DropBlockBase):
    r"""DropBlock: zero contiguous ``block_size`` x ``block_size`` regions of each feature map.

    Element dropout barely regularizes convolutional features, because neighbouring activations
    carry the same information; DropBlock drops whole square regions instead.  Following
    Algorithm 1 of the paper, for an :math:`H \times W` map and block size :math:`b` (clamped to
    each axis, :math:`b_h = \min(b, H)`, :math:`b_w = \min(b, W)`):

    1. seeds :math:`s \sim \mathrm{Bernoulli}(\gamma)` are drawn only in the valid region
       :math:`(H - b_h + 1) \times (W - b_w + 1)` where a whole block fits, with

       .. math::
           \gamma = \frac{p}{b_h b_w}\,\frac{H}{H - b_h + 1}\,\frac{W}{W - b_w + 1}

       clipped to :math:`[0, 1]`, so that :math:`\gamma` times the mean number of seeds covering a
       unit equals :math:`p` (the realised fraction is slightly below :math:`p` because blocks may
       overlap: a unit covered by :math:`n` seed positions is dropped with probability
       :math:`1 - (1 - \gamma)^n \le n\gamma`; ``exact_rate=True`` solves
       :math:`\operatorname{mean}_j\,[1 - (1 - \gamma)^{n_j}] = p` for :math:`\gamma` instead);
    2. a seed at :math:`(i, j)` drops the block :math:`[i, i + b_h) \times [j, j + b_w)`, i.e.
       :math:`\text{mask} = 1 - \text{maxpool}(s, b, \text{stride } 1)` aligned so that no block
       hangs off the map, for odd and even :math:`b` alike;
    3. :math:`y = x \odot \text{mask} \cdot \text{numel}(\text{mask}) / \text{sum}(\text{mask})`
       (computed in float32 for half inputs; all dropped gives zeros, never NaN).

    Masks are drawn per (sample, channel), as in the paper and the official TensorFlow code.
    timm's ``DropBlock2d`` shares one mask over all channels by default and calls this "per the
    paper": it is not.  ``shared_channels=True`` gives that variant.  The paper also ramps
    ``keep_prob`` linearly from 1 to its target over training; schedule ``p`` for that.
    Seeds come from dropkit's counter-based engine, so ``seed=`` or ``generator=`` reproduce a
    mask exactly.  Eval mode and ``p = 0`` return the input itself.  Under ``torch.compile``
    :math:`\gamma` (formula or bisection) is computed from ``p_tensor`` when the graph runs, so
    ramping ``p`` (:class:`dropkit.schedules.DropBlockRamp`) does not recompile the model.

    The arguments follow every module's order, ``(p, inplace, *, options)``, and the
    functional's (``block_size`` is keyword-only in both).  The former order
    ``DropBlock2d(p, block_size, inplace)`` is accepted for one release with a
    ``DeprecationWarning``: an int (not a bool) in the ``inplace`` slot is read as the old
    positional ``block_size``, and a third positional argument as ``inplace``.

    Args:
        p: target fraction of dropped units (``1 - keep_prob`` of the paper). Default: 0.1
        inplace: write the result into the input. Default: ``False``
        block_size: side :math:`b` of the square block, clamped to each axis (keyword-only).
            Default: 7
        channels_last: the channel axis is the last one, ``(N, H, W, C)``. Default: ``False``
        shared_channels: one mask per sample shared by all channels (timm's default, not the
            paper's). Default: ``False``
        per_sample_renorm: rescale each sample by its own kept fraction instead of the batch's.
            Default: ``False``
        exact_rate: solve :math:`\gamma` numerically so that the expected fraction of dropped
            units is exactly :math:`p`, instead of the paper's formula (which realises slightly
            less, e.g. 0.094 for p = 0.1, block 7 on 32 x 32). Default: ``False``

    Shape:
        - Input: :math:`(N, C, H, W)` or :math:`(C, H, W)`; with ``channels_last``,
          :math:`(N, H, W, C)` or :math:`(H, W, C)`. Any other rank is an error.
        - Output: same shape as the input.

    Examples::

        >>> import torch
        >>> from dropkit.nn.dropblock import DropBlock2d
        >>> m = DropBlock2d(p=0.1, block_size=7)
        >>> m
        DropBlock2d(p=0.1, inplace=False, block_size=7)
        >>> x = torch.ones(2, 4, 32, 32)
        >>> y = m(x, seed=0)
        >>> y.shape
        torch.Size([2, 4, 32, 32])
        >>> bool(torch.isclose(y.mean(), x.mean()))  # numel / sum renormalisation
        True
        >>> m.eval()(x) is x
        True

    Reference: Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
    NeurIPS 2018.
    """

    _functional = staticmethod(drop_block2d)


class DropBlock3d(_DropBlockBase):
    r"""DropBlock on 3-D feature maps: zero contiguous ``block_size`` cubes.

    The 3-D case of :class:`DropBlock2d` (see there for the math):
    :math:`\gamma = \frac{p}{b_d b_h b_w}\prod_a \frac{F_a}{F_a - b_a + 1}` over the three axes.

    Args:
        p: target fraction of dropped units (``1 - keep_prob`` of the paper). Default: 0.1
        inplace: write the result into the input. Default: ``False``
        block_size: side of the cubic block, clamped to each axis (keyword-only; see
            :class:`DropBlock2d` for the former positional order). Default: 7
        channels_last: the channel axis is the last one, ``(N, D, H, W, C)``. Default: ``False``
        shared_channels: one mask per sample shared by all channels (timm's default, not the
            paper's). Default: ``False``
        per_sample_renorm: rescale each sample by its own kept fraction instead of the batch's.
            Default: ``False``
        exact_rate: solve :math:`\gamma` numerically so that the expected fraction of dropped
            units is exactly :math:`p`, instead of the paper's formula (which realises slightly
            less, e.g. 0.094 for p = 0.1, block 7 on 32 x 32). Default: ``False``

    Shape:
        - Input: :math:`(N, C, D, H, W)` or :math:`(C, D, H, W)`; with ``channels_last``,
          :math:`(N, D, H, W, C)` or :math:`(D, H, W, C)`. Any other rank is an error.
        - Output: same shape as the input.

    Examples::

        >>> import torch
        >>> from dropkit.nn.dropblock import DropBlock3d
        >>> m = DropBlock3d(p=0.1, block_size=3)
        >>> m(torch.randn(2, 4, 8, 8, 8), seed=0).shape
        torch.Size([2, 4, 8, 8, 8])

    Reference: Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks",
    NeurIPS 2018.
    """

    _functional = staticmethod(drop_block3d)
