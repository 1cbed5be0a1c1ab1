"""``dropkit doctor``: check (and measure) the dropout of a model a user can import.

Usage::

    dropkit doctor MODULE:FACTORY [--factory-arg KEY=VALUE ...]
                   [--input-shape 8,3,32,32 [--input-ids VOCAB] | --data MODULE:LOADER]
                   [--n-train N] [--n-params N] [--task classification|regression] [--output KEY]
                   [--t-values 1,2,5,10,20,50,100] [--seed S]
                   [--html PATH] [--markdown PATH] [--json PATH|-] [--fail-on LEVEL] [--no-progress]

``MODULE:FACTORY`` names a callable (or an ``nn.Module`` instance) in an importable module; the
current directory is searched first, as ``python -m`` does.  The factory is called with the
``--factory-arg`` keywords (values read as Python literals, else as strings) and must return an
``nn.Module``.

Inputs: ``--input-shape`` runs the checks on a random batch of that shape (standard normal
floats; with ``--input-ids VOCAB``, integer ids in ``[0, VOCAB)`` for a language model).
``--data MODULE:LOADER`` names a callable returning a batch of the user's data (or a
``DataLoader`` / iterable, whose first batch is used): a tensor (inputs only), a pair
``(inputs, targets)``, or a mapping of keyword inputs whose ``"labels"`` entry, if any, are the
targets; inputs may be a tensor, a tuple or a mapping.  With ``--data`` the measurements of
:func:`dropkit.diagnostics.measure` run on that batch too (variance shift, ensemble gap,
adaptive L2, activations), with a progress bar on stderr.  Without either, the model's modules
are checked (and the order of an ``nn.Sequential``).

Output: the findings and sites as a table on stdout (``--json -`` prints JSON instead);
``--html``, ``--markdown`` and ``--json`` write reports (plots need matplotlib).

Exit status: 0 when no finding is at or above ``--fail-on`` (default ``warning``; ``never``
always gives 0), 1 when one is, 2 for anything that could not be done (bad arguments, a model
or loader that cannot be imported, built or run, a report that cannot be written), after one
``dropkit doctor: error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from dropkit.diagnostics.check import check
from dropkit.diagnostics.ensemble_gap import DEFAULT_T
from dropkit.diagnostics.findings import SEVERITIES, severity_rank
from dropkit.diagnostics.measure import measure
from dropkit.diagnostics.render import write_report
from dropkit.experiments._cli import HelpFormatter

__all__ = ["DoctorError", "add_doctor_parser", "load_batch", "load_model", "run_doctor"]


class DoctorError(Exception):
    """Something ``dropkit doctor`` could not do; the message is the one line it prints."""


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``doctor`` sub-command to ``subparsers`` (from ``parser.add_subparsers()``).

    Returns:
        The ``doctor`` parser; its ``func`` default is :func:`run_doctor`.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor",
        help="check a model's dropout placement, rates and effects",
        description=(
            "Check a model's dropout placement and rates against the field's rules (codes DK101-DK110, "
            "each with the paper and a fix) and, with --data, measure the variance shift, the ensemble "
            "gap, the adaptive-L2 view and the activations on a batch. Exit status: 0 no finding at or "
            "above --fail-on, 1 findings, 2 errors."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model", metavar="MODULE:FACTORY", help="callable (or module instance) building the model"
    )
    parser.add_argument(
        "--factory-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the factory (repeatable; VALUE read as a Python literal)",
    )
    inputs = parser.add_mutually_exclusive_group()
    inputs.add_argument(
        "--input-shape", metavar="SHAPE", help="random example batch of this shape, e.g. 8,3,32,32"
    )
    inputs.add_argument(
        "--data", metavar="MODULE:LOADER", help="callable returning a batch (inputs, targets)"
    )
    parser.add_argument(
        "--input-ids", type=int, metavar="VOCAB", help="with --input-shape: integer ids < VOCAB"
    )
    parser.add_argument("--n-train", type=int, metavar="N", help="training-set size (rules DK108, DK109)")
    parser.add_argument("--n-params", type=int, metavar="N", help="parameter count (default: the model's)")
    parser.add_argument("--task", choices=("classification", "regression"), help="default: inferred")
    parser.add_argument("--output", metavar="KEY", help="the prediction in the model output (key or index)")
    parser.add_argument(
        "--t-values",
        default=",".join(map(str, DEFAULT_T)),
        metavar="T,T,...",
        help="numbers of MC samples for the ensemble gap",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every dropout mask drawn")
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown report")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-': to stdout, no table)")
    parser.add_argument(
        "--fail-on",
        choices=(*SEVERITIES, "never"),
        default="warning",
        help="exit 1 when a finding is at least this severe",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_doctor)
    return parser


def _resolve(spec: str, option: str) -> Any:
    """The object named ``MODULE:ATTRIBUTE`` (dotted attribute path allowed)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise DoctorError(f"{option} must look like MODULE:NAME (e.g. mypackage.models:build), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:
        raise DoctorError(f"cannot import {module_name!r} ({type(error).__name__}: {error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise DoctorError(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_model(spec: str, factory_args: Iterable[str] = ()) -> nn.Module:
    """Import ``MODULE:FACTORY`` and build the model (see :mod:`dropkit.diagnostics.cli`).

    Raises:
        DoctorError: it cannot be imported or built, or is not an ``nn.Module``.
    """
    kwargs = {}
    for item in factory_args:
        key, equals, value = item.partition("=")
        if not equals or not key.isidentifier():
            raise DoctorError(f"--factory-arg must look like KEY=VALUE, got {item!r}")
        kwargs[key] = _literal(value)
    target = _resolve(spec, "MODULE:FACTORY")
    if isinstance(target, nn.Module):
        if kwargs:
            raise DoctorError(f"{spec!r} is a module instance: it takes no --factory-arg")
        return target
    if not callable(target):
        raise DoctorError(f"{spec!r} is neither callable nor an nn.Module ({type(target).__name__})")
    try:
        model = target(**kwargs)
    except Exception as error:
        raise DoctorError(
            f"building the model with {spec!r} failed ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(model, nn.Module):
        raise DoctorError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    inputs: Any
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        labels = batch.get("labels")
        return inputs, labels if isinstance(labels, torch.Tensor) else None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        if targets is not None and not isinstance(targets, torch.Tensor):
            raise DoctorError(f"the batch's targets must be a tensor, got {type(targets).__name__}")
        if not isinstance(inputs, (torch.Tensor, tuple, Mapping)):
            raise DoctorError(
                f"the batch's inputs must be a tensor, tuple or mapping, got {type(inputs).__name__}"
            )
        return inputs, targets
    raise DoctorError(
        "the loader must give a tensor, a pair (inputs, targets) or a mapping of keyword inputs, "
        f"got {type(batch).__name__}"
    )


def load_batch(spec: str) -> tuple[Any, torch.Tensor | None]:
    """Import ``MODULE:LOADER``, call it, and split its (first) batch into inputs and targets.

    Raises:
        DoctorError: it cannot be imported or called, or gives no usable batch.
    """
    target = _resolve(spec, "--data")
    if (
        callable(target)
        and not isinstance(target, (torch.Tensor, Mapping))
        and not hasattr(target, "__iter__")
    ):
        try:
            target = target()
        except Exception as error:
            raise DoctorError(
                f"calling the loader {spec!r} failed ({type(error).__name__}: {error})"
            ) from error
    if not isinstance(target, (torch.Tensor, Mapping, tuple, list)) and isinstance(target, Iterable):
        try:
            target = next(iter(target))
        except StopIteration:
            raise DoctorError(f"the loader {spec!r} gave no batch") from None
        except Exception as error:
            raise DoctorError(
                f"reading a batch from {spec!r} failed ({type(error).__name__}: {error})"
            ) from error
    return _split_batch(target)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise DoctorError(f"--input-shape must be positive ints like 8,3,32,32, got {text!r}") from None
    if not shape or any(size < 1 for size in shape):
        raise DoctorError(f"--input-shape must be positive ints like 8,3,32,32, got {text!r}")
    return shape


def _t_values(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DoctorError(
            f"--t-values must be increasing positive ints like 1,10,100, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise DoctorError(f"--t-values must be increasing positive ints like 1,10,100, got {text!r}")
    return values


def _doctor(args: argparse.Namespace) -> int:
    for name in ("n_train", "n_params", "input_ids"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DoctorError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.input_ids is not None and args.input_shape is None:
        raise DoctorError("--input-ids needs --input-shape")
    t_values = _t_values(args.t_values)
    output: str | int | None = args.output
    if isinstance(output, str) and output.lstrip("-").isdigit():
        output = int(output)
    model = load_model(args.model, args.factory_arg)
    inputs: Any = None
    targets = None
    if args.input_shape is not None:
        shape = _shape(args.input_shape)
        generator = torch.Generator().manual_seed(args.seed)
        if args.input_ids is not None:
            inputs = torch.randint(0, args.input_ids, shape, generator=generator)
        else:
            inputs = torch.randn(shape, generator=generator)
    elif args.data is not None:
        inputs, targets = load_batch(args.data)
    try:
        report = check(model, inputs, n_train=args.n_train, n_params=args.n_params, seed=args.seed)
    except RuntimeError as error:
        raise DoctorError(str(error)) from error
    if args.data is not None:
        try:
            report.measurements = measure(
                model,
                inputs,
                targets,
                T_values=t_values,
                task=args.task,
                output=output,
                seed=args.seed,
                progress=not args.no_progress,
            )
        except (RuntimeError, ValueError, TypeError) as error:
            raise DoctorError(f"measuring on the data failed ({type(error).__name__}: {error})") from error
    if args.json == "-":
        print(report.to_json())
    else:
        print(report)
    for path in (args.html, args.markdown, args.json):
        if path is None or path == "-":
            continue
        try:
            written = write_report(report, path)
        except (ValueError, OSError, ModuleNotFoundError) as error:
            raise DoctorError(f"cannot write {path!r}: {error}") from error
        print(f"report written to {written}", file=sys.stderr)
    if args.fail_on == "never" or report.worst() is None:
        return 0
    return 1 if severity_rank(report.worst() or "info") >= severity_rank(args.fail_on) else 0


def run_doctor(args: argparse.Namespace) -> int:
    """Run ``dropkit doctor`` with parsed arguments; returns the exit status (0, 1 or 2).

    Example::

        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="dropkit")
        >>> _ = add_doctor_parser(parser.add_subparsers(dest="command"))
        >>> argv = ["doctor", "dropkit.experiments.digits:build_mlp", "--factory-arg", "hidden=8"]
        >>> argv += ["--factory-arg", "hidden_dropout=0.5", "--input-shape", "4,64"]
        >>> run_doctor(parser.parse_args(argv))
        dropkit diagnostics: Sequential: 2 dropout site(s), checked from a traced forward on ...
        ...
        findings: none
        0
    """
    try:
        return _doctor(args)
    except DoctorError as error:
        text = " ".join(str(error).split())
        print(f"dropkit doctor: error: {text}", file=sys.stderr)
        return 2
