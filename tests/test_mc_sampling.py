"""T-sample MC prediction: chunk invariance, per-sample keys, trunk caching, streaming statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropkit
from dropkit.mc.mode import NoDropoutFoundWarning, mc_dropout
from dropkit.mc.sampling import iter_mc_samples, mc_predict
from dropkit.mc.streaming import MCSummary, RunningMoments
from dropkit.mc.trunk import split_trunk
from tests.test_mc_mode import HFStyleAttention, ThirdPartyBlock, TimmStyleAttention


def _mixed_model() -> nn.Module:
    """Every kind of stochastic op, behind a deterministic trunk with BatchNorm (float64)."""
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        ThirdPartyBlock(8, 0.3),
        nn.Dropout(0.2),
        dropkit.nn.DropConnect(nn.Linear(8, 8), p=0.3),
        dropkit.nn.GaussianDropout(0.2),
        dropkit.nn.VariationalLinear(8, 8),
        dropkit.nn.StochasticDepth(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)), p=0.3, mode="row"),
        nn.Linear(8, 3),
    ).double()


def _attention_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), TimmStyleAttention(), HFStyleAttention(), nn.Dropout(0.1)).double()


# -- shapes and reproducibility ----------------------------------------------------------------


def test_sample_axis_first_and_t_equal_one() -> None:
    model = _mixed_model().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    assert mc_predict(model, x, 7, seed=0).shape == (7, 5, 3)
    assert mc_predict(model, x, 1, seed=0).shape == (1, 5, 3)
    assert mc_predict(model, x, 4, seed=0, reduce="mean").shape == (5, 3)


@pytest.mark.parametrize("factory", [_mixed_model, _attention_model], ids=["mixed", "attention"])
def test_same_seed_same_samples_whatever_the_chunking(factory: object) -> None:
    model = factory().eval()  # type: ignore[operator]
    x = torch.randn(3, 6, dtype=torch.float64) if factory is _mixed_model else torch.randn(3, 5, 4).double()
    loop = mc_predict(model, x, 9, seed=11, chunk_size=1, trunk=None)
    assert not torch.equal(loop[0], loop[1])
    for options in ({"chunk_size": 2}, {"chunk_size": 9}, {"chunk_size": 50}, {"memory_budget": 1}, {}):
        batched = mc_predict(model, x, 9, seed=11, trunk=None, **options)  # type: ignore[arg-type]
        torch.testing.assert_close(batched, loop, rtol=0, atol=1e-12)
    assert not torch.equal(mc_predict(model, x, 9, seed=12, trunk=None), loop)


def test_sample_t_uses_key_seed_ordinal_t() -> None:
    model = nn.Sequential(nn.Dropout(0.5), dropkit.nn.Dropout(0.25)).eval()
    x = torch.randn(3, 16)
    samples = mc_predict(model, x, 5, seed=42, chunk_size=2)
    for t in range(5):
        first = dropkit.functional.dropout(x, 0.5, seed=dropkit.make_key(42, 0, t))
        expected = dropkit.functional.dropout(first, 0.25, seed=dropkit.make_key(42, 1, t))
        assert torch.equal(samples[t], expected)


def test_seed_none_follows_manual_seed() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    x = torch.randn(2, 4)
    dropkit.manual_seed(3)
    first, second = mc_predict(model, x, 4), mc_predict(model, x, 4)
    dropkit.manual_seed(3)
    assert torch.equal(mc_predict(model, x, 4), first)
    assert not torch.equal(first, second)


def test_chunks_follow_the_memory_budget() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    shapes = [chunk.shape[0] for chunk in iter_mc_samples(model, x, 10, memory_budget=1, seed=0)]
    assert shapes == [1] * 10
    shapes = [chunk.shape[0] for chunk in iter_mc_samples(model, x, 10, memory_budget=2**30, seed=0)]
    assert shapes == [10]  # a measuring forward (discarded) sizes the chunks; then one chunk of all


def test_warns_when_the_model_has_no_dropout() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with pytest.warns(NoDropoutFoundWarning):
        samples = mc_predict(model, torch.randn(2, 4), 3, seed=0)
    assert torch.equal(samples[0], samples[2])


def test_batchnorm_untouched_and_flags_restored() -> None:
    model = _mixed_model().train()
    x = torch.randn(5, 6, dtype=torch.float64)
    model(x)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    mc_predict(model, x, 20, seed=0, chunk_size=7)
    for name, buffer in model.named_buffers():
        if not name.endswith("rng_step"):
            assert torch.equal(buffer, before[name]), name
    assert all(module.training for module in model.modules())
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_inside_an_active_mode_its_selection_is_used() -> None:
    model = nn.Sequential(nn.Dropout(0.5), dropkit.nn.Dropout(0.5)).eval()
    x = torch.ones(2, 64)
    with mc_dropout(model, include=dropkit.nn.Dropout) as handle:
        samples = mc_predict(model, x, 3, seed=0)
        assert handle.active
        with pytest.raises(ValueError, match="already in an MC dropout mode"):
            mc_predict(model, x, 3, exclude="0")
    # Only dropkit's layer was on: every output is 0 or 1 / (1 - 0.5), never 4.
    assert set(samples.unique().tolist()) == {0.0, 2.0}
    assert not model[1].training


def test_exception_during_sampling_restores() -> None:
    class FailsOnBigBatches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 2:
                raise RuntimeError("too big")
            return self.drop(x)

    model = FailsOnBigBatches().eval()
    dropout = F.dropout
    with pytest.raises(RuntimeError, match="too big"):
        mc_predict(model, torch.randn(2, 4), 4, seed=0, chunk_size=2, trunk=None)
    assert F.dropout is dropout
    assert not model._forward_hooks
    assert not model.drop._forward_pre_hooks


def test_early_close_restores() -> None:
    model = nn.Sequential(nn.Linear(4, 4), dropkit.nn.Dropout(0.5)).eval()
    chunks = iter_mc_samples(model, torch.randn(2, 4), 10, chunk_size=2, seed=0)
    next(chunks)
    assert model[1].training
    chunks.close()
    assert not model[1].training


def test_sequence_first_layout_needs_chunk_size_one() -> None:
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(x.transpose(0, 1)).transpose(0, 1)  # dropout sees (L, N, E)

    model = SequenceFirst().eval()
    x = torch.randn(2, 3, 8)  # N = 2, L = 3
    samples = mc_predict(model, x, 4, seed=0, chunk_size=1)
    assert not torch.equal(samples[0], samples[1])
    with pytest.raises(RuntimeError, match="chunk_size=1"):
        mc_predict(model, x, 4, seed=0, chunk_size=4)


def test_multihead_attention_is_chunk_invariant() -> None:
    attention = nn.MultiheadAttention(8, 2, dropout=0.5)  # sequence-first, but batch-major inside

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq = x.transpose(0, 1)
            return self.attention(seq, seq, seq, need_weights=False)[0].transpose(0, 1)

    model = SequenceFirst().double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    loop = mc_predict(model, x, 4, seed=0, chunk_size=1)
    assert not torch.equal(loop[0], loop[1])
    torch.testing.assert_close(mc_predict(model, x, 4, seed=0, chunk_size=4), loop, rtol=0, atol=1e-12)


# -- trunk caching -----------------------------------------------------------------------------


class CustomForward(nn.Module):
    """A CNN with dropout only in the head, a root-level functional dropout and a size() use."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        h = self.pool(self.features(x)).view(batch, -1)
        h = F.relu(self.fc1(h))
        h = F.dropout(h, 0.25, self.training)
        return self.fc2(self.drop(h).view(batch, -1))


