"""Plumbing shared by the functional ops: key resolution, argument checks, in-place results."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dropkit._validation import (
    check_bool,
    check_floating_tensor,
    check_probability,
    check_probability_tensor,
    check_tensor,
)
from dropkit.engine.numerics import (
    THRESHOLD_SCALE,
    compute_dtype,
    drop_threshold_tensor,
    realised_keep_probability,
)
from dropkit.engine.streams import draw_functional_key, key_from_generator, make_key, to_device_async
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate, checked_rate, refuse_jit_trace, zeros_like_connected

SeedLike = int | torch.Tensor | None


def check_rate(
    p: object,
    name: str = "p",
    check: Callable[[object, str], float] = check_probability,
    *,
    read: bool = True,
) -> Rate:
    """A rate argument: a float validated by ``check`` now, or a one-element floating-point tensor
    whose value is validated when it is read (in a compiled graph: when the graph runs).

    A tensor's value is read here (:func:`~dropkit.ops.checked_rate`) unless ``read=False``: for
    a caller that passes it to an op that reads and validates it itself (a :class:`RateOp`), and
    calls :func:`read_rate` on every path that does not."""
    if isinstance(p, torch.Tensor):
        check_probability_tensor(p, name)
        return checked_rate(p, name, check is check_probability) if read else p
    if type(p) is float and 0.0 <= p <= 1.0 and check is check_probability:
        return p  # the common case, kept lean: what the check returns for it
    return check(p, name)


def read_rate(p: Rate, name: str = "p") -> Rate:
    """A probability from ``check_rate(..., read=False)`` with a tensor's value validated now
    (:func:`~dropkit.ops.checked_rate`), where no op reads it."""
    return checked_rate(p, name) if isinstance(p, torch.Tensor) else p


def is_zero(rate: Rate) -> bool:
    """``rate`` is the float 0: nothing to do.  A tensor rate is never read here (a compiled graph
    must not branch on it); the op computes the identity for it instead."""
    return not isinstance(rate, torch.Tensor) and rate == 0.0


def keep_probability(p: Rate) -> Rate:
    """The realised keep probability of ``p`` (the engine's, see
    :func:`~dropkit.engine.numerics.realised_keep_probability`) in float64, as a float or a
    0-dim tensor."""
    if isinstance(p, torch.Tensor):
        return (THRESHOLD_SCALE - drop_threshold_tensor(p.reshape(()))).to(torch.float64) / THRESHOLD_SCALE
    return realised_keep_probability(p)


def check_common(input: object, training: object, inplace: object, *, floating: bool = True) -> torch.Tensor:
    """Check the flags and the input: a floating-point tensor, or (``floating=False``, for ops that
    pass other dtypes through where they are the identity, see :func:`passes_through`) any tensor."""
    # Every call passes here: the common case costs type tests, the checks run to raise.
    if type(training) is not bool or type(inplace) is not bool:
        check_bool(training, "training")
        check_bool(inplace, "inplace")
    if floating:
        return check_floating_tensor(input)
    return input if isinstance(input, torch.Tensor) else check_tensor(input)


def passes_through(input: torch.Tensor, training: bool, p: Rate) -> bool:
    """Whether the call is the identity (eval mode, or the float rate 0), so that the op returns
    ``input`` itself: of any dtype, integer, bool and complex included, as torch's dropout family
    does.  Otherwise the op computes, and the input must be floating point (a TypeError naming
    its dtype).  Checks of the arguments come first: they hold in every mode."""
    if not training or is_zero(p):
        return True
    if not input.is_floating_point():
        raise TypeError(
            f"input must be a floating-point tensor, got dtype {input.dtype} (other dtypes pass "
            "through unchanged only where the op is the identity: training=False or p=0)"
        )
    return False


def resolve_key(input: torch.Tensor, seed: SeedLike, generator: torch.Generator | None) -> torch.Tensor:
    """The key of this call: explicit ``seed`` (int or key tensor), ``generator``, or the
    functional stream of the global seed."""
    if generator is None:
        if seed is None:
            return draw_functional_key(input.device)  # the draw refuses torch.jit.trace
        refuse_jit_trace()
        if isinstance(seed, torch.Tensor):
            if seed.dtype != torch.int64 or seed.shape != (3,):
                check_seed(seed, None)  # raises, saying what a key is
            # A layer's own key is on its step counter's device, the input's as a rule.
            return seed if seed.is_cpu and input.is_cpu else to_device_async(seed, input.device)
        check_seed(seed, None)
        return make_key(seed, device=input.device)
    refuse_jit_trace()
    check_seed(seed, generator)
    return to_device_async(key_from_generator(generator), input.device)


def finish(input: torch.Tensor, output: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Return ``output``, or write it into ``input`` (autograd-tracked) for ``inplace=True``."""
    if inplace:
        return input.copy_(output)
    return output


def drop_everything(input: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Exact zeros that stay connected to autograd (zero gradient), never ``input * 0`` (NaN for inf)."""
    return finish(input, zeros_like_connected(input), inplace)


def scale_by(input: torch.Tensor, factor: Rate, inplace: bool) -> torch.Tensor:
    """``input * factor`` computed in float32 (float64 for float64), the factor rounded once to
    that dtype, in place if asked; ``factor`` a float or a 0-dim float64 tensor."""
    compute = compute_dtype(input.dtype)
    if isinstance(factor, torch.Tensor):
        constant = factor.to(device=input.device, dtype=compute)
    else:
        constant = torch.tensor(factor, dtype=compute, device=input.device)
    return finish(input, (input.to(compute) * constant).to(input.dtype), inplace)
