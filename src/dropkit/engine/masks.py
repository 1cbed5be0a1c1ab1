"""The reference mask engine: keep masks and Gaussian noise as pure functions of a key.

Bit layout (the contract that every fast kernel reproduces bit for bit):

* A key ``[seed, stream, step]`` gives the Philox key ``(seed & 0xFFFFFFFF, seed >> 32)``;
  counter ``n`` is the four words ``(n & 0xFFFFFFFF, n >> 32, stream, step)``.
* Element ``j`` of a mask (row-major index in the *mask* shape, whatever the input's strides)
  reads 16 bits: counter ``j // 8``, output word ``(j // 2) % 4``, low half if ``j`` is even.
  It is dropped when those bits are below ``threshold(p) = round(p * 2**16)``, so the realised
  drop probability is ``threshold / 2**16``, within ``2**-17`` of ``p``; ``p = 0`` never
  drops and ``p = 1`` always does.
* Gaussian element ``j`` uses counter ``j // 4``: words 0, 1 give elements ``4n``, ``4n + 1``
  and words 2, 3 give ``4n + 2``, ``4n + 3`` by the Box-Muller transform of the uniforms
  ``((w >> 8) + 0.5) * 2**-24``.

Work is done in chunks of counters; the chunk size changes nothing but peak memory.  The bits
may come from a faster generator of the same bits (a :class:`FastGenerator`): the kernels layer
registers one (:func:`set_fast_generator`; numba on the CPU), which the functions here ask first
in eager mode, so the Gaussian and structured noise is fast without a second copy of the
formulas: it gives the Philox words, the keep masks of a threshold (the 16-bit draws compared
where they lie in the words, never widened to int64) and the Box-Muller uniforms; the
transcendental steps of the Gaussian noise always run in the tensor ops below.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from dropkit.engine.numerics import THRESHOLD_SCALE, compute_dtype, drop_threshold, drop_threshold_tensor
from dropkit.engine.philox import MASK32, philox4x32

__all__ = [
    "keep_mask",
    "mask_chunk_counters",
    "mask_shape",
    "normal_noise",
    "philox_words",
    "plain_eager",
    "box_muller_uniforms",
    "random_bits16",
    "random_bits32",
    "FastGenerator",
    "set_fast_generator",
    "threshold_keep_mask",
]
_ELEMENTS_PER_COUNTER = 8  # 4 words x 2 halves of 16 bits
_NORMALS_PER_COUNTER = 4

_chunk_counters = 1 << 20


class FastGenerator(Protocol):
    """A faster source of the engine's bits.  Each method returns exactly what the tensor ops
    here compute, or ``None`` where it does not apply (a traced or transformed call, another
    device, the reference engine forced); the functions here then compute it themselves."""

    def words(self, key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...] | None:
        """:func:`philox_words`: the four words (int64) of counters ``first ..``."""

    def threshold_mask(self, key: torch.Tensor, threshold: int, numel: int) -> torch.Tensor | None:
        """:func:`threshold_keep_mask`'s flat bool mask of ``numel`` elements."""

    def box_muller_uniforms(
        self, key: torch.Tensor, first: int, count: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`box_muller_uniforms` of counters ``first .. first + count - 1``."""


_fast: FastGenerator | None = None


def set_fast_generator(generator: FastGenerator | None) -> FastGenerator | None:
    """Let the functions here ask ``generator`` first (``None``: tensor ops only); returns the
    previous one."""
    global _fast
    previous, _fast = _fast, generator
    return previous


@contextlib.contextmanager
def mask_chunk_counters(counters: int) -> Iterator[None]:
    """Process at most ``counters`` Philox counters at a time (peak-memory knob, bits unchanged)."""
    global _chunk_counters
    if isinstance(counters, bool) or not isinstance(counters, int) or counters < 1:
        raise ValueError(f"counters must be a positive int, got {counters!r}")
    previous, _chunk_counters = _chunk_counters, counters
    try:
        yield
    finally:
        _chunk_counters = previous


def mask_shape(shape: Sequence[int], broadcast_dims: Sequence[int]) -> list[int]:
    """``shape`` with the (non-negative) ``broadcast_dims`` set to 1: one draw per mask element."""
    return [1 if dim in broadcast_dims else int(size) for dim, size in enumerate(shape)]


def philox_words(key: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, ...]:
    """The four 32-bit output words (int64 tensors) of counters ``first .. first + count - 1``."""
    if _fast is not None:
        words = _fast.words(key, first, count)
        if words is not None:
            return words
    counters = torch.arange(first, first + count, dtype=torch.int64, device=key.device)
    seed, stream, step = key[0], key[1], key[2]
    return philox4x32(
        counters & MASK32,
        counters >> 32,
        stream & MASK32,
        step & MASK32,
        seed & MASK32,
        (seed >> 32) & MASK32,
    )


def random_bits32(key: torch.Tensor, numel: int) -> torch.Tensor:
    """The 32-bit words ``0 .. numel-1`` (word ``j % 4`` of counter ``j // 4``) as int64."""
    n_counters = -(-numel // 4)
    chunks = [
        torch.stack(philox_words(key, first, min(_chunk_counters, n_counters - first)), dim=1).reshape(-1)
        for first in range(0, n_counters, _chunk_counters)
    ]
    if not chunks:
        return torch.empty(0, dtype=torch.int64, device=key.device)
    return torch.cat(chunks)[:numel]


def random_bits16(key: torch.Tensor, numel: int) -> torch.Tensor:
    """The 16-bit draws of elements ``0 .. numel-1`` as an int64 tensor on ``key.device``."""
    n_counters = -(-numel // _ELEMENTS_PER_COUNTER)
    chunks = []
    for first in range(0, n_counters, _chunk_counters):
        # (counters, 4 words, 2 halves): word w's low half, then its high half, counter by counter.
        words = torch.stack(philox_words(key, first, min(_chunk_counters, n_counters - first)), dim=1)
        chunks.append(_pair_last(words & 0xFFFF, words >> 16).reshape(-1))
    if not chunks:
        return torch.empty(0, dtype=torch.int64, device=key.device)
    return torch.cat(chunks)[:numel]


def keep_mask(key: torch.Tensor, p: float | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Boolean keep mask of ``shape`` (True = kept) for drop probability ``p``.

    ``p`` may be a one-element tensor (a rate a compiled graph reads when it runs): its
    threshold is computed in tensor ops and compared with the same draws, which lie in
    ``[0, 2**16)``, so thresholds 0 and ``2**16`` give the all-kept and all-dropped masks.
    """
    numel = math.prod(shape)
    if isinstance(p, torch.Tensor):
        threshold = drop_threshold_tensor(p.reshape(())).to(key.device)
        return (random_bits16(key, numel) >= threshold).reshape(tuple(shape))
    return threshold_keep_mask(key, drop_threshold(p), shape)


def threshold_keep_mask(key: torch.Tensor, threshold: int, shape: Sequence[int]) -> torch.Tensor:
    """Boolean keep mask of ``shape``: element ``j`` is kept when its 16-bit draw is at least
    ``threshold`` (an int in ``[0, 2**16]``, see :func:`dropkit.engine.numerics.drop_threshold`)."""
    if threshold == 0:
        return torch.ones(tuple(shape), dtype=torch.bool, device=key.device)
    if threshold == THRESHOLD_SCALE:
        return torch.zeros(tuple(shape), dtype=torch.bool, device=key.device)
    numel = math.prod(shape)
    if _fast is not None:
        mask = _fast.threshold_mask(key, threshold, numel)
        if mask is not None:
            return mask.reshape(tuple(shape))
    return (random_bits16(key, numel) >= threshold).reshape(tuple(shape))


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether the engine may leave the tensor ops for ``tensors`` (a faster generator, in-place
    assembly): eager mode on plain tensors, with no compile trace, ``torch.func`` transform, or
    dispatch or function mode that must see the ops."""
    return (
        not torch.compiler.is_compiling()
        and all(type(t) is torch.Tensor for t in tensors)
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )


def _pair_last(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``torch.stack((first, second), dim=-1)``.  Eagerly on plain tensors, two strided copies
    into a new tensor: the CPU's stack takes a generic path here, about 5x slower.  Where a trace,
    a transform, a mode or autograd must see a functional op, the stack itself."""
    if not plain_eager(first, second) or (
        torch.is_grad_enabled() and (first.requires_grad or second.requires_grad)
    ):
        return torch.stack((first, second), dim=-1)
    paired = first.new_empty((*first.shape, 2))
    paired.select(-1, 0).copy_(first)
    paired.select(-1, 1).copy_(second)
    return paired


def box_muller_uniforms(
    key: torch.Tensor, first: int, count: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniforms of counters ``first .. first + count - 1`` for :func:`normal_noise`, each a
    contiguous ``(count, 2)`` tensor of ``dtype``: ``((w >> 8) + 0.5) * 2**-24`` of words 0 and 2
    (for the radii) and of words 1 and 3 (for the angles)."""
    if _fast is not None:
        uniforms = _fast.box_muller_uniforms(key, first, count, dtype)
        if uniforms is not None:
            return uniforms
    w0, w1, w2, w3 = philox_words(key, first, count)
    return (
        ((_pair_last(w0, w2) >> 8).to(dtype) + 0.5) * 2.0**-24,
        ((_pair_last(w1, w3) >> 8).to(dtype) + 0.5) * 2.0**-24,
    )


def normal_noise(key: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape``, computed in float64 for float64 and else float32."""
    compute = compute_dtype(dtype)
    numel = math.prod(shape)
    n_counters = -(-numel // _NORMALS_PER_COUNTER)
    chunks = []
    for first in range(0, n_counters, _chunk_counters):
        # (counters, 2 pairs): the transcendental ops take contiguous inputs, where torch's CPU
        # log, cos and sin give an element the same bits wherever it lies.
        for_radius, for_angle = box_muller_uniforms(
            key, first, min(_chunk_counters, n_counters - first), compute
        )
        radius = torch.sqrt(-2.0 * torch.log(for_radius))
        angle = (2.0 * math.pi) * for_angle
        # (counters, 2 pairs, cos then sin): elements 4n .. 4n + 3 of the noise.
        chunks.append(_pair_last(radius * torch.cos(angle), radius * torch.sin(angle)).reshape(-1))
    if not chunks:
        return torch.empty(tuple(shape), dtype=compute, device=key.device)
    noise = chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # one chunk: no copy
    return noise[:numel].reshape(tuple(shape))
