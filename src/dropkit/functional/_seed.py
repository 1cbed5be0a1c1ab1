"""The checks of a call's ``seed`` and ``generator`` that hold whether or not the call draws.

:func:`dropkit.functional._common.resolve_key` runs them before it builds the key, and a call
that draws nothing (eval mode, a rate of 0, an empty input) runs them before it returns: so
``seed="x"`` is refused in eval as in training.
"""

from __future__ import annotations

import torch

from dropkit.engine.streams import _check_seed

__all__ = ["check_seed"]


def check_seed(seed: object, generator: object) -> None:
    """Refuse bad randomness arguments, without resolving a key: at most one of the two, ``seed``
    an int in ``[-2**63, 2**64)`` or an int64 key of shape ``(3,)``, ``generator`` a
    :class:`torch.Generator`."""
    if seed is None and generator is None:
        return
    if seed is not None and generator is not None:
        raise ValueError("pass at most one of seed and generator, got both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != (3,):
            raise ValueError(
                "seed given as a tensor must be an int64 key [seed, stream, step] of shape (3,) "
                f"(see dropkit.make_key), got dtype {seed.dtype} and shape {tuple(seed.shape)}"
            )
        return
    _check_seed(seed)
