"""The numerics of every dropkit op, in one place: compute dtype, thresholds, scales and guards.

A rate reaches an op as a Python float or as a one-element floating-point tensor (what a module
holds, so that a compiled graph reads it when it runs).  Everything derived from it is computed
here, by the same Python float arithmetic whichever form it came in, so a tensor rate gives the
float rate's bits exactly:

* the drop *threshold* ``round(p * 2**16)``: a 16-bit draw below it drops the element;
* the inverted-dropout *scale* ``1 / q`` of the realised keep probability
  ``q = 1 - threshold / 2**16`` (so the expectation is exact at every rate), guarded to 0 when
  nothing is kept (it is never applied: no ``inf * 0``);
* the *affine constants* ``(keep_scale, keep_shift, drop_value)`` of each mask formula
  (:data:`AFFINE_FORMULAS`);
* the alpha-dropout coefficients and the Gaussian-dropout standard deviation.

Arithmetic on values is done in :func:`compute_dtype`: float32 for float32/float16/bfloat16
inputs (scale factors included), float64 for float64, rounded once to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dropkit._validation import check_probability

__all__ = [
    "AFFINE_FORMULAS",
    "SELU_ALPHA_PRIME",
    "THRESHOLD_BITS",
    "affine_constants",
    "alpha_dropout_coefficients",
    "as_rate_tensor",
    "compute_dtype",
    "drop_threshold",
    "drop_threshold_tensor",
    "gaussian_dropout_std",
    "grad_formula",
    "inverted_scale",
    "inverted_scale_of",
    "rate_value",
    "realised_drop_probability",
    "realised_keep_probability",
]

THRESHOLD_BITS = 16
THRESHOLD_SCALE = 1 << THRESHOLD_BITS

# The SELU saturation value -lambda * alpha (Klambauer et al. 2017): where dropped units sit.
SELU_ALPHA_PRIME = -1.7580993408473766


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dropkit computes in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- rates -----------------------------------------------------------------------------------


def rate_value(
    rate: float | torch.Tensor, name: str = "p", check: Callable[[object, str], float] = check_probability
) -> float:
    """The value of a rate given as a float or a one-element tensor, validated by ``check`` (a
    ValueError naming ``name`` and the value when it is out of range)."""
    if isinstance(rate, torch.Tensor):
        return check(float(rate), name)
    return check(rate, name)


def as_rate_tensor(rate: float | torch.Tensor) -> torch.Tensor:
    """``rate`` as the float64 tensor of shape ``()`` that dropkit's custom ops take."""
    if isinstance(rate, torch.Tensor):
        return rate.reshape(()) if rate.dtype == torch.float64 else rate.reshape(()).to(torch.float64)
    return torch.tensor(rate, dtype=torch.float64)


# --- Bernoulli masks -------------------------------------------------------------------------


def drop_threshold(p: float) -> int:
    """Integer threshold in ``[0, 2**16]``: a 16-bit draw below it drops the element."""
    return round(p * THRESHOLD_SCALE)


def drop_threshold_tensor(p: torch.Tensor) -> torch.Tensor:
    """:func:`drop_threshold` of a rate tensor, as an int64 tensor, in tensor ops (so a compiled
    graph computes it when it runs): ``p * 2**16`` is exact in float64 and ``torch.round``
    rounds half to even like Python's ``round``, so it equals the float's threshold."""
    return torch.round(p.to(torch.float64) * THRESHOLD_SCALE).to(torch.int64)


def realised_drop_probability(p: float) -> float:
    """The drop probability the engine actually realises for ``p`` (exact, a multiple of 2**-16)."""
    return drop_threshold(p) / THRESHOLD_SCALE


def realised_keep_probability(p: float) -> float:
    """The keep probability the engine realises for ``p``: ``1 -`` :func:`realised_drop_probability`."""
    return (THRESHOLD_SCALE - drop_threshold(p)) / THRESHOLD_SCALE


