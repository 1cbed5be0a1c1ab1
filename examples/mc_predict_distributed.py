"""Score a data set with Monte Carlo dropout on several processes.

Run it with::

    torchrun --nproc-per-node 2 examples/mc_predict_distributed.py
    torchrun --nproc-per-node 2 examples/mc_predict_distributed.py --data digits --check

Every rank builds the same data and trains the same small classifier (the training runs under
``dropkit.distributed.rank_masks()``, so every rank draws the same dropout masks and ends with
the same weights).  Then the test set is scored batch by batch with
``mc_predict(..., group=WORLD, reduce="stats")``: each rank computes its share of the ``T``
samples of a batch and the ranks merge their streaming statistics, so every rank holds the
predictive mean, the expected entropy and the votes of all ``T`` samples.  Batch ``b`` uses the
seed ``--seed + b``, which makes the scores those of one process with the same seeds
(``--check`` recomputes them in one process on rank 0 and prints the largest difference).

Data: ``generated`` (default; Gaussian classes, no extra dependency) or ``digits`` (the 8x8
digits that ship with scikit-learn).  The process group is gloo; ``main()`` also runs inside a
process group that is already initialised (the tests call it that way).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import dropkit
import dropkit.distributed
from dropkit.metrics.calibration import expected_calibration_error
from dropkit.metrics.classification import accuracy, entropy, nll


def _data(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test features and labels, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    if name == "digits":
        from sklearn.datasets import load_digits  # optional: pip install scikit-learn

        digits = load_digits()
        features = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
    else:
        centres = torch.randn(5, 20, generator=generator) * 1.5
        labels = torch.randint(0, 5, (1500,), generator=generator)
        features = centres[labels] + torch.randn(1500, 20, generator=generator) * 2.0
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[: len(order) * 2 // 3], order[len(order) * 2 // 3 :]
    return features[train], labels[train], features[test], labels[test]


def _train(features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    dropkit.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(features.shape[1], 128),
        nn.ReLU(),
        dropkit.nn.Dropout(0.3),
        nn.Linear(128, 128),
        nn.ReLU(),
        dropkit.nn.Dropout(0.3),
        nn.Linear(128, classes),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = torch.Generator().manual_seed(seed)
    with dropkit.distributed.rank_masks():  # the same masks, hence the same weights, on every rank
        for _ in range(15):
            for index in torch.randperm(len(labels), generator=batches).split(64):
                loss = nn.functional.cross_entropy(model(features[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def _score(
    model: nn.Module, features: torch.Tensor, args: argparse.Namespace, group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """Predictive mean, expected entropy and votes of every test point, batch by batch."""
    means, expected, votes = [], [], []
    for batch, rows in enumerate(features.split(args.batch_size)):
        seed = args.seed + batch
        summary = dropkit.mc_predict(
            model, rows, T=args.samples, seed=seed, transform="softmax", reduce="stats", group=group
        )
        means.append(summary.mean)
        expected.append(summary.mean_entropy)
        votes.append(summary.votes)
    return {"mean": torch.cat(means), "expected_entropy": torch.cat(expected), "votes": torch.cat(votes)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("generated", "digits"), default="generated")
    parser.add_argument("--samples", type=int, default=64, help="T, the MC samples per batch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with one process on rank 0")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the scores and metrics (the same on every rank)."""
    args = _parser().parse_args(argv)
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group("gloo")  # torchrun's environment gives the rank and world size
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        train_x, train_y, test_x, test_y = _data(args.data, args.seed)
        classes = int(train_y.max()) + 1
        model = _train(train_x, train_y, classes, args.seed)
        start = time.perf_counter()
        scores = _score(model, test_x, args, dist.group.WORLD)
        seconds = time.perf_counter() - start
        mean = scores["mean"]
        mutual_information = entropy(mean.double()) - scores["expected_entropy"].double()
        metrics = {
            "accuracy": float(accuracy(mean, test_y)),
            "nll": float(nll(mean, test_y)),
            "ece": float(expected_calibration_error(mean, test_y).value),
            "mutual_information": float(mutual_information.mean()),
        }
        result: dict[str, Any] = {"scores": scores, "metrics": metrics}
        if args.check and rank == 0:
            single = _score(model, test_x, args, None)
            result["max_mean_difference"] = float((single["mean"] - mean).abs().max())
            result["votes_equal"] = bool(torch.equal(single["votes"], scores["votes"]))
        if rank == 0:
            print(f"{len(test_y)} test points, T = {args.samples}, {world} processes: {seconds:.2f} s")
            for name, value in metrics.items():
                print(f"  {name:<20} {value:.4f}")
            if args.check:
                print(
                    f"  one process: max |mean difference| = {result['max_mean_difference']:.3g}, "
                    f"votes equal: {result['votes_equal']}"
                )
        return result
    finally:
        if started_here:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
