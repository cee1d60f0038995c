"""Counter-based randomness: every random number is a hash of (seed, purpose, epoch, slot, counter).

Nothing here holds state, so a stream's position is a handful of integers and the data order never
depends on how many ranks or workers read it (docs/upstream-compat.md#data-order).
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np

_MASK64 = (1 << 64) - 1


def key(*parts: int | str) -> int:
    """A 64-bit hash of the parts (ints or short strings); the same parts give the same key everywhere."""
    buf = bytearray()
    for part in parts:
        if isinstance(part, str):
            data = part.encode("utf-8")
            buf += b"s" + struct.pack("<I", len(data)) + data
        else:
            buf += b"i" + struct.pack("<q", int(part)) if -(1 << 63) <= int(part) < (1 << 63) else \
                b"I" + str(int(part)).encode()
    return int.from_bytes(hashlib.blake2b(bytes(buf), digest_size=8).digest(), "little")


def uniform(*parts: int | str) -> float:
    """A float in [0, 1) determined by the parts (53 random bits)."""
    return (key(*parts) >> 11) * (1.0 / (1 << 53))


def generator(*parts: int | str) -> np.random.Generator:
    """A NumPy generator seeded from the parts (for small, bounded permutations)."""
    return np.random.Generator(np.random.PCG64(key(*parts)))


def permutation(n: int, *parts: int | str) -> np.ndarray:
    """A permutation of range(n) keyed by the parts (n is small: blocks, or rows inside a window)."""
    return generator(*parts).permutation(n)
