"""FedAvg: the example-weighted mean of client adapters (McMahan et al. 2017, arXiv:1602.05629).

Exact for whatever tensors are averaged; for LoRA it averages A and B separately, which is not the
average of the products B·A.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedumm.fl.strategies.base import STRATEGIES, Strategy, group_weight_base
from fedumm.types import ClientUpdate


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """w_k proportional to n_k, the examples the client trained the group on."""

    name = "fedavg"

    def __init__(self) -> None:
        pass

    def client_weights(self, updates: Sequence[ClientUpdate], group: str) -> list[float]:
        return [float(group_weight_base(u, group)) for u in updates]
