"""Command line of the reproductions: ``dropkit reproduce``.

``python -m dropkit.experiments.reproduce.cli`` is the same command with the same help (both
build their arguments with :func:`build_parser`).  Every error of the command line (an unknown
name, a bad number, an output directory that cannot be written, a resume that would mix scales)
is one line on stderr and exit status 2, before anything runs; a failed experiment makes the
exit status 1 once the others have run and the report is written.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from dropkit.experiments import _cli
from dropkit.experiments._console import format_duration
from dropkit.experiments._files import prepare_output_dir
from dropkit.experiments.reproduce import get_experiment, names
from dropkit.experiments.reproduce.api import SCALES, Scale
from dropkit.experiments.reproduce.report import FIGURE_FORMATS
from dropkit.experiments.reproduce.runner import (
    RunOptions,
    conflicts_message,
    resume_conflicts,
    run_suite,
)

__all__ = ["DEFAULT_OUTPUT", "DESCRIPTION", "SUMMARY", "build_parser", "main", "run", "selected_names"]

_PROG = "dropkit reproduce"
#: The default output directory.
DEFAULT_OUTPUT = "reproductions-output"
#: One line for the list of commands of ``dropkit --help``.
SUMMARY = "reproduce published claims about dropout and write a report"
#: The description of ``dropkit reproduce --help`` (paragraphs).
DESCRIPTION = """\
Reproduce published claims about dropout, one experiment or all of them, and write a combined
report: OUTPUT/index.html and OUTPUT/README.md (for every experiment the published claim, our
number with its error bar, whether the claim held, tables and PNG/SVG plots) and
OUTPUT/results.json (the same, machine-readable). 'dropkit reproduce --list' shows the
experiments and their claims.

Sizes: --quick runs a reduced version of each experiment (minutes each on two CPU cores; the
whole suite within about 20 minutes); the default is the full protocol, or the largest
reduction of it that a CPU can run. Each experiment's notes say what was reduced.

