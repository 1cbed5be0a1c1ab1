"""The deprecated spellings of the sibling-API unification (issue 12): each still works for one
release, warns with its replacement, and gives what the replacement gives.  Delete a case with its
alias."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import dropkit
from dropkit import functional as F
from dropkit.nn import (
    ConcreteDropout,
    DropBlock1d,
    DropBlock2d,
    DropBlock3d,
    EmbeddingDropout,
    ResidualDropout,
    StochasticDepth,
    ZoneoutCell,
)

# --- one name, `module`, for the wrapped module ----------------------------------------------------

# (class, former keyword, a fresh module to wrap, an input)
RENAMED: list[tuple[type[nn.Module], str, Callable[[], nn.Module], Callable[[], torch.Tensor]]] = [
    (ConcreteDropout, "layer", lambda: nn.Linear(4, 3), lambda: torch.randn(5, 4)),
    (StochasticDepth, "block", lambda: nn.Linear(4, 4), lambda: torch.randn(5, 4)),
    (EmbeddingDropout, "embedding", lambda: nn.Embedding(6, 3), lambda: torch.tensor([[1, 2, 5], [0, 1, 1]])),
    (ZoneoutCell, "cell", lambda: nn.GRUCell(4, 3), lambda: torch.randn(5, 4)),
]


@pytest.mark.parametrize(("cls", "old", "make", "sample"), RENAMED, ids=[r[0].__name__ for r in RENAMED])
def test_former_keyword_warns_and_builds_the_same_layer(
    cls: type[nn.Module], old: str, make: Callable[[], nn.Module], sample: Callable[[], torch.Tensor]
) -> None:
    torch.manual_seed(0)
    new = cls(module=make())
    torch.manual_seed(0)
    message = rf"{cls.__name__}\(\): the argument '{old}' is deprecated.*pass 'module' instead"
    with pytest.warns(DeprecationWarning, match=message):
        former = cls(**{old: make()})
    for a, b in zip(former.parameters(), new.parameters(), strict=True):
        assert torch.equal(a, b)
    assert sorted(former.state_dict()) == sorted(new.state_dict())
    x = sample()
    assert torch.equal(former(x, seed=3), new(x, seed=3))


@pytest.mark.parametrize(("cls", "old", "make", "sample"), RENAMED, ids=[r[0].__name__ for r in RENAMED])
def test_former_and_new_keyword_together_is_an_error(
    cls: type[nn.Module], old: str, make: Callable[[], nn.Module], sample: Callable[[], torch.Tensor]
) -> None:
    with pytest.raises(TypeError, match=rf"got 'module' and its deprecated alias '{old}'"):
        cls(module=make(), **{old: make()})
    with pytest.raises(TypeError, match=rf"got 'module' and its deprecated alias '{old}'"):
        cls(make(), **{old: make()})  # the new argument by position


def test_former_attributes_read_the_module_with_a_warning() -> None:
    concrete = ConcreteDropout(nn.Linear(2, 2))
    with pytest.warns(DeprecationWarning, match=r"ConcreteDropout\.layer is deprecated; use .*\.module"):
        assert concrete.layer is concrete.module
    depth = StochasticDepth(nn.Linear(2, 2))
    with pytest.warns(DeprecationWarning, match=r"StochasticDepth\.block is deprecated; use .*\.module"):
        assert depth.block is depth.module


# --- DropBlock: (p, inplace, *, block_size) like every module and the functional -------------------


@pytest.mark.parametrize("cls", [DropBlock1d, DropBlock2d, DropBlock3d])
def test_dropblock_former_positional_block_size_warns(cls: type[nn.Module]) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\(p, block_size, inplace\) is deprecated"):
        former = cls(0.2, 3)
    assert repr(former) == repr(cls(0.2, block_size=3))
    assert repr(former) == f"{cls.__name__}(p=0.2, inplace=False, block_size=3)"
    with pytest.warns(DeprecationWarning, match="pass block_size=5 by keyword"):
        former = cls(0.2, 5, True)
    assert repr(former) == f"{cls.__name__}(p=0.2, inplace=True, block_size=5)"
    with pytest.warns(DeprecationWarning, match="pass block_size=5 by keyword"):
        former = cls(0.2, 5, inplace=True)  # old positional block_size, inplace by keyword
    assert repr(former) == f"{cls.__name__}(p=0.2, inplace=True, block_size=5)"


def test_dropblock_former_positional_block_size_draws_the_same_mask() -> None:
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(DeprecationWarning, match="pass block_size=3 by keyword"):
        former = DropBlock2d(0.3, 3)  # type: ignore[arg-type]
    assert torch.equal(former(x, seed=4), DropBlock2d(0.3, block_size=3)(x, seed=4))


def test_dropblock_new_order_takes_a_bool_in_the_inplace_slot_without_warning() -> None:
    assert DropBlock2d(0.2, True).inplace  # filterwarnings = error: no warning here
    assert DropBlock2d(0.2, False, block_size=3).block_size == 3


def test_dropblock_conflicting_arguments_are_errors() -> None:
    with pytest.raises(TypeError, match="block_size by position and by keyword"):
        DropBlock2d(0.2, 3, block_size=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inplace by position and by keyword"):
        DropBlock2d(0.2, 3, True, inplace=True)  # type: ignore[arg-type, misc]
    with pytest.raises(TypeError, match="at most 3 positional arguments"):
        DropBlock2d(0.2, 3, True, False)  # type: ignore[arg-type, call-arg]
    with pytest.raises(TypeError):
        DropBlock2d(0.2, True, False)  # type: ignore[call-arg]  # new order: nothing after inplace


# --- one fused residual op: residual_dropout / ResidualDropout ----------------------------------------


def test_bias_dropout_add_is_residual_dropout_with_a_bias() -> None:
    x = torch.randn(6, 16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    residual = torch.randn(6, 16, requires_grad=True)
    grad = torch.randn(6, 16)
    replacement = r"use residual_dropout\(input, residual, p, training, bias=bias\)"
    with pytest.warns(DeprecationWarning, match=replacement):
        former = F.bias_dropout_add(x, bias, residual, 0.3, seed=11)
    new = F.residual_dropout(x, residual, 0.3, bias=bias, seed=11)
    assert torch.equal(former, new)
    grads = [torch.autograd.grad(y, (x, bias, residual), grad) for y in (former, new)]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    with pytest.warns(DeprecationWarning, match=replacement):  # the alias keeps its default p = 0.5
        former = F.bias_dropout_add(x, bias, residual, seed=2)
    assert torch.equal(former, F.residual_dropout(x, residual, 0.5, bias=bias, seed=2))
    with pytest.warns(DeprecationWarning, match=replacement):
        assert torch.equal(F.bias_dropout_add(x, bias, residual, 0.3, False), residual + (x + bias))


def test_bias_dropout_add_module_is_residual_dropout_with_the_former_order() -> None:
    x, bias, residual = torch.randn(4, 8), torch.randn(8), torch.randn(4, 8)
    dropkit.manual_seed(5)
    with pytest.warns(DeprecationWarning, match=r"BiasDropoutAdd\(p\) is deprecated.*ResidualDropout\(p\)"):
        former = dropkit.nn.BiasDropoutAdd(0.4)
    dropkit.manual_seed(5)
    new = ResidualDropout(0.4)
    assert isinstance(former, ResidualDropout)
    assert repr(former) == "BiasDropoutAdd(p=0.4)"
    for _ in range(2):  # the module's own key sequence
        assert torch.equal(former(x, bias, residual), new(x, residual, bias))
    assert torch.equal(former(x, bias, residual, seed=3), new(x, residual, bias, seed=3))
    with pytest.warns(DeprecationWarning, match="BiasDropoutAdd"):
        assert dropkit.nn.BiasDropoutAdd().p == 0.5  # its former default
    with pytest.raises(TypeError, match=r"bias must be a torch\.Tensor, got NoneType"):
        former(x, None, residual)
