"""Aggregation strategies, one file each, registered by name in STRATEGIES."""

from collections.abc import Mapping

from fedumm.fl.strategies import (  # noqa: F401  (registration)
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedyogi,
    ffa_lora,
    product_space,
    quality_weighted,
)
from fedumm.fl.strategies.base import STRATEGIES, Strategy

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]


def make_strategy(
    name: str, *, group_strategies: Mapping[str, str] | None = None, **params: object
) -> Strategy:
    """Build a registered strategy by name with its keyword hyperparameters.

    ``group_strategies`` (adapter group -> strategy name, default hyperparameters) aggregates those
    groups with their own strategy; the others use ``name``.
    """
    default = STRATEGIES.get(name)(**params)
    if not group_strategies:
        return default
    from fedumm.fl.strategies.per_group import PerGroup

    return PerGroup(default, {g: STRATEGIES.get(n)() for g, n in group_strategies.items()})
