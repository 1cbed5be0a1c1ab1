"""Locked (variational, time-tied) dropout for sequence models."""

from __future__ import annotations

from typing import overload

import torch
from torch.nn.utils.rnn import PackedSequence

from dropkit._validation import check_bool
from dropkit.functional._common import SeedLike
from dropkit.functional.locked import locked_dropout
from dropkit.nn._base import _ProbabilityRate, _RandomLayer

__all__ = ["LockedDropout"]


class LockedDropout(_ProbabilityRate, _RandomLayer):
    r"""Dropout with one mask per sequence, shared by all its time steps (variational dropout).

    While training, each sequence :math:`b` of the batch draws one mask
    :math:`r_b \sim \mathrm{Bernoulli}(q)^{H}`, :math:`q = 1 - p`, and every time step uses it:

    .. math::

        y_{t,b} = r_b \odot x_{t,b} / q \qquad \text{for all } t,

    so a unit dropped for a sequence is dropped at every step, as in the variational RNN of
    Gal & Ghahramani and AWD-LSTM's ``LockedDropout``.  The mask shape is :math:`(1, B, *)` for
    time-first input and :math:`(B, 1, *)` with ``batch_first=True`` (the same draws in the
    same order, so both layouts of one batch get the same masks).  Eval is the identity.

    * :class:`~torch.nn.utils.rnn.PackedSequence` input: sequence :math:`b` of the original
      (unsorted) batch gets the mask it would get in the padded batch, so
      ``pack(locked(padded)) == locked(pack(padded))`` for the same seed.  The output is a
      PackedSequence with the same ``batch_sizes``, ``sorted_indices`` and ``unsorted_indices``;
      ``batch_first`` does not apply.
    * ``padding_mask`` (bool, ``True`` = padded; :math:`(T, B)`, or :math:`(B, T)` with
      ``batch_first``): padded positions are left **exactly as they are** (not zeroed, not
      scaled), so whatever the padding holds survives; masks of real positions do not depend on
      it.

    ``torch.compile``: on tensor input the forward traces into one graph (``fullgraph=True``)
    that reads the rate from ``p_tensor`` when it runs, so assigning ``p`` does not recompile.
    PackedSequence input gathers its masks by the batch sizes, data the graph cannot hold: it
    graph-breaks and its rate stays a float constant (a changed ``p`` recompiles).

    Args:
        p: probability of a unit being zeroed for a whole sequence, in ``[0, 1]``. Default: 0.5
        inplace: write the result into the input (tensor input or the PackedSequence's data).
            Default: ``False``
        batch_first: input is :math:`(B, T, *)` instead of :math:`(T, B, *)`. Default: ``False``

    Shape:
        - Input: :math:`(T, B, *)`, :math:`(B, T, *)` with ``batch_first``, unbatched
          :math:`(T, *)` (any 2-D input), or a PackedSequence with data :math:`(N, *)`.
        - Output: the same shape (a PackedSequence for a PackedSequence).

    Examples::

        >>> from dropkit.nn.locked import LockedDropout
        >>> dropkit.manual_seed(0)
        >>> m = LockedDropout(p=0.5)
        >>> y = m(torch.ones(7, 3, 4))          # (T, B, H)
        >>> bool((y == y[0]).all())             # one mask per sequence, every step
        True
        >>> sorted(set(y.flatten().tolist())) # 0 or x / q
        [0.0, 2.0]
        >>> packed = torch.nn.utils.rnn.pack_sequence([torch.ones(3, 4), torch.ones(2, 4)])
        >>> m(packed).batch_sizes
        tensor([2, 2, 1])
        >>> m.eval()(y) is y
        True

    Per call, ``m(x, seed=123)`` or ``m(x, generator=g)`` fix the mask explicitly.

    Reference: Gal & Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent
    Neural Networks", NeurIPS 2016; Merity, Keskar, Socher, "Regularizing and Optimizing LSTM
    Language Models", ICLR 2018.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, batch_first: bool = False) -> None:
        super().__init__()
        self.p = p
        self.inplace = check_bool(inplace, "inplace")
        self.batch_first = check_bool(batch_first, "batch_first")

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}" + (", batch_first=True" if self.batch_first else "")

    @overload
    def forward(
        self,
        input: torch.Tensor,
        padding_mask: torch.Tensor | None = ...,
        *,
        seed: SeedLike = ...,
        generator: torch.Generator | None = ...,
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        input: PackedSequence,
        padding_mask: torch.Tensor | None = ...,
        *,
        seed: SeedLike = ...,
        generator: torch.Generator | None = ...,
    ) -> PackedSequence: ...

    def forward(
        self,
        input: torch.Tensor | PackedSequence,
        padding_mask: torch.Tensor | None = None,
        *,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | PackedSequence:
        """Apply the layer; ``seed`` (int or key) or ``generator`` fix the masks of this call."""
        if self.training:
            data = input.data if isinstance(input, PackedSequence) else input
            seed = self._key(data, seed, generator)
        return locked_dropout(
            input,
            self.p_tensor,
            self.training,
            self.inplace,
            batch_first=self.batch_first,
            padding_mask=padding_mask,
            seed=seed,
            generator=generator,
        )
