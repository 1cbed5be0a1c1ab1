"""Zoneout as functions; documentation lives on :class:`dropkit.nn.zoneout.ZoneoutCell`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dropkit._validation import check_bool, check_floating_tensor
from dropkit.engine.masks import random_bits16
from dropkit.engine.numerics import compute_dtype, drop_threshold, drop_threshold_tensor
from dropkit.functional._common import SeedLike, check_rate, is_zero, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate

__all__ = ["zoneout", "zoneout_states"]


def _expectation(prev: torch.Tensor, new: torch.Tensor, p: Rate) -> torch.Tensor:
    """``p * prev + (1 - p) * new``, exact at the ends (no ``0 * inf``).  A tensor rate stays in
    tensor ops (a compiled graph reads it when it runs): ``p`` and ``1 - p`` in float64, rounded
    once to the compute dtype, which is what torch does with the Python floats, so the bits agree."""
    if isinstance(p, torch.Tensor):
        compute = compute_dtype(prev.dtype)
        p = p.reshape(()).to(prev.device)
        # Each product rounded to the states' dtype, as with a float (0-d states would promote).
        mixed = (prev * p.to(compute)).to(prev.dtype) + (new * (1.0 - p).to(compute)).to(new.dtype)
        return torch.where(p == 0.0, new, torch.where(p == 1.0, prev, mixed))
    if p == 0.0:
        return new
    if p == 1.0:
        return prev
    return prev * p + new * (1.0 - p)


def _threshold(rate: Rate, device: torch.device) -> int | torch.Tensor:
    if isinstance(rate, torch.Tensor):
        return drop_threshold_tensor(rate.reshape(())).to(device)
    return drop_threshold(rate)


def _check_states(
    prev: Sequence[torch.Tensor], new: Sequence[torch.Tensor], rates: Sequence[Any], single: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor, Rate]]:
    """``(prev[i], new[i], rates[i])`` after checking the lengths, each pair of states and each
    rate; errors name ``prev[i]``, ``new[i]`` and ``rates[i]`` (``prev``, ``new`` and ``p`` for
    the one state of :func:`zoneout`, ``single=True``)."""
    for name, value in (("prev", prev), ("new", new), ("rates", rates)):
        if isinstance(value, (torch.Tensor, str)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a sequence (a tuple or list), got {type(value).__name__}")
    if not (len(prev) == len(new) == len(rates)) or not prev:
        raise ValueError(
            "prev, new and rates must have the same non-zero length, "
            f"got {len(prev)}, {len(new)}, {len(rates)}"
        )
    checked = []
    for i, (before, after, rate) in enumerate(zip(prev, new, rates, strict=True)):
        names = ("prev", "new", "p") if single else (f"prev[{i}]", f"new[{i}]", f"rates[{i}]")
        before = check_floating_tensor(before, names[0])
        after = check_floating_tensor(after, names[1])
        if before.shape != after.shape:
            raise ValueError(
                f"{names[0]} and {names[1]} must have the same shape, got {tuple(before.shape)} "
                f"and {tuple(after.shape)}"
            )
        checked.append((before, after, check_rate(rate, names[2])))
    return checked


def zoneout_states(
    prev: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
    rates: Sequence[Rate],
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
    return _zoneout_states(_check_states(prev, new, rates), training, seed, generator)


def _zoneout_states(
    checked: list[tuple[torch.Tensor, torch.Tensor, Rate]],
    training: bool,
    seed: SeedLike,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, ...]:
    check_bool(training, "training")
    check_seed(seed, generator)
    if not training:
        return tuple(_expectation(before, after, rate) for before, after, rate in checked)
    if all(is_zero(rate) for _, _, rate in checked):
        return tuple(after for _, after, _ in checked)
    key = resolve_key(checked[0][1], seed, generator)
    sizes = [after.numel() for _, after, _ in checked]
    bits = random_bits16(key, sum(sizes))
    states = []
    for (before, after, rate), part in zip(checked, bits.split(sizes), strict=True):
        update = (part >= _threshold(rate, part.device)).reshape(after.shape).to(after.device)
        states.append(torch.where(update, after, before))
    return tuple(states)


def zoneout(
    prev: torch.Tensor,
    new: torch.Tensor,
    p: Rate = 0.1,
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
    return _zoneout_states(_check_states((prev,), (new,), (p,), single=True), training, seed, generator)[0]
