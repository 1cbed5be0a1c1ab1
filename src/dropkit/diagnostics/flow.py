"""Where each dropout site's output goes: a traced forward, or the order of an ``nn.Sequential``.

The placement rules need to know what a dropout *feeds* (a BatchNorm? a convolution? the
model's output?) and what feeds it.  :func:`trace_flow` finds out by running one forward of
the model on example inputs, in eval mode and without gradients, with every ``training`` flag
restored afterwards, while

* forward pre/post hooks on every module keep the stack of running modules, and
* a :class:`torch.overrides.TorchFunctionMode` sees every call of a ``torch`` function or
  tensor method made from Python, in the order they run.

Forward hooks plus a function mode were chosen over ``torch.fx.symbolic_trace``: FX cannot
trace models with data-dependent control flow (most Hugging Face and timm models), while this
runs whatever the model runs.  The function mode is also what finds functional dropout: it
sees ``torch.nn.functional.dropout`` (and ``dropout1d/2d/3d``, ``alpha_dropout``,
``feature_alpha_dropout``, ``torch.dropout``, dropkit's functional ops and
``scaled_dot_product_attention``) however the model reached it, also through a name bound
before the forward (``from torch.nn.functional import dropout``), which the stand-ins of
:mod:`dropkit.mc.patching` miss; those stand-ins, when an MC mode has installed them, are
recognised as the functions they stand for.  A functional call's rate is the one passed if
positive, else the rate held by the calling module as :func:`dropkit.mc_dropout` finds it
(models pass ``p=0`` in eval).

Every tensor the forward makes carries three sets: the sites whose output it *is* up to
operations on that tensor alone (``direct``: a ReLU, a reshape, a scale, a bias or mask added),
the sites mixed into it with other data (``mixed``: a residual add, a concatenation, an
attention product), and the ops that *produced* it (:class:`Producer`: the last linear,
convolution, normalisation or embedding before it, or the model input).  A linear map,
convolution, normalisation, embedding or recurrent layer (module or functional call, a matmul
with a parameter) consumes its input, is recorded as a consumer of the sites in it, and starts
fresh sets.  A dropout module in eval returns its input unchanged, so a tensor that also flows
elsewhere (a skip connection taken after the dropout's input) is seen as dropped there too.

Without example inputs, :func:`sequential_flow` reads the same facts off a model built only
of nested ``nn.Sequential`` containers, whose order is the order of the forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import nn
from torch.overrides import TorchFunctionMode

from dropkit.diagnostics.sites import UNIT_VARIANTS, DropoutSite, find_module_sites
from dropkit.mc.patching import stand_in_for
from dropkit.mc.selection import FAST_PATH_MODULES, attention_rate

__all__ = ["Flow", "Producer", "SiteUse", "module_kind", "sequential_flow", "trace_flow"]


@dataclass(frozen=True)
class Producer:
    """An op whose output reaches a tensor without passing another linear map or normalisation.

    Attributes:
        kind: ``"input"`` (a model input), ``"linear"``, ``"conv"``, ``"embedding"``,
            ``"batchnorm"``, ``"norm"`` (LayerNorm, GroupNorm, ...), ``"recurrent"``,
            ``"attention"`` or ``"other"`` (a module with parameters of another kind).
        path: the module (or, for a functional call, the calling module).
        rank: number of dims of its output (``None`` when not traced).
        channels: size of dim 1 of its output (``None`` when not traced or 1-D).
    """

    kind: str
    path: str
    rank: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class _Info:
    direct: frozenset[DropoutSite] = frozenset()
    mixed: frozenset[DropoutSite] = frozenset()
    producers: frozenset[Producer] = frozenset()


_EMPTY = _Info()


@dataclass(eq=False)  # compared and hashed by identity: one object per site and flow
class SiteUse:
    """What a traced forward (or an ``nn.Sequential``'s order) tells about one dropout site.

    Attributes:
        site: the site.
        calls: how many times the forward ran it (0: never; ``None`` fields below are empty).
        order: how many consumer ops (linear maps, normalisations, ...) ran before its first call.
        input_shapes: shapes of its input at each call (empty when not traced).
        producers: the ops that produced its input (see :class:`Producer`).
        consumers: ``path -> kind`` of the ops its output reaches unchanged (``direct``).
        mixed_consumers: ``path -> kind`` of the ops its output reaches mixed with other data.
        reaches_output: its output is, up to operations on it alone, part of the model's output.
        eval_rates: the rates at which it dropped although the model was in eval mode (``None``
            where the rate could not be read).
    """

    site: DropoutSite
    calls: int = 0
    order: int = -1
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    producers: set[Producer] = field(default_factory=set)
    consumers: dict[str, str] = field(default_factory=dict)
    mixed_consumers: dict[str, str] = field(default_factory=dict)
    reaches_output: bool = False
    eval_rates: list[float | None] = field(default_factory=list)


@dataclass
class Flow:
    """The dropout sites of a model and what they feed.

    Attributes:
        method: ``"trace"`` (a forward ran on example inputs), ``"sequential"`` (the order of
            an ``nn.Sequential``) or ``"static"`` (modules only, nothing about the order).
        uses: one :class:`SiteUse` per site: those the forward ran, in the order of their first
            call, then the module sites it never ran (``calls == 0``).
        ops: ``(kind, path)`` of every consumer op in the order they ran.
        calls: how many times each consumer module or site ran, by path.
        selu: the model uses SELU activations (a module, or a call seen in the forward).
        output_producers: the producers of the model's output tensors.
    """

    method: str
    uses: list[SiteUse] = field(default_factory=list)
    ops: list[tuple[str, str]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    selu: bool = False
    output_producers: set[Producer] = field(default_factory=set)

    @property
    def traced(self) -> bool:
        """Whether the order of the forward is known (``"trace"`` or ``"sequential"``)."""
        return self.method != "static"


# ---------------------------------------------------------------------------------------------
# Module and function kinds

_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_KINDS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.modules.batchnorm._BatchNorm,), "batchnorm"),
    (_NORMS, "norm"),
    ((nn.Linear, nn.Bilinear), "linear"),
    ((nn.modules.conv._ConvNd,), "conv"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding"),
    ((nn.RNNBase, nn.RNNCellBase), "recurrent"),
    ((nn.MultiheadAttention,), "attention"),
)


def module_kind(module: nn.Module) -> str | None:
    """The consumer kind of ``module`` (see :class:`Producer`), or ``None`` for a module that
    passes data through (activations, pooling, containers).

    Example::

        >>> import torch
        >>> from dropkit.diagnostics.flow import module_kind
        >>> module_kind(torch.nn.BatchNorm2d(3)), module_kind(torch.nn.Conv1d(2, 2, 1))
        ('batchnorm', 'conv')
        >>> module_kind(torch.nn.ReLU()) is None
        True
    """
    for classes, kind in _KINDS:
        if isinstance(module, classes):
            return kind
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        return "linear"  # GPT-2's transposed linear layer
    has_parameters = any(parameter is not None for parameter in module._parameters.values())
    return "other" if has_parameters and not module._modules else None


def _site_kind(module: nn.Module, site: DropoutSite) -> str | None:
    """For a site that is also a layer (DropConnect, variational layers, an LSTM), its kind."""
    if site.variant in ("weight", "learned"):
        wrapped = getattr(module, "module", None)
        if isinstance(wrapped, nn.Module):
            return module_kind(wrapped) or "other"
        name = type(module).__name__
        if "Conv" in name:
            return "conv"
        return "embedding" if "Embedding" in name else "linear"
    if site.variant == "zoneout" or site.variant == "recurrent":
        return "recurrent"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return None


def _functions(names: Iterable[str], namespace: object) -> list[Callable[..., Any]]:
    return [getattr(namespace, name) for name in names if hasattr(namespace, name)]


# Functional dropout: the function -> (variant, default of ``training``).
_DROPOUT_FUNCTIONS: dict[Callable[..., Any], tuple[str, str, bool | None]] = {}
for _name, _variant, _default in (
    ("dropout", "element", True),
    ("dropout1d", "channel", True),
    ("dropout2d", "channel", True),
    ("dropout3d", "channel", True),
    ("alpha_dropout", "alpha", False),
    ("feature_alpha_dropout", "feature_alpha", False),
):
    _DROPOUT_FUNCTIONS[getattr(torch_F, _name)] = (f"torch.nn.functional.{_name}", _variant, _default)
    _stand_in = stand_in_for(getattr(torch_F, _name))
    if _stand_in is not None:
        _DROPOUT_FUNCTIONS[_stand_in] = (f"torch.nn.functional.{_name}", _variant, _default)
for _name, _variant in (
    ("dropout", "element"),
    ("dropout_", "element"),
    ("feature_dropout", "channel"),
    ("feature_dropout_", "channel"),
    ("alpha_dropout", "alpha"),
    ("alpha_dropout_", "alpha"),
    ("feature_alpha_dropout", "feature_alpha"),
    ("feature_alpha_dropout_", "feature_alpha"),
):
    if hasattr(torch, _name):
        _DROPOUT_FUNCTIONS[getattr(torch, _name)] = (f"torch.{_name}", _variant, None)
_SDPA: set[Callable[..., Any]] = {torch_F.scaled_dot_product_attention}
_stand_in = stand_in_for(torch_F.scaled_dot_product_attention)
if _stand_in is not None:
    _SDPA.add(_stand_in)

_FUNCTION_KINDS: dict[Callable[..., Any], str] = {}
for _kind, _names in (
    ("linear", ("linear", "bilinear")),
    ("conv", ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")),
    ("embedding", ("embedding", "embedding_bag")),
    ("batchnorm", ("batch_norm",)),
    ("norm", ("layer_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm")),
    ("attention", ("multi_head_attention_forward",)),
):
    for _function in _functions(_names, torch_F):
        _FUNCTION_KINDS[_function] = _kind
for _function in _functions(("batch_norm",), torch):
    _FUNCTION_KINDS[_function] = "batchnorm"
# Products that are a linear map when one operand is a parameter (``x @ self.weight``).
_PRODUCTS = set(
    _functions(("matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "tensordot"), torch)
    + _functions(("__matmul__", "__rmatmul__", "matmul", "mm", "bmm", "addmm"), torch.Tensor)
)
_SELU = set(_functions(("selu",), torch_F) + _functions(("selu", "selu_"), torch))


def _tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors in ``value`` (a tensor, or nested lists, tuples and mappings of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 4:
        return []
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item, depth + 1)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item, depth + 1)]
    return []


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, names: tuple[str, ...]) -> Any:
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[index] if len(args) > index else None


def _as_rate(value: object) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value.detach().reshape(()).item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0.0 <= float(value) <= 1.0 else None


def _producer(kind: str, path: str, output: Any) -> Producer:
    tensors = _tensors(output)
    if not tensors:
        return Producer(kind, path)
    first = tensors[0]
    return Producer(kind, path, first.dim(), int(first.shape[1]) if first.dim() >= 2 else None)


# ---------------------------------------------------------------------------------------------
# Recording a forward


@dataclass
class _Frame:
    module: nn.Module
    path: str
    site: DropoutSite | None
    kind: str | None
    info: _Info


class _Recorder(TorchFunctionMode):
    """Hooks and a torch function mode that follow the dropout sites through one forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {module: name for name, module in model.named_modules()}
        self.module_sites = find_module_sites(model)
        self.uses: dict[tuple[str, str], SiteUse] = {}
        self.flow = Flow("trace")
        self.stack: list[_Frame] = []
        self._infos: dict[int, tuple[weakref.ref[torch.Tensor], _Info]] = {}

    # -- tensor information -------------------------------------------------------------------

    def info(self, tensor: torch.Tensor) -> _Info:
        entry = self._infos.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return _EMPTY

    def set_info(self, value: Any, info: _Info) -> None:
        for tensor in _tensors(value):
            self._infos[id(tensor)] = (weakref.ref(tensor), info)

    def merged(self, value: Any) -> _Info:
        """The information of an op's inputs: ``direct`` sites shared by every tracked input."""
        infos = [self.info(tensor) for tensor in _tensors(value)]
        infos = [info for info in infos if info is not _EMPTY]
        if not infos:
            return _EMPTY
        direct = frozenset.intersection(*(info.direct for info in infos))
        every = frozenset().union(*(info.direct | info.mixed for info in infos))
        producers = frozenset().union(*(info.producers for info in infos))
        return _Info(direct, every - direct, producers)

    # -- events ---------------------------------------------------------------------------------

    def use(self, site: DropoutSite) -> SiteUse:
        key = (site.path, site.name)
        if key not in self.uses:
            self.uses[key] = SiteUse(site, order=len(self.flow.ops))
        return self.uses[key]

    def site_call(self, site: DropoutSite, info: _Info, input: Any) -> SiteUse:
        use = self.use(site)
        use.calls += 1
        use.producers |= info.producers
        tensors = _tensors(input)
        if tensors:
            use.input_shapes.append(tuple(tensors[0].shape))
        return use

    def consume(self, kind: str, path: str, info: _Info) -> None:
        self.flow.ops.append((kind, path))
        for site in info.direct:
            self.use(site).consumers.setdefault(path, kind)
        for site in info.mixed:
            self.use(site).mixed_consumers.setdefault(path, kind)

    def count(self, path: str) -> None:
        self.flow.calls[path] = self.flow.calls.get(path, 0) + 1

    # -- module hooks ---------------------------------------------------------------------------

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        path = self.names.get(module, type(module).__name__)
        site = self.module_sites.get(module)
        kind = _site_kind(module, site) if site is not None else module_kind(module)
        info = self.merged((args, kwargs))
        if isinstance(module, nn.SELU):
            self.flow.selu = True
        if site is not None:
            self.count(path)
            # What the site drops is its first argument (a residual or key/value is not).
            self.site_call(site, self.merged(args[:1]) if args else info, args[0] if args else kwargs)
        if kind is not None:
            if site is None:
                self.count(path)
            self.consume(kind, path, info)
        self.stack.append(_Frame(module, path, site, kind, info))

    def post_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self.stack or self.stack[-1].module is not module:
            return
        frame = self.stack.pop()
        if frame.kind is not None:
            self.set_info(output, _Info(producers=frozenset({_producer(frame.kind, frame.path, output)})))
        elif frame.site is not None:
            info = frame.info
            if frame.site.variant in UNIT_VARIANTS or (frame.site.variant == "path" and not module._modules):
                first = self.merged(args[:1]) if args else info
                result = _Info(first.direct | {frame.site}, first.mixed, first.producers)
            else:  # attention, residual, wrappers: the site is mixed with other data
                result = _Info(frozenset(), info.direct | info.mixed | {frame.site}, info.producers)
            self.set_info(output, result)

    # -- functions ------------------------------------------------------------------------------

    def _calling(self) -> _Frame | None:
        return self.stack[-1] if self.stack else None

    def _functional_site(
        self, frame: _Frame | None, name: str, variant: str, passed: float | None
    ) -> DropoutSite:
        module = frame.module if frame is not None else None
        rate = passed if passed else None
        if rate is None and module is not None:
            rate = attention_rate(None, module)
        return DropoutSite(frame.path if frame is not None else "", "function", name, variant, rate)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        self._record(func, args, kwargs, output)
        return output

    def _record(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        frame = self._calling()
        # Calls inside a dropout module or a known layer are that module's business (its hooks
        # record it); inside any other module they are followed one by one.
        opaque = frame is not None and (frame.site is not None or frame.kind not in (None, "other"))
        if func in _SELU:
            self.flow.selu = True
        dropout = _DROPOUT_FUNCTIONS.get(func)
        if dropout is not None:
            name, variant, default = dropout
            passed = _as_rate(_argument(args, kwargs, 1, ("p",)))
            training = _argument(args, kwargs, 2, ("training", "train"))
            training = default if training is None else bool(training)
            if opaque:
                if training and passed and frame is not None and frame.site is not None:
                    self.use(frame.site).eval_rates.append(passed)
                return
            if frame is not None and "Attention" in type(frame.module).__name__:
                variant = "attention"  # dropout of attention weights in an attention module's forward
            site = self._functional_site(frame, name, variant, passed)
            info = self.merged(args[:1] or kwargs.get("input"))
            use = self.site_call(site, info, args[:1])
            if training and passed:
                use.eval_rates.append(passed)
            self.set_info(output, _Info(info.direct | {site}, info.mixed, info.producers))
            return
        if func in _SDPA:
            passed = _as_rate(_argument(args, kwargs, 4, ("dropout_p",)))
            info = self.merged((args[:3], [kwargs.get(key) for key in ("query", "key", "value")]))
            if not opaque:
                site = self._functional_site(
                    frame, "torch.nn.functional.scaled_dot_product_attention", "attention", passed
                )
                if site.rate:
                    use = self.site_call(site, info, args[:1])
                    if passed:
                        use.eval_rates.append(passed)
                    info = _Info(info.direct, info.mixed | {site}, info.producers)
            elif passed and frame is not None and frame.site is not None:
                self.use(frame.site).eval_rates.append(passed)
            self.set_info(output, _Info(frozenset(), info.direct | info.mixed, info.producers))
            return
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "dropkit":
            if func._opname != "checked_rate" and not opaque:
                # A dropkit functional op runs only when dropping: here, in eval mode.
                site = self._functional_site(frame, f"dropkit.ops.{func._opname}", "element", None)
                info = self.merged(args[:1])
                use = self.site_call(site, info, args[:1])
                use.eval_rates.append(_as_rate(args[2]) if len(args) > 2 else None)
                self.set_info(output, _Info(info.direct | {site}, info.mixed, info.producers))
            return
        if opaque:
            return
        kind = _FUNCTION_KINDS.get(func)
        if kind is None and func in _PRODUCTS:
            both = _tensors((args, kwargs))
            if any(isinstance(tensor, nn.Parameter) for tensor in both):
                kind = "linear"
        path = frame.path if frame is not None else ""
        if kind is not None:
            self.consume(kind, path, self.merged((args, kwargs)))
            self.set_info(output, _Info(producers=frozenset({_producer(kind, path, output)})))
            return
        if _tensors(output):
            info = self.merged((args, kwargs))
            if info is not _EMPTY:
                self.set_info(output, info)


def _example_call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def check_example_inputs(example_inputs: object) -> None:
    """Raise ``TypeError`` unless ``example_inputs`` is a tensor, a tuple or a mapping."""
    if not isinstance(example_inputs, (torch.Tensor, tuple, Mapping)):
        raise TypeError(
            "example_inputs must be a tensor, a tuple of positional arguments or a mapping of "
            f"keyword arguments, got {type(example_inputs).__name__}"
        )


def trace_flow(model: nn.Module, example_inputs: Any) -> Flow:
    """Run one eval-mode forward of ``model`` on ``example_inputs`` and follow its dropout sites.

    The forward runs without gradients; every ``training`` flag is restored afterwards (the
    ``torch.nn.Transformer*`` layers are put in training mode for it, which only keeps them off
    their fused eval fast path, so that their dropout modules are seen; their children stay in
    eval).  See :mod:`dropkit.diagnostics.flow` for what is recorded.

    Args:
        model: the model.
        example_inputs: a tensor, a tuple of positional arguments or a mapping of keyword
            arguments for ``model``.

    Returns:
        The :class:`Flow` (``method="trace"``).

    Raises:
        TypeError: ``example_inputs`` is not a tensor, tuple or mapping.
        RuntimeError: the forward failed (the message says how; the error is chained).

    Example::

        >>> import torch
        >>> from dropkit.diagnostics.flow import trace_flow
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(4))
        >>> flow = trace_flow(model, torch.randn(3, 4))
        >>> use = flow.uses[0]
        >>> use.site.label, use.consumers, [p.kind for p in use.producers]
        ('1', {'2': 'batchnorm'}, ['linear'])
    """
    check_example_inputs(example_inputs)
    recorder = _Recorder(model)
    flags = {module: module.training for module in model.modules()}
    hooks: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module in flags:
            module.training = isinstance(module, FAST_PATH_MODULES) and not isinstance(
                module, nn.MultiheadAttention
            )
            hooks.append(module.register_forward_pre_hook(recorder.pre_hook, prepend=True, with_kwargs=True))
            hooks.append(module.register_forward_hook(recorder.post_hook, with_kwargs=True, always_call=True))
        inputs = _tensors(example_inputs)
        for tensor in inputs:
            recorder.set_info(tensor, _Info(producers=frozenset({_producer("input", "", tensor)})))
        try:
            with torch.no_grad(), recorder:
                output = _example_call(model, example_inputs)
        except Exception as error:
            raise RuntimeError(
                f"the example forward of {type(model).__name__} failed: {type(error).__name__}: {error}"
            ) from error
        for tensor in _tensors(output):
            info = recorder.info(tensor)
            recorder.flow.output_producers |= info.producers
            for site in info.direct:
                recorder.use(site).reaches_output = True
    finally:
        for hook in hooks:
            hook.remove()
        for module, flag in flags.items():
            module.training = flag
    flow = recorder.flow
    flow.uses = sorted((use for use in recorder.uses.values() if use.calls), key=lambda use: use.order)
    called = {use.site for use in flow.uses}
    flow.uses += [SiteUse(site) for site in recorder.module_sites.values() if site not in called]
    flow.selu = flow.selu or any(isinstance(module, nn.SELU) for module in model.modules())
    return flow


# ---------------------------------------------------------------------------------------------
# Without inputs


def _sequential_leaves(
    module: nn.Module, path: str, sites: Mapping[nn.Module, DropoutSite]
) -> list[tuple[str, nn.Module]] | None:
    if module in sites or module_kind(module) is not None or not module._modules:
        return [(path, module)]
    if not isinstance(module, nn.Sequential):
        return None
    leaves: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        found = _sequential_leaves(child, f"{path}.{name}" if path else name, sites)
        if found is None:
            return None
        leaves += found
    return leaves


def sequential_flow(model: nn.Module) -> Flow:
    """The :class:`Flow` of a model built of nested ``nn.Sequential`` s, from their order.

    Without example inputs this is the order of the forward; shapes are unknown.  Any other
    container gives ``method="static"``: the sites, with no order and no consumers.

    Args:
        model: the model.

    Returns:
        The flow (``method="sequential"`` or ``"static"``).

    Example::

        >>> import torch
        >>> from dropkit.diagnostics.flow import sequential_flow
        >>> flow = sequential_flow(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)))
        >>> flow.method, flow.uses[0].reaches_output
        ('sequential', True)
    """
    sites = find_module_sites(model)
    selu = any(isinstance(module, nn.SELU) for module in model.modules())
    leaves = _sequential_leaves(model, "", sites) if isinstance(model, nn.Sequential) else None
    if leaves is None:
        return Flow("static", uses=[SiteUse(site) for site in sites.values()], selu=selu)
    flow = Flow("sequential", selu=selu)
    uses: dict[DropoutSite, SiteUse] = {}
    current = _Info(producers=frozenset({Producer("input", "")}))
    for path, module in leaves:
        site = sites.get(module)
        kind = _site_kind(module, site) if site is not None else module_kind(module)
        flow.calls[path] = flow.calls.get(path, 0) + 1
        if site is not None:
            use = uses.setdefault(site, SiteUse(site, order=len(flow.ops)))
            use.calls += 1
            use.producers |= current.producers
        if kind is not None:
            flow.ops.append((kind, path))
            for dropped in current.direct:
                uses[dropped].consumers.setdefault(path, kind)
            for dropped in current.mixed:
                uses[dropped].mixed_consumers.setdefault(path, kind)
            current = _Info(producers=frozenset({Producer(kind, path)}))
        elif site is not None:
            if site.variant in UNIT_VARIANTS or site.variant == "path":
                current = _Info(current.direct | {site}, current.mixed, current.producers)
            else:
                current = _Info(frozenset(), current.direct | current.mixed | {site}, current.producers)
    for site in current.direct:
        uses[site].reaches_output = True
    flow.output_producers = set(current.producers)
    flow.uses = list(uses.values())
    return flow
