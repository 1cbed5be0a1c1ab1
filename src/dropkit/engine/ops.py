"""dropkit's ``torch.library`` custom ops: mask application with a zero-byte backward.

Each op takes the input and a key tensor; autograd saves only the key (24 bytes, nothing per
element) and the backward regenerates the same mask or noise from it.  Registering them as
custom ops with fake (meta) kernels lets ``torch.compile(fullgraph=True)`` trace models that
use them without graph breaks, and makes compiled masks identical to eager ones: the same
kernel draws them.

Ops:

* ``dropkit::masked_affine(x, key, p, broadcast_dims, keep_scale, keep_shift, drop_value)``:
  ``y = where(keep, x * keep_scale + keep_shift, drop_value)``.  Inverted dropout is
  ``(1/q, 0, 0)``, original dropout ``(1, 0, 0)``, alpha dropout ``(a, b, a*alpha' + b)``.
  Its gradient is ``where(keep, dy * keep_scale, 0)``: the same op on ``dy``.
* ``dropkit::gaussian_scale(x, key, sigma, broadcast_dims)``: ``y = x * (1 + sigma * n)``.
* ``dropkit::gaussian_shift(x, key, std, broadcast_dims)``: ``y = x + std * n``.
* ``dropkit::bias_dropout_add(x, bias, residual, key, p)``: ``y = residual + dropout(x + bias)``
  (inverted dropout of the element mask of ``x``, Megatron-LM's fused neighbour).  Gradients:
  ``dx = where(keep, dy / q, 0)`` (the masked_affine op on ``dy``), ``dbias = dx`` summed to the
  bias shape, ``dresidual = dy``; only the key is saved.

Mask ops run on a fused kernel where :mod:`dropkit.kernels.dispatch` has one for the device
(numba on CPU, Triton on CUDA) and on the ``*_reference`` functions below otherwise; the
reference functions are the ground truth every kernel reproduces bit for bit.

Arithmetic is done in float32 for float32/float16/bfloat16 inputs (scale factors included) and
in float64 for float64, then rounded once to the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from dropkit.engine.masks import keep_mask, mask_shape, normal_noise
from dropkit.kernels import dispatch

__all__ = [
    "bias_dropout_add",
    "compute_dtype",
    "gaussian_scale",
    "gaussian_shift",
    "inverted_scale",
    "masked_affine",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dropkit computes in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverted_scale(p: float) -> float:
    """``1 / (1 - p)``, guarded: at ``p = 1`` nothing is kept and the scale is never applied."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def _store_like(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to ``x.dtype`` in a fresh tensor with ``x``'s memory layout."""
    out = torch.empty_like(x)
    out.copy_(values)
    return out


def masked_affine_reference(
    x: torch.Tensor,
    key: torch.Tensor,
    p: float,
    broadcast_dims: list[int],
    keep_scale: float,
    keep_shift: float,
    drop_value: float,
) -> torch.Tensor:
    compute = compute_dtype(x.dtype)
    keep = keep_mask(key, p, mask_shape(x.shape, broadcast_dims))
    kept = x.to(compute) * torch.tensor(keep_scale, dtype=compute, device=x.device)
    if keep_shift != 0.0:
        kept = kept + torch.tensor(keep_shift, dtype=compute, device=x.device)
    dropped = torch.tensor(drop_value, dtype=compute, device=x.device)
    return _store_like(x, torch.where(keep, kept, dropped))


def bias_dropout_add_reference(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, p: float
) -> torch.Tensor:
    compute = compute_dtype(x.dtype)
    keep = keep_mask(key, p, list(x.shape))
    kept = (x.to(compute) + bias.to(compute)) * torch.tensor(
        inverted_scale(p), dtype=compute, device=x.device
    )
    dropped = torch.where(keep, kept, torch.zeros((), dtype=compute, device=x.device))
    return _store_like(x, residual.to(compute) + dropped)


def _noise(x: torch.Tensor, key: torch.Tensor, broadcast_dims: list[int]) -> torch.Tensor:
    return normal_noise(key, mask_shape(x.shape, broadcast_dims), x.dtype)


def gaussian_scale_reference(
    x: torch.Tensor, key: torch.Tensor, sigma: float, broadcast_dims: list[int]
) -> torch.Tensor:
    compute = compute_dtype(x.dtype)
    factor = 1.0 + torch.tensor(sigma, dtype=compute, device=x.device) * _noise(x, key, broadcast_dims)
    return _store_like(x, x.to(compute) * factor)


def gaussian_shift_reference(
    x: torch.Tensor, key: torch.Tensor, std: float, broadcast_dims: list[int]
) -> torch.Tensor:
    compute = compute_dtype(x.dtype)
    noise = torch.tensor(std, dtype=compute, device=x.device) * _noise(x, key, broadcast_dims)
    return _store_like(x, x.to(compute) + noise)


def _masked_affine_impl(
    x: torch.Tensor,
    key: torch.Tensor,
    p: float,
    broadcast_dims: list[int],
    keep_scale: float,
    keep_shift: float,
    drop_value: float,
) -> torch.Tensor:
    return dispatch.masked_affine(
        x,
        key,
        p,
        broadcast_dims,
        keep_scale,
        keep_shift,
        drop_value,
        reference=lambda: masked_affine_reference(
            x, key, p, broadcast_dims, keep_scale, keep_shift, drop_value
        ),
    )


def _bias_dropout_add_impl(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, p: float
) -> torch.Tensor:
    return dispatch.bias_dropout_add(
        x,
        bias,
        residual,
        key,
        p,
        inverted_scale(p),
        reference=lambda: bias_dropout_add_reference(x, bias, residual, key, p),
    )


