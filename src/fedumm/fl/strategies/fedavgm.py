"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335).

Per round t and per adapter tensor, with the pseudo-gradient D_t = weighted_mean_k(x_k) - x_t
(weights n_k, as FedAvg):

    u_t = beta u_{t-1} + D_t
    x_{t+1} = x_t + eta u_t

with u_{-1} = 0. eta = 1, beta = 0 is FedAvg exactly; beta = 0 alone is a server learning rate.
Momentum averages the pseudo-gradients of about 1 / (1 - beta) rounds, which damps the round-to-round
swing a non-IID round's average has (each round leans towards the clients whose drift is largest).
Defaults: beta = 0.9 with eta = 0.1, so that the effective step eta / (1 - beta) is FedAvg's (1) once
the momentum has built up; the first rounds move less than FedAvg's (eta, then eta (1 + beta), ...).
Hsu et al. tune the effective step eta / (1 - beta) rather than eta; tune it, then beta. The momentum
is the server's buffer (:mod:`fedumm.fl.strategies.server_opt`: float32, checkpointed, so a resumed
run continues exactly). Not exact for B·A: A and B are updated separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedumm.fl.strategies.base import STRATEGIES
from fedumm.fl.strategies.server_opt import ServerOptimizer, hyperparameter


@STRATEGIES.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """FedAvg with a server learning rate and server momentum on the pseudo-gradient, per tensor."""

    name = "fedavgm"
    buffers = ("momentum",)

    def __init__(self, *, eta: float = 0.1, beta: float = 0.9) -> None:
        super().__init__()
        self.eta = hyperparameter(f"{self.name}: eta", eta, 0.0, math.inf, lo_open=True, hi_open=True)
        self.beta = hyperparameter(f"{self.name}: beta", beta, 0.0, 1.0, lo_open=False, hi_open=True)

    def update(
        self, x: torch.Tensor, d: torch.Tensor, prev: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        u = self.beta * prev["momentum"] + d
        if self.beta > 0:  # the step uses u as stored (float32), so that a resumed run steps the same
            u = u.float().double()
        return x + self.eta * u, {"momentum": u}
