"""Per-sample random streams for CFG dropout and timesteps, a pure function of (seed, draw_key, purpose).

Upstream UMV reseeds Python's `random` with `hash(str(data_indexes))` before each sample: Python's string
hash is salted per interpreter, so CFG decisions differ between processes and runs, and timesteps come
from NumPy's unseeded global RNG. Here each sample gets its own counter-based Philox stream keyed by a
BLAKE2b digest of (seed, draw_key, purpose): the same drawn sample gets the same dropout decisions and
timesteps on any worker, any rank and after resume, independently of the other samples in its pack.
"""
from __future__ import annotations

import hashlib

import numpy as np

CFG = "cfg"
TIMESTEP = "timestep"


def sample_generator(seed: int, draw_key: int, purpose: str) -> np.random.Generator:
    """A fresh NumPy Generator(Philox) whose 128-bit key is derived from (seed, draw_key, purpose)."""
    digest = hashlib.blake2b(f"medloom:{int(seed)}:{int(draw_key)}:{purpose}".encode(), digest_size=16).digest()
    key = np.frombuffer(digest, dtype="<u8").astype(np.uint64)
    return np.random.Generator(np.random.Philox(key=key))
