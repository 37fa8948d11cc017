"""The run directory: resolved config, metrics.jsonl, per-round checkpoint, adapter, plot, summary."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from fedumm.errors import CheckpointError, ConfigError, DataError
from fedumm.io import atomic_save_safetensors, atomic_write_json, atomic_write_text, read_safetensors
from fedumm.summary import RunSummary
from fedumm.types import AdapterState, RoundRecord, latest_per_round

__all__ = ["RunDir"]


class RunDir:
    """Owns every file of one run; each write is atomic or an fsync'd append."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- layout ----
    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    def create(self, config_yaml: str, *, resume: bool = False) -> None:
        """Create the directory; refuse to overwrite another run unless resuming."""
        if self.metrics.exists() and not resume:
            raise ConfigError(
                f"{self.path} already holds a run (metrics.jsonl); use --resume or another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", config_yaml)

    # ---- per round ----
    def append_round(self, record: RoundRecord) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(
        self,
        rnd: int,
        state: AdapterState,
        server_state: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Write round ``rnd``'s global adapter, strategy state and engine (client) state atomically."""
        d = self.checkpoint_dir
        atomic_save_safetensors(d / f"server-{rnd:04d}.safetensors", server_state, {"round": str(rnd)})
        atomic_save_safetensors(d / f"clients-{rnd:04d}.safetensors", client_state or {}, {"round": str(rnd)})
        # the adapter file last: its presence marks the round's checkpoint as complete
        atomic_save_safetensors(d / f"round-{rnd:04d}.safetensors", state, {"round": str(rnd)})
        atomic_write_json(d / "latest.json", {"round": rnd})
        for old in d.glob("*.safetensors"):  # keep the last two rounds
            try:
                r = int(old.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if r < rnd - 1:
                old.unlink(missing_ok=True)

    def load_checkpoint(
        self,
    ) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Latest good round: falls back to the previous round when the latest files are corrupt."""
        d = self.checkpoint_dir
        rounds = sorted(
            {
                int(p.stem.split("-")[1])
                for p in d.glob("round-*.safetensors")
                if p.stem.split("-")[1].isdigit()
            },
            reverse=True,
        )
        if not rounds:
            raise CheckpointError(f"{d}: no checkpoint to resume from")
        errors = []
        for rnd in rounds:
            try:
                state = read_safetensors(d / f"round-{rnd:04d}.safetensors")
                server = read_safetensors(d / f"server-{rnd:04d}.safetensors")
                clients = read_safetensors(d / f"clients-{rnd:04d}.safetensors")
                return rnd, state, server, clients
            except CheckpointError as exc:
                errors.append(str(exc))
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))

    # ---- final ----
    def save_peft_adapter(self, family, name: str = "global_adapter") -> Path:
        """Save the family's loaded adapter in peft's layout (PeftModel.from_pretrained reads it)."""
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        family.save_adapter(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def write_summary(self, summary: RunSummary) -> Path:
        return atomic_write_json(self.path / "summary.json", summary.to_json())

    def read_summary(self) -> RunSummary | None:
        """summary.json, or None when there is none yet."""
        path = self.path / "summary.json"
        if not path.is_file():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        try:
            return RunSummary.from_json(obj, source=str(path))
        except DataError as exc:
            raise CheckpointError(str(exc)) from None

    def truncate_rounds(self, last_round: int) -> None:
        """Keep metrics.jsonl lines of rounds <= last_round (drops rounds whose checkpoint is unusable)."""
        keep = [r for r in self.read_rounds() if r.get("round", 0) <= last_round]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    def read_rounds(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: the rounds before it stand
        return latest_per_round(out)