def test_auto_trunk_found_and_identical_to_uncached() -> None:
    model = CustomForward().double().eval()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    with mc_dropout(model) as handle:
        split = split_trunk(model, handle, (x,))
    assert split is not None
    code = split.head.code
    assert "fc1" not in code
    assert "features" not in code
    assert "fc2" in code
    assert "dropout" in code
    assert "size" in code
    uncached = mc_predict(model, x, 6, seed=5, chunk_size=1, trunk=None)
    torch.testing.assert_close(mc_predict(model, x, 6, seed=5, chunk_size=1), uncached, rtol=0, atol=0)
    torch.testing.assert_close(mc_predict(model, x, 6, seed=5, chunk_size=4), uncached, rtol=0, atol=1e-12)


def test_auto_trunk_of_sequential_and_user_trunk() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    model = model.double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    with mc_dropout(model) as handle:
        split = split_trunk(model, handle, (x,))
    assert split is not None
    assert split.trunk_nodes == 4
    uncached = mc_predict(model, x, 5, seed=1, chunk_size=1, trunk=None)
    torch.testing.assert_close(mc_predict(model, x, 5, seed=1, chunk_size=1), uncached, rtol=0, atol=0)
    by_hand = mc_predict(model, x, 5, seed=1, chunk_size=1, trunk=model[:3], head=model[3:])
    torch.testing.assert_close(by_hand, uncached, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trunk ran a stochastic op"):
        mc_predict(model, x, 5, trunk=model[:4], head=model[4:])
    with pytest.raises(ValueError, match=r"trunk must return the batch \(3\) on dim 0"):
        mc_predict(model, x, 5, trunk=lambda v: model[:3](v).T, head=model[3:])


def test_no_trunk_when_forward_depends_on_training() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.fc(x)) if self.training else self.fc(x)

    model = Branchy().eval()
    with mc_dropout(model, exclude=nn.Dropout) as handle:
        assert split_trunk(model, handle, (torch.randn(2, 4),)) is None
        handle.intercepted_calls += 1  # silence the nothing-found warning of this test


