"""Private base classes: RNG bookkeeping, validation and ``extra_repr`` for every random layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from dropkit._validation import check_bool, check_probability
from dropkit.engine.streams import allocate_stream, draw_key, register_step_owner
from dropkit.functional._common import SeedLike
from dropkit.functional.dropout import TENSOR_RATE_VARIANTS


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
        functional, rate = self._functional_and_rate()
        return functional(
            input,
            rate,
            self.training,
            self.inplace,
            seed=seed,
            generator=generator,
            **self._options(),
        )

    def _functional_and_rate(self) -> tuple[Callable[..., torch.Tensor], float | torch.Tensor]:
        """The op this call runs and its rate argument."""
        return type(self)._functional, self._rate()


class _DropoutBase(_UnaryRandomLayer):
    """Holds and validates ``p`` and ``inplace``; subclasses add their own options.

    ``p`` is a float property, validated on every assignment and mirrored in place into
    ``p_tensor``, a float64 CPU tensor of shape ``(1,)`` (a plain attribute: not a buffer, not in
    ``state_dict``, not moved or cast by ``.to()``; not 0-dim, which dynamo would turn into a
    symbolic float).  Where the functional has a tensor-rate
    variant (``Dropout``, ``Dropout1d/2d/3d``), a compiled forward reads ``p_tensor`` as a graph
    input, so assigning ``p`` between calls of a ``torch.compile``-d model (a rate schedule)
    changes the rate without recompiling; eager forwards use the float.
    """

    _tensor_rate_functional: ClassVar[Callable[..., torch.Tensor] | None] = None
    _p: float
    p_tensor: torch.Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The variant of the functional that takes p as a tensor, where there is one.
        functional = getattr(cls, "_functional", None)
        cls._tensor_rate_functional = None if functional is None else TENSOR_RATE_VARIANTS.get(functional)

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = p
        self.inplace = check_bool(inplace, "inplace")

    @property
    def p(self) -> float:
        """The drop probability, in ``[0, 1]``."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        value = check_probability(value)
        self.__dict__["_p"] = value
        holder = self.__dict__.get("p_tensor")
        if holder is None or holder.is_inference():
            self.__dict__["p_tensor"] = torch.tensor([value], dtype=torch.float64)
        else:
            holder.fill_(value)  # in place: compiled graphs hold this tensor as an input

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def _rate(self) -> float:
        return self.p

    def _functional_and_rate(self) -> tuple[Callable[..., torch.Tensor], float | torch.Tensor]:
        variant = type(self)._tensor_rate_functional
        if variant is not None and torch.compiler.is_compiling():
            return variant, self.p_tensor  # a graph input: a new p needs no recompilation
        return super()._functional_and_rate()

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_p" not in state and "p" in state:  # pickled before p became a property
            state = dict(state)
            state["_p"] = state.pop("p")
            state["p_tensor"] = torch.tensor([state["_p"]], dtype=torch.float64)
        super().__setstate__(state)


class _ChannelDropoutBase(_DropoutBase):
    """Adds ``channels_last`` (the channel axis is the last one) to a channel-mask layer."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, channels_last: bool = False) -> None:
        super().__init__(p, inplace)
        self.channels_last = check_bool(channels_last, "channels_last")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def _options(self) -> dict[str, Any]:
        return {"channels_last": self.channels_last}
