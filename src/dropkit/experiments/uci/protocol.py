"""The UCI MC-dropout benchmark, grid-search protocol (Gal & Ghahramani 2016), vectorized.

Per split (splits from :mod:`dropkit.experiments.uci.data`):

1. validation = the last 20 % of the training indices, in order; the first 80 % train;
2. standardize X and y with the mean and std (ddof 0; a zero std becomes 1) of the rows a
   network trains on; predictions are un-standardized before scoring;
3. grid ``p ∈ dropout_rates x τ ∈ tau_values``: train
   ``input -> Dropout(p) -> Dense(n_hidden, ReLU) -> Dropout(p) -> Dense(1)`` with MSE, Adam
   (lr 1e-3), batch 128, ``100 x n_epochs x epochs_scale`` epochs and L2 coefficient
   ``l² (1 - p) / (2 N τ)`` (``l = 1e-2``, ``N`` training rows) on both weight matrices;
4. pick the configuration with the highest validation mixture log-likelihood (``T`` passes);
   ties go to the first in grid order (``p`` major, ``τ`` minor);
5. retrain from scratch on the full training split with the chosen ``(p, τ)``;
6. score the test split with ``T = 10,000`` passes: MC RMSE and the mixture log-likelihood
   in original units (:mod:`dropkit.metrics.regression`).

All grid models of all requested splits train together as one
:class:`~dropkit.experiments.uci.model.BatchedMLP` (``G = splits x 12``), then all
retrained models together; a model's result does not depend on which others share its batch
(see :mod:`dropkit.experiments.uci.model` for the seeds).

Beyond the protocol (reported separately, never mixed into the protocol numbers):

* **learned τ**: for the selected configuration, ``τ*`` maximizes the validation mixture LL over
  a log-spaced grid of :data:`TAU_SEARCH_POINTS` values from ``τ_min / 10`` to ``10 τ_max``
  (on the first ``tau_search_samples`` passes); the test LL of the retrained model is then
  also reported with ``τ*`` (``test.ll_tau_learned``);
* **wider τ grid**: ``ProtocolConfig.tau_span`` extends each data set's grid by four
  log-spaced values beyond its ends, ``ProtocolConfig.extra_taus`` adds given precisions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dropkit.experiments.uci.data import Split, UCIDataset, train_validation
from dropkit.experiments.uci.model import ModelSpec, predict_blocks, train_models


class _PhaseClock:
    """Wall and process-CPU seconds of the protocol's phases, started and stopped in turn."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._started = (0.0, 0.0)

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self, name: str) -> None:
        self.wall[name] = time.perf_counter() - self._started[0]
        self.cpu[name] = time.process_time() - self._started[1]

    def per_split(self, n_splits: int) -> tuple[dict[str, float], dict[str, float]]:
        """Wall and CPU seconds of every phase divided by ``n_splits``: the splits ran together,
        so each is charged an equal share."""
        wall = {k: v / n_splits for k, v in self.wall.items()}
        cpu = {k: v / n_splits for k, v in self.cpu.items()}
        return wall, cpu


__all__ = [
    "LENGTHSCALE",
    "TAU_SEARCH_POINTS",
    "ProtocolConfig",
    "Standardizer",
    "regularization",
    "run_splits",
    "tau_search_grid",
]

