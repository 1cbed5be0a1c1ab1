"""Rates held in tensors: the registry of tensor-rate variants and a factory for their custom ops.

dropkit's modules mirror each rate (``p``, ``std``) into a one-element float64 tensor and, while
``torch.compile`` traces them, pass that tensor to a private variant of the functional instead
of the float: the compiled graph then takes the rate as an input and reads it when it runs, so
assigning the rate between calls (a rate schedule) neither recompiles nor specializes the graph.
Eagerly the variants read the value and run the float path; traced, they run a custom op that
reads the value at run time and calls the same float path on real tensors, so masks, outputs and
gradients are bit-identical either way.  Everything a rate determines (the affine constants of
alpha dropout, the Gaussian std, DropBlock's seed rate) is computed inside the op from the value
read, with the float path's own Python arithmetic.  Layers whose masks are plain tensor code
(embedding, weight and DropConnect masks, zoneout) take the engine's threshold and ``1 / q`` from
:func:`rate_constants_op` instead and compare the same draws with it.

Where a variant falls short of one graph for every rate, the layer's docstring says so:
``ScaledDotProductAttention(use_engine=False)`` (torch's fused kernel takes a float),
``LockedDropout`` on a PackedSequence (data-dependent gathers) and ``LayerDrop`` (a Python
branch on the drawn decisions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dropkit._validation import check_probability
from dropkit.engine.masks import drop_threshold, random_bits16
from dropkit.engine.ops import inverted_scale

__all__ = [
    "TENSOR_RATE_VARIANTS",
    "rate_constants_op",
    "read_rate",
    "register_tensor_rate_variant",
    "tensor_rate_keep_mask",
    "tensor_rate_op",
]

#: The public functionals and their variants that take the rate as a one-element tensor.
TENSOR_RATE_VARIANTS: dict[Callable[..., Any], Callable[..., Any]] = {}


def register_tensor_rate_variant(
    functional: Callable[..., Any], variant: Callable[..., Any]
) -> Callable[..., Any]:
    """Record ``variant`` as the tensor-rate form of ``functional``; returns ``variant``."""
    TENSOR_RATE_VARIANTS[functional] = variant
    return variant


def read_rate(
    p: torch.Tensor, name: str = "p", check: Callable[[object, str], float] = check_probability
) -> float:
    """The value of a one-element rate tensor, validated as the float path validates it (a
    ValueError naming ``name`` and the value when it is out of range)."""
    return check(float(p), name)


def _fresh(output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    # The float paths return their input itself where nothing changes (p = 0); a custom op's
    # output must not alias an input, so hand back a copy (the same values).
    return output.clone() if output is input else output


def tensor_rate_op(
    name: str,
    options: str,
    forward: Callable[..., torch.Tensor],
    backward: Callable[..., torch.Tensor] | str = "linear",
    *,
    rate_name: str = "p",
    check: Callable[[object, str], float] = check_probability,
) -> Any:
    """Register ``dropkit::<name>(Tensor x, Tensor key, Tensor p, <options>) -> Tensor``.

    The op reads the rate from ``p`` (ValueError naming ``rate_name`` for a bad value) and
    returns ``forward(x, key, rate, *options)``, a float path run on real tensors.  Autograd
    saves only ``key`` and ``p``; the gradient is, by ``backward``:

    * ``"linear"``: the op itself applied to the incoming gradient (``y = x * factor(key, p)``);
    * ``"identity"``: the incoming gradient (additive noise);
    * a callable ``backward(grad, key, rate, *options)``, registered as the op
      ``dropkit::<name>_backward`` of the same schema, so a compiled backward reads the rate at
      run time too.

    Args:
        name: the op name in the ``dropkit`` namespace.
        options: the schema of the arguments after ``p``, e.g. ``"int[] broadcast_dims"``.
        forward: the float path, ``forward(x, key, rate, *options)``.
        backward: ``"linear"``, ``"identity"`` or a callable (see above). Default: ``"linear"``
        rate_name: the name error messages give the rate. Default: ``"p"``
        check: validates the rate read, ``check(value, rate_name) -> float``.
            Default: :func:`dropkit._validation.check_probability`
    """
    schema = f"(Tensor x, Tensor key, Tensor p{', ' + options if options else ''}) -> Tensor"

    def impl(x: torch.Tensor, key: torch.Tensor, p: torch.Tensor, *args: Any) -> torch.Tensor:
        return _fresh(forward(x, key, read_rate(p, rate_name, check), *args), x)

    def fake(x: torch.Tensor, key: torch.Tensor, p: torch.Tensor, *args: Any) -> torch.Tensor:
        return torch.empty_like(x)

    op = torch.library.custom_op(f"dropkit::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if callable(backward):
        backward_fn = backward

        def backward_impl(grad: torch.Tensor, key: torch.Tensor, p: torch.Tensor, *args: Any) -> torch.Tensor:
            return _fresh(backward_fn(grad, key, read_rate(p, rate_name, check), *args), grad)

        grad_op = torch.library.custom_op(
            f"dropkit::{name}_backward", backward_impl, mutates_args=(), schema=schema
        )
        grad_op.register_fake(fake)
    elif backward == "linear":
        grad_op = op
    elif backward == "identity":
        grad_op = None
    else:
        raise ValueError(f"backward must be 'linear', 'identity' or a callable, got {backward!r}")

    def setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        # The key and the rate: zero bytes per element, like dropkit::masked_affine.
        ctx.save_for_backward(inputs[1], inputs[2])
        ctx.options = inputs[3:]

    def grad_fn(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        key, p = ctx.saved_tensors
        grad_x = grad if grad_op is None else grad_op(grad, key, p, *ctx.options)
        return (grad_x, None, None, *([None] * len(ctx.options)))

    op.register_autograd(grad_fn, setup_context=setup)
    return op


@torch.library.custom_op("dropkit::rate_constants", mutates_args=())
def rate_constants_op(p: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's drop threshold (int64, :func:`dropkit.engine.masks.drop_threshold`) and the
    inverted-dropout scale ``1 / (1 - p)`` (float64, 0 at ``p = 1``) of the rate read from ``p``
    (ValueError naming ``name`` for a bad value), both 0-dim and computed by the float path's
    Python arithmetic, for ops whose masks and scales are plain tensor code."""
    rate = read_rate(p, name)
    return (
        torch.tensor(drop_threshold(rate), dtype=torch.int64),
        torch.tensor(inverted_scale(rate), dtype=torch.float64),
    )


@rate_constants_op.register_fake
def _(p: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((), dtype=torch.int64), torch.empty((), dtype=torch.float64)


def tensor_rate_keep_mask(
    key: torch.Tensor, p: torch.Tensor, shape: Sequence[int], name: str = "p"
) -> torch.Tensor:
    """:func:`dropkit.engine.masks.keep_mask` with the rate read from ``p`` at run time: the same
    draws compared with the same threshold (the draws lie in ``[0, 2**16)``, so the thresholds 0
    and ``2**16`` give the all-kept and all-dropped masks that ``keep_mask`` builds directly)."""
    threshold, _ = rate_constants_op(p.reshape(()), name)
    return (random_bits16(key, math.prod(shape)) >= threshold.to(key.device)).reshape(tuple(shape))
