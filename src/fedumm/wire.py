"""What crosses the wire: adapter states and client updates as safetensors payloads (no pickle).

The communication ledger counts ``len()`` of these payloads: the bytes actually serialised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedumm.errors import InvalidUpdate
from fedumm.types import AdapterState, ClientUpdate

__all__ = ["pack_state", "unpack_state", "pack_update", "unpack_update", "WireUpdate"]


def pack_state(state: AdapterState, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise a state (sorted keys, contiguous CPU tensors) with optional string metadata."""
    return save(
        {k: state[k].detach().cpu().contiguous() for k in sorted(state)}, metadata=dict(metadata or {})
    )


def unpack_state(payload: bytes, *, sender: str = "peer") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a payload; anything malformed is one InvalidUpdate naming the sender."""
    if not isinstance(payload, bytes | bytearray):
        raise InvalidUpdate(f"{sender}: payload must be bytes, got {type(payload).__name__}")
    try:
        tensors = load(bytes(payload))
        n = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + n])
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidUpdate(f"{sender}: payload is not valid safetensors ({exc})") from None
    meta = header.get("__metadata__", {}) or {}
    return dict(sorted(tensors.items())), dict(meta)


def pack_update(update: ClientUpdate, *, codec: str = "none") -> bytes:
    """Serialise a client update: tensors plus JSON metadata (id, example counts, metrics, codec)."""
    meta = {
        "codec": codec,
        "client_id": update.client_id,
        "num_examples": json.dumps(update.num_examples),
        "metrics": json.dumps(dict(update.metrics)),
        "group_examples": json.dumps(
            dict(update.group_examples) if update.group_examples is not None else None
        ),
    }
    return pack_state(update.state, meta)


@dataclass(frozen=True, kw_only=True)
class WireUpdate(ClientUpdate):
    """A ClientUpdate as it arrived: ``state`` holds a compressed delta unless ``codec`` is "none"."""

    codec: str = "none"


def unpack_update(payload: bytes, *, sender: str) -> WireUpdate:
    """Parse an update payload; a missing example count is rejected, never defaulted."""
    state, meta = unpack_state(payload, sender=sender)
    for key in ("client_id", "num_examples", "metrics"):
        if key not in meta:
            raise InvalidUpdate(f"{sender}: update metadata lacks {key!r}")
    try:
        num_examples = json.loads(meta["num_examples"])
        metrics = json.loads(meta["metrics"])
        group_examples = json.loads(meta.get("group_examples", "null"))
    except json.JSONDecodeError as exc:
        raise InvalidUpdate(f"{sender}: update metadata is not valid JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise InvalidUpdate(f"{sender}: metrics must be an object, got {type(metrics).__name__}")
    if group_examples is not None and not isinstance(group_examples, dict):
        raise InvalidUpdate(f"{sender}: group_examples must be an object or null")
    return WireUpdate(
        codec=meta.get("codec", "none"),
        client_id=meta["client_id"],
        state=state,
        num_examples=num_examples,
        metrics=metrics,
        group_examples=group_examples,
    )
