"""The one round loop, engine-agnostic: sample, dispatch, validate, defend, aggregate, evaluate, record.

Defences (:mod:`fedumm.fl.defense`: count bound, norm bound or DP clip, robust rule, DP noise) run
here, between validation and the strategy, in one order for every engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from fedumm.errors import EngineError
from fedumm.fl.defense import defend, noise_only
from fedumm.fl.sampling import poisson_sample_clients, sample_clients
from fedumm.fl.strategies import Strategy
from fedumm.seeding import derive_seed
from fedumm.types import AdapterState, ClientUpdate, DefenseEvent, RoundRecord, validate_update

if TYPE_CHECKING:
    from fedumm.server.trust import TrustSettings

log = logging.getLogger(__name__)

__all__ = ["Engine", "RoundOutcome", "RoundLoop", "SecureAggregation"]


@dataclass(frozen=True, kw_only=True)
class RoundOutcome:
    """What an engine returns for one round: the updates that arrived and the measured bytes."""

    updates: Sequence[ClientUpdate]
    bytes_up: Mapping[str, int]
    bytes_down: Mapping[str, int]
    dropped: Sequence[str] = field(default_factory=tuple)  # crashed, timed out or rejected


class SecureAggregation(Protocol):
    """Aggregation over updates the server cannot read (FLARE's HE): replaces the strategy's."""

    def validate(self, update: ClientUpdate, reference: AdapterState) -> None: ...

    def aggregate(self, *, global_state, updates: Sequence[ClientUpdate], group_of) -> dict: ...


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
    trust: TrustSettings | None = None  # None: no defence at all (not even the default ones)
    secure: SecureAggregation | None = None  # encrypted updates: validated and aggregated by it

    def _sample(self, rnd: int) -> list[str]:
        seed = derive_seed(self.seed, "sample", "", rnd)
        if self.trust is not None and self.trust.sampling == "poisson":
            return poisson_sample_clients(list(self.clients), self.sample_fraction, seed)
        return sample_clients(list(self.clients), self.sample_fraction, seed)

    def _empty_round(self, rnd: int, state: dict[str, torch.Tensor], t0: float) -> dict[str, torch.Tensor]:
        """A Poisson draw of no client: the global stays, plus DP noise when DP is on."""
        log.warning("round %d: Poisson sampling chose no client", rnd)
        privacy = self.trust.privacy if self.trust is not None else None
        if privacy is not None:
            state, _ = noise_only(
                global_state=state,
                privacy=privacy,
                group_of=self.group_of,
                frozen_suffixes=self.strategy.frozen_suffixes,
                seed=derive_seed(self.seed, "dp-noise", "", rnd),
            )
        self._record(rnd, state, [], [], {}, {}, [], t0)
        return state

    def _record(self, rnd, state, accepted, dropped, bytes_up, bytes_down, events, t0) -> None:
        global_metrics = dict(self.evaluate(state, rnd)) if self.evaluate else {}
        trust = self.trust
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
            bytes_up=dict(bytes_up),
            bytes_down=dict(bytes_down),
            wall_time_s=time.perf_counter() - t0,
            defense=tuple(events),
            adversarial=tuple(sorted({u.client_id for u in accepted} & trust.adversaries)) if trust else (),
            epsilon=trust.epsilon_after(rnd) if trust else None,
        )
        if self.on_round:
            self.on_round(record, state)

    def run(self, initial_state: AdapterState, *, start_round: int = 1) -> dict[str, torch.Tensor]:
        state = dict(initial_state)
        for rnd in range(start_round, self.num_rounds + 1):
            t0 = time.perf_counter()
            chosen = self._sample(rnd)
            if not chosen:
                state = self._empty_round(rnd, state, t0)
                continue
            outcome = self.engine.run_round(rnd, chosen, state)
            accepted, dropped = [], list(outcome.dropped)
            for u in outcome.updates:
                try:
                    (self.secure.validate if self.secure is not None else validate_update)(u, state)
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
            defended, events = self._defend(rnd, state, accepted)
            aggregate = self.secure.aggregate if self.secure is not None else self.strategy.aggregate
            state = aggregate(global_state=state, updates=defended, group_of=self.group_of)
            self._record(rnd, state, accepted, dropped, outcome.bytes_up, outcome.bytes_down, events, t0)
        return state

    def _defend(
        self, rnd: int, state: AdapterState, accepted: list[ClientUpdate]
    ) -> tuple[list[ClientUpdate], list[DefenseEvent]]:
        """The configured defences over the validated updates (the strategy sees their output)."""
        if self.trust is None:
            return accepted, []
        out = defend(
            global_state=state,
            updates=accepted,
            spec=self.trust.defense,
            group_of=self.group_of,
            frozen_suffixes=self.strategy.frozen_suffixes,
            privacy=self.trust.privacy,
            seed=derive_seed(self.seed, "dp-noise", "", rnd),
        )
        for e in out.events:
            log.info("round %d: %s %s (%s): %s", rnd, e.action, e.client, e.group, e.reason)
        if not out.updates:
            raise EngineError(f"round {rnd}: the defences excluded every client update")
        return out.updates, out.events
