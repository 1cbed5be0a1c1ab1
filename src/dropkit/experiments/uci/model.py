"""Many small MC-dropout regression networks trained as one vectorized model.

The benchmark network (Gal & Ghahramani 2016) is
``input -> Dropout(p) -> Dense(H, ReLU) -> Dropout(p) -> Dense(1)``.  ``G`` such networks (the
configurations of a grid, for several splits) are stored as stacked weights
``W1: (G, in, H)``, ``b1: (G, 1, H)``, ``W2: (G, H, 1)``, ``b2: (G, 1, 1)`` and run with
``torch.baddbmm``; each model has its own dropout rate and L2 coefficient.  The summed loss
makes every model's gradient independent of the others, and Adam is elementwise, so a model
trained in a batch follows the same trajectory as the same model trained alone (up to
floating-point rounding of the batched matmuls).

What makes a model's run reproducible on its own is its :class:`ModelSpec`:

* **initial weights**: Glorot-uniform kernels (Keras' default), zero biases, drawn from a
  ``torch.Generator`` seeded with ``spec.init_seed``;
* **mini-batch order**: each epoch ``torch.randperm(N, generator=g)`` with ``g`` seeded once
  with ``spec.shuffle_seed``; batches of ``batch_size`` in that order, the last one smaller
  (Keras ``fit(shuffle=True)``).  Models with the same ``shuffle_seed`` (the configurations of
  one split) see the same batches;
* **dropout masks**: dropkit's counter-based engine (:func:`dropkit.functional.dropout` with a
  key from :func:`dropkit.make_key`).  At training step ``k`` (counted from 0 over all epochs)
  the mask of layer ``l`` (0: inputs, 1: hidden units) of a model is row ``spec.slot`` of the
  engine's mask for a tensor of shape ``(spec.slot + 1, B, width)`` with key
  ``make_key(seed, 4 * spec.mask_stream + l, k)``; MC prediction block ``b`` uses stream
  ``4 * spec.mask_stream + 2 + l``, step ``b`` and shape ``(slot + 1, block, n, width)``.
  Models sharing a ``mask_stream`` must share ``p`` and have distinct slots; one engine call
  then draws the masks of all of them.

Two implementations run this recipe: the numba kernels of :mod:`dropkit.experiments.uci.fused`
(the default when numba is installed: one task per network, nothing of size ``G x B x H`` in
memory; at Wine's size 1.3-1.9x faster training and 7-9x faster MC prediction than the torch
path on 1-2 threads, ``benchmarks/bench_uci.py``)
and the torch path below (stacked tensors, ``baddbmm``).  They draw the same masks and agree to
float32 rounding; only the order of the float32 sums differs.

Adam follows Keras 1 (the benchmark's framework): ``lr_t = lr sqrt(1 - β2^t) / (1 - β1^t)``,
``w -= lr_t m / (sqrt(v) + ε)`` with ``β1 = 0.9, β2 = 0.999, ε = 1e-8``.  The loss of one model
is the mini-batch MSE plus ``λ (||W1||² + ||W2||²)`` (Keras ``l2(λ)`` on both kernels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

import dropkit
from dropkit.engine.numerics import drop_threshold, inverted_scale
from dropkit.functional import dropout

__all__ = [
    "BatchedMLP",
    "MaskPlan",
    "ModelSpec",
    "ShuffleGroups",
    "fused_available",
    "glorot_kernels",
    "init_models",
    "predict_blocks",
    "train_models",
]

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class ModelSpec:
    """What defines one network of a batch (see the module docstring).

    Attributes:
        data_index: which data set of the stacked ``x``/``y`` it trains on.
        p: dropout rate of the inputs and of the hidden units.
        weight_decay: ``λ`` of the loss term ``λ (||W1||² + ||W2||²)``.
        init_seed: seed of the initial weights.
        shuffle_seed: seed of the mini-batch order.
        mask_stream: engine stream family of its dropout masks (``< 2**30``).
        slot: its row in the masks of that stream.
    """

    data_index: int
    p: float
    weight_decay: float
    init_seed: int
    shuffle_seed: int
    mask_stream: int
    slot: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {self.p!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a finite float >= 0, got {self.weight_decay!r}")
        if not 0 <= self.mask_stream < 1 << 30:
            raise ValueError(f"mask_stream must be in [0, 2**30), got {self.mask_stream!r}")
        if self.slot < 0 or self.data_index < 0:
            raise ValueError(f"slot and data_index must be >= 0, got {self.slot!r}, {self.data_index!r}")


@dataclass
class BatchedMLP:
    """Stacked weights of ``G`` networks (float32)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def parameters(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]

    def select(self, index: Sequence[int]) -> BatchedMLP:
        """A copy holding only the models at ``index``."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return BatchedMLP(*(t.detach()[idx].clone() for t in self.parameters()))


def glorot_kernels(init_seeds: Sequence[int], n_in: int, n_hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Glorot-uniform kernels (``U(±sqrt(6 / (fan_in + fan_out)))``, Keras' default) per seed:
    ``W1: (G, in, H)`` then ``W2: (G, H, 1)`` from one ``torch.Generator`` seeded with each seed."""
    w1, w2 = [], []
    a1 = math.sqrt(6.0 / (n_in + n_hidden))
    a2 = math.sqrt(6.0 / (n_hidden + 1))
    for init_seed in init_seeds:
        g = torch.Generator().manual_seed(init_seed)
        w1.append((torch.rand(n_in, n_hidden, generator=g, dtype=torch.float64) * 2 - 1) * a1)
        w2.append((torch.rand(n_hidden, 1, generator=g, dtype=torch.float64) * 2 - 1) * a2)
    return torch.stack(w1).float(), torch.stack(w2).float()


