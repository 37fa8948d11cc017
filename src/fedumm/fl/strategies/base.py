"""Strategy base: per-group weighting and explicit server state; subclasses supply the maths."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.aggregate import DEFAULT_GROUP, split_by_group, weighted_mean
from fedumm.registry import Registry
from fedumm.types import AdapterState, ClientUpdate

__all__ = ["Strategy", "STRATEGIES", "group_weight_base"]

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def group_weight_base(update: ClientUpdate, group: str) -> int:
    """Examples that trained ``group`` on this client (all of them when the client did not say)."""
    if update.group_examples is None or group == DEFAULT_GROUP:
        return update.num_examples
    return int(update.group_examples.get(group, 0))


class Strategy:
    """Aggregates client adapter states into the next global state.

    A strategy holds hyperparameters and explicit server state; it never samples, sends or prints.
    Each adapter group (per-modality adapters) is aggregated separately over the clients that trained
    it; a group no client trained keeps its global value.
    """

    name = "base"
    #: how the contract tests check identical clients: "factors", "product" (B·A) or "global"
    fixed_point = "factors"
    #: adapter key endings that clients must not train (FFA-LoRA freezes A)
    frozen_suffixes: tuple[str, ...] = ()
    #: FedProx proximal coefficient the client training applies (0 = none)
    proximal_mu = 0.0

    def client_weights(self, updates: Sequence[ClientUpdate], group: str) -> list[float]:
        """Unnormalised aggregation weight of each update for ``group``."""
        raise NotImplementedError

    def combine(
        self,
        global_part: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        """Combine the group's client tensors; default: weighted mean."""
        return weighted_mean(states, weights)

    def aggregate(
        self,
        *,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        group_of: Callable[[str], str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the new global state (a fresh dict of fresh tensors; inputs are not mutated)."""
        if not updates:
            raise InvalidUpdate(f"{self.name}: cannot aggregate zero client updates")
        new: dict[str, torch.Tensor] = {}
        for group, keys in split_by_group(list(global_state), group_of).items():
            weights = self.client_weights(updates, group)
            active = [(u, w) for u, w in zip(updates, weights, strict=True) if w > 0]
            if not active:
                for k in keys:
                    new[k] = global_state[k].detach().clone()
                continue
            states = [{k: u.state[k] for k in keys} for u, _ in active]
            part = self.combine({k: global_state[k] for k in keys}, states, [w for _, w in active])
            new.update(part)
        return {k: new[k] for k in sorted(new)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side state to checkpoint (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore server-side state from :meth:`state_dict`."""
        if state:
            raise ValueError(f"strategy {self.name!r} is stateless but got state keys {sorted(state)[:3]}")
