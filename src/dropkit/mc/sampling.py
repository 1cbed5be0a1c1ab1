"""T-sample Monte Carlo dropout prediction: batched, chunked, reproducible, streaming.

:func:`mc_predict` runs ``T`` stochastic forward passes of a model in MC mode (see
:mod:`dropkit.mc.mode`) and returns the samples, their mean, or a streaming
:class:`~dropkit.mc.streaming.MCSummary`; :func:`iter_mc_samples` yields the samples chunk by
chunk for statistics of one's own.

**Sample axis.**  Samples are stacked on a new leading dim: ``(T, N, *out)`` for a batch of
``N`` (``baal`` puts it last, ``torch-uncertainty`` folds it into the batch; dropkit puts it
first, so ``samples[t]`` is one full prediction).

**Batching.**  ``k`` samples are computed in one forward of the batch repeated ``k`` times along
dim 0 (sample-major: rows ``i*N .. (i+1)*N - 1`` are sample ``i``).  ``k`` is ``chunk_size``, or
the number of samples whose activations fit in ``memory_budget`` bytes, estimated from the
outputs of one single-sample forward (the first chunk).

**Reproducibility.**  Sample ``t`` uses, for its ``c``-th stochastic op (in execution order,
counted from 0 in each forward), the key ``dropkit.make_key(seed, c, t)``; an op nested inside a
per-sample op (a dropout inside a :class:`dropkit.nn.StochasticDepth` block) uses a stream
mixed from both ordinals (:func:`dropkit.mc.plan.op_stream`).  A batched op is run once per
sample on its rows, with that sample's key, so the samples do not depend on the chunk size:
the same ``seed`` gives the same samples with ``chunk_size=1``, ``chunk_size=T`` or any memory
budget, with or without the trunk cache.  This covers dropkit's layers, ``torch.nn`` dropout
modules and intercepted functional/attention dropout alike (all run on dropkit's engine in MC
mode), and it gives every sample its own weight mask for DropConnect and variational layers.
It requires batch-first activations at each stochastic op (leading dim a multiple of ``k``,
sample-major); other layouts must use ``chunk_size=1``.  A random layer whose ``forward``
takes no ``seed=`` keyword draws its own keys, so its samples are random but not
chunk-invariant.  Values can still differ in the last bits between chunk sizes where a BLAS
kernel rounds differently for different batch sizes.

**Trunk caching.**  With ``trunk="auto"`` the deterministic prefix of the model is found with
``torch.fx`` (see :mod:`dropkit.mc.trunk`) and computed once; ``trunk=`` and ``head=`` callables
give the split by hand (``head(trunk(x))`` must equal ``model(x)``, and both must use the
model's own submodules, whose dropout the MC mode turns on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal, Union

import torch
from torch import nn

from dropkit.engine.streams import _check_seed, draw_functional_key
from dropkit.mc.mode import MCDropoutHandle, active_handle
from dropkit.mc.selection import AttentionRate, SelectorSpec
from dropkit.mc.streaming import MCSummary
from dropkit.mc.trunk import TrunkSplit, split_trunk, user_trunk

__all__ = ["DEFAULT_MEMORY_BUDGET", "iter_mc_samples", "mc_predict"]

DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024
"""Bytes of activations per batched forward when neither ``chunk_size`` nor ``memory_budget`` is given."""

Transform = Union[  # noqa: UP007 - a runtime alias on 3.10
    Literal["softmax", "log_softmax", "sigmoid"], Callable[[torch.Tensor], torch.Tensor], None
]
Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # noqa: UP007
_TRANSFORMS = ("softmax", "log_softmax", "sigmoid")


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_inputs(x: object) -> tuple[torch.Tensor, ...]:
    inputs = x if isinstance(x, tuple) else (x,)
    if not inputs:
        raise ValueError("x must be a tensor or a non-empty tuple of tensors, got ()")
    batch = None
    for index, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"x[{index}] must be a tensor, got {type(value).__name__}")
        if value.dim() == 0 or value.shape[0] == 0:
            raise ValueError(f"x must have a non-empty batch dim first, got shape {tuple(value.shape)}")
        if batch is not None and value.shape[0] != batch:
            raise ValueError(f"every input must have the same batch size, got {batch} and {value.shape[0]}")
        batch = value.shape[0]
    return inputs


def _apply_transform(transform: Transform, output: torch.Tensor) -> torch.Tensor:
    if transform is None:
        return output
    if transform == "softmax":
        return torch.softmax(output, dim=-1)
    if transform == "log_softmax":
        return torch.log_softmax(output, dim=-1)
    if transform == "sigmoid":
        return torch.sigmoid(output)
    result = transform(output)  # a callable: checked by _check_transform
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"transform must return a tensor, got {type(result).__name__}")
    return result


def _check_transform(transform: object) -> Transform:
    if transform is None or callable(transform):
        return transform
    if isinstance(transform, str) and transform in _TRANSFORMS:
        return transform  # type: ignore[return-value]
    raise ValueError(f"transform must be None, one of {_TRANSFORMS} or a callable, got {transform!r}")


def _resolve_seed(seed: object) -> int:
    if seed is None:
        # The next draw of dropkit's functional stream: follows dropkit.manual_seed, and every
        # call gets fresh samples.
        key = draw_functional_key(torch.device("cpu"))
        return int(key[0]) ^ (int(key[2]) * 0x9E3779B97F4A7C15 % (1 << 63))
    return _check_seed(seed)


def iter_mc_samples(
    model: nn.Module,
    x: Inputs,
    T: int,  # noqa: N803 - the number of samples is T in the literature
    *,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    seed: int | None = None,
    transform: Transform = None,
    trunk: Literal["auto"] | Callable[..., Any] | None = "auto",
    head: Callable[..., Any] | None = None,
    include: SelectorSpec = None,
    exclude: SelectorSpec = None,
    attention_p: AttentionRate = None,
) -> Iterator[torch.Tensor]:
    """Yield the ``T`` Monte Carlo samples of ``model(x)`` chunk by chunk.

    Each chunk is a tensor of shape ``(k, N, *out)`` (samples ``t .. t + k - 1`` in order);
    chunks are computed under ``torch.no_grad``.  The model is in MC mode
    (:func:`dropkit.mc.mode.mc_dropout`) from the first chunk until the generator finishes or
    is closed, and restored then.  See
    :mod:`dropkit.mc.sampling` and :func:`mc_predict` for the arguments.

    Args:
        model: the model; its forward must return a tensor with the batch first.
        x: the batch (a tensor, or a tuple of positional inputs, batch first).
        T: number of samples, ``>= 1``.
        chunk_size: samples per batched forward.
        memory_budget: bytes of activations per batched forward (instead of ``chunk_size``).
        seed: the seed of the samples; ``None`` draws one from dropkit's global seed.
        transform: applied to every chunk of outputs: ``"softmax"``, ``"log_softmax"``
            (over the last dim), ``"sigmoid"`` or a callable on a ``(k, N, *out)`` tensor.
        trunk: ``"auto"``, ``None`` (no caching) or a callable computing the trunk.
        head: with a callable ``trunk``: the callable mapping the trunk's output to the output.
        include: modules to turn on (see :func:`dropkit.mc.mode.mc_dropout`).
        exclude: modules to keep deterministic.
        attention_p: rate rule for SDPA calls made with ``dropout_p=0``.

    Returns:
        An iterator over the chunks of samples.

    Examples::

        >>> from dropkit.mc.sampling import iter_mc_samples
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(0.5), torch.nn.Linear(5, 2))
        >>> chunks = list(iter_mc_samples(model, torch.randn(4, 3), 10, chunk_size=4, seed=0))
        >>> [tuple(chunk.shape) for chunk in chunks]
        [(4, 4, 2), (4, 4, 2), (2, 4, 2)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _check_inputs(x)
    T = _positive_int(T, "T")  # noqa: N806
    if chunk_size is not None and memory_budget is not None:
        raise ValueError("pass at most one of chunk_size and memory_budget, got both")
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else _positive_int(memory_budget, "memory_budget")
    base_seed = _resolve_seed(seed)
    transform = _check_transform(transform)
    if not (trunk is None or trunk == "auto" or callable(trunk)):
        raise ValueError(f"trunk must be 'auto', None or a callable, got {trunk!r}")
    if callable(trunk) != (head is not None):
        raise ValueError("trunk= and head= must be given together (or head=None with trunk='auto'/None)")
    if head is not None and not callable(head):
        raise TypeError(f"head must be callable, got {type(head).__name__}")
    batch = inputs[0].shape[0]
    return _generate(
        model, inputs, batch, T, chunk_size, budget, base_seed, transform, trunk, head,
        (include, exclude, attention_p),
    )  # fmt: skip


def _generate(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    batch: int,
    T: int,  # noqa: N803
    chunk_size: int | None,
    budget: int,
    seed: int,
    transform: Transform,
    trunk: Any,
    head: Callable[..., Any] | None,
    selection: tuple[SelectorSpec, SelectorSpec, AttentionRate],
) -> Iterator[torch.Tensor]:
    include, exclude, attention_p = selection
    active = active_handle(model)
    owned = active is None
    if active is not None:
        if (include, exclude, attention_p) != (None, None, None):
            raise ValueError(
                "the model is already in an MC dropout mode, whose selection is used; pass include, "
                "exclude and attention_p to that mode, not to the sampling"
            )
        handle = active
    else:
        handle = MCDropoutHandle(model, include=include, exclude=exclude, attention_p=attention_p)
    try:
        with torch.no_grad():
            split: TrunkSplit | None = None
            features: Any = None
            if trunk == "auto":
                split = split_trunk(model, handle, inputs)
            elif trunk is not None:
                features = user_trunk(trunk, handle, inputs)
                if not isinstance(features, torch.Tensor):
                    raise TypeError(f"trunk must return a tensor, got {type(features).__name__}")
                if features.dim() == 0 or features.shape[0] != batch:
                    raise ValueError(
                        f"trunk must return the batch ({batch}) on dim 0, got shape {tuple(features.shape)}"
                    )

            def forward(first: int, count: int) -> torch.Tensor:
                with handle.sampling(seed, first, count):
                    if split is not None:
                        output = split.run_head(handle, count)
                    elif head is not None:
                        output = head(features.repeat(count, *([1] * (features.dim() - 1))))
                    else:
                        output = model(*(v.repeat(count, *([1] * (v.dim() - 1))) for v in inputs))
                if not isinstance(output, torch.Tensor):
                    raise TypeError(
                        f"the model must return a tensor for MC sampling, got {type(output).__name__}; "
                        "wrap it in a module that selects the output"
                    )
                if output.dim() == 0 or output.shape[0] != batch * count:
                    raise ValueError(
                        f"the model output must have the batch ({batch} x {count} samples) on dim 0, "
                        f"got shape {tuple(output.shape)}"
                    )
                return _apply_transform(transform, output.reshape(count, batch, *output.shape[1:]))

            first = 0
            if chunk_size is None:
                with handle.measuring() as measured:
                    chunk = forward(0, 1)
                per_sample = measured[0] + sum(v.nelement() * v.element_size() for v in inputs)
                chunk_size = max(1, min(T, budget // max(per_sample, 1)))
                first = 1
                yield chunk
            while first < T:
                count = min(chunk_size, T - first)
                yield forward(first, count)
                first += count
    except BaseException:
        if owned:
            handle.restore(warn=False)
        raise
    if owned:
        handle.restore()


def mc_predict(
    model: nn.Module,
    x: Inputs,
    T: int,  # noqa: N803 - the number of samples is T in the literature
    *,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    seed: int | None = None,
    reduce: Literal["mean", "stats"] | None = None,
    transform: Transform = None,
    probabilities: bool | None = None,
    trunk: Literal["auto"] | Callable[..., Any] | None = "auto",
    head: Callable[..., Any] | None = None,
    include: SelectorSpec = None,
    exclude: SelectorSpec = None,
    attention_p: AttentionRate = None,
) -> torch.Tensor | MCSummary:
    """``T`` Monte Carlo dropout predictions of ``model`` on the batch ``x``.

    The model runs in MC mode (every dropout on, BatchNorm and the rest in eval; see
    :func:`dropkit.mc.mode.mc_dropout`), under ``torch.no_grad``, and is restored afterwards;
    inside a ``with mc_dropout(model, ...)`` block, that mode (and its selection) is used.
    Batching, chunking, the per-sample keys that make the result independent of the chunk size,
    and trunk caching are described in :mod:`dropkit.mc.sampling`.

    Args:
        model: the model; its forward must return a tensor with the batch first.
        x: the batch (a tensor, or a tuple of positional inputs, batch first).
        T: number of samples, ``>= 1``.
        chunk_size: samples per batched forward (``1`` = a loop over samples).
        memory_budget: bytes of activations per batched forward, used instead of
            ``chunk_size``; default 256 MiB when neither is given.
        seed: the seed of the samples (any int); ``None`` draws one from dropkit's global seed
            (:func:`dropkit.manual_seed`), fresh at each call.
        reduce: ``None``: all samples, shape ``(T, N, *out)``; ``"mean"``: their mean,
            ``(N, *out)``; ``"stats"``: a streaming :class:`~dropkit.mc.streaming.MCSummary`
            (mean, variance, and with probabilities mean entropy and votes), never holding
            the ``T`` samples.
        transform: applied to the outputs before reducing: ``"softmax"``, ``"log_softmax"``
            (over the last dim), ``"sigmoid"``, or a callable on a ``(k, N, *out)`` tensor.
        probabilities: with ``reduce="stats"``, whether samples are probability vectors
            (default: ``transform == "softmax"``).
        trunk: ``"auto"`` (find the deterministic prefix with ``torch.fx``), ``None`` (no
            caching) or a callable computing the trunk from ``x``.
        head: with a callable ``trunk``: the callable mapping the trunk's output to the output.
        include: modules to turn on (see :func:`dropkit.mc.mode.mc_dropout`).
        exclude: modules to keep deterministic.
        attention_p: rate rule for SDPA calls made with ``dropout_p=0``.

    Returns:
        The samples, their mean, or an :class:`~dropkit.mc.streaming.MCSummary`.

    Raises:
        TypeError: ``model`` is not a module, or an argument has the wrong type.
        ValueError: ``T``, ``chunk_size`` or ``memory_budget`` below 1, both of the last two
            given, or a bad ``reduce`` / ``transform``.

    Examples::

        >>> from dropkit.mc.sampling import mc_predict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4))
        >>> x = torch.randn(5, 3)
        >>> samples = mc_predict(model, x, 20, seed=0, transform="softmax")
        >>> samples.shape  # sample axis first
        torch.Size([20, 5, 4])
        >>> bool(torch.equal(samples, mc_predict(model, x, 20, seed=0, transform="softmax", chunk_size=3)))
        True
        >>> summary = mc_predict(model, x, 1000, seed=0, transform="softmax", reduce="stats")
        >>> summary.mean.shape, summary.mean_entropy.shape
        (torch.Size([5, 4]), torch.Size([5]))
    """
    if reduce not in (None, "mean", "stats"):
        raise ValueError(f"reduce must be None, 'mean' or 'stats', got {reduce!r}")
    if probabilities is not None and not isinstance(probabilities, bool):
        raise TypeError(f"probabilities must be a bool or None, got {type(probabilities).__name__}")
    chunks = iter_mc_samples(
        model, x, T,
        chunk_size=chunk_size, memory_budget=memory_budget, seed=seed, transform=transform,
        trunk=trunk, head=head, include=include, exclude=exclude, attention_p=attention_p,
    )  # fmt: skip
    if reduce is None:
        return torch.cat(list(chunks))
    summary = MCSummary(probabilities=(transform == "softmax") if probabilities is None else probabilities)
    if reduce == "mean":
        summary = MCSummary()
    for chunk in chunks:
        summary.update(chunk)
    return summary.mean if reduce == "mean" else summary
