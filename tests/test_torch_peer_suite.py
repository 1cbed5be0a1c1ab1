"""PyTorch's own dropout tests, ported to run against dropkit.

Two sources in pytorch/pytorch: ``test/nn/test_dropout.py`` (``TestDropoutNN`` and
``TestDropoutNNDeviceType``: statistics, gradients, in-place and eval behaviour, memory layout,
ranks of the channel variants, empty input) and the OpInfos of ``nn.functional.dropout``,
``dropout2d``, ``dropout3d``, ``alpha_dropout`` and ``feature_alpha_dropout`` in
``torch/testing/_internal/common_methods_invocations.py`` (their sample inputs, dtypes, in-place
variants, ``supports_out=False``, gradcheck, gradgradcheck, forward AD, forward-over-reverse).

Rewritten, not copied: every check runs on dropkit and, where the behaviour is shared, on torch
too (``impl`` is ``dropkit`` or ``torch``), to show parity.  Statistical checks derive their
standard deviation here and allow ``SIGMAS`` of it, after asserting that the bound is tight
enough to reject the wrong answer it guards against.  Randomness is fixed: dropkit takes an
explicit ``seed=`` key, torch's global generator is reseeded before each call.

Where dropkit deliberately differs, the test asserts both behaviours; README.md's "Differences
from torch.nn" lists each of them with the name of its test.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from torch.testing import make_tensor

import dropkit
from tests.conftest import SIGMAS, binomial_tolerance

# --- the two implementations ------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """torch's dropout family or dropkit's: the functional namespace and the module namespace."""

    name: str
    functional: Any
    modules: Any

    @property
    def is_dropkit(self) -> bool:
        return self.name == "dropkit"

    def op(self, name: str, seed: int = 0) -> Callable[..., torch.Tensor]:
        """The functional ``name`` with its mask fixed by ``seed``: every call draws the same one
        (dropkit: an explicit key; torch: the global generator reseeded before the call)."""
        fn = getattr(self.functional, name)
        if self.is_dropkit:
            key = dropkit.make_key(seed)

            def keyed(*args: Any, **kwargs: Any) -> torch.Tensor:
                out: torch.Tensor = fn(*args, seed=key, **kwargs)
                return out

            return keyed

        def reseeded(*args: Any, **kwargs: Any) -> torch.Tensor:
            torch.manual_seed(seed)
            out: torch.Tensor = fn(*args, **kwargs)
            return out

        return reseeded


DROPKIT = Impl("dropkit", dropkit.functional, dropkit.nn)
TORCH = Impl("torch", torch.nn.functional, torch.nn)
BOTH = pytest.mark.parametrize("impl", [DROPKIT, TORCH], ids=["dropkit", "torch"])

# --- exact value sets -------------------------------------------------------------------------

# SELU's negative saturation -lambda * alpha, taken from torch's SELU (not from dropkit).
ALPHA_PRIME = float(TF.selu(torch.tensor(-math.inf, dtype=torch.float64)))


def engine_rate(p: float, impl: Impl) -> float:
    """The drop rate each library's scale is computed from: torch's ``p``; dropkit's realised rate
    ``round(p 2**16) / 2**16`` (a difference: dropkit scales by the keep rate its masks realise,
    so that the expectation is exact; see the README table)."""
    return round(p * 2**16) / 2**16 if impl.is_dropkit else p


def alpha_affine(p: float) -> tuple[float, float, float]:
    """Alpha dropout's ``(a, b, dropped value)`` from Klambauer et al.: ``a = (q (1 + p alpha'^2))^-1/2``,
    ``b = -a alpha' p``; a kept unit is ``a x + b``, a dropped one ``a alpha' + b``."""
    q = 1.0 - p
    a = 1.0 / math.sqrt(q * (1.0 + p * ALPHA_PRIME**2))
    b = -a * ALPHA_PRIME * p
    return a, b, a * ALPHA_PRIME + b


def rounding(dtype: torch.dtype) -> float:
    """Relative error allowed for a value computed from the input and rounded to ``dtype``: a
    couple of roundings (torch scales in the input dtype, dropkit rounds once from float32)."""
    return 2.0 * torch.finfo(dtype).eps


def split_dropout(out: torch.Tensor, x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Assert that every output element is 0 or ``x / (1 - p)``; return where it is kept and where
    dropped (an element of ``x == 0`` is neither: it cannot tell)."""
    got, expected = out.detach().double(), x.detach().double() / (1.0 - p)
    kept = (got - expected).abs() <= rounding(out.dtype) * expected.abs()
    dropped = got == 0
    assert (kept | dropped).all(), "an output is neither 0 nor x / (1 - p)"
    return kept & ~dropped, dropped & ~kept


