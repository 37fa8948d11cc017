"""In-process engine: one frozen backbone shared by every simulated client, adapters swapped per client.

Memory grows with the number of clients only by their adapter states within a round (the backbone,
its activations and one AdamW state exist once at a time). Every exchange is serialised exactly as it
would be on a network, so the ledger's bytes are those of real payloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedumm.client.train import TrainSpec, num_steps, run_client_round
from fedumm.progress import NullProgress, Progress
from fedumm.server.rounds import RoundOutcome
from fedumm.types import AdapterState
from fedumm.wire import pack_state, pack_update, unpack_state, unpack_update

__all__ = ["InProcessEngine"]


class InProcessEngine:
    """Runs each selected client's round sequentially on the shared backbone."""

    def __init__(
        self,
        *,
        family,
        client_data: Mapping[str, tuple[Sequence, Sequence]],  # name -> (train samples, local val samples)
        spec: TrainSpec,
        seed: int,
        progress: Progress | None = None,
        proximal_mu: float = 0.0,
        frozen_suffixes: tuple[str, ...] = (),
    ) -> None:
        self.proximal_mu = proximal_mu
        self.frozen_suffixes = tuple(frozen_suffixes)
        self.family = family
        self.client_data = client_data
        self.spec = spec
        self.seed = seed
        self.progress = progress or NullProgress()

    def run_round(self, rnd: int, clients: Sequence[str], global_state: AdapterState) -> RoundOutcome:
        down = pack_state(global_state, {"round": str(rnd)})
        updates, up_bytes, down_bytes = [], {}, {}
        self.progress.start("clients", f"round {rnd}: clients", len(clients))
        for i, cid in enumerate(clients):
            received, _ = unpack_state(down, sender="server")
            down_bytes[cid] = len(down)
            train, val = self.client_data[cid]
            self.progress.start("steps", f"{cid} local steps", num_steps(len(train), self.spec))
            update = run_client_round(
                self.family,
                client_id=cid,
                global_state=received,
                train_samples=train,
                val_samples=val,
                spec=self.spec,
                base_seed=self.seed,
                rnd=rnd,
                progress=lambda done, total: self.progress.update("steps", done),
                proximal_mu=self.proximal_mu,
                frozen_suffixes=self.frozen_suffixes,
            )
            self.progress.finish("steps")
            payload = pack_update(update)
            up_bytes[cid] = len(payload)
            updates.append(unpack_update(payload, sender=cid))
            self.progress.update("clients", i + 1)
        self.progress.finish("clients")
        return RoundOutcome(updates=updates, bytes_up=up_bytes, bytes_down=down_bytes)
