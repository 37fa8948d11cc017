"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295, Alg. 2).

Per round t and per adapter tensor, with the pseudo-gradient D_t = weighted_mean_k(x_k) - x_t (weights
n_k, as FedAvg):

    m_t = beta1 m_{t-1} + (1 - beta1) D_t
    v_t = beta2 v_{t-1} + (1 - beta2) D_t^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with m_{-1} = 0 and v_{-1} = tau^2 (the paper requires v_{-1} >= tau^2), and no bias correction (the
paper's algorithm has none). Defaults: beta1 = 0.9 and beta2 = 0.99 are the values the paper fixes in
all its experiments; tau = 1e-3 is the adaptivity the paper's tau study finds to work well across
tasks; eta = 1e-2 is a mid-range value of the paper's tuned server learning rates, which are
task-dependent: tune eta first. m and v are the server's buffers (:mod:`fedumm.fl.strategies.server_opt`:
float32, checkpointed, so a resumed run continues exactly). Not exact for B·A: A and B are updated
separately, and identical clients are a fixed point only when they equal the global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedumm.fl.strategies.base import STRATEGIES
from fedumm.fl.strategies.server_opt import ServerOptimizer, hyperparameter


@STRATEGIES.register("fedadam")
class FedAdam(ServerOptimizer):
    """Server Adam on the pseudo-gradient (weighted client mean minus global), per tensor."""

    name = "fedadam"
    buffers = ("m", "v")

    def __init__(
        self, *, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__()
        n = self.name
        self.eta = hyperparameter(f"{n}: eta", eta, 0.0, math.inf, lo_open=True, hi_open=True)
        self.beta1 = hyperparameter(f"{n}: beta1", beta1, 0.0, 1.0, lo_open=False, hi_open=True)
        self.beta2 = hyperparameter(f"{n}: beta2", beta2, 0.0, 1.0, lo_open=False, hi_open=True)
        self.tau = hyperparameter(f"{n}: tau", tau, 0.0, math.inf, lo_open=True, hi_open=True)

    def initial(self, buffer: str, shape: torch.Size) -> torch.Tensor:
        if buffer == "v":  # v_{-1} = tau^2
            return torch.full(shape, self.tau**2, dtype=torch.float32)
        return torch.zeros(shape, dtype=torch.float32)

    def second_moment(self, v_prev: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """Adam's v_t = beta2 v_{t-1} + (1 - beta2) D_t^2 (float64)."""
        return self.beta2 * v_prev + (1.0 - self.beta2) * d2

    def update(
        self, x: torch.Tensor, d: torch.Tensor, prev: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # m and v are rounded to their float32 storage before the step, as they are when restored
        m = (self.beta1 * prev["m"] + (1.0 - self.beta1) * d).float().double()
        v = self.second_moment(prev["v"], d * d).float().double()
        return x + self.eta * m / (v.sqrt() + self.tau), {"m": m, "v": v}
