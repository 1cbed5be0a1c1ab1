"""ECE (uniform and adaptive bins), MCE, reliability data and the stateful CalibrationMetric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dropkit.metrics import calibration as C
from dropkit.metrics.stateful import CalibrationMetric

# The tiny hand example: confidences 0.9, 0.8, 0.7, 0.6; correctness 1, 0, 1, 1.
HAND_PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 1, 1, 1])


def _data(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overconfident predictions: labels drawn from a flatter distribution than the one reported."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(n, c, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=generator).squeeze(1)
    return torch.softmax(logits, dim=1), labels


def _numpy_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[float, float]:
    """Independent loop reference: equal-width bins (lo, hi], the first bin closed at 0."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        in_bin = (confidence > edges[b]) & (confidence <= edges[b + 1])
        if b == 0:
            in_bin |= confidence == 0.0
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            ece += in_bin.mean() * gap
            mce = max(mce, gap)
    return ece, mce


def test_hand_example_uniform_and_adaptive() -> None:
    ece, used = C.expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2)
    assert (float(ece), used) == (pytest.approx(0.0, abs=1e-15), 2)  # one bin: conf 0.75 = acc 0.75
    ece, used = C.expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=4)
    assert (float(ece), used) == (pytest.approx(0.35), 4)  # 0.5·|0.5 - 0.85| + 0.5·|1 - 0.65|
    mce, _ = C.max_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=4)
    assert float(mce) == pytest.approx(0.35)
    ece, used = C.expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=10, binning="adaptive")
    assert (float(ece), used) == (pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4), 4)
    ece, used = C.expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2, binning="adaptive")
    # Bins {0.6, 0.7}: conf 0.65, acc 1; {0.8, 0.9}: conf 0.85, acc 0.5.
    assert (float(ece), used) == (pytest.approx(0.35), 2)
    mce, used = C.max_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=10, binning="adaptive")
    assert (float(mce), used) == (pytest.approx(0.8), 4)


def test_one_bin_is_the_global_gap() -> None:
    probs, labels = _data(200, 5)
    ece, used = C.expected_calibration_error(probs, labels, n_bins=1)
    gap = abs(float((probs.argmax(1) == labels).double().mean()) - float(probs.max(1).values.mean()))
    assert used == 1
    assert float(ece) == pytest.approx(gap, rel=1e-12)
    assert float(C.max_calibration_error(probs, labels, n_bins=1).value) == pytest.approx(gap, rel=1e-12)


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15, 37])
def test_uniform_matches_numpy_loop(n_bins: int) -> None:
    probs, labels = _data(500, 4, seed=n_bins)
    expected_ece, expected_mce = _numpy_ece(probs.numpy(), labels.numpy(), n_bins)
    ece, used = C.expected_calibration_error(probs, labels, n_bins=n_bins)
    assert used == n_bins
    assert float(ece) == pytest.approx(expected_ece, rel=1e-12, abs=1e-15)
    assert float(C.max_calibration_error(probs, labels, n_bins=n_bins).value) == pytest.approx(
        expected_mce, rel=1e-12
    )
    assert expected_ece > 0.02  # the data is miscalibrated: the comparison is not between zeros


def test_bins_are_closed_on_the_right() -> None:
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]], dtype=torch.float64)
    data = C.reliability_diagram_data(probs, torch.tensor([0, 0, 1]), n_bins=4)
    # 0.5 -> (0.25, 0.5]; 0.75 -> (0.5, 0.75]; 1.0 -> (0.75, 1].
    assert data.counts.tolist() == [0, 1, 1, 1]
    assert data.accuracy.tolist()[1:] == [1.0, 0.0, 1.0]
    assert math.isnan(float(data.confidence[0]))
    assert math.isnan(float(data.accuracy[0]))


def test_reliability_data_consistent_with_ece() -> None:
    probs, labels = _data(300, 3, seed=5)
    for binning in ("uniform", "adaptive"):
        data = C.reliability_diagram_data(probs, labels, n_bins=12, binning=binning)
        assert int(data.counts.sum()) == 300
        assert data.edges.shape == (data.counts.numel() + 1,)
        assert float(data.edges[0]) == 0.0
        assert float(data.edges[-1]) == 1.0
        assert bool((data.edges[1:] > data.edges[:-1]).all())
        weights = data.counts.double() / 300
        from_data = torch.nansum(weights * (data.accuracy - data.confidence).abs())
        ece = C.expected_calibration_error(probs, labels, n_bins=12, binning=binning).value
        torch.testing.assert_close(ece, from_data)
        mce = C.max_calibration_error(probs, labels, n_bins=12, binning=binning).value
        assert float(mce) >= float(ece)


def test_adaptive_bins_equal_mass() -> None:
    probs, labels = _data(100, 10, seed=2)  # 100 distinct confidences
    data = C.reliability_diagram_data(probs, labels, n_bins=10, binning="adaptive")
    assert data.counts.tolist() == [10] * 10
    data = C.reliability_diagram_data(probs, labels, n_bins=7, binning="adaptive")
    assert sorted(set(data.counts.tolist())) == [14, 15]  # sizes differ by at most one
    assert C.expected_calibration_error(probs, labels, n_bins=7, binning="adaptive").n_bins == 7
    # Within each bin the confidences are a contiguous block of the sorted confidences.
    confidence = probs.max(1).values.sort().values
    boundaries = torch.cumsum(data.counts, 0)[:-1] - 1
    torch.testing.assert_close(data.edges[1:-1], confidence[boundaries])


