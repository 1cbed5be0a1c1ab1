"""Private base classes: RNG bookkeeping, validation and ``extra_repr`` for every random layer."""

from __future__ import annotations

from typing import Any

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


class _DropoutBase(_RandomLayer):
    """Holds and validates ``p`` and ``inplace``; subclasses add their own options."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = check_probability(p)
        self.inplace = check_bool(inplace, "inplace")

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
