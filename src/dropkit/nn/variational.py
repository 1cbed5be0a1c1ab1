r"""Variational dropout (Kingma et al. 2015): Gaussian dropout with learned noise variances.

Every weight is multiplied by Gaussian noise :math:`\xi \sim \mathcal{N}(1, \alpha)` whose variance
:math:`\alpha` is learned.  The layers here never sample weights: by the *local
reparameterization trick* they sample the pre-activations, which given the input are exactly
Gaussian, so each example in a batch gets independent weight noise at the cost of two matrix
products.  Noise comes from dropkit's counter-based engine (:func:`dropkit.engine.masks.normal_noise`)
and is drawn in training only; evaluation returns the mean, deterministically.

Reference: Kingma, Salimans, Welling, "Variational Dropout and the Local Reparameterization Trick",
NeurIPS 2015, arXiv:1506.02557.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dropkit._validation import check_floating_tensor, check_rank
from dropkit.engine.masks import normal_noise
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.nn._base import _RandomLayer

__all__ = [
    "KINGMA_C1",
    "KINGMA_C2",
    "KINGMA_C3",
    "KINGMA_CONSTANT",
    "VariationalConv1d",
    "VariationalConv2d",
    "VariationalConv3d",
    "VariationalLinear",
    "kingma_kl",
]

KINGMA_C1 = 1.16145124
KINGMA_C2 = -1.50204118
KINGMA_C3 = 0.58629921
#: The free constant of Kingma's approximation, chosen so that the KL is 0 at ``alpha = 1`` (the
#: largest allowed noise) and positive below it: the approximate ``-KL`` increases on ``(0, 1]``.
KINGMA_CONSTANT = -(KINGMA_C1 + KINGMA_C2 + KINGMA_C3)

#: Added to the pre-activation variance before the square root, so the gradient stays finite
#: where the variance is exactly 0 (zero input, zero padding); as in the official SVD code.
VARIANCE_EPS = 1e-8


def plus_eps(value: torch.Tensor, eps: float) -> torch.Tensor:
    """``value + eps`` for a floating ``value >= 0`` whose square root or log is differentiated: in
    a dtype where ``eps`` rounds to 0 (``1e-8`` in float16) the sum is floored at the dtype's
    smallest positive number (``2**-24`` in float16), so that only an exact 0 changes and its
    gradient is 0 (the floor's mask) instead of ``inf * 0 = NaN``.  Other dtypes: the plain sum."""
    finfo = torch.finfo(value.dtype)
    smallest = finfo.tiny * finfo.eps  # the smallest subnormal: eps <= half of it rounds to 0
    shifted = value + eps
    return shifted.clamp_min(smallest) if eps <= smallest / 2 else shifted


_CONV: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TORCH_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def kingma_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    r"""Elementwise approximate KL divergence of Kingma et al. (2015), with ``alpha`` clipped to 1.

    .. math::
        -\mathrm{KL} \approx C + \tfrac12 \log\alpha + c_1\alpha + c_2\alpha^2 + c_3\alpha^3,
        \quad \alpha = \exp(\min(\log\alpha, 0)),

    with :math:`c_1 = 1.16145124`, :math:`c_2 = -1.50204118`, :math:`c_3 = 0.58629921`.  The KL
    to the improper log-uniform prior is only defined up to a constant; here
    :math:`C = -(c_1 + c_2 + c_3)`, so the result is 0 at :math:`\alpha = 1` and positive below.

    Args:
        log_alpha: :math:`\log\alpha`, any shape.

    Returns:
        The KL of every element, same shape as ``log_alpha``.

    Examples::

        >>> import torch
        >>> from dropkit.nn.variational import kingma_kl
        >>> [round(v, 4) for v in kingma_kl(torch.tensor([0.0, -1.0])).tolist()]
        [0.0, 0.4925]
    """
    log_alpha = log_alpha.clamp(max=0.0)
    alpha = log_alpha.exp()
    neg_kl = (
        KINGMA_CONSTANT
        + 0.5 * log_alpha
        + alpha * (KINGMA_C1 + alpha * (KINGMA_C2 + alpha * KINGMA_C3))  # Horner
    )
    return -neg_kl


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_finite_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_bias(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"bias must be a bool, got {type(value).__name__} ({value!r})")
    return value


def _ntuple(value: object, n: int, name: str, minimum: int) -> tuple[int, ...]:
    is_sequence = isinstance(value, Sequence) and not isinstance(value, str)
    items: Sequence[object] = value if is_sequence else (value,) * n  # type: ignore[assignment]
    if len(items) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    result = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must contain ints, got {value!r}")
        if item < minimum:
            raise ValueError(f"{name} entries must be >= {minimum}, got {value!r}")
        result.append(item)
    return tuple(result)


# ---------------------------------------------------------------------------------------------
# shared machinery


class _LocalReparameterization(_RandomLayer):
    """A linear or convolutional layer with Gaussian weights, sampled by local reparameterization.

    Subclasses define the variance of every weight (:meth:`_weight_variance`) and the weights used
    in evaluation (:meth:`_eval_weight`).  The geometry is set up by :meth:`_setup_linear` or
    :meth:`_setup_conv`.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self._conv_dims = 0

    # -- geometry ------------------------------------------------------------------------------

    def _setup_linear(self, in_features: int, out_features: int, bias: bool, factory: dict[str, Any]) -> None:
        self.in_features = _check_positive_int(in_features, "in_features")
        self.out_features = _check_positive_int(out_features, "out_features")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self._setup_bias(bias, out_features, factory)

    def _setup_conv(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int],
        padding: str | int | Sequence[int],
        dilation: int | Sequence[int],
        groups: int,
        bias: bool,
        factory: dict[str, Any],
    ) -> None:
        self._conv_dims = dims
        self.in_channels = _check_positive_int(in_channels, "in_channels")
        self.out_channels = _check_positive_int(out_channels, "out_channels")
        self.groups = _check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups, got groups={groups}"
            )
        self.kernel_size = _ntuple(kernel_size, dims, "kernel_size", 1)
        self.stride = _ntuple(stride, dims, "stride", 1)
        self.dilation = _ntuple(dilation, dims, "dilation", 1)
        self.padding: str | tuple[int, ...]
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride!r}")
            self.padding = padding
        else:
            self.padding = _ntuple(padding, dims, "padding", 0)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self._setup_bias(bias, out_channels, factory)

    def _setup_bias(self, bias: bool, size: int, factory: dict[str, Any]) -> None:
        if _check_bias(bias):
            self.bias = nn.Parameter(torch.empty(size, **factory))
        else:
            self.register_parameter("bias", None)
        # The initialization of torch.nn.Linear / torch.nn.ConvNd.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def _geometry_repr(self) -> str:
        if self._conv_dims == 0:
            return (
                f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}"
            )
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        )
        if self.padding != (0,) * self._conv_dims:
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * self._conv_dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + f", bias={self.bias is not None}"

    def _check_input(self, input: object) -> torch.Tensor:
        input = check_floating_tensor(input)
        name = type(self).__name__
        if self._conv_dims == 0:
            if input.dim() == 0 or input.shape[-1] != self.in_features:
                raise ValueError(
                    f"{name} expects input of shape (*, {self.in_features}), got {tuple(input.shape)}"
                )
            return input
        dims = self._conv_dims
        check_rank(input, (dims + 1, dims + 2), name, "(N, C, *spatial) or (C, *spatial)")
        channels = input.shape[-dims - 1]
        if channels != self.in_channels:
            raise ValueError(
                f"{name} expects {self.in_channels} input channels, got input of shape {tuple(input.shape)}"
            )
        return input

    def _affine(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._conv_dims == 0:
            return F.linear(input, weight, bias)
        conv = _CONV[self._conv_dims]
        return conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _plain_layer(self, weight: torch.Tensor) -> nn.Module:
        """A ``torch.nn.Linear`` / ``ConvNd`` holding ``weight`` (detached) and this layer's bias."""
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        layer: nn.Module
        if self._conv_dims == 0:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **factory)
        else:
            layer = _TORCH_CONV[self._conv_dims](
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups,
                bias=self.bias is not None,
                **factory,
            )
        parameters = dict(layer.named_parameters())
        with torch.no_grad():
            parameters["weight"].copy_(weight)
            if self.bias is not None:
                parameters["bias"].copy_(self.bias)
        return layer

    # -- the distribution ----------------------------------------------------------------------

    def _weight_variance(self) -> torch.Tensor:
        raise NotImplementedError

    def _eval_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def kl(self) -> torch.Tensor:
        raise NotImplementedError

    def regularization(self) -> torch.Tensor:
        """The term this layer adds to the loss: :meth:`kl` (see :mod:`dropkit.nn.regularization`)."""
        return self.kl()

    def moments(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean :math:`\gamma` and variance :math:`\delta` of the training pre-activation.

        :math:`\gamma` is the layer applied with the mean weights and the bias, :math:`\delta`
        the layer applied to :math:`x^2` with the weight variances and no bias.
        """
        input = self._check_input(input)
        weight: torch.Tensor = self.weight
        weight_variance = self._weight_variance()
        mask = self._training_mask()
        if mask is not None:
            weight, weight_variance = weight * mask, weight_variance * mask
        mean = self._affine(input, weight, self.bias)
        variance = self._affine(input * input, weight_variance, None)
        return mean, variance

    def _training_mask(self) -> torch.Tensor | None:
        """Weights used in training (1) or pruned from it (0); ``None``: all of them."""
        return None

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sample the pre-activation in training, return its mean in eval.

        ``seed`` (int or key) or ``generator`` fix the noise of a training call; eval ignores them.
        """
        input = self._check_input(input)
        check_seed(seed, generator)
        if not self.training:
            return self._affine(input, self._eval_weight(), self.bias)
        key = resolve_key(input, self._key(input, seed, generator), generator)
        mean, variance = self.moments(input)
        noise = normal_noise(key, tuple(mean.shape), mean.dtype).to(mean.dtype)
        return mean + torch.sqrt(plus_eps(variance, VARIANCE_EPS)) * noise


# ---------------------------------------------------------------------------------------------
# Kingma et al. 2015


class _VariationalBase(_LocalReparameterization):
    log_alpha: nn.Parameter

    def _setup_alpha(self, alpha_shape: str, init_log_alpha: float, factory: dict[str, Any]) -> None:
        if not isinstance(alpha_shape, str):
            raise TypeError(f"alpha_shape must be a str, got {type(alpha_shape).__name__} ({alpha_shape!r})")
        if alpha_shape not in ("weight", "unit"):
            raise ValueError(f"alpha_shape must be 'weight' or 'unit', got {alpha_shape!r}")
        value = _check_finite_float(init_log_alpha, "init_log_alpha")
        if value > 0.0:
            raise ValueError(f"init_log_alpha must be <= 0 (alpha <= 1), got {init_log_alpha!r}")
        self.alpha_shape = alpha_shape
        # "unit": one alpha per input feature / channel, shared by the weights that read it.
        shape = self.weight.shape if alpha_shape == "weight" else self.weight.shape[1:2]
        if alpha_shape == "unit" and self._conv_dims:
            shape = torch.Size([self.in_channels])
        self.log_alpha = nn.Parameter(torch.full(shape, value, **factory))

    def weight_log_alpha(self) -> torch.Tensor:
        r""":math:`\log\alpha` of every weight (shape of ``weight``), unclipped."""
        if self.alpha_shape == "weight":
            return self.log_alpha
        weight = self.weight
        if self._conv_dims == 0:
            return self.log_alpha.expand_as(weight)
        # Input channel g * (C_in / groups) + j is read by weight[o, j] of the outputs o of group g.
        groups = self.groups
        per_group = self.log_alpha.reshape(groups, 1, -1, *([1] * self._conv_dims))
        return per_group.expand(groups, weight.shape[0] // groups, *weight.shape[1:]).reshape(weight.shape)

    @property
    def alpha(self) -> torch.Tensor:
        r"""The noise variance :math:`\alpha` of every weight, clipped to at most 1."""
        return self.weight_log_alpha().clamp(max=0.0).exp()

    def _weight_variance(self) -> torch.Tensor:
        return self.alpha * self.weight * self.weight

    def _eval_weight(self) -> torch.Tensor:
        return self.weight

    def kl(self) -> torch.Tensor:
        """Approximate KL to the log-uniform prior, summed over all weights (see :func:`kingma_kl`)."""
        return kingma_kl(self.weight_log_alpha()).sum()

    def export(self) -> nn.Module:
        """A plain ``torch.nn`` layer with the mean weights: the eval-mode function of this layer."""
        return self._plain_layer(self.weight.detach())

    def extra_repr(self) -> str:
        return self._geometry_repr() + f", alpha_shape={self.alpha_shape!r}"


_VARIATIONAL_DOC = r"""

    Each weight is :math:`w = \theta\,\xi` with :math:`\xi \sim \mathcal{{N}}(1, \alpha)`.  By the
    local reparameterization trick the pre-activation is sampled directly,

    .. math::
        b \sim \mathcal{{N}}(\gamma, \delta), \qquad
        \gamma = A\theta + \text{{bias}}, \qquad
        \delta = (A \circ A)(\alpha \circ \theta \circ \theta),

    with independent noise per example and output unit ({geometry}).  In eval the layer returns
    :math:`\gamma` with no noise.  :math:`\alpha = \exp(\log\alpha)` is learned and clipped to
    at most 1 (:math:`\log\alpha \le 0`); :meth:`kl` (also :meth:`regularization`) is the
    approximate KL divergence to the log-uniform prior, summed over all weights, which should be
    added to the loss (scaled by 1 / number of training examples for a per-example loss).

    Args:
        {args}
        bias: learn an additive bias (kept out of the variance). Default: ``True``
        alpha_shape: ``"weight"`` for one :math:`\alpha` per weight (Kingma's independent weight
            noise) or ``"unit"`` for one per input {unit}, shared by its weights. Default: ``"weight"``
        init_log_alpha: initial :math:`\log\alpha`, at most 0. Default: -2.0
        device, dtype: of the parameters.

    Shape:
        {shape}

    Examples::

        {example}

    Reference: Kingma, Salimans, Welling, "Variational Dropout and the Local Reparameterization
    Trick", NeurIPS 2015.
    """


class VariationalLinear(_VariationalBase):
    __doc__ = (
        r"""A linear layer with variational Gaussian dropout (Kingma et al. 2015)."""
        + _VARIATIONAL_DOC.format(
            geometry=r"for a linear layer :math:`A` is the input batch",
            args="in_features: size of each input sample.\n        out_features: size of each output sample.",
            unit="feature",
            shape=r"""- Input: :math:`(*, H_{in})`.
        - Output: :math:`(*, H_{out})`.""",
            example="""\
>>> import torch
        >>> from dropkit.nn.variational import VariationalLinear
        >>> layer = VariationalLinear(4, 3)
        >>> x = torch.randn(5, 4)
        >>> layer(x, seed=0).shape
        torch.Size([5, 3])
        >>> bool(torch.equal(layer.eval()(x), torch.nn.functional.linear(x, layer.weight, layer.bias)))
        True
        >>> bool(layer.kl() > 0)
        True""",
        )
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        alpha_shape: str = "weight",
        init_log_alpha: float = -2.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self._setup_linear(in_features, out_features, bias, factory)
        self._setup_alpha(alpha_shape, init_log_alpha, factory)


class _VariationalConvNd(_VariationalBase):
    _dims = 0

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        alpha_shape: str = "weight",
        init_log_alpha: float = -2.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self._setup_conv(
            self._dims,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            factory,
        )
        self._setup_alpha(alpha_shape, init_log_alpha, factory)


_CONV_ARGS = """in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as for
            ``torch.nn.Conv{n}d`` (``padding`` an int, ints, ``"same"`` or ``"valid"``; zero padding)."""


def _conv_doc(n: int, spatial: str) -> str:
    return (
        f"A {n}-D convolution with variational Gaussian dropout (Kingma et al. 2015)."
        + _VARIATIONAL_DOC.format(
            geometry=r"for a convolution :math:`A\theta` is the convolution of the input and "
            r":math:`(A \circ A)` the same convolution of the squared input",
            args=_CONV_ARGS.format(n=n),
            unit="channel",
            shape=rf"""- Input: :math:`(N, C_{{in}}, {spatial})` or :math:`(C_{{in}}, {spatial})`.
        - Output: :math:`(N, C_{{out}}, *)` or :math:`(C_{{out}}, *)`, sizes as for ``torch.nn.Conv{n}d``.""",
            example=f"""\
>>> import torch
        >>> from dropkit.nn.variational import VariationalConv{n}d
        >>> layer = VariationalConv{n}d(2, 3, 3, padding=1, alpha_shape="unit")
        >>> layer(torch.randn(4, 2{", 5" * n}), seed=0).shape
        torch.Size([4, 3{", 5" * n}])""",
        )
    )


class VariationalConv1d(_VariationalConvNd):
    __doc__ = _conv_doc(1, "L")
    _dims = 1


class VariationalConv2d(_VariationalConvNd):
    __doc__ = _conv_doc(2, "H, W")
    _dims = 2


class VariationalConv3d(_VariationalConvNd):
    __doc__ = _conv_doc(3, "D, H, W")
    _dims = 3