def _ties(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    conf = torch.tensor(values, dtype=torch.float64)
    return torch.stack([conf, 1.0 - conf], dim=1), torch.zeros(len(values), dtype=torch.long)


def test_adaptive_bins_merge_on_ties_and_small_n() -> None:
    # Groups of two: [.6 .6 | .6 .7 | .8 .9]; the tie at the first boundary keeps all 0.6 together.
    probs, labels = _ties([0.6, 0.6, 0.6, 0.7, 0.8, 0.9])
    data = C.reliability_diagram_data(probs, labels, n_bins=3, binning="adaptive")
    assert data.counts.tolist() == [3, 1, 2]
    # [.6 .6 | .6 .6 | .9 .9]: two boundaries fall inside the tie -> 2 bins used.
    probs, labels = _ties([0.6, 0.6, 0.6, 0.6, 0.9, 0.9])
    ece, used = C.expected_calibration_error(probs, labels, n_bins=3, binning="adaptive")
    assert used == 2
    assert C.reliability_diagram_data(probs, labels, n_bins=3, binning="adaptive").counts.tolist() == [4, 2]
    assert float(ece) == pytest.approx((4 * 0.4 + 2 * 0.1) / 6)
    # A tie across a boundary goes wholly into the lower bin: [.55 .9 | .9 .9] is one bin.
    probs, labels = _ties([0.55, 0.9, 0.9, 0.9])
    assert C.reliability_diagram_data(probs, labels, n_bins=2, binning="adaptive").counts.tolist() == [4]
    probs, labels = _ties([0.55, 0.6, 0.9, 0.9])
    assert C.reliability_diagram_data(probs, labels, n_bins=2, binning="adaptive").counts.tolist() == [2, 2]
    # Every confidence equal: one bin whatever was asked.
    probs, labels = _ties([0.7] * 5)
    assert C.expected_calibration_error(probs, labels, n_bins=4, binning="adaptive").n_bins == 1
    # N < n_bins: at most N bins.
    probs, labels = _ties([0.6, 0.7, 0.8])
    assert C.expected_calibration_error(probs, labels, n_bins=15, binning="adaptive").n_bins == 3
    # Uniform binning always reports the requested count, empty bins included.
    assert C.expected_calibration_error(probs, labels, n_bins=15).n_bins == 15


def test_float32_input() -> None:
    probs, labels = _data(400, 6, seed=4)
    ece64 = C.expected_calibration_error(probs, labels).value
    ece32 = C.expected_calibration_error(probs.float(), labels).value
    assert ece32.dtype == torch.float32
    assert float(ece32) == pytest.approx(float(ece64), abs=1e-5)


def test_bad_inputs_rejected() -> None:
    probs, labels = HAND_PROBS, HAND_LABELS
    for fn in (C.expected_calibration_error, C.max_calibration_error, C.reliability_diagram_data):
        with pytest.raises(ValueError, match="n_bins must be >= 1, got 0"):
            fn(probs, labels, n_bins=0)
        with pytest.raises(TypeError, match=r"n_bins must be an int, got float \(2.5\)"):
            fn(probs, labels, n_bins=2.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="n_bins must be an int, got bool"):
            fn(probs, labels, n_bins=True)
        with pytest.raises(ValueError, match=r"binning must be one of .* got 'quantile'"):
            fn(probs, labels, binning="quantile")
        with pytest.raises(ValueError, match=r"shape \(N, C\), got 3-D .* predictive_mean"):
            fn(probs[None], labels)
        with pytest.raises(
            ValueError, match=r"labels must be class indices in \[0, 1\], got values in \[0, 5\]"
        ):
            fn(probs, torch.tensor([0, 1, 5, 1]))
        with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
            fn(probs, labels[:3])
        with pytest.raises(ValueError, match=r"sum to 1"):
            fn(probs * 0.9, labels)
        with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-0.1"):
            fn(torch.tensor([[1.1, -0.1]]), torch.tensor([0]))


@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
def test_stateful_equals_functional(binning: str) -> None:
    probs, labels = _data(250, 4, seed=9)
    metric = CalibrationMetric(n_bins=10, binning=binning)
    for start, stop in [(0, 1), (1, 100), (100, 101), (101, 250)]:
        metric.update(probs[start:stop], labels[start:stop])
    ece, used = metric.compute()
    expected = C.expected_calibration_error(probs, labels, n_bins=10, binning=binning)
    assert used == expected.n_bins
    torch.testing.assert_close(ece, expected.value, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        metric.max_calibration_error().value,
        C.max_calibration_error(probs, labels, n_bins=10, binning=binning).value,
    )
    data, reference = (
        metric.reliability_diagram_data(),
        C.reliability_diagram_data(probs, labels, n_bins=10, binning=binning),
    )
    for got, want in zip(data, reference, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)
    assert repr(metric) == f"CalibrationMetric(n_bins=10, binning={binning!r})"

    metric.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()
    metric.update(HAND_PROBS, HAND_LABELS)
    assert float(metric.compute().value) == pytest.approx(
        float(C.expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=10, binning=binning).value)
    )


def test_stateful_rejects_bad_configuration_and_class_change() -> None:
    with pytest.raises(ValueError, match="n_bins must be >= 1, got -3"):
        CalibrationMetric(n_bins=-3)
    with pytest.raises(ValueError, match="binning must be one of"):
        CalibrationMetric(binning="equal")
    metric = CalibrationMetric()
    metric.update(HAND_PROBS, HAND_LABELS)
    with pytest.raises(ValueError, match="3 classes, but earlier batches had 2"):
        metric.update(torch.full((2, 3), 1 / 3), torch.tensor([0, 2]))
    assert len(metric.reliability_diagram_data().counts) == 15
    assert int(metric.reliability_diagram_data().counts.sum()) == 4  # the rejected batch was not stored
