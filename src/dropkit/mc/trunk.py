"""Trunk caching for Monte Carlo sampling: compute the deterministic prefix of a model once.

The *trunk* is the part of the forward before the first stochastic operation; its output is
the same for every sample, so :func:`dropkit.mc.mc_predict` computes it once for the batch and
runs only the *head* ``T`` times.

Automatic split (:func:`split_trunk`): the model's own ``forward`` is traced with
``torch.fx``; every submodule except ``nn.Sequential`` containers is kept as one opaque call,
so third-party modules with any control flow are fine as long as the top-level forward (and
nested ``Sequential`` s) trace.  The traced nodes are then run in order, in MC mode, on the
batch; the first node during which a stochastic op runs (a dropout layer, an intercepted
functional call, attention dropout, with a positive rate: a site with rate 0 is deterministic,
see :mod:`dropkit.mc.mode`) ends the trunk.  The cut is moved earlier while a value
crossing it is a tensor without the batch on dim 0 (a batch statistic, say); a non-tensor
value computed from the batch (``b = x.size(0)`` used by a ``view(b, -1)`` in the head) is
recomputed in the head from the repeated batch, as the uncached forward would compute it.
Values that do not depend on the input (parameters, constants) are passed on as they are.
Parameters of ``forward`` after the given inputs are traced as their defaults (timm's
``forward(x, attn_mask=None)``), so that the trace takes the branch the call takes.

No split is made (the whole model runs ``T`` times, with the same results) when the forward
cannot be traced, when its traced graph depends on the root's ``training`` flag, or when the
trunk would be empty.  Whether a split engaged, and where, is public:
:attr:`TrunkSplit.trunk_modules` and :attr:`TrunkSplit.head_modules` name the submodules on
each side (and :func:`dropkit.mc.sampling.last_plan` reports what ``mc_predict`` chose).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from dropkit.mc.mode import MCDropoutHandle
from dropkit.mc.patching import stand_in_for

__all__ = ["TrunkSplit", "split_trunk"]


class _Tracer(torch.fx.Tracer):
    """Keeps every submodule but ``nn.Sequential`` as one call node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, nn.Sequential)


@dataclass
class TrunkSplit:
    """A model split into a deterministic trunk (already computed) and a stochastic head.

    Attributes:
        head: a ``torch.fx.GraphModule`` mapping the trunk values to the model's output.
        values: the trunk values the head takes, in order (tensors batch-first or constants).
        expand: for each value, whether it is batch-dependent (repeated for every sample).
        trunk_nodes: how many traced nodes the trunk holds.
        trunk_modules: qualified names of the submodules the trunk called (once, on the batch),
            in order; the trace keeps every submodule but ``nn.Sequential`` whole, so these are
            the outermost ones (``"blocks.0"``, ... for a ``Sequential`` of blocks).
        head_modules: qualified names of the submodules the head calls in every forward, in order.
    """

    head: torch.fx.GraphModule
    values: list[Any]
    expand: list[bool]
    trunk_nodes: int
    trunk_modules: list[str] = field(default_factory=list)
    head_modules: list[str] = field(default_factory=list)

    def run_head(self, handle: MCDropoutHandle, samples: int) -> Any:
        """Run the head on the trunk values, each batch-dependent one repeated ``samples`` times."""
        args = [
            value.repeat(samples, *([1] * (value.dim() - 1))) if expand else value
            for value, expand in zip(self.values, self.expand, strict=True)
        ]
        with handle.inside(handle.model):
            return self.head(*args)


def _trace(model: nn.Module, training: bool, concrete: dict[str, Any] | None = None) -> torch.fx.Graph:
    previous = model.training
    model.training = training
    try:
        return _Tracer().trace(model, concrete_args=concrete or None)
    finally:
        model.training = previous


def _defaults_of_the_rest(model: nn.Module, given: int) -> dict[str, Any] | None:
    """The parameters of ``model.forward`` after the ``given`` positional inputs, with their
    defaults, to trace them as constants (``attn_mask=None`` stays ``None``, so the trace takes the
    branch the call takes); ``None`` when one of them has no default (it cannot be traced)."""
    try:
        parameters = list(inspect.signature(type(model).forward).parameters.values())[1:]  # no self
    except (TypeError, ValueError):
        return {}
    defaults: dict[str, Any] = {}
    for parameter in parameters[given:]:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if parameter.default is inspect.Parameter.empty:
            return None
        defaults[parameter.name] = parameter.default
    return defaults


