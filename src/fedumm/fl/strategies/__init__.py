"""Aggregation strategies, one file each, registered by name in STRATEGIES."""

from fedumm.fl.strategies import (  # noqa: F401  (registration)
    fedadam,
    fedavg,
    fedprox,
    fedyogi,
    ffa_lora,
    product_space,
    quality_weighted,
)
from fedumm.fl.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]


def make_strategy(name: str, **params: object) -> Strategy:
    """Build a registered strategy by name with its keyword hyperparameters."""
    return STRATEGIES.get(name)(**params)
