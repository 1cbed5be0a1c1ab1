"""The position of a dropout site in its network, and the usual range of rates for each position.

The ranges are the field's rules of thumb (drop probabilities):

=============== ============ ========= =========================================================
position        usual range  default   source
=============== ============ ========= =========================================================
``input``       0.0 - 0.2    0.2       Srivastava et al. 2014: retain 0.8 for input units
``dense``       0.3 - 0.5    0.5       Srivastava et al. 2014, Hinton et al. 2012: 0.5 hidden
``conv``        0.1 - 0.3    0.1       Srivastava et al. 2014 (conv layers retained at 0.75 -
                                       0.9); Tompson et al. 2015 (spatial dropout)
``recurrent``   0.2 - 0.5    0.2       Gal & Ghahramani 2016 (masks tied over time)
``transformer`` 0.1 - 0.3    0.1       Vaswani et al. 2017: P_drop = 0.1 (0.3, big EN-DE)
``attention``   0.1 - 0.3    0.1       Vaswani et al. 2017 (the same rate on attention weights)
``drop_path``   0.0 - 0.5    0.1       Huang et al. 2016: survival falls linearly to 0.5 at
                                       the last block
``unknown``     0.0 - 0.5    0.5       the widest usual range (0.5, the classic hidden rate)
=============== ============ ========= =========================================================

The output layer gets no dropout (rate 0; rule ``DK102``).  A site's position is read from
what feeds it and what it feeds (see :mod:`dropkit.diagnostics.flow`), first match wins:
drop path; attention weights; a recurrent layer before or after it (or an ``nn.LSTM``'s own
dropout); the model input; a convolutional feature map (a convolution's output of the same
rank and channels, or a convolution right after); any site of a transformer; a linear layer
or embedding before or after it.  Weight-level sites (DropConnect, weight drop, variational
and concrete layers), zoneout and additive noise have no position: their rates are on
another scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dropkit.diagnostics.flow import Flow, SiteUse

__all__ = ["RANGES", "RateRange", "is_transformer", "site_position"]


@dataclass(frozen=True)
class RateRange:
    """The usual drop rates at one position.

    Attributes:
        position: the position (a key of :data:`RANGES`).
        low: lower end of the usual range.
        high: upper end; a rate above it is reported (``DK103``).
        default: the rate to start from when a site has none.
        source: where the range comes from.
    """

    position: str
    low: float
    high: float
    default: float
    source: str


RANGES: dict[str, RateRange] = {
    "input": RateRange(
        "input", 0.0, 0.2, 0.2, "Srivastava et al. 2014 (JMLR), retain probability 0.8 for input units"
    ),
    "dense": RateRange(
        "dense",
        0.3,
        0.5,
        0.5,
        "Srivastava et al. 2014; Hinton et al. 2012: 0.5 for fully connected hidden units",
    ),
    "conv": RateRange(
        "conv",
        0.1,
        0.3,
        0.1,
        "Srivastava et al. 2014 (convolutional layers retained at 0.75-0.9); Tompson et al. 2015",
    ),
    "recurrent": RateRange(
        "recurrent", 0.2, 0.5, 0.2, "Gal & Ghahramani 2016 (NeurIPS), with masks tied over time"
    ),
    "transformer": RateRange(
        "transformer", 0.1, 0.3, 0.1, "Vaswani et al. 2017: P_drop = 0.1 (0.3 for the big EN-DE model)"
    ),
    "attention": RateRange(
        "attention", 0.1, 0.3, 0.1, "Vaswani et al. 2017: P_drop = 0.1 (0.3 for the big EN-DE model)"
    ),
    "drop_path": RateRange(
        "drop_path",
        0.0,
        0.5,
        0.1,
        "Huang et al. 2016 (ECCV): survival falls linearly to 0.5 at the last block",
    ),
    "unknown": RateRange(
        "unknown", 0.0, 0.5, 0.5, "Srivastava et al. 2014: 0.5, the classic rate, is the usual upper end"
    ),
}

_NO_POSITION = frozenset({"weight", "learned", "zoneout", "noise"})
_CONV_VARIANTS = frozenset({"channel", "feature_alpha", "block"})


def is_transformer(model: nn.Module, flow: Flow) -> bool:
    """Whether ``model`` has attention: an attention module or site, or a module named so.

    Example::

        >>> import torch, dropkit
        >>> from dropkit.diagnostics.flow import sequential_flow
        >>> block = dropkit.nn.TransformerEncoderBlock(8, 2, 16)
        >>> linear = torch.nn.Linear(2, 2)
        >>> is_transformer(block, sequential_flow(block)), is_transformer(linear, sequential_flow(linear))
        (True, False)
    """
    if any(use.site.variant == "attention" for use in flow.uses):
        return True
    if any(kind == "attention" for kind, _ in flow.ops):
        return True
    for module in model.modules():
        name = type(module).__name__
        if isinstance(
            module, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
        ):
            return True
        if "Attention" in name or "Transformer" in name:
            return True
    return False


def _conv_map(use: SiteUse) -> bool:
    """The site's input is a convolutional feature map (or feeds a convolution)."""
    ranks = {len(shape) for shape in use.input_shapes}
    channels = {shape[1] for shape in use.input_shapes if len(shape) >= 2}
    for producer in use.producers:
        if producer.kind != "conv":
            continue
        if producer.rank is None or (producer.rank in ranks and producer.channels in channels):
            return True
    if "conv" in use.consumers.values():
        return not ranks or max(ranks) >= 3
    return False


def site_position(use: SiteUse, flow: Flow, transformer: bool) -> str | None:
    """The position of a site: a key of :data:`RANGES`, or ``None`` for weight-level sites.

    Args:
        use: the site and what the flow knows about it.
        flow: the model's flow.
        transformer: whether the model has attention (:func:`is_transformer`).

    Returns:
        ``"input"``, ``"dense"``, ``"conv"``, ``"recurrent"``, ``"transformer"``,
        ``"attention"``, ``"drop_path"``, ``"unknown"`` or ``None``.

    Example::

        >>> import torch
        >>> from dropkit.diagnostics.flow import sequential_flow
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Dropout(0.2), torch.nn.Linear(8, 8), torch.nn.ReLU(),
        ...     torch.nn.Dropout(0.5), torch.nn.Linear(8, 2),
        ... )
        >>> flow = sequential_flow(model)
        >>> [site_position(use, flow, False) for use in flow.uses]
        ['input', 'dense']
    """
    variant = use.site.variant
    if variant in _NO_POSITION:
        return None
    if variant == "path":
        return "drop_path"
    if variant == "attention":
        return "attention"
    neighbours = {producer.kind for producer in use.producers}
    neighbours |= set(use.consumers.values()) | set(use.mixed_consumers.values())
    if variant == "recurrent" or "recurrent" in neighbours:
        return "recurrent"
    if "input" in {producer.kind for producer in use.producers}:
        return "input"
    if variant in _CONV_VARIANTS or _conv_map(use):
        return "conv"
    if transformer:
        return "transformer"
    if neighbours & {"linear", "embedding", "batchnorm", "norm", "other"}:
        return "dense"
    return "unknown"
