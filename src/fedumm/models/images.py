"""Decoded training images, shared by every family: read once, kept in a small LRU."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from PIL import Image

from fedumm.errors import DataError

__all__ = ["ImageCache"]


class ImageCache:
    """Small LRU of decoded RGB images, so an image asked about by several questions is read once."""

    def __init__(self, capacity: int = 20000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Path, Image.Image] = OrderedDict()

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
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(path)
        return img
