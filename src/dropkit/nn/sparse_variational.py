r"""Sparse variational dropout (Molchanov et al. 2017): variational dropout that prunes weights.

Every weight has its own Gaussian posterior :math:`\mathcal{N}(\theta, \sigma^2)`, parameterized by
:math:`\theta` and :math:`\log\sigma^2` (additive reparameterization), and its dropout rate
:math:`\alpha = \sigma^2 / \theta^2` is unbounded: weights whose :math:`\log\alpha` passes a
threshold carry only noise and are pruned.  Training samples pre-activations by the local
reparameterization trick with dropkit's counter-based noise; evaluation uses the mean weights
with the pruned ones zeroed, and :meth:`~SparseVariationalLinear.export` gives the equivalent
plain ``torch.nn`` layer.

Reference: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017, arXiv:1701.05369.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dropkit._validation import check_bool
from dropkit.nn.variational import _check_finite_float, _LocalReparameterization, plus_eps

__all__ = [
    "MOLCHANOV_K1",
    "MOLCHANOV_K2",
    "MOLCHANOV_K3",
    "SparseVariationalConv1d",
    "SparseVariationalConv2d",
    "SparseVariationalConv3d",
    "SparseVariationalLinear",
    "molchanov_kl",
    "sparsity_report",
]

MOLCHANOV_K1 = 0.63576
MOLCHANOV_K2 = 1.87320
MOLCHANOV_K3 = 1.48695

#: Bounds of ``log_alpha`` (as in the official code) and the ``eps`` of ``log(theta^2 + eps)``.
LOG_ALPHA_MIN = -8.0
LOG_ALPHA_MAX = 8.0
THETA_EPS = 1e-8


def molchanov_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    r"""Elementwise approximate KL divergence of Molchanov et al. (2017).

    .. math::
        -\mathrm{KL} \approx k_1\,\sigma(k_2 + k_3\log\alpha) - \tfrac12\log(1 + \alpha^{-1}) - k_1,

    with :math:`k_1 = 0.63576`, :math:`k_2 = 1.87320`, :math:`k_3 = 1.48695`; the constant
    :math:`-k_1` makes the KL tend to 0 as :math:`\alpha \to \infty`, and the KL is positive.
    The approximation is within about 0.01 of the exact value for every :math:`\alpha`.

    Args:
        log_alpha: :math:`\log\alpha`, any shape.

    Returns:
        The KL of every element, same shape as ``log_alpha``.

    Examples::

        >>> import torch
        >>> from dropkit.nn.sparse_variational import molchanov_kl
        >>> [round(v, 4) for v in molchanov_kl(torch.tensor([-8.0, 0.0, 8.0])).tolist()]
        [4.6359, 0.4312, 0.0002]
    """
    neg_kl = (
        MOLCHANOV_K1 * torch.sigmoid(MOLCHANOV_K2 + MOLCHANOV_K3 * log_alpha)
        - 0.5 * F.softplus(-log_alpha)  # log(1 + 1/alpha), stable for any log_alpha
        - MOLCHANOV_K1
    )
    return -neg_kl


class _SparseVariationalBase(_LocalReparameterization):
    log_sigma2: nn.Parameter

    def _setup_sigma(
        self, init_log_sigma2: float, threshold: float, prune_in_training: bool, factory: dict[str, Any]
    ) -> None:
        value = _check_finite_float(init_log_sigma2, "init_log_sigma2")
        self.threshold = _check_finite_float(threshold, "threshold")
        self.prune_in_training = check_bool(prune_in_training, "prune_in_training")
        self.log_sigma2 = nn.Parameter(torch.full(self.weight.shape, value, **factory))

    @property
    def log_alpha(self) -> torch.Tensor:
        r""":math:`\log\alpha = \log\sigma^2 - \log(\theta^2 + 10^{-8})`, clipped to ``[-8, 8]``."""
        log_alpha = self.log_sigma2 - torch.log(plus_eps(self.weight * self.weight, THETA_EPS))
        return log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def keep_mask(self) -> torch.Tensor:
        """Boolean mask of the weights kept in eval: ``log_alpha < threshold``."""
        return self.log_alpha.detach() < self.threshold

    def _weight_variance(self) -> torch.Tensor:
        return self.log_alpha.exp() * self.weight * self.weight

    def _training_mask(self) -> torch.Tensor | None:
        # The mask is a constant of the step (detached): pruned weights get no gradient through
        # the likelihood, only the KL's, which keeps pushing their log alpha up.
        return self.keep_mask().to(self.weight.dtype) if self.prune_in_training else None

    def _eval_weight(self) -> torch.Tensor:
        return self.weight * self.keep_mask()

    def kl(self) -> torch.Tensor:
        """Approximate KL to the log-uniform prior, summed over the weights (see :func:`molchanov_kl`)."""
        return molchanov_kl(self.log_alpha).sum()

    def sparsity(self) -> float:
        """Fraction of the weights that are pruned (``log_alpha >= threshold``)."""
        return int((~self.keep_mask()).sum()) / self.weight.numel()

    def pruned_weight(self) -> torch.Tensor:
        """The mean weights with the pruned ones set to 0 (detached): the weights used in eval."""
        return (self.weight * self.keep_mask()).detach()

    def to_sparse(self, layout: str = "coo") -> torch.Tensor:
        """:meth:`pruned_weight` as a torch sparse tensor.

        Args:
            layout: ``"coo"`` (same shape as the weight, coalesced) or ``"csr"`` (the weight
                viewed as ``(out, -1)``, one row per output unit). Default: ``"coo"``
        """
        if not isinstance(layout, str):
            raise TypeError(f"layout must be a str, got {type(layout).__name__} ({layout!r})")
        weight = self.pruned_weight()
        if layout == "coo":
            return weight.to_sparse().coalesce()
        if layout == "csr":
            with warnings.catch_warnings():  # torch warns that CSR support is in beta
                warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
                return weight.reshape(weight.shape[0], -1).to_sparse_csr()
        raise ValueError(f"layout must be 'coo' or 'csr', got {layout!r}")

    def export(self) -> nn.Module:
        """A plain ``torch.nn.Linear`` / ``ConvNd`` with the pruned weights and the bias.

        It computes exactly what this layer computes in eval mode.
        """
        return self._plain_layer(self.pruned_weight())

    def extra_repr(self) -> str:
        text = self._geometry_repr() + f", threshold={self.threshold}"
        return text + (", prune_in_training=True" if self.prune_in_training else "")


_SPARSE_DOC = r"""

    Weights have the posterior :math:`w \sim \mathcal{{N}}(\theta, \sigma^2)` with
    :math:`\log\alpha = \operatorname{{clip}}(\log\sigma^2 - \log(\theta^2 + 10^{{-8}}), -8, 8)`.
    In training the pre-activation is sampled by local reparameterization,
    :math:`b \sim \mathcal{{N}}(\gamma, \delta)`, :math:`\gamma = A\theta + \text{{bias}}`,
    :math:`\delta = (A \circ A)(\alpha \circ \theta \circ \theta)` ({geometry}; the bias is
    deterministic and kept out of the variance).  In eval the layer is deterministic and uses
    :math:`\theta` with the weights of :math:`\log\alpha \ge` ``threshold`` set to 0.
    :meth:`kl` (also :meth:`regularization`) is the approximate KL divergence to the log-uniform
    prior summed over the weights; add it to the loss scaled by 1 / number of training examples,
    e.g. with a :class:`dropkit.nn.regularization.KLWarmup` weight.

    Args:
        {args}
        bias: learn an additive bias. Default: ``True``
        threshold: weights with :math:`\log\alpha \ge` ``threshold`` are pruned in eval. Default: 3.0
        init_log_sigma2: initial :math:`\log\sigma^2` of every weight. Default: -10.0
        prune_in_training: also drop the pruned weights from the training forward (mean and
            variance), as Molchanov et al. describe; the mask is re-read every call. Default:
            ``False`` (pruning in eval only).
        device, dtype: of the parameters.

    Shape:
        {shape}

    Examples::

        {example}

    Reference: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
    ICML 2017.
    """


class SparseVariationalLinear(_SparseVariationalBase):
    __doc__ = "A linear layer with sparse variational dropout (Molchanov et al. 2017)." + _SPARSE_DOC.format(
        geometry=r"for a linear layer :math:`A` is the input batch",
        args="in_features: size of each input sample.\n        out_features: size of each output sample.",
        shape=r"""- Input: :math:`(*, H_{in})`.
        - Output: :math:`(*, H_{out})`.""",
        example="""\
