"""Zoneout as functions; documentation lives on :class:`dropkit.nn.zoneout.ZoneoutCell`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dropkit._validation import check_bool, check_floating_tensor, check_probability, check_probability_tensor
from dropkit.engine.masks import drop_threshold, random_bits16
from dropkit.engine.ops import compute_dtype
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._tensor_rate import rate_constants_op, register_tensor_rate_variant

__all__ = ["zoneout", "zoneout_states"]


def _expectation(prev: torch.Tensor, new: torch.Tensor, p: float) -> torch.Tensor:
    # Exact at the ends (no 0 * inf), p * prev + (1 - p) * new in between.
    if p == 0.0:
        return new
    if p == 1.0:
        return prev
    return prev * p + new * (1.0 - p)


def _check_states(
    prev: Sequence[torch.Tensor], new: Sequence[torch.Tensor], rates: Sequence[Any]
) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """``(prev[i], new[i], rates[i])`` after checking the lengths and each pair of states."""
    if not (len(prev) == len(new) == len(rates)) or not prev:
        raise ValueError(
            "prev, new and rates must have the same non-zero length, "
            f"got {len(prev)}, {len(new)}, {len(rates)}"
        )
    checked = []
    for i, (before, after, rate) in enumerate(zip(prev, new, rates, strict=True)):
        before = check_floating_tensor(before, f"prev[{i}]")
        after = check_floating_tensor(after, f"new[{i}]")
        if before.shape != after.shape:
            raise ValueError(
                f"prev[{i}] and new[{i}] must have the same shape, got {tuple(before.shape)} "
                f"and {tuple(after.shape)}"
            )
        checked.append((before, after, rate))
    return checked


def zoneout_states(
    prev: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    rates: Sequence[float],
    training: bool = True,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    r"""Zoneout of several states at once (an LSTM's ``h`` and ``c``), each with its own rate.

    State ``i`` keeps each unit of ``prev[i]`` with probability ``rates[i]`` and takes
    ``new[i]`` otherwise (eval: ``rates[i] * prev[i] + (1 - rates[i]) * new[i]``).  All masks
    come from one key: state ``i`` reads the 16-bit draws ``offset_i .. offset_i + numel_i - 1``
    and zones a unit out where the draw is below ``round(rates[i] * 2**16)``, so the masks are
    independent and ``zoneout_states((a,), (b,), (p,))[0] == zoneout(a, b, p)``.
    """
    check_bool(training, "training")
    checked = [
        (before, after, check_probability(rate, f"rates[{i}]"))
        for i, (before, after, rate) in enumerate(_check_states(prev, new, rates))
    ]
    if not training:
        return tuple(_expectation(before, after, rate) for before, after, rate in checked)
    if all(rate == 0.0 for _, _, rate in checked):
        return tuple(after for _, after, _ in checked)
    key = resolve_key(checked[0][1], seed, generator)
    sizes = [after.numel() for _, after, _ in checked]
    bits = random_bits16(key, sum(sizes))
    states = []
    for (before, after, rate), part in zip(checked, bits.split(sizes), strict=True):
        update = (part >= drop_threshold(rate)).reshape(after.shape).to(after.device)
        states.append(torch.where(update, after, before))
    return tuple(states)


def zoneout(
    prev: torch.Tensor,
    new: torch.Tensor,
    p: float = 0.1,
    training: bool = True,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Keep each unit of the previous state with probability ``p``:
    :math:`h_t = d \odot h_{t-1} + (1 - d) \odot \tilde h_t`, :math:`d \sim \mathrm{Bernoulli}(p)`;
    eval: :math:`p\,h_{t-1} + (1 - p)\,\tilde h_t`.  See :class:`dropkit.nn.zoneout.ZoneoutCell`.

    ``seed`` (an int or a key from :func:`dropkit.make_key`) or ``generator`` fix the mask.

    Examples::

        >>> from dropkit.functional.zoneout import zoneout
        >>> h = zoneout(torch.zeros(2, 6), torch.ones(2, 6), 0.5, seed=0)
        >>> sorted(set(h.flatten().tolist()))  # each unit: old (0) or new (1)
        [0.0, 1.0]
        >>> zoneout(torch.zeros(3), torch.ones(3), 0.25, training=False)
        tensor([0.7500, 0.7500, 0.7500])
    """
    return zoneout_states((prev,), (new,), (p,), training, seed=seed, generator=generator)[0]


# --- rates held in tensors (see dropkit.functional._tensor_rate) --------------------------------


def _expectation_tensor_rate(prev: torch.Tensor, new: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """:func:`_expectation` with the rate in a tensor: ``p`` and ``1 - p`` (in float64, as the
    float path computes it) rounded once to the compute dtype, which is what torch does with the
    Python floats of the float path, so the bits agree; the ends stay exact."""
    compute = compute_dtype(prev.dtype)
    p = p.reshape(()).to(prev.device)
    mixed = prev * p.to(compute) + new * (1.0 - p).to(compute)
    return torch.where(p == 0.0, new, torch.where(p == 1.0, prev, mixed))


def _zoneout_states_tensor_rate(
    prev: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    rates: Sequence[torch.Tensor],
    training: bool = True,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`zoneout_states` with each rate a floating-point tensor of shape ``()`` or ``(1,)``.

    Traced, each state's threshold is computed from its rate read at run time and compared with
    the same draws, so the masks are the eager ones.
    """
    for i, rate in enumerate(rates):
        check_probability_tensor(rate, f"rates[{i}]")
    if not torch.compiler.is_compiling():
        floats = [float(rate) for rate in rates]
        return zoneout_states(prev, new, floats, training, seed=seed, generator=generator)
    check_bool(training, "training")
    checked = _check_states(prev, new, rates)
    if not training:
        return tuple(_expectation_tensor_rate(before, after, rate) for before, after, rate in checked)
    key = resolve_key(checked[0][1], seed, generator)
    sizes = [after.numel() for _, after, _ in checked]
    bits = random_bits16(key, sum(sizes))
    states = []
    for i, ((before, after, rate), part) in enumerate(zip(checked, bits.split(sizes), strict=True)):
        threshold, _ = rate_constants_op(rate.reshape(()), f"rates[{i}]")
        update = (part >= threshold.to(part.device)).reshape(after.shape).to(after.device)
        states.append(torch.where(update, after, before))
    return tuple(states)


register_tensor_rate_variant(zoneout_states, _zoneout_states_tensor_rate)