def split_alpha(out: torch.Tensor, x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Assert that every output element is ``a x + b`` (kept) or ``a alpha' + b`` (dropped); return
    where it is kept and where dropped (an element that rounds to both is neither)."""
    a, b, dropped_value = alpha_affine(p)
    got, kept_value = out.detach().double(), a * x.detach().double() + b
    kept = (got - kept_value).abs() <= rounding(out.dtype) * (kept_value.abs() + 1.0)
    dropped = (got - dropped_value).abs() <= rounding(out.dtype) * (abs(dropped_value) + 1.0)
    assert (kept | dropped).all(), "an output is neither a x + b nor a alpha' + b"
    return kept & ~dropped, dropped & ~kept


def kept_of(split: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The keep mask of an output whose every element is told apart (inputs made for statistics)."""
    kept, dropped = split
    assert (kept ^ dropped).all(), "an element is both or neither"
    return kept


def assert_whole_channels(split: tuple[torch.Tensor, torch.Tensor], first_shared: int) -> None:
    """One draw per channel: no channel (the dims from ``first_shared`` on) has both a kept and a
    dropped element."""
    kept, dropped = (m.flatten(first_shared) if m.dim() > first_shared else m.unsqueeze(-1) for m in split)
    assert not (kept.any(-1) & dropped.any(-1)).any(), "a channel is partly dropped"


# --- TestDropoutNN ----------------------------------------------------------------------------


def alpha_moment_sds(p: float, group: int, groups: int) -> tuple[float, float]:
    """Standard deviations of ``mean(y)`` and ``mean(y**2)`` for alpha dropout of ``group * groups``
    i.i.d. N(0, 1) inputs with one keep draw per group of ``group`` elements (their expectations
    are 0 and 1).  Within a group only the shared offset (``b`` or the dropped value) correlates
    two outputs: ``E[y_i y_j] = q b^2 + p d^2`` and ``E[y_i^2 y_j^2] = q (a^2 + b^2)^2 + p d^4``."""
    a, b, d = alpha_affine(p)
    q, n = 1.0 - p, group * groups
    assert abs(q * b + p * d) < 1e-12, "E[y] = 0"
    assert abs(q * (a * a + b * b) + p * d * d - 1.0) < 1e-12, "E[y^2] = 1"
    cross = q * b * b + p * d * d
    fourth = q * (3 * a**4 + 6 * a * a * b * b + b**4) + p * d**4
    cross_squares = q * (a * a + b * b) ** 2 + p * d**4 - 1.0
    var_sum = group + group * (group - 1) * cross
    var_sum_squares = group * (fourth - 1.0) + group * (group - 1) * cross_squares
    return math.sqrt(groups * var_sum) / n, math.sqrt(groups * var_sum_squares) / n


ALPHA_CASES = [
    ("AlphaDropout", (5000,)),
    ("FeatureAlphaDropout", (1000, 3, 2, 4, 5)),
    ("FeatureAlphaDropout", (50, 20, 32, 32)),  # torch: 64 x 64 maps; the bound holds either way
]


@BOTH
@pytest.mark.parametrize(("layer", "shape"), ALPHA_CASES, ids=[f"{c[0]}-{len(c[1])}d" for c in ALPHA_CASES])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_alpha_dropout_keeps_zero_mean_and_unit_variance(
    impl: Impl, layer: str, shape: tuple[int, ...], p: float
) -> None:
    x = torch.randn(shape)
    group = math.prod(shape[2:]) if layer == "FeatureAlphaDropout" else 1
    groups = x.numel() // group
    sd_mean, sd_square = alpha_moment_sds(p, group, groups)
    # Tight enough to reject the uncorrected mask (mean alpha' p) and inverted dropout (E[y^2] = 1/q).
    assert SIGMAS * sd_mean < abs(ALPHA_PRIME) * p
    assert SIGMAS * sd_square < 1.0 / (1.0 - p) - 1.0

    leaf = x.clone().requires_grad_()
    out = getattr(impl.modules, layer)(p)(leaf)
    out.backward(torch.ones_like(out))
    # The gradient is the mask, unambiguous where a value could round to either set: a on kept
    # units, 0 on dropped ones.
    a, b, dropped_value = alpha_affine(engine_rate(p, impl))
    assert leaf.grad is not None
    kept = leaf.grad != 0
    torch.testing.assert_close(leaf.grad[kept], torch.full_like(leaf.grad[kept], a))
    y = out.detach().double()
    torch.testing.assert_close(y[kept], a * x.double()[kept] + b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y[~kept], torch.full_like(y[~kept], dropped_value), rtol=1e-6, atol=1e-6)
    if group > 1:
        assert_whole_channels((kept, ~kept), 2)
    assert abs(y.mean().item()) <= SIGMAS * sd_mean
    assert abs(y.square().mean().item() - 1.0) <= SIGMAS * sd_square
    assert abs(kept.double().mean().item() - (1.0 - p)) <= binomial_tolerance(1.0 - p, groups)


STANDARD_LAYERS = {
    "Dropout": (4, 6),
    "Dropout1d": (2, 3, 4),
    "Dropout2d": (2, 3, 4, 5),
    "Dropout3d": (2, 3, 4, 5, 6),
    "AlphaDropout": (4, 6),
    "FeatureAlphaDropout": (2, 3, 4, 5),
}
FUNCTIONAL_OF = {
    "Dropout": "dropout",
    "Dropout1d": "dropout1d",
    "Dropout2d": "dropout2d",
    "Dropout3d": "dropout3d",
    "AlphaDropout": "alpha_dropout",
    "FeatureAlphaDropout": "feature_alpha_dropout",
}


@BOTH
@pytest.mark.parametrize("layer", list(STANDARD_LAYERS))
@pytest.mark.parametrize("p", [-0.1, 1.1])
def test_rate_outside_zero_one_is_a_value_error_in_every_mode(impl: Impl, layer: str, p: float) -> None:
    with pytest.raises(ValueError, match=re.escape(str(p))):
        getattr(impl.modules, layer)(p)
    op = getattr(impl.functional, FUNCTIONAL_OF[layer])
    x = torch.ones(STANDARD_LAYERS[layer])
    for training in (True, False):
        with pytest.raises(ValueError, match=re.escape(str(p))):
            op(x, p, training)


# --- TestDropoutNNDeviceType ------------------------------------------------------------------

CL = torch.channels_last
CF = torch.contiguous_format
MODULE_CASES = [
    ("Dropout", (1000,), torch.float32, CF),
    ("Dropout", (1000,), torch.bfloat16, CF),
    ("Dropout1d", (12, 13, 11), torch.float64, CF),
    ("Dropout2d", (1000, 3, 4, 5), torch.float32, CF),
    ("Dropout2d", (1000, 3, 4, 5), torch.float32, CL),
    ("Dropout3d", (1000, 3, 2, 4, 5), torch.float32, CF),
]


@BOTH
@pytest.mark.parametrize(
    ("layer", "shape", "dtype", "memory_format"),
    MODULE_CASES,
    ids=[f"{c[0]}-{str(c[2])[6:]}-{'cl' if c[3] is CL else 'cf'}" for c in MODULE_CASES],
)
def test_module_training_statistics_gradient_inplace_and_eval(
    impl: Impl, layer: str, shape: tuple[int, ...], dtype: torch.dtype, memory_format: torch.memory_format
) -> None:
    p = 0.2
    q = 1.0 - p
    x = torch.full(shape, q, dtype=dtype)
    channel = math.prod(shape[2:]) if layer != "Dropout" else 1
    draws = x.numel() // channel
    assert binomial_tolerance(q, draws) < min(p, q)  # rejects a rate that is off by p
    for inplace in (False, True):
        module = getattr(impl.modules, layer)(p, inplace)
        leaf = x.clone(memory_format=memory_format).requires_grad_()
        out = module(leaf + 0 if inplace else leaf)  # in place needs a non-leaf
        assert out.is_contiguous(memory_format=memory_format)
        split = split_dropout(out, x, engine_rate(p, impl))
        kept = kept_of(split)
        if channel > 1:
            assert_whole_channels(split, 2)
        assert abs(kept.double().mean().item() - q) <= binomial_tolerance(q, draws)
        out.backward(x)
        assert leaf.grad is not None
        assert leaf.grad.is_contiguous(memory_format=memory_format)
        assert torch.equal(leaf.grad, out)  # dy * mask / q with dy = x: the output's numbers
    for inplace in (False, True):
        module = getattr(impl.modules, layer)(p, inplace).eval()
        out = module(x)
        assert torch.equal(out, x)
        assert out is x or not impl.is_dropkit
    assert f"p={p}" in repr(module)
    assert str(module) == repr(module)


@BOTH
@pytest.mark.parametrize("layer", ["Dropout", "Dropout2d", "Dropout3d"])
@pytest.mark.parametrize("memory_format", [CF, CL], ids=["cf", "cl"])
def test_zero_and_near_zero_rate_keep_a_strided_input(
    impl: Impl, layer: str, memory_format: torch.memory_format
) -> None:
    # p = 1e-10 takes the computing path (no element is dropped) and returns a dense tensor in
    # the input's layout; p = 0 returns the input, strides and all.
    for p in (0.0, 1e-10):
        strided = torch.empty(2, 3, 3, 6, memory_format=memory_format)[..., ::2]
        strided.copy_(torch.ones(2, 3, 3, 3))
        out = getattr(impl.modules, layer)(p=p)(strided)
        assert torch.equal(out, strided)
        if p == 0.0:
            assert out.stride() == strided.stride()
            assert out is strided or not impl.is_dropkit  # torch: a view for unbatched Dropout3d
        else:
            assert out.is_contiguous(memory_format=memory_format)


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(perm.index(dim) for dim in range(len(perm)))


@BOTH
def test_output_follows_the_stride_order_of_any_permuted_or_sliced_input(impl: Impl) -> None:
    ones = torch.ones(2, 3, 4, 5)
    for perm in itertools.permutations(range(4)):
        for shift in [(0, 0), (1, 0), (0, 1), (1, 1)]:
            x = ones.permute(perm).contiguous().permute(_inverse(perm))[shift[0] :, shift[1] :]
            for p in (1e-10, 0.3, 0.5, 0.7):
                out = impl.modules.Dropout(p=p)(x)
                assert out.permute(perm).is_contiguous()
                kept = kept_of(split_dropout(out, x, engine_rate(p, impl)))
                if p == 1e-10:
                    assert kept.all()
                else:
                    # At least 40 elements: P(nothing dropped) <= 0.7**40 < 1e-6.
                    assert not kept.all()


CHANNEL_LAYERS = {"Dropout1d": 1, "Dropout2d": 2, "Dropout3d": 3}


@BOTH
@pytest.mark.parametrize("layer", list(CHANNEL_LAYERS))
def test_channel_dropout_drops_whole_channels(impl: Impl, layer: str) -> None:
    x = torch.ones((10, 4) + (2,) * CHANNEL_LAYERS[layer])
    for inplace in (False, True):
        out = getattr(impl.modules, layer)(p=0.5, inplace=inplace)(x.clone())
        split = split_dropout(out, x, 0.5)
        assert_whole_channels(split, 2)
        per_channel = kept_of(split).flatten(2).all(-1)
        assert per_channel.any()  # 40 draws: both outcomes occur
        assert not per_channel.all()


@BOTH
@pytest.mark.parametrize(("layer", "shape"), [("Dropout1d", (50, 2)), ("Dropout3d", (50, 2, 2, 2))])
def test_unbatched_input_is_a_batch_of_one(impl: Impl, layer: str, shape: tuple[int, ...]) -> None:
    op = impl.op(FUNCTIONAL_OF[layer], seed=7)
    x = torch.rand(shape)
    for inplace in (False, True):
        unbatched = op(x.clone(), 0.5, True, inplace)
        batched = op(x.clone().unsqueeze(0), 0.5, True, inplace).squeeze(0)
        assert torch.equal(unbatched, batched)
        assert_whole_channels(split_dropout(unbatched, x, 0.5), 1)


@BOTH
def test_empty_input_gives_an_empty_output(impl: Impl) -> None:
    # torch returns the empty input itself, dropkit a new empty tensor: same values either way.
    cases = {"dropout": (0,), "dropout1d": (0, 3, 4), "dropout2d": (0, 3, 4, 5), "dropout3d": (0, 3, 4, 5, 6)}
    cases |= {"alpha_dropout": (0, 3), "feature_alpha_dropout": (2, 0, 4, 5)}
    for name, shape in cases.items():
        x = torch.empty(shape)
        out = getattr(impl.functional, name)(x, 0.5, True)
        assert out.shape == x.shape
        assert out.dtype == x.dtype


@BOTH
def test_dropout1d_wrong_rank_is_an_error(impl: Impl) -> None:
    # Difference: torch raises RuntimeError, dropkit ValueError (the argument has the wrong rank).
    error = ValueError if impl.is_dropkit else RuntimeError
    message = r"expects 3-D or 2-D input" if impl.is_dropkit else r"Expected 2D or 3D input"
    for shape in [(1, 2, 2, 2), (2,), ()]:
        for training in (True, False):
            with pytest.raises(error, match=message):
                impl.modules.Dropout1d(p=0.5).train(training)(torch.rand(shape))


def test_dropout2d_reads_three_dim_input_as_one_unbatched_map() -> None:
    # Difference: torch warns and applies 1-D channel dropout to (N, C, L); dropkit reads (C, H, W).
    x = torch.ones(16, 32, 8)
    with pytest.warns(UserWarning, match="assuming that channel-wise 1D dropout behavior is desired"):
        theirs = torch.nn.Dropout2d(p=0.5)(x)
    split = split_dropout(theirs, x, 0.5)
    kept = kept_of(split)
    assert_whole_channels(split, 2)  # one draw per (dim 0, dim 1) ...
    assert not torch.equal(kept.all(2).all(1), kept.any(2).any(1))  # ... not per dim-0 map

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning
        ours = dropkit.nn.Dropout2d(p=0.5)(x, seed=3)
    split = split_dropout(ours, x, 0.5)
    assert_whole_channels(split, 1)  # one draw per channel, shared over H and W
    per_channel = kept_of(split).flatten(1).all(1)
    assert per_channel.any()
    assert not per_channel.all()
    batched = dropkit.nn.Dropout2d(p=0.5)(x.unsqueeze(0), seed=3).squeeze(0)
    assert torch.equal(ours, batched)


@pytest.mark.parametrize(
    ("layer", "shapes"),
    [("Dropout2d", [(1, 2, 2, 2, 2), (1, 2), (3,)]), ("Dropout3d", [(1, 2, 2, 2, 2, 2), (1, 2, 2), (3,)])],
)
def test_dropout2d_and_dropout3d_refuse_other_ranks(layer: str, shapes: list[tuple[int, ...]]) -> None:
    # Difference: torch warns that the rank is deprecated and goes on (in training, up to what
    # its kernel accepts); dropkit raises ValueError, in eval too: a model must not pass
    # evaluation and then fail its first training step.
    name = FUNCTIONAL_OF[layer]
    for shape in shapes:
        x = torch.rand(shape)
        warning = rf"Received a {len(shape)}-D input to {name}"
        with pytest.warns(UserWarning, match=warning):
            assert torch.equal(getattr(torch.nn, layer)(p=0.5).eval()(x), x)
        if len(shape) >= 2:
            with pytest.warns(UserWarning, match=warning):
                dropped = getattr(torch.nn, layer)(p=1.0)(x)
            assert dropped.eq(0).all()
        for training in (True, False):
            with pytest.raises(ValueError, match=rf"{name} expects .* got {len(shape)}-D input of shape"):
                getattr(dropkit.nn, layer)(p=0.5).train(training)(x)


# --- the OpInfos ------------------------------------------------------------------------------

S = 5  # torch's OpInfo size
FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # the OpInfos' dtypes


@dataclass(frozen=True)
class OpSpec:
    """One dropout OpInfo: the functional, the ranks of its sample inputs, the training flag of
    the variant (``None``: both), whether it is alpha dropout, and its dtypes."""

    name: str
    ranks: tuple[int, ...]
    train: bool | None = None
    alpha: bool = False
    variant: str = ""
    dtypes: tuple[torch.dtype, ...] = field(default=FLOATING, repr=False)

    @property
    def id(self) -> str:
        return self.name + (f"-{self.variant}" if self.variant else "")

    def default_training(self, impl: Impl) -> bool:
        # Difference: torch's alpha_dropout and feature_alpha_dropout default to training=False.
        return impl.is_dropkit or not self.alpha

    def shared_from(self, rank: int, impl: Impl) -> int | None:
        """The first dim over which one draw is shared (whole channels), ``None`` for element masks."""
        spatial = {"dropout1d": 1, "dropout2d": 2, "dropout3d": 3}.get(self.name)
        if self.name == "feature_alpha_dropout":
            return 2 if rank > 2 else None
        if spatial is None:
            return None
        if self.name == "dropout2d" and rank == 3 and not impl.is_dropkit:
            return 2  # torch's (N, C, L) reading, see test_dropout2d_reads_three_dim_input_...
        return rank - spatial

    def refused_by_dropkit(self, rank: int) -> bool:
        # Difference: see test_feature_alpha_dropout_needs_two_dims_in_every_mode.
        return self.name == "feature_alpha_dropout" and rank < 2


OPINFOS = [
    OpSpec("dropout", (2, 1, 0)),
    OpSpec("dropout1d", (2, 3)),  # no OpInfo in torch: its valid ranks, as for the others
    OpSpec("dropout2d", (3, 4)),
    OpSpec("dropout3d", (4, 5)),
    OpSpec("alpha_dropout", (2, 1, 0), alpha=True),
    OpSpec("feature_alpha_dropout", (4, 5), train=True, alpha=True, variant="with_train"),
    OpSpec(
        "feature_alpha_dropout",
        (2, 1, 0),
        train=False,
        alpha=True,
        variant="without_train",
        dtypes=(*FLOATING, torch.bool, torch.uint8, torch.int64, torch.complex64),
    ),
]
EACH_OPINFO = pytest.mark.parametrize("spec", OPINFOS, ids=[spec.id for spec in OPINFOS])


@dataclass(frozen=True)
class Sample:
    rank: int
    kwargs: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return (S,) * self.rank

    def p(self) -> float:
        rate: float = self.kwargs.get("p", 0.5)
        return rate

    def training(self, spec: OpSpec, impl: Impl) -> bool:
        flag: bool = self.kwargs.get("training", spec.default_training(impl))
        return flag


def samples(spec: OpSpec) -> Iterator[Sample]:
    """torch's ``sample_inputs_dropout``: every rank x p in {0, 0.5, 1} x the variant's training
    flags, then the last rank with the default arguments."""
    trainings = (True, False) if spec.train is None else (spec.train,)
    for rank, p, training in itertools.product(spec.ranks, (0.0, 0.5, 1.0), trainings):
        yield Sample(rank, {"p": p, "training": training})
    yield Sample(spec.ranks[-1], {})


def torch_warnings(spec: OpSpec, rank: int, impl: Impl) -> contextlib.AbstractContextManager[Any]:
    """torch warns on dropout2d's 3-D input (tested in test_dropout2d_reads_three_dim_...)."""
    if not impl.is_dropkit and spec.name == "dropout2d" and rank == 3:
        return pytest.warns(UserWarning, match="assuming that channel-wise 1D")
    return contextlib.nullcontext()


def quiet_torch_warnings(spec: OpSpec, rank: int, impl: Impl) -> contextlib.AbstractContextManager[Any]:
    """The same warning, ignored where a check calls the op many times (gradcheck)."""
    if not impl.is_dropkit and spec.name == "dropout2d" and rank == 3:
        stack = contextlib.ExitStack()
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="dropout2d: Received a 3D input")
        return stack
    return contextlib.nullcontext()


