r"""Layers that add a term to the loss, and the KL warm-up schedule of variational dropout.

Any module with a ``regularization(self) -> torch.Tensor`` method takes part: the variational
dropout layers return their KL divergence, a concrete-dropout layer its weight and dropout
regularizer.  :func:`regularization_loss` sums those terms over a model, and :class:`KLWarmup`
gives the weight of the KL term per epoch.

A typical training step of sparse variational dropout (per-example mean loss, ``N`` training
examples)::

    loss = criterion(model(x), y) + warmup.weight(epoch) * regularization_loss(model) / N

Reference: Molchanov, Ashukha, Vetrov, "Variational Dropout Sparsifies Deep Neural Networks",
ICML 2017 (KL weight 0 until epoch 5, then linearly up to 1 by epoch 20).
"""

from __future__ import annotations

import math
import numbers
from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["KLWarmup", "Regularized", "regularization_loss"]


@runtime_checkable
class Regularized(Protocol):
    """A module that contributes ``regularization()`` (a 0-d tensor) to the training loss."""

    def regularization(self) -> torch.Tensor: ...


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """The sum of ``regularization()`` over ``model.modules()`` (the model itself included).

    Each module is visited once, however often it is shared.  Without any such module the result
    is a 0-d zero tensor on the device and with the dtype of the model's first floating-point
    parameter (the default dtype on the CPU without one).

    Args:
        model: any module.

    Returns:
        A 0-d tensor, differentiable with respect to the regularized parameters.

    Examples::

        >>> import torch
        >>> from dropkit.nn.regularization import regularization_loss
        >>> from dropkit.nn.sparse_variational import SparseVariationalLinear
        >>> inner = torch.nn.Sequential(SparseVariationalLinear(2, 1))
        >>> model = torch.nn.Sequential(SparseVariationalLinear(3, 2), inner)
        >>> loss = regularization_loss(model)
        >>> bool(torch.allclose(loss, model[0].kl() + model[1][0].kl()))
        True
        >>> regularization_loss(torch.nn.ReLU())
        tensor(0.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    total: torch.Tensor | None = None
    for module in model.modules():
        method = getattr(module, "regularization", None)
        if not callable(method):
            continue
        term = method()
        if not isinstance(term, torch.Tensor) or term.dim() != 0:
            got = type(term).__name__ if not isinstance(term, torch.Tensor) else f"shape {tuple(term.shape)}"
            raise TypeError(f"{type(module).__name__}.regularization() must return a 0-d tensor, got {got}")
        total = term if total is None else total + term
    if total is not None:
        return total
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return torch.zeros((), dtype=parameter.dtype, device=parameter.device)
    return torch.zeros(())


def _check_epoch(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    as_float = float(value)
    if not math.isfinite(as_float) or as_float < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return as_float


def _check_positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    as_float = float(value)
    if not (math.isfinite(as_float) and as_float > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return as_float


class KLWarmup:
    r"""Weight of the KL term: 0 until ``start_epoch``, then linear up to ``max_weight`` at ``end_epoch``.

    .. math::
        w(e) = w_{\max} \cdot \operatorname{clip}\!\left(\frac{e - e_0}{e_1 - e_0}, 0, 1\right)

    Epochs may be fractional (``epoch + step / steps_per_epoch``) to update every step.
    ``start_epoch == end_epoch`` is a step from 0 to ``max_weight``.

    Args:
        start_epoch: last epoch with weight 0, >= 0.
        end_epoch: first epoch with the full weight, >= ``start_epoch``.
        max_weight: the final weight, > 0. Default: 1.0

    Examples::

        >>> from dropkit.nn.regularization import KLWarmup
        >>> warmup = KLWarmup(5, 20)  # the official sparse variational dropout recipe
        >>> [warmup.weight(e) for e in (0, 5, 8, 20, 100)]
        [0.0, 0.0, 0.2, 1.0, 1.0]
    """

    def __init__(self, start_epoch: float, end_epoch: float, *, max_weight: float = 1.0) -> None:
        self.start_epoch = _check_epoch(start_epoch, "start_epoch")
        self.end_epoch = _check_epoch(end_epoch, "end_epoch")
        if self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch must be >= start_epoch ({start_epoch!r}), got {end_epoch!r}")
        self.max_weight = _check_positive(max_weight, "max_weight")

    def weight(self, epoch: float) -> float:
        """The KL weight at ``epoch`` (a number >= 0)."""
        epoch = _check_epoch(epoch, "epoch")
        if epoch >= self.end_epoch:
            return self.max_weight
        if epoch <= self.start_epoch:
            return 0.0
        return self.max_weight * (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)

    def __repr__(self) -> str:
        return (
            f"KLWarmup(start_epoch={self.start_epoch}, end_epoch={self.end_epoch}, "
            f"max_weight={self.max_weight})"
        )