def init_models(specs: Sequence[ModelSpec], n_in: int, n_hidden: int) -> BatchedMLP:
    """:func:`glorot_kernels` of each spec's ``init_seed`` and zero biases."""
    w1, w2 = glorot_kernels([s.init_seed for s in specs], n_in, n_hidden)
    count = len(specs)
    return BatchedMLP(w1, torch.zeros(count, 1, n_hidden), w2, torch.zeros(count, 1, 1))


class ShuffleGroups(NamedTuple):
    """Mini-batch order (Keras ``fit(shuffle=True)``): networks with the same ``shuffle_seed`` form
    one group that sees the same batches; each epoch, group ``u`` takes the next
    ``torch.randperm(N)`` of its own generator, seeded once with the group's seed.

    Attributes:
        generators: one per group, groups in increasing ``shuffle_seed`` order.
        group_of: the group of each network, ``(G,)``.
        data_of_group: the stacked data set each group trains on, ``(U,)``.
    """

    generators: list[torch.Generator]
    group_of: torch.Tensor
    data_of_group: torch.Tensor

    @classmethod
    def of(cls, specs: Sequence[Any], kind: str = "models") -> ShuffleGroups:
        """The groups of ``specs`` (anything with ``shuffle_seed`` and ``data_index``); ValueError
        when a group mixes data sets (``kind`` names the specs in the message)."""
        shuffle_seeds = sorted({s.shuffle_seed for s in specs})
        group_data: dict[int, int] = {}
        for s in specs:
            if group_data.setdefault(s.shuffle_seed, s.data_index) != s.data_index:
                raise ValueError(f"{kind} with shuffle_seed {s.shuffle_seed} must share data_index")
        return cls(
            [torch.Generator().manual_seed(k) for k in shuffle_seeds],
            torch.tensor([shuffle_seeds.index(s.shuffle_seed) for s in specs], dtype=torch.long),
            torch.tensor([group_data[k] for k in shuffle_seeds], dtype=torch.long),
        )

    def permutations(self, n: int) -> torch.Tensor:
        """The next epoch's row order of every group, ``(U, n)``."""
        return torch.stack([torch.randperm(n, generator=g) for g in self.generators])


