"""Philox words and keep masks for the engine from the fused kernels' generator.

:func:`dropkit.engine.masks.philox_words` builds every 32-bit word of Philox4x32-10 in tensor ops
(the reference, and the path that tracing sees); the Gaussian noise, DropConnect's per-example
masks and the other users of :func:`~dropkit.engine.masks.random_bits32` spend most of their
time there.  In eager mode on the CPU this module answers the same call from the numba kernel
that the CPU dropout kernels use, word for word the same bits, about 70x faster.  Keep masks from
a threshold (:func:`~dropkit.engine.masks.threshold_keep_mask`: DropBlock's seeds, and every
structured mask the engine draws from a float rate) compare the 16-bit draws where they lie in
the words, viewed as uint16, instead of widening each to int64 in tensor ops: about 10x faster.
Registered with the engine when :mod:`dropkit.kernels` is imported;
:func:`dropkit.use_reference_engine` turns them off with the other kernels.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from dropkit.engine import masks
from dropkit.kernels import dispatch

__all__ = ["kernel_philox_words", "kernel_threshold_mask"]

# The 16-bit draws are the halves of the words in memory order (low half first) only here.
_LITTLE_ENDIAN = sys.byteorder == "little"


def _words(key: torch.Tensor, first: int, count: int) -> np.ndarray | None:
    """The uint32 words of counters ``first .. first + count - 1`` (``4 * count``, counter by
    counter) from the CPU kernel, or ``None`` where the tensor ops must answer: a traced or
    transformed call, a key that is not a plain CPU int64 ``[seed, stream, step]``, or no numba
    kernels."""
    if (
        type(key) is not torch.Tensor
        or not key.is_cpu
        or key.dtype != torch.int64
        or key.shape != (3,)
        or count <= 0
        or torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() != 0
        or torch._C._functorch.peek_interpreter_stack() is not None
        or dispatch.use_reference_engine_now()
    ):
        return None
    # Only a backend that is loaded and passed its self-check (which itself draws reference
    # masks through here: loading it from here would wait on its own lock).
    module = dispatch.loaded_kernels("cpu")
    if module is None:
        return None
    words = np.empty(4 * count, dtype=np.uint32)
    module.philox_words(words, 0, first, count, key.detach().numpy())
    return words


def kernel_philox_words(key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...] | None:
    """The words of counters ``first .. first + count - 1`` of ``key`` as int64 tensors, from the
    CPU kernel (``None``: see :func:`_words`)."""
    words = _words(key, first, count)
    if words is None:
        return None
    table = torch.from_numpy(words.astype(np.int64)).view(count, 4)
    return table[:, 0], table[:, 1], table[:, 2], table[:, 3]


def kernel_threshold_mask(key: torch.Tensor, threshold: int, numel: int) -> torch.Tensor | None:
    """The flat keep mask of ``numel`` elements (draw ``>= threshold``) from the CPU kernel's
    words (``None``: see :func:`_words`, or a big-endian machine)."""
    if not _LITTLE_ENDIAN or numel <= 0:
        return None
    words = _words(key, 0, -(-numel // 8))
    if words is None:
        return None
    return torch.from_numpy(words.view(np.uint16)[:numel] >= threshold)


masks.set_philox_words_backend(kernel_philox_words)
masks.set_threshold_mask_backend(kernel_threshold_mask)
