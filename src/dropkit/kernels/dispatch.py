"""Backends of dropkit's mask ops and the choice between them: a fused kernel where one exists,
else the reference engine.

A backend is anything that implements the small :class:`Backend` protocol: ``masked_affine`` and
``bias_dropout_add`` with the rate given as an integer drop threshold and float constants, all
run-time arguments (so a rate schedule never recompiles or re-plans anything).  The reference
engine (:mod:`dropkit.engine.reference`), the numba kernels (:mod:`dropkit.kernels.cpu`) and the
Triton kernels (:mod:`dropkit.kernels.triton_gpu`) each implement it as a module.

Every backend reproduces the reference engine bit for bit, so the choice changes speed, never
results.  Per device type:

* CPU: the numba kernels of :mod:`dropkit.kernels.cpu`, if numba imports and the kernels pass a
  self-check against the reference engine on first use;
* CUDA: the Triton kernels of :mod:`dropkit.kernels.triton_gpu` (imported lazily, only once a
  CUDA tensor shows up);
* anything else (MPS, XPU, meta, ...): the reference engine.

A backend that is missing or fails (import error, compile error, wrong self-check, an exception
at call time) is switched off for the rest of the process with a single
:class:`KernelFallbackWarning`, and the call is answered by the reference engine: a broken
backend costs speed, never a crash.  Arguments a backend does not take are no failure: the
dispatcher sends a key of another dtype, shape or device to the reference engine, and the CPU
backend, which checks its keys itself, says so with a :class:`KernelArgumentError`.

The reference engine can be forced with :func:`use_reference_engine` (a context manager, also
usable to force kernels back on inside a forced region) or for a whole process with the
environment variable ``DROPKIT_FORCE_REFERENCE=1`` (read and validated at import).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from types import ModuleType
from typing import Any, Protocol

import torch

from dropkit._validation import check_bool, env_flag
from dropkit.engine import reference
from dropkit.engine.masks import keep_mask

__all__ = [
    "FORCE_REFERENCE_ENV",
    "NUMBA",
    "REFERENCE",
    "TRITON",
    "Backend",
    "KernelArgumentError",
    "KernelFallbackWarning",
    "backend_for",
    "bias_dropout_add",
    "masked_affine",
    "use_reference_engine",
]

REFERENCE = "reference"
NUMBA = "numba"
TRITON = "triton"
FORCE_REFERENCE_ENV = "DROPKIT_FORCE_REFERENCE"

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Validated at import: a typo in the variable fails loudly instead of silently meaning "off".
_FORCED_BY_ENVIRONMENT = env_flag(FORCE_REFERENCE_ENV)
_force_reference: ContextVar[bool] = ContextVar("dropkit_force_reference", default=_FORCED_BY_ENVIRONMENT)


class Backend(Protocol):
    """What a backend implements (as module-level functions): the bits of
    :mod:`dropkit.engine.masks` and the arithmetic of :mod:`dropkit.engine.reference`, exactly.

    ``threshold`` is the integer drop threshold in ``[0, 2**16]``
    (:func:`dropkit.engine.numerics.drop_threshold`); the float constants are applied in the
    compute dtype (:func:`dropkit.engine.numerics.compute_dtype`).
    """

    name: str

    def masked_affine(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        threshold: int,
        broadcast_dims: Sequence[int],
        keep_scale: float,
        keep_shift: float,
        drop_value: float,
    ) -> torch.Tensor:
        """``where(keep, x * keep_scale + keep_shift, drop_value)``."""
        ...

    def bias_dropout_add(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        residual: torch.Tensor,
        key: torch.Tensor,
        threshold: int,
        keep_scale: float,
    ) -> torch.Tensor:
        """``residual + where(keep, (x + bias) * keep_scale, 0)`` (the element mask of ``x``)."""
        ...


class KernelFallbackWarning(RuntimeWarning):
    """A fused kernel backend is unavailable or broken; dropkit uses its reference engine."""


class KernelArgumentError(ValueError):
    """Raised by a kernel backend, before it computes anything, for arguments it does not take
    (a key of another dtype, shape or device): the reference engine answers the call instead
    (and raises the caller's error, if there is one), and the backend stays on."""


@contextlib.contextmanager
def use_reference_engine(enabled: bool = True) -> Iterator[None]:
    """Run dropkit's ops on the reference engine (``enabled=True``) or on the fused kernels
    (``enabled=False``, overriding ``DROPKIT_FORCE_REFERENCE``) inside the ``with`` block.

    Masks are the same either way; use it to compare speeds, or to rule a kernel out while
    debugging.  The setting is per thread (and per asyncio task) and nests.

    Example::

        >>> import torch, dropkit
        >>> x = torch.ones(4, 4)
        >>> with dropkit.use_reference_engine():
        ...     slow = dropkit.functional.dropout(x, 0.5, seed=3)
        >>> torch.equal(slow, dropkit.functional.dropout(x, 0.5, seed=3))
        True
    """
    check_bool(enabled, "enabled")
    token = _force_reference.set(enabled)
    try:
        yield
    finally:
        _force_reference.reset(token)


class _Backend:
    """Lazily imported kernel module for one device type, switched off for good on failure."""

    def __init__(self, name: str, module_name: str, self_check: Callable[[ModuleType], None] | None) -> None:
        self.name = name
        self.module_name = module_name
        self.self_check = self_check
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.module: ModuleType | None = None
        self.failure: str | None = None

    def load(self) -> ModuleType | None:
        if self.module is not None or self.failure is not None:
            return self.module
        with self._lock:
            if self.module is None and self.failure is None:
                try:
                    module = importlib.import_module(self.module_name)
                    if self.self_check is not None:
                        self.self_check(module)
                except Exception as error:  # any failure of an optional backend means "fall back"
                    self.fail(error)
                else:
                    self.module = module
        return self.module

    def fail(self, error: BaseException) -> None:
        self.module = None
        if self.failure is not None:
            return
        self.failure = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"dropkit's {self.name} kernels ({self.module_name}) are unavailable "
            f"({self.failure}); using the reference engine for the rest of this process. "
            "Results are identical, only slower.",
            KernelFallbackWarning,
            stacklevel=2,
        )