>>> import torch
        >>> from dropkit.nn.sparse_variational import SparseVariationalLinear
        >>> layer = SparseVariationalLinear(4, 3)
        >>> with torch.no_grad():
        ...     layer.log_sigma2[0] = 10.0  # the first output unit is pure noise
        >>> layer.sparsity()
        0.3333333333333333
        >>> x = torch.randn(5, 4)
        >>> y = layer.eval()(x)
        >>> bool(torch.equal(y, layer.export()(x)))
        True
        >>> layer.to_sparse().values().numel()
        8""",
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        threshold: float = 3.0,
        init_log_sigma2: float = -10.0,
        prune_in_training: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self._setup_linear(in_features, out_features, bias, factory)
        self._setup_sigma(init_log_sigma2, threshold, prune_in_training, factory)


class _SparseVariationalConvNd(_SparseVariationalBase):
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
        threshold: float = 3.0,
        init_log_sigma2: float = -10.0,
        prune_in_training: bool = False,
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
        self._setup_sigma(init_log_sigma2, threshold, prune_in_training, factory)


def _conv_doc(n: int, spatial: str) -> str:
    return (
        f"A {n}-D convolution with sparse variational dropout (Molchanov et al. 2017)."
        + _SPARSE_DOC.format(
            geometry=r"for a convolution, the convolutions of the input and of the squared input",
            args=f"""in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as for
            ``torch.nn.Conv{n}d`` (``padding`` an int, ints, ``"same"`` or ``"valid"``; zero padding).""",
            shape=rf"""- Input: :math:`(N, C_{{in}}, {spatial})` or :math:`(C_{{in}}, {spatial})`.
        - Output: :math:`(N, C_{{out}}, *)` or :math:`(C_{{out}}, *)`, sizes as for ``torch.nn.Conv{n}d``.""",
            example=f"""\
