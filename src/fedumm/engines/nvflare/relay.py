"""A site process that relays its tasks to the shared trainer (:mod:`fedumm.engines.nvflare.trainer`).

Run by the job's client script when the environment names a trainer (``FEDUMM_TRAINER_ADDRESS``;
fedumm's simulator and local POC runs set it with ``nvflare.shared_backbone``). It imports FLARE's
Client API, numpy and safetensors' numpy half only: no torch, no model, so a site costs what FLARE's
own process costs. Per task it passes the broadcast on unread (a packed payload) or, under HE, the
arrays FLARE's filter decrypted, and sends back what the trainer answers. A trainer that is gone
turns every later task into an error reply naming it, so the server drops this site with a reason.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from multiprocessing.connection import Client, Connection

from fedumm.engines.nvflare.names import (
    ENV_TRAINER_ADDRESS,
    ENV_TRAINER_KEY,
    ENV_TRAINER_TIMEOUT,
    ERROR_KEY,
    FORWARDED_META,
    MAX_HEADER,
    PACKED_KEY,
    PACKED_META,
)

log = logging.getLogger(__name__)

__all__ = ["connect", "forward", "main", "recv_json", "send_json"]


def send_json(conn: Connection, obj: dict) -> None:
    """One header of the trainer's socket protocol (both ends use these two)."""
    conn.send_bytes(json.dumps(obj).encode("utf-8"))


def recv_json(conn: Connection) -> dict:
    """The next header: a JSON object of at most MAX_HEADER bytes, or ValueError."""
    obj = json.loads(conn.recv_bytes(MAX_HEADER).decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("a header must be a JSON object")
    return obj


def connect(address: str, key: bytes, timeout: float) -> Connection:
    """Connect to the trainer, retrying while it starts (it loads the backbone first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, family="AF_UNIX", authkey=key)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"the shared trainer did not listen on {address} within {timeout:.0f} s"
                ) from None
            time.sleep(0.2)


def forward(conn: Connection, rnd: int, params: dict, meta: dict) -> tuple[str, dict, dict, dict]:
    """One task through the trainer: (params type, params, meta, metrics) of the reply."""
    import numpy as np
    from safetensors.numpy import load, save

    if meta.get(PACKED_META):
        blob = params.get(PACKED_KEY) if isinstance(params, dict) else None
        if not isinstance(blob, np.ndarray):
            raise ValueError(f"a packed broadcast without its {PACKED_KEY!r} array")
        kind, payload = "packed", blob.tobytes()
    else:  # under HE: the arrays FLARE's decryptor left
        kind, payload = "arrays", save({k: np.ascontiguousarray(v) for k, v in params.items()})
    header = {"round": rnd, "meta": {k: meta[k] for k in FORWARDED_META if k in meta}, "kind": kind}
    send_json(conn, header)
    conn.send_bytes(payload)
    reply = recv_json(conn)
    blob = conn.recv_bytes()
    out_meta = dict(reply.get("meta") or {})
    if reply.get("kind") == "packed":
        out = {PACKED_KEY: np.frombuffer(blob, dtype=np.uint8)} if out_meta.get(ERROR_KEY) is None else {}
        if out:
            out_meta[PACKED_META] = 1
    else:
        out = load(blob)
    return str(reply.get("params_type", "FULL")), out, out_meta, dict(reply.get("metrics") or {})


def main(argv: Sequence[str] | None = None) -> None:
    """Relay loop: receive a task from FLARE, have the trainer run it, send its reply."""
    try:
        import nvflare.client as flare
        from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise SystemExit(f"the fedumm relay needs NVIDIA FLARE ({exc})") from None

    del argv  # the trainer has the config and the partition; the relay needs neither
    address = os.environ[ENV_TRAINER_ADDRESS]
    key = bytes.fromhex(os.environ.get(ENV_TRAINER_KEY, ""))
    timeout = float(os.environ.get(ENV_TRAINER_TIMEOUT, "180"))
    flare.init()
    site = flare.get_site_name()
    conn: Connection | None = None
    gone: str | None = None
    try:
        conn = connect(address, key, timeout)
        send_json(conn, {"site": site})
        hello = recv_json(conn)
        why = "" if hello.get("ok") else f" ({hello.get('error')})"
        log.info("%s: relaying to the shared trainer%s", site, why)
    except Exception as exc:
        gone = f"{site}: no shared trainer at {address}: {type(exc).__name__}: {exc}"
        log.error(gone)
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        rnd = int(received.current_round)
        if gone is None and conn is not None:
            try:
                ptype, params, meta, metrics = forward(
                    conn, rnd, received.params or {}, dict(received.meta or {})
                )
            except (EOFError, OSError) as exc:
                gone = f"{site}: the shared trainer is gone ({type(exc).__name__}: {exc})"
                log.error(gone)
            except Exception as exc:  # this round is lost for this site
                log.exception("%s: round %d could not be relayed", site, rnd)
                ptype, params, meta, metrics = "FULL", {}, {ERROR_KEY: f"round {rnd}: {exc}"}, {}
        if gone is not None:
            ptype, params, meta, metrics = "FULL", {}, {ERROR_KEY: gone}, {}
        flare.send(
            FLModel(
                params_type=ParamsType.DIFF if ptype == "DIFF" else ParamsType.FULL,
                params=params,
                meta=meta,
                metrics=metrics,
                current_round=rnd,
            )
        )
    if conn is not None:
        conn.close()
