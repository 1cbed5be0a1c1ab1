"""DropConnect: a wrapper that drops the weights of an existing Linear or Conv layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dropkit._validation import check_bool, check_floating_tensor
from dropkit.engine.numerics import compute_dtype
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.functional.dropconnect import (
    apply_weight_mask,
    drop_connect_weight,
    example_keep_masks,
    gaussian_moment_matching,
    unless_zero_ratio,
    variance_ratio,
)
from dropkit.nn._base import _ProbabilityRate, _RandomLayer
from dropkit.ops import checked_rate

__all__ = ["DropConnect"]

_Wrapped = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INFERENCE = ("mean", "moment_matching")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DropConnect(_ProbabilityRate, _RandomLayer):
    r"""Drop individual weights of a wrapped ``nn.Linear`` or ``nn.Conv1d/2d/3d`` while training.

    Training draws :math:`R_{ij} \sim \mathrm{Bernoulli}(q)`, :math:`q = 1 - p`, and runs the
    wrapped layer with the weight :math:`\tilde W = (R \odot W)/q` (inverted scaling; the bias
    is never dropped), so :math:`\mathbb{E}[\tilde W] = W` and, for a linear layer,

    .. math::

        u = \tilde W v + b, \qquad \mathbb{E}[u] = W v + b, \qquad
        \mathrm{Var}[u] = \tfrac{p}{q}\,(W \odot W)(v \odot v).

    The wrapped layer keeps all its settings (stride, padding, dilation, groups, bias,
    ``padding_mode``) and its parameters: ``state_dict`` keys are the layer's under the
    prefix ``module.`` (e.g. ``module.weight``); nothing is deleted or re-registered.

    * ``per_example=False`` (default): one mask per forward, shared by the batch (the cheap
      "weight drop" approximation).
    * ``per_example=True``: one mask per example along dim 0, the paper's method.  The batch is
      processed ``chunk_size`` examples at a time, so peak memory is
      ``chunk_size x weight.numel()``; example ``i`` reads rows ``i`` of the engine mask of
      shape ``(N, *weight.shape)``, so results do not depend on ``chunk_size``, and example 0
      gets the per-batch mask.  A convolution chunk runs as one grouped convolution (one group
      per example); PyTorch's CPU grouped convolution is much slower in float64 than float32.

    Eval (``inference``):

    * ``"mean"``: the wrapped layer as is (exact mean of the pre-activation under inverted
      scaling).
    * ``"moment_matching"``: Wan et al.'s inference.  Each unit's pre-activation is taken as
      :math:`u \sim \mathcal{N}(\mu, \sigma^2)` with the moments above, ``samples`` draws go
      through ``activation`` and are averaged.  The paper's moments :math:`\mu = q W v`,
      :math:`\sigma^2 = q p (W \odot W)(v \odot v)` belong to unscaled training; with inverted
      scaling they become the ones above.  For a convolution, :math:`\mu` is the layer output
      and :math:`\sigma^2 = \tfrac{p}{q}\,\mathrm{conv}_{W \odot W}(v \odot v)` (same settings,
      no bias): each output sums independent terms over the weights it reads.  The noise is
      keyed by the call's ``seed``/``generator``, else the functional stream of the global
      seed.  Peak memory is ``samples`` times the output.

    ``activation`` (default ``None``, the identity) is applied to the output in every mode, so
    training and both inferences model the same quantity; it matters for moment matching,
    which averages *after* the non-linearity.

    Args:
        module: the ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` to wrap.
        p: probability of a weight being dropped, in ``[0, 1]``. Default: 0.5
        per_example: draw one mask per example instead of one per batch. Default: ``False``
        chunk_size: examples per chunk with ``per_example=True``. Default: 16
        inference: ``"mean"`` or ``"moment_matching"``. Default: ``"mean"``
        samples: Gaussian draws :math:`Z` per unit for moment matching (not given in the
            paper). Default: 256
        activation: callable applied to the layer output, or ``None``. Default: ``None``

    Shape:
        - Linear: input :math:`(*, H_{in})`, output :math:`(*, H_{out})`; with
          ``per_example`` dim 0 is the batch (1-D input is one example).
        - Conv: the wrapped convolution's shapes, batched or unbatched.

    Examples::

        >>> import torch, dropkit
        >>> from dropkit.nn.dropconnect import DropConnect
        >>> dropkit.manual_seed(0)
        >>> m = DropConnect(torch.nn.Linear(8, 4), p=0.5)
        >>> m(torch.randn(3, 8)).shape
        torch.Size([3, 4])
        >>> sorted(m.state_dict())
        ['module.bias', 'module.weight']
        >>> x = torch.randn(2, 3, 10, 10)
        >>> conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect")
        >>> torch.equal(DropConnect(conv, p=0.3).eval()(x), conv(x))  # eval: the layer as is
        True
        >>> mm = DropConnect(torch.nn.Linear(8, 4), 0.5, inference="moment_matching",
        ...                  activation=torch.relu, samples=128).eval()
        >>> bool((mm(torch.randn(3, 8), seed=1) >= 0).all())
        True

    Per call, ``m(x, seed=123)`` or ``m(x, generator=g)`` fix the masks explicitly.

    ``torch.compile``: the masks, ``1/q`` and the moment-matching variance ratio are computed from
    ``p_tensor`` (in tensor ops, eagerly too) when the graph runs, so assigning ``p`` does not
    recompile; masks and outputs are the eager ones.

    Reference: Wan, Zeiler, Zhang, LeCun, Fergus, "Regularization of Neural Networks using
    DropConnect", ICML 2013.
    """

    module: _Wrapped

    def __init__(
        self,
        module: nn.Module,
        p: float = 0.5,
        *,
        per_example: bool = False,
        chunk_size: int = 16,
        inference: str = "mean",
        samples: int = 256,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, _SUPPORTED):
            raise TypeError(
                f"DropConnect wraps nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(module).__name__}"
            )
        self.p = p
        self.per_example = check_bool(per_example, "per_example")
        self.chunk_size = _positive_int(chunk_size, "chunk_size")
        self.samples = _positive_int(samples, "samples")
        if inference not in _INFERENCE:
            raise ValueError(f"inference must be 'mean' or 'moment_matching', got {inference!r}")
        if activation is not None and not callable(activation):
            raise TypeError(f"activation must be callable or None, got {type(activation).__name__}")
        self.inference = inference
        self.module = module
        self.activation = activation

    def extra_repr(self) -> str:
        extra = f"p={self.p}"
        if self.per_example:
            extra += f", per_example=True, chunk_size={self.chunk_size}"
        if self.inference != "mean":
            extra += f", inference={self.inference!r}, samples={self.samples}"
        return extra

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Apply the layer; ``seed`` (int or key) or ``generator`` fix the randomness of this call."""
        check_floating_tensor(input)
        if not self.training:
            check_seed(seed, generator)
            if self.inference == "moment_matching":
                return gaussian_moment_matching(
                    self.module(input),
                    self._variance(input),
                    self.activation,
                    samples=self.samples,
                    seed=seed,
                    generator=generator,
                )
            return self._activate(self.module(input))
        key = resolve_key(input, self._key(input, seed, generator), generator)
        if self.per_example:
            output = self._per_example(input, key)
        else:
            output = self._layer(input, drop_connect_weight(self.module.weight, self.p_tensor, seed=key))
        return self._activate(output)

    def _variance_ratio(self, like: torch.Tensor) -> torch.Tensor:
        """:func:`variance_ratio` of ``p_tensor``, rounded once to the compute dtype."""
        ratio = torch.as_tensor(variance_ratio(checked_rate(self.p_tensor)))
        return ratio.to(dtype=compute_dtype(like.dtype), device=like.device)

    def _activate(self, output: torch.Tensor) -> torch.Tensor:
        return output if self.activation is None else self.activation(output)

    def _variance(self, input: torch.Tensor) -> torch.Tensor:
        """Training-time variance of each output, ``(p/q) * layer(input**2)`` with ``weight**2``, no bias.

        Every output is a sum of independent ``w * v * r / q`` terms over the weights it reads,
        padded inputs included (reflected or circular padding squares like the input does).
        In the compute dtype (float32 for half inputs: moment matching rounds its result once);
        exact zeros where ``p`` is 0 or 1.
        """
        compute = compute_dtype(input.dtype)  # float16 squares of weights above 256 overflow
        ratio = self._variance_ratio(input)
        weight = unless_zero_ratio(self.module.weight.to(compute), ratio).square()
        square = unless_zero_ratio(input.to(compute), ratio).square()
        if isinstance(self.module, nn.Linear):
            return F.linear(square, weight) * ratio
        return self.module._conv_forward(square, weight, None) * ratio

    def _layer(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The wrapped layer with another weight; the conv's own ``_conv_forward`` keeps every setting."""
        if isinstance(self.module, nn.Linear):
            return F.linear(input, weight, self.module.bias)
        return self.module._conv_forward(input, weight, self.module.bias)

    def _per_example(self, input: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        unbatched_rank = 1 if isinstance(self.module, nn.Linear) else weight.dim() - 1
        unbatched = input.dim() == unbatched_rank
        batch = input.unsqueeze(0) if unbatched else input
        if batch.shape[0] == 0:  # no example, no mask: the layer's empty output, still connected
            output = self._layer(batch, weight)
            return output.squeeze(0) if unbatched else output
        outputs = []
        rate = checked_rate(self.p_tensor)
        for start in range(0, batch.shape[0], self.chunk_size):
            stop = min(batch.shape[0], start + self.chunk_size)
            keep = example_keep_masks(key, rate, weight.shape, start, stop)
            outputs.append(self._batched_layer(batch[start:stop], apply_weight_mask(weight, keep, rate)))
        output = torch.cat(outputs)
        return output.squeeze(0) if unbatched else output

    def _batched_layer(self, input: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Example ``i`` of ``input`` through the layer with ``weights[i]``, in one kernel call."""
        module = self.module
        count = input.shape[0]
        if isinstance(module, nn.Linear):
            flat = input.reshape(count, -1, input.shape[-1])
            output = torch.matmul(flat, weights.transpose(1, 2))
            if module.bias is not None:
                output = output + module.bias
            return output.reshape(*input.shape[:-1], weights.shape[1])
        # Examples become groups of one grouped convolution: group c * groups + g of the stacked
        # input meets group g of example c's weight, so no example sees another's mask.
        padding: Any = module.padding
        if module.padding_mode != "zeros":
            input = F.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        stacked = input.reshape(1, count * input.shape[1], *input.shape[2:])
        stacked_weight = weights.reshape(count * weights.shape[1], *weights.shape[2:])
        bias = None if module.bias is None else module.bias.repeat(count)
        conv = _CONV[weights.dim() - 3]
        output = conv(
            stacked, stacked_weight, bias, module.stride, padding, module.dilation, module.groups * count
        )
        return output.reshape(count, -1, *output.shape[2:])
