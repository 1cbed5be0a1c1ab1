"""dropkit's custom ops and their autograd, in one place: masks applied with a zero-byte backward.

Every op takes the input, a key tensor and the *rate* as run-time arguments.  The rate is a Python
float or a one-element floating-point tensor (what a module holds, so that a compiled graph reads
it when it runs: a rate schedule never recompiles); the op reads its value, validates it, and
derives the threshold and constants with :mod:`dropkit.engine.numerics`, the same arithmetic
either way.  Autograd saves only the key and the rate (nothing per element) and the backward
regenerates the same mask or noise from them.

Each op is a ``torch.library`` custom op with a fake kernel, so ``torch.compile(fullgraph=True)``,
``torch.export`` and the functorch transforms trace it without graph breaks and draw the eager
masks (the same kernel draws them).  On plain eager tensors a ``torch.autograd.Function`` with the
same forward and backward runs instead: a ``torch.library`` call costs ~50 us of Python dispatch,
more than the fused kernel at typical activation sizes.  Where autograd would record nothing (no
input requires grad, or grad mode is off, and no forward-mode level is open) the forward runs
alone, without the Function around it.

Ops (``rate`` always the third tensor, options after it):

* ``dropkit::masked_affine(x, key, rate, broadcast_dims, formula, rate_name)``:
  ``where(keep, x * keep_scale + keep_shift, drop_value)`` with the constants of ``formula``
  (:data:`dropkit.engine.numerics.AFFINE_FORMULAS`); its gradient is the same op on ``dy`` with
  the gradient's formula.
* ``dropkit::gaussian_dropout(x, key, rate, broadcast_dims, rate_name)``:
  ``x * (1 + sigma n)``, ``sigma = sqrt(p / (1 - p))``; zeros at ``p = 1``.
* ``dropkit::gaussian_noise(x, key, std, broadcast_dims, rate_name)``: ``x + std n``.
* ``dropkit::bias_dropout_add(x, bias, residual, key, rate)``: ``residual + dropout(x + bias)``.
* :class:`RateOp` registers further ops of the same shape for variants whose masks are computed
  by a float path (DropBlock's seed rate), read at run time the same way.

Mask ops run on the backend that :mod:`dropkit.kernels.dispatch` picks for the device.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch.autograd import forward_ad

from dropkit._validation import check_nonnegative, check_probability
from dropkit.engine import reference
from dropkit.engine.numerics import (
    AFFINE_FORMULAS,
    as_rate_tensor,
    drop_threshold,
    gaussian_dropout_std,
    grad_formula,
    inverted_scale,
    rate_value,
)
from dropkit.engine.streams import element_key, refuse_jit_trace
from dropkit.kernels import dispatch

__all__ = [
    "Rate",
    "bias_dropout_add",
    "checked_rate",
    "eager_fast_path",
    "gaussian_dropout",
    "gaussian_noise",
    "masked_affine",
    "refuse_jit_trace",
    "RateOp",
    "zeros_like_connected",
]

_FUNCTIONALIZE = torch._C._functorch.TransformType.Functionalize
# The C++ apply of torch._C._FunctionBase, which torch.autograd.Function.apply ends in.
_FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]
# Bound once: every eager call asks them (never while compiling: see eager_fast_path).
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_transforms_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_peek_interpreter = torch._C._functorch.peek_interpreter_stack

_REPLAYING: ContextVar[bool] = ContextVar("dropkit_replaying_a_mask", default=False)

#: A rate as ops take it: a float, or a one-element floating-point tensor read when the op runs.
Rate = float | torch.Tensor


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """Plain eager tensors, no tracing and no dispatch or function modes: the autograd.Function
    runs.  Under ``torch.func`` transforms it runs too (it has the forward-AD and vmap rules the
    transforms need); traced paths (compile, export, fake and subclass tensors) take the op."""
    # is_compiling first: dynamo folds it to True, so it never traces the rest.
    if torch.compiler.is_compiling() or _dispatch_modes() != 0 or _function_modes():
        return False
    for t in tensors:
        if type(t) is not torch.Tensor:
            return False
    # functionalize has no rule for autograd.Functions; the custom op is functional already.
    interpreter = _peek_interpreter()
    return interpreter is None or interpreter.key() != _FUNCTIONALIZE


_PLAIN_RATE_TYPES = (float, torch.Tensor)  # the common rates: a type test decides


def _plain_rate(rate: Rate) -> bool:
    """A float, or a plain tensor (not a fake or subclass tensor that only a traced op may see)."""
    return not isinstance(rate, torch.Tensor) or type(rate) is torch.Tensor


def _fresh(output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    # A custom op's output must not alias an input: where nothing changes, hand back a copy.
    return output.clone() if output is input else output


def _save_rate(ctx: Any, key: torch.Tensor, rate: Rate) -> None:
    """Keep the key and the rate for backward: 24 bytes and one element, nothing per element."""
    if isinstance(rate, torch.Tensor):
        ctx.save_for_backward(key, rate)
        ctx.float_rate = None
    else:
        ctx.save_for_backward(key)
        ctx.float_rate = rate


def _saved_rate(ctx: Any) -> tuple[torch.Tensor, Rate]:
    saved = ctx.saved_tensors
    return saved[0], saved[1] if ctx.float_rate is None else ctx.float_rate


class _Replaying:
    """A gradient or tangent replays a forward's mask: not a new draw, so a vmap over cotangents
    or tangents (jacrev, jacfwd, per-sample gradients) gives every element that mask.  A class,
    not a generator context manager: every backward enters it, at a tenth of the price."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = _REPLAYING.set(True)

    def __exit__(self, *exc_info: object) -> None:
        _REPLAYING.reset(self.token)