Data (--data DIR, never downloaded): DIR/mnist (MNIST IDX files), DIR/uci (the UCI regression
sets in the MC-dropout benchmark's layout), DIR/fashion-mnist. Without --data the image
experiments use scikit-learn's 8x8 digits and those that need data are reported as skipped.

Every seed's result is written as soon as it finishes (OUTPUT/NAME/seed-K.json, atomically,
with a checksum); --resume reuses the valid ones and runs the rest. Networks that two
experiments train alike (mnist-mlp's and ensemble-vs-scaling's dropout MLP) are kept in
OUTPUT/_trained and trained once; a run without --resume trains them again. An experiment that fails
is reported as failed and the others still run (exit status 1). Progress goes to stderr: bars
on a terminal, one line per finished seed and experiment otherwise.
"""


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if not formats or unknown or len(set(formats)) != len(formats):
        raise argparse.ArgumentTypeError(
            f"expected distinct formats from {','.join(FIGURE_FORMATS)} separated by commas, got {text!r}"
        )
    return formats


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command's arguments, description and help format, added to ``parser`` (a new one
    when ``None``; pass a sub-parser to mount it as ``dropkit reproduce``).  Both give the same
    help text."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m dropkit.experiments.reproduce.cli")
    parser.description = DESCRIPTION
    parser.formatter_class = _cli.HelpFormatter
    parser.add_argument(
        "experiments",
        nargs="*",
        metavar="NAME|all",
        help=f"experiments to run, or all: {', '.join(names())}",
    )
    parser.add_argument(
        "--list", action="store_true", help="print every experiment's name, title and claim, and exit"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="reduced runs: minutes per experiment on two CPU cores (same as --scale quick)",
    )
    size.add_argument(
        "--scale",
        choices=SCALES,
        default=None,
        help="size of every run: tiny (seconds, no verdict; for tests), quick or full (default: full)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="data directory with mnist/, uci/, fashion-mnist/ (never downloaded)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path(DEFAULT_OUTPUT), metavar="DIR", help="output directory"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="seeds per experiment, 0 .. N-1 (default: each experiment's own for the scale)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished seeds and trained networks found in --output (damaged files are run again)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="threads of torch and of the UCI benchmark's numba kernels (default: their own)",
    )
    parser.add_argument(
        "--formats",
        type=_formats,
        default=FIGURE_FORMATS,
        metavar="png,svg",
        help="figure formats, comma-separated (default: png,svg)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress on stderr (neither bars nor lines)"
    )
    return parser


def selected_names(requested: Sequence[str]) -> list[str]:
    """The experiments named on the command line, in report order for ``all``.

    Raises:
        ValueError: nothing requested, an unknown name, a name given twice, or ``all`` beside
            other names; the message lists the valid names.
    """
    valid = names()
    choices = f"choose from all, {', '.join(valid)}"
    if not requested:
        raise ValueError(f"no experiment given: {choices} (or --list)")
    if "all" in requested:
        if len(requested) > 1:
            raise ValueError(f"'all' cannot be combined with other names, got {' '.join(requested)}")
        return list(valid)
    unknown = [n for n in requested if n not in valid]
    if unknown:
        raise ValueError(f"unknown experiment {unknown[0]!r}: {choices}")
    twice = next((n for n in requested if requested.count(n) > 1), None)
    if twice is not None:
        raise ValueError(f"experiment {twice!r} is listed twice")
    return list(requested)


def _command(args: argparse.Namespace, scale: str) -> str:
    """The command line that reruns this run, with every setting spelt out."""
    parts = ["dropkit", "reproduce", *args.experiments]
    parts += ["--scale", scale]
    if args.data is not None:
        parts += ["--data", str(args.data)]
    parts += ["--output", str(args.output)]
    if args.seeds is not None:
        parts += ["--seeds", str(args.seeds)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if tuple(args.formats) != FIGURE_FORMATS:
        parts += ["--formats", ",".join(args.formats)]
    if args.resume:
        parts.append("--resume")
    return shlex.join(parts)


def _print_list() -> int:
    """Every experiment's name and title, then its claim and the published numbers, indented
    and wrapped to the terminal's width."""
    width = max(len(n) for n in names())
    pad = " " * (width + 2)
    columns = max(60, shutil.get_terminal_size().columns - 1)

    def wrap(text: str) -> str:
        return textwrap.fill(text, columns, initial_indent=pad, subsequent_indent=pad + "  ")

    for name in names():
        try:
            exp = get_experiment(name)
        except Exception as exc:  # a listing shows every experiment, even one that cannot load
            print(f"{name:<{width}}  (unavailable: {type(exc).__name__}: {exc})")
            continue
        print(f"{name:<{width}}  {exp.title}")
        print(wrap(f"claim: {exp.claim.statement} ({exp.claim.source})"))
        print(wrap(f"published: {exp.claim.published}"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point.

    Args:
        argv: the arguments; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status of :func:`run`.
    """
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the reproductions from arguments parsed by a parser built with :func:`build_parser`.

    Args:
        args: the parsed arguments.

    Returns:
        The exit status: 0 when every experiment ran (held, did not hold, undecided or
        skipped), 1 when one failed, 2 after a one-line error on stderr (nothing ran).
    """
    if args.list:
        return _print_list()
    scale: Scale = args.scale or ("quick" if args.quick else "full")
    try:
        selection = selected_names(args.experiments)
        if args.seeds is not None and args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.data is not None and not args.data.is_dir():
            raise ValueError(f"--data {args.data}: not a directory")
        options = RunOptions(
            scale=scale,
            data_dir=args.data,
            output=args.output,
            seeds=args.seeds,
            resume=args.resume,
            threads=args.threads,
            progress=not args.no_progress,
            formats=tuple(args.formats),
            command=_command(args, scale),
        )
        # Before any training: a run that cannot write its results must not spend an hour first.
        prepare_output_dir(args.output, "--output")
        conflicts = resume_conflicts(selection, options) if args.resume else []
        if conflicts:
            raise ValueError(conflicts_message(conflicts))
    except ValueError as exc:
        return _cli.error(_PROG, exc)
    try:
        result = run_suite(selection, options)
    except OSError as exc:  # the report; the output was writable when the run started
        return _cli.error(_PROG, f"cannot write the report under {args.output}: {exc}")
    paths = ", ".join(str(p) for p in result.report)
    print(f"report: {paths} ({format_duration(result.seconds)} in all)")
    if result.exit_status:
        failed = [o.name for o in result.outcomes if o.status == "failed"]
        print(f"{_PROG}: {len(failed)} experiment(s) failed: {', '.join(failed)}", file=sys.stderr)
    return result.exit_status


if __name__ == "__main__":
    raise SystemExit(main())
