"""T-sample Monte Carlo dropout prediction: batched, chunked, reproducible, streaming.

:func:`mc_predict` runs ``T`` stochastic forward passes of a model in MC mode (see
:mod:`dropkit.mc.mode`) and returns the samples, their mean, or streaming
:class:`~dropkit.mc.streaming.MCSummary` statistics; :func:`iter_mc_samples` yields the samples
chunk by chunk for statistics of one's own.

**Calls.**  ``mc_predict(model, *args, T=T, **kwargs)`` calls ``model(*args, **kwargs)``: the
inputs are any pytree (tensors, tuples, lists, dicts, ``None``, Python scalars; flattened with
``torch.utils._pytree``) and keyword inputs go to the model as keywords (a Hugging Face model
gets ``input_ids=``, ``attention_mask=``).  The short form ``mc_predict(model, x, T)`` (``T``
the last positional argument when it is not given as a keyword) is the same as
``mc_predict(model, x, T=T)``.  Keywords that are options of ``mc_predict`` itself (``seed``,
``output``, ...) reach the model through ``model_kwargs={...}``.

**Batch dim.**  Every tensor among the inputs holds the batch on dim 0, with the same size
``N`` in all of them; other leaves (``None``, flags, strings) are passed to every forward
unchanged.  A tensor that is not batched (a ``(1, L)`` position table) is bound beforehand with
``functools.partial`` or a wrapper module.

**Outputs.**  The model may return a tensor or any pytree of tensors: a tuple, list, dict or
Hugging Face ``ModelOutput``.  ``output=`` selects the part to sample first: a key or attribute
name (``"logits"``), an index, or a callable on the output.  Every tensor leaf of the selected
output must hold the batch on dim 0; it gets its own samples, its own mean or its own
:class:`~dropkit.mc.streaming.MCSummary`, and the result has the structure of the selected
output (a ``ModelOutput`` stays a ``ModelOutput``).  Non-tensor leaves are passed through, taken
from the first forward.

**Sample axis.**  Samples are stacked on a new leading dim: ``(T, N, *out)`` for a batch of
``N`` (``baal`` puts it last, ``torch-uncertainty`` folds it into the batch; dropkit puts it
first, so ``samples[t]`` is one full prediction).

**Batching and memory.**  ``k`` samples are computed in one forward of the batch repeated ``k``
times along dim 0 (sample-major: rows ``i*N .. (i+1)*N - 1`` are sample ``i``).  ``k`` is
``chunk_size``, or the largest number of samples whose forward fits in ``memory_budget`` bytes:
``k * peak <= memory_budget``, with ``peak`` the peak bytes of tensor storage live during the
forward of one sample, measured by :class:`~dropkit.mc.plan.PeakMemoryMeter` (every ATen
allocation counted until freed: the peak, not the sum, of the activations; the same measure
on CPU and GPU).  The peak is measured once per model and input signature (the shapes, dtypes
and devices of the tensor inputs, the trunk, and the selection of dropout sites): the first such
call runs one extra forward of 2 samples (eagerly, also for a compiled model) and discards it
(with ``T = 2`` it is the result; ``T = 1`` needs no measure); later calls reuse the
measure, so every call with those inputs runs the same chunks.  Likewise a failed automatic
trunk split is not tried again for that signature (with or without a split, the samples are
the same).  The memory kept by
``reduce=None`` (the ``T`` samples) is not part of the budget.

**The plan.**  What a call chose (trunk split, chunk size, measured peak) is the
:class:`~dropkit.mc.plan.MCPlan` returned by :func:`last_plan`, e.g. ``trunk: 14 modules,
head: 2; chunks of 50; peak 3.1 MiB per sample, budget 256.0 MiB``, and the same line is logged
at ``DEBUG`` level on the ``dropkit.mc.sampling`` logger.

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
chunk-invariant.  Values can still differ in the last bits between chunk sizes where a kernel
rounds differently for different sizes: a BLAS matmul, or a vectorized element-wise op such as
torch's SiLU at the tail of a tensor (seen in LLaMA's MLP); the masks are the same.

**Trunk caching.**  With ``trunk="auto"`` the deterministic prefix of the model is found with
``torch.fx`` (see :mod:`dropkit.mc.trunk`) and computed once; this needs positional tensor
inputs (keyword inputs are mapped onto the forward's parameters when the signature allows it).
``trunk=`` and ``head=`` callables give the split by hand: ``trunk(*args, **kwargs)`` returns a
tensor or a pytree of batch-first tensors, ``head`` takes it as its one argument, and
``head(trunk(...))`` must equal ``model(...)``; both must use the model's own submodules, whose
dropout the MC mode turns on.

**Distributed.**  ``mc_predict(..., group=g)`` is called by every rank of the process group
``g`` with the same model, inputs and arguments.  Rank ``i`` of ``n`` computes the samples
``T*i//n .. T*(i+1)//n - 1`` (the per-sample keys above are those of a single process, whatever
the rank: masks are not folded with it), so ``reduce=None`` gathers the samples of the single
process for the same ``seed``, bit for bit where the forward's arithmetic does not depend on
the chunk shapes (give ``chunk_size`` a value that divides every rank's share, or 1, when the
model has matrix products whose rounding depends on the batch size); ``"mean"`` and
``"stats"`` merge the ranks' streaming statistics (Chan's formula, sums and votes), equal to the
single-process ones up to float64 rounding.  Every rank gets the whole result.  ``seed=None``
takes group rank 0's seed.  To split the *data* instead, give each rank its own batches
and no ``group``: a sample's masks cover the whole activation of the batch, so cutting one
batch into rows would change them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
import torch.fx
from torch import nn
from torch.utils._pytree import TreeSpec, keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from dropkit._deprecation import warn_deprecated
from dropkit.engine.streams import _check_seed, draw_functional_key
from dropkit.mc.mode import MCDropoutHandle, active_handle
from dropkit.mc.plan import MCPlan, PeakMemoryMeter
from dropkit.mc.selection import AttentionRate, SelectorSpec
from dropkit.mc.streaming import MCSummary
from dropkit.mc.trunk import TrunkSplit, split_trunk, user_trunk

__all__ = [
    "DEFAULT_CPU_MEMORY_BUDGET",
    "DEFAULT_MEMORY_BUDGET",
    "default_memory_budget",
    "iter_mc_samples",
    "last_plan",
    "mc_predict",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024
"""Bytes of tensor storage per batched forward on an accelerator when neither ``chunk_size`` nor
``memory_budget`` is given."""
DEFAULT_CPU_MEMORY_BUDGET = 32 * 1024 * 1024
"""The same default on the CPU: there a chunk whose activations outgrow the caches runs slower
than smaller chunks (benchmarks/RESULTS.md: Hugging Face ViT and BERT, T = 50, 1.4x faster at
32 MiB than at 256 MiB; small models unchanged)."""


def default_memory_budget(device: torch.device | str) -> int:
    """The default ``memory_budget`` of :func:`mc_predict` for inputs on ``device``:
    :data:`DEFAULT_CPU_MEMORY_BUDGET` on the CPU, :data:`DEFAULT_MEMORY_BUDGET` elsewhere."""
    return DEFAULT_CPU_MEMORY_BUDGET if torch.device(device).type == "cpu" else DEFAULT_MEMORY_BUDGET


def _input_device(model: nn.Module, leaves: list[Any]) -> torch.device:
    """The device the forward runs on: the first tensor input's, else the first parameter's."""
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


Transform = Union[  # noqa: UP007 - a runtime alias on 3.10
    Literal["softmax", "log_softmax", "sigmoid"], Callable[[torch.Tensor], torch.Tensor], None
]
OutputSelector = Union[str, int, Callable[[Any], Any], None]  # noqa: UP007
_TRANSFORMS = ("softmax", "log_softmax", "sigmoid")
_MEASURE_SAMPLES = 2  # samples of the measuring forward: includes the split-and-concatenate of batched ops


@dataclass
class _ModelCache:
    """What earlier calls learnt about a model, per input signature (see the module docstring)."""

    peaks: dict[Hashable, int] = field(default_factory=dict)  # peak bytes per sample
    no_split: set[Hashable] = field(default_factory=set)  # signatures the automatic split failed on


_CACHE: weakref.WeakKeyDictionary[nn.Module, _ModelCache] = weakref.WeakKeyDictionary()
_LAST = threading.local()


def last_plan() -> MCPlan | None:
    """The plan of the latest :func:`mc_predict` or :func:`iter_mc_samples` call in this thread.

    Set when the call has chosen its trunk split and chunk size, before the first chunk is
    computed; ``None`` before any call.  See :class:`~dropkit.mc.plan.MCPlan`.

    Returns:
        The :class:`~dropkit.mc.plan.MCPlan`, or ``None``.

    Examples::

        >>> from dropkit.mc.sampling import last_plan, mc_predict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
        >>> _ = mc_predict(model, torch.randn(4, 3), T=10, seed=0)
        >>> plan = last_plan()
        >>> plan.trunk, plan.trunk_modules, plan.head_modules, plan.chunks
        ('auto', 1, 2, (10,))
    """
    plan: MCPlan | None = getattr(_LAST, "plan", None)
    return plan


# -- arguments ---------------------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


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


def _check_output_selector(output: object) -> OutputSelector:
    if output is None or callable(output) or isinstance(output, str):
        return output
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    raise TypeError(
        f"output must be None, a key or attribute name (str), an index (int) or a callable, "
        f"got {type(output).__name__} ({output!r})"
    )


def _resolve_seed(seed: object) -> int:
    if seed is None:
        # The next draw of dropkit's functional stream: follows dropkit.manual_seed, and every
        # call gets fresh samples.
        key = draw_functional_key(torch.device("cpu"))
        return int(key[0]) ^ (int(key[2]) * 0x9E3779B97F4A7C15 % (1 << 63))
    return _check_seed(seed)


def _accepts_keyword(model: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True  # unknown: pass it on
    parameter = parameters.get(name)
    if parameter is not None:
        return parameter.kind is not inspect.Parameter.POSITIONAL_ONLY
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _parse_call(
    function: str,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    samples: object,
    model_kwargs: object,
) -> tuple[tuple[Any, ...], dict[str, Any], int]:
    """The model's positional and keyword inputs, and ``T``, of a call (old forms included)."""
    if model_kwargs is not None:
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(f"model_kwargs must be a mapping or None, got {type(model_kwargs).__name__}")
        both = sorted(set(kwargs) & set(model_kwargs))
        if both:
            raise TypeError(f"{function}() got the model keyword(s) {both} both directly and in model_kwargs")
        kwargs = {**kwargs, **model_kwargs}
    unpack = False
    if samples is None:
        if len(args) < 2:
            raise TypeError(
                f"{function}() needs T, the number of samples: pass T= (or {function}(model, x, T))"
            )
        *inputs, samples = args
        args = tuple(inputs)
        unpack = len(args) == 1 and isinstance(args[0], tuple)
    if not args and "x" in kwargs and not _accepts_keyword(model, "x"):
        # The old keyword x= of the batch, when the forward takes no keyword x.
        warn_deprecated(
            f"{function}(): the argument 'x' is deprecated and will be removed in the next release; "
            "pass the inputs positionally: (model, x, T=T)",
            stacklevel=3,
        )
        x = kwargs.pop("x")
        args = (x,)
        unpack = isinstance(x, tuple)
    if unpack:
        # The old form (model, (a, b), T): a tuple of positional inputs, called as model(a, b).
        warn_deprecated(
            f"{function}(model, (a, b, ...), T) calling model(a, b, ...) is deprecated and will be removed "
            f"in the next release; write {function}(model, a, b, ..., T=T) (or {function}(model, (a, b), "
            "T=T) to pass the tuple itself)",
            stacklevel=3,
        )
        args = args[0]
    return args, kwargs, _positive_int(samples, "T")