def check_sample_output(spec: OpSpec, sample: Sample, impl: Impl, x: torch.Tensor, out: torch.Tensor) -> None:
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    p = sample.p()
    if not sample.training(spec, impl) or p == 0.0:
        assert torch.equal(out, x)
        assert out is x or not impl.is_dropkit, "dropkit's identity returns the input itself"
        return
    if p == 1.0:
        assert (out == 0).all()
        return
    split = split_alpha(out, x, p) if spec.alpha else split_dropout(out, x, p)
    first = spec.shared_from(sample.rank, impl)
    if first is not None:
        assert_whole_channels(split, first)


@BOTH
@EACH_OPINFO
def test_opinfo_samples_in_every_dtype(impl: Impl, spec: OpSpec) -> None:
    op = impl.op(spec.name, seed=11)
    for dtype in spec.dtypes:
        for sample in samples(spec):
            x = make_tensor(sample.shape, dtype=dtype, device="cpu")
            if impl.is_dropkit and spec.refused_by_dropkit(sample.rank):
                with pytest.raises(ValueError, match="feature_alpha_dropout expects at least 2-D input"):
                    op(x, **sample.kwargs)
                continue
            with torch_warnings(spec, sample.rank, impl):
                out = op(x, **sample.kwargs)
            check_sample_output(spec, sample, impl, x, out)


