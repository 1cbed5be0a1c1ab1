r"""DropConnect as functions: masked weights, per-example masks and moment-matching inference.

Convention (inverted scaling, like the rest of dropkit): training uses
:math:`\tilde W = (R \odot W) / q` with :math:`R_{ij} \sim \mathrm{Bernoulli}(q)`, :math:`q = 1 - p`,
so the pre-activation :math:`u = \tilde W v + b` of a linear layer has

.. math::

    \mathbb{E}[u] = W v + b, \qquad
    \mathrm{Var}[u] = \frac{p}{q}\,(W \odot W)(v \odot v),

and the mean inference is the undropped layer.  Wan et al. train unscaled and infer with
:math:`\mu = q\,W v`, :math:`\sigma^2 = q\,p\,(W \odot W)(v \odot v)`: their moments are ours
times :math:`q` and :math:`q^2`, i.e. the same distribution for the weights :math:`q\,W`.
The bias is never dropped.

Documentation of the layer lives on :class:`dropkit.nn.dropconnect.DropConnect`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from dropkit._validation import check_floating_tensor
from dropkit.engine.masks import keep_mask, normal_noise, philox_words
from dropkit.engine.numerics import (
    THRESHOLD_SCALE,
    compute_dtype,
    drop_threshold,
    drop_threshold_tensor,
    inverted_scale_of,
)
from dropkit.functional._common import SeedLike, check_rate, is_zero, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.ops import Rate

__all__ = [
    "drop_connect_linear_moments",
    "drop_connect_weight",
    "example_keep_masks",
    "gaussian_moment_matching",
    "moment_matching_linear",
]

_ELEMENTS_PER_COUNTER = 8  # the 16-bit layout of dropkit.engine.masks


def _in_compute_dtype(factor: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    # A float64 factor tensor rounded once to the compute dtype: what torch does with a float.
    if isinstance(factor, torch.Tensor):
        return factor.to(dtype=compute_dtype(like.dtype), device=like.device)
    return factor


def apply_weight_mask(weight: torch.Tensor, keep: torch.Tensor, p: Rate) -> torch.Tensor:
    """``weight / q`` where ``keep``, exact zeros elsewhere (``where``, not ``* mask``: inf * 0 is NaN)."""
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    # Rounded to the weight's dtype: a 0-d weight times a 0-d factor tensor would promote.
    scaled = (weight * _in_compute_dtype(inverted_scale_of(p), weight)).to(weight.dtype)
    return torch.where(keep, scaled, zero)


def example_keep_masks(
    key: torch.Tensor, p: Rate, weight_shape: Sequence[int], start: int, stop: int
) -> torch.Tensor:
    """Keep masks of examples ``start .. stop-1``, shape ``(stop - start, *weight_shape)``.

    They are rows ``start:stop`` of ``keep_mask(key, p, (N, *weight_shape))`` bit for bit, for
    any ``N >= stop``, drawn without generating the other rows: so a batch processed in chunks
    gives every example the same mask whatever the chunk size, and example 0 gets the mask of
    ``keep_mask(key, p, weight_shape)`` (the per-batch mask).
    """
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    shape = (stop - start, *(int(size) for size in weight_shape))
    if isinstance(p, torch.Tensor):  # bits >= threshold holds at both ends too (see _example_bits)
        return _example_bits(key, shape, start, stop) >= drop_threshold_tensor(p.reshape(())).to(key.device)
    threshold = drop_threshold(p)
    if threshold == 0:
        return torch.ones(shape, dtype=torch.bool, device=key.device)
    if threshold == THRESHOLD_SCALE:
        return torch.zeros(shape, dtype=torch.bool, device=key.device)
    return _example_bits(key, shape, start, stop) >= threshold


def _example_bits(key: torch.Tensor, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """The 16-bit draws behind :func:`example_keep_masks` (int64, ``shape``); ``bits >= threshold``
    is the keep mask for every threshold in ``[0, 2**16]``, the two ends included."""
    per_example = math.prod(shape[1:])
    first, last = start * per_example, stop * per_example
    # A row need not start on a counter boundary: draw the covering counters and cut.
    first_counter = first // _ELEMENTS_PER_COUNTER
    last_counter = -(-last // _ELEMENTS_PER_COUNTER)
    words = philox_words(key, first_counter, last_counter - first_counter)
    halves = [part for word in words for part in (word & 0xFFFF, word >> 16)]
    offset = first_counter * _ELEMENTS_PER_COUNTER
    bits = torch.stack(halves, dim=1).reshape(-1)[first - offset : last - offset]
    return bits.reshape(shape)


def drop_connect_weight(
    weight: torch.Tensor,
    p: Rate = 0.5,
    *,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""The DropConnect weight :math:`(R \odot W)/q`: each entry is 0 or ``weight / q``.

    The mask is ``keep_mask(key, p, weight.shape)``, a pure function of the key, so
    ``seed`` (an int or a key from :func:`dropkit.make_key`) or ``generator`` reproduce it;
    without them the functional stream of the global seed is used.  Differentiable in
    ``weight`` (the gradient is masked and scaled the same way).

    Examples::

        >>> import torch
        >>> from dropkit.functional.dropconnect import drop_connect_weight
        >>> w = drop_connect_weight(torch.ones(4, 8), 0.5, seed=0)
        >>> sorted(set(w.flatten().tolist()))
        [0.0, 2.0]
        >>> torch.equal(w, drop_connect_weight(torch.ones(4, 8), 0.5, seed=0))
        True
    """
    weight = check_floating_tensor(weight, "weight")
    p = check_rate(p)
    check_seed(seed, generator)
    if is_zero(p):
        return weight
    key = resolve_key(weight, seed, generator)
    return apply_weight_mask(weight, keep_mask(key, p, weight.shape), p)


