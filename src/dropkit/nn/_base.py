"""Private base classes: RNG bookkeeping, validation and ``extra_repr`` for every random layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from dropkit._validation import check_bool, check_probability
from dropkit.engine.streams import allocate_stream, draw_key, register_step_owner
from dropkit.functional._common import SeedLike


class _RandomLayer(nn.Module):
    """A module that owns an RNG stream and a step counter.

    ``rng_stream`` is assigned in construction order (restarted by :func:`dropkit.manual_seed`);
    ``rng_step`` is a non-persistent int64 buffer that counts training forwards, so it follows
    ``.to(device)`` but stays out of ``state_dict`` (a dropkit model loads checkpoints of the same
    model built with ``torch.nn`` dropout, and vice versa).
    """

    rng_step: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.rng_stream = allocate_stream()
        self.register_buffer("rng_step", torch.zeros(1, dtype=torch.int64), persistent=False)
        register_step_owner(self)

    def reset_rng_step(self) -> None:
        with torch.no_grad():
            self.rng_step.zero_()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        register_step_owner(self)  # copies and unpickled layers follow manual_seed too

    def _key(self, input: torch.Tensor, seed: SeedLike, generator: torch.Generator | None) -> SeedLike:
        """The key for a training forward: the per-call override, else this layer's next draw."""
        if seed is not None or generator is not None or not isinstance(input, torch.Tensor):
            return seed
        return draw_key(self.rng_stream, self.rng_step).to(input.device)


class _UnaryRandomLayer(_RandomLayer):
    """A layer of one input that wraps a functional op, called as
    ``op(input, rate, training, inplace, *, seed=, generator=, **self._options())``."""

    _functional: ClassVar[Callable[..., torch.Tensor]]
    inplace: bool

    def _rate(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define _rate")

    def _options(self) -> dict[str, Any]:
        """Keyword options of the functional op besides the rate and the randomness."""
        return {}

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Apply the layer; ``seed`` (int or key) or ``generator`` fix the randomness of this call."""
        if self.training:
            seed = self._key(input, seed, generator)
        functional = type(self)._functional
        return functional(
            input,
            self._rate(),
            self.training,
            self.inplace,
            seed=seed,
            generator=generator,
            **self._options(),
        )


class _DropoutBase(_UnaryRandomLayer):
    """Holds and validates ``p`` and ``inplace``; subclasses add their own options."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.inplace = check_bool(inplace, "inplace")

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def _rate(self) -> float:
        return self.p


class _ChannelDropoutBase(_DropoutBase):
    """Adds ``channels_last`` (the channel axis is the last one) to a channel-mask layer."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, channels_last: bool = False) -> None:
        super().__init__(p, inplace)
        self.channels_last = check_bool(channels_last, "channels_last")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def _options(self) -> dict[str, Any]:
        return {"channels_last": self.channels_last}