@BOTH
@EACH_OPINFO
def test_opinfo_inplace_variant_matches_the_out_of_place_op(impl: Impl, spec: OpSpec) -> None:
    op = impl.op(spec.name, seed=12)
    for sample in samples(spec):
        if impl.is_dropkit and spec.refused_by_dropkit(sample.rank):
            continue  # see test_feature_alpha_dropout_needs_two_dims_in_every_mode
        x = make_tensor(sample.shape, dtype=torch.float32, device="cpu")
        with torch_warnings(spec, sample.rank, impl):
            expected = op(x, **sample.kwargs)
        target = x.clone()
        with torch_warnings(spec, sample.rank, impl):
            out = op(target, **sample.kwargs, inplace=True)
        assert torch.equal(out, expected)
        assert torch.equal(target, expected), "written into the input"
        # torch hands back a view for unbatched channel input, dropkit the input itself.
        assert out is target or not impl.is_dropkit


@BOTH
def test_opinfo_supports_out_is_false(impl: Impl) -> None:
    for spec in OPINFOS:
        x = torch.ones((S,) * spec.ranks[-1])
        with pytest.raises(TypeError, match="unexpected keyword argument 'out'"):
            getattr(impl.functional, spec.name)(x, 0.5, out=torch.empty_like(x))


