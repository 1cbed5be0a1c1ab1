"""Activation checkpointing recomputes the forward masks exactly, or refuses loudly."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn

import dropkit


def block() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 16),
        dropkit.nn.Dropout(0.5),
        nn.Tanh(),
        dropkit.nn.GaussianDropout(0.3),
        nn.Linear(16, 8),
        dropkit.nn.AlphaDropout(0.2),
    )


def run(model: nn.Module, x: torch.Tensor, wrap: object = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    dropkit.manual_seed(42)
    x = x.detach().requires_grad_(True)
    y = model(x) if wrap is None else wrap(model, x)  # type: ignore[operator]
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    return y.detach(), grads


@pytest.mark.parametrize("preserve_rng_state", [True, False])
def test_dropkit_checkpoint_reproduces_masks_and_gradients(preserve_rng_state: bool) -> None:
    model, x = block(), torch.randn(6, 8)
    y_ref, g_ref = run(model, x)
    y, g = run(model, x, lambda m, i: dropkit.checkpoint(m, i, preserve_rng_state=preserve_rng_state))
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.equal(a, b)


def test_torch_checkpoint_with_dropkit_context_fn_and_functional_calls() -> None:
    lin = nn.Linear(8, 8)

    def fn(inp: torch.Tensor) -> torch.Tensor:
        return dropkit.functional.dropout(lin(inp), 0.5) * 2

    x = torch.randn(5, 8)
    y_ref, g_ref = run(lin, x, lambda m, i: fn(i))
    y, g = run(
        lin,
        x,
        lambda m, i: torch_checkpoint.checkpoint(
            fn, i, use_reentrant=False, context_fn=dropkit.checkpoint_context, preserve_rng_state=False
        ),
    )
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.equal(a, b)


def test_nested_checkpoints_and_repeated_backward() -> None:
    inner, outer_lin = block(), nn.Linear(8, 8)

    def outer(inp: torch.Tensor) -> torch.Tensor:
        return dropkit.checkpoint(inner, dropkit.functional.dropout(outer_lin(inp), 0.3))

    x = torch.randn(4, 8, requires_grad=True)
    dropkit.manual_seed(1)
    y_ref = inner(dropkit.functional.dropout(outer_lin(x), 0.3))
    y_ref.sum().backward()
    g_ref = x.grad.clone()
    x.grad = None
    dropkit.manual_seed(1)
    y = dropkit.checkpoint(outer, x)
    assert torch.equal(y, y_ref)
    y.sum().backward(retain_graph=True)
    assert torch.equal(x.grad, g_ref)
    x.grad = None
    y.sum().backward()  # a second recomputation replays the same keys again
    assert torch.equal(x.grad, g_ref)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_unmanaged_recompute_raises_instead_of_drawing_new_masks(use_reentrant: bool) -> None:
    model = block()
    x = torch.randn(3, 8, requires_grad=True)
    y = torch_checkpoint.checkpoint(model, x, use_reentrant=use_reentrant)
    with pytest.raises(dropkit.UnmanagedRecomputeError, match=r"context_fn=dropkit\.checkpoint_context"):
        y.sum().backward()


def test_eval_mode_needs_no_integration() -> None:
    model = block().eval()
    x = torch.randn(3, 8, requires_grad=True)
    torch_checkpoint.checkpoint(model, x, use_reentrant=False).sum().backward()
    assert x.grad is not None


def test_checkpoint_refuses_conflicting_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"dropkit\.checkpoint sets use_reentrant itself, got use_reentrant=True"
    ):
        dropkit.checkpoint(block(), torch.randn(2, 8), use_reentrant=True)
    with pytest.raises(ValueError, match="sets context_fn itself"):
        dropkit.checkpoint(block(), torch.randn(2, 8), context_fn=dropkit.checkpoint_context)


def test_recompute_with_more_draws_than_forward_is_refused() -> None:
    calls = {"n": 0}
    layer = dropkit.nn.Dropout(0.5)

    def data_dependent(inp: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = layer(inp)
        return layer(out) if calls["n"] > 1 else out

    # Early stop would end the recomputation before the extra draw; turn it off to reach it.
    with torch_checkpoint.set_checkpoint_early_stop(False):
        y = dropkit.checkpoint(data_dependent, torch.randn(4, requires_grad=True))
    with pytest.raises(dropkit.UnmanagedRecomputeError, match="drew more dropout keys than the forward pass"):
        y.sum().backward()
