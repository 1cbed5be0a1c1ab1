"""Fused kernels behind dropkit's ops, chosen per device by :mod:`dropkit.kernels.dispatch`.

Each backend implements the :class:`Backend` protocol: numba on CPU (:mod:`dropkit.kernels.cpu`),
Triton on CUDA (:mod:`dropkit.kernels.triton_gpu`) and the reference engine
(:mod:`dropkit.engine.reference`) everywhere; the kernels are imported lazily, on the first op
that needs them, and reproduce the reference engine bit for bit.
"""

from dropkit.kernels.dispatch import FORCE_REFERENCE_ENV as FORCE_REFERENCE_ENV
from dropkit.kernels.dispatch import Backend as Backend
from dropkit.kernels.dispatch import KernelFallbackWarning as KernelFallbackWarning
from dropkit.kernels.dispatch import backend_for as backend_for
from dropkit.kernels.dispatch import use_reference_engine as use_reference_engine
from dropkit.kernels.words import kernel_philox_words as kernel_philox_words

__all__ = [
    "FORCE_REFERENCE_ENV",
    "Backend",
    "KernelFallbackWarning",
    "backend_for",
    "kernel_philox_words",
    "use_reference_engine",
]
