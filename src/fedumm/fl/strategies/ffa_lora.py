"""FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", arXiv:2403.12313).

Every client keeps LoRA's A at the shared initial value (A is frozen: only the zero-initialised B is
trained), so the server averages B and keeps A from the global state. EXACT for B·A: with one common A,
sum_k w_k B_k A = (sum_k w_k B_k) A. An update whose A differs from the global A at all is rejected,
naming the client. Keys that are neither A nor B are averaged as FedAvg does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.aggregate import weighted_mean
from fedumm.fl.strategies.base import STRATEGIES, Strategy, group_weight_base
from fedumm.types import AdapterState, ClientUpdate

#: Canonical key endings of the frozen factor (peft Linear and Embedding LoRA).
FROZEN_SUFFIXES = ("lora_A.weight", "lora_embedding_A")


@STRATEGIES.register("ffa_lora")
class FFALoRA(Strategy):
    """w_k proportional to n_k for B; A is frozen on clients and kept from the global state."""

    name = "ffa_lora"
    frozen_suffixes: tuple[str, ...] = FROZEN_SUFFIXES

    def __init__(self) -> None:
        pass

    def client_weights(self, updates: Sequence[ClientUpdate], group: str) -> list[float]:
        return [float(group_weight_base(u, group)) for u in updates]

    def is_frozen(self, key: str) -> bool:
        """True for a key the clients must not train (LoRA's A)."""
        return key.endswith(self.frozen_suffixes)

    def check_frozen(self, global_state: AdapterState, update: ClientUpdate) -> None:
        """Raise InvalidUpdate naming the client if any frozen tensor differs from the global one."""
        for key in sorted(k for k in global_state if self.is_frozen(k)):
            ref = global_state[key]
            got = update.state.get(key)
            if got is None or tuple(got.shape) != tuple(ref.shape):
                raise InvalidUpdate(
                    f"ffa_lora: client {update.client_id!r} lacks frozen {key} of shape {tuple(ref.shape)}"
                )
            diff = float(
                (got.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)).abs().max()
            )
            if diff != 0.0:
                raise InvalidUpdate(
                    f"ffa_lora: client {update.client_id!r} changed frozen {key} "
                    f"(max |A - A_global| = {diff:.3g}); clients must train with lora_A frozen"
                )

    def aggregate(
        self,
        *,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        group_of: Callable[[str], str] | None = None,
    ) -> dict[str, torch.Tensor]:
        for u in updates:
            self.check_frozen(global_state, u)
        return super().aggregate(global_state=global_state, updates=updates, group_of=group_of)

    def combine(
        self,
        global_part: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        trained = [k for k in sorted(global_part) if not self.is_frozen(k)]
        out = weighted_mean([{k: s[k] for k in trained} for s in states], weights) if trained else {}
        for k in global_part:
            if self.is_frozen(k):
                out[k] = global_part[k].detach().clone()
        return {k: out[k] for k in sorted(out)}
