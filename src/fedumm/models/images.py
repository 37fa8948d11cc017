"""Decoded training images and their encodings, shared by every family: computed once, kept in LRUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fedumm.errors import DataError
from fedumm.lru import ByteLRU

__all__ = ["EncodingCache", "ImageCache"]


def _encoding_size(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Image.Image):  # decoded pixels, one byte a band
        return value.width * value.height * len(value.getbands())
    if isinstance(value, list | tuple):  # token ids, or a tuple of tensors
        return 56 + sum(_encoding_size(v) if isinstance(v, torch.Tensor) else 8 for v in value)
    return 64


class EncodingCache(ByteLRU):
    """LRU of what a family computes per image or per prompt (pixel tensors, token ids), bounded in bytes.

    A client meets the same examples every epoch and every round, so their encodings are computed
    once; ``capacity_bytes`` keeps a large world (cross-device runs) from holding all of them.
    """

    def __init__(self, capacity_bytes: int = 64 << 20) -> None:
        super().__init__(capacity_bytes, _encoding_size)


class ImageCache:
    """LRU of decoded RGB images, so an image asked about by several questions is read once.

    Bounded in bytes of pixel data (``capacity_bytes``): a cross-device round meets thousands of
    images it may not meet again, and the decoded files of a large world do not all fit."""

    def __init__(self, capacity_bytes: int = 32 << 20) -> None:
        self._cache = EncodingCache(capacity_bytes)

    @property
    def nbytes(self) -> int:
        return self._cache.nbytes

    def get(self, path: str | Path) -> Image.Image:
        path = Path(path)
        img = self._cache.get(path)
        if img is None:
            try:
                with Image.open(path) as f:
                    img = f.convert("RGB")
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read image ({exc})") from None
            self._cache.put(path, img)
        return img

    def __len__(self) -> int:
        return len(self._cache)