masked_affine_op = torch.library.custom_op("dropkit::masked_affine", _masked_affine_impl, mutates_args=())
bias_dropout_add_op = torch.library.custom_op(
    "dropkit::bias_dropout_add", _bias_dropout_add_impl, mutates_args=()
)


@torch.library.custom_op("dropkit::gaussian_scale", mutates_args=())
def gaussian_scale(
    x: torch.Tensor, key: torch.Tensor, sigma: float, broadcast_dims: list[int]
) -> torch.Tensor:
    return gaussian_scale_reference(x, key, sigma, broadcast_dims)


@torch.library.custom_op("dropkit::gaussian_shift", mutates_args=())
def gaussian_shift(x: torch.Tensor, key: torch.Tensor, std: float, broadcast_dims: list[int]) -> torch.Tensor:
    return gaussian_shift_reference(x, key, std, broadcast_dims)


@masked_affine_op.register_fake
def _(
    x: torch.Tensor,
    key: torch.Tensor,
    p: float,
    broadcast_dims: list[int],
    keep_scale: float,
    keep_shift: float,
    drop_value: float,
) -> torch.Tensor:
    return torch.empty_like(x)


@bias_dropout_add_op.register_fake
def _(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, p: float
) -> torch.Tensor:
    return torch.empty_like(x)


@gaussian_scale.register_fake
def _(x: torch.Tensor, key: torch.Tensor, sigma: float, broadcast_dims: list[int]) -> torch.Tensor:
    return torch.empty_like(x)


@gaussian_shift.register_fake
def _(x: torch.Tensor, key: torch.Tensor, std: float, broadcast_dims: list[int]) -> torch.Tensor:
    return torch.empty_like(x)


def _save_key(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    # Only the key is kept for backward: zero bytes per element.
    ctx.save_for_backward(inputs[1])
    ctx.args = inputs[2:]


def _masked_affine_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (key,) = ctx.saved_tensors
    p, broadcast_dims, keep_scale, _, _ = ctx.args
    grad_x = masked_affine(grad, key, p, broadcast_dims, keep_scale, 0.0, 0.0)
    return grad_x, None, None, None, None, None, None


def _bias_dropout_add_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    # The key and two shapes: zero bytes per element, like the other ops.
    ctx.save_for_backward(inputs[3])
    ctx.p = inputs[4]
    ctx.bias_shape = inputs[1].shape
    ctx.residual_shape = inputs[2].shape


def _bias_dropout_add_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (key,) = ctx.saved_tensors
    grad_x = grad_bias = grad_residual = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x = masked_affine(grad, key, ctx.p, [], inverted_scale(ctx.p), 0.0, 0.0)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_x.sum_to_size(ctx.bias_shape)
    if ctx.needs_input_grad[2]:
        grad_residual = grad.sum_to_size(ctx.residual_shape)
    return grad_x if ctx.needs_input_grad[0] else None, grad_bias, grad_residual, None, None


def _gaussian_scale_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (key,) = ctx.saved_tensors
    sigma, broadcast_dims = ctx.args
    return gaussian_scale(grad, key, sigma, broadcast_dims), None, None, None


def _gaussian_shift_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    return grad, None, None, None


def _save_nothing(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    pass


masked_affine_op.register_autograd(_masked_affine_backward, setup_context=_save_key)
bias_dropout_add_op.register_autograd(_bias_dropout_add_backward, setup_context=_bias_dropout_add_setup)
gaussian_scale.register_autograd(_gaussian_scale_backward, setup_context=_save_key)
gaussian_shift.register_autograd(_gaussian_shift_backward, setup_context=_save_nothing)


# --- eager fast path -------------------------------------------------------------------------
# A torch.library call costs ~50 us of Python dispatch per call, more than the fused kernel
# itself at typical activation sizes (128 x 1024).  Outside tracing, on plain tensors with no
# dispatch or function modes, a torch.autograd.Function with the same forward and backward
# gives the same bits and the same zero-byte backward at a fraction of the cost.  Everything
# else (torch.compile, export, fake tensors, functorch transforms, tensor subclasses) goes
# through the registered custom ops.


def _eager_fast_path(*tensors: torch.Tensor) -> bool:
    return (
        not torch.compiler.is_compiling()
        and all(type(t) is torch.Tensor for t in tensors)
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._functorch.peek_interpreter_stack() is None
    )


class _MaskedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: torch.Tensor, *args: Any) -> torch.Tensor:
        _save_key(ctx, (x, key, *args), x)
        return _masked_affine_impl(x, key, *args)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return _masked_affine_backward(ctx, grad)


class _BiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> torch.Tensor:
        _bias_dropout_add_setup(ctx, inputs, inputs[0])
        return _bias_dropout_add_impl(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return _bias_dropout_add_backward(ctx, grad)


def masked_affine(
    x: torch.Tensor,
    key: torch.Tensor,
    p: float,
    broadcast_dims: list[int],
    keep_scale: float,
    keep_shift: float,
    drop_value: float,
) -> torch.Tensor:
    """``where(keep, x * keep_scale + keep_shift, drop_value)``: the ``dropkit::masked_affine`` op,
    or its eager fast path (same bits, same backward)."""
    args = (x, key, p, broadcast_dims, keep_scale, keep_shift, drop_value)
    if _eager_fast_path(x, key):
        return _MaskedAffine.apply(*args)
    return masked_affine_op(*args)


def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, p: float
) -> torch.Tensor:
    """``residual + dropout(x + bias)``: the ``dropkit::bias_dropout_add`` op or its eager fast path."""
    if _eager_fast_path(x, bias, residual, key):
        return _BiasDropoutAdd.apply(x, bias, residual, key, p)
    return bias_dropout_add_op(x, bias, residual, key, p)
