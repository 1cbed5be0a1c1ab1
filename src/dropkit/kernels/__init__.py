"""Fused kernels behind dropkit's ops, chosen per device by :mod:`dropkit.kernels.dispatch`.

Backends: numba on CPU (:mod:`dropkit.kernels.cpu`), Triton on CUDA
(:mod:`dropkit.kernels.triton_gpu`); both are imported lazily, on the first op that needs them,
and reproduce the reference engine bit for bit.
"""

from dropkit.kernels.dispatch import FORCE_REFERENCE_ENV as FORCE_REFERENCE_ENV
from dropkit.kernels.dispatch import KernelFallbackWarning as KernelFallbackWarning
from dropkit.kernels.dispatch import backend_for as backend_for
from dropkit.kernels.dispatch import use_reference_engine as use_reference_engine

__all__ = ["FORCE_REFERENCE_ENV", "KernelFallbackWarning", "backend_for", "use_reference_engine"]
