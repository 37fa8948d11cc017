"""The shared trainer: one process that holds one frozen backbone and trains every site of this machine.

FLARE runs one process per site (its simulator starts a worker per client, POC a client per site).
When each of them loads the backbone, memory grows by a Python with torch, transformers, peft and
a model copy per site. With ``nvflare.shared_backbone`` (simulator and local POC runs), fedumm's
runner starts this process once instead: it loads the backbone and the training splits once, and
each site's FLARE process only relays (:mod:`fedumm.engines.nvflare.relay`, no torch imported),
so a site costs FLARE's own process. Sites train one after another on the shared backbone,
in the process's main thread, swapping adapters as the in-process engine does, through the same
:class:`fedumm.engines.nvflare.client.SiteRounds` a site process with its own backbone runs.

The socket is a Unix socket with an authentication key (both from the launcher's environment);
messages are a JSON header and one safetensors payload, never pickle:

- the relay, once: ``{"site": name}``; the trainer builds that site (its data on the shared backbone)
  and answers ``{"ok": true}`` or ``{"ok": false, "error": ...}`` (the site then reports the error
  with every task, as a site process that cannot load does);
- per task: ``{"round": r, "meta": {...}, "kind": "packed" | "arrays"}`` and the payload (packed:
  the server's payload unread; arrays: the numpy arrays FLARE's HE filter decrypted); the reply is
  ``{"params_type": "FULL" | "DIFF", "meta": ..., "metrics": ..., "kind": ...}`` and its payload.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, wait

from fedumm.engines.nvflare.names import ENV_TRAINER_KEY, FORWARDED_META
from fedumm.engines.nvflare.relay import recv_json, send_json

log = logging.getLogger(__name__)

__all__ = ["TrainerServer", "decode_payload", "encode_payload", "main"]


def encode_payload(params: dict) -> tuple[str, bytes]:
    """A reply's params as one safetensors payload: ("packed", torch tensors) or ("arrays", numpy)."""
    import numpy as np

    if params and all(isinstance(v, np.ndarray) for v in params.values()):
        from safetensors.numpy import save as save_np

        return "arrays", save_np({k: np.ascontiguousarray(v) for k, v in params.items()})
    from safetensors.torch import save

    return "packed", save({k: v.detach().cpu().contiguous() for k, v in params.items()})


def decode_payload(kind: str, blob: bytes) -> dict:
    """A task's params: torch tensors from a packed payload, numpy arrays from an arrays one."""
    if kind == "packed":
        from safetensors.torch import load

        return load(blob)
    if kind == "arrays":
        from safetensors.numpy import load as load_np

        return load_np(blob)
    raise ValueError(f"unknown payload kind {kind!r}")


class TrainerServer:
    """The relays' sessions, served one message at a time from one thread (the one that computes:
    torch runs in the thread that set its thread count, and no lock is needed around the backbone).

    ``rounds``: the :class:`~fedumm.engines.nvflare.client.SiteRounds` of this process;
    ``build(name)`` builds a site on the shared backbone.
    """

    def __init__(self, rounds, build) -> None:
        self.rounds = rounds
        self.build = build
        self.names: dict[int, str] = {}  # id(connection) -> the site it speaks for

    def handle(self, conn: Connection) -> bool:
        """Read and answer one message of ``conn``; False once the session is over (closed)."""
        name = self.names.get(id(conn))
        try:
            if name is None:
                self._hello(conn)
            else:
                self._task(conn, name)
            return True
        except EOFError:
            log.info("%s: disconnected", name or "a relay")
        except Exception:
            log.exception("%s: relay session failed", name or "a relay")
        self.names.pop(id(conn), None)
        conn.close()
        return False

    def _hello(self, conn: Connection) -> None:
        name = str(recv_json(conn).get("site", ""))
        if not name:
            raise ValueError("the first message must name the site")
        rounds = self.rounds
        if name not in rounds.sites and name not in rounds.errors:
            rounds.add(name, lambda: self.build(name))
        error = rounds.errors.get(name)
        send_json(conn, {"ok": error is None, "error": error})
        self.names[id(conn)] = name
        log.info("%s: connected%s", name, f" ({error})" if error else "")

    def _task(self, conn: Connection, name: str) -> None:
        header = recv_json(conn)
        blob = conn.recv_bytes()
        rnd = int(header["round"])
        meta = {k: v for k, v in dict(header.get("meta") or {}).items() if k in FORWARDED_META}
        try:
            params = decode_payload(str(header.get("kind")), blob)
        except Exception as exc:  # a broadcast that does not decode loses this round, not the site
            reply = self.rounds.error_reply(f"round {rnd}: the broadcast does not decode ({exc})")
        else:
            reply = self.rounds.round(name, rnd, params, meta)
        kind, out = encode_payload(reply.params)
        head = {"params_type": reply.params_type, "meta": reply.meta, "metrics": reply.metrics}
        send_json(conn, {**head, "kind": kind})
        conn.send_bytes(out)

    def serve(self, listener: Listener) -> None:
        """Forever: accept relays (a helper thread does the handshake-free accepting) and answer
        whichever has a message waiting, in this thread."""
        accepted: queue.Queue[Connection] = queue.Queue()

        def accept() -> None:
            while True:
                try:
                    accepted.put(listener.accept())
                except (OSError, EOFError, AuthenticationError) as exc:  # no key, or hung up
                    log.warning("refused a connection: %s", exc)

        threading.Thread(target=accept, name="accept", daemon=True).start()
        conns: list[Connection] = []
        while True:
            while not accepted.empty():
                conns.append(accepted.get_nowait())
            for conn in wait(conns, timeout=0.2) if conns else []:
                if not self.handle(conn):  # type: ignore[arg-type]
                    conns.remove(conn)  # type: ignore[arg-type]
            if not conns:
                time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> None:
    from fedumm.client.site import build_family, build_site, load_data
    from fedumm.engines.nvflare.client import ENV_TORCH_THREADS, SiteRounds, load_site_config

    ap = argparse.ArgumentParser(description="fedumm shared trainer for the FLARE sites of this machine")
    ap.add_argument("--config", required=True, help="the run's resolved config")
    ap.add_argument("--partition", required=True, help="the run's partition.json")
    ap.add_argument("--address", required=True, help="Unix socket to listen on")
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    key = bytes.fromhex(os.environ[ENV_TRAINER_KEY])
    threads = os.environ.get(ENV_TORCH_THREADS)
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    cfg = load_site_config(args.config)  # with this machine's site overrides, as a site process has them
    run_data = load_data(cfg, eval_splits=False)
    family, _ = build_family(cfg)  # the one backbone of this machine, LoRA attached

    def build(name: str):
        return build_site(cfg, name, partition_path=args.partition, family=family, run_data=run_data)

    listener = Listener(args.address, family="AF_UNIX", authkey=key)
    log.info("shared trainer listening on %s", args.address)
    TrainerServer(SiteRounds(cfg), build).serve(listener)


if __name__ == "__main__":
    main()