# -- inputs ------------------------------------------------------------------------------------


def _path_names(tree: Any, count: int, prefix: str) -> list[str]:
    """Readable names of the leaves of ``tree`` (``prefix`` + key path), or numbered ones."""
    try:
        return [prefix + keystr(path) for path, _ in tree_flatten_with_path(tree)[0]]
    except Exception:  # a registered node type without key paths: number the leaves
        return [f"{prefix} leaf {index}" for index in range(count)]


def _input_names(args: tuple[Any, ...], kwargs: dict[str, Any], count: int) -> list[str]:
    names = _path_names((args, kwargs), count, "")
    readable = []
    for name in names:
        if name.startswith("[0]"):
            readable.append("args" + name[3:])
        elif name.startswith("[1]["):
            key, _, rest = name[4:].partition("]")
            readable.append(key.strip("'\"") + rest)
        else:
            readable.append(name)
    return readable


def _describe(value: object) -> Hashable:
    """The part of a non-tensor input that may change the memory of a forward."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__qualname__


@dataclass
class _Inputs:
    """The model inputs of a call, flattened; every tensor leaf has the batch on dim 0."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    leaves: list[Any]
    spec: TreeSpec
    batch: int

    @classmethod
    def check(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Inputs:
        leaves, spec = tree_flatten((args, kwargs))
        batch: int | None = None
        first = ""
        names: list[str] | None = None
        for index, value in enumerate(leaves):
            if not isinstance(value, torch.Tensor):
                continue
            if names is None:
                names = _input_names(args, kwargs, len(leaves))
            if value.dim() == 0 or value.shape[0] == 0:
                raise ValueError(
                    f"input {names[index]} must have a non-empty batch dim first, got shape "
                    f"{tuple(value.shape)}; every tensor input is batched along dim 0 (bind tensors that are "
                    "not batched with functools.partial)"
                )
            if batch is not None and value.shape[0] != batch:
                raise ValueError(
                    f"every tensor input must have the same batch size on dim 0, got {batch} ({first}) and "
                    f"{value.shape[0]} ({names[index]})"
                )
            if batch is None:
                batch, first = value.shape[0], names[index]
        if batch is None:
            got = ", ".join(type(v).__name__ for v in (*args, *kwargs.values())) or "no inputs"
            raise TypeError(
                "the model inputs must contain at least one tensor with the batch on dim 0 to sample over, "
                f"got {got}"
            )
        return cls(args, kwargs, leaves, spec, batch)

    def repeat(self, count: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The inputs with every tensor repeated ``count`` times along dim 0 (sample-major)."""
        repeated = [_repeat(v, count) if isinstance(v, torch.Tensor) else v for v in self.leaves]
        args, kwargs = tree_unflatten(repeated, self.spec)
        return args, kwargs

    def signature(self) -> Hashable:
        return (
            str(self.spec),
            tuple(
                (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else _describe(v)
                for v in self.leaves
            ),
        )

    def positional(self, model: nn.Module) -> tuple[tuple[Any, ...] | None, str]:
        """The inputs as positional arguments of ``model.forward``, for the fx trunk split, or
        ``None`` and the reason.

        Keyword inputs are put in the places of their parameters.  The split traces the
        parameters after the inputs at their defaults and follows the branch a traced input
        takes (``if mask is not None``), so a parameter left to its default may not come before
        a given one, and keyword-only or ``**kwargs`` inputs are not traced.
        """
        for value in (*self.args, *self.kwargs.values()):
            if not isinstance(value, torch.Tensor) and any(
                isinstance(leaf, torch.Tensor) for leaf in tree_flatten(value)[0]
            ):
                return None, "tensors nested in containers"
        try:
            parameters = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            return (self.args, "") if not self.kwargs else (None, "keyword inputs")
        named = [
            p
            for p in parameters
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        if len(self.args) > len(named):
            return None, "inputs for *args"
        positional = list(self.args)
        left = dict(self.kwargs)
        for parameter in named[len(self.args) :]:
            if not left:
                break
            if parameter.name not in left:
                return None, f"forward parameter {parameter.name!r} left to its default before a given one"
            positional.append(left.pop(parameter.name))
        if left:
            return None, "keyword-only or **kwargs inputs"
        return tuple(positional), ""


def _repeat(value: torch.Tensor, count: int) -> torch.Tensor:
    return value.repeat(count, *([1] * (value.dim() - 1)))


def _repeat_tree(tree: Any, count: int) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([_repeat(v, count) if isinstance(v, torch.Tensor) else v for v in leaves], spec)


# -- outputs -----------------------------------------------------------------------------------


def _select_output(selector: OutputSelector, output: Any) -> Any:
    if selector is None:
        return output
    if isinstance(selector, str):
        if isinstance(output, Mapping):
            if selector in output:
                return output[selector]
            raise ValueError(
                f"output={selector!r}: the model output ({type(output).__name__}) has no key {selector!r}; "
                f"it has {list(output)}"
            )
        if hasattr(output, selector):
            return getattr(output, selector)
        raise ValueError(
            f"output={selector!r}: the model output ({type(output).__name__}) has no attribute {selector!r}"
        )
    if isinstance(selector, int):
        try:
            return output[selector]
        except (IndexError, KeyError, TypeError) as error:
            raise ValueError(
                f"output={selector}: cannot index the model output ({type(output).__name__}): {error}"
            ) from None
    return selector(output)


Chunk = tuple[list[Any], TreeSpec]
"""The leaves of one chunk of samples (tensors ``(k, N, *out)``, other leaves as returned) and the
structure of the selected output."""


def _chunk_of(output: Any, selector: OutputSelector, batch: int, count: int, transform: Transform) -> Chunk:
    selected = _select_output(selector, output)
    leaves, spec = tree_flatten(selected)
    result: list[Any] = []
    found = False
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            result.append(leaf)
            continue
        if leaf.dim() == 0 or leaf.shape[0] != batch * count:
            name = _path_names(selected, len(leaves), "output")[index]
            raise ValueError(
                f"the model output must have the batch ({batch} x {count} samples) on dim 0, got shape "
                f"{tuple(leaf.shape)} for {name}; select the outputs to sample with output="
            )
        result.append(_apply_transform(transform, leaf.reshape(count, batch, *leaf.shape[1:])))
        found = True
    if not found:
        raise TypeError(
            "the model must return a tensor, or a tuple, list, dict or ModelOutput holding tensors, for MC "
            f"sampling, got {type(selected).__name__} with no tensor; select the output to sample with "
            "output="
        )
    return result, spec


# -- the sampling loop -------------------------------------------------------------------------


def _eager_if_compiled(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Run compiled submodules eagerly (for the measuring forward: no compile, no new guards)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", None)
    if compiled is not None and any(isinstance(m, compiled) for m in model.modules()):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def _leaf_signature(tree: Any) -> Hashable:
    return tuple(
        (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else _describe(v)
        for v in tree_flatten(tree)[0]
    )


@dataclass
class _Options:
    samples: int
    chunk_size: int | None
    budget: int
    seed: int
    transform: Transform
    selector: OutputSelector
    trunk: Any
    head: Callable[..., Any] | None
    selection: tuple[SelectorSpec, SelectorSpec, AttentionRate]
    first_sample: int = 0  # the index of the first sample computed (a rank's share of T)


def _prepare(
    model: object,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    function: str,
    *,
    T: object,  # noqa: N803
    chunk_size: object,
    memory_budget: object,
    seed: object,
    transform: object,
    output: object,
    trunk: object,
    head: object,
    include: SelectorSpec,
    exclude: SelectorSpec,
    attention_p: AttentionRate,
    model_kwargs: object,
) -> tuple[nn.Module, _Inputs, _Options]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs, samples = _parse_call(function, model, args, kwargs, T, model_kwargs)
    inputs = _Inputs.check(args, kwargs)
    if chunk_size is not None and memory_budget is not None:
        raise ValueError("pass at most one of chunk_size and memory_budget, got both")
    chunk = None if chunk_size is None else _positive_int(chunk_size, "chunk_size")
    budget = (
        default_memory_budget(_input_device(model, inputs.leaves))
        if memory_budget is None
        else _positive_int(memory_budget, "memory_budget")
    )
    if not (trunk is None or trunk == "auto" or callable(trunk)):
        raise ValueError(f"trunk must be 'auto', None or a callable, got {trunk!r}")
    if callable(trunk) != (head is not None):
        raise ValueError("trunk= and head= must be given together (or head=None with trunk='auto'/None)")
    if head is not None and not callable(head):
        raise TypeError(f"head must be callable, got {type(head).__name__}")
    options = _Options(
        samples, chunk, budget, _resolve_seed(seed), _check_transform(transform),
        _check_output_selector(output), trunk, head, (include, exclude, attention_p),
    )  # fmt: skip
    return model, inputs, options


def _generate(model: nn.Module, inputs: _Inputs, options: _Options) -> Generator[Chunk, None, None]:
    include, exclude, attention_p = options.selection
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
            yield from _sample(model, handle, inputs, options, None if owned else id(handle))
    except BaseException:
        if owned:
            handle.restore(warn=False)
        raise
    if owned:
        handle.restore()


def _sample(
    model: nn.Module, handle: MCDropoutHandle, inputs: _Inputs, options: _Options, outer_mode: int | None
) -> Iterator[Chunk]:
    """The chunks of one call, in the MC mode ``handle`` (``outer_mode``: the id of a mode the
    caller entered, whose selection is not in ``options``)."""
    batch, samples = inputs.batch, options.samples
    split: TrunkSplit | None = None
    features: Any = None
    kind: Literal["auto", "manual"] | None = None
    reason, trunk_modules, head_modules = "", 0, 0
    trunk_key: Hashable = None
    cache = _CACHE.setdefault(model, _ModelCache())
    signature = (inputs.signature(), repr(options.selection), outer_mode)
    if options.trunk == "auto":
        positional, reason = inputs.positional(model)
        if positional is not None and signature in cache.no_split:
            positional, reason = None, "no split, as in an earlier call with these inputs"
        if positional is not None:
            split = split_trunk(model, handle, positional)
            if split is None:
                cache.no_split.add(signature)  # the samples are the same without a split
                reason = "no split: untraced forward or nothing before the first dropout"
        if split is not None:
            kind, trunk_key = "auto", ("auto", _leaf_signature(split.values))
            trunk_modules, head_modules = len(split.trunk_modules), len(split.head_modules)
    elif options.trunk is not None:
        given = functools.partial(options.trunk, **inputs.kwargs) if inputs.kwargs else options.trunk
        features = user_trunk(given, handle, inputs.args)
        feature_leaves = tree_flatten(features)[0]
        tensors = [v for v in feature_leaves if isinstance(v, torch.Tensor)]
        if not tensors:
            raise TypeError(
                f"trunk must return a tensor or a pytree of tensors, got {type(features).__name__}"
            )
        for value in tensors:
            if value.dim() == 0 or value.shape[0] != batch:
                raise ValueError(
                    f"trunk must return the batch ({batch}) on dim 0, got shape {tuple(value.shape)}"
                )
        kind, trunk_key = "manual", ("manual", _leaf_signature(features))
    else:
        reason = "trunk=None"

    def forward(first: int, count: int) -> Chunk:
        with handle.sampling(options.seed, options.first_sample + first, count):
            if split is not None:
                output = split.run_head(handle, count)
            elif options.head is not None:
                output = options.head(_repeat_tree(features, count))
            else:
                args, kwargs = inputs.repeat(count)
                output = model(*args, **kwargs)
        return _chunk_of(output, options.selector, batch, count, options.transform)

    chunk_size, peak, measured, ready = options.chunk_size, None, False, None
    if chunk_size is None:
        key = (signature, trunk_key)
        peaks = cache.peaks
        peak = peaks.get(key)
        if peak is None and samples > 1:
            count = min(samples, _MEASURE_SAMPLES)
            with _eager_if_compiled(model), PeakMemoryMeter() as meter:
                ready = forward(0, count)
            peak = peaks[key] = math.ceil(meter.peak / count)
            measured = True
            if count < samples:
                ready = None  # a measuring forward only: the chunks below recompute these samples
        chunk_size = samples if peak is None else max(1, min(samples, options.budget // max(peak, 1)))
        if ready is not None and chunk_size < samples:
            ready = None
    plan = MCPlan(
        samples=samples,
        batch=batch,
        chunk_size=chunk_size,
        trunk=kind,
        reason=reason,
        trunk_modules=trunk_modules if kind == "auto" else None,
        head_modules=head_modules if kind == "auto" else None,
        peak_bytes=peak,
        memory_budget=None if options.chunk_size is not None else options.budget,
        measured=measured,
    )
    _LAST.plan = plan
    logger.debug("MC plan for %s, T = %d, N = %d: %s", type(model).__name__, samples, batch, plan)
    if ready is not None:
        yield ready
        return
    first = 0
    while first < samples:
        count = min(chunk_size, samples - first)
        yield forward(first, count)
        first += count


# -- public API --------------------------------------------------------------------------------


def _unflattened(chunks: Generator[Chunk, None, None]) -> Generator[Any, None, None]:
    try:
        for leaves, spec in chunks:
            yield tree_unflatten(leaves, spec)
    finally:
        chunks.close()  # an early close of this generator ends the MC mode at once


def iter_mc_samples(
    model: nn.Module,
    *args: Any,
    T: int | None = None,  # noqa: N803 - the number of samples is T in the literature
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    seed: int | None = None,
    transform: Transform = None,
    output: OutputSelector = None,
    trunk: Literal["auto"] | Callable[..., Any] | None = "auto",
    head: Callable[..., Any] | None = None,
    include: SelectorSpec = None,
    exclude: SelectorSpec = None,
    attention_p: AttentionRate = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Generator[Any, None, None]:
    """Yield the ``T`` Monte Carlo samples of ``model(*args, **kwargs)`` chunk by chunk.

    Each chunk has the structure of the (selected) output with every tensor leaf of shape
    ``(k, N, *out)`` (samples ``t .. t + k - 1`` in order); chunks are computed under
    ``torch.no_grad``.  The model is in MC mode (:func:`dropkit.mc.mode.mc_dropout`) from the
    first chunk until the generator finishes or is closed, and restored then.  See
    :mod:`dropkit.mc.sampling` and :func:`mc_predict` for the arguments.

    Args:
        model: the model; every tensor leaf of its (selected) output has the batch first.
        *args: the model's positional inputs (any pytree; tensors batch first); without ``T=``,
            the last one is ``T``.
        T: number of samples, ``>= 1``.
        chunk_size: samples per batched forward.
        memory_budget: bytes of tensor storage per batched forward (instead of ``chunk_size``).
        seed: the seed of the samples; ``None`` draws one from dropkit's global seed.
        transform: applied to every tensor leaf of every chunk: ``"softmax"``, ``"log_softmax"``
            (over the last dim), ``"sigmoid"`` or a callable on a ``(k, N, *out)`` tensor.
        output: the part of the model output to sample: a key or attribute name, an index or a
            callable; ``None``: all of it.
        trunk: ``"auto"``, ``None`` (no caching) or a callable computing the trunk.
        head: with a callable ``trunk``: the callable mapping the trunk's output to the output.
        include: modules to turn on (see :func:`dropkit.mc.mode.mc_dropout`).
        exclude: modules to keep deterministic.
        attention_p: rate rule for SDPA calls made with ``dropout_p=0``.
        model_kwargs: more keyword inputs of the model (for names that ``iter_mc_samples`` uses).
        **kwargs: the model's keyword inputs (pytrees; tensors batch first).

    Returns:
        A generator over the chunks of samples (``close()`` it to end the MC mode early).

    Examples::

        >>> from dropkit.mc.sampling import iter_mc_samples
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(0.5), torch.nn.Linear(5, 2))
        >>> chunks = list(iter_mc_samples(model, torch.randn(4, 3), T=10, chunk_size=4, seed=0))
        >>> [tuple(chunk.shape) for chunk in chunks]
        [(4, 4, 2), (4, 4, 2), (2, 4, 2)]
    """
    model, inputs, options = _prepare(
        model, args, kwargs, "iter_mc_samples",
        T=T, chunk_size=chunk_size, memory_budget=memory_budget, seed=seed, transform=transform,
        output=output, trunk=trunk, head=head, include=include, exclude=exclude,
        attention_p=attention_p, model_kwargs=model_kwargs,
    )  # fmt: skip
    return _unflattened(_generate(model, inputs, options))


def mc_predict(
    model: nn.Module,
    *args: Any,
    T: int | None = None,  # noqa: N803 - the number of samples is T in the literature
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    seed: int | None = None,
    reduce: Literal["mean", "stats"] | None = None,
    transform: Transform = None,
    probabilities: bool | None = None,
    output: OutputSelector = None,
    trunk: Literal["auto"] | Callable[..., Any] | None = "auto",
    head: Callable[..., Any] | None = None,
    include: SelectorSpec = None,
    exclude: SelectorSpec = None,
    attention_p: AttentionRate = None,
    group: torch.distributed.ProcessGroup | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``T`` Monte Carlo dropout predictions of ``model(*args, **kwargs)``.

    The model runs in MC mode (every dropout on, BatchNorm and the rest in eval; see
    :func:`dropkit.mc.mode.mc_dropout`), under ``torch.no_grad``, and is restored afterwards;
    inside a ``with mc_dropout(model, ...)`` block, that mode (and its selection) is used.
    Inputs and outputs, batching, the memory budget, the per-sample keys that make the result
    independent of the chunk size, and trunk caching are described in
    :mod:`dropkit.mc.sampling`; :func:`last_plan` tells what the call chose.

    Args:
        model: the model; every tensor leaf of its (selected) output has the batch first.
        *args: the model's positional inputs: tensors (batch on dim 0) or any pytree of them,
            other leaves passed through.  Without ``T=``, the last one is ``T`` (the short form
            ``mc_predict(model, x, T)``).
        T: number of samples, ``>= 1``.
        chunk_size: samples per batched forward (``1`` = a loop over samples).
        memory_budget: bytes of tensor storage per batched forward, used instead of
            ``chunk_size``; when neither is given, 32 MiB for inputs on the CPU, 256 MiB on an
            accelerator (:func:`default_memory_budget`).  The chunk is the largest
            ``k`` with ``k`` times the measured peak of one sample within the budget.
        seed: the seed of the samples (any int); ``None`` draws one from dropkit's global seed
            (:func:`dropkit.manual_seed`), fresh at each call.
        reduce: ``None``: all samples, each tensor leaf of shape ``(T, N, *out)``; ``"mean"``:
            their mean, ``(N, *out)``; ``"stats"``: a streaming
            :class:`~dropkit.mc.streaming.MCSummary` per tensor leaf (mean, variance, and with
            probabilities mean entropy and votes), never holding the ``T`` samples.
        transform: applied to every tensor leaf before reducing: ``"softmax"``,
            ``"log_softmax"`` (over the last dim), ``"sigmoid"``, or a callable on a
            ``(k, N, *out)`` tensor.
        probabilities: with ``reduce="stats"``, whether samples are probability vectors
            (default: ``transform == "softmax"``).
        output: the part of the model output to sample: a key or attribute name
            (``"logits"`` of a Hugging Face ``ModelOutput``), an index, or a callable on the
            output; ``None`` (default): all of it.
        trunk: ``"auto"`` (find the deterministic prefix with ``torch.fx``), ``None`` (no
            caching) or a callable computing the trunk from the inputs.
        head: with a callable ``trunk``: the callable mapping the trunk's output to the output.
        include: modules to turn on (see :func:`dropkit.mc.mode.mc_dropout`).
        exclude: modules to keep deterministic.
        attention_p: rate rule for SDPA calls made with ``dropout_p=0``.
        group: a ``torch.distributed`` process group whose ranks share the work: every rank of
            it calls ``mc_predict`` with the same model, inputs and arguments, computes a
            contiguous share of the ``T`` samples (``T`` must be at least the group's size), and
            gets the whole result (see *Distributed* in :mod:`dropkit.mc.sampling`); ``None``:
            this process computes everything.
        model_kwargs: more keyword inputs of the model, for names that ``mc_predict`` itself
            takes (``seed``, ``output``, ``T``, ``group``, ...).
        **kwargs: the model's keyword inputs (``input_ids=``, ``attention_mask=``; pytrees,
            tensors batch first).

    Returns:
        The samples, their mean, or :class:`~dropkit.mc.streaming.MCSummary` statistics, in the
        structure of the (selected) output: a tensor for a tensor output, a dict, tuple or
        ``ModelOutput`` of them otherwise (non-tensor leaves passed through).

    Raises:
        TypeError: ``model`` is not a module, ``T`` is missing, the inputs hold no tensor, or an
            argument has the wrong type (``group`` not a process group included).
        ValueError: ``T``, ``chunk_size`` or ``memory_budget`` below 1, both of the last two
            given, a tensor input or output without the batch on dim 0, a bad ``reduce`` /
            ``transform``, an ``output`` key that is not there, or with ``group``, ``T`` below
            the group's size or a group without this process.

    Examples::

        >>> from dropkit.mc.sampling import mc_predict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 4))
        >>> x = torch.randn(5, 3)
        >>> samples = mc_predict(model, x, T=20, seed=0, transform="softmax")
        >>> samples.shape  # sample axis first
        torch.Size([20, 5, 4])
        >>> bool(torch.equal(samples, mc_predict(model, x, 20, seed=0, transform="softmax", chunk_size=3)))
        True
        >>> summary = mc_predict(model, x, T=1000, seed=0, transform="softmax", reduce="stats")
        >>> summary.mean.shape, summary.mean_entropy.shape
        (torch.Size([5, 4]), torch.Size([5]))

        Keyword inputs, and a mapping as output (a Hugging Face model returns a ``ModelOutput``)::

        >>> class Classifier(torch.nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.embed, self.drop = torch.nn.Embedding(10, 4), torch.nn.Dropout(0.5)
        ...     def forward(self, input_ids, attention_mask=None):
        ...         h = self.drop(self.embed(input_ids)) * attention_mask[..., None]
        ...         return {"logits": h.sum(1), "hidden": h}
        >>> inputs = {"input_ids": torch.randint(10, (2, 6)), "attention_mask": torch.ones(2, 6)}
        >>> mean = mc_predict(Classifier(), T=8, output="logits", reduce="mean", **inputs)
        >>> mean.shape
        torch.Size([2, 4])
        >>> both = mc_predict(Classifier(), T=8, **inputs)
        >>> {name: tuple(value.shape) for name, value in both.items()}
        {'logits': (8, 2, 4), 'hidden': (8, 2, 6, 4)}
    """
    if reduce not in (None, "mean", "stats"):
        raise ValueError(f"reduce must be None, 'mean' or 'stats', got {reduce!r}")
    if probabilities is not None and not isinstance(probabilities, bool):
        raise TypeError(f"probabilities must be a bool or None, got {type(probabilities).__name__}")
    model, inputs, options = _prepare(
        model, args, kwargs, "mc_predict",
        T=T, chunk_size=chunk_size, memory_budget=memory_budget, seed=seed, transform=transform,
        output=output, trunk=trunk, head=head, include=include, exclude=exclude,
        attention_p=attention_p, model_kwargs=model_kwargs,
    )  # fmt: skip
    is_probability = (options.transform == "softmax") if probabilities is None else probabilities
    counts: list[int] = []
    if group is not None:
        from dropkit.distributed import collectives  # late: only distributed calls pay its imports

        ranks = collectives.check_group(group)
        if options.samples < len(ranks):
            raise ValueError(
                f"T must be at least the number of ranks of group ({len(ranks)}) to split the samples "
                f"across them, got {options.samples}"
            )
        shares = [collectives.split_range(options.samples, i, len(ranks)) for i in range(len(ranks))]
        counts = [stop - start for start, stop in shares]
        mine = ranks.index(torch.distributed.get_rank())
        options.seed = collectives.broadcast_seed(options.seed, group)  # a drawn seed differs per rank
        options.first_sample, options.samples = shares[mine][0], counts[mine]
    first: list[Any] | None = None
    structure: TreeSpec | None = None
    gathered: dict[int, list[torch.Tensor]] = {}
    summaries: dict[int, MCSummary] = {}
    for leaves, spec in _generate(model, inputs, options):
        if first is None or structure is None:
            first, structure = leaves, spec
            tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
            if reduce is not None:
                for index in tensors:
                    if not (leaves[index].is_floating_point() or leaves[index].is_complex()):
                        name = _path_names(tree_unflatten(leaves, spec), len(leaves), "output")[index]
                        raise TypeError(
                            f"reduce={reduce!r} needs floating-point outputs, got {leaves[index].dtype} "
                            f"for {name}; select the outputs to reduce with output=, or use reduce=None"
                        )
            gathered = {index: [] for index in tensors}
            summaries = {
                index: MCSummary(probabilities=is_probability and reduce == "stats") for index in tensors
            }
        elif spec != structure:
            raise ValueError(
                f"the model output changed structure between chunks: {structure} and then {spec}"
            )
        for index in gathered:
            if reduce is None:
                gathered[index].append(leaves[index])
            else:
                summaries[index].update(leaves[index])
    if first is None or structure is None:  # T >= 1 always gives a chunk
        raise RuntimeError("mc_predict computed no samples")
    if group is not None:
        from dropkit.distributed import collectives

        if reduce is None:
            gathered = {
                index: [collectives.all_gather_rows(torch.cat(chunks), counts, group)]
                for index, chunks in gathered.items()
            }
        else:  # every rank merges every rank's statistics, in rank order: the same result
            stats = is_probability and reduce == "stats"
            merged = {index: MCSummary(probabilities=stats) for index in summaries}
            for parts in collectives.all_gather_objects(summaries, group):
                for index, part in parts.items():
                    merged[index].merge(part)
            summaries = merged
    result: list[Any] = list(first)
    for index in gathered:
        if reduce is None:
            result[index] = torch.cat(gathered[index])
        elif reduce == "mean":
            result[index] = summaries[index].mean
        else:
            result[index] = summaries[index]
    return tree_unflatten(result, structure)