class MaskPlan:
    """Draws the scaled dropout masks (values 0 or ``1/(1-p)``) of a batch of models.

    Args:
        specs: the models, in batch order.
        seed: the experiment seed (the ``seed`` of every key).
    """

    def __init__(self, specs: Sequence[ModelSpec], seed: int) -> None:
        self.seed = seed
        self.count = len(specs)
        groups: dict[int, list[int]] = {}
        for g, spec in enumerate(specs):
            groups.setdefault(spec.mask_stream, []).append(g)
        self.groups = []
        for stream, members in sorted(groups.items()):
            ps = {specs[g].p for g in members}
            if len(ps) != 1:
                raise ValueError(f"models of mask_stream {stream} must share p, got {sorted(ps)}")
            slots = [specs[g].slot for g in members]
            if len(set(slots)) != len(slots):
                raise ValueError(f"models of mask_stream {stream} must have distinct slots, got {slots}")
            identity = members == list(range(self.count)) and slots == list(range(self.count))
            contiguous = members == list(range(members[0], members[0] + len(members)))
            dense = slots == list(range(len(slots)))
            self.groups.append(
                (
                    stream,
                    ps.pop(),
                    torch.tensor(members, dtype=torch.long),
                    torch.tensor(slots, dtype=torch.long),
                    max(slots) + 1,
                    identity,
                    contiguous,
                    dense,
                )
            )
        self._ones: dict[tuple[int, ...], torch.Tensor] = {}

    def _ones_of(self, shape: tuple[int, ...]) -> torch.Tensor:
        ones = self._ones.get(shape)
        if ones is None:
            if len(self._ones) > 16:
                self._ones.clear()
            ones = self._ones[shape] = torch.ones(shape)
        return ones

    def masks(self, stream_offset: int, step: int, shape: Sequence[int]) -> torch.Tensor:
        """Masks of shape ``(G, *shape)`` for engine stream ``4 * mask_stream + stream_offset``."""
        shape = tuple(int(s) for s in shape)
        out: torch.Tensor | None = None
        for stream, p, members, slots, rows, identity, contiguous, dense in self.groups:
            key = dropkit.make_key(self.seed, 4 * stream + stream_offset, step)
            drawn = dropout(self._ones_of((rows, *shape)), p, seed=key)
            if identity:
                return drawn.clone() if p == 0.0 else drawn  # p = 0: the cached ones, shared
            if out is None:
                out = torch.empty((self.count, *shape))
            if contiguous:
                first = int(members[0])
                out[first : first + len(members)] = drawn if dense else drawn[slots]
            else:
                out[members] = drawn if dense else drawn[slots]
        if out is None:  # no models
            return torch.empty((0, *shape))
        return out


