"""WeightDrop: DropConnect on named weights of any module (AWD-LSTM's hidden-to-hidden weight drop)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from dropkit._validation import check_bool
from dropkit.engine.masks import keep_mask
from dropkit.engine.numerics import compute_dtype
from dropkit.functional._common import SeedLike, resolve_key
from dropkit.functional._seed import check_seed
from dropkit.functional.dropconnect import apply_weight_mask
from dropkit.nn._base import _ProbabilityRate, _RandomLayer
from dropkit.ops import checked_rate

__all__ = ["WeightDrop"]

_WRAPPED = "module."
_CUDNN_NOT_CONTIGUOUS = "RNN module weights are not part of single contiguous chunk of memory"


def _strip_wrapped_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State-dict post-hook: ``prefix + 'module.' + key`` -> ``prefix + key``.

    The wrapper then saves exactly the keys of the layer it wraps, so it is a drop-in
    replacement of that layer in a model whose checkpoints must keep loading.
    """
    inner = prefix + _WRAPPED
    for key in [key for key in state_dict if key.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_wrapped_prefix(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: accept the wrapped layer's own keys (and the ``module.``-prefixed ones)."""
    inner = prefix + _WRAPPED
    own = {name for name, _ in module.named_parameters(recurse=False)}
    own |= {name for name, _ in module.named_buffers(recurse=False)}
    for key in list(state_dict):
        if not key.startswith(prefix) or key.startswith(inner):
            continue
        rest = key[len(prefix) :]
        if rest.split(".", 1)[0] in own or prefix + _WRAPPED + rest in state_dict:
            continue
        state_dict[inner + rest] = state_dict.pop(key)


def make_state_dict_transparent(wrapper: nn.Module) -> None:
    """Make ``wrapper.state_dict()`` hold the keys of ``wrapper.module`` without the ``module.``
    prefix, and ``wrapper.load_state_dict`` accept them (prefixed keys keep loading too)."""
    wrapper.register_state_dict_post_hook(_strip_wrapped_prefix)
    wrapper.register_load_state_dict_pre_hook(_add_wrapped_prefix)


def _default_rnn_weights(module: nn.RNNBase) -> list[str]:
    return [name for name in module._flat_weights_names if name.startswith("weight_hh_l")]


class WeightDrop(_ProbabilityRate, _RandomLayer):
    r"""DropConnect on named weights of a wrapped module, one mask per forward (AWD-LSTM's weight drop).

    While training, every named weight :math:`W` is replaced for this call by

    .. math::

        \tilde W = R \odot W / q, \qquad R_{ij} \sim \mathrm{Bernoulli}(q),\ q = 1 - p,

    and the wrapped module runs with :math:`\tilde W` (its other parameters untouched).  One
    mask is drawn per forward call, so an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` uses the same
    dropped hidden-to-hidden matrix at every time step of the sequence: the recurrent
    regularizer of AWD-LSTM, which needs no change to the fused RNN kernels.  Gradients reach
    the raw weights (masked and scaled like the forward).  Eval runs the module as it is.

    With ``inverted=False`` the mask is not rescaled while training
    (:math:`\tilde W = R \odot W`) and eval uses :math:`q\,W` instead (Wan et al.'s convention).

    Weight ``i`` (in the order of ``weights``) reads elements ``offset_i ..
    offset_i + numel_i - 1`` of one engine draw of shape ``(sum numel,)``, so the masks of all
    weights come from one key and never repeat each other.

    The module runs through :func:`torch.func.functional_call`: no parameter is deleted or
    re-registered, nothing calls ``flatten_parameters``, and ``module`` stays an ordinary
    module whose parameters receive the gradients.  ``state_dict`` holds **exactly the keys of
    the wrapped module** (``weight_hh_l0``, not ``module.weight_hh_l0``), so a checkpoint of a
    model with a plain ``nn.LSTM`` loads into the same model with ``WeightDrop(nn.LSTM(...))``
    in its place, and the reverse; keys prefixed with ``module.`` load too.  (On CUDA with
    cuDNN, the masked weights are not one contiguous buffer, as for any weight drop: cuDNN
    compacts them on each call, and its warning about it is silenced for the wrapped call only.)

    ``torch.compile``: the masks and scales are read from ``p_tensor`` when the graph runs, so
    assigning ``p`` does not recompile; the masks and dropped weights are the eager ones.

    Args:
        module: the module to wrap (any ``nn.Module``).
        p: probability of a weight entry being dropped, in ``[0, 1]``. Default: 0.5
        weights: names of the parameters to drop, as in ``module.named_parameters()``
            (dotted names reach submodules).  Default for ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``:
            every hidden-to-hidden matrix ``weight_hh_l{k}`` (and ``weight_hh_l{k}_reverse``);
            required for other modules.
        inverted: scale the kept weights by :math:`1/q` while training (``True``) or scale
            the weights by :math:`q` in eval (``False``). Default: ``True``

    Shape:
        - Input and output: those of the wrapped module; ``forward`` passes every positional
          and keyword argument through (``seed`` and ``generator`` excepted).

    Examples::

        >>> from dropkit.nn.weight_drop import WeightDrop
        >>> dropkit.manual_seed(0)
        >>> lstm = torch.nn.LSTM(4, 8, num_layers=2)
        >>> m = WeightDrop(lstm, p=0.5)
        >>> m.weights
        ('weight_hh_l0', 'weight_hh_l1')
        >>> out, (h, c) = m(torch.randn(5, 3, 4))
        >>> out.shape
        torch.Size([5, 3, 8])
        >>> sorted(m.state_dict()) == sorted(lstm.state_dict())  # the LSTM's own keys
        True
        >>> x = torch.randn(5, 3, 4)
        >>> torch.equal(m.eval()(x)[0], lstm(x)[0])  # eval: the raw weights
        True
        >>> lin = WeightDrop(torch.nn.Linear(3, 2), 0.2, weights="weight")
        >>> lin(torch.randn(4, 3)).shape
        torch.Size([4, 2])

    Per call, ``m(x, seed=123)`` or ``m(x, generator=g)`` fix the masks explicitly.

    Reference: Merity, Keskar, Socher, "Regularizing and Optimizing LSTM Language Models",
    ICLR 2018; Wan et al., "Regularization of Neural Networks using DropConnect", ICML 2013.
    """

    module: nn.Module
    weights: tuple[str, ...]

    def __init__(
        self,
        module: nn.Module,
        p: float = 0.5,
        weights: str | Sequence[str] | None = None,
        *,
        inverted: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.p = p
        self.inverted = check_bool(inverted, "inverted")
        self.module = module
        self.weights = self._check_weights(module, weights)
        make_state_dict_transparent(self)

    @staticmethod
    def _check_weights(module: nn.Module, weights: str | Sequence[str] | None) -> tuple[str, ...]:
        if weights is None:
            if not isinstance(module, nn.RNNBase):
                raise ValueError(
                    f"weights must name the parameters to drop for a {type(module).__name__} "
                    "(the default, the hidden-to-hidden weights, exists for nn.LSTM, nn.GRU and nn.RNN)"
                )
            return tuple(_default_rnn_weights(module))
        if isinstance(weights, str):
            weights = (weights,)
        if not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a str or a sequence of str, got {type(weights).__name__}")
        names = tuple(weights)
        if not names:
            raise ValueError("weights must name at least one parameter, got an empty sequence")
        parameters = dict(module.named_parameters())
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"weights must contain str, got {name!r}")
            if name not in parameters:
                raise ValueError(
                    f"weights names {name!r}, which is not a parameter of {type(module).__name__}; "
                    f"its parameters are {sorted(parameters)}"
                )
            if not parameters[name].is_floating_point():
                raise TypeError(f"weight {name!r} must be floating point, got {parameters[name].dtype}")
        if len(set(names)) != len(names):
            raise ValueError(f"weights must not repeat a name, got {list(names)}")
        return names

    def extra_repr(self) -> str:
        extra = f"p={self.p}, weights={list(self.weights)}"
        return extra + ("" if self.inverted else ", inverted=False")

    def _raw_weights(self) -> list[torch.Tensor]:
        parameters = dict(self.module.named_parameters())
        return [parameters[name] for name in self.weights]

    def dropped_weights(
        self, *, seed: SeedLike = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The weights this call would use while training, by name (draws a key like ``forward``)."""
        raw = self._raw_weights()
        key = resolve_key(raw[0], self._key(raw[0], seed, generator), generator)
        sizes = [weight.numel() for weight in raw]
        # The rate as a tensor (a graph input when compiled, read when the graph runs).
        rate = checked_rate(self.p_tensor)
        keep = keep_mask(key, rate, (sum(sizes),))
        dropped = {}
        for name, weight, part in zip(self.weights, raw, keep.split(sizes), strict=True):
            part = part.reshape(weight.shape)
            if self.inverted:
                dropped[name] = apply_weight_mask(weight, part, rate)
            else:
                zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
                dropped[name] = torch.where(part, weight, zero)
        return dropped

    def _eval_weights(self) -> dict[str, torch.Tensor]:
        raw = self._raw_weights()
        # q = 1 - p in float64, rounded once to the compute dtype, as torch rounds a float q.
        q = 1.0 - checked_rate(self.p_tensor).reshape(())
        return {
            name: weight * q.to(dtype=compute_dtype(weight.dtype), device=weight.device)
            for name, weight in zip(self.weights, raw, strict=True)
        }

    def forward(
        self, *args: Any, seed: SeedLike = None, generator: torch.Generator | None = None, **kwargs: Any
    ) -> Any:
        """Run the wrapped module with dropped weights (training) or its own (eval)."""
        check_seed(seed, generator)
        if self.training:
            replaced: Mapping[str, torch.Tensor] = self.dropped_weights(seed=seed, generator=generator)
        elif self.inverted:
            return self.module(*args, **kwargs)
        else:
            replaced = self._eval_weights()
        if not isinstance(self.module, nn.RNNBase) or not any(w.is_cuda for w in replaced.values()):
            return functional_call(self.module, dict(replaced), args, kwargs)
        # cuDNN warns on every call that dropped weights are not one contiguous buffer: that copy
        # is the known cost of weight drop (it needs a fresh matrix per call), not a user error.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CUDNN_NOT_CONTIGUOUS, category=UserWarning)
            return functional_call(self.module, dict(replaced), args, kwargs)