@BOTH
@EACH_OPINFO
def test_opinfo_gradcheck_gradgradcheck_and_forward_ad_in_float64(impl: Impl, spec: OpSpec) -> None:
    op = impl.op(spec.name, seed=13)
    for sample in samples(spec):
        if impl.is_dropkit and spec.refused_by_dropkit(sample.rank):
            continue  # see test_feature_alpha_dropout_needs_two_dims_in_every_mode
        x = make_tensor(sample.shape, dtype=torch.float64, device="cpu", requires_grad=True)
        kwargs = sample.kwargs

        def out_of_place(x: torch.Tensor, kwargs: dict[str, Any] = kwargs) -> torch.Tensor:
            return op(x, **kwargs)

        def in_place(x: torch.Tensor, kwargs: dict[str, Any] = kwargs) -> torch.Tensor:
            return op(x.clone(), **kwargs, inplace=True)

        fast = sample.rank > 1  # full Jacobians for the small samples, projections for the rest
        with quiet_torch_warnings(spec, sample.rank, impl):
            for fn in (out_of_place, in_place):
                assert torch.autograd.gradcheck(
                    fn, (x,), check_forward_ad=True, check_undefined_grad=True, fast_mode=fast
                )
                assert torch.autograd.gradgradcheck(
                    fn, (x,), check_fwd_over_rev=True, check_rev_over_rev=True, fast_mode=fast
                )


