"""torch.compile (inductor, fullgraph) traces dropkit layers without graph breaks or
recompilation as the step advances, and draws the eager masks."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import dropkit

pytestmark = pytest.mark.slow


def model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16),
        dropkit.nn.Dropout(0.5),
        nn.ReLU(),
        dropkit.nn.AlphaDropout(0.2),
        dropkit.nn.GaussianNoise(0.1),
        nn.Unflatten(1, (4, 4)),
        dropkit.nn.Dropout1d(0.3),
        nn.Flatten(),
        dropkit.nn.GaussianDropout(0.2),
        nn.Linear(16, 4),
    )


def test_compiled_training_steps_match_eager_without_recompiling() -> None:
    torch._dynamo.reset()
    dropkit.manual_seed(0)
    net = model()
    x = torch.randn(6, 8)

    def steps(fn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dropkit.manual_seed(7)
        results = []
        for _ in range(3):
            net.zero_grad()
            y = fn(x)
            y.square().sum().backward()
            results.append((y.detach(), net[0].weight.grad.clone()))  # type: ignore[union-attr]
        return results

    eager = steps(net)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = steps(torch.compile(net, backend=counter, fullgraph=True))
    assert counter.frame_count == 1, "the advancing step counter must not trigger a recompile"
    for (y_e, g_e), (y_c, g_c) in zip(eager, compiled, strict=True):
        assert torch.equal(y_e, y_c)
        torch.testing.assert_close(g_c, g_e)
    assert int(net[1].rng_step) == 3


def test_compiled_functional_dropout_with_a_seed_matches_eager() -> None:
    torch._dynamo.reset()
    x = torch.randn(64, 32)

    def fn(inp: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return dropkit.functional.dropout2d(inp.view(8, 8, 4, 8), 0.4, seed=key).view(64, 32) + 1

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for step in range(3):
        key = dropkit.make_key(5, stream=1, step=step)
        assert torch.equal(compiled(x, key), fn(x, key))
    assert counter.frame_count == 1