def inverted_scale(p: float) -> float:
    """``1 / q``, ``q`` the *realised* keep probability ``(2**16 - round(p 2**16)) / 2**16``, so
    that ``E[y] = x`` exactly at every rate (``1 / (1 - p)`` would be off by up to 50 % near
    ``p = 1``); guarded: when nothing is kept the scale is never applied and is 0."""
    kept = THRESHOLD_SCALE - drop_threshold(p)
    return THRESHOLD_SCALE / kept if kept > 0 else 0.0


def inverted_scale_of(p: float | torch.Tensor) -> float | torch.Tensor:
    """:func:`inverted_scale` of a float, or of a rate tensor as a 0-dim float64 tensor in tensor
    ops (an exact integer threshold and one IEEE float64 division: the float's value exactly)."""
    if isinstance(p, torch.Tensor):
        kept = (THRESHOLD_SCALE - drop_threshold_tensor(p.reshape(()))).to(torch.float64)
        return torch.where(kept > 0, THRESHOLD_SCALE / kept.clamp(min=1.0), torch.zeros_like(kept))
    return inverted_scale(p)


def alpha_dropout_coefficients(p: float) -> tuple[float, float]:
    """The affine correction ``(a, b)`` that keeps a standard-normal input at mean 0, variance 1.

    ``a = (q + alpha'^2 q p)^(-1/2)`` and ``b = -a alpha' p`` with ``q = 1 - p``; undefined at
    ``p = 1`` (ValueError), where alpha dropout outputs zeros instead.
    """
    p = check_probability(p)
    if p == 1.0:
        raise ValueError("alpha dropout coefficients are undefined at p = 1, got p=1.0")
    q = 1.0 - p
    a = 1.0 / math.sqrt(q + SELU_ALPHA_PRIME**2 * q * p)
    return a, -a * SELU_ALPHA_PRIME * p


def _alpha(p: float) -> tuple[float, float, float]:
    realised = realised_drop_probability(p)  # the moments of the mask actually drawn
    if realised == 1.0:  # the correction diverges; zeros are the defined output (never NaN)
        return 0.0, 0.0, 0.0
    a, b = alpha_dropout_coefficients(realised)
    return a, b, a * SELU_ALPHA_PRIME + b


def _alpha_grad(p: float) -> tuple[float, float, float]:
    return (_alpha(p)[0], 0.0, 0.0)


#: ``y = where(keep, x * keep_scale + keep_shift, drop_value)`` for each mask formula, as a
#: function of the rate: inverted dropout, the original (unscaled) dropout of Srivastava et al.,
#: alpha dropout, and the gradient of alpha dropout.
AFFINE_FORMULAS: dict[str, Callable[[float], tuple[float, float, float]]] = {
    "inverted": lambda p: (inverted_scale(p), 0.0, 0.0),
    "unscaled": lambda p: (1.0, 0.0, 0.0),
    "alpha": _alpha,
    "alpha_grad": _alpha_grad,
}
_GRAD_FORMULAS = {
    "inverted": "inverted",
    "unscaled": "unscaled",
    "alpha": "alpha_grad",
    "alpha_grad": "alpha_grad",
}


def affine_constants(formula: str, p: float) -> tuple[float, float, float]:
    """``(keep_scale, keep_shift, drop_value)`` of ``formula`` at rate ``p``."""
    try:
        constants = AFFINE_FORMULAS[formula]
    except KeyError:
        raise ValueError(f"formula must be one of {sorted(AFFINE_FORMULAS)}, got {formula!r}") from None
    return constants(p)


def grad_formula(formula: str) -> str:
    """The formula whose masked affine map is the gradient of ``formula``'s (same mask, no shift)."""
    return _GRAD_FORMULAS[formula]


# --- Gaussian noise --------------------------------------------------------------------------


def gaussian_dropout_std(p: float) -> float:
    """The noise standard deviation ``sqrt(p / (1 - p))`` matching Bernoulli dropout's variance."""
    p = check_probability(p)
    if p == 1.0:
        raise ValueError("the Gaussian dropout std is infinite at p = 1, got p=1.0")
    return math.sqrt(p / (1.0 - p))
