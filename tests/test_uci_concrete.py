"""The UCI benchmark's concrete-dropout variant (beyond the protocol): objective, batching, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import dropkit
from dropkit.experiments.uci import cli, concrete
from dropkit.experiments.uci.concrete import ConcreteConfig, ConcreteMLP, ConcreteSpec
from dropkit.experiments.uci.data import load_dataset
from dropkit.functional.concrete import concrete_uniforms
from dropkit.nn import ConcreteDropout, concrete_regularizers
from tests.test_uci import _write_dataset


def _spec(
    slot: int = 0, data_index: int = 0, wr: float = 1e-3, dr: float = 1e-2, seed: int = 0
) -> ConcreteSpec:
    return ConcreteSpec(
        data_index=data_index,
        weight_regularizer=wr,
        dropout_regularizer=dr,
        init_seed=100 + seed,
        shuffle_seed=200 + data_index,
        slot=slot,
    )


def _random_model(g: int, n_in: int, n_hidden: int, dtype: torch.dtype = torch.float32) -> ConcreteMLP:
    gen = torch.Generator().manual_seed(7)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return ConcreteMLP(
        r(g, n_in, n_hidden),
        r(g, 1, n_hidden),
        r(g, n_hidden, 1),
        r(g, 1, 1),
        r(g, 1, 1, scale=0.5) - 2.0,
        r(g, 1, 1, scale=0.5) - 1.0,
    )


# --- the objective and the relaxed masks --------------------------------------------------------


def test_forward_is_the_relaxed_mask_formula() -> None:
    model = _random_model(1, 3, 5, torch.float64)
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    k1, k2 = dropkit.make_key(3, 8, 1), dropkit.make_key(3, 9, 1)
    out = concrete.forward(model, x, (k1, k2), temperature=0.1)

    def drop(v: torch.Tensor, logit: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logit)
        u = concrete_uniforms(key, tuple(v.shape), torch.float64)
        z = torch.sigmoid((p.log() - (1 - p).log() + u.log() - (1 - u).log()) / 0.1)
        return v * (1 - z) / (1 - p)

    h = torch.relu(drop(x, model.logit1, k1) @ model.w1 + model.b1)
    expected = (drop(h, model.logit2, k2) @ model.w2 + model.b2).squeeze(-1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_network_matches_dropkit_concrete_dropout_layers() -> None:
    model = _random_model(1, 3, 5)
    x = torch.randn(1, 6, 3)
    keys = (dropkit.make_key(1, 4, 0), dropkit.make_key(1, 5, 0))
    wr, dr = 1e-3, 2e-2
    first = ConcreteDropout(torch.nn.Linear(3, 5), weight_regularizer=wr, dropout_regularizer=dr)
    second = ConcreteDropout(torch.nn.Linear(5, 1), weight_regularizer=wr, dropout_regularizer=dr)
    with torch.no_grad():
        for layer, w, b, logit in (
            (first, model.w1, model.b1, model.logit1),
            (second, model.w2, model.b2, model.logit2),
        ):
            layer.module.weight.copy_(w[0].T)
            layer.module.bias.copy_(b.view(-1))
            layer.p_logit.copy_(logit.view(()))
    h = torch.relu(first(x[0], seed=keys[0]))
    expected = second(h, seed=keys[1]).view(1, -1)
    torch.testing.assert_close(concrete.forward(model, x, keys), expected, rtol=1e-5, atol=1e-6)
    zero = torch.zeros(1, 6)
    reg = concrete.objective(model, zero, zero, torch.tensor([wr]), torch.tensor([dr]))
    torch.testing.assert_close(reg, (first.regularization() + second.regularization()).view(1))


def test_objective_equals_direct_computation() -> None:
    model = _random_model(2, 4, 3, torch.float64)
    out = torch.randn(2, 5, dtype=torch.float64)
    y = torch.randn(2, 5, dtype=torch.float64)
    wr = torch.tensor([1e-3, 5e-2], dtype=torch.float64)
    dr = torch.tensor([2e-2, 1e-1], dtype=torch.float64)
    got = concrete.objective(model, out, y, wr, dr)
    for g in range(2):
        mse = sum((float(out[g, i]) - float(y[g, i])) ** 2 for i in range(5)) / 5
        total = mse
        for w, logit, k in ((model.w1, model.logit1, 4), (model.w2, model.logit2, 3)):
            p = 1.0 / (1.0 + math.exp(-float(logit[g])))
            total += float(wr[g]) * float(w[g].square().sum()) / (1 - p)
            total += float(dr[g]) * k * (p * math.log(p) + (1 - p) * math.log(1 - p))
        assert float(got[g]) == pytest.approx(total, rel=1e-12)


def test_objective_is_scaled_per_point_negative_elbo() -> None:
    n, tau, y_std, scale = 50, 0.4, 3.0, 0.1
    wr, dr = concrete_regularizers(scale, n, precision=tau, y_std=y_std)
    tau_s = tau * y_std**2
    assert (wr, dr) == (scale**2 / (tau_s * n), 2 / (tau_s * n))  # the library's, to the last bit
    model = _random_model(1, 4, 3, torch.float64)
    out = torch.randn(1, 6, dtype=torch.float64)
    y = torch.randn(1, 6, dtype=torch.float64)
    reg = (torch.tensor([wr], dtype=torch.float64), torch.tensor([dr], dtype=torch.float64))
    j = float(concrete.objective(model, out, y, *reg)[0])
    # Per-point negative ELBO: Gaussian NLL of precision tau_s, plus KL / N with M = W / (1 - p).
    nll = float((0.5 * tau_s * (y - out).square() + 0.5 * math.log(2 * math.pi / tau_s)).mean())
    kl = 0.0
    for w, logit, k in ((model.w1, model.logit1, 4), (model.w2, model.logit2, 3)):
        p = float(torch.sigmoid(logit))
        mean_weight = w[0] / (1 - p)
        kl += scale**2 * (1 - p) / 2 * float(mean_weight.square().sum())
        kl -= k * -(p * math.log(p) + (1 - p) * math.log(1 - p))  # - K H(p)
    elbo = nll + kl / n
    assert tau_s / 2 * j + 0.5 * math.log(2 * math.pi / tau_s) == pytest.approx(elbo, rel=1e-12)


def test_gradcheck_objective_and_forward_float64() -> None:
    model = _random_model(2, 3, 4, torch.float64)
    for t in model.parameters():
        t.requires_grad_(True)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.randn(2, 5, dtype=torch.float64)
    keys = (dropkit.make_key(0, 1, 2), dropkit.make_key(0, 3, 4))
    wr = torch.tensor([1e-2, 3e-2], dtype=torch.float64)
    dr = torch.tensor([5e-2, 1e-1], dtype=torch.float64)

    def loss(*params: torch.Tensor) -> torch.Tensor:
        m = ConcreteMLP(*params)
        return concrete.objective(m, concrete.forward(m, x, keys, temperature=0.5), y, wr, dr)

    assert torch.autograd.gradcheck(loss, tuple(model.parameters()))


# --- batched training ---------------------------------------------------------------------------


def _data(s: int = 2, n: int = 20, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(s, n, d, generator=gen)
    y = x.sum(-1) + 0.1 * torch.randn(s, n, generator=gen)
    return x, y


def test_batched_training_equals_one_at_a_time() -> None:
    x, y = _data()
    specs = [
        _spec(0, 0, 1e-3, 1e-2, seed=0),
        _spec(1, 0, 1e-2, 5e-2, seed=0),
        _spec(2, 1, 1e-4, 1e-1, seed=1),
    ]
    kw: dict[str, Any] = {"n_hidden": 6, "epochs": 3, "seed": 5, "stream": 9, "batch_size": 8}
    together = concrete.train_networks(specs, x, y, **kw)
    preds: list[torch.Tensor] = []
    concrete.predict_blocks(together, specs, x, samples=5, seed=5, stream=9, block=2, consume=preds.append)
    joint = torch.cat(preds, 1)
    for g, spec in enumerate(specs):
        alone = concrete.train_networks([spec], x, y, **kw)
        for a, b in zip(alone.parameters(), together.parameters(), strict=True):
            torch.testing.assert_close(a[0], b[g], rtol=1e-4, atol=1e-6)
        single: list[torch.Tensor] = []
        concrete.predict_blocks(alone, [spec], x, samples=5, seed=5, stream=9, block=2, consume=single.append)
        torch.testing.assert_close(torch.cat(single, 1)[0], joint[g], rtol=1e-4, atol=1e-5)


def test_learned_p_moves_and_stays_in_unit_interval() -> None:
    x, y = _data(1, 32)
    specs = [_spec(0, wr=1e-4, dr=1.0), _spec(1, wr=1e-4, dr=1e-6)]
    model = concrete.train_networks(specs, x, y, n_hidden=6, epochs=100, seed=0, stream=0, batch_size=16)
    p_in, p_hidden = model.rates()
    for p in (p_in, p_hidden):
        assert bool(((p > 0) & (p < 1)).all())
        # A strong entropy term pulls p towards 1/2: 200 Adam steps of at most about lr = 1e-3
        # move the logit by up to 0.2 (p: 0.1 -> 0.12); 0.1086 is observed.
        assert float(p[0]) > 0.105
        assert abs(float(p[1]) - 0.1) > 1e-3
    assert float(p_in[1]) != float(p_hidden[1])


# --- the variant end to end ---------------------------------------------------------------------


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--output",
        str(out),
        "--concrete",
        "--epochs-scale",
        "0.02",
        "--T",
        "20",
        "--val-T",
        "10",
        "--no-progress",
        *extra,
    ]


def test_cli_concrete_end_to_end_with_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    _write_dataset(data)
    out = tmp_path / "out"
    assert cli.main(_argv(data, out, "--split-batch", "1")) == 0
    folder = out / "concrete"
    assert sorted(p.name for p in (folder / "toy").iterdir()) == [f"split_{i}.json" for i in range(3)]
    assert not (out / "summary.md").exists()  # the protocol's files are not touched
    table = (folder / "summary.md").read_text()
    assert "Beyond the protocol: concrete dropout" in table
    assert "SHORTENED" in table
    assert (folder / "results.csv").read_text().count("\n") == 4
    summary = json.loads((folder / "summary.json").read_text())["summary"][0]
    assert summary["n_splits"] == 3
    assert 0 < summary["p_input"] < 1
    assert 0 < summary["p_hidden"] < 1
    result = json.loads((folder / "toy" / "split_1.json").read_text())["result"]
    assert result["epochs"] == 2
    assert result["samples"] == 20
    assert result["val_samples"] == 10
    assert result["tau"] in (0.5, 1.0)
    assert [r["tau"] for r in result["grid"]] == [0.5, 1.0]
    assert math.isfinite(result["ll"])
    assert result["rmse"] > 0
    assert "toy (concrete): RMSE" in capsys.readouterr().out

    # Each split's result does not depend on which splits share its batch.
    together = tmp_path / "together"
    assert cli.main(_argv(data, together)) == 0
    for i in range(3):
        a = json.loads((folder / "toy" / f"split_{i}.json").read_text())["result"]
        b = json.loads((together / "concrete" / "toy" / f"split_{i}.json").read_text())["result"]
        assert a["ll"] == pytest.approx(b["ll"], rel=1e-4)
        assert a["p_input"] == pytest.approx(b["p_input"], rel=1e-5)

    calls: list[list[int]] = []
    real = concrete.run_splits
    monkeypatch.setattr(
        concrete, "run_splits", lambda *a, **k: (calls.append([s.index for s in a[1]]), real(*a, **k))[1]
    )
    (folder / "toy" / "split_2.json").unlink()
    assert cli.main(_argv(data, out, "--resume")) == 0
    assert calls == [[2]]
    calls.clear()
    capsys.readouterr()
    assert cli.main([*_argv(data, out, "--resume"), "--seed", "3"]) == 0
    assert calls == [[0, 1, 2]]  # every file was written for seed 0: all recomputed, and said so
    assert (
        capsys.readouterr().err.count("written for other settings (config.seed=0, now 3); recomputing") == 3
    )


def test_run_splits_reports_learned_rates(tmp_path: Path) -> None:
    _write_dataset(tmp_path, n_splits=2)
    dataset = load_dataset(tmp_path, "toy")
    config = ConcreteConfig(epochs_scale=0.03, samples=12, val_samples=6, extra_taus=(3.0,))
    seen: set[str] = set()
    results = concrete.run_splits(dataset, dataset.splits, config, lambda ph, d, t: seen.add(ph))
    assert seen == {"grid", "validate", "retrain", "test"}
    assert [r["split"] for r in results] == [0, 1]
    for r in results:
        assert [g["tau"] for g in r["grid"]] == [0.5, 1.0, 3.0]
        assert r["validation_ll"] == max(g["validation_ll"] for g in r["grid"])
        assert 0 < r["p_input"] < 1
        assert 0 < r["p_hidden"] < 1
    assert not config.is_full_recipe()
    assert ConcreteConfig().is_full_recipe()


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"init_p": 1.0}, "init_p"),
        ({"init_p": 0.0}, "init_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"val_samples": 0}, "val_samples"),
        ({"samples": 1.5}, "samples"),
        ({"epochs_scale": -1.0}, "epochs_scale"),
        ({"lr": math.inf}, "lr"),
        ({"extra_taus": (0.0,)}, "extra_taus"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ConcreteConfig(**kwargs)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="precision"):
        concrete_regularizers(1e-2, 10, precision=0.0)
    with pytest.raises(ValueError, match="num_train must"):
        concrete_regularizers(1e-2, 0, precision=1.0)
    with pytest.raises(ValueError, match="y_std"):
        concrete_regularizers(1e-2, 10, precision=1.0, y_std=math.nan)
    with pytest.raises(ValueError, match="slot"):
        _spec(slot=-1)
    with pytest.raises(ValueError, match="dropout_regularizer"):
        _spec(dr=-1.0)
    x, y = _data()
    with pytest.raises(ValueError, match="x must be"):
        concrete.train_networks([_spec()], x[0], y, n_hidden=4, epochs=1, seed=0, stream=0)
    with pytest.raises(ValueError, match="slots"):
        concrete.train_networks([_spec(0), _spec(0)], x, y, n_hidden=4, epochs=1, seed=0, stream=0)
    with pytest.raises(ValueError, match="epochs"):
        concrete.train_networks([_spec()], x, y, n_hidden=4, epochs=0, seed=0, stream=0)
    with pytest.raises(ValueError, match="data_index"):
        concrete.train_networks([_spec(data_index=5)], x, y, n_hidden=4, epochs=1, seed=0, stream=0)
    with pytest.raises(ValueError, match="init_p"):
        concrete.init_networks([_spec()], 3, 4, init_p=1.0)
    with pytest.raises(TypeError, match="config must be a ConcreteConfig"):
        concrete.run_splits(None, [], object())  # type: ignore[arg-type]


def test_cli_rejects_bad_concrete_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _write_dataset(data, n_splits=1)
    assert cli.main([*_argv(data, tmp_path / "out"), "--val-T", "-3"]) == 2
    assert "val_samples" in capsys.readouterr().err
