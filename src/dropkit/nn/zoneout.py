"""Zoneout: recurrent units that randomly keep their previous value (wraps ``nn.LSTMCell``, ...)."""

from __future__ import annotations

import torch
from torch import nn

from dropkit._deprecation import renamed_arguments
from dropkit._validation import check_bool, check_floating_tensor
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.functional.zoneout import zoneout_states
from dropkit.nn._base import RateAttribute, _ProbabilityRate, _RandomLayer
from dropkit.nn.weight_drop import make_state_dict_transparent

__all__ = ["ZoneoutCell"]

_Cell = nn.LSTMCell | nn.GRUCell | nn.RNNCell
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class ZoneoutCell(_ProbabilityRate, _RandomLayer):
    r"""Zoneout around an ``nn.LSTMCell``, ``nn.GRUCell`` or ``nn.RNNCell``.

    The wrapped cell computes the candidate state :math:`\tilde h_t` from :math:`x_t` and
    :math:`h_{t-1}`; while training each unit then keeps its previous value with probability
    :math:`z` (it is "zoned out") and takes the candidate otherwise:

    .. math::

        h_t = d_t \odot h_{t-1} + (1 - d_t) \odot \tilde h_t, \qquad
        d_t \sim \mathrm{Bernoulli}(z),

    and in eval the expectation :math:`h_t = z\,h_{t-1} + (1 - z)\,\tilde h_t`.  For an LSTM
    the hidden state :math:`h` (rate ``p``) and the memory cell :math:`c` (rate ``cell_p``) are
    zoned out with independent masks (Krueger et al. use :math:`z_c = 0.5`, :math:`z_h = 0.05`
    for character-level Penn Treebank).  Unlike dropout, nothing is rescaled: a zoned-out unit
    carries its exact previous value, and gradients flow through it to earlier steps.

    Every training call draws a fresh key (a new mask per time step); :meth:`sequence` runs the
    cell over a whole ``(T, B, I)`` sequence.  ``state_dict`` holds the cell's own keys
    (``weight_ih``, ...), so the wrapper loads checkpoints of the plain cell and the reverse.

    ``torch.compile``: a step traces into one graph (``fullgraph=True``) that reads ``p`` and
    ``cell_p`` from ``p_tensor`` / ``cell_p_tensor`` when it runs, so assigning them does not
    recompile; training masks are the eager ones, and the eval expectation rounds ``p`` and
    ``1 - p`` as the float path does.

    Args:
        module: the ``nn.LSTMCell``, ``nn.GRUCell`` or ``nn.RNNCell`` to wrap, held as
            ``self.module``. (Formerly ``cell``, a deprecated keyword alias for one release.)
        p: zoneout probability :math:`z_h` of the hidden state, in ``[0, 1]``. Default: 0.1
        cell_p: zoneout probability :math:`z_c` of an LSTM's memory cell; ``None`` means
            ``p``; only for ``nn.LSTMCell``. Default: ``None``

    Shape:
        - Input: :math:`(B, I)` or unbatched :math:`(I)`; state ``hx`` as for the wrapped cell
          (``(h, c)`` for an LSTM cell, ``h`` otherwise; zeros if ``None``).
        - Output: the new state, shaped like the wrapped cell's.

    Examples::

        >>> from dropkit.nn.zoneout import ZoneoutCell
        >>> dropkit.manual_seed(0)
        >>> m = ZoneoutCell(torch.nn.LSTMCell(4, 6), p=0.05, cell_p=0.5)
        >>> x = torch.randn(3, 4)
        >>> h, c = m(x)
        >>> h.shape, c.shape
        (torch.Size([3, 6]), torch.Size([3, 6]))
        >>> out, (h, c) = m.sequence(torch.randn(7, 3, 4))  # (T, B, I) -> (T, B, H)
        >>> out.shape
        torch.Size([7, 3, 6])
        >>> g = ZoneoutCell(torch.nn.GRUCell(4, 6), p=0.1).eval()
        >>> h0, h1 = torch.zeros(3, 6), g.module(x)
        >>> torch.allclose(g(x), 0.9 * h1 + 0.1 * h0)  # eval: the expectation
        True

    Per call, ``m(x, hx, seed=123)`` or ``m(x, hx, generator=g)`` fix the masks explicitly.

    Reference: Krueger et al., "Zoneout: Regularizing RNNs by Randomly Preserving Hidden
    Activations", ICLR 2017.
    """

    module: _Cell
    cell_p = RateAttribute(doc="The zoneout probability of an LSTM's memory cell, in ``[0, 1]``.")
    cell_p_tensor: torch.Tensor

    @renamed_arguments(cell="module")
    def __init__(self, module: nn.Module, p: float = 0.1, cell_p: float | None = None) -> None:
        super().__init__()
        if not isinstance(module, (nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
            raise TypeError(
                f"module must be an nn.LSTMCell, nn.GRUCell or nn.RNNCell, got {type(module).__name__}"
            )
        self.p = p
        if cell_p is not None and not isinstance(module, nn.LSTMCell):
            raise ValueError(
                f"cell_p applies to nn.LSTMCell only, got cell_p={cell_p!r} for {type(module).__name__}"
            )
        self.cell_p = self.p if cell_p is None else cell_p
        self.module = module
        make_state_dict_transparent(self)

    def _rates(self, count: int) -> list[torch.Tensor]:
        """The rate holders of the ``count`` states (h, then c): read when the op runs."""
        return [self.p_tensor, self.cell_p_tensor][:count]

    def extra_repr(self) -> str:
        if isinstance(self.module, nn.LSTMCell):
            return f"p={self.p}, cell_p={self.cell_p}"
        return f"p={self.p}"

    def _zeros(self, input: torch.Tensor) -> torch.Tensor:
        shape = (*input.shape[:-1], self.module.hidden_size)
        return torch.zeros(shape, dtype=input.dtype, device=input.device)

    def forward(
        self,
        input: torch.Tensor,
        hx: State | None = None,
        *,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> State:
        """One step: the new state; ``seed`` (int or key) or ``generator`` fix the masks."""
        if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"ZoneoutCell expects (B, I) or unbatched (I) input, got {shape}")
        check_floating_tensor(input)
        check_seed(seed, generator)
        if isinstance(self.module, nn.LSTMCell):
            if hx is None:
                hx = (self._zeros(input), self._zeros(input))
            if not isinstance(hx, tuple) or len(hx) != 2:
                raise TypeError(f"hx of an LSTM cell must be a tuple (h, c) or None, got {type(hx).__name__}")
            check_floating_tensor(hx[0], "hx[0]")
            check_floating_tensor(hx[1], "hx[1]")
            seed = self._key(input, seed, generator) if self.training else seed
            new_h, new_c = self.module(input, hx)
            h, c = self._zoneout(hx, (new_h, new_c), seed, generator)
            return h, c
        if hx is None:
            hx = self._zeros(input)
        if not isinstance(hx, torch.Tensor):
            raise TypeError(
                f"hx of a {type(self.module).__name__} must be a tensor or None, got {type(hx).__name__}"
            )
        check_floating_tensor(hx, "hx")
        seed = self._key(input, seed, generator) if self.training else seed
        (h,) = self._zoneout((hx,), (self.module(input, hx),), seed, generator)
        return h

    def _zoneout(
        self,
        prev: tuple[torch.Tensor, ...],
        new: tuple[torch.Tensor, ...],
        seed: SeedLike,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, ...]:
        return zoneout_states(
            prev, new, self._rates(len(prev)), self.training, seed=seed, generator=generator
        )

    def sequence(
        self,
        input: torch.Tensor,
        hx: State | None = None,
        *,
        batch_first: bool = False,
        seed: SeedLike = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Run the cell over ``(T, B, I)`` input (``(B, T, I)`` with ``batch_first``, or unbatched
        ``(T, I)``); return the hidden states of every step, ``(T, B, H)`` (``(B, T, H)``), and
        the final state.

        Without ``seed``/``generator`` every step draws the layer's next key; with them, step
        ``t`` uses the key ``[seed, stream, step + t]`` of the given (or generated) key, so the
        whole sequence is reproducible from one seed.
        """
        check_bool(batch_first, "batch_first")
        check_seed(seed, generator)
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(
                f"ZoneoutCell.sequence expects (T, B, I), (B, T, I) or (T, I) input, got {shape}"
            )
        steps = input.movedim(1, 0) if batch_first and input.dim() == 3 else input
        if steps.shape[0] == 0:
            raise ValueError("ZoneoutCell.sequence needs at least one time step, got T = 0")
        base = None
        if self.training and (seed is not None or generator is not None):
            base = resolve_key(steps, seed, generator)
        state = hx
        outputs = []
        for t in range(steps.shape[0]):
            key = None if base is None else base + torch.tensor([0, 0, t], device=base.device)
            new_state = self(steps[t], state, seed=key)
            outputs.append(new_state[0] if isinstance(new_state, tuple) else new_state)
            state = new_state
        stacked = torch.stack(outputs)
        return (stacked.movedim(0, 1) if batch_first and input.dim() == 3 else stacked), new_state
