"""Model families, one folder each, and the registry that names them.

Each family package registers its :class:`~fedumm.models.base.FamilyInfo` in
:data:`~fedumm.models.base.FAMILIES` when imported (no model library is imported for that); this
module imports them all. Everything else asks the registry, never a family's module.
"""

from __future__ import annotations

from pathlib import Path

from fedumm.models import blip3o, janus  # noqa: F401  (registration)
from fedumm.models.base import FAMILIES, FamilyInfo, FamilyOptions, ModelFamily

__all__ = ["FAMILIES", "family_info", "family_class", "family_names", "load_family", "builtin_path"]


def family_names() -> list[str]:
    return FAMILIES.names()


def family_info(name: str) -> FamilyInfo:
    """A registered family's description; an unknown name is a ConfigError with a suggestion."""
    return FAMILIES.get(name)


def family_class(name: str) -> type[ModelFamily]:
    """The family's model class (imports its model libraries)."""
    return family_info(name).load_class()


def load_family(
    name: str, path: str | Path | None = None, *, options: FamilyOptions | None = None
) -> ModelFamily:
    """Load family ``name`` from a local checkpoint (None: its built-in tiny model)."""
    return family_class(name).from_pretrained(path, options=options or FamilyOptions())


def builtin_path(name: str) -> Path:
    return family_class(name).builtin_path()
