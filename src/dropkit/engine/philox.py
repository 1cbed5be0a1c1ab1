"""Philox4x32-10 in plain vectorized torch integer ops: the reference bit generator.

Why Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):
it is counter-based, so the random bits of element ``i`` are a pure function of
``(key, counter(i))``.  Masks therefore cannot depend on how the work is split (threads,
chunks, devices, ranks), and backward can regenerate a mask instead of storing it.  It is
also the generator behind Triton's ``tl.randint``/``tl.philox``, so a GPU kernel can
reproduce these bits exactly.

The arithmetic runs on int64 tensors holding values in ``[0, 2**32)``.  The 32x32->64
multiply is split into 16-bit halves so that no intermediate exceeds 2**49: signed
overflow is never relied upon, which keeps the result identical on every backend
(CPU, CUDA, MPS) that implements int64 arithmetic.
"""

from __future__ import annotations

import torch

__all__ = ["MASK32", "PHILOX_ROUNDS", "philox4x32"]

MASK32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10

# Round multipliers and Weyl key increments of Philox4x32 (Random123 / Triton constants).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * multiplier`` for ``a`` in ``[0, 2**32)``."""
    t_lo = a * (multiplier & 0xFFFF)  # < 2**48
    t_hi = a * (multiplier >> 16)  # < 2**48
    s = t_lo + ((t_hi & 0xFFFF) << 16)  # < 2**49
    return (t_hi >> 16) + (s >> 32), s & MASK32


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 block function on broadcastable int64 tensors of 32-bit words.

    Returns the four 32-bit output words, each an int64 tensor in ``[0, 2**32)``.
    """
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3
