"""Seeds derived from integers, the same in every process: data partitions, client order, noise, sampling."""

from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes (Python's hash of tuples is salted for str)."""
    s = 0x9E3779B97F4A7C15
    for p in parts:
        s = (s * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return s