def _vmap_loop(
    name: str,
    info: Any,
    in_dims: tuple[Any, ...],
    inputs: tuple[Any, ...],
    key_index: int,
    call: Callable[..., torch.Tensor],
) -> tuple[torch.Tensor, int | None]:
    """``torch.func.vmap`` of a random op with torch's randomness semantics: ``"error"`` refuses,
    ``"same"`` gives every batch element the call's mask (its own, for a batched key),
    ``"different"`` gives element ``b`` the mask of :func:`dropkit.element_key` ``(key_b, b)``:
    exactly the loop over the elements with those keys.  A replayed mask (a gradient, a tangent)
    is not a draw: it always takes the forward's ("same")."""
    randomness = "same" if _REPLAYING.get() else info.randomness
    if randomness == "error":
        raise RuntimeError(
            f"dropkit::{name} draws a random mask, and vmap's default randomness='error' refuses "
            "random ops: pass randomness='same' (one mask for every batch element) or 'different' "
            "(a mask per element, from dropkit.element_key(key, index)) to torch.func.vmap"
        )
    if randomness == "same" and all(dim is None for dim in in_dims):
        return call(*inputs), None
    outputs = []
    for index in range(info.batch_size):
        element = [
            value if dim is None else value.select(dim, index)
            for value, dim in zip(inputs, in_dims, strict=True)
        ]
        # A batched key (per-element steps of stacked modules, or keys passed in) is each
        # element's own; "different" still derives a key per element, so that stacked copies of
        # one module (one stream, one step) do not share masks.
        if randomness == "different":
            element[key_index] = element_key(element[key_index], index)
        outputs.append(call(*element))
    return torch.stack(outputs), 0


