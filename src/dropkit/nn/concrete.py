"""Concrete dropout: a wrapper that learns the dropout rate of a layer's input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as torch_F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

from dropkit._deprecation import (
    rename_state_dict_prefix,
    renamed_arguments,
    upgrade_renamed_submodule,
    warn_deprecated,
)
from dropkit._validation import _check_real, check_min_rank, check_nonnegative, check_rank, normalize_dims
from dropkit.functional._common import SeedLike
from dropkit.functional._seed import check_seed
from dropkit.functional.concrete import check_temperature, concrete_dropout
from dropkit.nn._base import _RandomLayer

__all__ = ["ConcreteDropout", "concrete_regularizers"]

_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _check_positive(value: object, name: str) -> float:
    as_float = _check_real(value, name)
    if not (math.isfinite(as_float) and as_float > 0.0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return as_float


def concrete_regularizers(
    length_scale: float, num_train: int, *, precision: float = 1.0, y_std: float = 1.0
) -> tuple[float, float]:
    r"""The regularizer weights of Gal et al.: :math:`(l^2 / (\tau_s N),\ 2 / (\tau_s N))`.

    With the defaults (:math:`\tau_s = 1`) these are the paper's :math:`(l^2 / N,\ 2 / N)`, to
    add to a loss that is twice the per-point negative log-likelihood.  For a regression loss in
    mean squared error units, divide by the model precision: a Gaussian likelihood of
    precision :math:`\tau` (``precision``, in the units of the original targets) fitted to
    targets standardized by their std :math:`\sigma_y` (``y_std``) has precision
    :math:`\tau_s = \tau \sigma_y^2` in the standardized units, and
    ``MSE + regularization`` is then the per-point negative ELBO times :math:`2/\tau_s` (see
    :mod:`dropkit.experiments.uci.concrete`).

    Args:
        length_scale: prior length-scale :math:`l > 0` of the weights.
        num_train: number of training points :math:`N \ge 1`.
        precision: model precision :math:`\tau > 0` of a Gaussian likelihood. Default: 1.0
        y_std: std :math:`\sigma_y > 0` by which the targets were standardized. Default: 1.0

    Returns:
        ``(weight_regularizer, dropout_regularizer)`` to pass to :class:`ConcreteDropout`.

    Examples::

        >>> from dropkit.nn.concrete import concrete_regularizers
        >>> concrete_regularizers(0.5, 100)
        (0.0025, 0.02)
        >>> concrete_regularizers(0.5, 100, precision=0.5, y_std=2.0)  # tau_s = 2: (0.25/200, 2/200)
        (0.00125, 0.01)
    """
    scale = _check_positive(length_scale, "length_scale")
    if isinstance(num_train, bool) or not isinstance(num_train, int):
        raise TypeError(f"num_train must be an int, got {type(num_train).__name__} ({num_train!r})")
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train!r}")
    tau = _check_positive(precision, "precision")
    std = _check_positive(y_std, "y_std")
    tau_s = tau * std**2
    return scale**2 / (tau_s * num_train), 2.0 / (tau_s * num_train)


class ConcreteDropout(_RandomLayer):
    r"""Apply concrete dropout with a learned rate to the input of ``module``, then ``module``.

    The drop rate :math:`p = \sigma(\ell)` is a parameter (``p_logit`` holds :math:`\ell`).  While
    training, the input is multiplied by a relaxed Bernoulli keep mask,

    .. math::
        z = \sigma\!\left(\frac{\log p - \log(1-p) + \log u - \log(1-u)}{t}\right), \quad
        u \sim U(0, 1), \qquad y = \mathrm{module}\!\left(x \odot \frac{1 - z}{1 - p}\right),

    which is differentiable in :math:`p`; :math:`t \to 0` recovers hard dropout.  For
    :class:`~torch.nn.Linear` one uniform is drawn per element (element form); for
    ``Conv1d``/``Conv2d``/``Conv3d`` one per (sample, input channel), shared over the spatial
    dims (channel form).  Eval mode applies ``module`` to the unchanged input: no noise.

    Add :meth:`regularization` to the loss (e.g. through
    ``dropkit.nn.regularization.regularization_loss(model)``):

    .. math::
        \lambda_w \frac{\sum W^2}{1 - p} + \lambda_p K \bigl(p \log p + (1-p) \log(1-p)\bigr),

    with :math:`W` the wrapped layer's ``weight`` (its bias is not penalized), :math:`K` the input
    dimensionality (``in_features``, or ``in_channels`` in channel form), :math:`\lambda_w` =
    ``weight_regularizer`` and :math:`\lambda_p` = ``dropout_regularizer``; the paper's choice is
    :math:`\lambda_w = l^2 / N`, :math:`\lambda_p = 2 / N` (see :func:`concrete_regularizers`).
    The defaults are the constants of the authors' code.

    Unlike common ports, the noise is one uniform per element or channel (not one scalar for the
    whole tensor), biases are not penalized, and eval mode is noise-free.

    The wrapped layer is ``self.module``: ``state_dict`` keys are ``module.weight``,
    ``module.bias`` and ``p_logit`` (checkpoints saved with the former ``layer.`` prefix still
    load).

    Args:
        module: the ``nn.Linear`` or ``nn.Conv1d/2d/3d`` whose input is dropped (not lazy).
            (Formerly ``layer``, a deprecated keyword alias for one release.)
        init_p: initial drop rate, in ``(0, 1)``. Default: 0.1
        temperature: relaxation temperature :math:`t > 0`. Default: 0.1
        weight_regularizer: :math:`\lambda_w \ge 0`. Default: 1e-6
        dropout_regularizer: :math:`\lambda_p \ge 0`. Default: 1e-5
        broadcast_dims: dims of the input sharing one uniform, overriding the form chosen from
            the layer type (``None``), e.g. ``0`` to tie the noise over time of ``(T, N, H)``
            input to a Linear. Default: ``None``

    Shape:
        - Input: what ``module`` accepts; for convolutions :math:`(N, C, *)` or unbatched
          :math:`(C, *)`.
        - Output: what ``module`` returns.

    Examples::

        >>> import torch, dropkit
        >>> from dropkit.nn.concrete import ConcreteDropout, concrete_regularizers
        >>> dropkit.manual_seed(0)
        >>> wr, dr = concrete_regularizers(length_scale=1e-2, num_train=1000)
        >>> m = ConcreteDropout(torch.nn.Linear(8, 4), init_p=0.2,
        ...                     weight_regularizer=wr, dropout_regularizer=dr)
        >>> round(m.p, 4)
        0.2
        >>> loss = m(torch.randn(16, 8)).pow(2).mean() + m.regularization()
        >>> loss.backward(); m.p_logit.grad is not None
        True
        >>> conv = ConcreteDropout(torch.nn.Conv2d(3, 5, 3))  # one uniform per (sample, channel)
        >>> conv(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 5, 6, 6])

    Reference: Gal, Hron, Kendall, "Concrete Dropout", NeurIPS 2017.
    """

    p_logit: nn.Parameter

    @renamed_arguments(layer="module")
    def __init__(
        self,
        module: nn.Module,
        init_p: float = 0.1,
        *,
        temperature: float = 0.1,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 1e-5,
        broadcast_dims: int | Sequence[int] | None = None,
    ) -> None:
        if isinstance(module, LazyModuleMixin) or type(module) not in (nn.Linear, *_CONVS):
            raise TypeError(
                "module must be an initialized nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, "
                f"got {type(module).__name__}"
            )
        init = _check_real(init_p, "init_p")
        if not 0.0 < init < 1.0:
            raise ValueError(f"init_p must be in (0, 1), got {init_p!r}")
        temperature = check_temperature(temperature)
        weight_regularizer = check_nonnegative(weight_regularizer, "weight_regularizer")
        dropout_regularizer = check_nonnegative(dropout_regularizer, "dropout_regularizer")
        if isinstance(broadcast_dims, int):
            broadcast_dims = (broadcast_dims,)
        if broadcast_dims is not None:
            normalize_dims(broadcast_dims, 64, "broadcast_dims")  # types now, range per call
            broadcast_dims = tuple(broadcast_dims)
        super().__init__()  # validate first: a refused construction allocates no RNG stream
        self.module: nn.Linear | _ConvNd = cast("nn.Linear | _ConvNd", module)
        self.temperature = temperature
        self.weight_regularizer = weight_regularizer
        self.dropout_regularizer = dropout_regularizer
        self.broadcast_dims: tuple[int, ...] | None = broadcast_dims
        weight = self.module.weight
        logit = math.log(init) - math.log1p(-init)
        self.p_logit = nn.Parameter(torch.tensor(logit, dtype=weight.dtype, device=weight.device))
        rename_state_dict_prefix(self, "layer", "module")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        upgrade_renamed_submodule(self, "layer", "module")  # pickled whole before the rename

    @property
    def layer(self) -> nn.Linear | _ConvNd:
        """Deprecated alias of ``module`` (the wrapped layer), for one release."""
        warn_deprecated("ConcreteDropout.layer is deprecated; use ConcreteDropout.module")
        return self.module

    @property
    def p(self) -> float:
        """The current drop rate :math:`\\sigma(\\ell)` as a float."""
        return float(torch.sigmoid(self.p_logit.detach()))

    @property
    def input_dim(self) -> int:
        """:math:`K`: ``in_features`` of a Linear, ``in_channels`` of a convolution."""
        layer = self.module
        if isinstance(layer, nn.Linear):
            return int(layer.in_features)
        return int(layer.in_channels)

    def _noise_dims(self, input: torch.Tensor) -> tuple[int, ...]:
        if self.broadcast_dims is not None:
            return self.broadcast_dims
        spatial = _CONVS.get(type(self.module))
        if spatial is None:
            check_min_rank(input, 1, "ConcreteDropout(Linear)", "(*, in_features)")
            return ()
        name = type(self.module).__name__
        check_rank(input, (spatial + 1, spatial + 2), f"ConcreteDropout({name})", "(N, C, *) or (C, *)")
        first_spatial = input.dim() - spatial
        return tuple(range(first_spatial, input.dim()))

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Drop the input (training only), then apply ``module``; ``seed``/``generator`` fix the noise."""
        check_seed(seed, generator)
        if self.training:
            dims = self._noise_dims(input)
            seed = self._key(input, seed, generator)
            input = concrete_dropout(
                input,
                self.p_logit,
                True,
                temperature=self.temperature,
                broadcast_dims=dims,
                seed=seed,
                generator=generator,
            )
        output: torch.Tensor = self.module(input)
        return output

    def regularization(self) -> torch.Tensor:
        r"""The layer's term :math:`\lambda_w \sum W^2/(1-p) + \lambda_p K (p\log p + (1-p)\log(1-p))`.

        A 0-d tensor, differentiable in ``p_logit`` and the weight (biases excluded).
        """
        weight = self.module.weight
        logit = self.p_logit
        p = torch.sigmoid(logit)
        weight_term = self.weight_regularizer * weight.pow(2).sum() / torch.sigmoid(-logit)
        neg_entropy = p * torch_F.logsigmoid(logit) + (1.0 - p) * torch_F.logsigmoid(-logit)
        return weight_term + self.dropout_regularizer * self.input_dim * neg_entropy

    def extra_repr(self) -> str:
        extra = f"p={self.p:.4g}, temperature={self.temperature}"
        extra += f", weight_regularizer={self.weight_regularizer}"
        extra += f", dropout_regularizer={self.dropout_regularizer}"
        if self.broadcast_dims is not None:
            extra += f", broadcast_dims={self.broadcast_dims}"
        return extra
