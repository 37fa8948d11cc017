"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv:1812.06127).

The server step is FedAvg's example-weighted mean; the method lives in the client objective,
h_k(w) = F_k(w) + mu/2 * ||w - w_global||^2 over the trainable adapter parameters, which the training
loop reads from :attr:`FedProx.proximal_mu` (0 turns FedProx into FedAvg). Not exact for B·A: like
FedAvg it averages A and B separately, which is not the average of the products.
"""

from __future__ import annotations

import math

from fedumm.errors import InvalidUpdate
from fedumm.fl.strategies.base import STRATEGIES
from fedumm.fl.strategies.fedavg import FedAvg


@STRATEGIES.register("fedprox")
class FedProx(FedAvg):
    """FedAvg on the server; clients add the proximal term mu/2 * ||w - w_global||^2 to their loss."""

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01) -> None:
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
            raise InvalidUpdate(f"fedprox: mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)

    @property
    def proximal_mu(self) -> float:
        """Coefficient of the client's proximal term mu/2 * ||w - w_global||^2."""
        return self.mu
