"""The mask engine: counter-based random bits (Philox4x32-10), RNG streams and keys, the numerics
of every op (compute dtype, thresholds, scales, guards), the reference masks and noise, the
reference backend, and checkpoint replay.  It imports nothing from the layers above it."""
