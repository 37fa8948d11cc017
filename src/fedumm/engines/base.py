"""What every engine is handed to run a federation, and the registry engines are chosen from.

An engine is "where it runs": it takes a :class:`FederationSetup` (the sites' data, the initial or
resumed global adapter, the strategy, the per-round callbacks) and returns the final global adapter.
The round loop itself is :class:`fedumm.server.rounds.RoundLoop`, the same for every engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedumm.registry import Registry

if TYPE_CHECKING:
    import torch

    from fedumm.client.site import Site
    from fedumm.config import Config
    from fedumm.fl.strategies import Strategy
    from fedumm.progress import Progress
    from fedumm.server.run_dir import RunDir
    from fedumm.types import AdapterState, RoundRecord

__all__ = ["ENGINES", "EngineRun", "FederationSetup", "OnRound"]

# (record, global adapter after the round, client-side state a resumed run needs)
OnRound = Callable[["RoundRecord", "AdapterState", "Mapping[str, torch.Tensor]"], None]


@dataclass(frozen=True, kw_only=True)
class FederationSetup:
    """Everything an engine needs to run ``cfg.federation`` from ``start_round``.

    ``sites`` are built in this process (the in-process engine trains them on their shared
    backbone); engines that start their own site processes build them there from the run directory.
    """

    cfg: Config
    run: RunDir
    sites: Mapping[str, Site]
    initial_state: AdapterState  # the round-1 global adapter (the LoRA initialisation)
    strategy: Strategy
    start_state: AdapterState
    start_round: int = 1
    client_state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    evaluate: Callable[[AdapterState, int], Mapping[str, float]] | None = None
    on_round: OnRound | None = None
    progress: Progress | None = None
    group_of: Callable[[str], str] | None = None


EngineRun = Callable[[FederationSetup], "AdapterState"]

ENGINES: Registry[EngineRun] = Registry("engine")
"""Engine name (``engine:`` in the config) -> function running a federation there."""
