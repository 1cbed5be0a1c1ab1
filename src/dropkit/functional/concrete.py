r"""Concrete dropout: a relaxed Bernoulli drop mask whose rate is a differentiable tensor.

Documentation of the method lives on :class:`dropkit.nn.concrete.ConcreteDropout`; this module
holds the functional op and the engine's uniform draws.

Uniform layout (a pure function of the key, like every dropkit draw): element ``j`` of the
noise (row-major index in the *noise* shape) reads Philox counter ``j // 4``, output word
``j % 4``, and becomes ``u = ((w >> 8) + 0.5) * 2**-24``, a 24-bit uniform strictly inside
``(0, 1)``, so :math:`\log u` and :math:`\log(1 - u)` are always finite.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from dropkit._validation import check_bool, check_floating_tensor, normalize_dims
from dropkit.engine.masks import mask_shape, random_bits32
from dropkit.engine.numerics import compute_dtype
from dropkit.functional._common import SeedLike, resolve_key

__all__ = ["check_temperature", "concrete_dropout", "concrete_uniforms"]


def check_temperature(temperature: object, name: str = "temperature") -> float:
    """A finite float ``> 0``; TypeError for non-real types, ValueError otherwise."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(temperature).__name__} ({temperature!r})")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite float > 0, got {temperature!r}")
    return value


def concrete_uniforms(key: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Uniforms in ``(0, 1)`` of ``shape``: element ``j`` from word ``j % 4`` of counter ``j // 4``.

    Computed in float64 for float64 and float32 otherwise (24-bit resolution either way).
    """
    compute = compute_dtype(dtype)
    bits = random_bits32(key, math.prod(shape))
    return (((bits >> 8).to(compute) + 0.5) * 2.0**-24).reshape(tuple(shape))


def concrete_dropout(
    input: torch.Tensor,
    p_logit: torch.Tensor,
    training: bool = True,
    *,
    temperature: float = 0.1,
    broadcast_dims: int | Sequence[int] = (),
    seed: SeedLike = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Concrete (relaxed Bernoulli) dropout with a differentiable drop rate.

    With :math:`p = \sigma(\ell)` for the logit :math:`\ell` = ``p_logit`` and
    :math:`u \sim U(0, 1)` from dropkit's engine,

    .. math::
        z = \sigma\!\left(\frac{\log p - \log(1-p) + \log u - \log(1-u)}{t}\right), \qquad
        y = x \odot \frac{1 - z}{1 - p},

    evaluated stably as :math:`1 - z = \sigma(-(\ell + \log u - \log(1-u))/t)` and
    :math:`1 - p = \sigma(-\ell)`.  Gradients flow to both ``input`` and ``p_logit``.  Half inputs
    are computed in float32 (float64 inputs or logits in float64) and cast back.  In eval
    (``training=False``) the op is the identity and draws nothing.

    Args:
        input: floating-point tensor of any shape.
        p_logit: floating-point tensor holding :math:`\operatorname{logit}(p)`, broadcastable to
            the noise shape (usually 0-d).
        training: apply the noise (``True``) or return ``input`` unchanged. Default: ``True``
        temperature: relaxation temperature :math:`t > 0`; :math:`t \to 0` gives hard Bernoulli
            dropout. Default: 0.1
        broadcast_dims: dims along which one uniform is shared (e.g. the spatial dims for
            channel-wise concrete dropout). Default: ``()``, one uniform per element.
        seed: int or int64 key ``[seed, stream, step]`` fixing the noise of this call.
        generator: a ``torch.Generator`` to take the key from instead of ``seed``.

    Shape:
        - Input: :math:`(*)`. Output: same shape and dtype as the input.

    Examples::

        >>> import torch
        >>> from dropkit.functional.concrete import concrete_dropout
        >>> p_logit = torch.tensor(0.0, requires_grad=True)  # p = 0.5
        >>> y = concrete_dropout(torch.ones(4, 8), p_logit, seed=0)
        >>> y.shape, bool(((y >= 0) & (y <= 2)).all())  # x (1 - z) / (1 - p), z in (0, 1)
        (torch.Size([4, 8]), True)
        >>> y.sum().backward(); p_logit.grad is not None
        True
        >>> x = torch.randn(3)
        >>> concrete_dropout(x, p_logit, training=False) is x
        True
    """
    check_bool(training, "training")
    input = check_floating_tensor(input)
    temperature = check_temperature(temperature)
    p_logit = check_floating_tensor(p_logit, "p_logit")
    dims = normalize_dims(broadcast_dims, input.dim(), "broadcast_dims")
    if not training:
        return input
    key = resolve_key(input, seed, generator)
    wide = torch.float64 in (input.dtype, p_logit.dtype)
    compute = torch.float64 if wide else torch.float32
    u = concrete_uniforms(key, mask_shape(input.shape, dims), compute)
    logit = p_logit.to(compute)
    keep = torch.sigmoid(-(logit + torch.log(u) - torch.log1p(-u)) / temperature)  # 1 - z
    scale = keep / torch.sigmoid(-logit)
    output = input.to(compute) * scale
    if output.shape != input.shape:
        raise ValueError(
            f"p_logit of shape {tuple(p_logit.shape)} must broadcast to the noise shape "
            f"{tuple(u.shape)} without enlarging input of shape {tuple(input.shape)}"
        )
    return output.to(input.dtype)
