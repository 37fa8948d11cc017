"""Frozen dataclasses that cross layer boundaries: adapter states, client updates, round records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedumm.errors import DataError, InvalidUpdate

__all__ = [
    "AdapterState",
    "ClientUpdate",
    "DefenseEvent",
    "RoundRecord",
    "latest_per_round",
    "validate_update",
]

#: Canonical adapter state: adapter-name-free peft keys -> CPU tensors, never sharing storage
#: with live parameters. Built by :func:`fedumm.models.lora_state.get_adapter_state`.
AdapterState = Mapping[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class ClientUpdate:
    """What one client sends back after a round of local training."""

    client_id: str
    state: AdapterState  # the client's full local adapter after training
    num_examples: int  # examples seen per epoch; the FedAvg weight
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. train_loss, val_score
    # Examples that trained each adapter group (per-modality aggregation). None: every group.
    group_examples: Mapping[str, int] | None = None


@dataclass(frozen=True, kw_only=True)
class DefenseEvent:
    """One thing a server defence did to one client's update in one adapter group."""

    client: str
    group: str
    action: str  # down_weighted | clipped | excluded | trimmed | skipped
    reason: str
    value: float | None = None  # the measured quantity (count, norm, score, share trimmed)

    def to_json(self) -> dict:
        out = {"client": self.client, "group": self.group, "action": self.action, "reason": self.reason}
        if self.value is not None:
            out["value"] = self.value
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> DefenseEvent:
        value = d.get("value")
        return cls(
            client=str(d["client"]),
            group=str(d["group"]),
            action=str(d["action"]),
            reason=str(d["reason"]),
            value=None if value is None else float(value),
        )


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """One finished round as written to metrics.jsonl."""

    round: int
    clients: tuple[str, ...]
    global_metrics: Mapping[str, float]
    client_metrics: Mapping[str, Mapping[str, float]]
    bytes_up: Mapping[str, int]
    bytes_down: Mapping[str, int]
    wall_time_s: float
    dropped: tuple[str, ...] = ()
    defense: tuple[DefenseEvent, ...] = ()  # what the server's defences did this round
    adversarial: tuple[str, ...] = ()  # simulated attackers among this round's clients
    epsilon: float | None = None  # client-level DP: epsilon after this round at privacy.delta

    def to_json(self) -> dict:
        trust: dict = {}
        if self.defense:
            trust["defense"] = [e.to_json() for e in self.defense]
        if self.adversarial:
            trust["adversarial"] = list(self.adversarial)
        if self.epsilon is not None:
            trust["epsilon"] = self.epsilon
        out = {
            "round": self.round,
            "clients": list(self.clients),
            "dropped": list(self.dropped),
            "global": dict(self.global_metrics),
            "client_metrics": {k: dict(v) for k, v in self.client_metrics.items()},
            "bytes_up": dict(self.bytes_up),
            "bytes_down": dict(self.bytes_down),
            "bytes_up_total": sum(self.bytes_up.values()),
            "bytes_down_total": sum(self.bytes_down.values()),
            "wall_time_s": self.wall_time_s,
        }
        return out | trust


def latest_per_round(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows in round order, one per round: where a round was written twice (a run
    that started over, or two processes writing one directory), the later line stands."""
    latest: dict[int, dict] = {}
    for row in rows:
        number = row.get("round") if isinstance(row, dict) else None
        if not isinstance(number, int) or isinstance(number, bool):
            raise DataError(f"a metrics row without an integer 'round': {str(row)[:80]}")
        latest[number] = row
    return [latest[r] for r in sorted(latest)]


def validate_update(update: ClientUpdate, reference: AdapterState) -> None:
    """Reject an update whose count, keys, shapes, dtypes or values cannot be aggregated."""
    cid = update.client_id
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InvalidUpdate(f"client {cid!r}: num_examples must be an int > 0, got {n!r}")
    keys, ref_keys = set(update.state), set(reference)
    if keys != ref_keys:
        missing = sorted(ref_keys - keys)[:3]
        extra = sorted(keys - ref_keys)[:3]
        raise InvalidUpdate(f"client {cid!r}: adapter keys differ (missing {missing}, unexpected {extra})")
    for key, ref in reference.items():
        t = update.state[key]
        if not isinstance(t, torch.Tensor):
            raise InvalidUpdate(f"client {cid!r}: {key} is {type(t).__name__}, not a tensor")
        if t.shape != ref.shape:
            raise InvalidUpdate(
                f"client {cid!r}: {key} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        if not t.is_floating_point() or t.dtype != ref.dtype:
            # a client must not change the global adapter's precision (the mean takes its dtype)
            raise InvalidUpdate(f"client {cid!r}: {key} has dtype {t.dtype}, expected {ref.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise InvalidUpdate(f"client {cid!r}: {key} contains NaN or Inf")
    for name, value in update.metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidUpdate(f"client {cid!r}: metric {name!r} must be a finite number, got {value!r}")
    if update.group_examples is not None:
        for g, gn in update.group_examples.items():
            if isinstance(gn, bool) or not isinstance(gn, int) or gn < 0:
                raise InvalidUpdate(f"client {cid!r}: group_examples[{g!r}] must be an int >= 0, got {gn!r}")
