"""Progress reporting protocol: library code reports, the CLI draws (rich)."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress", "NullProgress"]


class Progress(Protocol):
    def start(self, key: str, description: str, total: int) -> None: ...

    def update(self, key: str, completed: int, description: str | None = None) -> None: ...

    def finish(self, key: str) -> None: ...


class NullProgress:
    """Reports nothing (library default)."""

    def start(self, key: str, description: str, total: int) -> None:
        pass

    def update(self, key: str, completed: int, description: str | None = None) -> None:
        pass

    def finish(self, key: str) -> None:
        pass
