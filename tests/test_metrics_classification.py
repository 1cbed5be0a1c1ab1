"""MC classification uncertainty, scoring rules, detection AUROC/AUPR and their stateful shells."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
)

from dropkit.metrics import classification as M
from dropkit.metrics import detection as D
from dropkit.metrics import stateful as S


def _samples(t: int, n: int, c: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """(T, N, C) softmax samples with a shared per-input offset, so passes partly agree."""
    generator = torch.Generator().manual_seed(seed)
    base = 2.0 * torch.randn(1, n, c, generator=generator, dtype=torch.float64)
    noise = torch.randn(t, n, c, generator=generator, dtype=torch.float64)
    return torch.softmax(base + noise, dim=-1).to(dtype)


def _labels(n: int, c: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# uncertainty summaries
# --------------------------------------------------------------------------------------------


def test_entropies_match_scipy() -> None:
    probs = _samples(7, 40, 5)
    p = probs.numpy()
    expected_total = scipy_entropy(p.mean(axis=0), axis=-1)
    expected_aleatoric = scipy_entropy(p, axis=-1).mean(axis=0)
    np.testing.assert_allclose(M.predictive_entropy(probs).numpy(), expected_total, rtol=1e-12)
    np.testing.assert_allclose(M.expected_entropy(probs).numpy(), expected_aleatoric, rtol=1e-12)
    np.testing.assert_allclose(
        M.mutual_information(probs).numpy(), expected_total - expected_aleatoric, atol=1e-12
    )
    np.testing.assert_allclose(M.predictive_mean(probs).numpy(), p.mean(axis=0), rtol=1e-12)


def test_entropy_of_zero_probabilities_is_finite() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    result = M.entropy(probs)
    torch.testing.assert_close(result, torch.tensor([0.0, math.log(2), math.log(3)], dtype=torch.float64))
    assert not torch.signbit(result[0])  # +0.0, not -0.0


def test_mutual_information_hand_computed_t2() -> None:
    # Two passes (0.9, 0.1) and (0.1, 0.9): p̄ = (0.5, 0.5), so MI = log 2 - H(0.9, 0.1).
    h09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    probs = torch.tensor(
        [[[0.9, 0.1], [1.0, 0.0], [0.3, 0.7]], [[0.1, 0.9], [0.0, 1.0], [0.3, 0.7]]], dtype=torch.float64
    )
    expected = torch.tensor([math.log(2) - h09, math.log(2), 0.0], dtype=torch.float64)
    torch.testing.assert_close(M.mutual_information(probs), expected)
    torch.testing.assert_close(M.expected_entropy(probs)[:2], torch.tensor([h09, 0.0], dtype=torch.float64))


def test_mutual_information_bounds_and_clamp() -> None:
    probs = _samples(5, 200, 4, dtype=torch.float32)
    mi = M.mutual_information(probs)
    assert bool((mi >= 0).all())
    assert float(mi.max()) <= math.log(4) + 1e-6
    # Identical passes: the exact MI is 0; float32 cancellation must not leave negatives.
    repeated = probs[:1].expand(6, -1, -1).contiguous()
    assert torch.equal(M.mutual_information(repeated), torch.zeros(200))
    # T = 1: no epistemic part.
    assert torch.equal(M.mutual_information(probs[:1]), torch.zeros(200))


def test_variation_ratio_hand_and_reference() -> None:
    probs = torch.tensor(
        [
            [[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]],
            [[0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1]],
            [[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.1, 0.8, 0.1]],
            [[0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.3, 0.3, 0.4]],
        ]
    )
    # Input 0: votes 0,0,1,0 -> 1 - 3/4. Input 1: within-pass ties vote class 0: votes 0,1,0,1 ->
    # tie between modes, 1 - 2/4. Input 2: votes 2,0,1,2 -> 1 - 2/4.
    torch.testing.assert_close(M.variation_ratio(probs), torch.tensor([0.25, 0.5, 0.5]))
    random = _samples(9, 100, 6)
    votes = random.argmax(-1).numpy()
    expected = [1.0 - np.bincount(votes[:, i], minlength=6).max() / 9 for i in range(100)]
    np.testing.assert_allclose(M.variation_ratio(random).numpy(), expected, rtol=0, atol=1e-15)
    assert torch.equal(M.variation_ratio(random[:1]), torch.zeros(100, dtype=torch.float64))


def test_uncertainty_scores_equal_individual_functions() -> None:
    probs = _samples(6, 30, 3)
    scores = M.uncertainty_scores(probs)
    assert torch.equal(scores.predictive_entropy, M.predictive_entropy(probs))
    assert torch.equal(scores.expected_entropy, M.expected_entropy(probs))
    assert torch.equal(scores.mutual_information, M.mutual_information(probs))
    assert torch.equal(scores.variation_ratio, M.variation_ratio(probs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    probs = _samples(3, 10, 4, dtype=torch.float64)
    low = probs.to(dtype)
    low = low / low.float().sum(-1, keepdim=True).to(dtype)  # renormalize after rounding
    result = M.predictive_entropy(low)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), M.predictive_entropy(probs), atol=0.05, rtol=0)


def test_float32_agrees_with_float64() -> None:
    probs = _samples(8, 50, 10)
    for name in ("predictive_entropy", "expected_entropy", "mutual_information", "variation_ratio"):
        fn = getattr(M, name)
        torch.testing.assert_close(fn(probs.float()).double(), fn(probs), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# NLL, Brier, accuracy
# --------------------------------------------------------------------------------------------


def test_nll_matches_sklearn_log_loss() -> None:
    probs = M.predictive_mean(_samples(4, 60, 5))
    labels = _labels(60, 5)
    expected = log_loss(labels.numpy(), probs.numpy(), labels=list(range(5)))
    assert float(M.nll(probs, labels)) == pytest.approx(expected, rel=1e-12)
    per_input = M.nll(probs, labels, reduction="none")
    torch.testing.assert_close(per_input, -probs[torch.arange(60), labels].log())
    assert float(M.nll(probs, labels, reduction="sum")) == pytest.approx(60 * expected, rel=1e-12)


def test_nll_clamp_and_gradient() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 1])
    value = M.nll(probs, labels, reduction="none")
    eps = torch.finfo(torch.float64).eps
    expected = torch.tensor([-math.log(eps), -math.log(0.75)], dtype=torch.float64)
    torch.testing.assert_close(value.detach(), expected)
    floored = M.nll(probs, labels, eps=1e-3, reduction="none")[0].detach()
    assert float(floored) == pytest.approx(-math.log(1e-3))
    value.sum().backward()
    assert probs.grad is not None
    assert float(probs.grad[1, 1]) == pytest.approx(-1 / 0.75)
    assert float(probs.grad[0, 1]) == 0.0  # clamped: no gradient through the floor
    # float32 clamps at float32 eps.
    assert float(M.nll(probs.detach().float(), labels, reduction="none")[0]) == pytest.approx(
        -math.log(torch.finfo(torch.float32).eps), rel=1e-6
    )


def test_brier_score_matches_sklearn() -> None:
    probs = M.predictive_mean(_samples(4, 80, 4))
    labels = _labels(80, 4)
    expected = brier_score_loss(labels.numpy(), probs.numpy(), labels=[0, 1, 2, 3], scale_by_half=False)
    assert float(M.brier_score(probs, labels)) == pytest.approx(expected, rel=1e-12)
    # Binary: the multiclass sum is twice sklearn's positive-class Brier score.
    binary = M.predictive_mean(_samples(4, 80, 2))
    y = _labels(80, 2)
    assert float(M.brier_score(binary, y)) == pytest.approx(
        2 * brier_score_loss(y.numpy(), binary[:, 1].numpy()), rel=1e-12
    )
    assert float(M.brier_score(binary, y, reduction="sum")) == pytest.approx(
        80 * float(M.brier_score(binary, y)), rel=1e-12
    )


def test_brier_hand_computed_extremes() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        M.brier_score(probs, torch.tensor([0, 0]), reduction="none"),
        torch.tensor([0.0, 2.0], dtype=torch.float64),
    )


def test_accuracy_matches_sklearn_and_breaks_ties_low() -> None:
    probs = M.predictive_mean(_samples(3, 70, 6))
    labels = _labels(70, 6)
    expected = accuracy_score(labels.numpy(), probs.argmax(1).numpy())
    assert float(M.accuracy(probs, labels)) == pytest.approx(expected, abs=1e-15)
    tie = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    torch.testing.assert_close(M.accuracy(tie, torch.tensor([0, 1])), torch.tensor(0.5))


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "error", "match"),
    [
        (torch.full((2, 3), 1 / 3), ValueError, r"3-D MC samples .* shape \(2, 3\)"),
        (torch.zeros(0, 2, 3), ValueError, "T >= 1"),
        (torch.tensor([[[1.5, -0.5]]]), ValueError, r"\[0, 1\], got values in \[-0.5, 1.5\]"),
        (torch.tensor([[[0.5, 0.6]]]), ValueError, "sum to 1 .* deviation of 0.1"),
        (torch.tensor([[[float("nan"), 1.0]]]), ValueError, "finite"),
        (torch.ones(1, 1, 1, dtype=torch.long), TypeError, "floating-point .* torch.int64"),
        ([[[0.5, 0.5]]], TypeError, "torch.Tensor, got list"),
    ],
)
def test_samples_rejected(probs: object, error: type[Exception], match: str) -> None:
    for fn in (M.predictive_entropy, M.expected_entropy, M.mutual_information, M.variation_ratio):
        with pytest.raises(error, match=match):
            fn(probs)  # type: ignore[arg-type]


def test_sum_tolerance_depends_on_dtype() -> None:
    off = torch.tensor([[[0.5, 0.5 + 1e-6]]], dtype=torch.float32)
    M.predictive_entropy(off)  # within float32's sqrt(eps)
    with pytest.raises(ValueError, match="sum to 1"):
        M.predictive_entropy(off.double())  # beyond float64's 1.5e-8


@pytest.mark.parametrize("fn", [M.nll, M.brier_score, M.accuracy])
def test_scoring_rules_reject_bad_inputs(fn: object) -> None:
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    with pytest.raises(ValueError, match=r"2-D predictive .* shape \(1, 2, 2\) .* predictive_mean"):
        fn(probs[None], torch.tensor([0, 1]))  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 1\], got values in \[0, 2\]"):
        fn(probs, torch.tensor([0, 2]))  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"-1"):
        fn(probs, torch.tensor([-1, 0]))  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\) .* got \(3,\)"):
        fn(probs, torch.tensor([0, 1, 1]))  # type: ignore[operator]
    with pytest.raises(TypeError, match=r"integer tensor .* torch.float32"):
        fn(probs, torch.tensor([0.0, 1.0]))  # type: ignore[operator]
    with pytest.raises(TypeError, match="got list"):
        fn(probs, [0, 1])  # type: ignore[operator]


def test_reduction_and_eps_rejected() -> None:
    probs, labels = torch.tensor([[0.7, 0.3]]), torch.tensor([0])
    with pytest.raises(ValueError, match=r"reduction must be one of .* got 'avg'"):
        M.nll(probs, labels, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        M.brier_score(probs, labels, reduction="max")
    for eps in (0.0, 1.0, -1e-3, True):
        with pytest.raises(ValueError, match="eps must be a float in"):
            M.nll(probs, labels, eps=eps)


# --------------------------------------------------------------------------------------------
# detection: AUROC / AUPR against sklearn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auroc_and_ap_match_sklearn_with_ties(decimals: int | None) -> None:
    generator = torch.Generator().manual_seed(3)
    targets = torch.rand(300, generator=generator) < 0.3
    scores = torch.randn(300, generator=generator, dtype=torch.float64) + targets.double()
    if decimals is not None:  # many ties, incl. ties between positives and negatives
        scores = scores.round(decimals=decimals)
    assert float(D.auroc(scores, targets)) == pytest.approx(
        roc_auc_score(targets.numpy(), scores.numpy()), abs=1e-12
    )
    assert float(D.average_precision(scores, targets)) == pytest.approx(
        average_precision_score(targets.numpy(), scores.numpy()), abs=1e-12
    )


def test_detection_hand_computed() -> None:
    same = torch.ones(6)
    targets = torch.tensor([1, 0, 0, 1, 0, 0])
    assert float(D.auroc(same, targets)) == 0.5  # all tied: every pair counts one half
    assert float(D.average_precision(same, targets)) == pytest.approx(1 / 3)  # the positive rate
    perfect = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.3, 0.0])
    assert float(D.auroc(perfect, targets)) == 1.0
    assert float(D.auroc(-perfect, targets)) == 0.0
    assert float(D.average_precision(perfect, targets)) == 1.0
    # One positive ranked second of three: precision 1/2 at recall 1.
    assert float(D.average_precision(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 0]))) == 0.5


def test_misclassification_and_ood_detection() -> None:
    probs = _samples(5, 120, 4)
    labels = _labels(120, 4)
    correct = M.predictive_mean(probs).argmax(1) == labels
    entropy = M.predictive_entropy(probs)
    result = D.misclassification_detection(entropy, correct)
    wrong = (~correct).numpy()
    assert float(result.auroc) == pytest.approx(roc_auc_score(wrong, entropy.numpy()), abs=1e-12)
    assert float(result.aupr) == pytest.approx(average_precision_score(wrong, entropy.numpy()), abs=1e-12)
    # 0/1 integers work like bools.
    assert torch.equal(D.misclassification_detection(entropy, correct.long()).auroc, result.auroc)

    score_in, score_out = entropy[:70], M.mutual_information(probs)[70:] + 0.1
    ood = D.ood_detection(score_in, score_out)
    y = np.r_[np.zeros(70), np.ones(50)]
    s = np.r_[score_in.numpy(), score_out.numpy()]
    assert float(ood.auroc) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert float(ood.aupr) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert ood.auroc.dtype == torch.float64


def test_detection_rejects_bad_inputs() -> None:
    scores = torch.tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes, got 0 positives and 3 negatives"):
        D.auroc(scores, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="both classes, got 3 positives"):
        D.average_precision(scores, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match=r"correct must contain both classes, got 0 positives"):
        D.misclassification_detection(scores, torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match=r"only 0 and 1, got values \[0, 1, 2\]"):
        D.auroc(scores, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match=r"bool or integer .* torch.float32"):
        D.auroc(scores, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"targets must have shape \(3,\) .* got \(2,\)"):
        D.auroc(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"scores must be 1-D .* \(3, 1\)"):
        D.auroc(scores[:, None], torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="scores must be finite"):
        D.auroc(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="floating-point"):
        D.auroc(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"uncertainty_out must hold at least one score"):
        D.ood_detection(scores, torch.zeros(0))


# --------------------------------------------------------------------------------------------
# stateful shells == functional on the concatenation
# --------------------------------------------------------------------------------------------


def _batches(n: int, sizes: list[int]) -> list[slice]:
    starts = np.cumsum([0, *sizes])
    assert starts[-1] == n
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(starts)]


def test_scalar_accumulators_equal_functional() -> None:
    probs = M.predictive_mean(_samples(4, 100, 5))
    labels = _labels(100, 5)
    metrics = {
        "nll": (S.NegativeLogLikelihood(), M.nll),
        "brier": (S.BrierScore(), M.brier_score),
        "accuracy": (S.Accuracy(), M.accuracy),
    }
    for part in _batches(100, [1, 30, 7, 62]):
        for metric, _ in metrics.values():
            metric.update(probs[part], labels[part])
    for metric, fn in metrics.values():
        torch.testing.assert_close(metric.compute(), fn(probs, labels), rtol=1e-13, atol=0)
        metric.reset()
        with pytest.raises(RuntimeError, match="before any update"):
            metric.compute()
        metric.update(probs[:10], labels[:10])  # reset really forgot the old batches
        torch.testing.assert_close(metric.compute(), fn(probs[:10], labels[:10]), rtol=1e-13, atol=0)


def test_accuracy_accumulator_counts_exactly() -> None:
    metric = S.Accuracy()
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    for _ in range(3):  # 2/3 per batch: a float32 mean times N would not be an integer
        metric.update(probs, torch.tensor([0, 0, 0]))
    assert float(metric.total) == 6.0
    assert float(metric.compute()) == 6 / 9


def test_nll_accumulator_float32_and_eps() -> None:
    probs = M.predictive_mean(_samples(4, 50, 3, dtype=torch.float32))
    labels = _labels(50, 3)
    metric = S.NegativeLogLikelihood(eps=1e-4)
    metric.update(probs[:20], labels[:20])
    metric.update(probs[20:], labels[20:])
    torch.testing.assert_close(metric.compute().float(), M.nll(probs, labels, eps=1e-4), rtol=1e-6, atol=0)
    assert repr(metric) == "NegativeLogLikelihood(eps=0.0001)"


def test_accumulators_reject_class_change() -> None:
    metric = S.BrierScore()
    metric.update(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="probs has 3 classes, but earlier batches had 2"):
        metric.update(torch.full((1, 3), 1 / 3), torch.tensor([0]))
    torch.testing.assert_close(metric.compute(), torch.tensor(0.5, dtype=torch.float64))  # state untouched


def test_mc_uncertainty_accumulator_equals_functional() -> None:
    probs = _samples(6, 90, 4)
    labels = _labels(90, 4)
    metric = S.MCUncertainty()
    for part in _batches(90, [40, 1, 49]):
        metric.update(probs[:, part], labels[part])
    result = metric.compute()
    expected = M.uncertainty_scores(probs)
    for got, want in zip(result, expected, strict=True):  # batching changes only summation order
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert torch.equal(metric.correct(), M.predictive_mean(probs).argmax(1) == labels)
    with pytest.raises(ValueError, match="every update"):
        metric.update(probs[:, :3])
    metric.reset()
    metric.update(probs[:3, :5])  # T may change after a reset; no labels now
    assert torch.equal(metric.compute().mutual_information, M.mutual_information(probs[:3, :5]))
    with pytest.raises(RuntimeError, match="needs labels"):
        metric.correct()
    with pytest.raises(ValueError, match="3-D MC samples"):
        metric.update(probs[0])