class RateOp:
    """Registers ``dropkit::<name>(Tensor x, Tensor key, Tensor rate, <options>, str rate_name)``;
    calling the object runs it: ``op(x, key, rate, *options, rate_name)``.

    The op reads the rate (a float, or a one-element tensor), validates a tensor's value with
    ``check`` (a ValueError naming ``rate_name``; ``bounds`` are the values it accepts, tested
    first because that is cheaper) and returns ``forward(x, key, value, *options)``, a float path
    run on real tensors, so a tensor rate gives the float's bits exactly.  Traced calls (compile,
    export, functorch transforms, fake or subclass tensors) run the registered custom op; plain
    eager calls an ``autograd.Function`` with the same forward and backward (or the forward alone,
    where autograd would record nothing).  Autograd keeps only the key and the rate.
    ``backward`` is ``"linear"`` (the gradient is the op itself on ``dy``, with the options mapped
    by ``grad_options``) or ``"identity"`` (additive noise: ``dy``).
    """

    def __init__(
        self,
        name: str,
        options: str,
        forward: Callable[..., torch.Tensor],
        *,
        backward: str = "linear",
        grad_options: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None,
        check: Callable[[object, str], float] = check_probability,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if backward not in ("linear", "identity"):
            raise ValueError(f"backward must be 'linear' or 'identity', got {backward!r}")
        self.name = name
        self.forward = forward
        self.backward = backward
        self.grad_options = grad_options or (lambda options: options)
        self.check = check
        self.bounds = bounds  # the values check accepts (tested first: cheaper than the check)
        # List options are declared optional and None is read as the empty list: AOTInductor's
        # proxy executor (torch 2.13) hands an empty int list to a Python custom op as None.
        options = options.replace("int[] ", "int[]? ")
        schema = f"(Tensor x, Tensor key, Tensor rate, {options}, str rate_name) -> Tensor"

        def impl(x: torch.Tensor, key: torch.Tensor, rate: torch.Tensor, *args: Any) -> torch.Tensor:
            args = tuple([] if arg is None else arg for arg in args)
            return _fresh(self.run(x, key, rate, *args), x)

        def fake(x: torch.Tensor, key: torch.Tensor, rate: torch.Tensor, *args: Any) -> torch.Tensor:
            return torch.empty_like(x)

        self.op = torch.library.custom_op(f"dropkit::{name}", impl, mutates_args=(), schema=schema)
        self.op.register_fake(fake)
        self.op.register_autograd(self._backward, setup_context=self._setup)
        op = self

        class Eager(torch.autograd.Function):
            # The options travel as one tuple: apply() pays per argument.  setup_context style,
            # with jvp and vmap rules, so that the torch.func transforms can run it.
            @classmethod
            def apply(cls, *args: Any) -> Any:
                # torch's apply binds the arguments to forward's signature on every call
                # (inspect.signature: a third of a small call's host time) because a
                # setup_context-style forward may have defaults; this one has none, so outside
                # the torch.func transforms the op's call runs the C++ apply directly (or the
                # forward alone where autograd records nothing).
                if _transforms_active():
                    return super().apply(*args)
                x, key, rate, options = args
                return op(x, key, rate, *options)

            @staticmethod
            def forward(
                x: torch.Tensor, key: torch.Tensor, rate: Rate, options: tuple[Any, ...]
            ) -> torch.Tensor:
                return op.run(x, key, rate, *options)

            @staticmethod
            def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
                _, key, rate, options = inputs
                _save_rate(ctx, key, rate)
                ctx.options = options
                ctx.forward_key, ctx.forward_rate = key, rate  # for jvp (forward mode)

            @staticmethod
            def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
                return op._grad(ctx, grad), None, None, None

            @staticmethod
            def jvp(ctx: Any, tangent: torch.Tensor, *_: Any) -> torch.Tensor:
                # The op is affine in x (linear for the gradient's formula): the tangent goes
                # through the same mask and scale.
                if op.backward == "identity":
                    return tangent
                with _Replaying():
                    return op(tangent, ctx.forward_key, ctx.forward_rate, *op.grad_options(ctx.options))

            @staticmethod
            def vmap(
                info: Any, in_dims: tuple[Any, ...], x: Any, key: Any, rate: Any, options: tuple[Any, ...]
            ) -> tuple[torch.Tensor, int | None]:
                return _vmap_loop(
                    name, info, in_dims[:3], (x, key, rate), 1, lambda *element: op(*element, *options)
                )

        Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
        self.eager = Eager
        # The C++ apply bound to Eager (what super(torch.autograd.Function, Eager).apply looks up
        # on every call).
        self.function_apply: Callable[..., torch.Tensor] = _FUNCTION_APPLY.__get__(None, Eager)

    def run(self, x: torch.Tensor, key: torch.Tensor, rate: Rate, *args: Any) -> torch.Tensor:
        """The op's values: ``forward`` with the rate read (``args[-1]`` names it).  A tensor rate
        is validated here, where it is read; a float was validated by the functional that got it."""
        if isinstance(rate, torch.Tensor):
            value = float(rate)
            low, high = self.bounds
            if not low <= value <= high:  # out of range or NaN: the check raises, naming the rate
                value = self.check(value, args[-1])
            return self.forward(x, key, value, *args[:-1])
        return self.forward(x, key, rate, *args[:-1])

    def _setup(self, ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _save_rate(ctx, inputs[1], inputs[2])
        ctx.options = inputs[3:]

    def _grad(self, ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if self.backward == "identity":
            return grad
        key, rate = _saved_rate(ctx)
        with _Replaying():
            return self(grad, key, rate, *self.grad_options(ctx.options))

    def _backward(self, ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (self._grad(ctx, grad), None, None, *([None] * len(ctx.options)))

    def __call__(self, x: torch.Tensor, key: torch.Tensor, rate: Rate, *options: Any) -> torch.Tensor:
        if not (eager_fast_path(x, key) and (type(rate) in _PLAIN_RATE_TYPES or _plain_rate(rate))):
            return self.op(x, key, as_rate_tensor(rate), *options)
        if _transforms_active():
            return self.eager.apply(x, key, rate, options)
        # Outside the torch.func transforms: the C++ apply of the Function where autograd has
        # something to record, a gradient that can flow back (grad mode on and an input that
        # requires grad) or a forward-mode tangent (a torch.autograd.forward_ad level is open);
        # else the forward alone, which the Function would only wrap, at a few us a call.
        if forward_ad._current_level >= 0 or (
            torch.is_grad_enabled()
            and (x.requires_grad or (type(rate) is torch.Tensor and rate.requires_grad))
        ):
            # A functorch wrapper seen here is a dead one (it escaped a finished transform):
            # torch's apply unwraps it, and so does this.
            if type(rate) is torch.Tensor:
                rate = _unwrap_if_dead(rate)
            return self.function_apply(_unwrap_if_dead(x), _unwrap_if_dead(key), rate, options)
        # The forward alone: the backend dispatch sends a (dead) functorch wrapper to the
        # reference engine.  The aliasing rule of apply: an input returned as the output comes
        # back as a view.
        output = self.run(x, key, rate, *options)
        return x.view_as(x) if output is x else output


# --- Bernoulli masks -------------------------------------------------------------------------


# (formula, rate) -> (threshold, keep_scale, keep_shift, drop_value): a model calls with a few
# rates, and deriving the constants costs more Python than looking them up.
_AFFINE_CONSTANTS: dict[tuple[str, float], tuple[int, float, float, float]] = {}
_AFFINE_CONSTANTS_LIMIT = 1024


def _affine_constants(formula: str, p: float) -> tuple[int, float, float, float]:
    constants = (drop_threshold(p), *AFFINE_FORMULAS[formula](p))
    if len(_AFFINE_CONSTANTS) >= _AFFINE_CONSTANTS_LIMIT:  # a rate schedule of many values
        _AFFINE_CONSTANTS.clear()
    _AFFINE_CONSTANTS[formula, p] = constants
    return constants


def _masked_affine_forward(
    x: torch.Tensor, key: torch.Tensor, p: float, broadcast_dims: list[int], formula: str
) -> torch.Tensor:
    constants = _AFFINE_CONSTANTS.get((formula, p)) or _affine_constants(formula, p)
    threshold, keep_scale, keep_shift, drop_value = constants
    return dispatch.masked_affine(x, key, threshold, broadcast_dims, keep_scale, keep_shift, drop_value)


#: ``masked_affine(x, key, rate, broadcast_dims, formula, rate_name)``:
#: ``where(keep, x * keep_scale + keep_shift, drop_value)`` with the mask of ``(key, rate)`` and
#: the constants of ``formula`` at the rate (see :data:`AFFINE_FORMULAS`).
masked_affine = RateOp(
    "masked_affine",
    "int[] broadcast_dims, str formula",
    _masked_affine_forward,
    grad_options=lambda options: (options[0], grad_formula(options[1]), options[2]),
)


# --- Gaussian noise --------------------------------------------------------------------------


def _gaussian_dropout_forward(
    x: torch.Tensor, key: torch.Tensor, p: float, broadcast_dims: list[int]
) -> torch.Tensor:
    if p == 0.0:
        return x
    if p == 1.0:  # the std diverges; zeros are the defined output (never NaN, even for inf)
        return torch.zeros_like(x)
    return reference.gaussian_scale(x, key, gaussian_dropout_std(p), broadcast_dims)


def _gaussian_noise_forward(
    x: torch.Tensor, key: torch.Tensor, std: float, broadcast_dims: list[int]
) -> torch.Tensor:
    return x if std == 0.0 else reference.gaussian_shift(x, key, std, broadcast_dims)


#: ``gaussian_dropout(x, key, rate, broadcast_dims, rate_name)``: ``x * (1 + sigma n)`` with
#: ``sigma = sqrt(p / (1 - p))``; zeros at ``p = 1``.
gaussian_dropout = RateOp("gaussian_dropout", "int[] broadcast_dims", _gaussian_dropout_forward)
#: ``gaussian_noise(x, key, std, broadcast_dims, rate_name)``: ``x + std n`` (``std`` a finite
#: float >= 0); the gradient is the incoming one.
gaussian_noise = RateOp(
    "gaussian_noise",
    "int[] broadcast_dims",
    _gaussian_noise_forward,
    backward="identity",
    check=check_nonnegative,
    bounds=(0.0, sys.float_info.max),
)


# --- fused bias + dropout + residual ---------------------------------------------------------


def _bias_dropout_add_forward(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, rate: Rate
) -> torch.Tensor:
    p = rate_value(rate)
    return dispatch.bias_dropout_add(x, bias, residual, key, drop_threshold(p), inverted_scale(p))


def _bias_dropout_add_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _save_rate(ctx, inputs[3], inputs[4])
    ctx.bias_shape = inputs[1].shape
    ctx.residual_shape = inputs[2].shape


def _bias_dropout_add_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    key, rate = _saved_rate(ctx)
    grad_x = grad_bias = grad_residual = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        with _Replaying():
            grad_x = masked_affine(grad, key, rate, [], "inverted", "p")
        if ctx.needs_input_grad[1]:
            grad_bias = grad_x.sum_to_size(ctx.bias_shape)
    if ctx.needs_input_grad[2]:
        grad_residual = grad.sum_to_size(ctx.residual_shape)
    return grad_x if ctx.needs_input_grad[0] else None, grad_bias, grad_residual, None, None


@torch.library.custom_op("dropkit::bias_dropout_add", mutates_args=())
def _bias_dropout_add_op(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, rate: torch.Tensor
) -> torch.Tensor:
    return _bias_dropout_add_forward(x, bias, residual, key, rate)


@_bias_dropout_add_op.register_fake
def _(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, rate: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(x)


_bias_dropout_add_op.register_autograd(_bias_dropout_add_backward, setup_context=_bias_dropout_add_setup)


class _BiasDropoutAdd(torch.autograd.Function):
    # setup_context style, with jvp and vmap rules, so that the torch.func transforms can run it.
    @staticmethod
    def forward(*inputs: Any) -> torch.Tensor:
        return _bias_dropout_add_forward(*inputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _bias_dropout_add_setup(ctx, inputs, output)
        ctx.forward_key, ctx.forward_rate = inputs[3], inputs[4]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return _bias_dropout_add_backward(ctx, grad)

    @staticmethod
    def jvp(ctx: Any, x_t: Any, bias_t: Any, residual_t: Any, *_: Any) -> torch.Tensor:
        # d(residual + where(keep, (x + bias) / q, 0)) = d residual + where(keep, (dx + dbias) / q, 0)
        dropped = x_t if bias_t is None else (bias_t if x_t is None else x_t + bias_t)
        tangent = None
        if dropped is not None:
            with _Replaying():
                tangent = masked_affine(dropped, ctx.forward_key, ctx.forward_rate, [], "inverted", "p")
        if tangent is None:
            return residual_t  # some tangent is always given
        return tangent if residual_t is None else tangent + residual_t

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *inputs: Any) -> tuple[torch.Tensor, int | None]:
        return _vmap_loop("bias_dropout_add", info, in_dims, inputs, 3, bias_dropout_add)


def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, key: torch.Tensor, rate: Rate
) -> torch.Tensor:
    """``residual + where(keep, (x + bias) / q, 0)`` with the element mask of ``x``."""
    if eager_fast_path(x, bias, residual, key) and _plain_rate(rate):
        return _BiasDropoutAdd.apply(x, bias, residual, key, rate)
    return _bias_dropout_add_op(x, bias, residual, key, as_rate_tensor(rate))


@torch.library.custom_op("dropkit::checked_rate", mutates_args=())
def _checked_rate_op(rate: torch.Tensor, name: str, probability: bool) -> torch.Tensor:
    rate_value(rate, name, check_probability if probability else check_nonnegative)
    return rate.clone()


@_checked_rate_op.register_fake
def _(rate: torch.Tensor, name: str, probability: bool) -> torch.Tensor:
    return torch.empty_like(rate)


def checked_rate(rate: torch.Tensor, name: str = "p", probability: bool = True) -> torch.Tensor:
    """``rate`` (a one-element tensor) once its value is validated: a probability in ``[0, 1]``,
    or a finite float ``>= 0`` (``probability=False``), else a ValueError naming ``name``.

    For code that computes with a rate tensor directly (keep masks, scales) instead of passing it
    to an op that reads it: eagerly the value is read now; in a compiled graph a custom op reads
    it when the graph runs, so a bad value in a holder is an error there too, never a silent
    threshold past the ends."""
    if eager_fast_path(rate):
        # The range test first (cheaper than the check, which runs to raise, NaN included).
        if not 0.0 <= float(rate) <= (1.0 if probability else sys.float_info.max):
            rate_value(rate, name, check_probability if probability else check_nonnegative)
        return rate
    return _checked_rate_op(rate, name, probability)


def zeros_like_connected(input: torch.Tensor) -> torch.Tensor:
    """Exact zeros that stay connected to autograd (zero gradient), never ``input * 0`` (NaN for
    inf): the masked affine map at ``p = 1``, which ignores the key and consumes no draw."""
    unused_key = torch.zeros(3, dtype=torch.int64, device=input.device)
    return masked_affine(input, unused_key, 1.0, [], "inverted", "p")
