r"""Dropout on the input of a linear or GLM head as an adaptive L2 penalty (Wager et al. 2013).

For a generalized linear model with natural parameter :math:`\eta_i = W x_i + b`, log-partition
(cumulant) function :math:`A` and loss :math:`-y_i^\top \eta_i + A(\eta_i)`, dropout noise on
the features with :math:`E[\tilde x_i] = x_i` leaves the linear term unchanged in expectation,
so training with it adds the penalty

.. math::

    R(W) = \sum_i E\big[A(\tilde\eta_i)\big] - A(\eta_i), \qquad \tilde\eta_i = W\tilde x_i + b .

A second-order Taylor expansion of :math:`A` around :math:`\eta_i` gives Wager, Wang and Liang's
quadratic approximation, an L2 penalty whose weight adapts to each feature:

.. math::

    R^q(W) = \frac12\,\frac{p}{1-p} \sum_i \sum_j x_{ij}^2\; w_j^\top \nabla^2 A(\eta_i)\, w_j ,
    \quad\text{for one output:}\quad
    R^q(\beta) = \frac12\,\frac{p}{1-p} \sum_i \sum_j A''(x_i\cdot\beta)\, x_{ij}^2 \beta_j^2 ,

with :math:`w_j` the column of :math:`W` for feature :math:`j` and :math:`A''` the GLM variance
function (logistic: :math:`\sigma(\eta)(1-\sigma(\eta))`; Poisson: :math:`e^\eta`; Gaussian:
1, where the penalty is exactly quadratic: Srivastava et al.'s ridge, §9.1; multinomial:
:math:`\mathrm{diag}(\pi) - \pi\pi^\top`).  :math:`p/(1-p)` is the variance of the multiplier
both for standard dropout (:math:`\tilde x = x \circ z/q`, :math:`z \sim \mathrm{Bernoulli}(q)`)
and for Gaussian dropout (:math:`\tilde x = x \circ \xi`, :math:`\xi \sim N(1, p/q)`).

**How good is the approximation?**  It drops the third and higher cumulants of
:math:`\tilde\eta - \eta`.  For Gaussian dropout those are of order :math:`p^2`, so the
relative gap :math:`(R - R^q)/R` vanishes like :math:`p` as :math:`p \to 0`.  For standard
(Bernoulli) dropout every cumulant of the multiplier is of order :math:`p` (a feature is either
dropped entirely or kept), so as :math:`p \to 0`

.. math::

    \frac{R}{p} \to \sum_i\sum_j D_A(\eta_i - a_{ij}, \eta_i), \qquad
    \frac{R^q}{p} \to \frac12 \sum_i\sum_j a_{ij}^\top \nabla^2 A(\eta_i)\, a_{ij},
    \qquad a_{ij} = x_{ij} w_j ,

(:math:`D_A` the Bregman divergence of :math:`A`): the relative gap tends to a constant set by
the size of the feature effects :math:`a_{ij}`, and vanishes as those become small, not as
:math:`p` does.

:func:`dropout_penalty` computes :math:`R` exactly where it can (closed form for the Gaussian
family; enumeration of the :math:`2^d` masks for Bernoulli noise on :math:`d \le 12` features;
Gauss-Hermite quadrature for Gaussian noise on a scalar family, where :math:`\tilde\eta_i` is
exactly normal) and by Monte Carlo otherwise (with its standard error), next to :math:`R^q`.
Per feature it gives :math:`R^q_j` (the terms of the sum above, which add up to :math:`R^q`)
and the exact penalty :math:`R_j` with only feature :math:`j` noised (a two-point expectation,
or a quadrature); the :math:`R_j` add up to :math:`R` only to second order.

Reference: Wager, Wang, Liang, "Dropout Training as Adaptive Regularization", NeurIPS 2013;
Srivastava et al., JMLR 2014, §9.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dropkit._validation import check_int, check_probability
from dropkit.diagnostics._calls import eval_forward
from dropkit.diagnostics.flow import Flow
from dropkit.diagnostics.sites import DropoutSite

__all__ = [
    "FAMILIES",
    "NOISES",
    "AdaptiveL2",
    "cumulant",
    "dropout_penalty",
    "find_head",
    "measure_head_penalty",
]

FAMILIES = ("gaussian", "logistic", "poisson", "multinomial")
NOISES = ("bernoulli", "gaussian")
_QUADRATURE_NODES = 64


@dataclass(frozen=True)
class AdaptiveL2:
    """The exact dropout penalty of a GLM next to Wager et al.'s quadratic approximation.

    Attributes:
        family: ``"gaussian"``, ``"logistic"``, ``"poisson"`` or ``"multinomial"``.
        noise: ``"bernoulli"`` (standard dropout) or ``"gaussian"`` (Gaussian dropout).
        p: the drop rate.
        n: number of examples summed over.
        exact: :math:`R`, summed over examples.
        exact_se: its Monte Carlo standard error (0 when computed exactly).
        method: how ``exact`` was computed: ``"closed form"``, ``"enumeration"``,
            ``"quadrature"`` or ``"monte carlo"``.
        quadratic: :math:`R^q`.
        per_feature_exact: :math:`R_j`, the exact penalty with only feature ``j`` noised.
        per_feature_quadratic: :math:`R^q_j` (they sum to ``quadratic``).
        l2_weights: the adaptive L2 weight of each feature,
            :math:`R^q_j / \\lVert w_j \\rVert^2` (0 where :math:`w_j = 0`).
    """

    family: str
    noise: str
    p: float
    n: int
    exact: float
    exact_se: float
    method: str
    quadratic: float
    per_feature_exact: torch.Tensor
    per_feature_quadratic: torch.Tensor
    l2_weights: torch.Tensor

    @property
    def relative_gap(self) -> float:
        """:math:`(R - R^q) / R` (0 when :math:`R = 0`)."""
        return (self.exact - self.quadratic) / self.exact if self.exact != 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "family": self.family,
            "noise": self.noise,
            "p": self.p,
            "n": self.n,
            "exact": self.exact,
            "exact_se": self.exact_se,
            "method": self.method,
            "quadratic": self.quadratic,
            "relative_gap": self.relative_gap,
            "per_feature_exact": self.per_feature_exact.tolist(),
            "per_feature_quadratic": self.per_feature_quadratic.tolist(),
            "l2_weights": self.l2_weights.tolist(),
        }


def cumulant(family: str, eta: torch.Tensor) -> torch.Tensor:
    r"""The log-partition function :math:`A(\eta)` of a GLM family, over the last dim of ``eta``.

    Args:
        family: ``"gaussian"`` (:math:`\frac12\lVert\eta\rVert^2`), ``"logistic"``
            (:math:`\log(1 + e^\eta)`), ``"poisson"`` (:math:`e^\eta`) or ``"multinomial"``
            (:math:`\log\sum_c e^{\eta_c}`).
        eta: natural parameters ``(..., C)`` (``C = 1`` for logistic and Poisson).

    Returns:
        ``A(eta)`` of shape ``eta.shape[:-1]``.

    Example::

        >>> cumulant("logistic", torch.zeros(1, 1))
        tensor([0.6931])
    """
    if family == "gaussian":
        return 0.5 * eta.square().sum(-1)
    if family == "logistic":
        return torch.nn.functional.softplus(eta[..., 0])
    if family == "poisson":
        return eta[..., 0].exp()
    if family == "multinomial":
        return torch.logsumexp(eta, dim=-1)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _curvature(family: str, eta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    r""":math:`w_j^\top \nabla^2 A(\eta_i) w_j` for every example ``i`` and feature ``j``: ``(N, d)``."""
    squared = weight.square()  # (C, d)
    if family == "gaussian":
        return squared.sum(0).expand(eta.shape[0], -1)
    if family == "logistic":
        s = torch.sigmoid(eta[:, 0])
        return (s * (1 - s))[:, None] * squared[0]
    if family == "poisson":
        return eta[:, 0].exp()[:, None] * squared[0]
    probs = torch.softmax(eta, dim=-1)
    return probs @ squared - (probs @ weight).square()


def _quadrature(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Hermite nodes ``u`` and weights for :math:`E[f(u)]`, :math:`u \\sim N(0, \\sigma^2)`."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(_QUADRATURE_NODES)
    t = torch.as_tensor(nodes, dtype=torch.float64)
    w = torch.as_tensor(weights / math.sqrt(2 * math.pi), dtype=torch.float64)
    return sigma[..., None] * t, w


def _check_inputs(
    features: object, weight: object, bias: object, family: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a 2-D tensor (N, d), got {shape}")
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
        raise ValueError("weight must be a tensor (d,) or (C, d)")
    x = features.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    if w.dim() == 1:
        w = w[None]
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"weight has {w.shape[1]} features, features has {x.shape[1]}")
    if family in ("logistic", "poisson") and w.shape[0] != 1:
        raise ValueError(
            f"family={family!r} has one output: weight must be (d,) or (1, d), got {tuple(weight.shape)}"
        )
    if bias is None:
        b = torch.zeros(w.shape[0], dtype=torch.float64)
    elif isinstance(bias, (int, float)) and not isinstance(bias, bool):
        b = torch.full((w.shape[0],), float(bias), dtype=torch.float64)
    elif isinstance(bias, torch.Tensor):
        b = bias.detach().to(torch.float64).reshape(-1)
        if b.numel() == 1:
            b = b.expand(w.shape[0])
        elif b.shape[0] != w.shape[0]:
            raise ValueError(f"bias must have {w.shape[0]} entries, got {tuple(bias.shape)}")
    else:
        raise TypeError(f"bias must be a tensor, a float or None, got {type(bias).__name__}")
    return x, w, b


def dropout_penalty(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | float | None = None,
    *,
    p: float,
    family: str = "logistic",
    noise: str = "bernoulli",
    method: str = "auto",
    samples: int = 4096,
    seed: int = 0,
    max_enumerate: int = 12,
) -> AdaptiveL2:
    r"""The expected dropout penalty of a GLM and Wager et al.'s quadratic approximation.

    See :mod:`dropkit.diagnostics.adaptive_l2` for the formulas, and for when the
    approximation is accurate.

    Args:
        features: the GLM's inputs (the features dropout acts on), ``(N, d)``.
        weight: coefficients, ``(d,)`` or ``(C, d)`` (an ``nn.Linear``'s ``weight``).
        bias: intercepts, ``(C,)``, a float or ``None`` (never noised).
        p: the drop rate, in ``[0, 1)``.
        family: ``"logistic"`` (default), ``"gaussian"``, ``"poisson"`` or ``"multinomial"``.
        noise: ``"bernoulli"`` (standard inverted dropout) or ``"gaussian"`` (multiplier
            :math:`N(1, p/(1-p))`).
        method: ``"auto"`` (exact where possible, see the module), ``"monte_carlo"``,
            ``"enumeration"`` (Bernoulli noise only) or ``"quadrature"`` (Gaussian noise on a
            scalar family only).
        samples: Monte Carlo draws of the noise when that is the method.
        seed: seed of the Monte Carlo draws.
        max_enumerate: most features for which ``"auto"`` enumerates the masks.

    Returns:
        An :class:`AdaptiveL2` (penalties summed over the ``N`` examples).

    Raises:
        ValueError: bad shapes, ``p`` outside ``[0, 1)``, an unknown family, noise or method,
            or a method that does not apply.

    Example::

        >>> x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
        >>> result = dropout_penalty(x, torch.tensor([0.3, -0.2]), p=0.1)
        >>> result.method, round(result.exact, 5), round(result.quadratic, 5)
        ('enumeration', 0.0043, 0.00431)
        >>> abs(float(result.per_feature_quadratic.sum()) - result.quadratic) < 1e-15
        True
    """
    rate = check_probability(p)
    if rate >= 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if method not in ("auto", "monte_carlo", "enumeration", "quadrature"):
        raise ValueError(
            f"method must be 'auto', 'monte_carlo', 'enumeration' or 'quadrature', got {method!r}"
        )
    samples = check_int(samples, "samples", 2)
    max_enumerate = check_int(max_enumerate, "max_enumerate", 0, 24)
    x, w, b = _check_inputs(features, weight, bias, family)
    n, d = x.shape
    q = 1.0 - rate
    ratio = rate / q
    eta = x @ w.T + b  # (N, C)
    base = cumulant(family, eta)  # (N,)

    curvature = _curvature(family, eta, w)  # (N, d)
    per_feature_quadratic = 0.5 * ratio * (x.square() * curvature).sum(0)
    quadratic = float(per_feature_quadratic.sum())
    norms = w.square().sum(0)
    l2_weights = torch.where(norms > 0, per_feature_quadratic / torch.where(norms > 0, norms, 1.0), 0.0)

    per_feature_exact = _per_feature_exact(family, noise, x, w, eta, base, rate)

    chosen = method
    if chosen == "auto":
        if family == "gaussian":
            chosen = "closed form"
        elif noise == "bernoulli" and d <= max_enumerate:
            chosen = "enumeration"
        elif noise == "gaussian" and w.shape[0] == 1:
            chosen = "quadrature"
        else:
            chosen = "monte_carlo"
    if chosen == "enumeration" and noise != "bernoulli":
        raise ValueError("method='enumeration' needs noise='bernoulli'")
    if chosen == "enumeration" and d > 24:
        raise ValueError(f"method='enumeration' enumerates 2**d masks; d = {d} is too many")
    if chosen == "quadrature" and (noise != "gaussian" or w.shape[0] != 1):
        raise ValueError("method='quadrature' needs noise='gaussian' and a scalar family (one output)")

    exact_se = 0.0
    if rate == 0.0:
        exact, chosen = 0.0, "closed form"
    elif chosen == "closed form":
        exact = quadratic  # E[A(eta + delta)] - A(eta) = tr(Cov delta) / 2 for A = |eta|^2 / 2
    elif chosen == "enumeration":
        exact = _enumerate(family, x, w, b, base, rate)
    elif chosen == "quadrature":
        sigma = (ratio * (x.square() * w[0].square()).sum(1)).sqrt()  # (N,)
        offsets, weights = _quadrature(sigma)
        values = cumulant(family, (eta[:, 0:1] + offsets)[..., None])  # (N, K)
        exact = float(((values * weights).sum(1) - base).sum())
    else:
        chosen = "monte carlo"
        exact, exact_se = _monte_carlo(family, noise, x, w, b, base, rate, samples, seed)
    return AdaptiveL2(
        family=family,
        noise=noise,
        p=rate,
        n=n,
        exact=exact,
        exact_se=exact_se,
        method=chosen,
        quadratic=quadratic,
        per_feature_exact=per_feature_exact,
        per_feature_quadratic=per_feature_quadratic,
        l2_weights=l2_weights,
    )


def _per_feature_exact(
    family: str,
    noise: str,
    x: torch.Tensor,
    w: torch.Tensor,
    eta: torch.Tensor,
    base: torch.Tensor,
    rate: float,
) -> torch.Tensor:
    """:math:`R_j`: the exact penalty with only feature ``j`` noised, for every ``j``: ``(d,)``."""
    if rate == 0.0:
        return torch.zeros(x.shape[1], dtype=torch.float64)
    q = 1.0 - rate
    effect = x[:, :, None] * w.T[None]  # a_ij = x_ij w_j: (N, d, C)
    if noise == "bernoulli":
        dropped = cumulant(family, eta[:, None, :] - effect)
        kept = cumulant(family, eta[:, None, :] + (rate / q) * effect)
        return (rate * dropped + q * kept - base[:, None]).sum(0)
    offsets, weights = _quadrature(torch.full((), math.sqrt(rate / q), dtype=torch.float64))
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for offset, node_weight in zip(offsets, weights, strict=True):
        total += node_weight * (cumulant(family, eta[:, None, :] + offset * effect) - base[:, None]).sum(0)
    return total


def _enumerate(
    family: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, base: torch.Tensor, rate: float
) -> float:
    d = x.shape[1]
    q = 1.0 - rate
    codes = torch.arange(2**d)
    masks = ((codes[:, None] >> torch.arange(d)) & 1).to(torch.float64)  # (M, d), 1 = kept
    kept = masks.sum(1)
    log_probability = kept * math.log(q) + (d - kept) * (math.log(rate) if rate > 0 else -math.inf)
    probability = log_probability.exp()
    total = 0.0
    for start in range(0, masks.shape[0], 256):
        chunk = masks[start : start + 256] / q  # (m, d)
        eta = torch.einsum("nd,md,cd->mnc", x, chunk, w) + b
        total += float((probability[start : start + 256, None] * (cumulant(family, eta) - base)).sum())
    return total


#: Elements of noised features per Monte Carlo chunk (float64: 64 MiB per array of the chunk).
_MC_CHUNK_ELEMENTS = 1 << 23


def _monte_carlo(
    family: str,
    noise: str,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    base: torch.Tensor,
    rate: float,
    samples: int,
    seed: int,
) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed)
    q = 1.0 - rate
    values = []
    # Draws per chunk: up to 256, fewer where 256 noised copies of x would not fit the budget
    # (MNIST's 10,000 x 784 would take 16 GB at 256).  Bernoulli draws do not depend on the
    # chunking; torch's normal draws do, so large inputs get another (equally valid) estimate.
    chunk = max(1, min(256, _MC_CHUNK_ELEMENTS // max(1, x.numel())))
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        shape = (count, *x.shape)
        if noise == "bernoulli":
            multiplier = (torch.rand(shape, generator=generator, dtype=torch.float64) < q).to(
                torch.float64
            ) / q
        else:
            multiplier = 1.0 + math.sqrt(rate / q) * torch.randn(
                shape, generator=generator, dtype=torch.float64
            )
        eta = torch.einsum("snd,cd->snc", x * multiplier, w) + b
        values.append((cumulant(family, eta) - base).sum(1))
    draws = torch.cat(values)
    return float(draws.mean()), float(draws.std(correction=1) / math.sqrt(samples))


def find_head(model: nn.Module, flow: Flow) -> tuple[nn.Linear, DropoutSite] | None:
    """The model's linear head and the dropout feeding it, when the flow shows both.

    The head is the ``nn.Linear`` that alone produces the model's output (up to operations on
    that output alone); the site is an active standard or Gaussian dropout whose output reaches
    the head unchanged.
    """
    producers = flow.output_producers
    if len(producers) != 1:
        return None
    (producer,) = producers
    modules = dict(model.named_modules())
    head = modules.get(producer.path)
    if producer.kind != "linear" or not isinstance(head, nn.Linear):
        return None
    for use in flow.uses:
        site = use.site
        if (
            site.active
            and site.rate
            and site.variant in ("element", "gaussian")
            and producer.path in use.consumers
        ):
            return head, site
    return None


def measure_head_penalty(
    model: nn.Module,
    inputs: Any,
    flow: Flow,
    *,
    task: str,
    samples: int = 4096,
    seed: int = 0,
) -> AdaptiveL2 | None:
    """:func:`dropout_penalty` of the model's linear head on its dropout-fed features.

    The features are the head's input over the batch in eval mode (dropout off); the family is
    ``"multinomial"`` (classification, several logits), ``"logistic"`` (one logit) or
    ``"gaussian"`` (regression); the noise is the feeding site's (standard or Gaussian).

    Returns:
        The penalty, or ``None`` when the model has no linear head fed directly by dropout
        (see :func:`find_head`).
    """
    found = find_head(model, flow)
    if found is None:
        return None
    head, site = found
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and not captured:
            captured.append(args[0].detach())

    handle = head.register_forward_pre_hook(hook)
    try:
        eval_forward(model, inputs)
    finally:
        handle.remove()
    if not captured:
        return None
    features = captured[0].reshape(-1, head.in_features)
    family = "multinomial" if head.out_features > 1 else "logistic"
    if task == "regression":
        family = "gaussian"
    noise = "gaussian" if site.variant == "gaussian" else "bernoulli"
    rate = float(site.rate or 0.0)
    return dropout_penalty(
        features, head.weight, head.bias, p=rate, family=family, noise=noise, samples=samples, seed=seed
    )
