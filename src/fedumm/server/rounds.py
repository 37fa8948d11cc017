"""The one round loop, engine-agnostic: sample, dispatch, validate, aggregate, evaluate, record."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedumm.errors import EngineError
from fedumm.fl.sampling import sample_clients
from fedumm.fl.strategies import Strategy
from fedumm.seeding import derive_seed
from fedumm.types import AdapterState, ClientUpdate, RoundRecord, validate_update

log = logging.getLogger(__name__)

__all__ = ["Engine", "RoundOutcome", "RoundLoop"]


@dataclass(frozen=True, kw_only=True)
class RoundOutcome:
    """What an engine returns for one round: the updates that arrived and the measured bytes."""

    updates: Sequence[ClientUpdate]
    bytes_up: Mapping[str, int]
    bytes_down: Mapping[str, int]
    dropped: Sequence[str] = field(default_factory=tuple)  # crashed, timed out or rejected


class Engine(Protocol):
    """Where a round's client work runs (in-process, FLARE ...)."""

    def run_round(self, rnd: int, clients: Sequence[str], global_state: AdapterState) -> RoundOutcome: ...


@dataclass(kw_only=True)
class RoundLoop:
    """Runs rounds ``start_round..num_rounds``; callbacks persist and report each finished round."""

    engine: Engine
    strategy: Strategy
    clients: Sequence[str]
    num_rounds: int
    seed: int
    sample_fraction: float = 1.0
    min_clients: int = 1
    group_of: Callable[[str], str] | None = None
    evaluate: Callable[[AdapterState, int], Mapping[str, float]] | None = None
    on_round: Callable[[RoundRecord, AdapterState], None] | None = None

    def run(self, initial_state: AdapterState, *, start_round: int = 1) -> dict[str, torch.Tensor]:
        state = dict(initial_state)
        for rnd in range(start_round, self.num_rounds + 1):
            t0 = time.perf_counter()
            chosen = sample_clients(
                list(self.clients), self.sample_fraction, derive_seed(self.seed, "sample", "", rnd)
            )
            outcome = self.engine.run_round(rnd, chosen, state)
            accepted, dropped = [], list(outcome.dropped)
            for u in outcome.updates:
                try:
                    validate_update(u, state)
                except Exception as exc:  # a bad update is dropped for this round and logged
                    log.warning("round %d: rejected update from %s: %s", rnd, u.client_id, exc)
                    dropped.append(u.client_id)
                    continue
                accepted.append(u)
            if len(accepted) < self.min_clients:
                raise EngineError(
                    f"round {rnd}: only {len(accepted)} valid client update(s), fewer than min_clients="
                    f"{self.min_clients} (dropped: {', '.join(dropped) or 'none'})"
                )
            accepted.sort(key=lambda u: u.client_id)  # aggregation order never depends on arrival order
            state = self.strategy.aggregate(global_state=state, updates=accepted, group_of=self.group_of)
            global_metrics = dict(self.evaluate(state, rnd)) if self.evaluate else {}
            record = RoundRecord(
                round=rnd,
                clients=tuple(u.client_id for u in accepted),
                dropped=tuple(sorted(dropped)),
                global_metrics=global_metrics,
                client_metrics={
                    u.client_id: dict(u.metrics)
                    | {"num_examples": u.num_examples}
                    | {f"examples_{g}": n for g, n in sorted((u.group_examples or {}).items())}
                    for u in accepted
                },
                bytes_up=dict(outcome.bytes_up),
                bytes_down=dict(outcome.bytes_down),
                wall_time_s=time.perf_counter() - t0,
            )
            if self.on_round:
                self.on_round(record, state)
        return state