def test_trunk_cache_runs_the_trunk_once() -> None:
    calls = []
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).eval()
    model[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    mc_predict(model, torch.randn(3, 4), 10, seed=0, chunk_size=5)
    assert calls == [3]
    calls.clear()
    mc_predict(model, torch.randn(3, 4), 10, seed=0, chunk_size=5, trunk=None)
    assert calls == [15, 15]


# -- streaming statistics ----------------------------------------------------------------------


def test_streaming_stats_equal_stacked_computation() -> None:
    model = _mixed_model().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    samples = mc_predict(model, x, 23, seed=9, transform="softmax")
    summary = mc_predict(model, x, 23, seed=9, transform="softmax", reduce="stats", chunk_size=5)
    assert isinstance(summary, MCSummary)
    assert summary.count == 23
    torch.testing.assert_close(summary.mean, samples.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(summary.variance, samples.var(0, unbiased=False), rtol=0, atol=1e-12)
    torch.testing.assert_close(summary.sample_variance, samples.var(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(summary.std, samples.std(0, unbiased=False), rtol=0, atol=1e-12)
    entropy = -(samples * samples.log()).sum(-1).mean(0)
    torch.testing.assert_close(summary.mean_entropy, entropy, rtol=0, atol=1e-12)
    votes = F.one_hot(samples.argmax(-1), 3).sum(0)
    assert torch.equal(summary.votes, votes)
    mean = mc_predict(model, x, 23, seed=9, transform="softmax", reduce="mean", chunk_size=4)
    torch.testing.assert_close(mean, samples.mean(0), rtol=0, atol=1e-12)


def test_running_moments_merge_any_split() -> None:
    data = torch.randn(50, 3, dtype=torch.float32) * 100 + 1e4  # a large offset: naive sums fail
    whole = RunningMoments().update(data)
    parts = RunningMoments()
    for piece in data.split([1, 7, 20, 22]):
        parts.merge(RunningMoments().update(piece))
    reference = data.double()
    for moments in (whole, parts):
        assert moments.count == 50
        assert moments.mean.dtype == torch.float32
        torch.testing.assert_close(moments.mean.double(), reference.mean(0), rtol=1e-7, atol=0)
        torch.testing.assert_close(moments.m2, reference.var(0, unbiased=False) * 50, rtol=1e-9, atol=0)
    single = RunningMoments().update(data[:1])
    assert torch.isnan(single.sample_variance).all()
    assert torch.equal(single.variance, torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        whole.update(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="no samples"):
        _ = RunningMoments().mean


def test_large_t_streams_without_holding_samples() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    summary = mc_predict(model, x, 2000, seed=0, transform="softmax", reduce="stats", chunk_size=500)
    assert summary.count == 2000
    assert int(summary.votes.sum()) == 2 * 2000
    # 2000 samples: the MC mean is within a few standard errors of a second, independent run.
    other = mc_predict(model, x, 2000, seed=1, transform="softmax", reduce="stats", chunk_size=500)
    tolerance = 6 * math.sqrt(2 / 2000) * float(summary.std.max()) + 1e-6
    assert float((summary.mean - other.mean).abs().max()) <= tolerance


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"T": 0}, ValueError, "T must be >= 1, got 0"),
        ({"T": 2.0}, TypeError, "T must be an int"),
        ({"T": True}, TypeError, "T must be an int"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1, got 0"),
        ({"chunk_size": "4"}, TypeError, "chunk_size must be an int"),
        ({"memory_budget": -1}, ValueError, "memory_budget must be >= 1"),
        ({"chunk_size": 2, "memory_budget": 10}, ValueError, "at most one of chunk_size and memory_budget"),
        ({"reduce": "median"}, ValueError, "reduce must be"),
        ({"transform": "tanh"}, ValueError, "transform must be"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"trunk": "yes"}, ValueError, "trunk must be"),
        ({"trunk": nn.Identity()}, ValueError, "trunk= and head= must be given together"),
        ({"x": [1.0]}, TypeError, "must contain at least one tensor"),
        ({"x": {"a": torch.randn(2, 4), "b": torch.randn(3, 4)}}, ValueError, r"same batch size.*\['b'\]"),
        ({"x": torch.tensor(1.0)}, ValueError, "batch dim"),
        ({"output": 1.5}, TypeError, "output must be None, a key"),
        ({"model_kwargs": [1]}, TypeError, "model_kwargs must be a mapping"),
    ],
)
def test_bad_inputs_rejected(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    arguments: dict[str, object] = {"x": torch.randn(2, 4), "T": 3}
    arguments.update(kwargs)
    x, samples = arguments.pop("x"), arguments.pop("T")
    with pytest.raises(error, match=match):
        mc_predict(model, x, samples, **arguments)  # type: ignore[arg-type]


def test_model_must_be_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"):
        mc_predict(lambda x: x, torch.randn(2, 2), 3)  # type: ignore[arg-type]


def test_t_is_required() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    with pytest.raises(TypeError, match=r"mc_predict\(\) needs T"):
        mc_predict(model, torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"iter_mc_samples\(\) needs T"):
        iter_mc_samples(model, torch.randn(2, 4))


def test_model_output_must_hold_batched_tensors() -> None:
    class Out(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.kind = kind

        def forward(self, x: torch.Tensor) -> object:
            y = self.drop(x)
            if self.kind == "tuple":
                return (y,)
            if self.kind == "scalar":
                return {"y": y, "loss": y.sum()}
            return "no tensor"

    x = torch.randn(2, 2)
    (samples,) = mc_predict(Out("tuple"), x, T=3, seed=0, trunk=None)  # tuples are fine now
    assert samples.shape == (3, 2, 2)
    with pytest.raises(
        ValueError, match=r"batch \(2 x 1 samples\) on dim 0, got shape \(\) for output\['loss'\]"
    ):
        mc_predict(Out("scalar"), x, T=3, trunk=None, chunk_size=1)
    assert mc_predict(Out("scalar"), x, T=3, trunk=None, output="y").shape == (3, 2, 2)
    with pytest.raises(TypeError, match="must return a tensor, or a tuple, list, dict or ModelOutput"):
        mc_predict(Out("none"), x, T=3, trunk=None)


def test_old_call_forms_still_work() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.drop(a + b)

    model = TwoInputs().eval()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    new = mc_predict(model, a, b, T=5, seed=2)
    assert torch.equal(mc_predict(model, a, b, 5, seed=2), new)  # T last positional: not deprecated
    with pytest.warns(DeprecationWarning, match=r"mc_predict\(model, a, b, \.\.\., T=T\)"):
        old = mc_predict(model, (a, b), 5, seed=2)
    assert torch.equal(old, new)
    sequential = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    with pytest.warns(DeprecationWarning, match="the argument 'x' is deprecated"):
        by_keyword = mc_predict(sequential, x=a, T=4, seed=1)
    assert torch.equal(by_keyword, mc_predict(sequential, a, T=4, seed=1))
