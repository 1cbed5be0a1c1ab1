"""Running a model for a measurement: one eval forward, or Monte Carlo samples, flags restored."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from dropkit.diagnostics.flow import _example_call, _tensors, check_example_inputs
from dropkit.mc.sampling import mc_predict

__all__ = ["OutputSelector", "eval_forward", "first_float_tensor", "mc_samples", "select_output"]

OutputSelector = str | int | Callable[[Any], torch.Tensor] | None


def select_output(output: Any, selector: OutputSelector) -> torch.Tensor:
    """The prediction tensor in a model's output.

    ``None`` picks the output itself when it is a tensor, its ``"logits"`` entry when it is a
    mapping (a Hugging Face ``ModelOutput``) and its first element when it is a tuple or list;
    a string is a key or attribute, an int an index, a callable is applied to the output.

    Raises:
        ValueError: the selected part is not a tensor, or the key is missing.
    """
    if callable(selector):
        chosen = selector(output)
    elif isinstance(selector, str):
        if isinstance(output, Mapping) and selector in output:
            chosen = output[selector]
        elif hasattr(output, selector):
            chosen = getattr(output, selector)
        else:
            raise ValueError(
                f"output={selector!r}: the model output ({type(output).__name__}) has no {selector!r}"
            )
    elif isinstance(selector, int):
        chosen = output[selector]
    elif isinstance(output, torch.Tensor):
        chosen = output
    elif isinstance(output, Mapping) and "logits" in output:
        chosen = output["logits"]
    elif isinstance(output, (tuple, list)) and output:
        chosen = output[0]
    else:
        raise ValueError(
            f"cannot tell which part of the model output ({type(output).__name__}) is the prediction; "
            "pass output= (a key, an index or a callable)"
        )
    if not isinstance(chosen, torch.Tensor):
        raise ValueError(f"the selected model output must be a tensor, got {type(chosen).__name__}")
    return chosen


def eval_forward(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` in eval mode without gradients; every ``training`` flag restored after."""
    check_example_inputs(inputs)
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return _example_call(model, inputs)
    finally:
        for module, flag in flags.items():
            module.training = flag


def mc_samples(
    model: nn.Module,
    inputs: Any,
    samples: int,
    seed: int,
    *,
    include: Callable[[str, nn.Module], bool] | None = None,
    output: OutputSelector = None,
    one_by_one: bool = True,
) -> torch.Tensor:
    """``samples`` MC dropout predictions ``(samples, N, ...)`` from :func:`dropkit.mc_predict`.

    ``one_by_one``: one forward per sample, no trunk cache, so forward hooks see the batch as
    the model normally does; otherwise :func:`dropkit.mc_predict` batches samples and caches
    the deterministic trunk (the samples are the same).  ``seed`` makes the samples
    reproducible without touching any global seed.
    """
    check_example_inputs(inputs)

    def pick(result: Any) -> torch.Tensor:
        return select_output(result, output)

    options: dict[str, Any] = {
        "T": samples,
        "seed": seed,
        "output": pick,
        "include": include,
    }
    if one_by_one:
        options.update(chunk_size=1, trunk=None)
    if isinstance(inputs, Mapping):
        result = mc_predict(model, model_kwargs=dict(inputs), **options)
    elif isinstance(inputs, tuple):
        result = mc_predict(model, *inputs, **options)
    else:
        result = mc_predict(model, inputs, **options)
    if not isinstance(result, torch.Tensor):
        raise ValueError(f"the selected model output must be a tensor, got {type(result).__name__}")
    return result


def first_float_tensor(output: Any) -> torch.Tensor:
    """The first floating-point tensor of a model output (for samples that are not used).

    Raises:
        ValueError: the output holds none.
    """
    for tensor in _tensors(output):
        if tensor.is_floating_point():
            return tensor
    raise ValueError(f"the model output ({type(output).__name__}) holds no floating-point tensor")
