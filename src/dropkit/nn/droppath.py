"""DropPath (stochastic depth), a residual wrapper that skips dropped branches, and LayerDrop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dropkit._deprecation import (
    rename_state_dict_prefix,
    renamed_arguments,
    upgrade_renamed_submodule,
    warn_deprecated,
)
from dropkit._validation import check_bool
from dropkit.engine.masks import keep_mask
from dropkit.engine.streams import share_masks_across_ranks
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.functional.droppath import check_batch_dim, check_mode
from dropkit.functional.droppath import drop_path as F_drop_path
from dropkit.nn._base import RateAttribute, _DropoutBase, _ProbabilityRate, _RandomLayer

__all__ = ["DropPath", "LayerDrop", "StochasticDepth"]


class DropPath(_DropoutBase):
    r"""Randomly drop whole samples (residual paths) with probability ``p`` during training.

    Stochastic depth: put it on the residual branch of a block, ``x + DropPath(p)(f(x))``, so
    that for each sample the branch is dropped with probability ``p`` and the block reduces to the
    identity.  In row mode one draw :math:`r_n \sim \mathrm{Bernoulli}(q)`, :math:`q = 1 - p`, is
    made per index :math:`n` along ``batch_dim`` and shared over every other dim:

    .. math::
        y_{n,\dots} = \frac{r_n}{q}\, x_{n,\dots} \quad\text{(training)}, \qquad y = x \quad\text{(eval)},

    so the expectation of the output is preserved, as in inverted dropout (Huang et al. scale the
    branch by :math:`q` at test time instead; the two are equivalent up to that rescaling).  In
    batch mode a single draw drops or keeps the whole tensor (the original per-mini-batch
    formulation of Huang et al.; "local" drop-path of FractalNet drops per sample).  ``p = 1``
    gives exact zeros, never NaN.

    The mask comes from dropkit's counter-based engine (a ``broadcast_dims`` dropout): backward
    regenerates it from the 3-word key and keeps no per-element memory.  Under
    ``torch.compile`` the rate is read from ``p_tensor`` when the graph runs, so a changed ``p``
    (a stochastic-depth schedule) does not recompile.

    Args:
        p: probability of a sample's (or, in batch mode, the whole tensor's) path being dropped,
            in ``[0, 1]``. Default: 0.1
        inplace: write the result into the input. Default: ``False``
        mode: ``"row"`` (one draw per sample) or ``"batch"`` (one draw for the tensor).
            Default: ``"row"``
        batch_dim: the sample dim of row mode, e.g. ``1`` for time-first ``(T, N, E)`` input.
            Default: 0

    Shape:
        - Input: :math:`(*)`, any shape; row mode needs at least one dim (the batch dim).
        - Output: :math:`(*)`, same shape as the input.

    Examples::

        >>> import torch, dropkit
        >>> from dropkit.nn.droppath import DropPath
        >>> dropkit.manual_seed(0)
        >>> m = DropPath(p=0.5)
        >>> y = m(torch.ones(8, 3, 4))
        >>> per_sample = y.flatten(1)
        >>> bool(((per_sample == 0).all(1) | (per_sample == 2).all(1)).all())  # whole rows 0 or x / q
        True
        >>> m.eval()(y) is y  # eval mode is the identity
        True

    Per call, ``m(x, seed=123)`` or ``m(x, generator=g)`` fix the mask explicitly.

    References: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016; Larsson et al.,
    "FractalNet: Ultra-Deep Neural Networks without Residuals", ICLR 2017.
    """

    _functional = staticmethod(F_drop_path)

    def __init__(
        self, p: float = 0.1, inplace: bool = False, *, mode: str = "row", batch_dim: int = 0
    ) -> None:
        super().__init__(p, inplace)
        self.mode = check_mode(mode)
        self.batch_dim = check_batch_dim(batch_dim)  # range checked per call, against the input

    def extra_repr(self) -> str:
        extra = "" if self.mode == "row" else f", mode={self.mode!r}"
        if self.batch_dim != 0:
            extra += f", batch_dim={self.batch_dim}"
        return super().extra_repr() + extra

    def _options(self) -> dict[str, Any]:
        return {"mode": self.mode, "batch_dim": self.batch_dim}


class StochasticDepth(_ProbabilityRate, _RandomLayer):
    r"""A residual block with a randomly dropped branch: ``x + DropPath(p, mode=mode)(module(x))``.

    ``module`` is the residual *branch* only (the identity shortcut is added here), and must
    return a tensor of the input's shape.  In training the branch output is dropped per sample
    (``mode="row"``) or for the whole batch (``mode="batch"``) with probability ``p`` and kept
    branches are scaled by :math:`1/q`; in eval the block computes ``x + module(x)``.

    In batch mode the key of the call is drawn first and the single keep/drop decision is read
    from it, so when the branch is dropped ``module`` is not run at all (saving its forward and
    backward) and the output is ``x + 0``; the result, the gradient and the next masks are the
    same as if the branch had been computed and then zeroed.  The decision is read on the host
    (a device sync, and a graph break under ``torch.compile``, where the branch is always
    computed instead).  Row mode always runs the branch on the whole batch.  Under
    ``torch.compile`` the rate is read from ``p_tensor`` when the graph runs (as for
    :class:`DropPath`), so assigning ``p`` does not recompile.

    The branch is ``self.module``: ``state_dict`` keys are ``module.*`` (checkpoints saved with
    the former ``block.`` prefix still load).

    Args:
        module: the residual branch, a module mapping the input to a tensor of the same shape.
            (Formerly ``block``, a deprecated keyword alias for one release.)
        p: probability of the branch being dropped, in ``[0, 1]``. Default: 0.1 (as
            :class:`DropPath` and :func:`~dropkit.functional.drop_path`)
        mode: ``"row"`` (one draw per sample along dim 0) or ``"batch"`` (one draw per call).
            Default: ``"row"``

    Examples::

        >>> from dropkit.nn.droppath import StochasticDepth
        >>> block = StochasticDepth(torch.nn.Linear(4, 4), p=0.2, mode="batch")
        >>> block(torch.randn(3, 4)).shape
        torch.Size([3, 4])

    Reference: Huang et al., "Deep Networks with Stochastic Depth", ECCV 2016.
    """

    @renamed_arguments(block="module")
    def __init__(self, module: nn.Module, p: float = 0.1, *, mode: str = "row") -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.p = p
        self.mode = check_mode(mode)
        rename_state_dict_prefix(self, "block", "module")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        upgrade_renamed_submodule(self, "block", "module")  # pickled whole before the rename

    @property
    def block(self) -> nn.Module:
        """Deprecated alias of ``module`` (the residual branch), for one release."""
        warn_deprecated("StochasticDepth.block is deprecated; use StochasticDepth.module")
        return self.module

    def extra_repr(self) -> str:
        return f"p={self.p}" + ("" if self.mode == "row" else f", mode={self.mode!r}")

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``input + drop_path(module(input))``; ``seed`` or ``generator`` fix the randomness of this call."""
        check_seed(seed, generator)
        if not self.training:
            return input + self.module(input)
        key = resolve_key(input, self._key(input, seed, generator), generator)
        # Eagerly, a dropped batch skips the branch; a traced graph cannot branch on the draw.
        if (
            self.mode == "batch"
            and not torch.compiler.is_compiling()
            and not bool(keep_mask(key, self.p_tensor, [1]).item())
        ):
            return input + 0.0  # what input + (dropped branch) gives, without running the branch
        return input + F_drop_path(self.module(input), self.p_tensor, True, mode=self.mode, seed=key)


