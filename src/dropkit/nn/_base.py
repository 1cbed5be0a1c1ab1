"""Private base classes: RNG bookkeeping, validation and ``extra_repr`` for every random layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, overload

import torch
from torch import nn

from dropkit._validation import check_bool, check_probability
from dropkit.engine.streams import (
    allocate_copy_stream,
    allocate_stream,
    cloning_masks,
    draw_key,
    register_step_owner,
)
from dropkit.functional._common import SeedLike
from dropkit.functional._seed import check_seed
from dropkit.ops import eager_fast_path


def _mirror_rate(module: object, name: str, value: float) -> None:
    """Store the validated ``value`` as ``module._<name>`` and, in place, in ``module.<name>_tensor``
    (created on first use, and again if it was made in inference mode, where it cannot be filled)."""
    module.__dict__[f"_{name}"] = value
    holder = module.__dict__.get(f"{name}_tensor")
    if holder is None or holder.is_inference():
        module.__dict__[f"{name}_tensor"] = torch.tensor([value], dtype=torch.float64)
    else:
        holder.fill_(value)  # in place: compiled graphs hold this tensor as an input


class RateAttribute:
    """A rate of a random layer (``p``, ``std``, ``cell_p``): a float, validated on every
    assignment by ``check`` and mirrored in place into ``<name>_tensor``, a float64 CPU tensor of
    shape ``(1,)`` that the layer passes to its functional op.

    The op reads the holder's value when it runs, eagerly and in a compiled graph alike, so one
    code path serves both and assigning the rate between calls of a ``torch.compile``-d model (a
    rate schedule) neither recompiles nor specializes the graph.  The holder is a plain attribute:
    not a buffer, not in ``state_dict``, not moved or cast by ``.to()``; not 0-dim, which dynamo
    would turn into a symbolic float.
    """

    def __init__(self, check: Callable[[object, str], float] = check_probability, doc: str = "") -> None:
        self.check = check
        self.__doc__ = doc or "The rate, in ``[0, 1]``."

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, module: None, owner: type | None = None) -> RateAttribute: ...

    @overload
    def __get__(self, module: object, owner: type | None = None) -> float: ...

    def __get__(self, module: object | None, owner: type | None = None) -> float | RateAttribute:
        if module is None:
            return self
        value: float = module.__dict__[f"_{self.name}"]
        return value

    def __set__(self, module: object, value: object) -> None:
        _mirror_rate(module, self.name, self.check(value, self.name))


class _RandomLayer(nn.Module):
    """A module that owns an RNG stream and a step counter.

    ``rng_stream`` is assigned in construction order (restarted by :func:`dropkit.manual_seed`);
    ``rng_step`` is a non-persistent int64 buffer that counts training forwards, so it follows
    ``.to(device)`` but stays out of ``state_dict`` (a dropkit model loads checkpoints of the same
    model built with ``torch.nn`` dropout, and vice versa).

    Its rates are :class:`RateAttribute` s; ``_tensor_rates`` lists them (collected per class), and
    :meth:`_rate_is_graph_input` says which of them a compiled forward reads from the holder, so
    that assigning them never recompiles: all of them unless a layer says otherwise.
    """

    rng_step: torch.Tensor
    _tensor_rates: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._tensor_rates = tuple(
            name for klass in reversed(cls.__mro__) for name, value in vars(klass).items()
            if isinstance(value, RateAttribute)
        )  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.rng_stream = allocate_stream()
        self.register_buffer("rng_step", torch.zeros(1, dtype=torch.int64), persistent=False)
        register_step_owner(self)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this first: say what to use instead of a parse error.
        raise RuntimeError(
            f"{type(self).__name__} is not TorchScript-compatible (dropkit's ops are "
            "torch.library custom ops with Python keys and rates). Use torch.compile or "
            "torch.export; for inference only, dropkit.nn layers are the identity in eval mode"
        )

    def reset_rng_step(self) -> None:
        with torch.no_grad():
            self.rng_step.zero_()

    def rate_tensor(self, name: str = "p") -> torch.Tensor:
        """The one-element float64 holder of the rate ``name`` (what the forward passes to its op)."""
        holder: torch.Tensor = self.__dict__[name + "_tensor"]
        return holder

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in type(self)._tensor_rates:
            if f"_{name}" not in state and name in state:  # pickled before the rate became a property
                state = dict(state)
                state[f"_{name}"] = value = state.pop(name)
                state[f"{name}_tensor"] = torch.tensor([value], dtype=torch.float64)
        super().__setstate__(state)
        if not cloning_masks():
            # A copy (deepcopy, unpickling) draws its own masks unless cloning was asked for.
            self.rng_stream = allocate_copy_stream()
        register_step_owner(self)  # copies and unpickled layers follow manual_seed too

    def _rate_is_graph_input(self, attribute: str) -> bool:
        """Whether a compiled forward reads ``attribute`` from a tensor (no recompile when it changes)."""
        return attribute in type(self)._tensor_rates

    def _key(self, input: torch.Tensor, seed: SeedLike, generator: torch.Generator | None) -> SeedLike:
        """The key for a training forward: the per-call override, else this layer's next draw.

        The key is on the device of ``rng_step``; the functional op that takes it as ``seed``
        moves it to the input's device if they differ (without blocking the host).  The draw
        refuses ``torch.jit.trace``; the functional refuses it for an override."""
        if seed is not None or generator is not None or not isinstance(input, torch.Tensor):
            return seed
        # The buffer read from _buffers: what nn.Module.__getattr__ returns, without its ~1 us
        # fallback lookup (dynamo reads it either way).
        step: torch.Tensor = self._buffers["rng_step"]  # type: ignore[assignment]
        return draw_key(self.rng_stream, step)


class _UnaryRandomLayer(_RandomLayer):
    """A layer of one input that wraps a functional op, called as
    ``op(input, rate_tensor, training, inplace, *, seed=, generator=, **self._options())``."""

    _functional: ClassVar[Callable[..., torch.Tensor]]
    _rate_holder: ClassVar[str] = "p_tensor"  # the holder of the rate the op takes
    _rate_value: ClassVar[str] = "_p"  # the float it mirrors (derived from _rate_holder)
    # A layer of torch's dropout family returns its input itself at p = 0, as torch's do (of any
    # dtype): eagerly it passes the float 0, for which the op is a pass-through.
    _zero_rate_passes_through: ClassVar[bool] = False
    inplace: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._rate_value = "_" + cls._rate_holder.removesuffix("_tensor")

    def _options(self) -> dict[str, Any]:
        """Keyword options of the functional op besides the rate and the randomness, in a fresh
        dict (the forward adds ``seed`` and ``generator`` to it)."""
        return {}

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Apply the layer; ``seed`` (int or key) or ``generator`` fix the randomness of this call."""
        if seed is not None or generator is not None:
            check_seed(seed, generator)  # also where nothing is drawn (eval, p = 0)
        training = self.training
        if training:
            seed = self._key(input, seed, generator)  # torch.jit.trace is refused here
        holder = self._rate_holder
        if not eager_fast_path(input):
            # Where the op is traced (compile, export, FX, make_fx, a mode) it reads the holder: a
            # graph neither branches nor guards on the rate, and assigning the rate changes it
            # without a recompile.
            rate = self.__dict__[holder]
        else:
            # Eagerly the validated float, which the holder mirrors: the op need not read a
            # tensor (nor a jit trace record one).  The float 0 passes the input itself through,
            # which only a layer of torch's dropout family does; the others compute.
            rate = self.__dict__[self._rate_value]
            if rate == 0.0 and not self._zero_rate_passes_through:
                rate = self.__dict__[holder]
        options = self._options()  # a fresh dict: the randomness joins it, one mapping to pass
        options["seed"] = seed
        options["generator"] = generator
        return type(self)._functional(input, rate, training, self.inplace, **options)


class _ProbabilityRate:
    """Mixin for a :class:`_RandomLayer` whose rate is a probability ``p`` (a :class:`RateAttribute`)."""

    p = RateAttribute()
    p_tensor: torch.Tensor


class _DropoutBase(_ProbabilityRate, _UnaryRandomLayer):
    """Holds and validates ``p`` and ``inplace``; subclasses add their own options.

    ``p`` is a :class:`RateAttribute`: the forward passes its holder ``p_tensor`` to the
    functional op, which reads it when it runs, so assigning ``p`` between calls of a
    ``torch.compile``-d model (a rate schedule) changes the rate without recompiling, with the
    eager masks and outputs bit for bit.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        self.p = p
        self.inplace = check_bool(inplace, "inplace")

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class _ChannelDropoutBase(_DropoutBase):
    """Adds ``channels_last`` (the channel axis is the last one) to a channel-mask layer."""

    def __init__(self, p: float = 0.5, inplace: bool = False, *, channels_last: bool = False) -> None:
        super().__init__(p, inplace)
        self.channels_last = check_bool(channels_last, "channels_last")

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")

    def _options(self) -> dict[str, Any]:
        return {"channels_last": self.channels_last}
