"""Plots write non-empty files of the format their extension names, and reject bad arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from dropkit.metrics import classification as M
from dropkit.metrics import plots as P

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


def _assert_format(path: Path, suffix: str) -> None:
    data = path.read_bytes()
    assert len(data) > 1000
    if suffix == "svg":
        assert b"<svg" in data[:2000]
        assert data.rstrip().endswith(b"</svg>")
    else:
        assert data.startswith(MAGIC[suffix])


def _classification(n: int = 300, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    samples = torch.softmax(2 * torch.randn(1, n, c, generator=generator) + torch.randn(8, n, c), dim=-1)
    labels = torch.randint(0, c, (n,), generator=generator)
    return samples, labels


@pytest.mark.parametrize("suffix", ["png", "pdf", "svg"])
@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
def test_reliability_diagram_writes_file(tmp_path: Path, suffix: str, binning: str) -> None:
    samples, labels = _classification()
    target = tmp_path / f"reliability.{suffix}"
    result = P.plot_reliability_diagram(
        M.predictive_mean(samples), labels, target, n_bins=10, binning=binning, title="MC dropout"
    )
    assert result == target
    _assert_format(target, suffix)


@pytest.mark.parametrize("suffix", ["png", "pdf", "svg"])
def test_uncertainty_histograms_write_file(tmp_path: Path, suffix: str) -> None:
    samples, labels = _classification()
    correct = M.predictive_mean(samples).argmax(1) == labels
    entropy = M.predictive_entropy(samples)
    target = tmp_path / f"hist.{suffix}"
    result = P.plot_uncertainty_histograms(
        {"correct": entropy[correct], "misclassified": entropy[~correct]},
        str(target),
        bins=20,
        xlabel="predictive entropy (nats)",
        title="entropy",
    )
    assert result == target
    _assert_format(target, suffix)


def test_uncertainty_histograms_edge_cases(tmp_path: Path) -> None:
    # Constant scores, counts instead of density, an upper-case extension.
    target = tmp_path / "constant.PNG"
    P.plot_uncertainty_histograms({"in": torch.zeros(5), "out": torch.zeros(3)}, target, density=False)
    _assert_format(target, "png")


@pytest.mark.parametrize("suffix", ["png", "pdf", "svg"])
def test_regression_intervals_write_file(tmp_path: Path, suffix: str) -> None:
    x = torch.linspace(-3, 3, 40)[torch.randperm(40)]  # unsorted on purpose
    noise = 0.1 * torch.randn(40)
    target = tmp_path / f"intervals.{suffix}"
    result = P.plot_regression_intervals(x, x.sin() + noise, x.sin(), 0.1 + 0.05 * x.abs(), target, k=1.5)
    assert result == target
    _assert_format(target, suffix)


def test_bad_paths_rejected(tmp_path: Path) -> None:
    samples, labels = _classification(20)
    probs = M.predictive_mean(samples)
    with pytest.raises(ValueError, match=r"\.png, \.pdf or \.svg, got '.*diagram\.jpg'"):
        P.plot_reliability_diagram(probs, labels, tmp_path / "diagram.jpg")
    with pytest.raises(ValueError, match="directory does not exist"):
        P.plot_reliability_diagram(probs, labels, tmp_path / "missing" / "diagram.png")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        P.plot_reliability_diagram(probs, labels, 3)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_data_rejected(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    samples, labels = _classification(20)
    with pytest.raises(ValueError, match=r"shape \(N, C\), got 3-D"):
        P.plot_reliability_diagram(samples, labels, target)
    with pytest.raises(ValueError, match="n_bins must be >= 1, got 0"):
        P.plot_reliability_diagram(samples[0], labels, target, n_bins=0)
    with pytest.raises(ValueError, match="groups must be a non-empty mapping"):
        P.plot_uncertainty_histograms({}, target)
    with pytest.raises(ValueError, match=r"groups\['a'\] must be a non-empty 1-D tensor, got shape \(2, 2\)"):
        P.plot_uncertainty_histograms({"a": torch.zeros(2, 2)}, target)
    with pytest.raises(ValueError, match="bins must be >= 1, got 0"):
        P.plot_uncertainty_histograms({"a": torch.zeros(2)}, target, bins=0)
    x = torch.linspace(0, 1, 5)
    with pytest.raises(ValueError, match=r"std must be >= 0, got a minimum of -1"):
        P.plot_regression_intervals(x, x, x, x - 1, target)
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\) like x, got \(4,\)"):
        P.plot_regression_intervals(x, x, x[:4], x, target)
    with pytest.raises(ValueError, match="k must be a finite float >= 0, got -2"):
        P.plot_regression_intervals(x, x, x, x, target, k=-2.0)
    with pytest.raises(ValueError, match="y must be finite"):
        P.plot_regression_intervals(x, x / 0, x, x, target)
    assert not target.exists()
