"""Drop-in with the ecosystem: dropkit's standard family are instances of the matching torch.nn
classes, with their attributes, so code that finds dropout by type finds dropkit's layers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import dropkit

PAIRS = [
    (dropkit.nn.Dropout, nn.Dropout),
    (dropkit.nn.Dropout1d, nn.Dropout1d),
    (dropkit.nn.Dropout2d, nn.Dropout2d),
    (dropkit.nn.Dropout3d, nn.Dropout3d),
    (dropkit.nn.AlphaDropout, nn.AlphaDropout),
    (dropkit.nn.FeatureAlphaDropout, nn.FeatureAlphaDropout),
]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=[pair[0].__name__ for pair in PAIRS])
def test_standard_family_are_torch_dropout_modules(ours: type[nn.Module], theirs: type[nn.Module]) -> None:
    layer = ours(0.3, True)  # type: ignore[call-arg]
    assert isinstance(layer, theirs)
    assert isinstance(layer, nn.modules.dropout._DropoutNd)
    assert layer.p == 0.3  # torch's attributes, dropkit's values
    assert layer.inplace is True
    layer.p = 0.2
    assert layer.p_tensor.tolist() == [0.2]  # torch-style assignment still reaches the holder
    assert list(layer.state_dict()) == list(theirs(0.3).state_dict()) == []
    # dropkit's forward, not torch's: the mask comes from the key.
    x = torch.ones({nn.Dropout1d: (2, 4, 3), nn.Dropout2d: (2, 4, 3, 3)}.get(theirs, (2, 4, 3, 3, 3)))
    layer.inplace = False
    assert torch.equal(layer(x, seed=5), layer(x, seed=5))


def test_code_that_finds_dropout_by_type_finds_dropkit_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 4), dropkit.nn.Dropout(0.1), nn.ReLU(), nn.Dropout(0.2))
    found = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert found == [model[1], model[3]]
    for module in found:  # a typical "set every dropout rate" loop
        module.p = 0.4
    assert model[1].p == 0.4
    assert model[1].p_tensor.tolist() == [0.4]


def test_jit_trace_in_training_mode_is_refused_with_what_to_use_instead() -> None:
    model = nn.Sequential(nn.Linear(3, 3), dropkit.nn.Dropout(0.5))
    x = torch.randn(2, 3)
    with (
        pytest.warns(DeprecationWarning, match=r"torch\.jit\.trace"),
        pytest.raises(RuntimeError, match=r"Use torch\.compile or torch\.export"),
    ):
        torch.jit.trace(model, x)
    with (
        pytest.warns(DeprecationWarning, match=r"torch\.jit\.trace"),
        pytest.raises(RuntimeError, match=r"cannot be recorded by torch\.jit\.trace"),
    ):
        torch.jit.trace(lambda t: dropkit.functional.dropout(t, 0.5), x)
    with pytest.warns(DeprecationWarning, match=r"torch\.jit\.trace"):
        traced = torch.jit.trace(model.eval(), x)  # eval: dropout is the identity, nothing to record
    assert torch.equal(traced(x), model(x))


def test_jit_script_says_what_to_use_instead() -> None:
    with pytest.raises(RuntimeError, match=r"not TorchScript-compatible.*torch\.compile or torch\.export"):
        torch.jit.script(nn.Sequential(nn.Linear(3, 3), dropkit.nn.Dropout(0.5)))


def test_copies_draw_their_own_masks_unless_cloning_is_asked_for() -> None:
    model = nn.Sequential(nn.Linear(8, 8), dropkit.nn.Dropout(0.5))
    dropkit.manual_seed(0)  # restarts stream numbering after the model was built
    x = torch.ones(4, 8)
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        teacher = copy_of(model)  # e.g. an EMA or teacher copy
        assert teacher[1].rng_stream != model[1].rng_stream
        assert teacher[1].rng_stream >= 1 << 31  # a range no built layer uses
        assert not torch.equal(teacher[1](x) != 0, model[1](x) != 0)
        assert teacher.state_dict().keys() == model.state_dict().keys()
        with dropkit.clone_masks():
            twin = copy_of(model)
        assert torch.equal(twin[1](x), model[1](x))  # exactly the original's next mask
