"""A different strategy for some adapter groups (``federation.group_strategies``).

Each strategy instance aggregates one fixed set of keys every round: the overridden groups each go
to their own strategy; every other group goes, together, to the default strategy. Client-side hooks
(FedProx's proximal term, FFA-LoRA's frozen A) act on the whole adapter, so all strategies involved
must agree on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch

from fedumm.errors import ConfigError, InvalidUpdate
from fedumm.fl.aggregate import split_by_group
from fedumm.fl.strategies.base import Strategy
from fedumm.types import AdapterState, ClientUpdate

__all__ = ["PerGroup"]

DEFAULT_SLOT = "*"


class PerGroup(Strategy):
    """``default`` for every group except those in ``overrides`` (group name -> strategy)."""

    name = "per_group"

    def __init__(self, default: Strategy, overrides: Mapping[str, Strategy]) -> None:
        for group, strategy in overrides.items():
            if (strategy.proximal_mu, strategy.frozen_suffixes) != (
                default.proximal_mu,
                default.frozen_suffixes,
            ):
                raise ConfigError(
                    f"federation.group_strategies.{group}={strategy.name!r} changes client training "
                    f"(proximal term or frozen factors) differently from strategy {default.name!r}; "
                    "client-side hooks apply to the whole adapter, so they must agree"
                )
        self.default = default
        self.overrides = dict(overrides)
        self.proximal_mu = default.proximal_mu
        self.frozen_suffixes = default.frozen_suffixes
        self.fixed_point = default.fixed_point

    def aggregate(
        self,
        *,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        group_of: Callable[[str], str] | None = None,
    ) -> dict[str, torch.Tensor]:
        if not updates:
            raise InvalidUpdate(f"{self.name}: cannot aggregate zero client updates")
        slots: dict[str, list[str]] = {}
        for group, keys in split_by_group(list(global_state), group_of).items():
            slots.setdefault(group if group in self.overrides else DEFAULT_SLOT, []).extend(keys)
        new: dict[str, torch.Tensor] = {}
        for slot, keys in slots.items():
            strategy = self.overrides.get(slot, self.default)
            part = strategy.aggregate(
                global_state={k: global_state[k] for k in keys},
                updates=[replace(u, state={k: u.state[k] for k in keys}) for u in updates],
                group_of=group_of,
            )
            new.update(part)
        return {k: new[k] for k in sorted(new)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{DEFAULT_SLOT}/{k}": v for k, v in self.default.state_dict().items()}
        for group, strategy in sorted(self.overrides.items()):
            out.update({f"{group}/{k}": v for k, v in strategy.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for flat, value in state.items():
            slot, _, key = flat.partition("/")
            if slot != DEFAULT_SLOT and slot not in self.overrides:
                raise ValueError(f"per-group strategy state has an unknown slot {slot!r}")
            parts.setdefault(slot, {})[key] = value
        self.default.load_state_dict(parts.get(DEFAULT_SLOT, {}))
        for group, strategy in self.overrides.items():
            strategy.load_state_dict(parts.get(group, {}))
