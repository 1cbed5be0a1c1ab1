"""The registry of random layers and functional ops that the contract tests run against.

Registering a layer here gives it the whole battery of tests/test_layer_contract.py (identities,
value sets, drop rates, expectations, gradients, gradcheck, layouts, dtypes, serialization,
argument checks), each check applied where the spec's flags say it applies;
tests/test_registry.py fails when a random layer of ``dropkit.nn.__all__`` or a random op of
``dropkit.functional.__all__`` is registered nowhere.

A spec describes one configuration of one layer:

* ``make(rate)``: the module, in the mode in which it draws (training, except where noted), at
  ``rate`` (its default for layers with a learned rate); wrappers get a small wrapped module.
* ``inputs(dtype, tiny)``: the positional arguments of ``forward`` (tiny ones for gradcheck).
* ``functional``: the public op the module runs, called the way the module calls it.
* ``probe(module, p, dtype, **rng)``: one training call arranged so that the mask can be read
  back (an :class:`Observation`): for Bernoulli kinds, ``output == where(keep, kept, dropped)``
  with ``keep`` recovered from the output, the leaf whose gradient the mask gates, and the
  expectation and standard deviation of every output element.
* flags: ``kind`` (bernoulli / gaussian / structured / learned), ``shared_dims`` (of the probe
  output: one draw per slice), ``eval_output`` (the documented eval result), ``one`` (rate 1:
  its exact result and the gradients that must vanish), ``inplace``, ``seeded``, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as torch_F
from torch import nn
from torch.func import functional_call

import dropkit
from dropkit import functional as F
from dropkit.functional.alpha import SELU_ALPHA_PRIME, alpha_dropout_coefficients

Args = tuple[Any, ...]
Rng = dict[str, Any]


# --- values -----------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What dropkit computes in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def signed(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Multiples of 2**-7 in ``±[0.5, 1.5)``: away from 0, so a kept unit is never mistaken for a
    dropped one, and exact in every floating dtype, so the same draw of torch's RNG gives the
    same values in float16, bfloat16, float32 and float64."""
    magnitude = torch.randint(64, 192, tuple(shape), dtype=torch.int64).to(torch.float64) / 128.0
    signs = torch.where(torch.rand(tuple(shape)) < 0.5, -1.0, 1.0).to(torch.float64)
    return (magnitude * signs).to(dtype)


