"""Rate schedules, their controller (selection, accumulation, resume), compiled models and the
Lightning callback."""

from __future__ import annotations

import importlib.util
import io
import itertools
import math
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import dropkit
from dropkit import schedules as S
from dropkit.schedules.lightning import rate_schedule_callback_class
from tests.layer_specs import realised

# --- schedules: exact values at known steps -------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (S.Constant(0.1), [0.1, 0.1, 0.1]),
        (S.Linear(0.0, 0.5, total_steps=4), [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]),
        (S.Linear(0.5, 0.25, total_steps=2, start_step=2), [0.5, 0.5, 0.5, 0.375, 0.25, 0.25]),
        # The end points are returned exactly even where (1 - f) * a + f * b would round.
        (S.Linear(0.1, 0.3, total_steps=1), [0.1, 0.3, 0.3]),
        (S.Cosine(0.5, 0.0, total_steps=2), [0.5, 0.25, 0.0, 0.0]),
        (S.Cosine(1.0, 0.0, total_steps=4, start_step=1), [1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2]),
        (S.Step([2, 4], [0.3, 0.2, 0.1]), [0.3, 0.3, 0.2, 0.2, 0.1, 0.1]),
        (S.Step([], [0.7]), [0.7, 0.7]),
        (S.EarlyDropout(0.1, steps=3), [0.1, 0.1, 0.1, 0.0, 0.0]),
        # np.linspace(0.25, 0, 3) of Liu et al.'s drop_scheduler, then 0.
        (S.EarlyDropout(0.25, steps=3, mode="linear"), [0.25, 0.125, 0.0, 0.0]),
        (S.EarlyDropout(0.5, steps=5, mode="linear"), [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]),
        (S.EarlyDropout(0.3, steps=1, mode="linear"), [0.3, 0.0]),
        (S.LateDropout(0.1, start=2), [0.0, 0.0, 0.1, 0.1]),
        (S.LateDropout(0.2, start=0), [0.2, 0.2]),
        (S.DropBlockRamp(keep_prob=0.75, total_steps=4), [0.0, 0.0625, 0.125, 0.1875, 0.25, 0.25]),
    ],
    ids=repr,
)
def test_schedule_values_at_known_steps(schedule: S.Schedule, expected: list[float]) -> None:
    assert [schedule(t) for t in range(len(expected))] == expected


def test_cosine_midpoint_and_large_steps() -> None:
    s = S.Cosine(1.0, 0.0, total_steps=4, start_step=1)
    assert s(3) == 0.5  # halfway: (1 + cos(pi / 2)) / 2 rounds to exactly 0.5
    assert s(4) == (1 + math.cos(3 * math.pi / 4)) / 2
    assert s(5) == 0.0
    assert s(10**12) == 0.0


def test_curriculum_follows_morerio_et_al() -> None:
    s = S.Curriculum(0.5, gamma=0.01)
    assert s(0) == 0.0
    # p(t) = p (1 - exp(-gamma t)): the retain probability (1 - p) exp(-gamma t) + ... of the paper.
    assert s(100) == pytest.approx(0.5 * (1.0 - math.exp(-1.0)), rel=1e-15, abs=0)
    assert s(50) == pytest.approx(0.5 * (1.0 - math.exp(-0.5)), rel=1e-15, abs=0)
    assert s(100_000) == 0.5
    values = [s(t) for t in range(0, 1000, 10)]
    assert all(b > a for a, b in itertools.pairwise(values))


def test_dropblock_ramp_keep_probability_falls_from_one_to_the_target() -> None:
    s = S.DropBlockRamp(keep_prob=0.5, total_steps=4)
    assert [s.keep_prob_at(t) for t in range(6)] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    assert S.DropBlockRamp(keep_prob=0.5, total_steps=4)(2) == S.Linear(0.0, 0.5, 4)(2)


