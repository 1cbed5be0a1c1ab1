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
import torch.nn.functional as F

from dropkit._validation import check_bool, check_floating_tensor, normalize_dims
from dropkit.engine.masks import mask_shape, random_bits32
from dropkit.engine.numerics import compute_dtype
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._seed import check_seed

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
    :math:`1 - p = \sigma(-\ell)`; where :math:`1 - p` is too small to divide by (:math:`\ell`
    above ~44 in float32, ~354 in float64) the ratio is computed in log space,
    :math:`\exp(\log\sigma(\cdot) + \operatorname{softplus}(\ell))`, so any finite logit gives a
    finite scale (at most :math:`1 + 2^{25}` for :math:`t \le 1`; beyond the largest finite number,
    possible only for :math:`t > 1`, it is capped there).  Gradients flow to both ``input`` and
    ``p_logit``.  Half inputs are computed in float32 (float64 inputs or logits in float64) and
    cast back.  Eagerly a training call reads ``p_logit`` (one host read): NaN or infinite values
    are a ValueError.  In eval (``training=False``) the op is the identity and draws nothing.

    Args:
        input: floating-point tensor of any shape.
        p_logit: floating-point tensor holding :math:`\operatorname{logit}(p)`, broadcastable to
            the noise shape (usually 0-d).
        training: apply the noise (``True``) or return ``input`` unchanged. Default: ``True``
        temperature: relaxation temperature :math:`t > 0` (at least the smallest normal number
            of the compute dtype); :math:`t \to 0` gives hard Bernoulli dropout. Default: 0.1
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
    check_seed(seed, generator)
    if not training:
        return input
    wide = torch.float64 in (input.dtype, p_logit.dtype)
    compute = torch.float64 if wide else torch.float32
    tiny = torch.finfo(compute).tiny
    if temperature < tiny:
        raise ValueError(
            f"temperature must be at least {tiny} (the smallest normal {compute}, the dtype the op "
            f"computes in), got {temperature!r}"
        )
    logit = p_logit.to(compute)
    kept_rate = torch.sigmoid(-logit)  # 1 - p
    # Eagerly the logits are read (a few elements): a non-finite one is an error, and the scale is
    # computed in log space only if 1 - p is too small to divide by.  Traced, always.
    limit = math.sqrt(tiny)
    in_log_space = _check_logit(p_logit, kept_rate, limit)
    key = resolve_key(input, seed, generator)
    u = concrete_uniforms(key, mask_shape(input.shape, dims), compute)
    keep_logit = -(logit + torch.log(u) - torch.log1p(-u)) / temperature
    keep = torch.sigmoid(keep_logit)  # 1 - z
    scale = _stable_scale(keep, keep_logit, kept_rate, logit, limit) if in_log_space else keep / kept_rate
    output = input.to(compute) * scale
    if output.shape != input.shape:
        raise ValueError(
            f"p_logit of shape {tuple(p_logit.shape)} must broadcast to the noise shape "
            f"{tuple(u.shape)} without enlarging input of shape {tuple(input.shape)}"
        )
    return output.to(input.dtype)


def _check_logit(p_logit: torch.Tensor, kept_rate: torch.Tensor, limit: float) -> bool:
    """Whether the scale must be computed in log space somewhere: where ``1 - p = sigmoid(-p_logit)``
    is below ``limit``, the square root of the smallest normal number (``p_logit`` > ~44 in
    float32), ``(1 - z) / (1 - p)`` is ``0 / 0`` once ``1 - p`` underflows (~88) and its gradient
    ``(1 - z) / (1 - p)**2`` overflows before.  Eagerly the logits are read here, once: a NaN or
    infinite one is a ValueError naming ``p_logit``.  Traced (compile, export, functorch
    transforms, tensor subclasses) nothing is read and the log-space branch is always computed."""
    traced = (
        torch.compiler.is_compiling()
        or type(p_logit) is not torch.Tensor
        or torch._C._functorch.peek_interpreter_stack() is not None
    )
    if traced:
        return True
    finite, direct = torch.stack([torch.isfinite(p_logit).all(), (kept_rate >= limit).all()]).tolist()
    if not finite:
        bad = p_logit.detach()[~torch.isfinite(p_logit.detach())].flatten()[0].item()
        raise ValueError(f"p_logit must be finite, got a p_logit holding {bad}")
    return not direct


def _stable_scale(
    keep: torch.Tensor, keep_logit: torch.Tensor, kept_rate: torch.Tensor, logit: torch.Tensor, limit: float
) -> torch.Tensor:
    """``keep / kept_rate``: divided directly where ``kept_rate >= limit`` (the bits of the plain
    division, whose gradient is then at most ``1 / limit**2``), else as
    ``exp(log keep - log kept_rate)`` from the logits (``-log(1 - p) = softplus(p_logit)``), capped
    at the largest finite number so that a zero input stays 0; the selected branch alone carries
    gradients (both are finite)."""
    normal = kept_rate >= limit
    direct = keep / torch.where(normal, kept_rate, torch.ones_like(kept_rate))
    in_log_space = torch.exp(F.logsigmoid(keep_logit) + F.softplus(logit)).clamp(
        max=torch.finfo(logit.dtype).max
    )
    return torch.where(normal, direct, in_log_space)
