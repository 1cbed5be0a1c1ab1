"""The engine's bits from the fused kernels' generator: Philox words, threshold masks and
Box-Muller uniforms.

:mod:`dropkit.engine.masks` builds every 32-bit word of Philox4x32-10 in tensor ops (the
reference, and the path that tracing sees); the Gaussian noise, DropBlock's seeds, DropConnect's
per-example masks and the other structured masks spend most of their time there.  In eager mode
on the CPU, :data:`KERNEL_GENERATOR` answers the same calls from the numba kernel that the CPU
dropout kernels use, word for word the same bits:

* the words themselves, about 70x faster;
* keep masks from a threshold (:func:`~dropkit.engine.masks.threshold_keep_mask`), comparing the
  16-bit draws where they lie in the words, viewed as uint16, instead of widening each to int64;
* the Box-Muller uniforms of :func:`~dropkit.engine.masks.normal_noise` (its log, cos and sin
  stay the tensor ops').

Registered with the engine (:func:`~dropkit.engine.masks.set_fast_generator`) when
:mod:`dropkit.kernels` is imported; :func:`dropkit.use_reference_engine` turns it off with the
other kernels.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np
import torch

from dropkit.engine import masks
from dropkit.kernels import dispatch

__all__ = ["KERNEL_GENERATOR", "KernelGenerator", "kernel_philox_words"]

# The 16-bit draws are the halves of the words in memory order (low half first) only here.
_LITTLE_ENDIAN = sys.byteorder == "little"


def _cpu_kernels(key: torch.Tensor, count: int) -> ModuleType | None:
    """The loaded CPU kernels where they may answer for ``key``, else ``None``: a traced or
    transformed call or a mode (:func:`~dropkit.engine.masks.plain_eager`), a key that is not a
    CPU int64 ``[seed, stream, step]``, nothing to generate, the reference engine forced, or no
    numba kernels."""
    if (
        not masks.plain_eager(key)
        or not key.is_cpu
        or key.dtype != torch.int64
        or key.shape != (3,)
        or count <= 0
        or dispatch.use_reference_engine_now()
    ):
        return None
    # Only a backend that is loaded and passed its self-check (which itself draws reference
    # masks through here: loading it from here would wait on its own lock).
    return dispatch.loaded_kernels("cpu")


def _words(key: torch.Tensor, first: int, count: int) -> np.ndarray | None:
    """The uint32 words of counters ``first .. first + count - 1`` (``4 * count``, counter by
    counter), or ``None`` (see :func:`_cpu_kernels`)."""
    module = _cpu_kernels(key, count)
    if module is None:
        return None
    words = np.empty(4 * count, dtype=np.uint32)
    module.philox_words(words, 0, first, count, key.detach().numpy())
    return words


class KernelGenerator:
    """The :class:`~dropkit.engine.masks.FastGenerator` of the CPU kernels."""

    def words(self, key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...] | None:
        """The words of counters ``first .. first + count - 1`` as int64 tensors."""
        words = _words(key, first, count)
        if words is None:
            return None
        table = torch.from_numpy(words.astype(np.int64)).view(count, 4)
        return table[:, 0], table[:, 1], table[:, 2], table[:, 3]

    def threshold_mask(self, key: torch.Tensor, threshold: int, numel: int) -> torch.Tensor | None:
        """The flat keep mask of ``numel`` elements (draw ``>= threshold``)."""
        if not _LITTLE_ENDIAN or numel <= 0:
            return None
        words = _words(key, 0, -(-numel // 8))
        if words is None:
            return None
        return torch.from_numpy(words.view(np.uint16)[:numel] >= threshold)

    def box_muller_uniforms(
        self, key: torch.Tensor, first: int, count: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The uniforms of :func:`~dropkit.engine.masks.box_muller_uniforms`, in float32 or float64."""
        if dtype not in (torch.float32, torch.float64):
            return None
        module = _cpu_kernels(key, count)
        if module is None:
            return None
        for_radius = torch.empty((count, 2), dtype=dtype)
        for_angle = torch.empty((count, 2), dtype=dtype)
        module.box_muller_uniforms(
            for_radius.numpy().reshape(-1), for_angle.numpy().reshape(-1), first, count, key.detach().numpy()
        )
        return for_radius, for_angle


#: The generator registered with the engine.
KERNEL_GENERATOR = KernelGenerator()


def kernel_philox_words(key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...] | None:
    """:meth:`KernelGenerator.words` of the registered generator."""
    return KERNEL_GENERATOR.words(key, first, count)


masks.set_fast_generator(KERNEL_GENERATOR)
