"""Command-line interface: ``python -m dropkit`` or the ``dropkit`` console script.

Subcommands:

* ``demo``: train the same MLP with and without dropout on scikit-learn's digits and print
  train accuracy, test accuracy and generalization gap side by side
  (:mod:`dropkit.experiments.digits`; needs ``pip install 'dropkit[demo]'``).
* ``uci``: the UCI regression MC-dropout benchmark (Gal & Ghahramani's grid-search protocol) on
  data read from ``--data DIR`` (:mod:`dropkit.experiments.uci`; also
  ``python -m dropkit.experiments.uci.cli``, same help).
* ``sparse-vd``: sparse variational dropout, LeNet-300-100 on MNIST read from ``--data DIR``
  (:mod:`dropkit.experiments.sparse_vd_mnist`; also ``python -m
  dropkit.experiments.sparse_vd_mnist``, same help).
* ``reproduce``: published claims about dropout reproduced, one experiment or ``all``, with
  a combined report (``OUTPUT/index.html``, ``README.md``, ``results.json``;
  :mod:`dropkit.experiments.reproduce`; also ``python -m dropkit.experiments.reproduce.cli``,
  same help).

Each subcommand is registered by one ``_add_<command>(commands)`` function that creates its
sub-parser (one line of ``help`` for ``dropkit --help``, the full description for
``dropkit <command> --help``, :class:`dropkit.experiments._cli.HelpFormatter`) and sets its
``func`` default, the function that runs it and returns the exit status (argparse's
``set_defaults(func=...)`` idiom); adding a command is adding one such function and one call in
:func:`build_parser`.  Every long command reports progress the same way
(:class:`dropkit.experiments._console.Progress`: bars on a terminal, plain lines otherwise).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

from dropkit._version import __version__
from dropkit.diagnostics.cli import add_doctor_parser
from dropkit.experiments import _cli, digits, sparse_vd_mnist
from dropkit.experiments._console import format_duration
from dropkit.experiments._files import prepare_output_file
from dropkit.experiments.reproduce import cli as reproduce_cli
from dropkit.experiments.uci import cli as uci_cli

__all__ = ["build_parser", "main"]

if TYPE_CHECKING:
    # What ``add_subparsers`` returns (its class is private to argparse).
    _Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dropkit`` command, with one sub-parser per subcommand.

    Each sub-parser's ``func`` default is the function that runs it: ``main`` calls
    ``args.func(args)``.
    """
    parser = argparse.ArgumentParser(
        prog="dropkit",
        description="dropkit: every dropout technique for PyTorch, reproducibly.",
        epilog="Run 'dropkit COMMAND --help' for a command's options.",
        formatter_class=_cli.HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dropkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    _add_demo(commands)
    _add_uci(commands)
    _add_sparse_vd(commands)
    _add_reproduce(commands)
    _add_doctor(commands)
    return parser


def _add_demo(commands: _Commands) -> None:
    """Register ``dropkit demo``."""
    defaults = digits.DigitsConfig()
    demo = commands.add_parser(
        "demo",
        help="dropout against overfitting on scikit-learn's digits",
        description=(
            "Train the same MLP (64 -> hidden -> hidden -> 10, ReLU) twice on a small stratified "
            "subset of scikit-learn's digits, without and with dropkit.nn.Dropout, and print train "
            "accuracy, test accuracy and their gap side by side.\n\n"
            "Progress goes to stderr: a bar per run on a terminal, one line per tenth of the "
            "epochs otherwise."
        ),
        formatter_class=_cli.HelpFormatter,
    )
    demo.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs per model")
    demo.add_argument("--hidden", type=int, default=defaults.hidden, help="width of both hidden layers")
    demo.add_argument(
        "--input-dropout", type=float, default=defaults.input_dropout, help="dropout rate of the inputs"
    )
    demo.add_argument(
        "--hidden-dropout",
        type=float,
        default=defaults.hidden_dropout,
        help="dropout rate after each hidden layer",
    )
    demo.add_argument(
        "--train-size",
        type=int,
        default=defaults.train_size,
        help="training samples (stratified); the remaining digits are the test set",
    )
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size, help="mini-batch size")
    demo.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    demo.add_argument("--optimizer", choices=digits.OPTIMIZERS, default=defaults.optimizer, help="optimizer")
    demo.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of torch and dropkit (weights, batches, masks)"
    )
    demo.add_argument(
        "--split-seed", type=int, default=defaults.split_seed, help="seed of the train/test split"
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 0 keeps torch's default (1 is fastest for these small models)",
    )
    demo.add_argument("--output", metavar="PATH", default=None, help="also write the results as JSON")
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress on stderr (neither bars nor lines)"
    )
    demo.set_defaults(func=_run_demo)


