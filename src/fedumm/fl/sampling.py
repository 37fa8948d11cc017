"""Client sampling per round (pure, seeded)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedumm.errors import ConfigError

__all__ = ["sample_clients", "poisson_sample_clients"]


def sample_clients(clients: Sequence[str], fraction: float, seed: int) -> list[str]:
    """Choose max(1, round(fraction * K)) clients without replacement; returned in name order."""
    if not 0 < fraction <= 1 or not math.isfinite(fraction):
        raise ConfigError(f"sample_fraction must be in (0, 1], got {fraction!r}")
    k = max(1, round(fraction * len(clients)))
    if k >= len(clients):
        return sorted(clients)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(clients), size=k, replace=False)
    return sorted(clients[i] for i in picked)


def poisson_sample_clients(clients: Sequence[str], rate: float, seed: int) -> list[str]:
    """Each client independently with probability ``rate`` (possibly none); returned in name order."""
    if not 0 < rate <= 1 or not math.isfinite(rate):
        raise ConfigError(f"sample_fraction must be in (0, 1], got {rate!r}")
    rng = np.random.default_rng(seed)
    draws = rng.random(len(clients))
    return sorted(c for c, u in zip(clients, draws, strict=True) if u < rate)
