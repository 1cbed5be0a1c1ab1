"""Command line of the UCI MC-dropout benchmark: ``dropkit uci``.

``python -m dropkit.experiments.uci.cli`` is the same command with the same help (both build
their arguments with :func:`build_parser`); the defaults are the published grid-search protocol
on every data set found in ``--data``, in either layout of
:data:`~dropkit.experiments.uci.data.LAYOUTS`.  Each split's result is written atomically as
soon as its batch of splits finishes, so ``--resume`` continues an interrupted run where it
stopped; a split file that is damaged, edited, or written for another split, other settings or
another dropkit version is recomputed (one line on stderr says so), never used.  The output
directories are created and proven writable before any training.  Every error of the command
line is one line on stderr and exit status 2.  Progress goes to stderr
(:class:`~dropkit.experiments._console.Progress`): tqdm bars on a terminal (``pip install
'dropkit[demo]'``), one plain line per finished block of work otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import dropkit
from dropkit.experiments import _cli
from dropkit.experiments._console import Progress, format_duration, format_mean_se, format_number
from dropkit.experiments._files import prepare_output_dir
from dropkit.experiments.uci import concrete, protocol, report
from dropkit.experiments.uci.data import (
    Split,
    UCIDataset,
    list_datasets,
    load_dataset,
    locate_dataset,
    no_datasets_message,
    select_splits,
)

__all__ = ["DESCRIPTION", "SUMMARY", "build_parser", "main", "run"]

_PROG = "dropkit uci"
#: One line for the list of commands of ``dropkit --help``.
SUMMARY = "UCI regression benchmark of MC dropout"
#: The description of ``dropkit uci --help`` (paragraphs).
DESCRIPTION = """\
UCI regression benchmark of MC dropout, grid-search protocol (Gal & Ghahramani 2016): a
12-point (p, tau) grid selected by validation log-likelihood, retrained on the full training
split, scored with T=10,000 passes. The defaults are the published protocol.

Data (--data DIR, never downloaded): one folder per data set, in either layout:
DIR/<name>/data.txt, or DIR/<name>/data/data.txt as in the MC-dropout benchmark repository
(pass its UCI_Datasets folder as DIR). Beside data.txt: index_features.txt, index_target.txt,
n_splits.txt, n_hidden.txt, n_epochs.txt, dropout_rates.txt, tau_values.txt, and optionally the
published split files index_train_<i>.txt and index_test_<i>.txt.