class LayerDrop(_RandomLayer):
    r"""Apply ``layers`` in order, skipping each one with probability ``p`` during training.

    LayerDrop (Fan et al., 2019): in each training forward, layer :math:`l` is applied with
    probability :math:`q = 1 - p` and otherwise skipped (it acts as the identity; outputs are not
    rescaled).  One draw per layer per forward comes from this module's key; in eval every layer
    is applied.  Each layer must map a tensor to a tensor of the same shape.

    The draws are made with :func:`dropkit.share_masks_across_ranks` active, so with the same
    global seed (and the same number of training forwards) every ``torch.distributed`` rank skips
    the same layers; an explicit ``seed=`` int is also rank-independent, a ``generator=`` is
    only if every rank seeds it alike.

    ``DistributedDataParallel`` expects every parameter to receive a gradient in every
    iteration.  By default (``zero_grad_skipped=True``) the parameters of the skipped layers are
    tied to the output through a zero-valued anchor whose backward gives them exact zero
    gradients, without reading their values (no NaN from inf weights), so DDP works *without*
    ``find_unused_parameters``.  A zero gradient is not the same as no gradient for every
    optimizer: plain SGD leaves such a layer unchanged, but momentum, Adam's moments and
    decoupled weight decay still move it, exactly as they move any weight whose gradient happens
    to be zero.  ``zero_grad_skipped=False`` leaves the skipped layers out of the graph (their
    ``.grad`` stays as it was, so optimizers skip a ``None`` one); DDP then needs
    ``find_unused_parameters=True``.  Either way the set of skipped layers changes between steps:
    do not pass ``static_graph=True``.

    ``torch.compile``: the skipped layers are a Python branch on the drawn decisions, which a
    traced graph cannot hold, so the forward graph-breaks where the decisions are read
    (``fullgraph=True`` fails in training) and every distinct set of kept layers compiles its
    own graph.  ``p`` therefore stays a plain float (a changed ``p`` recompiles the graph that
    draws the decisions too); compile the layers themselves, or use :class:`StochasticDepth` /
    :class:`DropPath`, whose branches stay in one graph.  It is validated like every dropkit rate,
    on construction and on every assignment (a ValueError or TypeError naming ``p``).

    Unlike the single-module wrappers (``StochasticDepth``, ``ConcreteDropout``, ``DropConnect``,
    ...), whose wrapped module is the argument and attribute ``module``, this wrapper takes a
    sequence and keeps the name ``layers``: a submodule cannot be called ``modules``, the name of
    :meth:`torch.nn.Module.modules`.

    Args:
        layers: the layers, applied in the order given (a ``ModuleList`` or any iterable of
            modules, at least one); held as the ``nn.ModuleList`` ``self.layers``.
        p: probability of each layer being skipped, in ``[0, 1]``.
        zero_grad_skipped: give the skipped layers' parameters zero gradients (see above).

    Examples::

        >>> from dropkit.nn.droppath import LayerDrop
        >>> stack = LayerDrop([torch.nn.Linear(4, 4) for _ in range(6)], p=0.2)
        >>> stack(torch.randn(3, 4)).shape
        torch.Size([3, 4])

    Reference: Fan, Grave, Joulin, "Reducing Transformer Depth on Demand with Structured
    Dropout", ICLR 2020 (arXiv:1909.11556).
    """

    p = RateAttribute(doc="The probability of each layer being skipped, in ``[0, 1]`` (a plain float).")

    def __init__(self, layers: Iterable[nn.Module], p: float, *, zero_grad_skipped: bool = True) -> None:
        super().__init__()
        if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"layers must be an iterable of modules, got a single {type(layers).__name__}")
        modules = list(layers)
        for index, layer in enumerate(modules):
            if not isinstance(layer, nn.Module):
                raise TypeError(f"layers[{index}] must be a torch.nn.Module, got {type(layer).__name__}")
        if not modules:
            raise ValueError("layers must hold at least one module, got none")
        self.layers = nn.ModuleList(modules)
        self.p = p
        self.zero_grad_skipped = check_bool(zero_grad_skipped, "zero_grad_skipped")

    def extra_repr(self) -> str:
        return f"p={self.p}" + ("" if self.zero_grad_skipped else ", zero_grad_skipped=False")

    def _rate_is_graph_input(self, attribute: str) -> bool:
        # The decisions are drawn with the float p (a Python branch follows): a compiled graph
        # holds it as a constant, never its holder.
        return False

    def kept_layers(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> list[bool]:
        """Draw this training forward's decisions (advancing the step): ``True`` = layer applied."""
        if torch.compiler.is_exporting():
            raise RuntimeError(
                "LayerDrop skips layers by a Python branch on its random draws, which an exported "
                "graph cannot hold: export the model in eval mode, or use StochasticDepth or "
                "DropPath, whose branches stay in the graph"
            )
        with share_masks_across_ranks():
            key = resolve_key(input, self._key(input, seed, generator), generator)
        kept: list[bool] = keep_mask(key, self.p, [len(self.layers)]).tolist()
        return kept

    def forward(
        self, input: torch.Tensor, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Apply the kept layers; ``seed`` or ``generator`` fix the randomness of this call."""
        check_seed(seed, generator)
        if self.training:
            kept = self.kept_layers(input, seed=seed, generator=generator)
        else:
            kept = [True] * len(self.layers)
        output = input
        skipped: list[torch.Tensor] = []
        for layer, keep in zip(self.layers, kept, strict=True):
            if keep:
                output = layer(output)
            elif self.zero_grad_skipped:
                skipped += [param for param in layer.parameters() if param.requires_grad]
        if skipped and torch.is_grad_enabled():
            output = output + _ZeroAnchor.apply(output.dtype, output.device, *skipped)
        return output


class _ZeroAnchor(torch.autograd.Function):
    """A 0-dim zero that depends on ``params``: its backward hands each of them a zero gradient.

    Forward never reads the parameters, so inf or NaN weights cannot leak into the output (as
    ``0 * param.sum()`` would); the result is added to the activation, an ordinary out-of-place
    op, so later in-place ops on the output stay legal.
    """

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, device: torch.device, *params: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [(param.shape, param.dtype, param.device) for param in params]
        return torch.zeros((), dtype=dtype, device=device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        zeros = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes)
        return (None, None, *zeros)
