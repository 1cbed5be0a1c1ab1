"""Private base classes: RNG bookkeeping, validation and ``extra_repr`` for every random layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from dropkit._validation import check_bool, check_probability
from dropkit.engine.streams import allocate_stream, draw_key, register_step_owner
from dropkit.functional._common import SeedLike
from dropkit.functional._tensor_rate import TENSOR_RATE_VARIANTS


def _mirror_rate(module: object, name: str, value: float) -> None:
    """Store the validated ``value`` as ``module._<name>`` and, in place, in ``module.<name>_tensor``
    (created on first use, and again if it was made in inference mode, where it cannot be filled)."""
    module.__dict__[f"_{name}"] = value
    holder = module.__dict__.get(f"{name}_tensor")
    if holder is None or holder.is_inference():
        module.__dict__[f"{name}_tensor"] = torch.tensor([value], dtype=torch.float64)
    else:
        holder.fill_(value)  # in place: compiled graphs hold this tensor as an input


class _RandomLayer(nn.Module):
    """A module that owns an RNG stream and a step counter.

    ``rng_stream`` is assigned in construction order (restarted by :func:`dropkit.manual_seed`);
    ``rng_step`` is a non-persistent int64 buffer that counts training forwards, so it follows
    ``.to(device)`` but stays out of ``state_dict`` (a dropkit model loads checkpoints of the same
    model built with ``torch.nn`` dropout, and vice versa).

    ``_tensor_rates`` names the float rates a layer mirrors into ``<name>_tensor`` holders (see
    :class:`_ProbabilityRate`); :meth:`_rate_is_graph_input` says which of them a compiled
    forward reads from the holder, so that assigning them never recompiles.
    """

    rng_step: torch.Tensor
    _tensor_rates: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.rng_stream = allocate_stream()
        self.register_buffer("rng_step", torch.zeros(1, dtype=torch.int64), persistent=False)
        register_step_owner(self)

    def reset_rng_step(self) -> None:
        with torch.no_grad():
            self.rng_step.zero_()

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in type(self)._tensor_rates:
            if f"_{name}" not in state and name in state:  # pickled before the rate became a property
                state = dict(state)
                state[f"_{name}"] = value = state.pop(name)
                state[f"{name}_tensor"] = torch.tensor([value], dtype=torch.float64)
        super().__setstate__(state)
        register_step_owner(self)  # copies and unpickled layers follow manual_seed too

    def _rate_is_graph_input(self, attribute: str) -> bool:
        """Whether a compiled forward reads ``attribute`` from a tensor (no recompile when it changes)."""
        return attribute in type(self)._tensor_rates

    def _key(self, input: torch.Tensor, seed: SeedLike, generator: torch.Generator | None) -> SeedLike:
        """The key for a training forward: the per-call override, else this layer's next draw."""
        if seed is not None or generator is not None or not isinstance(input, torch.Tensor):
            return seed
        return draw_key(self.rng_stream, self.rng_step).to(input.device)


class _UnaryRandomLayer(_RandomLayer):
    """A layer of one input that wraps a functional op, called as
    ``op(input, rate, training, inplace, *, seed=, generator=, **self._options())``."""

    _functional: ClassVar[Callable[..., torch.Tensor]]
    _tensor_rate_functional: ClassVar[Callable[..., torch.Tensor] | None] = None
    inplace: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The variant of the functional that takes the rate as a tensor, where there is one.
        functional = getattr(cls, "_functional", None)
        cls._tensor_rate_functional = None if functional is None else TENSOR_RATE_VARIANTS.get(functional)

    def _rate(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define _rate")

    def _rate_tensor(self) -> torch.Tensor:
        """The one-element float64 holder that mirrors :meth:`_rate`."""
        raise NotImplementedError(f"{type(self).__name__} must define _rate_tensor")

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
        """The op this call runs and its rate argument: the tensor-rate variant and the holder
        while ``torch.compile`` traces (a graph input: a new rate needs no recompilation), the
        functional and the float otherwise."""
        variant = type(self)._tensor_rate_functional
        if variant is not None and torch.compiler.is_compiling():
            return variant, self._rate_tensor()
        return type(self)._functional, self._rate()

    def _rate_is_graph_input(self, attribute: str) -> bool:
        return super()._rate_is_graph_input(attribute) and type(self)._tensor_rate_functional is not None


class _ProbabilityRate:
    """Mixin for a :class:`_RandomLayer`: ``p`` as a float property, validated on every assignment
    and mirrored in place into ``p_tensor``, a float64 CPU tensor of shape ``(1,)``.

    ``p_tensor`` is a plain attribute: not a buffer, not in ``state_dict``, not moved or cast by
    ``.to()``; not 0-dim, which dynamo would turn into a symbolic float.  A compiled forward
    passes it to the tensor-rate variant of the layer's functional (see
    :mod:`dropkit.functional._tensor_rate`), which reads it when the graph runs.
    """

    _tensor_rates: ClassVar[tuple[str, ...]] = ("p",)
    _p: float
    p_tensor: torch.Tensor

    @property
    def p(self) -> float:
        """The rate, in ``[0, 1]``."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        _mirror_rate(self, "p", check_probability(value))


class _DropoutBase(_ProbabilityRate, _UnaryRandomLayer):
    """Holds and validates ``p`` and ``inplace``; subclasses add their own options.

    ``p`` is a float property mirrored into ``p_tensor`` (see :class:`_ProbabilityRate`).  Every
    subclass's functional has a tensor-rate variant (``Dropout``, ``Dropout1d/2d/3d``,
    ``AlphaDropout``, ``FeatureAlphaDropout``, ``GaussianDropout``, ``DropBlock1d/2d/3d``,
    ``DropPath``), so a compiled forward reads ``p_tensor`` as a graph input and assigning ``p``
    between calls of a ``torch.compile``-d model (a rate schedule) changes the rate without
    recompiling, with the eager masks and outputs bit for bit; eager forwards use the float.
    Outside this family ``GaussianNoise`` (its ``std``), ``ResidualDropout``,
    ``BiasDropoutAdd``, ``ScaledDotProductAttention`` (engine path), ``StochasticDepth``,
    ``LockedDropout`` (tensor input), ``EmbeddingDropout``, ``WeightDrop``, ``DropConnect`` and
    ``ZoneoutCell`` (``p`` and ``cell_p``) do the same; ``LayerDrop`` cannot (its skipped layers are a Python
    branch) and keeps a float.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = p
        self.inplace = check_bool(inplace, "inplace")

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"

    def _rate(self) -> float:
        return self.p

    def _rate_tensor(self) -> torch.Tensor:
        return self.p_tensor


class _ChannelDropoutBase(_DropoutBase):
    """Adds ``channels_last`` (the channel axis is the last one) to a channel-mask layer."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, channels_last: bool = False) -> None:
        super().__init__(p, inplace)
        self.channels_last = check_bool(channels_last, "channels_last")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def _options(self) -> dict[str, Any]:
        return {"channels_last": self.channels_last}