Output (--output OUT): one JSON file per finished split (--resume continues an interrupted run),
results.csv and summary.json/.csv at full precision, and summary.md beside the published numbers
with their sources, to significant figures. Progress goes to stderr: bars on a terminal, one
line per finished block of work otherwise.
"""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's arguments, description and help format, added to ``parser`` (a new one
    when ``None``; pass a sub-parser to mount the benchmark as a subcommand).  Both give the
    same help text."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m dropkit.experiments.uci.cli")
    parser.description = DESCRIPTION
    parser.formatter_class = _cli.HelpFormatter
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder of the data-set folders, each DIR/<name>/data.txt or DIR/<name>/data/data.txt",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="data sets (default: all in --data)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        type=int,
        default=None,
        metavar="I",
        help="split indices, each once (default: all)",
    )
    parser.add_argument(
        "--split-batch",
        type=int,
        default=0,
        help="splits trained together (0: all pending); smaller batches lose less work if interrupted",
    )
    parser.add_argument(
        "--epochs-scale", type=float, default=1.0, help="fraction of the published 100 x n_epochs epochs"
    )
    parser.add_argument("--T", type=int, default=10_000, dest="samples", help="MC passes on the test set")
    parser.add_argument(
        "--val-T", type=int, default=None, dest="val_samples", help="MC passes on validation (default: --T)"
    )
    parser.add_argument(
        "--extra-taus",
        nargs="*",
        type=float,
        default=[],
        help="taus added to the grid (beyond the protocol)",
    )
    parser.add_argument(
        "--tau-span",
        type=float,
        default=1.0,
        help="S > 1: add tau_min/S, tau_min/sqrt(S), tau_max*sqrt(S), tau_max*S to each data set's grid "
        "(beyond the protocol)",
    )
    parser.add_argument(
        "--tau-search-samples",
        type=int,
        default=1000,
        help="validation passes for the learned-tau search (0: off)",
    )
    parser.add_argument(
        "--concrete",
        action="store_true",
        help=(
            "beyond the protocol: run the concrete-dropout variant (learned drop rates) instead, "
            "written under OUT/concrete; its --val-T defaults to 1000"
        ),
    )
    parser.add_argument("--mc-block", type=int, default=10, help="MC passes per prediction block")
    parser.add_argument(
        "--kernels",
        choices=("auto", "fused", "torch"),
        default="auto",
        help="fused numba kernels (auto: when numba is installed) or the torch path; same masks, "
        "results equal to float32 rounding",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, batch order and masks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, required=True, metavar="OUT", help="output directory")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep finished splits found in --output (files that fail their checks are recomputed)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress on stderr (neither bars nor lines)"
    )
    return parser


#: Unit and number of lines (off a terminal) of each phase of ``run_splits``'s progress.
_PHASES = {
    "grid": ("epochs", 10),
    "validate": ("passes", 1),
    "retrain": ("epochs", 10),
    "test": ("passes", 1),
}


@contextlib.contextmanager
def _phase_progress(enabled: bool, label: str) -> Iterator[protocol.Progress]:
    """A ``progress(phase, done, total)`` callback showing one :class:`Progress` per phase."""
    shown: dict[str, Progress] = {}

    def update(phase: str, done: int, total: int) -> None:
        current = shown.get(phase)
        if current is None:
            for previous in shown.values():  # phases run one after the other
                previous.close()
            unit, lines = _PHASES.get(phase, ("steps", 10))
            current = shown[phase] = Progress(
                f"{label} {phase}", total, unit=unit, enabled=enabled, lines=lines, leave=False
            )
        current.update(done)

    try:
        yield update
    finally:
        for current in shown.values():
            current.close()


def _error(message: object) -> int:
    """Print ``message`` as one ``dropkit uci: error: ...`` line on stderr; the exit status 2."""
    return _cli.error(_PROG, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point.

    Args:
        argv: the arguments; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 for bad arguments, data or output (argparse itself exits
        with 2 on arguments it cannot parse).
    """
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark from arguments parsed by a parser built with :func:`build_parser`
    (for mounting it as a subcommand).

    Everything that can be checked is checked before any training: the settings, the data sets,
    the ``--splits`` (in range, each once) and the output directories (created, writable).

    Args:
        args: the parsed arguments.

    Returns:
        The exit status: 0 on success, 2 after a one-line error on stderr.
    """
    try:
        config = protocol.ProtocolConfig(
            epochs_scale=args.epochs_scale,
            samples=args.samples,
            val_samples=args.val_samples,
            mc_block=args.mc_block,
            seed=args.seed,
            extra_taus=tuple(args.extra_taus),
            tau_span=args.tau_span,
            tau_search_samples=args.tau_search_samples,
            fused={"auto": None, "fused": True, "torch": False}[args.kernels],
        )
        concrete_config = None
        if args.concrete:
            concrete_config = concrete.ConcreteConfig(
                epochs_scale=args.epochs_scale,
                samples=args.samples,
                val_samples=args.val_samples or 1000,
                mc_block=args.mc_block,
                seed=args.seed,
                extra_taus=tuple(args.extra_taus),
            )
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.split_batch < 0:
            raise ValueError(f"--split-batch must be >= 0, got {args.split_batch}")
        if args.datasets is None and locate_dataset(args.data) is not None:
            # A data-set folder itself (UCI_Datasets/yacht): its "data" subfolder is no data set.
            raise ValueError(no_datasets_message(args.data))
        names = args.datasets or list_datasets(args.data)
        if not names:
            raise ValueError(no_datasets_message(args.data))
        datasets = [load_dataset(args.data, name) for name in names]
        chosen = {d.name: select_splits(d, args.splits) for d in datasets}
    except (TypeError, ValueError, OSError) as exc:
        return _error(exc)
    output = args.output / "concrete" if concrete_config is not None else args.output
    try:
        # Before any training: a run that cannot write its results must not spend hours first.
        prepare_output_dir(output, "--output")
        for dataset in datasets:
            prepare_output_dir(output / dataset.name, "--output")
    except ValueError as exc:
        return _error(exc)
    torch.set_num_threads(args.threads)
    if concrete_config is not None:
        method = _concrete_method(output, concrete_config)
    else:
        if not config.is_protocol():
            note = "note: settings differ from the published protocol; results are labelled so"
            print(note, file=sys.stderr)
        method = _protocol_method(output, config)
    return _run_all(args, method, datasets, chosen)


@dataclass(frozen=True)
class _Method:
    """What differs between the protocol and a variant beyond it: where its files go, the
    settings a resume must match, how it runs splits, writes its tables and reports a data set."""

    output: Path
    label: str
    settings: Callable[[UCIDataset], dict[str, Any]]
    fields: dict[str, tuple[type, ...]]
    header: dict[str, Any]
    run_splits: Callable[[UCIDataset, list[Split], protocol.Progress], list[dict[str, Any]]]
    write_reports: Callable[[Path, dict[str, list[dict[str, Any]]], dict[str, Any]], None]
    summary: Callable[[list[dict[str, Any]]], str]


def _protocol_method(output: Path, config: protocol.ProtocolConfig) -> _Method:
    def summary(results: list[dict[str, Any]]) -> str:
        s = report.summarize(results)
        return f"RMSE {format_mean_se(s['rmse'], s['rmse_se'])}  LL {format_mean_se(s['ll'], s['ll_se'])}"

    return _Method(
        output=output,
        label="",
        settings=lambda dataset: {
            "config": config.to_dict(),
            "protocol": config.is_protocol(),
            "dropout_rates": list(dataset.dropout_rates),
            "taus": list(config.taus(dataset)),
            "n_hidden": dataset.n_hidden,
            "splits_source": dataset.splits_source,
        },
        header={
            "config": config.to_dict(),
            "protocol": config.is_protocol(),
            "dropkit_version": dropkit.__version__,
        },
        fields=report.RESULT_FIELDS,
        run_splits=lambda dataset, group, bar: protocol.run_splits(dataset, group, config, progress=bar),
        write_reports=report.write_reports,
        summary=summary,
    )


def _concrete_method(output: Path, config: concrete.ConcreteConfig) -> _Method:
    print(f"beyond the protocol: concrete dropout, results in {output}", file=sys.stderr)
    if not config.is_full_recipe():
        print("note: shortened or modified settings; results are labelled so", file=sys.stderr)

    def summary(results: list[dict[str, Any]]) -> str:
        s = concrete.summarize(results)
        return (
            f"RMSE {format_mean_se(s['rmse'], s['rmse_se'])}  LL {format_mean_se(s['ll'], s['ll_se'])}  "
            f"p {format_number(s['p_input'])} / {format_number(s['p_hidden'])}"
        )

    return _Method(
        output=output,
        label=" concrete",
        settings=lambda dataset: {
            "method": "concrete_dropout",
            "config": config.to_dict(),
            "full_recipe": config.is_full_recipe(),
            "taus": list(config.taus(dataset)),
            "n_hidden": dataset.n_hidden,
            "splits_source": dataset.splits_source,
        },
        header={
            "method": "concrete_dropout",
            "config": config.to_dict(),
            "full_recipe": config.is_full_recipe(),
            "dropkit_version": dropkit.__version__,
        },
        fields=concrete.RESULT_FIELDS,
        run_splits=lambda dataset, group, bar: concrete.run_splits(dataset, group, config, progress=bar),
        write_reports=concrete.write_reports,
        summary=summary,
    )


def _write_error(method: _Method, exc: OSError) -> int:
    # The output was proven writable before the run; it can still fail later (disk full,
    # directory removed or remounted read-only): one line, no traceback.
    return _error(f"cannot write the results under {method.output}: {exc}")


def _run_all(
    args: argparse.Namespace, method: _Method, datasets: Sequence[UCIDataset], chosen: dict[str, list[Split]]
) -> int:
    """Run ``method`` on every data set: resume, batches of splits with progress bars, each
    split's result written atomically, the tables rewritten after each data set."""
    all_results: dict[str, list[dict[str, Any]]] = {}
    for dataset in datasets:
        settings = method.settings(dataset)
        wanted = [s.index for s in chosen[dataset.name]]
        done: dict[int, dict[str, Any]] = {}
        if args.resume:
            scan = report.load_split_results(method.output, dataset.name, settings, wanted, method.fields)
            done = scan.done
            for path, reason in scan.stale.values():
                print(f"{path}: {reason}; recomputing", file=sys.stderr)
        pending = [s for s in chosen[dataset.name] if s.index not in done]
        if done:
            print(
                f"{dataset.name}: resuming, {len(done)} split(s) already done, {len(pending)} to run",
                file=sys.stderr,
            )
        batch = args.split_batch or len(pending) or 1
        start = time.perf_counter()
        with Progress(
            f"{dataset.name}{method.label}",
            len(pending),
            unit="splits",
            enabled=not args.no_progress,
            lines=max(1, len(pending)),
        ) as splits_done:
            for first in range(0, len(pending), batch):
                group = pending[first : first + batch]
                label = f"{dataset.name}{method.label} splits {group[0].index}-{group[-1].index}"
                with _phase_progress(not args.no_progress, label) as bar:
                    results = method.run_splits(dataset, group, bar)
                try:
                    for result in results:
                        report.write_split_result(method.output, result, settings)
                        done[result["split"]] = result
                except OSError as exc:
                    return _write_error(method, exc)
                splits_done.update(first + len(group))
        all_results[dataset.name] = [done[i] for i in sorted(done)]
        try:
            method.write_reports(method.output, all_results, method.header)
        except OSError as exc:
            return _write_error(method, exc)
        if all_results[dataset.name]:
            name = dataset.name + (f" ({method.label.strip()})" if method.label else "")
            line = method.summary(all_results[dataset.name])
            count, seconds = len(all_results[dataset.name]), time.perf_counter() - start
            print(f"{name}: {line}  ({count} splits, {format_duration(seconds)} this run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