def drop_connect_linear_moments(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: Rate
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of the training-time pre-activation :math:`u = \tilde W v + b`.

    :math:`\mu = W v + b` and :math:`\sigma^2 = \frac{p}{q}(W \odot W)(v \odot v)` for the
    inverted convention of :func:`drop_connect_weight` (exact moments for a fresh mask; the
    variance is reported as 0 at ``p = 1``, where inference falls back to the undropped layer
    like eval-mode dropout does, and is exactly 0 at ``p = 0`` whatever the weights).  ``input``
    is :math:`(*, \text{in})`, ``weight`` :math:`(\text{out}, \text{in})`, ``bias``
    :math:`(\text{out})` or ``None``, all of one floating dtype and device; both results
    :math:`(*, \text{out})`.  Both are computed in float32 for float16 and bfloat16 (squares of
    float16 weights above 256 overflow) and rounded once.
    """
    mean, variance = _linear_moments(input, weight, bias, p)
    return mean.to(weight.dtype), variance.to(weight.dtype)


def _linear_moments(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: Rate
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`drop_connect_linear_moments` in the compute dtype, before the rounding."""
    input, weight, bias = _check_linear_args(input, weight, bias)
    p = check_rate(p)
    compute = compute_dtype(input.dtype)
    mean = F.linear(input.to(compute), weight.to(compute), None if bias is None else bias.to(compute))
    ratio = variance_ratio(p)
    if not isinstance(ratio, torch.Tensor) and ratio == 0.0:  # p = 0 or 1: never inf * 0
        return mean, torch.zeros_like(mean)
    square = unless_zero_ratio(input.to(compute), ratio).square()
    weight_square = unless_zero_ratio(weight.to(compute), ratio).square()
    return mean, F.linear(square, weight_square) * _in_compute_dtype(ratio, square)


def unless_zero_ratio(factor: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """``factor`` of a variance ``ratio * sum(w**2 v**2)``, replaced by exact zeros where a tensor
    ``ratio`` is 0 (``p`` = 0 or 1): the variance is then exactly 0, forward and backward, whatever
    the weights and inputs (``inf * 0`` is NaN), as for the float 0, which skips the product."""
    if not isinstance(ratio, torch.Tensor):
        return factor
    zero = torch.zeros((), dtype=factor.dtype, device=factor.device)
    return torch.where(ratio.to(factor.device) == 0.0, zero, factor)


def _check_linear_args(
    input: object, weight: object, bias: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``input (*, in)``, ``weight (out, in)`` and ``bias (out,)`` or ``None``: floating-point
    tensors of one dtype on one device (a TypeError or ValueError naming the argument)."""
    input = check_floating_tensor(input)
    weight = check_floating_tensor(weight, "weight")
    if input.dim() == 0:
        raise ValueError("input must have at least one dim (*, in_features), got a 0-D tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"weight must have shape (out_features, {input.shape[-1]}) for input of shape "
            f"{tuple(input.shape)}, got {tuple(weight.shape)}"
        )
    tensors = [("weight", weight)]
    if bias is not None:
        bias = check_floating_tensor(bias, "bias")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) or be None, got {tuple(bias.shape)}")
        tensors.append(("bias", bias))
    for name, tensor in tensors:
        if tensor.dtype != input.dtype:
            raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {tensor.dtype}")
        if tensor.device != input.device:
            raise ValueError(f"{name} must be on the input's device {input.device}, got {tensor.device}")
    return input, weight, bias


def moment_matching_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    p: Rate,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    samples: int = 256,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""DropConnect inference by moment matching (Wan et al. 2013, Algorithm 2).

    Each unit's pre-activation is approximated by :math:`u \sim \mathcal{N}(\mu, \sigma^2)`
    with the moments of :func:`drop_connect_linear_moments`; ``samples`` draws :math:`Z` of
    :math:`u` go through ``activation`` (identity if ``None``) and are averaged:
    :math:`\frac{1}{Z}\sum_z a(\mu + \sigma \varepsilon_z)`.  The noise comes from the engine
    (``normal_noise``), keyed by ``seed``/``generator`` or the functional stream.  Peak memory
    is ``samples`` times the output.  Not meant for backpropagation (the gradient of
    :math:`\sigma` is infinite where :math:`\sigma = 0`).

    Examples::

        >>> import torch
        >>> from dropkit.functional.dropconnect import moment_matching_linear
        >>> w, v = torch.randn(3, 5), torch.randn(2, 5)
        >>> moment_matching_linear(v, w, None, 0.5, torch.relu, samples=64, seed=0).shape
        torch.Size([2, 3])

    Reference: Wan et al., "Regularization of Neural Networks using DropConnect", ICML 2013.
    """
    check_seed(seed, generator)
    mean, variance = _linear_moments(input, weight, bias, p)
    output = gaussian_moment_matching(
        mean, variance, activation, samples=samples, seed=seed, generator=generator
    )
    return output.to(input.dtype)


def variance_ratio(p: Rate) -> float | torch.Tensor:
    """``p / q``, the variance of one inverted mask entry ``r / q``; 0 at ``p = 1`` (see the
    moments).  A rate tensor gives a 0-dim float64 tensor by the same float64 arithmetic."""
    if isinstance(p, torch.Tensor):
        p = p.reshape(()).to(torch.float64)
        return torch.where(p < 1.0, p / (1.0 - p), torch.zeros_like(p))
    return p / (1.0 - p) if p < 1.0 else 0.0


def gaussian_moment_matching(
    mean: torch.Tensor,
    variance: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    samples: int = 256,
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Average of ``activation`` over ``samples`` draws of :math:`\mathcal{N}(\text{mean}, \text{variance})`.

    The step of moment matching after the moments: any layer whose pre-activation moments are
    known (linear or convolutional) uses it.  Noise comes from ``normal_noise`` keyed by
    ``seed``/``generator`` or the functional stream.  The samples and their average are computed
    in float32 for float16 and bfloat16 ``mean`` (``variance`` may be given in float32, unrounded)
    and the result is rounded once to ``mean``'s dtype.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if activation is not None and not callable(activation):
        raise TypeError(f"activation must be callable or None, got {type(activation).__name__}")
    mean = check_floating_tensor(mean, "mean")
    variance = check_floating_tensor(variance, "variance")
    if variance.shape != mean.shape:
        raise ValueError(
            f"variance must have the shape of mean {tuple(mean.shape)}, got {tuple(variance.shape)}"
        )
    key = resolve_key(mean, seed, generator)
    compute = compute_dtype(mean.dtype)
    noise = normal_noise(key, (samples, *mean.shape), mean.dtype).to(compute)
    drawn = mean.to(compute) + variance.to(compute).sqrt() * noise
    return (drawn if activation is None else activation(drawn)).mean(dim=0).to(mean.dtype)