def _check_cpu_kernels(module: ModuleType) -> None:
    """Refuse kernels whose masks differ from the reference (a miscompiling toolchain, say)."""
    key = torch.tensor([0x123456789, 7, 11], dtype=torch.int64)
    x = torch.ones(61, dtype=torch.float32)
    got = module.masked_affine(x, key, 1 << 15, [], 2.0, 0.0, 0.0)
    expected = torch.where(keep_mask(key, 0.5, [61]), 2.0, 0.0)
    if not torch.equal(got, expected):
        raise RuntimeError("self-check failed: masks differ from the reference engine")


# ---- Backend registry.  Each kernel module implements Backend (the Triton one takes a bias over
# the last dim only) and is imported the first time a tensor of its device reaches an op.
_BACKENDS: dict[str, _Backend] = {
    "cpu": _Backend(NUMBA, "dropkit.kernels.cpu", _check_cpu_kernels),
    "cuda": _Backend(TRITON, "dropkit.kernels.triton_gpu", None),
}
_CPU_BACKEND = _BACKENDS["cpu"]


def backend_for(device: torch.device | str) -> str:
    """Name of the backend that runs float ops on ``device``: ``"numba"``, ``"triton"`` or
    ``"reference"``.  Asking may import (and self-check) the backend, with the usual fallback."""
    device = torch.device(device)
    if _force_reference.get():
        return REFERENCE
    backend = _BACKENDS.get(device.type)
    if backend is None or backend.load() is None:
        return REFERENCE
    return backend.name


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _kernels_for(x: torch.Tensor, key: torch.Tensor) -> _Backend | None:
    # Cheapest tests first: this runs on every eager call.
    if x.dtype not in _KERNEL_DTYPES or _force_reference.get():
        return None
    backend: _Backend | None
    if x.is_cpu:
        backend = _CPU_BACKEND  # it checks the key itself: a KernelArgumentError
    elif key.dtype != torch.int64 or key.shape != (3,) or key.device != x.device:
        # Not a key the kernels take: the reference engine answers (or raises the user's error),
        # so that a bad argument never switches a working backend off.
        return None
    else:
        backend = _BACKENDS.get(x.device.type)
        if backend is None:
            return None
    if _is_functorch_wrapped(x) or _is_functorch_wrapped(key):
        return None  # a torch.func transform's wrapper has no storage a kernel could read
    if backend.module is None and backend.load() is None:
        return None
    return backend


def _run(backend: _Backend | None, op: str, args: tuple[Any, ...]) -> torch.Tensor:
    module = None if backend is None else backend.module
    output: torch.Tensor
    if backend is None or module is None:
        output = getattr(reference, op)(*args)
        return output
    try:
        output = getattr(module, op)(*args)
    except KernelArgumentError:  # the caller's arguments, not a failure of the backend
        output = getattr(reference, op)(*args)
    except Exception as error:  # a kernel bug or toolchain failure must not take the model down
        backend.fail(error)
        output = getattr(reference, op)(*args)
    return output


# The two entry points take the arguments of the Backend methods of the same name, in order.


def masked_affine(*args: Any) -> torch.Tensor:
    """:meth:`Backend.masked_affine` on the best backend for ``x`` (the reference engine when no
    kernel applies, or when one fails: it is then switched off with one warning)."""
    x, key = args[0], args[1]
    return _run(_kernels_for(x, key), "masked_affine", args)


def bias_dropout_add(*args: Any) -> torch.Tensor:
    """:meth:`Backend.bias_dropout_add` on the best backend for ``x``; see :func:`masked_affine`."""
    x, bias, key = args[0], args[1], args[3]
    backend = _kernels_for(x, key)
    if backend is not None and backend.name == TRITON and tuple(bias.shape) != tuple(x.shape[-1:]):
        backend = None  # the Triton kernel takes a bias over the last dim only
    return _run(backend, "bias_dropout_add", args)


def _reset_backends() -> None:
    """Forget loaded and failed backends (tests simulate failures with it)."""
    for backend in _BACKENDS.values():
        backend.reset()


def use_reference_engine_now() -> bool:
    """Whether :func:`use_reference_engine` (or ``DROPKIT_FORCE_REFERENCE``) is in force here."""
    return _force_reference.get()


def loaded_kernels(device_type: str) -> ModuleType | None:
    """The kernel module of ``device_type`` once it has loaded and passed its self-check (loading
    it now if nobody is), else ``None``.  While a load is under way, in this thread (its
    self-check draws reference masks through callers of this) or another, the answer is ``None``
    rather than a wait on the load's lock."""
    backend = _BACKENDS.get(device_type)
    if backend is None:
        return None
    if backend.module is None and backend.failure is None and not backend._lock.locked():
        return backend.load()
    return backend.module
