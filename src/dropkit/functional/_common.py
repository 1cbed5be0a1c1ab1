"""Plumbing shared by the functional ops: key resolution, argument checks, in-place results."""

from __future__ import annotations

import torch

from dropkit._validation import check_bool, check_floating_tensor
from dropkit.engine.streams import draw_functional_key, key_from_generator, make_key, to_device_async

SeedLike = int | torch.Tensor | None


def check_common(input: object, training: object, inplace: object) -> torch.Tensor:
    check_bool(training, "training")
    check_bool(inplace, "inplace")
    return check_floating_tensor(input)


def resolve_key(input: torch.Tensor, seed: SeedLike, generator: torch.Generator | None) -> torch.Tensor:
    """The key of this call: explicit ``seed`` (int or key tensor), ``generator``, or the
    functional stream of the global seed."""
    if seed is not None and generator is not None:
        raise ValueError("pass at most one of seed and generator, got both")
    if generator is not None:
        return to_device_async(key_from_generator(generator), input.device)
    if seed is None:
        return draw_functional_key(input.device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != (3,):
            raise ValueError(
                "seed given as a tensor must be an int64 key [seed, stream, step] of shape (3,) "
                f"(see dropkit.make_key), got dtype {seed.dtype} and shape {tuple(seed.shape)}"
            )
        return to_device_async(seed, input.device)
    return make_key(seed, device=input.device)


def finish(input: torch.Tensor, output: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Return ``output``, or write it into ``input`` (autograd-tracked) for ``inplace=True``."""
    if inplace:
        return input.copy_(output)
    return output


def drop_everything(input: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Exact zeros that stay connected to autograd (zero gradient), never ``input * 0`` (NaN for inf)."""
    from dropkit.engine import ops  # late: the ops pull in the kernels

    # At p = 1 the mask ignores the key, so a constant key consumes no draw.
    unused_key = torch.zeros(3, dtype=torch.int64, device=input.device)
    return finish(input, ops.masked_affine(input, unused_key, 1.0, [], 0.0, 0.0, 0.0), inplace)


def scale_by(input: torch.Tensor, factor: float, inplace: bool) -> torch.Tensor:
    """``input * factor`` computed in float32 (float64 for float64), in place if asked."""
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    scaled = input.to(compute) * torch.tensor(factor, dtype=compute, device=input.device)
    return finish(input, scaled.to(input.dtype), inplace)
