"""Engines ("where it runs"), chosen by name from :data:`ENGINES`.

Each engine registers itself in its own module; they are imported on first use, so that importing a
piece of one engine (the FLARE server's controller, say) loads neither the others nor any model code.
"""

from __future__ import annotations

from fedumm.engines.base import ENGINES, EngineRun, FederationSetup

__all__ = ["ENGINES", "EngineRun", "FederationSetup", "engine_names", "get_engine", "run_federation"]


def _register_all() -> None:
    from fedumm.engines import inprocess, nvflare  # noqa: F401  (registration; nvflare itself is lazy)


def get_engine(name: str) -> EngineRun:
    """The registered engine ``name``; an unknown name is a ConfigError with a suggestion."""
    _register_all()
    return ENGINES.get(name)


def engine_names() -> list[str]:
    _register_all()
    return ENGINES.names()


def run_federation(setup: FederationSetup):
    """Run the federation on the engine the config names; return the final global adapter."""
    return get_engine(setup.cfg.engine)(setup)