#: Prior length-scale ``l`` of the weight-decay formula.
LENGTHSCALE = 1e-2
#: Number of candidate precisions of the learned-τ search.
TAU_SEARCH_POINTS = 41
_LOG_2PI = math.log(2.0 * math.pi)
_GRID, _RETRAIN = 0, 1
_RETRAIN_STREAM_BASE = 1 << 20
_MOMENT_CHUNK_ELEMENTS = 1 << 16
_LSE_CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class ProtocolConfig:
    """Settings of a benchmark run; the defaults are the published protocol.

    Attributes:
        epochs_scale: epochs = ``round(epochs_multiplier x n_epochs x epochs_scale)`` (>= 1);
            anything but 1 is a shortened (or lengthened) run, not the protocol.
        epochs_multiplier: 100 in the grid-search protocol.
        samples: MC passes ``T`` on the test set (10,000).
        val_samples: MC passes on the validation set (``None``: ``samples``, as published).
        batch_size, lr, lengthscale: 128, 1e-3, 1e-2.
        seed: seed of initial weights, batch order and masks.
        mc_block: passes per prediction block (memory bound; part of the mask layout).
        extra_taus: precisions added to the grid (beyond the protocol).
        tau_span: ``S > 1`` adds ``τ_min / S``, ``τ_min / √S``, ``τ_max √S`` and ``τ_max S`` to each
            data set's grid (beyond the protocol; the published grids of Energy, Yacht and most
            Boston splits select their top τ); 1: off.
        tau_search_samples: validation passes used by the learned-τ search (0 disables it).
        fused: train and predict with the numba kernels of
            :mod:`~dropkit.experiments.uci.fused` (``None``: when numba is installed) or, with
            ``False``, the torch path; the same masks and recipe, float32 sums in another order.
    """

    epochs_scale: float = 1.0
    epochs_multiplier: int = 100
    samples: int = 10_000
    val_samples: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    lengthscale: float = LENGTHSCALE
    seed: int = 0
    mc_block: int = 10
    extra_taus: tuple[float, ...] = field(default_factory=tuple)
    tau_span: float = 1.0
    tau_search_samples: int = 1000
    fused: bool | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epochs_scale) and self.epochs_scale > 0):
            raise ValueError(f"epochs_scale must be a finite float > 0, got {self.epochs_scale!r}")
        for name in ("epochs_multiplier", "samples", "batch_size", "mc_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.val_samples is not None and (not isinstance(self.val_samples, int) or self.val_samples < 1):
            raise ValueError(f"val_samples must be None or an int >= 1, got {self.val_samples!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"fused must be a bool or None, got {type(self.fused).__name__} ({self.fused!r})")
        if not isinstance(self.tau_search_samples, int) or self.tau_search_samples < 0:
            raise ValueError(f"tau_search_samples must be an int >= 0, got {self.tau_search_samples!r}")
        for name in ("lr", "lengthscale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
        if isinstance(self.tau_span, bool) or not isinstance(self.tau_span, (int, float)):
            raise TypeError(
                f"tau_span must be a float, got {type(self.tau_span).__name__} ({self.tau_span!r})"
            )
        if not (math.isfinite(self.tau_span) and self.tau_span >= 1.0):
            raise ValueError(f"tau_span must be a finite float >= 1, got {self.tau_span!r}")
        for tau in self.extra_taus:
            if not (math.isfinite(tau) and tau > 0):
                raise ValueError(f"extra_taus entries must be finite floats > 0, got {tau!r}")

    def epochs(self, dataset: UCIDataset) -> int:
        """Training epochs for ``dataset`` (4000 for the published runs)."""
        return max(1, round(self.epochs_multiplier * dataset.n_epochs * self.epochs_scale))

    def taus(self, dataset: UCIDataset) -> tuple[float, ...]:
        """The τ grid: the data set's values, then the wider span's, then the extra ones (each
        value once)."""
        grid = list(dataset.tau_values)
        if self.tau_span > 1.0:
            low, high, root = min(grid), max(grid), math.sqrt(self.tau_span)
            grid += [low / self.tau_span, low / root, high * root, high * self.tau_span]
        grid += list(self.extra_taus)
        return tuple(dict.fromkeys(grid))

    def is_protocol(self) -> bool:
        """Whether the settings are the published protocol's."""
        return (
            self.epochs_scale == 1.0
            and self.epochs_multiplier == 100
            and self.samples == 10_000
            and self.val_samples in (None, 10_000)
            and self.batch_size == 128
            and self.lr == 1e-3
            and self.lengthscale == LENGTHSCALE
            and not self.extra_taus
            and self.tau_span == 1.0
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["extra_taus"] = list(self.extra_taus)
        return out


def regularization(p: float, tau: float, n: int, lengthscale: float = LENGTHSCALE) -> float:
    """The benchmark's L2 coefficient ``λ = l² (1 - p) / (2 N τ)`` (loss term ``λ ||W||²``).

    Example:
        >>> f"{regularization(0.05, 0.1, 364):.4e}"  # 1e-4 * 0.95 / (2 * 364 * 0.1)
        '1.3049e-06'
    """
    return lengthscale**2 * (1.0 - p) / (2.0 * n * tau)


def tau_search_grid(taus: Sequence[float], points: int = TAU_SEARCH_POINTS) -> np.ndarray:
    """Log-spaced candidates from ``min(taus) / 10`` to ``10 max(taus)`` for the learned τ."""
    return np.geomspace(min(taus) / 10.0, max(taus) * 10.0, points)


@dataclass(frozen=True)
class Standardizer:
    """Column means and stds (ddof 0, zeros replaced by 1) of the training rows."""

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float
    y_std: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> Standardizer:
        x_std = x.std(0)
        x_std[x_std == 0] = 1.0
        y_std = float(y.std())
        return cls(x.mean(0), x_std, float(y.mean()), y_std if y_std > 0 else 1.0)

    def x(self, x: np.ndarray) -> np.ndarray:
        return (x - self.x_mean) / self.x_std

    def y(self, y: np.ndarray) -> np.ndarray:
        return (y - self.y_mean) / self.y_std


def _seed(base: int, *parts: int) -> int:
    value = base & 0xFFFFFFFFFFFFFFFF
    for part in parts:
        value = (value * 0x9E3779B97F4A7C15 + part + 1) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


class _MixtureStats:
    """Running per-model moments and log-sum-exps in original units, for ``G`` models at once.

    ``targets``: ``(G, n)``; ``taus``: ``(G, K)`` precisions per model; ``limit``: only the first
    ``limit`` passes feed the log-sum-exps (the moments always see every pass).
    """

    def __init__(self, targets: torch.Tensor, taus: torch.Tensor, limit: int | None = None) -> None:
        self.targets = targets.to(torch.float64)
        self.taus = taus.to(torch.float64)
        self.limit = limit
        self.count = 0
        self.lse_count = 0
        self.mean = torch.zeros_like(self.targets)
        self.m2 = torch.zeros_like(self.targets)
        g, n = self.targets.shape
        self.lse = torch.full((g, self.taus.shape[1], n), -math.inf, dtype=torch.float64)

    def update(
        self, samples: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> None:
        """Add passes ``samples`` ``(G, t, n)``, in original units after ``samples * scale + shift``
        (``scale``, ``shift``: ``(G, 1, 1)``, float64; ``None``: already in original units)."""
        t = samples.shape[1]
        total = self.count + t
        use = t if self.limit is None else max(0, min(t, self.limit - self.lse_count))
        k = self.taus.shape[1] if use else 0
        # Models in chunks, so that temporaries stay in cache (measured: the moments 2x faster
        # in chunks of 2**16 elements, the 41-point τ search 3x in chunks of 2**19; same values).
        chunk = max(1, _MOMENT_CHUNK_ELEMENTS // (samples.shape[2] * t))
        for first in range(0, samples.shape[0], chunk):
            part = slice(first, first + chunk)
            s = self._original(samples, part, scale, shift)
            chunk_mean = s.mean(1)
            chunk_m2 = (s - chunk_mean.unsqueeze(1)).square().sum(1)
            delta = chunk_mean - self.mean[part]
            self.m2[part] += chunk_m2 + delta.square() * (self.count * t / total)
            self.mean[part] += delta * (t / total)
        if k:
            half_taus = (-0.5 * self.taus).unsqueeze(-1).unsqueeze(-1)  # (G, K, 1, 1)
            chunk = max(1, _LSE_CHUNK_ELEMENTS // (samples.shape[2] * k * use))
            for first in range(0, samples.shape[0], chunk):
                part = slice(first, first + chunk)
                s = self._original(samples[:, :use], part, scale, shift)
                sq = (self.targets[part].unsqueeze(1) - s).square()  # (g, u, n)
                terms = half_taus[part] * sq.unsqueeze(1)  # (g, K, u, n)
                torch.logaddexp(self.lse[part], torch.logsumexp(terms, dim=2), out=self.lse[part])
        self.count = total
        if k:
            self.lse_count += use

    @staticmethod
    def _original(
        samples: torch.Tensor, part: slice, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        s = samples[part].to(torch.float64)
        return s if scale is None or shift is None else s * scale[part] + shift[part]

    def log_likelihood(self) -> torch.Tensor:
        """Mean over points of the mixture LL, ``(G, K)``."""
        ll = self.lse - math.log(self.lse_count) + 0.5 * (self.taus.log() - _LOG_2PI).unsqueeze(-1)
        return ll.mean(-1)

    def rmse(self) -> torch.Tensor:
        return (self.targets - self.mean).square().mean(-1).sqrt()

    def gaussian(self, taus: torch.Tensor, level: float = 0.95) -> dict[str, torch.Tensor]:
        """Moment-matched Gaussian LL, PICP and MPIW at ``level``, per model (``taus``: ``(G,)``)."""
        var = self.m2 / self.count + 1.0 / taus.to(torch.float64).unsqueeze(-1)
        ll = -0.5 * (_LOG_2PI + var.log() + (self.targets - self.mean).square() / var)
        z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64))
        half = z * var.sqrt()
        inside = ((self.targets - self.mean).abs() <= half).to(torch.float64)
        return {"ll_gaussian": ll.mean(-1), "picp95": inside.mean(-1), "mpiw95": (2 * half).mean(-1)}


def _best_per_split(val_ll: torch.Tensor, split_of: Sequence[int], n_splits: int) -> list[int]:
    """The grid point of every split with the highest validation log likelihood (``split_of[g]``:
    the split of grid point ``g``); a tie goes to the first in grid order."""
    chosen = []
    for k in range(n_splits):
        members = [g for g in range(len(split_of)) if split_of[g] == k]
        chosen.append(max(members, key=lambda g: (float(val_ll[g]), -g)))
    return chosen


def _stack(
    dataset: UCIDataset, fit_rows: list[np.ndarray], eval_rows: list[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[Standardizer]]:
    scalers = [Standardizer.fit(dataset.x[r], dataset.y[r]) for r in fit_rows]
    xf = np.stack([sc.x(dataset.x[r]) for sc, r in zip(scalers, fit_rows, strict=True)])
    yf = np.stack([sc.y(dataset.y[r]) for sc, r in zip(scalers, fit_rows, strict=True)])
    xe = np.stack([sc.x(dataset.x[r]) for sc, r in zip(scalers, eval_rows, strict=True)])
    ye = np.stack([dataset.y[r] for r in eval_rows])  # original units
    as_f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return as_f32(xf), as_f32(yf), as_f32(xe), torch.from_numpy(ye), scalers


def _evaluate(
    model: Any,
    specs: list[ModelSpec],
    x_eval: torch.Tensor,
    stats: list[_MixtureStats],
    scalers: list[Standardizer],
    config: ProtocolConfig,
    samples: int,
    on_block: Callable[[int], None] | None,
) -> None:
    mean = torch.tensor([scalers[s.data_index].y_mean for s in specs], dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor([scalers[s.data_index].y_std for s in specs], dtype=torch.float64).view(-1, 1, 1)

    def consume(block: torch.Tensor) -> None:
        for st in stats:
            st.update(block, std, mean)
        if on_block is not None:
            on_block(block.shape[1])

    predict_blocks(
        model,
        specs,
        x_eval,
        samples=samples,
        seed=config.seed,
        block=config.mc_block,
        consume=consume,
        fused=config.fused,
    )


Progress = Callable[[str, int, int], None]


def run_splits(
    dataset: UCIDataset,
    splits: Sequence[Split],
    config: ProtocolConfig,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Run the protocol on ``splits`` of ``dataset``, all trained together.

    Args:
        dataset: the data set.
        splits: the splits to run (each one's result is independent of the others).
        config: the settings.
        progress: called as ``progress(phase, done, total)`` with phases ``"grid"``,
            ``"validate"``, ``"retrain"``, ``"test"`` (epochs or passes).

    Returns:
        One result dict per split (JSON-ready), in the order of ``splits``.
    """
    if not splits:
        return []
    rates = tuple(dataset.dropout_rates)
    taus = config.taus(dataset)
    n_taus = len(taus)
    epochs = config.epochs(dataset)
    val_samples = config.val_samples or config.samples
    n_splits = len(splits)
    report = progress or (lambda phase, done, total: None)
    phase = _PhaseClock()
    train_kw: dict[str, Any] = {
        "n_hidden": dataset.n_hidden,
        "epochs": epochs,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "fused": config.fused,
    }

    # --- grid on the first 80 % --------------------------------------------------------------
    parts = [train_validation(s.train) for s in splits]
    x_tr, y_tr, x_val, y_val, sc_grid = _stack(dataset, [a for a, _ in parts], [b for _, b in parts])
    n_fit = x_tr.shape[1]
    specs = [
        ModelSpec(
            data_index=k,
            p=p,
            weight_decay=regularization(p, tau, n_fit, config.lengthscale),
            init_seed=_seed(config.seed, _GRID, split.index),
            shuffle_seed=_seed(config.seed, _GRID, split.index, 1),
            mask_stream=pi,
            slot=split.index * n_taus + ti,
        )
        for pi, p in enumerate(rates)
        for k, split in enumerate(splits)
        for ti, tau in enumerate(taus)
    ]
    grid_of = [(pi, ti) for pi in range(len(rates)) for _ in splits for ti in range(n_taus)]
    split_of = [k for _ in rates for k in range(n_splits) for _ in taus]
    phase.start()
    model = train_models(specs, x_tr, y_tr, on_epoch=lambda e: report("grid", e, epochs), **train_kw)
    phase.stop("grid_train")

    phase.start()
    own_tau = torch.tensor([[taus[ti]] for _, ti in grid_of])
    targets = y_val[torch.tensor(split_of)]
    val_stats = _MixtureStats(targets, own_tau)
    stats = [val_stats]
    search = tau_search_grid(taus)
    if config.tau_search_samples:
        search_stats = _MixtureStats(
            targets, torch.from_numpy(search).expand(len(specs), -1), limit=config.tau_search_samples
        )
        stats.append(search_stats)
    done = [0]

    def val_block(t: int) -> None:
        done[0] += t
        report("validate", done[0], val_samples)

    _evaluate(model, specs, x_val, stats, sc_grid, config, val_samples, val_block)
    val_ll = val_stats.log_likelihood()[:, 0]
    search_ll = search_stats.log_likelihood() if config.tau_search_samples else None
    phase.stop("grid_validate")

    chosen = _best_per_split(val_ll, split_of, n_splits)

    # --- retrain on the full training split ----------------------------------------------------
    x_full, y_full, x_test, y_test, sc_full = _stack(
        dataset, [s.train for s in splits], [s.test for s in splits]
    )
    n_full = x_full.shape[1]
    retrain_specs = []
    for k, split in enumerate(splits):
        pi, ti = grid_of[chosen[k]]
        retrain_specs.append(
            ModelSpec(
                data_index=k,
                p=rates[pi],
                weight_decay=regularization(rates[pi], taus[ti], n_full, config.lengthscale),
                init_seed=_seed(config.seed, _RETRAIN, split.index),
                shuffle_seed=_seed(config.seed, _RETRAIN, split.index, 1),
                mask_stream=_RETRAIN_STREAM_BASE + pi,
                slot=split.index,
            )
        )
    phase.start()
    final = train_models(
        retrain_specs, x_full, y_full, on_epoch=lambda e: report("retrain", e, epochs), **train_kw
    )
    phase.stop("retrain")

    phase.start()
    chosen_tau = torch.tensor([taus[grid_of[g][1]] for g in chosen], dtype=torch.float64)
    learned = []
    for k in range(n_splits):
        if search_ll is None:
            learned.append(float(chosen_tau[k]))
        else:
            learned.append(float(search[int(torch.argmax(search_ll[chosen[k]]))]))
    test_taus = torch.stack([chosen_tau, torch.tensor(learned, dtype=torch.float64)], dim=1)
    test_stats = _MixtureStats(y_test, test_taus)
    done[0] = 0

    def test_block(t: int) -> None:
        done[0] += t
        report("test", done[0], config.samples)

    _evaluate(final, retrain_specs, x_test, [test_stats], sc_full, config, config.samples, test_block)
    phase.stop("test")
    test_ll = test_stats.log_likelihood()
    rmse = test_stats.rmse()
    extras = test_stats.gaussian(chosen_tau)

    results = []
    per_split_seconds, per_split_cpu = phase.per_split(n_splits)
    for k, split in enumerate(splits):
        pi, ti = grid_of[chosen[k]]
        members = [g for g in range(len(specs)) if split_of[g] == k]
        result: dict[str, Any] = {
            "dataset": dataset.name,
            "split": split.index,
            "n_train": len(split.train),
            "n_grid_train": n_fit,
            "n_validation": x_val.shape[1],
            "n_test": len(split.test),
            "epochs": epochs,
            "samples": config.samples,
            "p": rates[pi],
            "tau": taus[ti],
            "validation_ll": float(val_ll[chosen[k]]),
            "rmse": float(rmse[k]),
            "ll": float(test_ll[k, 0]),
            "ll_gaussian": float(extras["ll_gaussian"][k]),
            "picp95": float(extras["picp95"][k]),
            "mpiw95": float(extras["mpiw95"][k]),
            "grid": [
                {"p": rates[grid_of[g][0]], "tau": taus[grid_of[g][1]], "validation_ll": float(val_ll[g])}
                for g in members
            ],
            "tau_learned": learned[k] if search_ll is not None else None,
            "ll_tau_learned": float(test_ll[k, 1]) if search_ll is not None else None,
            "tau_at_grid_edge": ti in (0, n_taus - 1),
            "seconds": per_split_seconds,
            "cpu_seconds": per_split_cpu,
        }
        results.append(result)
    return results
