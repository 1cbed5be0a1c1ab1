"""``dropkit.export``: programs exported in training mode draw the eager masks for the same key,
declare and own their step counters, may take the seed as an input, and survive
``torch.export.save``/``load`` and AOTInductor packaging."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import dropkit
from dropkit.engine.streams import functional_step
from dropkit.interop.export import FUNCTIONAL_STEP_BUFFER, SEED_INPUT
from dropkit.nn._base import _RandomLayer
from tests.layer_specs import SPECS, LayerSpec


def _tensors(output: Any) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _same(a: Any, b: Any) -> bool:
    left, right = _tensors(a), _tensors(b)
    return len(left) == len(right) and all(torch.equal(x, y) for x, y in zip(left, right, strict=True))


def _layer_steps(model: nn.Module) -> int:
    return sum(int(m.rng_step.sum()) for m in model.modules() if isinstance(m, _RandomLayer))


def _program_steps(program: torch.export.ExportedProgram) -> int:
    counters = {**program.constants, **program.state_dict}
    names = ("rng_step", FUNCTIONAL_STEP_BUFFER)
    return sum(int(value.sum()) for name, value in counters.items() if name.endswith(names))


def _twin(model: nn.Module) -> nn.Module:
    """A copy that draws exactly the masks ``model`` would draw next."""
    with dropkit.clone_masks():
        return copy.deepcopy(model)


class Net(nn.Module):
    """Layers with counters, a functional call without a seed, and a parameter before them."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 16)
        self.drop = dropkit.nn.Dropout(0.5)
        self.noise = dropkit.nn.GaussianDropout(0.3)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.noise(self.drop(self.linear(x)))
        return self.head(dropkit.functional.dropout(hidden, 0.25))


def _net() -> Net:
    dropkit.manual_seed(11)
    return Net().train()


def _input(batch: int = 6) -> torch.Tensor:
    return torch.linspace(-2, 2, batch * 8).reshape(batch, 8)


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_every_layer_exports_with_the_eager_masks_and_counters(spec: LayerSpec) -> None:
    dropkit.manual_seed(3)
    module = spec.make(spec.rate)
    args = spec.inputs(torch.float32, False)
    if spec.name == "LayerDrop":
        with pytest.raises(RuntimeError, match=r"LayerDrop skips layers.*export the model in eval mode"):
            dropkit.export(module, args)
        return
    twin = _twin(module)
    steps_before = _layer_steps(module)
    with warnings.catch_warnings():
        # WeightDrop on an RNN reassigns the RNN's flat weight list each call, as it does eagerly.
        warnings.filterwarnings("ignore", "The tensor attributes self.module._flat_weights")
        program = dropkit.export(module, args)
    run = program.module()
    program_start = _program_steps(program)
    eager_start = _layer_steps(twin) + int(functional_step())
    for call in range(3):
        assert _same(run(*args), twin(*args)), f"call {call}: exported masks differ from eager"
    eager_advance = _layer_steps(twin) + int(functional_step()) - eager_start
    assert _program_steps(program) - program_start == eager_advance
    assert _layer_steps(module) == steps_before, "the program advanced the model's counters"


def test_counter_mutations_are_in_the_graph_signature() -> None:
    model = _net()
    program = dropkit.export(model, (_input(),))
    mutated = set(program.graph_signature.buffers_to_mutate.values())
    assert mutated == {"drop.rng_step", "noise.rng_step", FUNCTIONAL_STEP_BUFFER}
    # Functional: no in-place op is left in the graph.
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [target for target in targets if target.endswith("_.Tensor")], targets


def test_program_and_model_counters_are_independent() -> None:
    dropkit.manual_seed(11)  # layers only: the model's functional calls would move the twin's
    model = nn.Sequential(nn.Linear(8, 16), dropkit.nn.Dropout(0.5), dropkit.nn.GaussianDropout(0.3))
    x = _input()
    model(x)  # the model is at step 1 when exported: the program starts there too
    program = dropkit.export(model, (x,))
    run = program.module()
    twin = _twin(model)
    first = run(x)
    assert torch.equal(first, twin(x))
    assert int(model[1].rng_step) == 1
    model(x)
    model(x)  # the model moves on; the program does not follow
    assert int(program.constants["1.rng_step"]) == 2
    assert torch.equal(run(x), twin(x))


def test_a_functional_call_without_a_seed_counts_in_the_program() -> None:
    model = _net()
    x = _input()
    before = int(functional_step())
    program = dropkit.export(model, (x,))
    run = program.module()
    outputs = [run(x) for _ in range(3)]
    assert int(functional_step()) == before, "the program advanced the process-wide counter"
    assert int(program.constants[FUNCTIONAL_STEP_BUFFER]) == before + 3
    assert not torch.equal(outputs[0], outputs[1])


def test_the_seed_as_an_input_gives_the_eager_masks_of_that_seed() -> None:
    model = _net()
    x = _input()
    program = dropkit.export(model, (x,), seed_input=True)
    names = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    assert names == [SEED_INPUT, "x"]
    twin = _twin(model)
    for seed in (5, -7, 2**62):
        # manual_seed restarts every counter (the twin's too) at 0; the program starts there.
        dropkit.manual_seed(seed)
        fresh = dropkit.export(model, (x,), seed_input=True).module()
        expected = [twin(x) for _ in range(2)]
        got = [fresh(torch.tensor(seed), x) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), seed
    run = program.module()
    assert not torch.equal(run(torch.tensor(1), x), run(torch.tensor(2), x))