def _signature(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    return [(node.op, str(node.target)) for node in graph.nodes]


def _traced_graph(model: nn.Module, concrete: dict[str, Any] | None = None) -> torch.fx.Graph | None:
    """The model's forward as a graph with stand-ins for dropout functionals, or ``None``;
    ``concrete`` parameters are traced as those constants."""
    try:
        graph = _trace(model, False, concrete)
        if _signature(graph) != _signature(_trace(model, True, concrete)):
            return None  # the forward takes another path in training: a split could differ
    except Exception:  # any tracing failure means "no automatic trunk"
        return None
    for node in graph.nodes:
        if node.op == "call_function":
            stand_in = stand_in_for(node.target)
            if stand_in is not None:
                node.target = stand_in
    return graph


def split_trunk(model: nn.Module, handle: MCDropoutHandle, inputs: tuple[Any, ...]) -> TrunkSplit | None:
    """Split ``model`` at its first stochastic op and compute the trunk on ``inputs``.

    Must be called with ``model`` in the MC mode ``handle``.  See :mod:`dropkit.mc.trunk`.

    Args:
        model: the model in MC mode.
        handle: its :class:`~dropkit.mc.mode.MCDropoutHandle`.
        inputs: the forward's positional inputs (the batch on dim 0 of every tensor); the
            parameters of ``forward`` after them are traced at their defaults (no split when
            one of them has none).

    Returns:
        The split with the trunk values computed, or ``None`` when no useful split exists.
    """
    defaults = _defaults_of_the_rest(model, len(inputs))
    graph = None if defaults is None else _traced_graph(model, defaults)
    if graph is None:
        return None
    nodes = list(graph.nodes)
    batch = next(x.shape[0] for x in inputs if isinstance(x, torch.Tensor))
    env: dict[torch.fx.Node, Any] = {}
    dependent: set[torch.fx.Node] = set()
    interpreter = torch.fx.Interpreter(torch.fx.GraphModule(model, graph))
    interpreter.args_iter = iter(inputs)
    stop = len(nodes) - 1  # the output node: no stochastic op at all
    with handle.sampling(0, 0, 1), handle.inside(model), torch.no_grad():
        for index, node in enumerate(nodes):
            if node.op == "output":
                stop = index
                break
            before = handle.ops
            interpreter.env = env
            value = interpreter.run_node(node)
            if handle.ops != before:
                stop = index
                break
            env[node] = value
            if node.op == "placeholder":
                if isinstance(value, torch.Tensor):
                    dependent.add(node)
            elif any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)

    def valid(node: torch.fx.Node) -> bool:
        if node not in dependent:
            return True
        value = env[node]
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch

    def plan(cut: int) -> tuple[list[torch.fx.Node], list[torch.fx.Node]] | None:
        """Trunk values the head takes, and trunk nodes recomputed in the head (non-tensor
        values derived from the batch, like ``x.size(0)``), or ``None`` if the cut fails."""
        recompute: set[torch.fx.Node] = set()
        while True:
            consumers = set(nodes[cut:]) | recompute
            live = [n for n in nodes[:cut] if n not in recompute and any(u in consumers for u in n.users)]
            bad = [n for n in live if not valid(n)]
            if not bad:
                return live, [n for n in nodes[:cut] if n in recompute]
            for node in bad:
                if isinstance(env[node], torch.Tensor) or node.op == "placeholder":
                    return None
                recompute.add(node)

    # The trunk holds every placeholder (and the checks of the parameters traced as constants).
    placeholders = (
        max((index for index, node in enumerate(nodes) if node.op == "placeholder"), default=-1) + 1
    )
    cut, found = stop, None
    while cut > placeholders:
        found = plan(cut)
        if found is not None:
            break
        cut -= 1
    if found is None or not any(
        node.op in ("call_module", "call_function", "call_method") for node in nodes[:cut]
    ):
        return None
    live, recomputed = found
    head_graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in live:
        mapping[node] = head_graph.placeholder(f"trunk_{node.name}")
    for node in [*recomputed, *nodes[cut:]]:
        mapping[node] = head_graph.node_copy(node, lambda n: mapping[n])
    head = torch.fx.GraphModule(model, head_graph)
    in_head = [str(node.target) for node in [*recomputed, *nodes[cut:]] if node.op == "call_module"]
    in_trunk = [
        str(node.target)
        for node in nodes[:cut]
        if node.op == "call_module" and node not in recomputed and str(node.target) not in in_head
    ]
    values = [env[node] for node in live]
    return TrunkSplit(head, values, [node in dependent for node in live], cut, in_trunk, in_head)


def user_trunk(trunk: Callable[..., Any], handle: MCDropoutHandle, inputs: tuple[Any, ...]) -> Any:
    """Run a user-given trunk once, in the MC mode, and check that it is deterministic."""
    before = handle.ops
    with handle.sampling(0, 0, 1), torch.no_grad():
        features = trunk(*inputs)
    if handle.ops != before:
        raise ValueError(
            "trunk ran a stochastic op (a dropout layer or call); the trunk must be the deterministic "
            "part of the model before the first dropout"
        )
    return features
