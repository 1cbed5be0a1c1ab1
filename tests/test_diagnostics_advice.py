"""``suggest_rates`` (a rate and variant per site, from its position and the findings), ``sweep``
(a curve over rates with error bars over seeds) and the HTML / Markdown / JSON reports."""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dropkit
from dropkit.diagnostics import (
    RANGES,
    check,
    measure,
    render_html,
    render_markdown,
    suggest_rates,
    sweep,
    write_report,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# suggest_rates


def _by_site(model: nn.Module, inputs: Any = None, **options: Any) -> dict[str, Any]:
    return {advice.site: advice for advice in suggest_rates(model, inputs, **options)}


def test_rates_move_into_the_usual_range_of_their_position() -> None:
    model = nn.Sequential(
        nn.Dropout(0.5),  # input: 0-0.2
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Dropout(0.1),  # dense: 0.3-0.5, below
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Dropout(0.4),  # dense, in range
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Dropout(0.0),  # no rate yet
        nn.Linear(8, 2),
    )
    advice = _by_site(model, torch.randn(4, 8))
    assert {site: (a.position, a.suggested) for site, a in advice.items()} == {
        "0": ("input", 0.2),
        "3": ("dense", 0.3),
        "6": ("dense", 0.4),
        "9": ("dense", RANGES["dense"].default),
    }
    assert (advice["3"].low, advice["3"].high) == (0.3, 0.5)
    assert "nearest end" in advice["3"].reason
    assert "in range" in advice["6"].reason
    assert "Srivastava" in advice["0"].reason
    assert all(a.layer is None for a in advice.values())


def test_findings_shape_the_advice() -> None:
    bn = _by_site(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    assert bn["1"].suggested == 0.0
    assert "BatchNorm" in bn["1"].reason
    conv = _by_site(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 3)))
    assert conv["2"].position == "conv"
    assert conv["2"].suggested == 0.3
    assert conv["2"].layer == "dropkit.nn.Dropout2d or dropkit.nn.DropBlock2d"
    selu = _by_site(nn.Sequential(nn.Linear(8, 8), nn.SELU(), nn.Dropout(0.3), nn.Linear(8, 2)))
    assert (selu["2"].suggested, selu["2"].layer) == (0.1, "dropkit.nn.AlphaDropout")
    weights = _by_site(nn.Sequential(dropkit.nn.DropConnect(nn.Linear(8, 8), 0.5), nn.Linear(8, 2)))
    assert weights["0"].position is None
    assert weights["0"].suggested is None
    plenty = _by_site(
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)), n_train=10**5
    )
    assert plenty["2"].suggested == 0.3
    assert "DK109" in plenty["2"].reason


def test_rate_holders_get_no_advice_of_their_own() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    report = check(model, {"input_ids": torch.randint(0, 99, (2, 5))})
    advice = suggest_rates(model, {"input_ids": torch.randint(0, 99, (2, 5))})
    holders = {site.path for site in report.sites if site.note.startswith("holds the rate")}
    assert not holders & {a.site for a in advice}
    assert all(a.suggested == 0.1 for a in advice)
    assert len(advice) == len(report.sites) - len(holders)


# ---------------------------------------------------------------------------------------------
# sweep


def test_sweep_statistics_by_hand() -> None:
    scores = {(0.1, 0): 3.0, (0.1, 1): 5.0, (0.3, 0): 1.0, (0.3, 1): 2.0, (0.5, 0): 1.5, (0.5, 1): 2.5}
    calls: list[tuple[float, int, int]] = []

    def train(rate: float, seed: int, budget: int) -> tuple[float, int]:
        calls.append((rate, seed, budget))
        return rate, seed

    result = sweep(train, lambda key: scores[key], rates=(0.1, 0.3, 0.5), seeds=(0, 1), budget=7)
    assert calls == [(0.1, 0, 7), (0.1, 1, 7), (0.3, 0, 7), (0.3, 1, 7), (0.5, 0, 7), (0.5, 1, 7)]
    first = result.points[0]
    assert (first.values, first.mean, first.std) == ((3.0, 5.0), 4.0, math.sqrt(2.0))
    assert first.sem == pytest.approx(1.0)
    assert result.best_rate == 0.3
    # Best mean 1.5 with s.e. 0.5: rate 0.5 (mean 2.0) is within one s.e., 0.1 (mean 4.0) is not.
    assert result.within_one_se == (0.3, 0.5)
    best_accuracy = sweep(
        train, lambda key: scores[key], rates=(0.1, 0.3), seeds=(0, 1), budget=7, minimize=False
    )
    assert best_accuracy.best_rate == 0.1
    assert "<- best" in result.table().splitlines()[2]
    assert json.loads(json.dumps(result.to_dict()))["best_rate"] == 0.3