def _hidden(model: BatchedMLP, x: torch.Tensor, m2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden layer on dropped-out inputs ``x: (G, R, in)``: ``(h, a)`` with ``h = a * pre`` and
    ``a = m2 * [pre > 0]`` (the derivative of ``h`` with respect to the pre-activation)."""
    pre = torch.baddbmm(model.b1, x, model.w1)
    a = pre.sign().clamp_min_(0.0).mul_(m2)  # [pre > 0] * m2; sign beats masked_fill/where on the CPU
    return pre.mul_(a), a


def _output(model: BatchedMLP, h: torch.Tensor) -> torch.Tensor:
    """``(G, R, H) -> (G, R)``; an elementwise product and a sum (far faster than a bmm with one
    output column on the CPU)."""
    return (h * model.w2.transpose(1, 2)).sum(-1).add_(model.b2.view(-1, 1))


def fused_available() -> bool:
    """Whether the numba kernels of :mod:`dropkit.experiments.uci.fused` can run (``[fast]`` extra)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _use_fused(fused: bool | None) -> bool:
    if fused is None:
        return fused_available()
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool or None, got {type(fused).__name__} ({fused!r})")
    if fused and not fused_available():
        raise ValueError("fused=True needs numba (pip install 'dropkit[fast]'), which is not installed")
    return fused


class _MaskArrays:
    """Per-network mask constants for the fused kernels (see :mod:`dropkit.experiments.uci.fused`)."""

    def __init__(self, specs: Sequence[ModelSpec]) -> None:
        self.streams = np.array([4 * s.mask_stream for s in specs], dtype=np.int64)
        self.slots = np.array([s.slot for s in specs], dtype=np.int64)
        self.thresholds = np.array([drop_threshold(s.p) for s in specs], dtype=np.int64)
        # The engine multiplies kept values by its inverted scale rounded once to float32.
        self.scales = np.array([inverted_scale(s.p) for s in specs], dtype=np.float32)
        self.data_index = np.array([s.data_index for s in specs], dtype=np.int64)


def train_models(
    specs: Sequence[ModelSpec],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_hidden: int,
    epochs: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    on_epoch: Callable[[int], None] | None = None,
    fused: bool | None = None,
) -> BatchedMLP:
    """Train every model of ``specs`` together (see the module docstring for the exact recipe).

    Args:
        specs: the models.
        x: stacked standardized inputs ``(S, N, in)``; ``spec.data_index`` picks the set.
        y: stacked standardized targets ``(S, N)``.
        n_hidden: hidden units.
        epochs: passes over the data.
        seed: experiment seed (masks).
        batch_size: mini-batch size.
        lr: Adam learning rate.
        on_epoch: called with the number of finished epochs after each epoch.
        fused: run the numba kernel of :mod:`~dropkit.experiments.uci.fused` (same masks and
            recipe, float32 sums in another order); ``None``: when numba is installed.

    Returns:
        The trained :class:`BatchedMLP` (models in ``specs`` order).
    """
    use_fused = _use_fused(fused)
    if x.dim() != 3 or y.dim() != 2 or x.shape[:2] != y.shape:
        raise ValueError(f"x must be (S, N, in) and y (S, N), got {tuple(x.shape)} and {tuple(y.shape)}")
    if not specs:
        raise ValueError("specs must not be empty")
    count, n, n_in = len(specs), x.shape[1], x.shape[2]
    x = x.float()
    y = y.float()
    model = init_models(specs, x.shape[2], n_hidden)
    params = model.parameters()
    lam = torch.tensor([s.weight_decay for s in specs], dtype=torch.float32)
    plan = MaskPlan(specs, seed)

    order = ShuffleGroups.of(specs)
    if use_fused:
        _train_fused(specs, model, x, y, order, lam, epochs, seed, batch_size, lr, on_epoch)
        return model
    group_of_model = order.group_of
    xg, yg = x[order.data_of_group], y[order.data_of_group]  # (U, N, in), (U, N)
    groups = len(order.generators)
    # Fast path: models laid out as (outer, group, inner), so a batch broadcasts without a gather.
    inner = int((group_of_model == group_of_model[0]).int().cumprod(0).sum())
    outer = count // (groups * inner)
    pattern = torch.arange(groups).repeat_interleave(inner).repeat(outer)
    broadcast = outer * groups * inner == count and bool(torch.equal(pattern, group_of_model))

    m_state = [torch.zeros_like(t) for t in params]
    v_state = [torch.zeros_like(t) for t in params]
    beta1, beta2 = _ADAM_BETAS
    step = 0
    rows = torch.arange(groups).unsqueeze(1)
    for epoch in range(epochs):
        perms = order.permutations(n)  # (U, N)
        for start in range(0, n, batch_size):
            idx = perms[:, start : start + batch_size]
            xb, yb = xg[rows, idx], yg[rows, idx]
            b = idx.shape[1]
            m1 = plan.masks(0, step, (b, n_in))
            m2 = plan.masks(1, step, (b, n_hidden))
            if broadcast:
                xm = (m1.view(outer, groups, inner, b, n_in) * xb.view(1, groups, 1, b, n_in)).view(m1.shape)
            else:
                xm = xb[group_of_model] * m1
            h, act = _hidden(model, xm, m2)
            out = _output(model, h)
            # Manual backward of sum_g [mean_b (out - y)^2 + lam_g (|W1|^2 + |W2|^2)].
            if broadcast:
                dout = (out.view(outer, groups, inner, b) - yb.view(1, groups, 1, b)).view(out.shape)
            else:
                dout = out - yb[group_of_model]
            dout.mul_(2.0 / b)  # (G, B)
            g_b2 = dout.sum(1).view(-1, 1, 1)
            g_w2 = (h * dout.unsqueeze(-1)).sum(1).unsqueeze(-1)  # (G, H, 1)
            dpre = act.mul_(dout.unsqueeze(-1)).mul_(model.w2.transpose(1, 2))  # (G, B, H)
            g_b1 = dpre.sum(1, keepdim=True)
            g_w1 = torch.bmm(xm.transpose(1, 2), dpre)
            decay = (2.0 * lam).view(-1, 1, 1)
            g_w1.addcmul_(decay, model.w1)
            g_w2.addcmul_(decay, model.w2)
            grads = (g_w1, g_b1, g_w2, g_b2)
            step += 1
            lr_t = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
            for p_, g_, m_, v_ in zip(params, grads, m_state, v_state, strict=True):
                m_.mul_(beta1).add_(g_, alpha=1.0 - beta1)
                v_.mul_(beta2).addcmul_(g_, g_, value=1.0 - beta2)
                p_.addcdiv_(m_, v_.sqrt().add_(_ADAM_EPS), value=-lr_t)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return model


def _train_fused(
    specs: Sequence[ModelSpec],
    model: BatchedMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    order: ShuffleGroups,
    lam: torch.Tensor,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    on_epoch: Callable[[int], None] | None,
) -> None:
    """:func:`train_models` on the numba kernel; updates ``model`` in place."""
    from dropkit.experiments.uci import fused as kernels

    count, n, n_in = len(specs), x.shape[1], x.shape[2]
    n_hidden = model.w1.shape[2]
    masks = _MaskArrays(specs)
    xn, yn = x.contiguous().numpy(), y.contiguous().numpy()
    w1 = model.w1.numpy()
    b1 = model.b1.numpy().reshape(count, n_hidden)  # views: the kernel updates the model
    w2 = model.w2.numpy().reshape(count, n_hidden)
    b2 = model.b2.numpy().reshape(count)
    n_params = n_in * n_hidden + 2 * n_hidden + 1
    m_state = np.zeros((count, n_params), dtype=np.float32)
    v_state = np.zeros((count, n_params), dtype=np.float32)
    decay = (2.0 * lam).numpy()
    group = order.group_of.numpy()
    beta1, beta2 = _ADAM_BETAS
    step = 0
    for epoch in range(epochs):
        perms = order.permutations(n).numpy()  # (U, N)
        for start in range(0, n, batch_size):
            batch = np.ascontiguousarray(perms[:, start : start + batch_size])
            lr_t = lr * math.sqrt(1.0 - beta2 ** (step + 1)) / (1.0 - beta1 ** (step + 1))
            kernels.launch(
                kernels.train_step,
                xn, yn, batch, group, masks.data_index, w1, b1, w2, b2, m_state, v_state, decay,
                seed, masks.streams, masks.slots, masks.thresholds, masks.scales, step,
                lr_t, beta1, beta2, _ADAM_EPS,
            )  # fmt: skip
            step += 1
        if on_epoch is not None:
            on_epoch(epoch + 1)


def predict_blocks(
    model: BatchedMLP,
    specs: Sequence[ModelSpec],
    x: torch.Tensor,
    *,
    samples: int,
    seed: int,
    block: int,
    consume: Callable[[torch.Tensor], None],
    fused: bool | None = None,
) -> None:
    """MC-dropout predictions in blocks of passes, never more than ``block`` passes in memory.

    Args:
        model: the trained models.
        specs: their specs (masks), same order.
        x: stacked standardized inputs ``(S, n, in)``; ``spec.data_index`` picks the set.
        samples: total stochastic passes ``T``.
        seed: experiment seed.
        block: passes per block (part of the mask layout: keep it fixed for reproducibility).
        consume: called with each block of standardized predictions, shape ``(G, t, n)``,
            ``t <= block``, in pass order.
        fused: run the numba kernel (see :func:`train_models`); ``None``: when numba is installed.
    """
    count, n, n_in = len(specs), x.shape[1], x.shape[2]
    n_hidden = model.w1.shape[2]
    if _use_fused(fused):
        from dropkit.experiments.uci import fused as kernels

        masks = _MaskArrays(specs)
        xn = x.float().contiguous().numpy()
        weights = (
            model.w1.detach().contiguous().numpy(),
            model.b1.detach().reshape(count, n_hidden).contiguous().numpy(),
            model.w2.detach().reshape(count, n_hidden).contiguous().numpy(),
            model.b2.detach().reshape(count).contiguous().numpy(),
        )
        for b, start in enumerate(range(0, samples, block)):
            t = min(block, samples - start)
            passes = np.empty((count, t, n), dtype=np.float32)
            kernels.launch(
                kernels.predict_block,
                xn, masks.data_index, *weights, seed, masks.streams, masks.slots,
                masks.thresholds, masks.scales, b, t, passes,
            )  # fmt: skip
            consume(torch.from_numpy(passes))
        return
    plan = MaskPlan(specs, seed)
    data = torch.tensor([s.data_index for s in specs], dtype=torch.long)
    xs = x.float()[data].unsqueeze(1)  # (G, 1, n, in)
    with torch.no_grad():
        for b, start in enumerate(range(0, samples, block)):
            t = min(block, samples - start)
            m1 = plan.masks(2, b, (t, n, n_in))
            m2 = plan.masks(3, b, (t, n, n_hidden))
            xin = (xs * m1).view(count, t * n, n_in)
            # Inference needs no derivative: relu then mask, the same values as _hidden's h.
            h = torch.baddbmm(model.b1, xin, model.w1).relu_().mul_(m2.view(count, t * n, n_hidden))
            out = _output(model, h)
            consume(out.view(count, t, n))
