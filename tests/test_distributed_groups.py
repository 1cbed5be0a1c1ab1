"""Process-group-aware masks (dropkit.distributed): mask domains, DTensor inputs, and training
under DDP, FSDP2 and 2-way tensor parallelism with activation checkpointing, against
single-process runs that use the same masks.

One launch of 2 gloo processes (``_worker``) runs every distributed scenario and returns masks
and losses; the tests assert on them here.  Domains on larger meshes (2 x 2, 2 x 2 x 2) are
checked in this process with torch's fake process group, which needs no peers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dropkit
import dropkit.distributed as dd
from dropkit.distributed.domains import current_domain
from dropkit.distributed.dtensor import bits16_at
from dropkit.engine.masks import keep_mask, random_bits16
from dropkit.engine.streams import effective_seed, fold_seed
from tests.distributed_harness import launch

BASE = 2024
P = 0.25
STEPS = 3
LR = 0.1


# -- models and data shared by the workers and the single-process references ---------------------


class _Net(nn.Module):
    """Linear -> dropkit Dropout -> ReLU (checkpointed) -> Linear; its one dropkit layer is stream 0."""

    def __init__(self, torch_checkpoint: bool = False) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 32), dropkit.nn.Dropout(P), nn.ReLU())
        self.head = nn.Linear(32, 1)
        self.torch_checkpoint = torch_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.torch_checkpoint:
            h = torch.utils.checkpoint.checkpoint(
                self.block, x, use_reentrant=False, context_fn=dropkit.checkpoint_context
            )
        else:
            h = dropkit.checkpoint(self.block, x)
        out: torch.Tensor = self.head(h)
        return out


class _MLP(nn.Module):
    """A tensor-parallel-shaped MLP: up (column-parallel), hidden dropout (stream 0; before the
    ReLU, so that the zeros of its output are its mask), down (row-parallel), output dropout
    (stream 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.drop_hidden = dropkit.nn.Dropout(P)
        self.down = nn.Linear(16, 8)
        self.drop_out = dropkit.nn.Dropout(P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.drop_out(self.down(torch.relu(self.drop_hidden(self.up(x)))))
        return out


def _dp_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)  # each data-parallel rank its own data
    return [
        (torch.randn(4, 8, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(STEPS)
    ]


def _tp_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)  # tensor-parallel peers see the same data
    return [
        (torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)) for _ in range(STEPS)
    ]


def _record_masks(module: nn.Module, masks: list[torch.Tensor]) -> None:
    """Append the keep mask of each call of ``module`` (forward and checkpoint recomputation)."""

    def hook(_: nn.Module, __: Any, output: torch.Tensor) -> None:
        full = output.full_tensor() if hasattr(output, "full_tensor") else output
        masks.append((full != 0).detach().clone())

    module.register_forward_hook(hook)


# -- the worker ----------------------------------------------------------------------------------


def _worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    return {
        "domains": _domains(mesh),
        "ddp": _train_dp("ddp", rank),
        "fsdp": _train_dp("fsdp", rank),
        "tp": _train_tp(mesh),
        "tp_local": _tp_local_shards(mesh),
    }


def _draw() -> torch.Tensor:
    dropkit.manual_seed(BASE)
    return dropkit.nn.Dropout(0.5)(torch.ones(512)) != 0


def _domains(mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    group = dist.group.WORLD
    result: dict[str, Any] = {"default": _draw(), "folded_default": dd.folded_ranks()}
    with dd.rank_masks(group):
        result["rank_masks_world"] = _draw()
    with dd.replicated(group):
        result["replicated"] = _draw()
        result["folded_replicated"] = dd.folded_ranks()
        with dd.sharded(group):
            result["sharded_in_replicated"] = _draw()
    with dd.rank_masks():
        result["shared"] = _draw()
    dropkit.manual_seed(BASE)
    layer = dropkit.nn.Dropout(0.5)
    handle = dd.replicated(mesh).attach(layer)
    result["attached"] = layer(torch.ones(512)) != 0  # step 0, in the domain
    handle.remove()
    result["detached"] = layer(torch.ones(512)) != 0  # step 1, default domain
    sharded_input = distribute_tensor(torch.ones(4, 8), mesh, [Shard(1)])
    try:
        layer(sharded_input)
        result["dtensor_error"] = None
    except RuntimeError as error:
        result["dtensor_error"] = str(error)
    with dropkit.share_masks_across_ranks():  # step 3: nothing folded, the DTensor path runs
        result["dtensor_shared"] = layer(sharded_input).full_tensor() != 0
    return result


def _train_dp(kind: str, rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    dropkit.manual_seed(BASE)
    model = _Net(torch_checkpoint=kind == "fsdp")
    masks: list[torch.Tensor] = []
    _record_masks(model.block[1], masks)
    if kind == "ddp":
        wrapped: nn.Module = DistributedDataParallel(model)
    else:
        fully_shard(model.block)
        wrapped = fully_shard(model)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    losses = []
    for x, target in _dp_batches(rank):
        loss = (wrapped(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "masks": masks}


def _train_tp(mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    dropkit.manual_seed(BASE)
    mlp = _MLP()
    hidden: list[torch.Tensor] = []
    output: list[torch.Tensor] = []
    _record_masks(mlp.drop_hidden, hidden)
    _record_masks(mlp.drop_out, output)
    # The hidden activation stays a Shard(-1) DTensor; the output is a plain replicated tensor.
    parallelize_module(mlp, mesh, {"up": ColwiseParallel(use_local_output=False), "down": RowwiseParallel()})
    optimizer = torch.optim.SGD(mlp.parameters(), lr=LR)
    losses = []
    for x, target in _tp_batches():
        with dd.replicated(mesh):
            prediction = dropkit.checkpoint(mlp, x)
        loss = (prediction - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "hidden": hidden, "output": output}


def _tp_local_shards(mesh: Any) -> dict[str, Any]:
    """Megatron-style: the hidden activation is a plain local shard, marked sharded."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    dropkit.manual_seed(BASE)
    mlp = _MLP()
    hidden: list[torch.Tensor] = []
    output: list[torch.Tensor] = []
    _record_masks(mlp.drop_hidden, hidden)
    _record_masks(mlp.drop_out, output)
    parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    dd.sharded(mesh).attach(mlp.drop_hidden)
    with dd.replicated(mesh):
        mlp(_tp_batches()[0][0])
    return {"hidden": hidden, "output": output}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(_worker, 2, tmp_path_factory.mktemp("groups"))


# -- single-process references -------------------------------------------------------------------


def _mask(seed: int, stream: int, step: int, p: float, shape: tuple[int, ...]) -> torch.Tensor:
    return keep_mask(dropkit.make_key(seed, stream, step), p, shape)


def _reference_dp() -> dict[str, Any]:
    """Two data-parallel ranks in one process: rank r's masks from the seed folded with r, the
    gradients averaged as DDP and FSDP average them."""
    torch.manual_seed(0)
    model = _Net()
    first = model.block[0]
    batches = [_dp_batches(rank) for rank in range(2)]
    losses = torch.zeros(2, STEPS)
    masks: list[list[torch.Tensor]] = [[], []]
    parameters = list(model.parameters())
    for step in range(STEPS):
        grads = [torch.zeros_like(p) for p in parameters]
        for rank in range(2):
            x, target = batches[rank][step]
            key = dropkit.make_key(fold_seed(BASE, (rank,)), 0, step)  # stream 0, as in the workers
            h = torch.relu(dropkit.functional.dropout(first(x), P, seed=key))
            loss = (model.head(h) - target).square().mean()
            for total, grad in zip(grads, torch.autograd.grad(loss, parameters), strict=True):
                total += grad / 2
            losses[rank, step] = loss.detach()
            masks[rank].append(_mask(fold_seed(BASE, (rank,)), 0, step, P, (4, 32)))
        with torch.no_grad():
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter -= LR * grad
    return {"losses": losses, "masks": masks}


def _reference_tp() -> dict[str, Any]:
    torch.manual_seed(0)
    dropkit.manual_seed(BASE)
    mlp = _MLP()
    hidden: list[torch.Tensor] = []
    output: list[torch.Tensor] = []
    _record_masks(mlp.drop_hidden, hidden)
    _record_masks(mlp.drop_out, output)
    optimizer = torch.optim.SGD(mlp.parameters(), lr=LR)
    losses = []
    for x, target in _tp_batches():
        loss = (dropkit.checkpoint(mlp, x) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "hidden": hidden, "output": output}


# -- distributed tests ---------------------------------------------------------------------------


@pytest.mark.slow
def test_domains_on_two_ranks(results: list[dict[str, Any]]) -> None:
    domains = [result["domains"] for result in results]
    single = _draw()
    # Default: the global rank is folded; rank 0 draws the single-process mask, rank 1 the mask
    # of the seed folded with 1, which a single process can rebuild.
    assert torch.equal(domains[0]["default"], single)
    assert torch.equal(domains[1]["default"], _mask(fold_seed(BASE, (1,)), 0, 0, 0.5, (512,)))
    assert not torch.equal(domains[0]["default"], domains[1]["default"])
    for rank, domain in enumerate(domains):
        assert domain["folded_default"] == (rank,)
        assert domain["folded_replicated"] == (0,)
        assert torch.equal(domain["rank_masks_world"], domain["default"])
        assert torch.equal(domain["sharded_in_replicated"], domain["default"])
        for shared in ("replicated", "shared", "attached"):
            assert torch.equal(domain[shared], single), shared
        # Detached again: the next step's mask, folded with the rank.
        assert torch.equal(domain["detached"], _mask(fold_seed(BASE, (rank,)), 0, 1, 0.5, (512,)))
        assert "dropkit.distributed.replicated" in domain["dtensor_error"]
        assert torch.equal(domain["dtensor_shared"], _mask(BASE, 0, 3, 0.5, (4, 8)))


@pytest.mark.slow
def test_data_parallel_training_ddp_and_fsdp2(results: list[dict[str, Any]]) -> None:
    reference = _reference_dp()
    for kind in ("ddp", "fsdp"):
        for rank, result in enumerate(results):
            masks = result[kind]["masks"]
            assert len(masks) == 2 * STEPS  # each step: the forward, then the recomputation
            for step in range(STEPS):
                forward, recomputed = masks[2 * step], masks[2 * step + 1]
                assert torch.equal(forward, recomputed), f"{kind} rank {rank} step {step}: recompute differs"
                assert torch.equal(forward, reference["masks"][rank][step]), f"{kind} rank {rank} step {step}"
            torch.testing.assert_close(
                result[kind]["losses"], reference["losses"][rank], rtol=1e-5, atol=1e-7
            )
    # Data-parallel ranks draw different masks.
    assert not torch.equal(results[0]["ddp"]["masks"][0], results[1]["ddp"]["masks"][0])


@pytest.mark.slow
def test_tensor_parallel_mlp_trains_like_one_process(results: list[dict[str, Any]]) -> None:
    reference = _reference_tp()
    for result in results:
        tp = result["tp"]
        assert len(tp["hidden"]) == len(reference["hidden"]) == 2 * STEPS
        # The sharded hidden activation: each rank applied its slice of the single-process mask.
        for got, expected in zip(tp["hidden"], reference["hidden"], strict=True):
            assert torch.equal(got, expected)
        # The replicated output: the same mask on both ranks, the single-process one.
        for got, expected in zip(tp["output"], reference["output"], strict=True):
            assert torch.equal(got, expected)
        torch.testing.assert_close(tp["losses"], reference["losses"], rtol=1e-5, atol=1e-7)
    assert not torch.equal(reference["hidden"][0], reference["hidden"][2])  # fresh masks each step


@pytest.mark.slow
def test_tensor_parallel_local_shards_marked_sharded(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        local = result["tp_local"]
        # Hidden: plain local shards (4, 8) under sharded(): each rank folds its rank.
        assert torch.equal(local["hidden"][0], _mask(fold_seed(BASE, (rank,)), 0, 0, P, (4, 8)))
        # Output: replicated region, shared mask, the single-process one (stream 1).
        assert torch.equal(local["output"][0], _mask(BASE, 1, 0, P, (4, 8)))
    assert not torch.equal(results[0]["tp_local"]["hidden"][0], results[1]["tp_local"]["hidden"][0])


# -- in-process tests ----------------------------------------------------------------------------


@contextlib.contextmanager
def _fake_world(rank: int, world: int) -> Iterator[None]:
    """A process group of ``world`` ranks seen from ``rank``, with no peers (torch's fake backend)."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    dist.init_process_group("fake", rank=rank, world_size=world, store=fake_pg.FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _classes(seeds: list[int]) -> list[set[int]]:
    """The ranks grouped by equal seed, in order of first appearance."""
    classes: dict[int, set[int]] = {}
    for rank, seed in enumerate(seeds):
        classes.setdefault(seed, set()).add(rank)
    return list(classes.values())


def _seeds_on_2x2(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    dropkit.manual_seed(BASE)
    with _fake_world(rank, 4):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp, tp = mesh.get_group("dp"), mesh.get_group("tp")
        seeds: dict[str, Any] = {"default": effective_seed()}
        with dd.replicated(tp):
            seeds["replicated(tp)"] = effective_seed()
            seeds["tp mesh shares"] = current_domain().shares_with((0, 1) if rank < 2 else (2, 3), rank)
            seeds["dp mesh shares"] = current_domain().shares_with((0, 2) if rank % 2 == 0 else (1, 3), rank)
            with dd.sharded(tp):
                seeds["sharded(tp) in replicated(tp)"] = effective_seed()
            with pytest.raises(ValueError, match="rank_masks"):
                dd.replicated(dp).__enter__()
        with dd.rank_masks(dp):
            seeds["rank_masks(dp)"] = effective_seed()
            with dd.replicated(tp):
                seeds["replicated(tp) in rank_masks(dp)"] = effective_seed()
            with dd.sharded(tp):
                seeds["sharded(tp) in rank_masks(dp)"] = effective_seed()
        with dd.rank_masks(dp, tp):
            seeds["rank_masks(dp, tp)"] = effective_seed()
        with dd.replicated(mesh):
            seeds["replicated(mesh)"] = effective_seed()
        with dd.rank_masks():
            seeds["rank_masks()"] = effective_seed()
        seeds["default after"] = effective_seed()
    return seeds


def test_domains_on_a_2x2_mesh() -> None:
    seeds = [_seeds_on_2x2(rank) for rank in range(4)]
    every = [{0}, {1}, {2}, {3}]
    by_dp = [{0, 1}, {2, 3}]  # mesh rows: ranks that share a data-parallel rank
    expected = {
        "default": every,
        "replicated(tp)": by_dp,
        "sharded(tp) in replicated(tp)": every,
        "rank_masks(dp)": by_dp,
        "replicated(tp) in rank_masks(dp)": by_dp,
        "sharded(tp) in rank_masks(dp)": every,
        "rank_masks(dp, tp)": every,
        "replicated(mesh)": [{0, 1, 2, 3}],
        "rank_masks()": [{0, 1, 2, 3}],
        "default after": every,
    }
    for name, classes in expected.items():
        assert _classes([s[name] for s in seeds]) == classes, name
    # Rank 0 and every fully shared domain draw the single-process seed; the default is rank folding.
    assert seeds[0]["default"] == seeds[0]["replicated(mesh)"] == seeds[3]["rank_masks()"] == BASE
    assert [s["default"] for s in seeds] == [fold_seed(BASE, (rank,)) for rank in range(4)]
    assert all(s["tp mesh shares"] and not s["dp mesh shares"] for s in seeds)


def test_replicated_tp_on_a_2x2x2_mesh_folds_the_other_dims() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    seeds = []
    for rank in range(8):
        dropkit.manual_seed(BASE)
        with _fake_world(rank, 8):
            mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
            with dd.replicated(mesh.get_group("tp")):
                seeds.append(effective_seed())
    assert _classes(seeds) == [{0, 1}, {2, 3}, {4, 5}, {6, 7}]


def test_single_process_domains_and_arguments() -> None:
    dropkit.manual_seed(BASE)
    assert dd.folded_ranks() == (0,)
    with dd.rank_masks():
        assert dd.folded_ranks() == ()
        assert effective_seed() == BASE
    with pytest.raises(ValueError, match="at least one group"):
        dd.replicated()
    with pytest.raises(ValueError, match="at least one group"):
        dd.sharded()
    with pytest.raises(TypeError, match=r"rank_masks\(\) group 0 must be .*got str"):
        dd.rank_masks("dp")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module, got int"):
        dd.rank_masks().attach(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ranks must be a tuple of ints >= 0"):
        fold_seed(1, (-1,))
    assert fold_seed(BASE, (0, 0)) == BASE
    # Within a domain every rank folds as many numbers: distinct numbers, distinct seeds.
    assert len({fold_seed(BASE, ranks) for ranks in [(0, 1), (1, 0), (1, 1), (2, 0), (0, 2)]}) == 5


def test_attached_domain_holds_during_the_forward_only() -> None:
    seen: list[tuple[int, ...]] = []
    layer = dropkit.nn.Dropout(0.5)
    layer.register_forward_hook(lambda *_: seen.append(dd.folded_ranks()))
    handle = dd.rank_masks().attach(layer)
    layer(torch.ones(4))
    assert seen == [()]
    assert dd.folded_ranks() == (0,)
    layer.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # left on an exception too
        layer(torch.ones(4))
    assert dd.folded_ranks() == (0,)
    handle.remove()


@pytest.mark.parametrize("spread", [1, 3, 100])
def test_bits_at_global_indices_match_the_engine(spread: int) -> None:
    key = dropkit.make_key(-5, 3, 9)
    generator = torch.Generator().manual_seed(spread)
    index = (torch.randperm(300, generator=generator) * spread).reshape(20, 15)
    expected = random_bits16(key, int(index.max()) + 1)[index]
    assert torch.equal(bits16_at(key, index), expected)  # spreads 1, 3: one span; 100: per index
