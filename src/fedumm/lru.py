"""A least-recently-used map bounded in bytes, for every cache that must not grow with the world.

Families cache decoded images and encodings (:mod:`fedumm.models.images`), the error-feedback store
keeps recent residuals in memory (:mod:`fedumm.fl.residuals`); each sizes its values its own way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["ByteLRU"]


class ByteLRU:
    """``get``/``put`` map whose values' sizes (``size(value)``, bytes) sum to at most ``capacity_bytes``;
    the least recently used go first (a value larger than the whole capacity is not kept)."""

    def __init__(self, capacity_bytes: float, size: Callable[[Any], int]) -> None:
        self.capacity_bytes = capacity_bytes
        self._size = size
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.nbytes = 0

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

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)