def test_repr_round_trips_and_equality() -> None:
    schedules = [
        S.Constant(0.1),
        S.Linear(0.0, 0.5, total_steps=4, start_step=1),
        S.Cosine(0.5, 0.0, total_steps=2),
        S.Step([2, 4], [0.3, 0.2, 0.1]),
        S.EarlyDropout(0.1, steps=3, mode="linear"),
        S.LateDropout(0.1, start=2),
        S.Curriculum(0.5, gamma=0.01),
        S.DropBlockRamp(keep_prob=0.9, total_steps=10),
    ]
    assert repr(schedules[1]) == "Linear(start=0.0, end=0.5, total_steps=4, start_step=1)"
    assert repr(schedules[3]) == "Step(milestones=(2, 4), values=(0.3, 0.2, 0.1))"
    for s in schedules:
        rebuilt = eval(repr(s), vars(S))
        assert rebuilt == s
        assert hash(rebuilt) == hash(s)
    assert S.LateDropout(0.1, start=2) != S.LateDropout(0.1, start=3)
    assert S.Linear(0.0, 0.5, 4) != S.Cosine(0.0, 0.5, 4)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: S.Constant(-0.1), ValueError, "value must be a finite float >= 0, got -0.1"),
        (lambda: S.Constant(math.inf), ValueError, "value must be a finite float >= 0"),
        (lambda: S.Constant("0.1"), TypeError, "value must be a float, got str"),
        (lambda: S.Linear(0.0, math.nan, 4), ValueError, "end must not be NaN"),
        (lambda: S.Linear(0.0, 0.5, 0), ValueError, "total_steps must be >= 1, got 0"),
        (lambda: S.Linear(0.0, 0.5, 4.0), TypeError, "total_steps must be an int, got float"),
        (lambda: S.Cosine(0.0, 0.5, 4, start_step=-1), ValueError, "start_step must be >= 0, got -1"),
        (lambda: S.Step([2, 2], [0.1, 0.2, 0.3]), ValueError, "milestones must be strictly increasing"),
        (lambda: S.Step([0], [0.1, 0.2]), ValueError, "milestones must be >= 1, got 0"),
        (lambda: S.Step([2, 4], [0.1, 0.2]), ValueError, "values must have len.*= 3 entries, got 2"),
        (lambda: S.Step(3, [0.1]), TypeError, "milestones must be a sequence of ints, got int"),
        (lambda: S.Step([1], "ab"), TypeError, "values must be a sequence of floats, got str"),
        (lambda: S.EarlyDropout(1.5, steps=3), ValueError, r"p must be in \[0, 1\], got 1.5"),
        (lambda: S.EarlyDropout(0.1, steps=0), ValueError, "steps must be >= 1, got 0"),
        (lambda: S.EarlyDropout(0.1, steps=3, mode="cosine"), ValueError, "mode must be .*'cosine'"),
        (lambda: S.LateDropout(0.1, start=True), TypeError, "start must be an int, got bool"),
        (lambda: S.Curriculum(0.5, gamma=0.0), ValueError, "gamma must be > 0, got 0.0"),
        (lambda: S.Curriculum(-0.5, gamma=1.0), ValueError, r"p must be in \[0, 1\], got -0.5"),
        (lambda: S.DropBlockRamp(keep_prob=2.0, total_steps=3), ValueError, r"keep_prob must be in \[0, 1\]"),
    ],
)
def test_invalid_arguments_are_refused(
    build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [(-1, ValueError, "step must be >= 0, got -1"), (1.0, TypeError, "step must be an int, got float")],
)
def test_steps_are_validated(step: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        S.Linear(0.0, 0.5, 4)(step)  # type: ignore[arg-type]


# --- selection ---------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.attn_drop = dropkit.nn.Dropout(0.1)
        self.proj = nn.Linear(8, 8)
        self.resid_drop = nn.Dropout(0.1)
        self.drop_path = dropkit.nn.DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_drop(self.proj(self.attn_drop(self.attn(x))))
        return x


def transformer() -> nn.Module:
    return nn.Sequential(Block(), Block(), nn.Dropout1d(0.2))


def test_default_selection_is_element_and_channel_dropout_of_torch_and_dropkit() -> None:
    model = transformer()
    rates = S.attach(model, S.Constant(0.3))
    (attachment,) = rates.attachments
    assert attachment.names == [
        "0.attn_drop",
        "0.resid_drop",
        "1.attn_drop",
        "1.resid_drop",
        "2",
    ]
    assert all(m.p == 0.3 for _, m in attachment.modules)
    assert model[0].drop_path.p == 0.1  # DropPath is only scheduled when asked for


def test_selection_by_type() -> None:
    model = transformer()
    rates = S.attach(model, S.Constant(0.2), modules=dropkit.nn.DropPath)
    assert rates.attachments[0].names == ["0.drop_path", "1.drop_path"]
    # dropkit's Dropout is an nn.Dropout too: selecting torch's type selects it.
    rates.attach(model, S.Constant(0.05), modules=(nn.Dropout, nn.Dropout1d))
    assert rates.attachments[1].names == ["0.attn_drop", "0.resid_drop", "1.attn_drop", "1.resid_drop", "2"]
    assert [model[0].drop_path.p, model[0].resid_drop.p, model[2].p] == [0.2, 0.05, 0.05]
    assert model[0].attn_drop.p == 0.05


@pytest.mark.parametrize(
    "names",
    ["*.attn_drop", re.compile(r"\d+\.attn_drop"), lambda name: name.endswith("attn_drop")],
    ids=["glob", "regex", "callable"],
)
def test_selection_by_name(names: Any) -> None:
    model = transformer()
    rates = S.attach(model, S.Constant(0.0), names=names)
    assert rates.attachments[0].names == ["0.attn_drop", "1.attn_drop"]
    assert [model[0].attn_drop.p, model[1].attn_drop.p, model[0].resid_drop.p] == [0.0, 0.0, 0.1]


def test_regex_must_match_the_whole_name() -> None:
    with pytest.raises(ValueError, match="no module of Sequential matched"):
        S.attach(transformer(), S.Constant(0.0), names=re.compile("attn"))


def test_attention_and_residual_dropout_follow_different_schedules() -> None:
    model = transformer()
    rates = S.attach(model, S.EarlyDropout(0.2, steps=2), names="*.attn_drop", label="attn")
    rates.attach(model, S.LateDropout(0.3, start=1), names="*.resid_drop", label="resid")
    seen = []
    for _ in range(3):
        seen.append((model[0].attn_drop.p, model[1].resid_drop.p, rates.rates()))
        rates.step()
    assert seen == [
        (0.2, 0.0, {"attn": 0.2, "resid": 0.0}),
        (0.2, 0.3, {"attn": 0.2, "resid": 0.3}),
        (0.0, 0.3, {"attn": 0.0, "resid": 0.3}),
    ]


def test_type_and_name_together_select_the_intersection() -> None:
    model = transformer()
    rates = S.attach(model, S.Constant(0.0), modules=nn.Dropout, names="0.*")
    assert rates.attachments[0].names == ["0.attn_drop", "0.resid_drop"]


def test_selection_errors() -> None:
    model = transformer()
    with pytest.raises(ValueError, match=r"no module of Sequential matched modules=.*names='\*.nothing'"):
        S.attach(model, S.Constant(0.0), names="*.nothing")
    with pytest.raises(ValueError, match=re.escape("module '0.attn' (Linear) has no attribute 'p'")):
        S.attach(model, S.Constant(0.0), names="0.attn*")
    with pytest.raises(TypeError, match=r"modules must be an nn.Module subclass"):
        S.attach(model, S.Constant(0.0), modules=int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"names must be a glob string.*got int"):
        S.attach(model, S.Constant(0.0), names=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schedule must be callable"):
        S.attach(model, 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got list"):
        S.attach([model], S.Constant(0.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attribute must be an attribute name, got '1p'"):
        S.attach(model, S.Constant(0.0), attribute="1p")
    rates = S.attach(model, S.Constant(0.0), names="*.attn_drop", label="a")
    with pytest.raises(
        ValueError, match=re.escape("'p' of module '0.attn_drop' (Dropout) is already scheduled")
    ):
        rates.attach(model, S.Constant(0.5), modules=dropkit.nn.Dropout, label="b")
    with pytest.raises(ValueError, match="label 'a' is already used"):
        rates.attach(model, S.Constant(0.5), names="*.resid_drop", label="a")
    assert len(rates.attachments) == 1


def test_invalid_rate_for_a_dropkit_module_is_refused_when_set() -> None:
    model = transformer()
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        S.attach(model, S.Constant(1.5), names="*.attn_drop")


def test_other_attributes_and_tensor_attributes() -> None:
    noise = dropkit.nn.GaussianNoise(std=1.0)
    rates = S.attach(
        nn.Sequential(noise), S.Linear(1.0, 0.0, 2), modules=dropkit.nn.GaussianNoise, attribute="std"
    )
    rates.step()
    assert noise.std == 0.5

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rate", torch.tensor(0.5))

    custom = Custom()
    buffer = custom.rate
    rates = S.attach(custom, S.Step([1], [0.25, 0.125]), modules=Custom, attribute="rate")
    assert custom.rate is buffer  # filled in place, never replaced
    assert custom.rate.item() == 0.25
    rates.step()
    assert custom.rate.item() == 0.125
    rates.restore()
    assert custom.rate is buffer
    assert custom.rate.item() == 0.5


def test_attaching_to_a_compiled_model_warns_about_float_rates_it_would_recompile_for() -> None:
    model = transformer()
    compiled = torch.compile(model)  # not run: wrapping is enough to see the compiled model
    with pytest.warns(UserWarning, match=r"treats 'p' of '0.resid_drop', '1.resid_drop' as a constant"):
        rates = S.attach(compiled, S.Constant(0.0), modules=nn.Dropout)
    # attached all the same (dropkit's Dropout, an nn.Dropout too, without a warning)
    assert rates.attachments[0].names == ["0.attn_drop", "0.resid_drop", "1.attn_drop", "1.resid_drop"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.attach(compiled, S.Constant(0.0), names="*.attn_drop")  # dropkit Dropout: no warning
        S.attach(model, S.Constant(0.0), modules=nn.Dropout1d)  # not compiled: nothing to say


def test_restore_puts_back_the_original_rates() -> None:
    model = transformer()
    rates = S.attach(model, S.Constant(0.0))
    rates.attach(model, S.Constant(0.0), modules=dropkit.nn.DropPath)
    assert model[0].resid_drop.p == 0.0
    rates.restore()
    assert [model[0].attn_drop.p, model[0].resid_drop.p, model[0].drop_path.p, model[2].p] == [
        0.1,
        0.1,
        0.1,
        0.2,
    ]
    assert rates.attachments == ()


def test_repr_lists_the_attachments() -> None:
    model = transformer()
    rates = S.attach(model, S.LateDropout(0.1, start=5), names="*.attn_drop", label="attn")
    assert repr(rates) == (
        "ScheduledRates(optimizer_steps=0, accumulation_steps=1)\n"
        "  attn: LateDropout(p=0.1, start=5) -> p of '0.attn_drop', '1.attn_drop'"
    )


# --- stepping: gradient accumulation, optimizer hooks --------------------------------------------


def test_gradient_accumulation_advances_every_n_calls() -> None:
    model = nn.Sequential(dropkit.nn.Dropout(0.5))
    rates = S.ScheduledRates(accumulation_steps=3).attach(model, S.Linear(0.0, 0.5, total_steps=4))
    seen = []
    for _ in range(8):
        seen.append((rates.optimizer_steps, rates.micro_steps, model[0].p))
        rates.step()
    assert seen == [
        (0, 0, 0.0),
        (0, 1, 0.0),
        (0, 2, 0.0),
        (1, 0, 0.125),
        (1, 1, 0.125),
        (1, 2, 0.125),
        (2, 0, 0.25),
        (2, 1, 0.25),
    ]


def test_follow_advances_on_each_real_optimizer_step() -> None:
    model = nn.Sequential(nn.Linear(4, 4), dropkit.nn.Dropout(0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rates = S.attach(model, S.Step([1, 2], [0.25, 0.5, 0.75]), optimizer=opt)
    seen = []
    for micro_batch in range(6):  # accumulation over 2 micro-batches: 3 optimizer steps
        seen.append(model[1].p)
        model(torch.randn(2, 4)).sum().backward()
        if micro_batch % 2 == 1:
            opt.step()
            opt.zero_grad()
    assert seen == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75]
    assert rates.optimizer_steps == 3
    assert rates.following
    with pytest.raises(RuntimeError, match=r"advances on optimizer.step"):
        rates.step()
    with pytest.raises(RuntimeError, match="already follows an optimizer"):
        rates.follow(opt)
    rates.unfollow()
    assert not rates.following
    opt.step()
    assert rates.optimizer_steps == 3
    rates.step()
    assert rates.optimizer_steps == 4


def test_follow_refuses_accumulation_steps_and_non_optimizers() -> None:
    model = nn.Sequential(dropkit.nn.Dropout(0.5))
    with pytest.raises(ValueError, match="accumulation_steps=1, got 2"):
        S.attach(
            model,
            S.Constant(0.1),
            accumulation_steps=2,
            optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))]),
        )
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got str"):
        S.ScheduledRates().follow("sgd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="accumulation_steps must be >= 1, got 0"):
        S.ScheduledRates(accumulation_steps=0)


# --- resuming ------------------------------------------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), dropkit.nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 1), nn.Dropout(0.0)
    )


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, rates: S.ScheduledRates, micro_batches: range
) -> list[tuple[float, float]]:
    """Micro-batches with accumulation over 2 (data is a function of the index); the rates seen."""
    seen = []
    for i in micro_batches:
        x = torch.linspace(-1, 1, 24).reshape(4, 6) * (i + 1)
        seen.append((model[1].p, model[4].p))
        (model(x).square().mean() / 2).backward()
        rates.step()
        if i % 2 == 1:
            opt.step()
            opt.zero_grad()
    return seen


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, S.ScheduledRates]:
    dropkit.manual_seed(11)
    torch.manual_seed(11)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rates = S.ScheduledRates(accumulation_steps=2)
    rates.attach(model, S.EarlyDropout(0.5, steps=4, mode="linear"), modules=dropkit.nn.Dropout)
    rates.attach(model, S.LateDropout(0.25, start=3), names="4")
    return model, opt, rates


def test_resume_mid_schedule_matches_an_uninterrupted_run() -> None:
    model, opt, rates = _setup()
    full = _train(model, opt, rates, range(12))
    expected_weights = [p.detach().clone() for p in model.parameters()]
    # The early schedule is np.linspace(0.5, 0, 4) per optimizer step, the late one 0 then 0.25.
    early = [0.5, 0.5 * (1 - 1 / 3), 0.5 * (1 - 2 / 3), 0.0, 0.0, 0.0]
    assert full == [(early[i // 2], 0.25 if i // 2 >= 3 else 0.0) for i in range(12)]

    # Interrupted after 5 micro-batches: mid-accumulation and mid-schedule.
    model, opt, rates = _setup()
    first = _train(model, opt, rates, range(5))
    checkpoint = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "rates": rates.state_dict(),
            "grads": [p.grad for p in model.parameters()],
            "rng_step": model[1].rng_step.clone(),
        },
        checkpoint,
    )
    checkpoint.seek(0)
    state = torch.load(checkpoint, weights_only=True)
    assert state["rates"] == {"optimizer_steps": 2, "micro_steps": 1, "accumulation_steps": 2}

    model, opt, rates = _setup()  # a fresh process would rebuild everything the same way
    assert model[1].p == 0.5
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rates.load_state_dict(state["rates"])
    for param, grad in zip(model.parameters(), state["grads"], strict=True):
        param.grad = grad
    model[1].rng_step.copy_(state["rng_step"])
    assert model[1].p == early[2]
    rest = _train(model, opt, rates, range(5, 12))
    assert first + rest == full
    for param, expected in zip(model.parameters(), expected_weights, strict=True):
        assert torch.equal(param, expected)


def test_load_state_dict_validation() -> None:
    rates = S.ScheduledRates(accumulation_steps=2)
    with pytest.raises(ValueError, match="saved with accumulation_steps=4, this controller has 2"):
        rates.load_state_dict({"optimizer_steps": 1, "micro_steps": 0, "accumulation_steps": 4})
    with pytest.raises(ValueError, match="micro_steps must be in \\[0, 1\\], got 2"):
        rates.load_state_dict({"optimizer_steps": 1, "micro_steps": 2, "accumulation_steps": 2})
    with pytest.raises(ValueError, match="state_dict must have the keys"):
        rates.load_state_dict({"optimizer_steps": 1})
    with pytest.raises(TypeError, match="optimizer_steps must be an int, got float"):
        rates.load_state_dict({"optimizer_steps": 1.0, "micro_steps": 0, "accumulation_steps": 2})
    with pytest.raises(TypeError, match="state_dict must be a mapping, got list"):
        rates.load_state_dict([])  # type: ignore[arg-type]


# --- dropkit modules: p as a property mirrored into a tensor -----------------------------------


def test_dropkit_p_property_validates_and_keeps_checkpoints_compatible() -> None:
    m = dropkit.nn.Dropout(0.25)
    holder = m.p_tensor
    m.p = 0.5
    assert m.p == 0.5
    assert m.p_tensor is holder
    assert m.p_tensor.dtype == torch.float64
    assert m.p_tensor.tolist() == [0.5]
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got -0.5"):
        m.p = -0.5
    assert m.p == 0.5
    assert list(nn.Sequential(m).state_dict()) == list(nn.Sequential(nn.Dropout()).state_dict()) == []
    assert repr(m) == "Dropout(p=0.5, inplace=False)"


@pytest.mark.slow
def test_compiled_model_does_not_recompile_when_the_schedule_changes_the_rate() -> None:
    torch._dynamo.reset()
    dropkit.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16),
        dropkit.nn.Dropout(0.1),
        nn.Unflatten(1, (4, 4)),
        dropkit.nn.Dropout1d(0.1),
        nn.Flatten(),
        nn.Linear(16, 4),
        dropkit.nn.Dropout(0.1, inverted=False),  # eval scales by 1 - p: the rate is used in eval
    )
    x = torch.randn(32, 8)
    schedule = S.Step([1, 2, 3, 4], [0.1, 0.0, 0.5, 1.0, 0.3])

    def run(fn: nn.Module, rates: S.ScheduledRates, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dropkit.manual_seed(7)
        results = []
        for _ in range(steps):
            model.zero_grad()
            y = fn(x)
            y.square().sum().backward()
            results.append((y.detach(), model[0].weight.grad.clone()))  # type: ignore[union-attr]
            rates.step()
        rates.set_step(0)
        return results

    rates = S.attach(model, schedule)
    eager = run(model, rates, 5)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    rates.restore()
    rates = S.attach(compiled, schedule)  # the compile wrapper is looked through
    assert rates.attachments[0].names == ["1", "3", "6"]
    first = run(compiled, rates, 1)
    frames = counter.frame_count
    assert frames == 1  # one graph, traced without restarts (a 0-dim rate tensor would restart)
    with torch.compiler.set_stance("fail_on_recompile"):
        results = first + run(compiled, rates, 5)[1:]
    assert counter.frame_count == frames
    for step, ((y_e, g_e), (y_c, g_c)) in enumerate(zip(eager, results, strict=True)):
        assert torch.equal(y_e, y_c), f"step {step}, p = {schedule(step)}"
        torch.testing.assert_close(g_c, g_e)
    assert (eager[3][0] == 0).all()  # p = 1 at step 3: every dropout zeroes everything

    model.eval()
    compiled(x)  # the training flag is guarded: eval compiles its own graph once
    frames = counter.frame_count
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in (0, 2, 3, 4):
            rates.set_step(step)
            assert torch.equal(compiled(x), model(x)), f"eval at p = {schedule(step)}"
    assert counter.frame_count == frames
    assert torch.equal(model(x), model[:6](x) * (1 - realised(0.3)))  # the realised keep probability


# --- Lightning -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_lightning_is_imported_only_when_the_callback_is_asked_for() -> None:
    code = (
        "import sys, dropkit.schedules, dropkit.schedules.lightning; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    with pytest.raises(ValueError, match="package must be one of"):
        rate_schedule_callback_class("keras")


@pytest.mark.slow
def test_lightning_callback_steps_by_optimizer_steps_and_logs() -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4), dropkit.nn.Dropout(0.5), nn.Linear(4, 1))
            self.seen: list[tuple[int, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.seen.append((self.trainer.global_step, self.net[1].p))
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    rates = S.attach(module, S.Linear(0.5, 0.0, total_steps=4), label="hidden")
    callback = S.RateScheduleCallback(rates)
    assert isinstance(callback, pl.Callback)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(14, 4)), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # Lightning's advice about dataloader workers and the like is not what this test checks.
        warnings.simplefilter("ignore", UserWarning)
        # Lightning 2.6 calls torch.utils._pytree.LeafSpec, deprecated in recent torch.
        warnings.simplefilter("ignore", FutureWarning)
        trainer.fit(module, data)
    # 7 batches with accumulation over 2: optimizer steps after batches 2, 4, 6 and the last.
    assert module.seen == [(0, 0.5), (0, 0.5), (1, 0.375), (1, 0.375), (2, 0.25), (2, 0.25), (3, 0.125)]
    assert rates.optimizer_steps == trainer.global_step == 4
    assert module.net[1].p == 0.0
    assert trainer.callback_metrics["dropout_rate/hidden"].item() == 0.0
    assert callback.state_dict() == {"optimizer_steps": 4, "micro_steps": 0, "accumulation_steps": 1}
    with pytest.raises(ValueError, match="accumulation_steps=1, got 2"):
        S.RateScheduleCallback(S.ScheduledRates(accumulation_steps=2))
    if importlib.util.find_spec("pytorch_lightning") is not None:  # the standalone package
        import pytorch_lightning

        standalone = rate_schedule_callback_class("pytorch_lightning")
        assert issubclass(standalone, pytorch_lightning.Callback)
        assert not issubclass(standalone, pl.Callback)