@BOTH
@EACH_OPINFO
def test_forward_ad_and_jvp_replay_the_reverse_mode_mask(impl: Impl, spec: OpSpec) -> None:
    # The Jacobian is diagonal: its diagonal from a forward pass (tangent of ones) and from a
    # backward pass (cotangent of ones) must be the same mask, bit for bit, for the same seed.
    op = impl.op(spec.name, seed=14)
    for sample in samples(spec):
        if impl.is_dropkit and spec.refused_by_dropkit(sample.rank):
            continue  # see test_feature_alpha_dropout_needs_two_dims_in_every_mode
        x = make_tensor(sample.shape, dtype=torch.float64, device="cpu", low=0.5, high=2.0)
        ones = torch.ones_like(x)

        def call(x: torch.Tensor, kwargs: dict[str, Any] = sample.kwargs) -> torch.Tensor:
            return op(x, **kwargs)

        with quiet_torch_warnings(spec, sample.rank, impl):
            plain = call(x)
            with fwAD.dual_level():
                primal, forward = fwAD.unpack_dual(call(fwAD.make_dual(x, ones)))
            leaf = x.clone().requires_grad_()
            (reverse,) = torch.autograd.grad(call(leaf), leaf, ones)
            primal_jvp, jvp = torch.func.jvp(call, (x,), (ones,))
            _, vjp_fn = torch.func.vjp(call, x)
            (vjp,) = vjp_fn(ones)
            tangent = torch.randn_like(x)
            _, random_jvp = torch.func.jvp(call, (x,), (tangent,))
        assert forward is not None
        assert torch.equal(primal, plain)
        assert torch.equal(primal_jvp, plain)
        assert torch.equal(forward, reverse)
        assert torch.equal(jvp, reverse)
        assert torch.equal(vjp, reverse)
        torch.testing.assert_close(random_jvp, reverse * tangent)
        p = sample.p()
        if not sample.training(spec, impl) or p == 0.0:
            assert torch.equal(reverse, ones)
        elif p == 1.0:
            assert (reverse == 0).all()
        else:
            # The derivative is the output's mask: 0 where dropped, 1/q (or a) where kept.
            rate = engine_rate(p, impl)
            kept = kept_of(split_alpha(plain, x, rate) if spec.alpha else split_dropout(plain, x, rate))
            slope = alpha_affine(rate)[0] if spec.alpha else 1.0 / (1.0 - rate)
            torch.testing.assert_close(
                reverse, torch.zeros_like(x).masked_fill(kept, slope), rtol=1e-15, atol=0.0
            )


