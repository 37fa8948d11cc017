"""Explicit randomness: every seed derives from (base seed, role, client, round)."""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(base: int, role: str, client: str = "", rnd: int = 0) -> int:
    """A 31-bit seed that depends only on its arguments (stable across processes and machines)."""
    words = [
        int(base) & 0xFFFFFFFF,
        zlib.crc32(role.encode()),
        zlib.crc32(client.encode()),
        int(rnd) & 0xFFFFFFFF,
    ]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)
