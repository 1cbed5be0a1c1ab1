"""The mask engine: counter-based random bits (Philox4x32-10), RNG streams and keys, the
reference mask and noise generators, checkpoint replay, and the custom ops built on them."""
