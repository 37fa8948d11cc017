"""EncodingCache: a family's per-image and per-prompt encodings, bounded in bytes, least recent out."""

from __future__ import annotations

import torch


def test_encoding_cache_stays_within_its_bytes_and_evicts_the_least_recent():
    from fedumm.models.images import EncodingCache

    cache = EncodingCache(capacity_bytes=3 * 4096)
    for i in range(5):
        cache.put(("pixels", i), torch.zeros(1024))  # 4096 bytes each
        assert cache.nbytes <= 3 * 4096
    assert len(cache) == 3 and cache.get(("pixels", 0)) is None
    assert cache.get(("pixels", 2)) is not None  # now the most recent
    cache.put(("pixels", 5), torch.zeros(1024))
    assert cache.get(("pixels", 3)) is None and cache.get(("pixels", 2)) is not None
    cache.put(("pixels", 2), torch.zeros(2048))  # replacing re-counts the entry
    assert cache.nbytes <= 3 * 4096 and cache.get(("pixels", 2)).numel() == 2048