# --- eval / zero-rate pass-through of any dtype -------------------------------------------------

NON_FLOATING = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128]


@BOTH
@pytest.mark.parametrize("layer", list(STANDARD_LAYERS))
@pytest.mark.parametrize("dtype", NON_FLOATING, ids=[str(d)[6:] for d in NON_FLOATING])
def test_non_floating_input_passes_through_where_the_op_is_the_identity(
    impl: Impl, layer: str, dtype: torch.dtype
) -> None:
    # The OpInfo "feature_alpha_dropout without_train" runs every dtype in eval: the identity.
    x = make_tensor(STANDARD_LAYERS[layer], dtype=dtype, device="cpu")
    op = getattr(impl.functional, FUNCTIONAL_OF[layer])
    for p, training in [(0.5, False), (1.0, False), (0.0, True), (0.0, False)]:
        for inplace in (False, True):
            assert op(x, p, training, inplace) is x
    module = getattr(impl.modules, layer)
    assert module(0.5).eval()(x) is x
    assert module(0.0)(x) is x  # training mode at p = 0
    # The arguments are still checked: a bad rate is an error in eval too, as in torch.
    with pytest.raises(ValueError, match=r"1\.5"):
        op(x, 1.5, False)


@BOTH
@pytest.mark.parametrize("layer", list(STANDARD_LAYERS))
@pytest.mark.parametrize("dtype", NON_FLOATING, ids=[str(d)[6:] for d in NON_FLOATING])
def test_non_floating_input_in_training_is_an_error(impl: Impl, layer: str, dtype: torch.dtype) -> None:
    # Difference: torch raises RuntimeError ("result type Float can't be cast ...") or, for
    # complex input, NotImplementedError; dropkit a TypeError naming the argument and the dtype.
    x = make_tensor(STANDARD_LAYERS[layer], dtype=dtype, device="cpu")
    op = getattr(impl.functional, FUNCTIONAL_OF[layer])
    module = getattr(impl.modules, layer)(0.5)
    if impl.is_dropkit:
        error: Any = TypeError
        message = rf"input must be a floating-point tensor, got dtype {re.escape(str(dtype))}"
    else:
        error = NotImplementedError if dtype.is_complex else RuntimeError
        message = "not implemented for 'Complex" if dtype.is_complex else "can't be cast"
    for call in (lambda: op(x, 0.5, True), lambda: op(x.clone(), 0.5, True, True), lambda: module(x)):
        with pytest.raises(error, match=message):
            call()


@BOTH
def test_inplace_on_a_leaf_that_requires_grad(impl: Impl) -> None:
    # Parity: refused by autograd in training, the leaf itself where the op is the identity.
    for layer, shape in STANDARD_LAYERS.items():
        op = getattr(impl.functional, FUNCTIONAL_OF[layer])
        leaf = torch.rand(shape, requires_grad=True)
        with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
            op(leaf, 0.5, True, True)
        assert op(leaf, 0.5, False, True) is leaf
        assert op(leaf, 0.0, True, True) is leaf


# --- deliberate differences -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), ()])
def test_feature_alpha_dropout_needs_two_dims_in_every_mode(shape: tuple[int, ...]) -> None:
    # Difference: torch returns < 2-D input unchanged in eval and at p = 0 and raises
    # RuntimeError in training; dropkit raises ValueError in every mode.
    x = torch.rand(shape)
    assert TF.feature_alpha_dropout(x, 0.5, False) is x
    assert TF.feature_alpha_dropout(x, 0.0, True) is x
    with pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions"):
        TF.feature_alpha_dropout(x, 0.5, True)
    for p, training in [(0.5, False), (0.0, True), (0.5, True)]:
        with pytest.raises(ValueError, match=rf"expects at least 2-D input .* got {len(shape)}-D input"):
            dropkit.functional.feature_alpha_dropout(x, p, training)
        with pytest.raises(ValueError, match=rf"got {len(shape)}-D input"):
            dropkit.nn.FeatureAlphaDropout(p).train(training)(x)


@pytest.mark.parametrize("name", ["alpha_dropout", "feature_alpha_dropout"])
def test_functional_alpha_dropouts_default_to_training(name: str) -> None:
    # Difference: torch's functional alpha_dropout and feature_alpha_dropout default to
    # training=False (the identity); dropkit's, like every dropkit op, to training=True.
    x = torch.rand(4, 6, 3) + 0.5  # kept values a x + b > 0 > a alpha' + b: told apart
    assert getattr(TF, name)(x) is x
    out = getattr(dropkit.functional, name)(x, seed=5)
    kept = kept_of(split_alpha(out, x, 0.5))
    assert kept.any()
    assert not kept.all()
    assert torch.equal(out, getattr(dropkit.functional, name)(x, 0.5, True, seed=5))