def _add_uci(commands: _Commands) -> None:
    """Register ``dropkit uci`` (arguments, description and help of
    :func:`dropkit.experiments.uci.cli.build_parser`)."""
    uci = commands.add_parser("uci", help=uci_cli.SUMMARY)
    uci_cli.build_parser(uci)
    uci.set_defaults(func=uci_cli.run)


def _add_doctor(commands: _Commands) -> None:
    """``doctor``: dropout placement, rate and measurement checks (:mod:`dropkit.diagnostics.cli`)."""
    add_doctor_parser(commands)


def _add_sparse_vd(commands: _Commands) -> None:
    """Register ``dropkit sparse-vd`` (arguments, description and help of
    :func:`dropkit.experiments.sparse_vd_mnist.build_parser`)."""
    sparse_vd = commands.add_parser("sparse-vd", help=sparse_vd_mnist.SUMMARY)
    sparse_vd_mnist.build_parser(sparse_vd)
    sparse_vd.set_defaults(func=lambda args: sparse_vd_mnist.run(args, prog="dropkit sparse-vd"))


def _add_reproduce(commands: _Commands) -> None:
    """Register ``dropkit reproduce`` (arguments, description and help of
    :func:`dropkit.experiments.reproduce.cli.build_parser`)."""
    reproduce = commands.add_parser("reproduce", help=reproduce_cli.SUMMARY)
    reproduce_cli.build_parser(reproduce)
    reproduce.set_defaults(func=reproduce_cli.run)


def _error(message: object, status: int = 2) -> int:
    """Print ``message`` as one ``dropkit demo: error: ...`` line on stderr; returns ``status``."""
    return _cli.error("dropkit demo", message, status)


def _run_demo(args: argparse.Namespace) -> int:
    try:
        config = digits.DigitsConfig(
            epochs=args.epochs,
            hidden=args.hidden,
            input_dropout=args.input_dropout,
            hidden_dropout=args.hidden_dropout,
            train_size=args.train_size,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            seed=args.seed,
            split_seed=args.split_seed,
        )
        if args.threads < 0:
            raise ValueError(f"threads must be >= 0, got {args.threads}")
        if args.output is not None:
            # Before training, so that a bad --output costs nothing.
            prepare_output_file(args.output, "--output")
    except (TypeError, ValueError) as exc:
        return _error(exc)
    try:
        digits.require_demo_dependencies()
    except ModuleNotFoundError as exc:
        return _error(exc, status=1)

    start = time.perf_counter()
    results = digits.run_demo(config, progress=not args.no_progress, threads=args.threads or None)
    elapsed = time.perf_counter() - start
    n_test = digits.DIGITS_SAMPLES - config.train_size
    print(
        f"digits: {config.train_size} train / {n_test} test samples, hidden {config.hidden}, "
        f"{config.epochs} epochs of {config.optimizer} (lr {config.lr}), dropout "
        f"{config.input_dropout} (input) / {config.hidden_dropout} (hidden), seed {config.seed}"
    )
    print(digits.format_table(results))
    print(f"({format_duration(elapsed)})")
    if args.output is not None:
        try:
            path = digits.write_results(args.output, config, results)
        except OSError as exc:  # writable a moment ago; a full disk still gets one line
            return _error(f"cannot write --output {args.output}: {exc}")
        print(f"results written to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dropkit`` command line.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 when optional dependencies are missing, 2 for bad
        arguments, data or output, after a one-line error on stderr (argparse itself exits with
        2 on arguments it cannot parse).
    """
    args = build_parser().parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
