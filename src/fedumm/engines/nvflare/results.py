"""The results folder the FLARE server writes and the launching process reads (no FLARE imports).

Layout (every file is written atomically; a round counts once its JSON exists):

- ``started.json``: the clients the server federates over
- ``round-NNNN.safetensors``: the global adapter after round N, then ``round-NNNN.json``: its
  RoundRecord as JSON (global metrics empty: the server has no backbone to evaluate with)
- ``server-NNNN.safetensors``: the strategy's server state after round N
- ``done.json`` when the last round is written, or ``error.json`` when the server loop failed
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedumm.errors import EngineError
from fedumm.io import atomic_save_safetensors, atomic_write_json, read_safetensors
from fedumm.types import AdapterState, DefenseEvent, RoundRecord

__all__ = ["ResultsWriter", "ResultsReader", "ServerRound", "record_from_json"]


def _round_name(rnd: int, suffix: str, prefix: str = "round") -> str:
    return f"{prefix}-{rnd:04d}.{suffix}"


class ResultsWriter:
    """Server side: one call per event."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def started(self, clients: Sequence[str], **extra: object) -> None:
        atomic_write_json(self.path / "started.json", {"clients": list(clients), **extra})

    def round(
        self, record: RoundRecord, state: AdapterState, server_state: Mapping[str, torch.Tensor]
    ) -> None:
        meta = {"round": str(record.round)}
        atomic_save_safetensors(self.path / _round_name(record.round, "safetensors"), state, meta)
        atomic_save_safetensors(
            self.path / _round_name(record.round, "safetensors", "server"), server_state, meta
        )
        atomic_write_json(self.path / _round_name(record.round, "json"), record.to_json())

    def done(self, rounds: int) -> None:
        atomic_write_json(self.path / "done.json", {"rounds": rounds})

    def error(self, exc: BaseException) -> None:
        atomic_write_json(self.path / "error.json", {"type": type(exc).__name__, "message": str(exc)})


@dataclass(frozen=True)
class ServerRound:
    """One round as the server wrote it."""

    record: dict
    state: dict[str, torch.Tensor]
    server_state: dict[str, torch.Tensor]


def record_from_json(
    d: Mapping,
    *,
    global_metrics: Mapping[str, float],
    extra_wall_s: float = 0.0,
    wall_time_s: float | None = None,
) -> RoundRecord:
    """Rebuild the RoundRecord the server wrote, with the launcher's global metrics filled in.

    Its wall time is ``wall_time_s`` where given (the launcher's own clock), else the server's
    round time plus ``extra_wall_s``."""
    return RoundRecord(
        round=int(d["round"]),
        clients=tuple(d["clients"]),
        dropped=tuple(d.get("dropped", ())),
        global_metrics=dict(global_metrics),
        client_metrics={k: dict(v) for k, v in d["client_metrics"].items()},
        bytes_up={k: int(v) for k, v in d["bytes_up"].items()},
        bytes_down={k: int(v) for k, v in d["bytes_down"].items()},
        wall_time_s=float(d["wall_time_s"]) + extra_wall_s if wall_time_s is None else float(wall_time_s),
        defense=tuple(DefenseEvent.from_json(e) for e in d.get("defense", ())),
        adversarial=tuple(d.get("adversarial", ())),
        epsilon=None if d.get("epsilon") is None else float(d["epsilon"]),
    )


class ResultsReader:
    """Launcher side: polls the folder the server writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def started(self) -> dict | None:
        return self._json("started.json")

    def done(self) -> dict | None:
        return self._json("done.json")

    def error(self) -> dict | None:
        return self._json("error.json")

    def next_round(self, rnd: int) -> ServerRound | None:
        """Round ``rnd`` once the server finished writing it, else None."""
        record = self._json(_round_name(rnd, "json"))
        if record is None:
            return None
        try:
            state = read_safetensors(self.path / _round_name(rnd, "safetensors"))
            server = read_safetensors(self.path / _round_name(rnd, "safetensors", "server"))
        except Exception as exc:
            raise EngineError(f"{self.path}: round {rnd}'s files are unreadable ({exc})") from None
        return ServerRound(record=record, state=dict(sorted(state.items())), server_state=server)

    def _json(self, name: str) -> dict | None:
        p = self.path / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"{p}: unreadable ({exc})") from None