def rounded(x: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """``x * scale + shift`` computed in the compute dtype and rounded once to ``x``'s dtype."""
    work = compute_dtype(x.dtype)
    y = x.to(work) * torch.tensor(scale, dtype=work)
    if shift:
        y = y + torch.tensor(shift, dtype=work)
    return y.to(x.dtype)


def tiny(shape: Sequence[int], limit: int = 4) -> tuple[int, ...]:
    return tuple(min(size, limit) for size in shape)


# --- what a probe observes ----------------------------------------------------------------------


@dataclass
class Observation:
    """One training call whose mask can be read back.

    ``expected`` is what ``output`` must equal exactly given the recovered ``keep``;
    ``leaf_grad(g)`` is the exact gradient of ``leaf`` for the output gradient ``g``;
    ``mean`` and ``sd`` are the expectation and the standard deviation of every output element
    over masks (with ``shared_dims`` of the spec, elements of a slice share one draw);
    ``grad_mean`` and ``grad_sd`` are those of every element of ``leaf.grad`` for ``g = 1``.
    """

    output: torch.Tensor
    keep: torch.Tensor | None = None
    expected: torch.Tensor | None = None
    leaf: torch.Tensor | None = None
    leaf_grad: Callable[[torch.Tensor], torch.Tensor] | None = None
    grad_exact: bool = True
    mean: torch.Tensor | None = None
    sd: torch.Tensor | None = None
    grad_mean: float | None = None
    grad_sd: float | None = None
    # Units whose kept and dropped values coincide, so that the output cannot tell which it was.
    ambiguous: torch.Tensor | None = None


def realised(p: float) -> float:
    """The drop probability the engine draws for ``p``: a 16-bit draw below ``round(p 2**16)``
    drops, so it is that threshold over ``2**16`` (the scales keep the expectation exact at it)."""
    return round(p * 2**16) / 2**16


#: (keep_scale, keep_shift, drop_value, grad_scale) of each mask formula at drop rate p.
def formula_constants(formula: str, p: float) -> tuple[float, float, float, float]:
    p = realised(p)
    if formula == "inverted":
        scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
        return scale, 0.0, 0.0, scale
    if formula == "unscaled":
        return 1.0, 0.0, 0.0, 1.0
    if formula == "alpha":
        a, b = alpha_dropout_coefficients(p)
        return a, b, a * SELU_ALPHA_PRIME + b, a
    raise ValueError(formula)


def bernoulli(
    output: torch.Tensor,
    source: torch.Tensor,
    p: float,
    *,
    formula: str = "inverted",
    leaf: torch.Tensor | None = None,
    to_leaf: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Observation:
    """``output == where(keep, source * scale + shift, drop_value)``; ``leaf`` (default ``source``)
    gets ``where(keep, g * grad_scale, 0)`` mapped to its layout by ``to_leaf``."""
    keep_scale, keep_shift, drop_value, grad_scale = formula_constants(formula, p)
    leaf = source if leaf is None else leaf
    source = source.detach()
    drop = torch.tensor(drop_value, dtype=compute_dtype(output.dtype)).to(output.dtype)
    keep = output.detach() != drop
    expected = torch.where(keep, rounded(source, keep_scale, keep_shift), drop)
    zero = torch.zeros((), dtype=output.dtype)

    def leaf_grad(g: torch.Tensor) -> torch.Tensor:
        return to_leaf(torch.where(keep, rounded(g, grad_scale), zero))

    p = realised(p)
    q = 1.0 - p
    mean = sd = grad_mean = grad_sd = None
    if formula == "inverted":
        mean, sd = source.double(), source.double().abs() * math.sqrt(p / q)
        grad_mean, grad_sd = 1.0, math.sqrt(p / q)
    elif formula == "unscaled":
        mean, sd = q * source.double(), source.double().abs() * math.sqrt(p * q)
        grad_mean, grad_sd = q, math.sqrt(p * q)
    return Observation(output, keep, expected, leaf, leaf_grad, True, mean, sd, grad_mean, grad_sd)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# --- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Functional:
    """A public op and how the module calls it: ``call(op, module, args, rate, training, **kw)``."""

    op: Callable[..., Any]
    call: Callable[..., Any]
    rate_name: str | None = "p"  # the op's rate argument (None: no rate, e.g. a learned logit)
    inplace: bool = False  # the op takes inplace=
    training: bool = True  # the op takes training= (else the adapter decides, and eval is not the op's)

    def __call__(self, module: nn.Module, args: Args, rate: Any, training: bool = True, **kw: Any) -> Any:
        return self.call(self.op, module, args, rate, training, **kw)


def unary(op: Callable[..., Any], rate_name: str = "p", **options: Any) -> Functional:
    """``op(input, rate, training, inplace, **options, seed=, generator=)``."""

    def invoke(
        op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
    ) -> Any:
        return op(args[0], rate, training, **options, **kw)

    return Functional(op, invoke, rate_name, inplace=True)


@dataclass(frozen=True)
class RateOne:
    """Rate 1 (every rate of the layer): ``args`` with inf put into what is dropped, the exact
    output, and the gradients that must be exact zeros (never NaN) after a backward."""

    args: Args
    output: Any
    zero_grads: Callable[[], list[torch.Tensor | None]]
    inf_grad: bool = True  # backward with an inf output gradient (else ones)
    skips: bool = False  # what is dropped is not run at all: its gradients stay None


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str  # "bernoulli" | "gaussian" | "structured" | "learned"
    make: Callable[[float], nn.Module]
    inputs: Callable[[torch.dtype, bool], Args]
    functional: Functional | None = None
    # The constructor's rate (None: a learned rate, nothing to set) and its value in the battery.
    rate_name: str | None = "p"
    rate: float = 0.3
    # Further constructor rates that make() sets to the same value (validated the same way).
    extra_rate_names: tuple[str, ...] = ()
    rate_check: str = "probability"  # "probability" | "nonnegative" | "open" (learned init_p)
    holds_rate_tensor: bool = True  # the module passes <rate>_tensor to its op
    probe: Callable[..., Observation] | None = None
    shared_dims: tuple[int, ...] = ()
    # Per-call standard deviation of the dropped fraction, its expectation and how far the
    # realised expectation may be from it (default: binomial draws of the engine's realised p).
    rate_sd: Callable[[float, torch.Size], float] | None = None
    rate_target: Callable[[float, torch.Size], float] | None = None
    rate_slack: float | None = None
    expectation: bool = False  # E[output] = probe.mean (and gradients, where the probe says)
    # The documented eval result (None: the module draws in eval, or no eval contract here).
    eval_output: Callable[[nn.Module, Args], Any] | None = None
    # The result at rate 0 when it is not eval_output (or eval_output is None).
    zero_output: Callable[[nn.Module, Args], Any] | None = None
    exact_zero: bool = True  # rate 0 gives eval's bits (else float rounding)
    one: Callable[[nn.Module, Args], RateOne] | None = None
    inplace: bool = False
    unary: bool = False  # forward(input) over a functional op(input, rate, training, inplace)
    keeps_layout: bool = True  # a unary op's output has the input's strides (memory format)
    seeded: bool = True  # forward takes seed= and generator=
    steps_per_call: int = 1  # rng_step advances of the module tree per drawing call
    grad_params: tuple[str, ...] = ()  # parameters gradcheck differentiates too
    gradgrad: bool = False
    keyed_backward: bool = False  # autograd keeps only the key (no per-element memory)
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float64)
    exact_layouts: bool = True  # non-contiguous / channels-last inputs give the same bits
    differentiable: bool = True
    single_draw: bool = False  # one draw per call (a whole-batch decision)
    rounds_once: bool = True  # half-precision probes give the float32 result rounded once
    eval_reads_rate: bool = False  # the functional reads its rate in eval too

    def rng(self, seed: int | None = None, generator: torch.Generator | None = None) -> Rng:
        if not self.seeded:
            return {}
        out: Rng = {}
        if seed is not None:
            out["seed"] = seed
        if generator is not None:
            out["generator"] = generator
        return out

    @property
    def settable(self) -> bool:
        return self.rate_name is not None and self.rate_check != "open"


def identity_eval(module: nn.Module, args: Args) -> Any:
    """Eval is the identity: the input itself."""
    return args[0]


# --- small wrapped modules --------------------------------------------------------------------


class AddParameter(nn.Module):
    """``x + weight``: a residual branch whose output is a parameter when ``x = 0``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(signed(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class OneHotAdd(nn.Module):
    """``x + weight[index] * e_index``: layer ``index`` of a LayerDrop stack writes one feature."""

    def __init__(self, index: int, weight: nn.Parameter) -> None:
        super().__init__()
        self.index = index
        self.weight = weight  # shared by the stack: its gradient is the stack's keep mask
        self.register_buffer("basis", torch_F.one_hot(torch.tensor(index), weight.numel()).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[self.index] * self.basis.to(x.dtype)


def layer_stack(count: int) -> list[nn.Module]:
    weight = nn.Parameter(signed((count,)))
    return [OneHotAdd(i, weight) for i in range(count)]


def capture_input(module: nn.Module) -> tuple[list[torch.Tensor], Callable[[], None]]:
    """Record the input of every call of ``module``; returns the list and the hook's remover."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    return seen, handle.remove


# --- unary element and channel masks ----------------------------------------------------------


def unary_inputs(shape: Sequence[int]) -> Callable[[torch.dtype, bool], Args]:
    return lambda dtype, small: (signed(tiny(shape) if small else shape, dtype),)


def unary_probe(shape: Sequence[int], formula: str = "inverted") -> Callable[..., Observation]:
    def probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
        x = leaf(signed(shape, dtype))
        return bernoulli(module(x, **rng), x, p, formula=formula, leaf=x)

    return probe


#: What rate 1 must turn into exact values: never NaN out of 0 * inf.
POISON = (math.inf, -math.inf, math.nan, 0.0, 1e38, -1e38)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Write POISON into the first elements (the first rows of a 2-D weight) of ``t``, in place."""
    with torch.no_grad():
        values = torch.tensor(POISON, dtype=t.dtype)
        if t.dim() == 2:
            t[: len(POISON)] = values.unsqueeze(1)
        else:
            t.view(-1)[: len(POISON)] = values
    return t


def poisoned(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values with inf, -inf, NaN, 0 and +-1e38 in them, requiring grad."""
    return poison_(signed(shape, dtype)).requires_grad_(True)


def zeros_at_one(shape: Sequence[int]) -> Callable[[nn.Module, Args], RateOne]:
    def one(module: nn.Module, args: Args) -> RateOne:
        x = poisoned(shape)
        return RateOne((x,), torch.zeros(shape), lambda: [x.grad])

    return one


def unary_spec(
    name: str,
    cls: Callable[..., nn.Module],
    op: Callable[..., Any],
    shape: tuple[int, ...],
    *,
    kind: str = "bernoulli",
    shared_dims: tuple[int, ...] = (),
    formula: str = "inverted",
    rate_name: str = "p",
    rate: float = 0.3,
    options: dict[str, Any] | None = None,
    module_options: dict[str, Any] | None = None,
    **flags: Any,
) -> LayerSpec:
    """A layer ``cls(rate, **module_options)`` over ``op(input, rate, training, inplace, **options)``."""
    options = options or {}
    module_options = options if module_options is None else module_options
    settings: dict[str, Any] = {
        "kind": kind,
        "functional": unary(op, rate_name, **options),
        "rate_name": rate_name,
        "rate": rate,
        "shared_dims": shared_dims,
        "eval_output": identity_eval,
        "one": zeros_at_one(shape),
        "expectation": formula != "alpha",  # alpha dropout keeps moments of N(0, 1) input only
        "inplace": True,
        "unary": True,
        "gradgrad": True,
        "keyed_backward": True,
    }
    if kind == "bernoulli":
        settings["probe"] = unary_probe(shape, formula)
    settings.update(flags)

    def make(rate: float, **extra: Any) -> nn.Module:
        return cls(**{rate_name: rate}, **module_options, **extra)

    return LayerSpec(name, make=make, inputs=unary_inputs(shape), **settings)


def unscaled_eval(module: nn.Module, args: Args) -> torch.Tensor:
    return rounded(args[0], 1.0 - realised(module.p))


DROPOUT_SPECS = [
    unary_spec("Dropout", dropkit.nn.Dropout, F.dropout, (64, 48)),
    unary_spec(
        "Dropout[time-tied]",
        dropkit.nn.Dropout,
        F.dropout,
        (12, 40, 16),
        shared_dims=(0,),
        options={"broadcast_dims": (0,)},
    ),
    unary_spec(
        "Dropout[unscaled]",
        dropkit.nn.Dropout,
        F.dropout,
        (64, 48),
        formula="unscaled",
        options={"inverted": False},
        eval_output=unscaled_eval,
        eval_reads_rate=True,
    ),
    unary_spec("Dropout1d", dropkit.nn.Dropout1d, F.dropout1d, (40, 24, 5), shared_dims=(2,)),
    unary_spec(
        "Dropout1d[channels_last]",
        dropkit.nn.Dropout1d,
        F.dropout1d,
        (40, 5, 24),
        shared_dims=(1,),
        options={"channels_last": True},
    ),
    unary_spec("Dropout2d", dropkit.nn.Dropout2d, F.dropout2d, (32, 30, 3, 4), shared_dims=(2, 3)),
    unary_spec(
        "Dropout2d[channels_last]",
        dropkit.nn.Dropout2d,
        F.dropout2d,
        (32, 3, 4, 30),
        shared_dims=(1, 2),
        options={"channels_last": True},
    ),
    unary_spec("Dropout3d", dropkit.nn.Dropout3d, F.dropout3d, (24, 40, 2, 3, 2), shared_dims=(2, 3, 4)),
    unary_spec(
        "Dropout3d[channels_last]",
        dropkit.nn.Dropout3d,
        F.dropout3d,
        (24, 2, 3, 2, 40),
        shared_dims=(1, 2, 3),
        options={"channels_last": True},
    ),
    unary_spec("AttentionDropout", dropkit.nn.AttentionDropout, F.dropout, (4, 4, 12, 16)),
    unary_spec("AlphaDropout", dropkit.nn.AlphaDropout, F.alpha_dropout, (64, 48), formula="alpha"),
    unary_spec(
        "FeatureAlphaDropout",
        dropkit.nn.FeatureAlphaDropout,
        F.feature_alpha_dropout,
        (32, 30, 3, 4),
        shared_dims=(2, 3),
        formula="alpha",
    ),
    unary_spec("DropPath", dropkit.nn.DropPath, F.drop_path, (256, 6, 4), shared_dims=(1, 2)),
    unary_spec(
        "DropPath[batch]",
        dropkit.nn.DropPath,
        F.drop_path,
        (4, 6, 4),
        shared_dims=(0, 1, 2),
        options={"mode": "batch"},
        single_draw=True,
    ),
    unary_spec("LockedDropout", dropkit.nn.LockedDropout, F.locked_dropout, (12, 40, 16), shared_dims=(0,)),
    unary_spec(
        "LockedDropout[batch_first]",
        dropkit.nn.LockedDropout,
        F.locked_dropout,
        (40, 12, 16),
        shared_dims=(1,),
        options={"batch_first": True},
    ),
]


# --- Gaussian noise -----------------------------------------------------------------------------


def gaussian_dropout_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    x = leaf(signed((64, 48), dtype))
    y = module(x, **rng)
    ratio = math.sqrt(p / (1.0 - p))
    exact = "seed" in rng and dtype == torch.float32
    # With the seed again, input 1 gives the noise itself: backward multiplies by the same noise.
    noise = module(torch.ones_like(x), **rng).detach() if exact else y.detach().double() / x.detach().double()
    return Observation(
        y,
        leaf=x,
        leaf_grad=lambda g: (g.to(noise.dtype) * noise).to(g.dtype),
        grad_exact=exact,
        mean=x.detach().double(),
        sd=x.detach().double().abs() * ratio,
        grad_mean=1.0,
        grad_sd=ratio,
    )


def gaussian_noise_probe(module: nn.Module, std: float, dtype: torch.dtype, **rng: Any) -> Observation:
    x = leaf(signed((64, 48), dtype))
    y = module(x, **rng)
    return Observation(
        y,
        leaf=x,
        leaf_grad=lambda g: g,
        mean=x.detach().double(),
        sd=torch.full(x.shape, std, dtype=torch.float64),
        grad_mean=1.0,
        grad_sd=0.0,
    )


GAUSSIAN_SPECS = [
    unary_spec(
        "GaussianDropout",
        dropkit.nn.GaussianDropout,
        F.gaussian_dropout,
        (64, 48),
        kind="gaussian",
        probe=gaussian_dropout_probe,
    ),
    unary_spec(
        "GaussianNoise",
        dropkit.nn.GaussianNoise,
        F.gaussian_noise,
        (64, 48),
        kind="gaussian",
        rate_name="std",
        rate=0.7,
        rate_check="nonnegative",
        probe=gaussian_noise_probe,
        one=None,
    ),
]


# --- DropBlock ----------------------------------------------------------------------------------


def dropblock_probe(shape: tuple[int, ...]) -> Callable[..., Observation]:
    def probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
        x = leaf(signed(shape, dtype))
        y = module(x, **rng)
        keep = y.detach() != 0
        # Batch renormalisation: kept units are scaled by numel / kept, computed in float64 and
        # rounded to the compute dtype once.
        work = compute_dtype(dtype)
        scale = (keep.numel() / keep.sum(dtype=torch.float64)).to(work)
        zero = torch.zeros((), dtype=dtype)
        expected = torch.where(keep, (x.detach().to(work) * scale).to(dtype), zero)
        return Observation(
            y,
            keep,
            expected,
            x,
            lambda g: torch.where(keep, (g.to(work) * scale).to(g.dtype), zero),
        )

    return probe


def coverage(feature: Sequence[int], block_size: int) -> torch.Tensor:
    """n_j: how many valid seed positions drop unit j of a map (a product of per-axis counts)."""
    counts = torch.ones((), dtype=torch.float64)
    for size in feature:
        block = min(block_size, size)
        valid = size - block + 1
        i = torch.arange(size, dtype=torch.float64)
        axis = torch.clamp(i, max=valid - 1) - torch.clamp(i - block + 1, min=0) + 1
        counts = counts.unsqueeze(-1) * axis
    return counts


def seed_rate_of(p: float, feature: Sequence[int], block_size: int) -> float:
    """The seed rate gamma whose expected dropped fraction mean_j(1 - (1 - gamma)**n_j) is p."""
    n = coverage(feature, block_size)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if float((1.0 - (1.0 - middle) ** n).mean()) < p:
            low = middle
        else:
            high = middle
    return high


def paper_seed_rate(p: float, feature: Sequence[int], block_size: int) -> float:
    """Ghiasi et al.'s gamma = p / prod(b_i) * prod(F_i / (F_i - b_i + 1)), clipped to [0, 1]."""
    gamma = p
    for size in feature:
        block = min(block_size, size)
        gamma *= size / (block * (size - block + 1))
    return min(gamma, 1.0)


def dropblock_rate_target(block_size: int, exact_rate: bool) -> Callable[[float, torch.Size], float]:
    """The expected dropped fraction: p itself with exact_rate, else what the paper's gamma gives."""

    def target(p: float, shape: torch.Size) -> float:
        if exact_rate:
            return p
        feature = shape[2:]
        gamma = paper_seed_rate(p, feature, block_size)
        return float((1.0 - (1.0 - gamma) ** coverage(feature, block_size)).mean())

    return target


def dropblock_rate_sd(
    block_size: int, shared_channels: bool, exact_rate: bool
) -> Callable[[float, torch.Size], float]:
    """Efron-Stein bound on the sd of the dropped fraction of one call.

    Seeds are independent Bernoulli(gamma) draws; resampling one seed changes the dropped
    fraction by at most ``units per block / units``, so
    ``Var <= seeds * gamma (1 - gamma) * (units per block / units)**2``.
    """

    def sd(p: float, shape: torch.Size) -> float:
        n, c, *feature = shape
        blocks = [min(block_size, size) for size in feature]
        valid = math.prod(size - b + 1 for size, b in zip(feature, blocks, strict=True))
        seeds = n * (1 if shared_channels else c) * valid
        per_block = math.prod(blocks) * (c if shared_channels else 1)
        gamma = (
            seed_rate_of(p, feature, block_size) if exact_rate else paper_seed_rate(p, feature, block_size)
        )
        return math.sqrt(seeds * gamma * (1.0 - gamma)) * per_block / math.prod(shape)

    return sd


def dropblock_spec(
    name: str, cls: Callable[..., nn.Module], op: Callable[..., Any], shape: tuple[int, ...], **options: Any
) -> LayerSpec:
    options = {"block_size": 3, "exact_rate": True, **options}
    shared = options.get("shared_channels", False)
    return unary_spec(
        name,
        cls,
        op,
        shape,
        kind="structured",
        shared_dims=(1,) if shared else (),
        options=options,
        module_options={k: v for k, v in options.items() if k != "spatial_rank"},
        probe=dropblock_probe(shape),
        rate_sd=dropblock_rate_sd(options["block_size"], shared, options["exact_rate"]),
        rate_target=dropblock_rate_target(options["block_size"], options["exact_rate"]),
        keeps_layout=False,  # the block mask is built by pooling: a contiguous output
        # The realised seed rate is a multiple of 2**-16: a unit covered by at most
        # block_size**rank seeds is dropped with a probability off by at most that many 2**-17.
        rate_slack=options["block_size"] ** (len(shape) - 2) * 2.0**-17,
        expectation=False,  # renormalised by the realised kept fraction: test_dropblock.py
    )


DROPBLOCK_SPECS = [
    dropblock_spec("DropBlock1d", dropkit.nn.DropBlock1d, F.drop_block1d, (16, 8, 40)),
    dropblock_spec("DropBlock2d", dropkit.nn.DropBlock2d, F.drop_block2d, (8, 8, 12, 12)),
    # The paper's seed rate (the default) realises slightly less than p: its own expected fraction.
    dropblock_spec(
        "DropBlock2d[paper gamma]", dropkit.nn.DropBlock2d, F.drop_block2d, (8, 8, 12, 12), exact_rate=False
    ),
    dropblock_spec("DropBlock3d", dropkit.nn.DropBlock3d, F.drop_block3d, (4, 4, 6, 6, 6), block_size=2),
    dropblock_spec(
        "DropBlock2d[drop_block, shared_channels]",
        dropkit.nn.DropBlock2d,
        F.drop_block,
        (16, 4, 12, 12),
        spatial_rank=2,
        shared_channels=True,
    ),
]


# --- residual dropout and attention -----------------------------------------------------------


RESIDUAL_SHAPE = (64, 48)


def residual_inputs(bias: bool) -> Callable[[torch.dtype, bool], Args]:
    def inputs(dtype: torch.dtype, small: bool) -> Args:
        shape = (2, 3) if small else RESIDUAL_SHAPE
        args = (signed(shape, dtype), signed(shape, dtype))
        return (*args, signed(shape[-1:], dtype)) if bias else args

    return inputs


def residual_functional(bias: bool) -> Functional:
    def invoke(
        op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
    ) -> Any:
        return op(args[0], args[1], rate, training, bias=args[2] if bias else None, **kw)

    return Functional(F.residual_dropout, invoke)


def residual_eval(module: nn.Module, args: Args) -> torch.Tensor:
    if len(args) == 2:
        return args[1] + args[0]
    work = compute_dtype(args[0].dtype)
    x, residual, bias = (a.to(work) for a in args)
    return (residual + (x + bias)).to(args[0].dtype)


def residual_probe(bias: bool) -> Callable[..., Observation]:
    def probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
        # residual = 0 and bias = 0: the output is the dropped input, bit for bit.
        x = leaf(signed(RESIDUAL_SHAPE, dtype))
        zeros = torch.zeros(RESIDUAL_SHAPE, dtype=dtype)
        extra = (torch.zeros(RESIDUAL_SHAPE[-1:], dtype=dtype),) if bias else ()
        return bernoulli(module(x, zeros, *extra, **rng), x, p)

    return probe


def residual_one(bias: bool) -> Callable[[nn.Module, Args], RateOne]:
    def one(module: nn.Module, args: Args) -> RateOne:
        x, residual = poisoned(RESIDUAL_SHAPE), signed(RESIDUAL_SHAPE).requires_grad_(True)
        b = poisoned(RESIDUAL_SHAPE[-1:]) if bias else None
        extra = (b,) if bias else ()
        return RateOne(
            (x, residual, *extra), residual.detach(), lambda: [x.grad] + ([b.grad] if bias else [])
        )

    return one


def residual_spec(name: str, bias: bool) -> LayerSpec:
    return LayerSpec(
        name,
        "bernoulli",
        make=lambda p: dropkit.nn.ResidualDropout(p),
        inputs=residual_inputs(bias),
        functional=residual_functional(bias),
        probe=residual_probe(bias),
        expectation=True,
        eval_output=residual_eval,
        one=residual_one(bias),
        keyed_backward=bias,
    )


ATTENTION_SHAPE = (2, 3, 16, 8)  # (N, H, L, E), S = L


def attention_inputs(dtype: torch.dtype, small: bool) -> Args:
    shape = (1, 2, 3, 2) if small else ATTENTION_SHAPE
    return tuple(torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(3))


def attention_functional() -> Functional:
    def invoke(
        op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
    ) -> Any:
        return op(*args, None, rate, training=training, **kw)

    return Functional(F.scaled_dot_product_attention, invoke, rate_name="dropout_p")


def attention_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    # q = 0: every weight is exactly 1/S; v = I: the output is the dropped weights, bit for bit.
    n, h, length, _ = ATTENTION_SHAPE
    q = torch.zeros(ATTENTION_SHAPE, dtype=dtype)
    k = torch.randn(ATTENTION_SHAPE, dtype=torch.float64).to(dtype)
    v = torch.eye(length, dtype=dtype).expand(n, h, length, length)
    y = module(q, k, v, **rng)
    observed = bernoulli(y, torch.full(y.shape, 1.0 / length, dtype=dtype), p)
    observed.leaf = None  # the weights are internal: test_attention.py checks their gradient
    return observed


def attention_one(module: nn.Module, args: Args) -> RateOne:
    q, k, v = (a.clone().requires_grad_(True) for a in attention_inputs(torch.float32, False))
    # A dropped weight is an exact zero; the matmul of the values then gives zeros.  The output
    # gradient is finite: the weights' gradient goes through the values (0 * inf is NaN).
    return RateOne((q, k, v), torch.zeros(ATTENTION_SHAPE), lambda: [q.grad, k.grad, v.grad], inf_grad=False)


ATTENTION_SPECS = [
    residual_spec("ResidualDropout", bias=True),
    residual_spec("ResidualDropout[no bias]", bias=False),
    LayerSpec(
        "ScaledDotProductAttention",
        "bernoulli",
        make=lambda p: dropkit.nn.ScaledDotProductAttention(p),
        inputs=attention_inputs,
        functional=attention_functional(),
        probe=attention_probe,
        expectation=True,
        eval_output=lambda m, args: torch_F.scaled_dot_product_attention(*args),
        exact_zero=False,  # a training call takes the explicit path, eval torch's kernel
        one=attention_one,
    ),
]


# --- wrappers of a layer's weights: DropConnect, WeightDrop, EmbeddingDropout -----------------


IN, OUT = 48, 64


def linear_inputs(dtype: torch.dtype, small: bool) -> Args:
    return (signed((2, IN) if small else (16, IN), dtype),)


def identity_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    """Identity input through a bias-free linear wrapper: the output is the dropped weight, transposed."""
    weight = module.module.weight
    y = module(torch.eye(weight.shape[1], dtype=dtype), **rng)
    return bernoulli(y, weight.detach().T, p, leaf=weight, to_leaf=lambda t: t.T)


def weight_one(module: nn.Module, args: Args) -> RateOne:
    weight = module.module.weight
    poison_(weight)
    x = signed((16, weight.shape[1])).requires_grad_(True)
    # Dropped weights are exact zeros; the output gradient stays finite (x @ 0 * inf is NaN).
    return RateOne((x,), torch.zeros(16, weight.shape[0]), lambda: [weight.grad], inf_grad=False)


def drop_connect_functional(
    op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
) -> Any:
    layer = module.module
    return torch_F.linear(args[0], op(layer.weight, rate, **kw), layer.bias)


def moment_matching_functional(
    op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
) -> Any:
    layer = module.module
    return op(args[0], layer.weight, layer.bias, rate, module.activation, samples=module.samples, **kw)


def moment_matching_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    x = signed((64, IN), dtype)
    layer = module.module
    y = module(x, **rng)
    variance = torch_F.linear(x.double().square(), layer.weight.detach().double().square()) * (p / (1.0 - p))
    return Observation(y, mean=layer(x).detach().double(), sd=(variance / module.samples).sqrt())


def weight_drop_linear(p: float, **options: Any) -> nn.Module:
    return dropkit.nn.WeightDrop(nn.Linear(IN, OUT, bias=False), p, "weight", **options)


def weight_drop_unscaled_eval(module: nn.Module, args: Args) -> torch.Tensor:
    layer = module.module
    return torch_F.linear(
        args[0], layer.weight * torch.tensor(1.0 - module.p, dtype=torch.float32), layer.bias
    )


def unscaled_identity_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    weight = module.module.weight
    y = module(torch.eye(weight.shape[1], dtype=dtype), **rng)
    return bernoulli(y, weight.detach().T, p, formula="unscaled", leaf=weight, to_leaf=lambda t: t.T)


LSTM_SIZES = (4, 16)  # (input, hidden)


def lstm_inputs(dtype: torch.dtype, small: bool) -> Args:
    return (signed((3, 2, LSTM_SIZES[0]) if small else (5, 3, LSTM_SIZES[0]), dtype),)


def lstm_functional(
    op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
) -> Any:
    lstm = module.module
    return functional_call(lstm, {"weight_hh_l0": op(lstm.weight_hh_l0, rate, **kw)}, args)


def lstm_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    weight = module.module.weight_hh_l0
    return bernoulli(module.dropped_weights(**rng)["weight_hh_l0"], weight.detach(), p, leaf=weight)


def lstm_one(module: nn.Module, args: Args) -> RateOne:
    lstm = module.module
    poison_(lstm.weight_hh_l0)
    x = lstm_inputs(torch.float32, False)[0]
    expected = functional_call(lstm, {"weight_hh_l0": torch.zeros_like(lstm.weight_hh_l0)}, (x,))
    return RateOne((x,), expected, lambda: [lstm.weight_hh_l0.grad], inf_grad=False)


VOCAB, DIM = 400, 4


def ids_inputs(dtype: torch.dtype, small: bool) -> Args:
    return (torch.randint(0, 5 if small else VOCAB, (2, 3) if small else (8, 12)),)


def embedding_functional(
    op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
) -> Any:
    return op(args[0], module.module.weight, rate, training, per_token=module.per_token, **kw)


def word_dropout_functional(
    op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
) -> Any:
    # The documented equivalence: word_dropout on the ids, then a plain lookup.
    weight = module.module.weight
    ids = op(args[0], rate, training, unk_idx=module.unk_idx, num_embeddings=weight.shape[0], **kw)
    return torch_F.embedding(ids, weight)


def embedding_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    # Every word once: the output is the dropped embedding matrix, one draw per row.
    weight = module.module.weight
    return bernoulli(module(torch.arange(weight.shape[0]), **rng), weight.detach(), p, leaf=weight)


UNK = 1


def unk_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    weight = module.module.weight
    ids = torch.cat([torch.arange(UNK), torch.arange(UNK + 1, weight.shape[0])])
    y = module(ids, **rng)
    rows, unk_row = weight.detach()[ids], weight.detach()[UNK]
    keep = (y.detach() != unk_row).any(-1, keepdim=True).expand_as(y)

    def leaf_grad(g: torch.Tensor) -> torch.Tensor:
        expected = torch.zeros_like(weight)
        expected[ids] = torch.where(keep, g, 0.0)
        expected[UNK] = torch.where(keep, 0.0, g).sum(0)
        return expected

    return Observation(y, keep, torch.where(keep, rows, unk_row), weight, leaf_grad)


def embedding_one(module: nn.Module, args: Args) -> RateOne:
    weight = module.module.weight
    poison_(weight[UNK + 1 :])
    ids = torch.arange(weight.shape[0]).reshape(4, -1)
    if module.unk_idx is None:
        return RateOne((ids,), torch.zeros(*ids.shape, DIM), lambda: [weight.grad])
    # Every word reads the UNK row; every other row gets no gradient.
    expected = weight.detach()[module.unk_idx].expand(*ids.shape, DIM)
    others = [i for i in range(weight.shape[0]) if i != module.unk_idx]
    return RateOne((ids,), expected, lambda: [None if weight.grad is None else weight.grad[others]])


def embedding_dropout(p: float, **options: Any) -> nn.Module:
    return dropkit.nn.EmbeddingDropout(nn.Embedding(VOCAB, DIM), p, **options)


def embedding_spec(name: str, options: dict[str, Any]) -> LayerSpec:
    """An EmbeddingDropout spec; with ``unk_idx`` dropped words read the UNK row (word_dropout),
    so the expectation of the output is not preserved."""
    unk = "unk_idx" in options
    return LayerSpec(
        name,
        "bernoulli",
        make=lambda p: embedding_dropout(p, **options),
        inputs=ids_inputs,
        functional=(
            Functional(F.word_dropout, word_dropout_functional)
            if unk
            else Functional(F.embedding_dropout, embedding_functional)
        ),
        probe=unk_probe if unk else embedding_probe,
        shared_dims=(1,),
        expectation=not unk,
        eval_output=lambda m, args: m.module(args[0]),
        one=embedding_one,
        grad_params=("module.weight",),
    )


WEIGHT_SPECS = [
    LayerSpec(
        "DropConnect",
        "bernoulli",
        make=lambda p: dropkit.nn.DropConnect(nn.Linear(IN, OUT, bias=False), p),
        inputs=linear_inputs,
        functional=Functional(F.drop_connect_weight, drop_connect_functional, training=False),
        probe=identity_probe,
        expectation=True,
        eval_output=lambda m, args: m.module(args[0]),
        one=weight_one,
        grad_params=("module.weight",),
    ),
    LayerSpec(
        "DropConnect[per_example]",
        "bernoulli",
        make=lambda p: dropkit.nn.DropConnect(
            nn.Linear(24, 32, bias=False), p, per_example=True, chunk_size=5
        ),
        exact_zero=False,  # per-example matmuls round unlike one linear
        inputs=lambda dtype, small: (signed((2, 24) if small else (12, 24), dtype),),
        probe=identity_probe,
        expectation=True,
        eval_output=lambda m, args: m.module(args[0]),
        one=weight_one,
        grad_params=("module.weight",),
    ),
    LayerSpec(
        # Wan et al.'s inference: random in eval, keyed by seed= or the functional stream.
        "DropConnect[moment_matching]",
        "gaussian",
        make=lambda p: dropkit.nn.DropConnect(
            nn.Linear(IN, 8), p, inference="moment_matching", samples=16
        ).eval(),
        inputs=lambda dtype, small: (signed((2, IN) if small else (16, IN), dtype),),
        functional=Functional(F.moment_matching_linear, moment_matching_functional, training=False),
        probe=moment_matching_probe,
        expectation=True,
        eval_output=None,
        zero_output=lambda m, args: m.module(args[0]),
        exact_zero=False,  # the mean of identical samples, to float rounding
        exact_layouts=False,  # the linear layer's matmul
        steps_per_call=0,  # eval draws from the functional stream, not the layer's
        differentiable=False,
        dtypes=(torch.float64,),
    ),
    LayerSpec(
        "WeightDrop[Linear]",
        "bernoulli",
        make=weight_drop_linear,
        inputs=linear_inputs,
        functional=Functional(F.drop_connect_weight, drop_connect_functional, training=False),
        probe=identity_probe,
        expectation=True,
        eval_output=lambda m, args: m.module(args[0]),
        one=weight_one,
        grad_params=("module.weight",),
    ),
    LayerSpec(
        "WeightDrop[Linear, unscaled]",
        "bernoulli",
        make=lambda p: weight_drop_linear(p, inverted=False),
        inputs=linear_inputs,
        probe=unscaled_identity_probe,
        expectation=True,
        eval_output=weight_drop_unscaled_eval,
        one=weight_one,
        grad_params=("module.weight",),
    ),
    LayerSpec(
        "WeightDrop[LSTM]",
        "bernoulli",
        make=lambda p: dropkit.nn.WeightDrop(nn.LSTM(*LSTM_SIZES), p),
        inputs=lstm_inputs,
        functional=Functional(F.drop_connect_weight, lstm_functional, training=False),
        probe=lstm_probe,
        expectation=True,
        eval_output=lambda m, args: m.module(*args),
        one=lstm_one,
        grad_params=("module.weight_hh_l0",),
        exact_layouts=False,  # the LSTM's matmuls
    ),
    embedding_spec("EmbeddingDropout", {}),
    embedding_spec("EmbeddingDropout[per_token]", {"per_token": True}),
    embedding_spec("EmbeddingDropout[unk]", {"unk_idx": UNK}),
]


# --- zoneout ------------------------------------------------------------------------------------

CELL_SIZES = (6, 32)  # (input, hidden)
CELL_BATCH = 48


def cell_inputs(lstm: bool) -> Callable[[torch.dtype, bool], Args]:
    def inputs(dtype: torch.dtype, small: bool) -> Args:
        batch = 2 if small else CELL_BATCH
        x = signed((batch, CELL_SIZES[0]), dtype)
        h = signed((batch, CELL_SIZES[1]), dtype)
        return (x, (h, signed((batch, CELL_SIZES[1]), dtype))) if lstm else (x, h)

    return inputs


def zoneout_functional(
    op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
) -> Any:
    x, hx = args
    new = module.module(x, hx)
    if isinstance(hx, tuple):
        return op(hx, new, (rate, rate), training, **kw)
    return op(hx, new, rate, training, **kw)


def zoneout_eval(module: nn.Module, args: Args) -> Any:
    x, hx = args
    new = module.module(x, hx)
    if isinstance(hx, tuple):
        return tuple(prev * module.p + fresh * (1.0 - module.p) for prev, fresh in zip(hx, new, strict=True))
    return hx * module.p + new * (1.0 - module.p)


def zoneout_probe(lstm: bool) -> Callable[..., Observation]:
    def probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
        x = signed((CELL_BATCH, CELL_SIZES[0]), dtype)
        # Previous states outside the range of the new ones, so the two never coincide.
        count = 2 if lstm else 1
        offsets = 2.0 + 3.0 * torch.arange(count).reshape(-1, 1, 1)
        prev = leaf((torch.rand(count, CELL_BATCH, CELL_SIZES[1]) + offsets).to(dtype))

        def cell(states: torch.Tensor) -> torch.Tensor:
            new = module.module(x, (states[0], states[1]) if lstm else states[0])
            return torch.stack(new if lstm else (new,))

        out = module(x, (prev[0], prev[1]) if lstm else prev[0], **rng)
        y = torch.stack(out if lstm else (out,))
        new = cell(prev).detach()
        keep = y.detach() != prev.detach()  # updated: took the new value (probability 1 - p)

        def leaf_grad(g: torch.Tensor) -> torch.Tensor:
            # A zoned-out unit passes g to its previous value; an updated one passes it through
            # the cell, which reads the previous state too.
            states = prev.detach().requires_grad_(True)
            (through_cell,) = torch.autograd.grad(cell(states), states, torch.where(keep, g, 0.0))
            return torch.where(keep, torch.zeros((), dtype=g.dtype), g) + through_cell

        spread = (prev.detach() - new).double().abs()
        return Observation(
            y,
            keep,
            torch.where(keep, new, prev.detach()),
            prev,
            leaf_grad,
            mean=p * prev.detach().double() + (1.0 - p) * new.double(),
            sd=spread * math.sqrt(p * (1.0 - p)),
            ambiguous=new == prev.detach(),  # a memory cell whose forget gate is ~1, in half precision
        )

    return probe


def zoneout_one(module: nn.Module, args: Args) -> RateOne:
    x, hx = cell_inputs(isinstance(module.module, nn.LSTMCell))(torch.float32, False)
    params = list(module.module.parameters())
    # Every unit keeps its previous value; the cell's parameters get exact zero gradients.
    return RateOne((x, hx), hx, lambda: [param.grad for param in params])


ZONEOUT_SPECS = [
    LayerSpec(
        "ZoneoutCell[LSTMCell]",
        "bernoulli",
        make=lambda p, **kw: dropkit.nn.ZoneoutCell(nn.LSTMCell(*CELL_SIZES), p, **{"cell_p": p, **kw}),
        inputs=cell_inputs(lstm=True),
        functional=Functional(F.zoneout_states, zoneout_functional, rate_name="rates[0]"),
        extra_rate_names=("cell_p",),
        probe=zoneout_probe(lstm=True),
        expectation=True,
        eval_output=zoneout_eval,
        eval_reads_rate=True,
        rounds_once=False,  # the cell itself runs in the reduced dtype
        one=zoneout_one,
    ),
    LayerSpec(
        "ZoneoutCell[GRUCell]",
        "bernoulli",
        make=lambda p: dropkit.nn.ZoneoutCell(nn.GRUCell(*CELL_SIZES), p),
        inputs=cell_inputs(lstm=False),
        functional=Functional(F.zoneout, zoneout_functional),
        probe=zoneout_probe(lstm=False),
        expectation=True,
        eval_output=zoneout_eval,
        eval_reads_rate=True,
        rounds_once=False,  # the cell itself runs in the reduced dtype
        one=zoneout_one,
    ),
]


# --- residual branches and layer stacks ---------------------------------------------------------


def stochastic_depth_functional(mode: str) -> Functional:
    def invoke(
        op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
    ) -> Any:
        x = args[0]
        return x + op(module.module(x), rate, training, mode=mode, **kw)

    return Functional(F.drop_path, invoke)


def stochastic_depth_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    # x = 0: the output is the dropped branch, which is the branch's parameter.
    weight = module.module.weight
    return bernoulli(module(torch.zeros(weight.shape, dtype=dtype), **rng), weight.detach(), p, leaf=weight)


def stochastic_depth_one(module: nn.Module, args: Args) -> RateOne:
    weight = module.module.weight
    poison_(weight)
    x = signed(weight.shape).requires_grad_(True)
    return RateOne((x,), x.detach(), lambda: [weight.grad], skips=module.mode == "batch")


def stochastic_depth_spec(mode: str, shape: tuple[int, ...]) -> LayerSpec:
    return LayerSpec(
        "StochasticDepth" + ("" if mode == "row" else f"[{mode}]"),
        "bernoulli",
        make=lambda p: dropkit.nn.StochasticDepth(AddParameter(shape), p, mode=mode),
        inputs=lambda dtype, small: (signed(shape, dtype),),
        functional=stochastic_depth_functional(mode),
        probe=stochastic_depth_probe,
        shared_dims=(1, 2) if mode == "row" else (0, 1, 2),
        single_draw=mode == "batch",
        expectation=True,
        eval_output=lambda m, args: args[0] + m.module(args[0]),
        one=stochastic_depth_one,
    )


STACK = 48


def layer_drop_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    # x = 0: feature i of the output is layer i's weight if the layer ran, else 0.
    weight = module.layers[0].weight
    y = module(torch.zeros(STACK, dtype=dtype), **rng)
    return bernoulli(y, weight.detach(), p, formula="unscaled", leaf=weight)


def layer_drop_one(module: nn.Module, args: Args) -> RateOne:
    weight = module.layers[0].weight
    poison_(weight)
    x = signed((4, STACK)).requires_grad_(True)
    return RateOne((x,), x.detach(), lambda: [weight.grad])


def layer_drop_sequential(module: nn.Module, args: Args) -> torch.Tensor:
    x = args[0]
    for layer in module.layers:
        x = layer(x)
    return x


BRANCH_SPECS = [
    stochastic_depth_spec("row", (64, 3, 2)),
    stochastic_depth_spec("batch", (4, 3, 2)),
    LayerSpec(
        "LayerDrop",
        "bernoulli",
        make=lambda p: dropkit.nn.LayerDrop(layer_stack(STACK), p),
        inputs=lambda dtype, small: (signed((4, STACK), dtype),),
        probe=layer_drop_probe,
        eval_output=layer_drop_sequential,
        one=layer_drop_one,
        holds_rate_tensor=False,  # documented: p stays a float (the decisions are a Python branch)
        grad_params=("layers.0.weight",),
    ),
]


# --- learned rates: concrete and variational dropout ----------------------------------------------


def concrete_functional(
    op: Callable[..., Any], module: nn.Module, args: Args, rate: Any, training: bool, **kw: Any
) -> Any:
    x = args[0]
    dims = tuple(range(x.dim() - 2, x.dim())) if isinstance(module.module, nn.Conv2d) else ()
    x = op(x, module.p_logit, training, temperature=module.temperature, broadcast_dims=dims, **kw)
    return module.module(x)


def concrete_probe(shape: tuple[int, ...]) -> Callable[..., Observation]:
    def probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
        seen, remove = capture_input(module.module)
        try:
            module(signed(shape, dtype), **rng)
        finally:
            remove()
        return Observation(seen[0])  # the relaxed-mask input of the wrapped layer

    return probe


def concrete_spec(name: str, layer: Callable[[], nn.Module], shape: tuple[int, ...]) -> LayerSpec:
    return LayerSpec(
        name,
        "learned",
        make=lambda p: dropkit.nn.ConcreteDropout(layer(), p),
        inputs=lambda dtype, small: (signed((2, *shape[1:]) if small else shape, dtype),),
        functional=Functional(F.concrete_dropout, concrete_functional, rate_name=None),
        rate_name="init_p",
        rate_check="open",
        holds_rate_tensor=False,  # the rate is the parameter p_logit
        probe=concrete_probe(shape),
        eval_output=lambda m, args: m.module(args[0]),
        grad_params=("p_logit",),
        exact_layouts=False,  # the wrapped layer's matmul / convolution
    )


def variational_probe(shape: tuple[int, ...]) -> Callable[..., Observation]:
    def probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
        x = signed(shape, dtype)
        y = module(x, **rng)
        with torch.no_grad():
            mean, variance = module.moments(x)
        return Observation(y, mean=mean.double(), sd=(variance.double() + 1e-8).sqrt())

    return probe


def variational_spec(cls: type[nn.Module], args: tuple[Any, ...], shape: tuple[int, ...]) -> LayerSpec:
    return LayerSpec(
        cls.__name__,
        "learned",
        make=lambda p: cls(*args),
        inputs=lambda dtype, small: (signed((1, *shape[1:]) if small else shape, dtype),),
        rate_name=None,
        holds_rate_tensor=False,
        probe=variational_probe(shape),
        expectation=True,
        eval_output=lambda m, a: m.export()(a[0]),
        dtypes=(torch.float64,),
        exact_layouts=False,
    )


LEARNED_SPECS = [
    concrete_spec("ConcreteDropout[Linear]", lambda: nn.Linear(16, 8), (32, 16)),
    concrete_spec("ConcreteDropout[Conv2d]", lambda: nn.Conv2d(4, 3, 3), (4, 4, 6, 6)),
    variational_spec(dropkit.nn.VariationalLinear, (16, 12), (64, 16)),
    variational_spec(dropkit.nn.VariationalConv1d, (3, 4, 3), (4, 3, 34)),
    variational_spec(dropkit.nn.VariationalConv2d, (3, 4, 3), (2, 3, 10, 10)),
    variational_spec(dropkit.nn.VariationalConv3d, (2, 3, 3), (2, 2, 6, 6, 6)),
    variational_spec(dropkit.nn.SparseVariationalLinear, (16, 12), (64, 16)),
    variational_spec(dropkit.nn.SparseVariationalConv1d, (3, 4, 3), (4, 3, 34)),
    variational_spec(dropkit.nn.SparseVariationalConv2d, (3, 4, 3), (2, 3, 10, 10)),
    variational_spec(dropkit.nn.SparseVariationalConv3d, (2, 3, 3), (2, 2, 6, 6, 6)),
]


# --- composites: the transformer block and the embedding layer ----------------------------------

D_MODEL, HEADS, D_FF = 16, 2, 32


def block(p: float, **rates: Any) -> nn.Module:
    return dropkit.nn.TransformerEncoderBlock(D_MODEL, HEADS, D_FF, dropout=p, **rates)


def block_eval(module: nn.Module, args: Args) -> torch.Tensor:
    # Documented: no dropout in eval, i.e. the same block with every rate 0.
    twin = block(0.0).to(next(module.parameters()).dtype)
    twin.load_state_dict(module.state_dict())
    return twin.eval()(*args)


def block_one(module: nn.Module, args: Args) -> RateOne:
    x = signed((2, 5, D_MODEL)).requires_grad_(True)
    params = list(module.parameters())
    # Pre-LN: both sub-layer outputs dropped, both residual adds give x back bit for bit.
    return RateOne((x,), x.detach(), lambda: [param.grad for param in params])


EMBED_VOCAB, EMBED_DIM, EMBED_LEN = 50, 8, 16


def token_embedding(p: float) -> nn.Module:
    return dropkit.nn.TokenAndPositionEmbedding(EMBED_VOCAB, EMBED_DIM, EMBED_LEN, p=p)


def token_embedding_eval(module: nn.Module, args: Args) -> torch.Tensor:
    tokens = args[0]
    table = module.positional_table[: tokens.shape[1]]
    return module.token(tokens) * math.sqrt(EMBED_DIM) + table


def token_embedding_probe(module: nn.Module, p: float, dtype: torch.dtype, **rng: Any) -> Observation:
    seen, remove = capture_input(module.dropout)
    try:
        y = module(torch.randint(0, EMBED_VOCAB, (64, EMBED_LEN)))
    finally:
        remove()
    if seen[0].requires_grad:
        seen[0].retain_grad()
    return bernoulli(y, seen[0], p, leaf=seen[0])


def token_embedding_one(module: nn.Module, args: Args) -> RateOne:
    weight = module.token.weight
    poison_(weight)
    tokens = torch.arange(EMBED_VOCAB).reshape(5, 10)
    return RateOne((tokens,), torch.zeros(5, 10, EMBED_DIM), lambda: [weight.grad])


COMPOSITE_SPECS = [
    LayerSpec(
        "TransformerEncoderBlock",
        "bernoulli",
        make=block,
        inputs=lambda dtype, small: (signed((1, 3, D_MODEL) if small else (2, 5, D_MODEL), dtype),),
        rate_name="dropout",
        extra_rate_names=("attention_dropout", "residual_dropout", "ffn_dropout"),
        holds_rate_tensor=False,  # its dropout layers hold them
        eval_output=block_eval,
        exact_zero=False,  # a training call takes the explicit attention path, eval torch's kernel
        one=block_one,
        seeded=False,
        steps_per_call=4,  # attention, two residual dropouts, feed-forward dropout
        dtypes=(),
        exact_layouts=False,
    ),
    LayerSpec(
        "TokenAndPositionEmbedding",
        "bernoulli",
        make=token_embedding,
        inputs=lambda dtype, small: (torch.randint(0, EMBED_VOCAB, (2, 3) if small else (4, EMBED_LEN)),),
        holds_rate_tensor=False,  # its Dropout holds it
        probe=token_embedding_probe,
        expectation=True,
        eval_output=token_embedding_eval,
        one=token_embedding_one,
        seeded=False,
        grad_params=("token.weight",),
        dtypes=(),
    ),
]


SPECS: list[LayerSpec] = [
    *DROPOUT_SPECS,
    *GAUSSIAN_SPECS,
    *DROPBLOCK_SPECS,
    *ATTENTION_SPECS,
    *WEIGHT_SPECS,
    *ZONEOUT_SPECS,
    *BRANCH_SPECS,
    *LEARNED_SPECS,
    *COMPOSITE_SPECS,
]


def where(predicate: Callable[[LayerSpec], bool] | None = None, **flags: Any) -> list[LayerSpec]:
    """The specs whose attributes have the given values (``attr=...``, Ellipsis: not None) and
    that satisfy ``predicate``: the specs a check applies to."""
    return [
        spec
        for spec in SPECS
        if all(
            (getattr(spec, name) is not None) if value is ... else getattr(spec, name) == value
            for name, value in flags.items()
        )
        and (predicate is None or predicate(spec))
    ]


def ids(specs: list[LayerSpec]) -> list[str]:
    return [spec.name for spec in specs]
