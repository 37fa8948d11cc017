"""Quality-weighted aggregation of FedUMM (arXiv:2601.15390, Sec. 3.4, Eq. 1).

theta = sum_k w_k theta_k with w_k proportional to n_k * q_k. The paper leaves the quality factor
open; here q_k = clamp(s_k / median_j s_j, 1/cap, cap), where s_k in [0, 1] is the client's score on
its own held-out validation examples after local training (metric ``val_score``). Dividing by the
median makes a typical client's q equal 1; the clamp bounds what one inflated report can do: it can
multiply that client's weight by at most ``cap``. Same exactness caveat as FedAvg (A, B averaged).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedumm.errors import InvalidUpdate
from fedumm.fl.aggregate import quality_factors
from fedumm.fl.strategies.base import STRATEGIES, Strategy, group_weight_base
from fedumm.types import ClientUpdate

SCORE_KEY = "val_score"


@STRATEGIES.register("quality_weighted")
class QualityWeighted(Strategy):
    """w_k proportional to n_k * q_k with bounded quality factors from local validation scores."""

    name = "quality_weighted"

    def __init__(self, *, cap: float = 2.0) -> None:
        if not cap >= 1:
            raise InvalidUpdate(f"quality_weighted: cap must be >= 1, got {cap!r}")
        self.cap = float(cap)

    def client_weights(self, updates: Sequence[ClientUpdate], group: str) -> list[float]:
        # quality is compared among the clients that trained the group, on the group's own score
        # (val_score_vision / val_score_generation) where every one of them reports it
        bases = [group_weight_base(u, group) for u in updates]
        active = [u for u, n in zip(updates, bases, strict=True) if n > 0]
        if not active:
            return [0.0] * len(updates)
        key = f"{SCORE_KEY}_{group}"
        if not all(key in u.metrics for u in active):
            key = SCORE_KEY
        for u in active:
            if key not in u.metrics:
                raise InvalidUpdate(f"client {u.client_id!r}: quality_weighted needs metric {SCORE_KEY!r}")
        qs = iter(quality_factors([u.metrics[key] for u in active], cap=self.cap))
        return [n * next(qs) if n > 0 else 0.0 for n in bases]