>>> import torch
        >>> from dropkit.nn.sparse_variational import SparseVariationalConv{n}d
        >>> layer = SparseVariationalConv{n}d(2, 3, 3, padding=1)
        >>> x = torch.randn(4, 2{", 5" * n})
        >>> layer(x, seed=0).shape
        torch.Size([4, 3{", 5" * n}])
        >>> bool(torch.equal(layer.eval()(x), layer.export()(x)))
        True""",
        )
    )


class SparseVariationalConv1d(_SparseVariationalConvNd):
    __doc__ = _conv_doc(1, "L")
    _dims = 1


class SparseVariationalConv2d(_SparseVariationalConvNd):
    __doc__ = _conv_doc(2, "H, W")
    _dims = 2


class SparseVariationalConv3d(_SparseVariationalConvNd):
    __doc__ = _conv_doc(3, "D, H, W")
    _dims = 3


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Kept and total weights of every sparse variational layer of ``model``, and the compression.

    Only the weights of sparse variational layers count (biases and other layers do not), as in
    the compression ratios of Molchanov et al.

    Args:
        model: any module; its sparse variational submodules (itself included) are reported.

    Returns:
        ``{"layers": {name: {"kept", "total", "sparsity"}}, "kept", "total", "sparsity",
        "compression"}`` where ``sparsity = 1 - kept / total`` and ``compression = total / kept``
        (``inf`` when everything is pruned; 1.0 and sparsity 0.0 when there is no such layer).
        The root module's name is ``""``.

    Examples::

        >>> import torch
        >>> from dropkit.nn.sparse_variational import SparseVariationalLinear, sparsity_report
        >>> model = torch.nn.Sequential(SparseVariationalLinear(4, 2), torch.nn.ReLU())
        >>> with torch.no_grad():
        ...     model[0].log_sigma2[1] = 10.0
        >>> report = sparsity_report(model)
        >>> report["layers"]["0"], report["compression"]
        ({'kept': 4, 'total': 8, 'sparsity': 0.5}, 2.0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers: dict[str, dict[str, Any]] = {}
    kept = total = 0
    for name, module in model.named_modules():
        if isinstance(module, _SparseVariationalBase):
            layer_kept = int(module.keep_mask().sum())
            layer_total = module.weight.numel()
            layers[name] = {
                "kept": layer_kept,
                "total": layer_total,
                "sparsity": 1.0 - layer_kept / layer_total,
            }
            kept += layer_kept
            total += layer_total
    if total == 0:
        return {"layers": layers, "kept": 0, "total": 0, "sparsity": 0.0, "compression": 1.0}
    compression = total / kept if kept else math.inf
    return {
        "layers": layers,
        "kept": kept,
        "total": total,
        "sparsity": 1.0 - kept / total,
        "compression": compression,
    }
