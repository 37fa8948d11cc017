"""EncodingCache: a family's per-image and per-prompt encodings, bounded in bytes, least recent out."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fedumm.errors import DataError
from fedumm.models.images import EncodingCache, ImageCache


def test_encoding_cache_stays_within_its_bytes_and_evicts_the_least_recent():
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


def test_image_cache_stays_within_its_bytes(tmp_path):
    for i in range(6):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(tmp_path / f"{i}.png")
    cache = ImageCache(capacity_bytes=3 * 16 * 16 * 3)
    for i in range(6):
        assert cache.get(tmp_path / f"{i}.png").getpixel((0, 0)) == (i, 0, 0)
        assert cache.nbytes <= 3 * 16 * 16 * 3
    assert len(cache) == 3
    (tmp_path / "0.png").unlink()  # evicted, so asking again reads the file: gone now
    with pytest.raises(DataError, match="0.png"):
        cache.get(tmp_path / "0.png")
    (tmp_path / "5.png").unlink()
    assert cache.get(tmp_path / "5.png").getpixel((0, 0)) == (5, 0, 0)  # still held
