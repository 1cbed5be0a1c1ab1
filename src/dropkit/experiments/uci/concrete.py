r"""Beyond the protocol: the UCI benchmark with concrete dropout (learned drop rates).

Concrete dropout (Gal, Hron & Kendall, "Concrete Dropout", NeurIPS 2017) replaces the grid over
the dropout rate by a rate learned per layer.  The network is the protocol's,

    ``input -> ConcreteDropout -> Dense(n_hidden, ReLU) -> ConcreteDropout -> Dense(1)``,

with one learned rate :math:`p_l = \sigma(\ell_l)` per layer and per network.  While training and
while sampling, layer :math:`l` multiplies its input :math:`x` by the relaxed keep mask of
:func:`dropkit.functional.concrete.concrete_dropout`,

.. math::
    \tilde z = \sigma\!\left(\frac{\log p - \log(1-p) + \log u - \log(1-u)}{t}\right),\quad
    u \sim U(0, 1),\ t = 0.1, \qquad y = x \odot \frac{1 - \tilde z}{1 - p}.

**Objective.**  The likelihood is the protocol's homoscedastic Gaussian of precision :math:`\tau`
(original units).  The network fits targets standardized by the training std :math:`\sigma_y`,
where that precision is :math:`\tau_s = \tau \sigma_y^2`.  The per-point negative ELBO with
:math:`N` training points (Gal, Hron & Kendall 2017, §3 and eq. (3); the KL term of one layer
with mean weight :math:`M` is :math:`\frac{l^2 (1-p)}{2} \|M\|^2 - K \mathcal H(p)`, and here
:math:`M = W / (1 - p)` because the mask is rescaled by :math:`1/(1-p)`) is

.. math::
    \mathcal L = \frac{\tau_s}{2}\,\mathrm{MSE} + \frac12 \log\frac{2\pi}{\tau_s}
    + \frac1N \sum_{l=1}^{2} \left[\frac{l^2}{2} \frac{\sum W_l^2}{1 - p_l}
    + K_l \bigl(p_l \log p_l + (1-p_l) \log(1-p_l)\bigr)\right],

with :math:`K_l` the layer's input width (inputs, then hidden units) and biases not penalized.
Multiplying by :math:`2/\tau_s` and dropping the constant gives what is minimized here,

.. math::
    J = \mathrm{MSE} + \sum_l \left[\lambda_w \frac{\sum W_l^2}{1-p_l}
    + \lambda_p K_l \bigl(p_l \log p_l + (1-p_l)\log(1-p_l)\bigr)\right], \quad
    \lambda_w = \frac{l^2}{\tau_s N},\ \lambda_p = \frac{2}{\tau_s N}

(:func:`dropkit.nn.concrete_regularizers` with ``precision=τ`` and ``y_std`` the training std
of the targets, ``l = 1e-2`` as the protocol).  The authors' code uses
:math:`\lambda_w = l^2/N`, :math:`\lambda_p = 2/N` with the data term
:math:`2 \cdot \mathrm{NLL} = \tau_s \mathrm{MSE} - \log\tau_s + \log 2\pi`: the same objective
times :math:`\tau_s`.  Adam is invariant to a constant factor of the loss (up to its ε), so
training on :math:`J` is training on the per-point negative ELBO.  (The protocol's weight decay
``l² (1-p) / (2 N τ)`` uses τ in original units on standardized targets, as the published
code does; the ELBO needs the precision of the units the network fits, hence :math:`\tau_s`.)

**Recipe** (mirrors :func:`dropkit.experiments.uci.protocol.run_splits`): the same splits,
validation (last 20 % of the training indices), standardization, epochs
(``100 x n_epochs``), batch 128, Adam (``torch.optim.Adam``, lr 1e-3), Glorot-uniform initial
weights and mini-batch order drawn from the same per-split seeds as the protocol's networks.
Instead of the ``(p, τ)`` grid, one concrete network per ``τ`` of the data set's grid
(``ConcreteConfig.extra_taus`` adds values) is trained on the first 80 %; per split the τ with the
highest validation mixture log-likelihood is kept (ties: the first), and a new network is
trained with it on the full training split and scored on the test split: MC RMSE, the mixture
log-likelihood in original units (:class:`~dropkit.experiments.uci.protocol._MixtureStats`),
the learned rates and the time.  All networks of a phase (splits x τ values) train together as
stacked weights (``baddbmm``) under one optimizer; the summed objective makes each network's
gradient its own and Adam is elementwise, so a network's trajectory does not depend on the
others in its batch (up to float rounding; tested).

**MC sampling** uses the concrete relaxation at the training temperature, not hard Bernoulli
masks at the learned ``p``: the relaxed mask distribution *is* the variational distribution the
ELBO was optimized for (the weights were fitted to masks in ``(0, 1)``, not to exact zeros), and
the authors' code samples the same way.  Validation uses ``val_samples = 1000`` passes by default
(the selection only compares three τ values per split, and 1000 passes put the Monte-Carlo error
of the mixture LL far below the differences between them); the test uses ``T = 10,000``.

**Randomness.**  Every draw is a pure function of a key: the uniforms of layer ``l`` at training
step ``k`` (counted over all epochs) of the network in row ``slot`` are row ``slot`` of
:func:`~dropkit.functional.concrete.concrete_uniforms` for shape ``(rows, B, width)`` with key
``make_key(seed, 4 * stream + l, k)``; MC block ``b`` uses stream ``4 * stream + 2 + l``, step
``b`` and shape ``(rows, passes * n, width)``.  ``stream`` is :data:`GRID_STREAM` for the
networks selecting τ and :data:`RETRAIN_STREAM` for the retrained ones.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as torch_F

import dropkit
from dropkit.experiments._console import format_mean_se, format_number
from dropkit.experiments.uci import report
from dropkit.experiments.uci.data import Split, UCIDataset, train_validation
from dropkit.experiments.uci.model import ShuffleGroups, glorot_kernels
from dropkit.experiments.uci.protocol import (
    LENGTHSCALE,
    Progress,
    _best_per_split,
    _MixtureStats,
    _PhaseClock,
    _seed,
    _stack,
)
from dropkit.functional.concrete import concrete_dropout
from dropkit.nn.concrete import concrete_regularizers

__all__ = [
    "GRID_STREAM",
    "RESULT_FIELDS",
    "RETRAIN_STREAM",
    "ConcreteConfig",
    "ConcreteMLP",
    "ConcreteSpec",
    "forward",
    "init_networks",
    "markdown_table",
    "objective",
    "predict_blocks",
    "run_splits",
    "summarize",
    "train_networks",
    "write_reports",
]

#: Engine stream family of the networks that select τ.
GRID_STREAM = 1 << 21
#: Engine stream family of the networks retrained on the full training split.
RETRAIN_STREAM = GRID_STREAM + 1
_GRID, _RETRAIN = 0, 1  # the protocol's seed phases: same initial weights and batch order
_TITLE = "Beyond the protocol: concrete dropout (learned drop rates)"


@dataclass(frozen=True)
class ConcreteConfig:
    """Settings of a concrete-dropout run; the defaults are the full recipe.

    Attributes:
        epochs_scale: epochs = ``round(epochs_multiplier x n_epochs x epochs_scale)`` (>= 1).
        epochs_multiplier: 100, as the grid-search protocol.
        samples: MC passes ``T`` on the test set (10,000).
        val_samples: MC passes on the validation set (1000; see the module docstring).
        batch_size, lr, lengthscale: 128, 1e-3, 1e-2.
        seed: seed of initial weights, batch order and noise.
        mc_block: passes per prediction block (memory bound; part of the noise layout).
        extra_taus: precisions added to the data set's τ values.
        temperature: relaxation temperature ``t`` (0.1).
        init_p: initial drop rate of every layer (0.1, the authors' code).
    """

    epochs_scale: float = 1.0
    epochs_multiplier: int = 100
    samples: int = 10_000
    val_samples: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    lengthscale: float = LENGTHSCALE
    seed: int = 0
    mc_block: int = 10
    extra_taus: tuple[float, ...] = field(default_factory=tuple)
    temperature: float = 0.1
    init_p: float = 0.1

    def __post_init__(self) -> None:
        for name in ("epochs_multiplier", "samples", "val_samples", "batch_size", "mc_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("epochs_scale", "lr", "lengthscale", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
        if not (isinstance(self.init_p, (int, float)) and 0.0 < self.init_p < 1.0):
            raise ValueError(f"init_p must be in (0, 1), got {self.init_p!r}")
        for tau in self.extra_taus:
            if not (math.isfinite(tau) and tau > 0):
                raise ValueError(f"extra_taus entries must be finite floats > 0, got {tau!r}")

    def epochs(self, dataset: UCIDataset) -> int:
        """Training epochs for ``dataset`` (4000 for the full recipe)."""
        return max(1, round(self.epochs_multiplier * dataset.n_epochs * self.epochs_scale))

    def taus(self, dataset: UCIDataset) -> tuple[float, ...]:
        """The τ values: the data set's, then the extra ones not already in it."""
        return tuple(dataset.tau_values) + tuple(t for t in self.extra_taus if t not in dataset.tau_values)

    def is_full_recipe(self) -> bool:
        """Whether the run uses the full recipe (protocol epochs, batch, lr, T = 10,000)."""
        return (
            self.epochs_scale == 1.0
            and self.epochs_multiplier == 100
            and self.samples == 10_000
            and self.batch_size == 128
            and self.lr == 1e-3
            and self.lengthscale == LENGTHSCALE
            and self.temperature == 0.1
            and not self.extra_taus
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["extra_taus"] = list(self.extra_taus)
        return out


@dataclass(frozen=True)
class ConcreteSpec:
    """What defines one network of a batch.

    Attributes:
        data_index: which data set of the stacked ``x``/``y`` it trains on.
        weight_regularizer: ``λ_w`` (see :func:`dropkit.nn.concrete_regularizers`).
        dropout_regularizer: ``λ_p``.
        init_seed: seed of the initial weights.
        shuffle_seed: seed of the mini-batch order (networks sharing it share ``data_index``).
        slot: its row in the noise of the batch (distinct within a batch).
    """

    data_index: int
    weight_regularizer: float
    dropout_regularizer: float
    init_seed: int
    shuffle_seed: int
    slot: int

    def __post_init__(self) -> None:
        for name in ("weight_regularizer", "dropout_regularizer"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        for name in ("data_index", "slot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclass
class ConcreteMLP:
    """Stacked parameters of ``G`` networks: kernels ``w1 (G, in, H)``, ``w2 (G, H, 1)``, biases
    ``b1 (G, 1, H)``, ``b2 (G, 1, 1)`` and the rate logits ``logit1``, ``logit2`` ``(G, 1, 1)`` of
    the input and hidden concrete dropout."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    logit1: torch.Tensor
    logit2: torch.Tensor

    def parameters(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2, self.logit1, self.logit2]

    def rates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned drop rates ``(p_input, p_hidden)``, each ``(G,)``."""
        return torch.sigmoid(self.logit1.detach()).view(-1), torch.sigmoid(self.logit2.detach()).view(-1)


def init_networks(
    specs: Sequence[ConcreteSpec], n_in: int, n_hidden: int, init_p: float = 0.1
) -> ConcreteMLP:
    """Glorot-uniform kernels, zero biases, rates ``init_p``: the protocol's initial weights for
    the same ``init_seed``."""
    if not 0.0 < init_p < 1.0:
        raise ValueError(f"init_p must be in (0, 1), got {init_p!r}")
    w1, w2 = glorot_kernels([s.init_seed for s in specs], n_in, n_hidden)
    count = len(specs)
    logit = math.log(init_p) - math.log1p(-init_p)
    return ConcreteMLP(
        w1,
        torch.zeros(count, 1, n_hidden),
        w2,
        torch.zeros(count, 1, 1),
        torch.full((count, 1, 1), logit),
        torch.full((count, 1, 1), logit),
    )


def _drop(
    x: torch.Tensor, logit: torch.Tensor, key: torch.Tensor, slots: torch.Tensor | None, t: float
) -> torch.Tensor:
    """Concrete dropout of stacked ``x: (G, R, width)``, network ``g`` reading noise row
    ``slots[g]`` (``None``: rows ``0 .. G-1``)."""
    if slots is None:
        return concrete_dropout(x, logit, True, temperature=t, seed=key)
    rows = int(slots.max()) + 1
    padded = x.new_zeros((rows, *x.shape[1:])).index_copy(0, slots, x)
    logits = logit.new_zeros((rows, 1, 1)).index_copy(0, slots, logit)
    return concrete_dropout(padded, logits, True, temperature=t, seed=key)[slots]


def forward(
    model: ConcreteMLP,
    x: torch.Tensor,
    keys: tuple[torch.Tensor, torch.Tensor],
    *,
    temperature: float = 0.1,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """One stochastic pass of the stacked networks: ``x (G, R, in) -> (G, R)``.

    ``keys`` are the engine keys of the input and hidden noise; ``slots`` the noise rows
    (``None``: network ``g`` reads row ``g``).
    """
    xd = _drop(x, model.logit1, keys[0], slots, temperature)
    h = torch.baddbmm(model.b1, xd, model.w1).relu()
    hd = _drop(h, model.logit2, keys[1], slots, temperature)
    return torch.baddbmm(model.b2, hd, model.w2).squeeze(-1)


def _neg_entropy(logit: torch.Tensor) -> torch.Tensor:
    """``p log p + (1-p) log(1-p)`` for ``p = sigmoid(logit)``, stable for any logit."""
    p = torch.sigmoid(logit)
    return p * torch_F.logsigmoid(logit) + (1.0 - p) * torch_F.logsigmoid(-logit)


def objective(
    model: ConcreteMLP,
    out: torch.Tensor,
    y: torch.Tensor,
    weight_regularizer: torch.Tensor,
    dropout_regularizer: torch.Tensor,
) -> torch.Tensor:
    r"""Per-network :math:`J` of the module docstring, ``(G,)``: the mini-batch MSE plus, per
    layer, :math:`\lambda_w \sum W^2 / (1-p) + \lambda_p K (p\log p + (1-p)\log(1-p))`.

    Args:
        model: the networks (``K`` = ``w1.shape[1]``, then ``w2.shape[1]``).
        out: predictions ``(G, B)``; y: standardized targets ``(G, B)``.
        weight_regularizer, dropout_regularizer: ``(G,)``.
    """
    mse = (out - y).square().mean(1)
    total = mse
    for w, logit in ((model.w1, model.logit1), (model.w2, model.logit2)):
        logit = logit.view(-1)
        keep = torch.sigmoid(-logit)  # 1 - p
        k = w.shape[1]
        total = total + weight_regularizer * w.square().sum((1, 2)) / keep
        total = total + dropout_regularizer * k * _neg_entropy(logit)
    return total


def _slots(specs: Sequence[ConcreteSpec]) -> torch.Tensor | None:
    slots = [s.slot for s in specs]
    if len(set(slots)) != len(slots):
        raise ValueError(f"specs must have distinct slots, got {slots}")
    return None if slots == list(range(len(slots))) else torch.tensor(slots, dtype=torch.long)


def train_networks(
    specs: Sequence[ConcreteSpec],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_hidden: int,
    epochs: int,
    seed: int,
    stream: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    temperature: float = 0.1,
    init_p: float = 0.1,
    on_epoch: Callable[[int], None] | None = None,
) -> ConcreteMLP:
    """Train every network of ``specs`` together, minimizing the sum of their objectives.

    Args:
        specs: the networks.
        x: stacked standardized inputs ``(S, N, in)``; ``spec.data_index`` picks the set.
        y: stacked standardized targets ``(S, N)``.
        n_hidden: hidden units.
        epochs: passes over the data.
        seed: experiment seed (noise keys).
        stream: engine stream family of the noise (see the module docstring).
        batch_size, lr: mini-batch size and Adam learning rate.
        temperature, init_p: concrete relaxation temperature and initial rates.
        on_epoch: called with the number of finished epochs after each epoch.

    Returns:
        The trained :class:`ConcreteMLP` (networks in ``specs`` order, detached).
    """
    if x.dim() != 3 or y.dim() != 2 or x.shape[:2] != y.shape:
        raise ValueError(f"x must be (S, N, in) and y (S, N), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not specs:
        raise ValueError("specs must not be empty")
    for name, value in (("n_hidden", n_hidden), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if max(s.data_index for s in specs) >= x.shape[0]:
        raise ValueError(f"data_index must be < {x.shape[0]} (the stacked data sets)")
    slots = _slots(specs)
    n = x.shape[1]
    x, y = x.float(), y.float()
    model = init_networks(specs, x.shape[2], n_hidden, init_p)
    params = model.parameters()
    for t in params:
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    wr = torch.tensor([s.weight_regularizer for s in specs], dtype=torch.float32)
    dr = torch.tensor([s.dropout_regularizer for s in specs], dtype=torch.float32)

    order = ShuffleGroups.of(specs, "networks")
    xg, yg = x[order.data_of_group], y[order.data_of_group]
    rows = torch.arange(len(order.generators)).unsqueeze(1)
    step = 0
    for epoch in range(epochs):
        perms = order.permutations(n)
        for start in range(0, n, batch_size):
            idx = perms[:, start : start + batch_size]
            xb, yb = xg[rows, idx][order.group_of], yg[rows, idx][order.group_of]
            keys = (dropkit.make_key(seed, 4 * stream, step), dropkit.make_key(seed, 4 * stream + 1, step))
            out = forward(model, xb, keys, temperature=temperature, slots=slots)
            loss = objective(model, out, yb, wr, dr).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return ConcreteMLP(*(t.detach() for t in params))


def predict_blocks(
    model: ConcreteMLP,
    specs: Sequence[ConcreteSpec],
    x: torch.Tensor,
    *,
    samples: int,
    seed: int,
    stream: int,
    block: int,
    temperature: float = 0.1,
    consume: Callable[[torch.Tensor], None],
) -> None:
    """MC predictions with the concrete relaxation, ``block`` passes at a time.

    Args:
        model, specs: the trained networks and their specs (same order).
        x: stacked standardized inputs ``(S, n, in)``; ``spec.data_index`` picks the set.
        samples: total passes ``T``; seed, stream: the noise keys; block: passes per block.
        temperature: the relaxation temperature (the training one).
        consume: called with each block of standardized predictions ``(G, t, n)``.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    slots = _slots(specs)
    count, n, n_in = len(specs), x.shape[1], x.shape[2]
    data = torch.tensor([s.data_index for s in specs], dtype=torch.long)
    xs = x.float()[data].unsqueeze(1)  # (G, 1, n, in)
    with torch.no_grad():
        for b, start in enumerate(range(0, samples, block)):
            t = min(block, samples - start)
            xin = xs.expand(count, t, n, n_in).reshape(count, t * n, n_in)
            keys = (dropkit.make_key(seed, 4 * stream + 2, b), dropkit.make_key(seed, 4 * stream + 3, b))
            out = forward(model, xin, keys, temperature=temperature, slots=slots)
            consume(out.view(count, t, n))


def _evaluate(
    model: ConcreteMLP,
    specs: list[ConcreteSpec],
    x_eval: torch.Tensor,
    stats: _MixtureStats,
    y_mean: torch.Tensor,
    y_std: torch.Tensor,
    config: ConcreteConfig,
    samples: int,
    stream: int,
    on_passes: Callable[[int], None],
) -> None:
    done = [0]

    def consume(block: torch.Tensor) -> None:
        stats.update(block.to(torch.float64) * y_std.view(-1, 1, 1) + y_mean.view(-1, 1, 1))
        done[0] += block.shape[1]
        on_passes(done[0])

    predict_blocks(
        model,
        specs,
        x_eval,
        samples=samples,
        seed=config.seed,
        stream=stream,
        block=config.mc_block,
        temperature=config.temperature,
        consume=consume,
    )


def run_splits(
    dataset: UCIDataset,
    splits: Sequence[Split],
    config: ConcreteConfig,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Run the concrete-dropout variant on ``splits`` of ``dataset``, all trained together.

    Args:
        dataset: the data set.
        splits: the splits to run (each one's result is independent of the others).
        config: the settings.
        progress: called as ``progress(phase, done, total)`` with phases ``"grid"``,
            ``"validate"``, ``"retrain"``, ``"test"`` (epochs or passes), as the protocol.

    Returns:
        One result dict per split (JSON-ready), in the order of ``splits``.
    """
    if not isinstance(config, ConcreteConfig):
        raise TypeError(f"config must be a ConcreteConfig, got {type(config).__name__}")
    if not splits:
        return []
    taus = config.taus(dataset)
    n_taus = len(taus)
    epochs = config.epochs(dataset)
    n_splits = len(splits)
    report_ = progress or (lambda phase, done, total: None)
    clock = _PhaseClock()
    train_kw: dict[str, Any] = {
        "n_hidden": dataset.n_hidden,
        "epochs": epochs,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "temperature": config.temperature,
        "init_p": config.init_p,
    }

    # --- one network per (split, τ) on the first 80 % ----------------------------------------
    parts = [train_validation(s.train) for s in splits]
    x_tr, y_tr, x_val, y_val, sc_grid = _stack(dataset, [a for a, _ in parts], [b for _, b in parts])
    n_fit = x_tr.shape[1]
    specs = []
    for k, split in enumerate(splits):
        for ti, tau in enumerate(taus):
            wr, dr = concrete_regularizers(config.lengthscale, n_fit, precision=tau, y_std=sc_grid[k].y_std)
            specs.append(
                ConcreteSpec(
                    data_index=k,
                    weight_regularizer=wr,
                    dropout_regularizer=dr,
                    init_seed=_seed(config.seed, _GRID, split.index),
                    shuffle_seed=_seed(config.seed, _GRID, split.index, 1),
                    slot=split.index * n_taus + ti,
                )
            )
    clock.start()
    model = train_networks(
        specs, x_tr, y_tr, stream=GRID_STREAM, on_epoch=lambda e: report_("grid", e, epochs), **train_kw
    )
    clock.stop("grid_train")

    clock.start()
    split_of = [k for k in range(n_splits) for _ in taus]
    tau_of = [ti for _ in splits for ti in range(n_taus)]
    val_stats = _MixtureStats(y_val[torch.tensor(split_of)], torch.tensor([[taus[ti]] for ti in tau_of]))
    y_mean = torch.tensor([sc_grid[k].y_mean for k in split_of], dtype=torch.float64)
    y_std = torch.tensor([sc_grid[k].y_std for k in split_of], dtype=torch.float64)
    _evaluate(
        model,
        specs,
        x_val,
        val_stats,
        y_mean,
        y_std,
        config,
        config.val_samples,
        GRID_STREAM,
        lambda d: report_("validate", d, config.val_samples),
    )
    val_ll = val_stats.log_likelihood()[:, 0]
    grid_p1, grid_p2 = model.rates()
    clock.stop("grid_validate")
    chosen = _best_per_split(val_ll, split_of, n_splits)

    # --- retrain with the chosen τ on the full training split ---------------------------------
    x_full, y_full, x_test, y_test, sc_full = _stack(
        dataset, [s.train for s in splits], [s.test for s in splits]
    )
    n_full = x_full.shape[1]
    retrain_specs = []
    for k, split in enumerate(splits):
        wr, dr = concrete_regularizers(
            config.lengthscale, n_full, precision=taus[tau_of[chosen[k]]], y_std=sc_full[k].y_std
        )
        retrain_specs.append(
            ConcreteSpec(
                data_index=k,
                weight_regularizer=wr,
                dropout_regularizer=dr,
                init_seed=_seed(config.seed, _RETRAIN, split.index),
                shuffle_seed=_seed(config.seed, _RETRAIN, split.index, 1),
                slot=split.index,
            )
        )
    clock.start()
    final = train_networks(
        retrain_specs,
        x_full,
        y_full,
        stream=RETRAIN_STREAM,
        on_epoch=lambda e: report_("retrain", e, epochs),
        **train_kw,
    )
    clock.stop("retrain")

    clock.start()
    chosen_tau = torch.tensor([taus[tau_of[g]] for g in chosen], dtype=torch.float64)
    test_stats = _MixtureStats(y_test, chosen_tau.unsqueeze(1))
    _evaluate(
        final,
        retrain_specs,
        x_test,
        test_stats,
        torch.tensor([sc.y_mean for sc in sc_full], dtype=torch.float64),
        torch.tensor([sc.y_std for sc in sc_full], dtype=torch.float64),
        config,
        config.samples,
        RETRAIN_STREAM,
        lambda d: report_("test", d, config.samples),
    )
    clock.stop("test")
    test_ll = test_stats.log_likelihood()[:, 0]
    rmse = test_stats.rmse()
    extras = test_stats.gaussian(chosen_tau)
    p1, p2 = final.rates()

    per_split_seconds, per_split_cpu = clock.per_split(n_splits)
    results = []
    for k, split in enumerate(splits):
        ti = tau_of[chosen[k]]
        members = [g for g in range(len(specs)) if split_of[g] == k]
        results.append(
            {
                "dataset": dataset.name,
                "split": split.index,
                "method": "concrete_dropout",
                "n_train": len(split.train),
                "n_grid_train": n_fit,
                "n_validation": x_val.shape[1],
                "n_test": len(split.test),
                "epochs": epochs,
                "samples": config.samples,
                "val_samples": config.val_samples,
                "tau": taus[ti],
                "validation_ll": float(val_ll[chosen[k]]),
                "rmse": float(rmse[k]),
                "ll": float(test_ll[k]),
                "ll_gaussian": float(extras["ll_gaussian"][k]),
                "picp95": float(extras["picp95"][k]),
                "mpiw95": float(extras["mpiw95"][k]),
                "p_input": float(p1[k]),
                "p_hidden": float(p2[k]),
                "grid": [
                    {
                        "tau": taus[tau_of[g]],
                        "validation_ll": float(val_ll[g]),
                        "p_input": float(grid_p1[g]),
                        "p_hidden": float(grid_p2[g]),
                    }
                    for g in members
                ],
                "tau_at_grid_edge": ti in (0, n_taus - 1),
                "seconds": per_split_seconds,
                "cpu_seconds": per_split_cpu,
            }
        )
    return results


# --- reports -------------------------------------------------------------------------------------

_CSV_FIELDS = (
    "dataset",
    "split",
    "tau",
    "validation_ll",
    "rmse",
    "ll",
    "ll_gaussian",
    "picp95",
    "mpiw95",
    "p_input",
    "p_hidden",
    "tau_at_grid_edge",
    "epochs",
    "samples",
    "val_samples",
)
#: Keys of a concrete-dropout split result and their JSON types, checked when a run resumes.
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    **{k: v for k, v in report.RESULT_FIELDS.items() if k not in ("p", "tau_learned", "ll_tau_learned")},
    "val_samples": (int,),
    "p_input": (int, float),
    "p_hidden": (int, float),
}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`dropkit.experiments.uci.report.summarize` plus the learned rates (mean ± SE)."""
    out = report.summarize(results)
    for key in ("p_input", "p_hidden"):
        out[key], out[f"{key}_se"] = report.mean_se([r[key] for r in results])
    return out


def markdown_table(summaries: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The concrete-dropout numbers beside the published grid-search protocol's (with sources),
    to significant figures."""

    def fmt(s: dict[str, Any], key: str) -> str:
        return format_mean_se(s[key], s[key + "_se"]) if key in s else "-"

    published, notes = report.published_columns(s["dataset"] for s in summaries)
    lines = [
        f"## {_TITLE}",
        "",
        "Not the published protocol: the drop rates are learned (Gal, Hron & Kendall 2017), τ is "
        "selected per split by validation log-likelihood. Published numbers are the grid-search "
        "protocol's.",
        "",
        "| data set | splits | RMSE (concrete) | RMSE (published protocol) | test LL (concrete) "
        "| test LL (published protocol) | p input | p hidden | τ at grid edge | time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        pub_rmse, pub_ll = published[s["dataset"]]
        name = report.PUBLISHED_NAMES.get(s["dataset"], s["dataset"])
        lines.append(
            f"| {name} | {s['n_splits']} | {fmt(s, 'rmse')} | {pub_rmse} | {fmt(s, 'll')} | {pub_ll} | "
            f"{fmt(s, 'p_input')} | {fmt(s, 'p_hidden')} | "
            f"{s['tau_at_grid_edge']}/{s['n_splits']} | {format_number(s['seconds'], 2)} |"
        )
    note = (
        "Full recipe (protocol epochs, batch, lr; T = 10,000)."
        if settings.get("full_recipe")
        else "SHORTENED or modified settings: " + json.dumps(settings.get("config"))
    )
    return "\n".join([*lines, "", note, "", *([*notes, ""] if notes else [])])


def write_reports(
    output: str | Path, results: dict[str, list[dict[str, Any]]], settings: dict[str, Any]
) -> None:
    """Write ``results.csv``, ``summary.json``, ``summary.csv`` and ``summary.md`` into ``output``
    (the CLI passes ``OUT/concrete``), atomically."""
    output = Path(output)
    rows = [r for name in results for r in sorted(results[name], key=lambda r: r["split"])]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    report.write_atomic(output / "results.csv", buffer.getvalue())
    summaries = [summarize(results[name]) for name in results if results[name]]
    payload = {"title": _TITLE, "settings": settings, "summary": summaries}
    report.write_atomic(output / "summary.json", json.dumps(payload, indent=2) + "\n")
    buffer = io.StringIO()
    fields = sorted({k for s in summaries for k in s}, key=lambda k: (k != "dataset", k))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summaries)
    report.write_atomic(output / "summary.csv", buffer.getvalue())
    report.write_atomic(output / "summary.md", markdown_table(summaries, settings))
