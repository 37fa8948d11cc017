"""In-process engine: one frozen backbone shared by every simulated client, adapters swapped per client.

Memory grows with the number of clients only by their adapter states within a round (the backbone,
its activations and one AdamW state exist once at a time). Every exchange is serialised exactly as it
would be on a network, so the ledger's bytes are those of real payloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from fedumm.client.adversary import run_site_round
from fedumm.client.site import Site
from fedumm.client.train import num_steps
from fedumm.engines.base import ENGINES, FederationSetup
from fedumm.errors import InvalidUpdate
from fedumm.fl.compress import apply_delta, decode, delta_of, encode
from fedumm.fl.residuals import ResidualStore, compressed_delta
from fedumm.progress import NullProgress, Progress
from fedumm.server.rounds import RoundLoop, RoundOutcome
from fedumm.server.trust import trust_settings
from fedumm.types import AdapterState
from fedumm.wire import pack_state, pack_update, unpack_state, unpack_update

__all__ = ["InProcessEngine", "run_inprocess"]


class InProcessEngine:
    """Runs each selected client's round sequentially on the shared backbone."""

    def __init__(
        self,
        *,
        sites: Mapping[str, Site],
        seed: int,
        progress: Progress | None = None,
        proximal_mu: float = 0.0,
        frozen_suffixes: tuple[str, ...] = (),
        codec: str = "none",
        download_codec: str = "none",
        error_feedback: bool = True,
        residuals: ResidualStore | None = None,
    ) -> None:
        self.codec = codec
        self.download_codec = download_codec
        self.error_feedback = error_feedback
        # client-side error-feedback memory: bounded in memory, on disk under a run directory
        self.residuals = residuals if residuals is not None else ResidualStore()
        self.proximal_mu = proximal_mu
        self.frozen_suffixes = tuple(frozen_suffixes)
        self.sites = sites
        self.seed = seed
        self.progress = progress or NullProgress()

    def run_round(self, rnd: int, clients: Sequence[str], global_state: AdapterState) -> RoundOutcome:
        if self.download_codec == "none":
            down = pack_state(global_state, {"round": str(rnd)})
            sent = global_state
        else:
            # the broadcast in half precision; every client starts from what it decodes, and the
            # server takes each client's change relative to that, so the rounding does not accumulate
            half, _ = encode(global_state, self.download_codec)
            down = pack_state(half, {"round": str(rnd), "codec": self.download_codec})
            sent = decode(half, self.download_codec, sender="server")
        updates, up_bytes, down_bytes = [], {}, {}
        self.progress.start("clients", f"round {rnd}: clients", len(clients))
        for i, cid in enumerate(clients):
            received, meta = unpack_state(down, sender="server")
            if meta.get("codec", "none") != "none":
                received = decode(received, meta["codec"], sender="server")
            down_bytes[cid] = len(down)
            site = self.sites[cid]
            steps = num_steps(len(site.data.train), site.spec, len(site.data.gen_train))
            self.progress.start("steps", f"{cid} local steps", steps)
            update = run_site_round(
                site.family,
                adversary=site.adversary,
                client_id=cid,
                global_state=received,
                data=site.data,
                spec=site.spec,
                base_seed=self.seed,
                rnd=rnd,
                progress=lambda done, total: self.progress.update("steps", done),
                proximal_mu=self.proximal_mu,
                frozen_suffixes=self.frozen_suffixes,
            )
            self.progress.finish("steps")
            if self.codec != "none":
                # the client sends its compressed delta; the server decodes it onto the global state
                residuals = self.residuals if self.error_feedback else None
                tensors = compressed_delta(
                    update.state, received, self.codec, client=cid, rnd=rnd, residuals=residuals
                )
                update = replace(update, state=tensors)
            payload = pack_update(update, codec=self.codec)
            up_bytes[cid] = len(payload)
            arrived = unpack_update(payload, sender=cid)
            if arrived.codec != "none":
                state = apply_delta(global_state, decode(arrived.state, arrived.codec, sender=cid))
                arrived = replace(arrived, state=state)
            elif sent is not global_state:  # a full state trained from the half-precision broadcast
                arrived = replace(arrived, state=_rebased(arrived.state, sent, global_state))
            updates.append(arrived)
            self.progress.update("clients", i + 1)
        self.progress.finish("clients")
        return RoundOutcome(updates=updates, bytes_up=up_bytes, bytes_down=down_bytes)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Client-side state for the round's checkpoint file: none, the residuals keep their own files."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], *, done: int = 0) -> None:
        """Resume after round ``done``: residuals written later are dropped; ``state`` is the flat
        ``<client>/<key>`` map that checkpoints held before residuals had their own files."""
        self.residuals.rewind(done)
        legacy: dict[str, dict[str, torch.Tensor]] = {}
        for flat, t in state.items():
            cid, _, key = flat.partition("/")
            legacy.setdefault(cid, {})[key] = t
        for cid, residual in sorted(legacy.items()):
            self.residuals.put(cid, done, residual)


def _rebased(state: AdapterState, sent: AdapterState, global_state: AdapterState) -> AdapterState:
    """global + (state - sent): a client's change onto the full-precision global. A state whose keys
    or shapes do not match is left as it came, for the round's checks to reject naming its sender."""
    try:
        return apply_delta(global_state, delta_of(state, sent))
    except (ValueError, InvalidUpdate):
        return state


@ENGINES.register("inprocess")
def run_inprocess(setup: FederationSetup) -> AdapterState:
    """Every site in this process, on the one backbone they share (the default engine)."""
    fed = setup.cfg.federation
    engine = InProcessEngine(
        sites=setup.sites,
        seed=setup.cfg.seed,
        progress=setup.progress,
        proximal_mu=setup.strategy.proximal_mu,
        frozen_suffixes=setup.strategy.frozen_suffixes,
        codec=fed.compression,
        download_codec=fed.download_compression,
        error_feedback=fed.error_feedback,
        residuals=ResidualStore(
            setup.run.checkpoint_dir / "clients",
            dtype=fed.residual_dtype,
            cache_bytes=int(fed.residual_cache_mib * 2**20),
        ),
    )
    engine.load_state_dict(setup.client_state, done=setup.start_round - 1)
    on_round = setup.on_round

    def record(rec, state) -> None:
        if on_round is not None:
            on_round(rec, state, engine.state_dict())

    loop = RoundLoop(
        engine=engine,
        strategy=setup.strategy,
        clients=list(setup.sites),
        num_rounds=fed.rounds,
        seed=setup.cfg.seed,
        sample_fraction=fed.sample_fraction,
        min_clients=fed.min_clients,
        group_of=setup.group_of,
        evaluate=setup.evaluate,
        on_round=record,
        trust=trust_settings(setup.cfg),
    )
    return loop.run(setup.start_state, start_round=setup.start_round)
