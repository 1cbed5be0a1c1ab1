"""``torch.export`` of a model with dropkit layers, in training mode as in eval mode.

:func:`torch.export.export` already traces dropkit layers into their custom ops with the eager
masks.  Three things are left to the caller there, as for any module with a mutable buffer:
the step counters' increments stay in-place ops that the graph signature does not list until
``run_decompositions()``; the exported program reads and advances the source module's own
counter tensors; the seed is a constant of the graph.  :func:`export` settles all three.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from dropkit.engine.streams import functional_step, functional_step_as, initial_seed, seed_tensor
from dropkit.nn._base import _RandomLayer

__all__ = ["FUNCTIONAL_STEP_BUFFER", "SEED_INPUT", "aoti_compile_and_package", "export"]

#: Name of the seed input of a program exported with ``seed_input=True`` (its first input).
SEED_INPUT = "dropkit_seed"


#: Buffer of an exported program that counts the draws of dropkit functional calls without a
#: seed (as the process-wide functional counter does eagerly).
FUNCTIONAL_STEP_BUFFER = "dropkit_functional_step"


@contextlib.contextmanager
def _own_counters(twin: nn.Module) -> Iterator[None]:
    """Give every dropkit layer under ``twin`` a copy of its step counter while the body runs: a
    program traced inside holds counters of its own, and the model keeps its originals."""
    layers = [module for module in twin.modules() if isinstance(module, _RandomLayer)]
    originals = [layer.rng_step for layer in layers]
    try:
        for layer, step in zip(layers, originals, strict=True):
            layer.rng_step = step.clone()
        yield
    finally:
        for layer, step in zip(layers, originals, strict=True):
            layer.rng_step = step


def _twin(model: nn.Module, seed_input: bool) -> nn.Module:
    """A shallow twin of ``model`` to trace: the same parameters, buffers and submodules under the
    same names, in registries of its own, plus a buffer that counts the draws of functional calls
    without a seed.  Its forward reads that buffer (the traced one: export swaps buffers for its
    own tensors while it traces) and, with ``seed_input``, takes the seed first and draws every
    key of the call from it."""
    original = type(model)
    parameters = list(inspect.signature(model.forward).parameters.values())

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with functional_step_as(getattr(self, FUNCTIONAL_STEP_BUFFER)):
            if not seed_input:
                return original.forward(self, *args, **kwargs)
            with seed_tensor(args[0]):
                return original.forward(self, *args[1:], **kwargs)

    # torch.export binds inputs (and dynamic_shapes) by the forward's signature.
    own = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if seed_input:
        own.append(inspect.Parameter(SEED_INPUT, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    forward.__signature__ = inspect.Signature([*own, *parameters])  # type: ignore[attr-defined]
    namespace = {"forward": forward, "__module__": original.__module__}
    twin_class: type[nn.Module] = type(original.__name__, (original,), namespace)
    twin = object.__new__(twin_class)
    twin.__dict__.update(model.__dict__)
    for registry in ("_parameters", "_buffers", "_modules"):
        twin.__dict__[registry] = dict(model.__dict__[registry])
    twin.register_buffer(FUNCTIONAL_STEP_BUFFER, functional_step().clone(), persistent=False)
    return twin


def export(
    model: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    seed_input: bool = False,
    dynamic_shapes: Any = None,
) -> torch.export.ExportedProgram:
    """Export ``model`` with :func:`torch.export.export`, ready to run, save and compile in
    training mode (dropout active) as well as in eval mode.

    Compared with calling :func:`torch.export.export` directly:

    * the program is functional: each dropkit layer's step counter is a buffer that the graph
      signature lists as a ``BUFFER_MUTATION``, advanced once per call as in eager;
    * the program owns its counters: they start at the model's current steps and advance
      independently of the model (running the program draws nothing from the model's stream
      counters, and training the model does not move the program's);
    * with ``seed_input=True`` the seed is an input, ``dropkit_seed`` (an int64 tensor of shape
      ``()``, before the model's own inputs), instead of a constant of the graph; keys are
      ``[seed, stream, step]`` as in eager, with the given seed used as is (no rank folding).

    The model is traced in torch.export's default, non-strict mode (the program is the same;
    strict mode traces with dynamo, which would have to follow dropkit's bookkeeping too).

    For the same key the program draws the masks of the eager model, bit for bit: it runs
    dropkit's custom ops, which :func:`torch.export.save` / :func:`torch.export.load` keep
    (import dropkit before loading).  For AOTInductor use :func:`aoti_compile_and_package`.

    Args:
        model: the module to export; its ``training`` flag decides whether dropout is active.
        args, kwargs: example inputs, as for :func:`torch.export.export` (without the seed).
        seed_input: take the seed as the program's first input.
        dynamic_shapes: as for :func:`torch.export.export`; with ``seed_input`` a tuple gets
            ``None`` prepended for the seed, and a dict needs no entry for it.

    Returns:
        The :class:`torch.export.ExportedProgram`, functionalized (``run_decompositions({})``:
        no operator is decomposed).

    Example::

        >>> import torch, dropkit
        >>> dropkit.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), dropkit.nn.Dropout(0.5)).train()
        >>> x = torch.ones(2, 4)
        >>> program = dropkit.export(model, (x,), seed_input=True)
        >>> run = program.module()
        >>> seed = torch.tensor(dropkit.initial_seed())
        >>> torch.equal(run(seed, x), model(x))  # same key [seed, stream, 0]: same mask
        True
        >>> int(model[1].rng_step), int(program.constants["1.rng_step"])
        (1, 1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping of example inputs, got {type(kwargs).__name__}")
    if not isinstance(seed_input, bool):
        raise TypeError(f"seed_input must be a bool, got {type(seed_input).__name__}")
    twin = _twin(model, seed_input)
    if seed_input:
        args = (torch.tensor(initial_seed(), dtype=torch.int64), *args)
        if isinstance(dynamic_shapes, (tuple, list)):
            dynamic_shapes = (None, *dynamic_shapes)
    with _own_counters(twin):
        program = torch.export.export(
            twin, args, dict(kwargs or {}), dynamic_shapes=dynamic_shapes, strict=False
        )
    return program.run_decompositions({})


def aoti_compile_and_package(
    program: torch.export.ExportedProgram,
    package_path: str | None = None,
    *,
    inductor_configs: Mapping[str, Any] | None = None,
) -> str:
    """:func:`torch._inductor.aoti_compile_and_package` for a program with dropkit layers, such
    that the package advances its step counters on every call.

    Inductor's uniform-value constant folding turns a one-element buffer into a compile-time
    constant even when the graph mutates it (pytorch/pytorch#165444, fixed after torch 2.13):
    a packaged counter then restarts from its exported value on every call, and every call after
    the first repeats the second call's masks.  This compiles with that folding off
    (``joint_graph_constant_folding=False``); everything else is torch's.  The package runs
    dropkit's custom ops through AOTInductor's proxy executor, so it runs in a Python process
    with dropkit imported, with the eager masks for the same key.

    Args:
        program: an exported program (from :func:`export`, or :func:`torch.export.export`).
        package_path: where to write the ``.pt2`` package (torch picks a path if ``None``).
        inductor_configs: further Inductor options, as for torch's function.

    Returns:
        The package's path, for :func:`torch._inductor.aoti_load_package`.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"program must be a torch.export.ExportedProgram, got {type(program).__name__}")
    from torch._inductor import aoti_compile_and_package as compile_and_package  # late: heavy import

    configs = dict(inductor_configs or {})
    if configs.get("joint_graph_constant_folding", False):
        raise ValueError(
            "inductor_configs['joint_graph_constant_folding'] must stay False: with it, Inductor "
            "folds the step counters into constants and the package repeats its masks"
        )
    configs["joint_graph_constant_folding"] = False
    path: str = compile_and_package(program, package_path=package_path, inductor_configs=configs)
    return path
