"""Decoded training images and their encodings, shared by every family: computed once, kept in LRUs."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fedumm.errors import DataError

__all__ = ["EncodingCache", "ImageCache"]


class ImageCache:
    """LRU of decoded RGB images, so an image asked about by several questions is read once.

    Bounded in bytes of pixel data (``capacity_bytes``): a cross-device round meets thousands of
    images it may not meet again, and the decoded files of a large world do not all fit."""

    def __init__(self, capacity_bytes: int = 32 << 20) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[Path, Image.Image] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def _size(img: Image.Image) -> int:
        return img.width * img.height * len(img.getbands())

    def get(self, path: str | Path) -> Image.Image:
        path = Path(path)
        img = self._items.get(path)
        if img is None:
            try:
                with Image.open(path) as f:
                    img = f.convert("RGB")
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read image ({exc})") from None
            self._items[path] = img
            self.nbytes += self._size(img)
            while self.nbytes > self.capacity_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.nbytes -= self._size(old)
        else:
            self._items.move_to_end(path)
        return img

    def __len__(self) -> int:
        return len(self._items)


class EncodingCache:
    """LRU of what a family computes per image or per prompt (pixel tensors, token ids), bounded in bytes.

    A client meets the same examples every epoch and every round, so their encodings are computed
    once; ``capacity_bytes`` keeps a large world (cross-device runs) from holding all of them.
    """

    def __init__(self, capacity_bytes: int = 64 << 20) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def _size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, list | tuple):  # token ids, or a tuple of tensors
            return 56 + sum(EncodingCache._size(v) if isinstance(v, torch.Tensor) else 8 for v in value)
        return 64

    def get(self, key: Hashable) -> Any | None:
        got = self._items.get(key)
        if got is None:
            return None
        self._items.move_to_end(key)
        return got[0]

    def put(self, key: Hashable, value: Any) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        size = self._size(value)
        self._items[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.capacity_bytes and self._items:
            _, (_, evicted) = self._items.popitem(last=False)
            self.nbytes -= evicted

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)