def test_sweep_seeds_torch_and_dropkit_before_each_run() -> None:
    def train(rate: float, seed: int) -> tuple[float, float]:
        layer = dropkit.nn.Dropout(0.5)
        return float(torch.rand(())), float(layer(torch.ones(64)).sum())

    draws: list[tuple[float, float]] = []

    def score(result: tuple[float, float]) -> float:
        draws.append(result)
        return result[0]

    sweep(train, score, rates=(0.1, 0.2), seeds=(4, 5))
    assert draws[0] == draws[2]
    assert draws[1] == draws[3]
    assert draws[0] != draws[1]


def test_a_short_real_sweep_trains_and_ranks() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=generator)
    y = (x[:, :3].sum(1) > 0).long()

    def train(rate: float, seed: int, steps: int) -> nn.Module:
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), dropkit.nn.Dropout(rate), nn.Linear(32, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[:150]), y[:150]).backward()
            optimizer.step()
        return model.eval()

    def error(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x[150:]).argmax(1) != y[150:]).float().mean())

    result = sweep(train, error, rates=(0.0, 0.5, 0.95), seeds=(0, 1), budget=40)
    assert [point.rate for point in result.points] == [0.0, 0.5, 0.95]
    assert all(0.0 <= point.mean <= 1.0 for point in result.points)
    assert result.best_rate in (0.0, 0.5)  # dropping 95 % of 32 units for 40 steps learns least
    assert sweep(train, error, rates=(0.0, 0.5, 0.95), seeds=(0, 1), budget=40) == result


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rates": ()}, ValueError, "rates must be a non-empty sequence without repeats"),
        ({"rates": (0.1, 0.1)}, ValueError, "without repeats"),
        ({"rates": (1.5,)}, ValueError, "rates must be in \\[0, 1\\], got 1.5"),
        ({"seeds": ()}, ValueError, "seeds must be a non-empty sequence"),
        ({"seeds": (0.5,)}, TypeError, "seeds must be ints"),
        ({"minimize": "yes"}, TypeError, "minimize must be a bool"),
        ({"eval_fn": lambda model: float("nan")}, ValueError, "eval_fn must return a finite number"),
        ({"train_fn": 3}, TypeError, "train_fn and eval_fn must be callable"),
    ],
)
def test_sweep_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments: dict[str, Any] = {"train_fn": lambda rate, seed: rate, "eval_fn": lambda model: 0.0, **kwargs}
    with pytest.raises(error, match=match):
        sweep(**arguments)


# ---------------------------------------------------------------------------------------------
# Reports


def _measured_report() -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    report = check(model, x)
    report.measurements = measure(model, x, y, T_values=(1, 5, 20))
    return report


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def test_html_and_markdown_reports_are_self_contained_with_plots() -> None:
    pytest.importorskip("matplotlib")
    report = _measured_report()
    result = sweep(lambda rate, seed: rate, lambda rate: (rate - 0.3) ** 2, rates=(0.1, 0.3), seeds=(0, 1))
    page = render_html(report, sweep=result)
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    assert "DK101" in page
    assert "Li et al. predict" in page
    assert "<script" not in page
    assert "http" not in page
    images = _images(page)
    assert len(images) == 4  # ensemble gap, variance shift, activations, sweep
    assert all(image.startswith(b"\x89PNG") for image in images)
    text = render_markdown(report, title="my model")
    assert text.startswith("# my model")
    assert "| DK101 | warning | 1 |" in text
    assert len(_images(text)) == 3
    assert len(_images(render_markdown(report, plots=False))) == 0


def test_reports_escape_what_they_show() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module("a<b>|c", nn.Dropout(0.9))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, "a<b>|c")(x)

    report = check(Model())
    page = render_html(report, plots=False)
    assert "a&lt;b&gt;|c" in page
    assert "a<b>" not in page
    assert "a<b>\\|c" in render_markdown(report, plots=False)


def test_write_report_picks_the_format_from_the_extension(tmp_path: Path) -> None:
    report = check(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    data = json.loads(write_report(report, tmp_path / "r.json").read_text())
    assert data["findings"][0]["code"] == "DK102"
    assert write_report(report, tmp_path / "r.md", plots=False).read_text().startswith("# dropkit doctor")
    assert "<html" in write_report(report, tmp_path / "r.HTML", plots=False).read_text()
    with pytest.raises(ValueError, match=r"must end in \.html, \.htm, \.md or \.json"):
        write_report(report, tmp_path / "r.txt")
    with pytest.raises(ValueError, match="does not exist"):
        write_report(report, tmp_path / "missing" / "r.md")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        write_report(report, 3)  # type: ignore[arg-type]