@BOTH
@pytest.mark.parametrize("layer", list(STANDARD_LAYERS))
def test_nan_rate(impl: Impl, layer: str) -> None:
    # Difference: torch's modules accept p=nan and every call raises RuntimeError (in eval too);
    # dropkit raises ValueError at once.
    x = torch.ones(STANDARD_LAYERS[layer])
    op = getattr(impl.functional, FUNCTIONAL_OF[layer])
    nan = float("nan")
    if impl.is_dropkit:
        with pytest.raises(ValueError, match="p must not be NaN"):
            getattr(impl.modules, layer)(nan)
        for training in (True, False):
            with pytest.raises(ValueError, match="p must not be NaN"):
                op(x, nan, training)
        return
    module = getattr(impl.modules, layer)(nan)
    for training in (True, False):
        with pytest.raises(RuntimeError, match="dropout probability has to be between 0 and 1, but got nan"):
            module.train(training)(x)
        with pytest.raises(RuntimeError, match="but got nan"):
            op(x, nan, training)


@BOTH
@pytest.mark.parametrize("layer", list(STANDARD_LAYERS))
def test_flag_and_rate_types(impl: Impl, layer: str) -> None:
    # Parity: a non-bool training flag is a TypeError in both.  Difference: torch reads a bool
    # rate as 0/1 and any truthy inplace as True; dropkit refuses both with a TypeError.
    x = torch.ones(STANDARD_LAYERS[layer])
    op = getattr(impl.functional, FUNCTIONAL_OF[layer])
    module = getattr(impl.modules, layer)
    with pytest.raises(TypeError, match=r"must be bool, not int|training must be a bool, got int"):
        op(x, 0.5, 1)
    if impl.is_dropkit:
        with pytest.raises(TypeError, match=r"p must be a float, got bool \(True\)"):
            op(x, True, True)
        with pytest.raises(TypeError, match=r"p must be a float, got bool"):
            module(True)
        with pytest.raises(TypeError, match=r"inplace must be a bool, got int \(1\)"):
            op(x.clone(), 0.5, True, 1)
        with pytest.raises(TypeError, match=r"inplace must be a bool, got int"):
            module(0.5, 1)
        return
    assert (op(x, True, True) == 0).all()  # p = True is p = 1
    assert module(True).p is True
    target = x.clone()
    op(target, 0.5, True, 1)
    assert not torch.equal(target, x), "inplace=1 wrote into the input"
    assert module(0.5, 1).inplace == 1


@BOTH
@pytest.mark.parametrize("layer", list(STANDARD_LAYERS))
def test_rate_one_on_inf_and_nan_input(impl: Impl, layer: str) -> None:
    # Difference: torch multiplies by a zero mask (0 * inf = nan); dropkit's p = 1 gives exact
    # zeros for any input, with zero gradient.
    shape = STANDARD_LAYERS[layer]
    x = torch.full(shape, math.inf)
    x.view(-1)[::2] = math.nan
    op = getattr(impl.functional, FUNCTIONAL_OF[layer])
    leaf = x.clone().requires_grad_()
    out = op(leaf, 1.0, True)
    if impl.is_dropkit:
        assert torch.equal(out, torch.zeros(shape))
        out.sum().backward()
        assert torch.equal(leaf.grad, torch.zeros(shape))
    else:
        assert out.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_is_scaled_in_float32(dtype: torch.dtype) -> None:
    # Difference: torch scales by 1/q rounded to the input's dtype and rounds the product again;
    # dropkit multiplies in float32 and rounds once.
    p = 0.3
    x = torch.randn(20000).to(dtype)
    torch.manual_seed(0)
    theirs = TF.dropout(x, p, True)
    ours = dropkit.functional.dropout(x, p, True, seed=0)
    in_dtype = x * torch.tensor(1.0 / (1.0 - p), dtype=dtype)
    in_float32 = (x.float() * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)).to(dtype)
    kept_theirs, kept_ours = theirs != 0, ours != 0
    assert torch.equal(theirs[kept_theirs], in_dtype[kept_theirs])
    assert torch.equal(ours[kept_ours], in_float32[kept_ours])
    assert not torch.equal(in_dtype, in_float32), "the two roundings differ on this input"


def test_masks_come_from_dropkits_seed_not_torchs() -> None:
    # Difference: torch's masks follow torch.manual_seed; dropkit's follow dropkit.manual_seed
    # (or seed=/generator=) and leave torch's generator untouched.
    x = torch.ones(256)

    def call_dropkit(dropkit_seed: int, torch_seed: int) -> torch.Tensor:
        dropkit.manual_seed(dropkit_seed)
        torch.manual_seed(torch_seed)
        state = torch.get_rng_state()
        out = dropkit.functional.dropout(x, 0.5)
        assert torch.equal(torch.get_rng_state(), state), "dropkit drew from torch's generator"
        return out

    assert torch.equal(call_dropkit(0, 0), call_dropkit(0, 1))
    assert not torch.equal(call_dropkit(0, 0), call_dropkit(1, 0))
    torch.manual_seed(0)
    first = TF.dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(TF.dropout(x, 0.5), first)
