"""Forward-mode AD and the torch.func transforms give the eager answer or a clear error, for every
random op (one mechanism: dropkit.ops.RateOp and the fused residual op).

* jvp / forward AD: the tangent goes through the forward's mask and scale (gradcheck in float64
  with forward AD; jacfwd == jacrev exactly).
* vmap: randomness "error" raises, "same" is the loop with the call's key, "different" the loop
  with ``dropkit.element_key(key, b)``, bit for bit; gradients replaying a mask are not draws.
* grad / vjp / hessian / functionalize of models with dropkit layers; stacked-module ensembles.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import (
    functional_call,
    functionalize,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    stack_module_state,
    vmap,
)

import dropkit
from dropkit import functional as F

KEY = dropkit.make_key(11, stream=3, step=5)
BIAS = torch.randn(6, dtype=torch.float64)
RESIDUAL = torch.randn(4, 6, dtype=torch.float64)

# name -> f(x, key): each random op of dropkit.functional with a fixed key, on (4, 6) input.
OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dropout": lambda x, k: F.dropout(x, 0.4, seed=k),
    "dropout[unscaled]": lambda x, k: F.dropout(x, 0.4, inverted=False, seed=k),
    "dropout1d": lambda x, k: F.dropout1d(x.reshape(2, 2, 6), 0.4, seed=k).reshape(x.shape),
    "alpha_dropout": lambda x, k: F.alpha_dropout(x, 0.3, seed=k),
    "gaussian_dropout": lambda x, k: F.gaussian_dropout(x, 0.3, seed=k),
    "gaussian_noise": lambda x, k: F.gaussian_noise(x, 0.5, seed=k),
    "drop_block1d": lambda x, k: F.drop_block1d(x, 0.3, block_size=2, seed=k),
    "drop_path": lambda x, k: F.drop_path(x, 0.4, seed=k),
    "locked_dropout": lambda x, k: F.locked_dropout(x, 0.4, seed=k),
    "residual_dropout[fused]": lambda x, k: F.residual_dropout(x, RESIDUAL, 0.4, bias=BIAS, seed=k),
    "dropout[tensor rate]": lambda x, k: F.dropout(x, torch.tensor([0.4], dtype=torch.float64), seed=k),
}


def _x() -> torch.Tensor:
    return torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(OPS))
def test_gradcheck_with_forward_ad(name: str) -> None:
    op = OPS[name]
    x = _x().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: op(t, KEY), (x,), check_forward_ad=True)


@pytest.mark.parametrize("name", list(OPS))
def test_jacfwd_equals_jacrev_and_the_mask_is_the_forwards(name: str) -> None:
    op = OPS[name]
    x = _x()
    forward = jacfwd(lambda t: op(t, KEY), randomness="same")(x)
    reverse = jacrev(lambda t: op(t, KEY))(x)
    assert torch.equal(forward, reverse)
    # A Jacobian of a dropout-like op is not all zeros or all ones: the mask is in it.
    diagonal = forward.reshape(24, 24).diagonal()
    assert 0 < int((diagonal == 0).sum()) < 24 or name in ("gaussian_noise", "gaussian_dropout")


def test_jvp_tangent_is_mask_times_scale_times_tangent() -> None:
    x, t = _x(), torch.randn(4, 6, dtype=torch.float64)
    y, tangent = jvp(lambda a: F.dropout(a, 0.5, seed=KEY), (x,), (t,))
    assert torch.equal(y, F.dropout(x, 0.5, seed=KEY))
    assert torch.equal(tangent, F.dropout(t, 0.5, seed=KEY))
    assert 0 < int((tangent == 0).sum()) < tangent.numel()


def test_forward_ad_on_a_module_uses_the_modules_mask() -> None:
    dropkit.manual_seed(4)
    layer = dropkit.nn.Dropout(0.5)
    x, t = _x(), torch.randn(4, 6, dtype=torch.float64)
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, t))
        primal, tangent = fwAD.unpack_dual(out)
    key = dropkit.make_key(4, layer.rng_stream, 0)
    assert torch.equal(primal, F.dropout(x, 0.5, seed=key))
    assert torch.equal(tangent, F.dropout(t, 0.5, seed=key))


@pytest.mark.parametrize("name", list(OPS))
def test_vmap_randomness(name: str) -> None:
    op = OPS[name]
    xs = torch.randn(3, 4, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="randomness='error' refuses random ops"):
        vmap(lambda x: op(x, KEY))(xs)
    same = vmap(lambda x: op(x, KEY), randomness="same")(xs)
    assert torch.equal(same, torch.stack([op(x, KEY) for x in xs]))
    different = vmap(lambda x: op(x, KEY), randomness="different")(xs)
    looped = torch.stack([op(x, dropkit.element_key(KEY, b)) for b, x in enumerate(xs)])
    assert torch.equal(different, looped)
    assert not torch.equal(different, same)  # the elements really drew other masks


def test_vmap_over_keys_uses_each_key() -> None:
    keys = torch.stack([dropkit.make_key(1, 0, step) for step in range(3)])
    x = torch.ones(50, dtype=torch.float64)
    batched = vmap(lambda k: F.dropout(x, 0.5, seed=k), randomness="same")(keys)
    assert torch.equal(batched, torch.stack([F.dropout(x, 0.5, seed=k) for k in keys]))
    assert not torch.equal(batched[0], batched[1])


def test_per_sample_gradients_replay_the_mask_under_any_randomness() -> None:
    xs = torch.randn(5, 6, dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return F.alpha_dropout(x, 0.3, seed=KEY).square().sum()

    per_sample = vmap(grad(loss), randomness="same")(xs)
    assert torch.equal(per_sample, torch.stack([grad(loss)(x) for x in xs]))
    # jacrev vmaps over cotangents with randomness="error": the backward replays, it does not draw.
    assert jacrev(lambda x: F.dropout(x, 0.5, seed=KEY))(xs[0]).shape == (6, 6)


def test_hessian_and_functionalize() -> None:
    x = _x()[0]
    h = hessian(lambda t: F.dropout(t, 0.5, seed=KEY).square().sum())(x)
    keep = F.dropout(torch.ones_like(x), 0.5, seed=KEY) != 0
    assert torch.equal(h, torch.diag(keep.to(x.dtype) * 2 * 4.0))  # d²/dx² (2x)² = 8 where kept
    assert torch.equal(functionalize(lambda t: F.dropout(t, 0.5, seed=KEY))(x), F.dropout(x, 0.5, seed=KEY))


def test_grad_of_a_model_draws_the_eager_masks_and_advances_its_steps() -> None:
    dropkit.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 6), dropkit.nn.Dropout(0.5), nn.Linear(6, 1)).double()
    x = _x()[0]
    grads = grad(lambda t: model(t).sum())(x)
    assert int(model[1].rng_step) == 1
    dropkit.manual_seed(2)
    leaf = x.clone().requires_grad_()
    model(leaf).sum().backward()
    assert torch.equal(grads, leaf.grad)


def test_stacked_ensembles_draw_a_mask_per_member() -> None:
    dropkit.manual_seed(0)
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 16), dropkit.nn.Dropout(0.5)) for _ in range(3)]
    params, buffers = stack_module_state(members)  # type: ignore[arg-type]
    base = copy.deepcopy(members[0]).to("meta")
    x = torch.ones(2, 4)

    def member(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    out = vmap(member, randomness="different")(params, buffers)
    keep = out != 0
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep[1], keep[2])
    assert torch.equal(buffers["1.rng_step"], torch.ones(3, 1, dtype=torch.int64))  # each advanced
    # Member b drew with element_key of the stacked module's key [seed, stream, step 0].
    key = dropkit.make_key(0, base[1].rng_stream, 0)
    for b in range(3):
        expected = F.dropout(torch.ones(2, 16), 0.5, seed=dropkit.element_key(key, b))
        assert torch.equal(keep[b], expected != 0)
        # The batched matmul of vmap may round the hidden units differently from one Linear.
        torch.testing.assert_close(out[b], F.dropout(members[b][0](x), 0.5, seed=dropkit.element_key(key, b)))