def test_without_a_seed_input_the_seed_is_fixed_when_exported() -> None:
    model = _net()
    x = _input()
    twin = _twin(model)
    run = dropkit.export(model, (x,)).module()
    dropkit.manual_seed(12345)  # later seeds do not reach the program
    dropkit.manual_seed(11)
    assert torch.equal(run(x), twin(x))


def test_a_bad_seed_input_is_refused() -> None:
    run = dropkit.export(_net(), (_input(),), seed_input=True).module()
    with pytest.raises(RuntimeError, match=r"dtype mismatch"):  # torch's input check
        run(torch.tensor(1.5), _input())


def test_dynamic_batch_size_gives_the_eager_masks() -> None:
    model = _net()
    batch = torch.export.Dim("batch", min=2)
    program = dropkit.export(model, (_input(),), dynamic_shapes=({0: batch},))
    run = program.module()
    twin = _twin(model)
    for size in (3, 9):
        x = _input(size)
        assert torch.equal(run(x), twin(x))
    seeded = dropkit.export(model, (_input(),), seed_input=True, dynamic_shapes=({0: batch},))
    assert seeded.module()(torch.tensor(1), _input(5)).shape == (5, 4)


def test_gradients_through_the_program_equal_eager() -> None:
    model = _net()
    x = _input()
    twin = _twin(model)
    run = dropkit.export(model, (x,)).module()
    run(x).square().sum().backward()
    twin(x).square().sum().backward()
    got = dict(run.named_parameters())
    for name, parameter in twin.named_parameters():
        assert got[name].grad is not None, name
        assert torch.equal(got[name].grad, parameter.grad), name


def test_eval_mode_export_has_no_random_op_and_is_the_identity() -> None:
    model = _net().eval()
    x = _input()
    program = dropkit.export(model, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    # The functional call in forward still draws (training=True is its default), the layers do not.
    assert set(program.graph_signature.buffers_to_mutate.values()) == {FUNCTIONAL_STEP_BUFFER}
    assert sum("masked_affine" in op for op in ops) == 1
    assert not any("gaussian" in op for op in ops)


def test_save_and_load_keep_the_masks_and_the_counters() -> None:
    model = _net()
    x = _input()
    twin = _twin(model)
    program = dropkit.export(model, (x,), seed_input=True)
    seed = torch.tensor(dropkit.initial_seed())
    run = program.module()
    assert torch.equal(run(seed, x), twin(x))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    # Saved after one call: the loaded program goes on from there.
    assert int(loaded.constants["drop.rng_step"]) == 1
    assert torch.equal(loaded.module()(seed, x), twin(x))


def test_argument_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got function"):
        dropkit.export(lambda x: x, (_input(),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"args must be a tuple.*got Tensor"):
        dropkit.export(_net(), _input())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed_input must be a bool, got int"):
        dropkit.export(_net(), (_input(),), seed_input=1)  # type: ignore[arg-type]
    with (
        pytest.raises(TypeError, match=r"seed must be an int64 tensor of one element, got torch\.float32"),
        dropkit.engine.streams.seed_tensor(torch.tensor([1.0])),
    ):
        pass


@pytest.mark.slow
def test_aoti_package_runs_the_eager_masks_on_every_call(tmp_path: Any) -> None:
    model = _net()
    x = _input()
    twin = _twin(model)
    program = dropkit.export(model, (x,))
    path = dropkit.aoti_compile_and_package(program, str(tmp_path / "net.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    # Four calls: a package whose counters were folded into constants repeats from the third.
    for call in range(4):
        assert torch.equal(runner(x), twin(x)), f"call {call}"
    assert int(model.drop.rng_step) == 0


def test_aoti_packaging_refuses_a_program_or_folding_it_cannot_use() -> None:
    with pytest.raises(TypeError, match=r"program must be a torch.export.ExportedProgram, got Net"):
        dropkit.aoti_compile_and_package(_net())  # type: ignore[arg-type]
    program = dropkit.export(_net(), (_input(),))
    with pytest.raises(ValueError, match=r"joint_graph_constant_folding'\] must stay False"):
        dropkit.aoti_compile_and_package(program, inductor_configs={"joint_graph_constant_folding": True})


def test_torch_export_of_a_functional_call_without_a_seed_says_to_use_dropkit_export() -> None:
    with pytest.raises(RuntimeError, match=r"process-wide functional counter.*dropkit.export"):
        torch.export.export(_net(), (_input(),))
    # With a seed the call is a function of its key: torch.export takes it as it is.
    program = torch.export.export(_Seeded(), (_input(),))
    assert torch.equal(program.module()(_input()), _Seeded()(_input()))


class _Seeded(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropkit.functional.dropout(x, 0.5, seed=7)


def test_torch_strict_export_of_layers_gives_the_eager_masks() -> None:
    dropkit.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 16), dropkit.nn.Dropout(0.5), dropkit.nn.GaussianDropout(0.3))
    twin = _twin(model)
    program = torch.export.export(model, (_input(),), strict=True).run_decompositions({})
    run = program.module()
    assert all(torch.equal(run(_input()), twin(_input())) for _ in range(3))
    assert set(program.graph_signature.buffers_to_mutate.values()) == {"1.rng_step", "2.rng_step"}
