"""FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295, Alg. 2).

Identical to FedAdam (see :mod:`fedumm.fl.strategies.fedadam`: pseudo-gradient, first moment, server
step, v_{-1} = tau^2, no bias correction, defaults eta = 1e-2, beta1 = 0.9, beta2 = 0.99, tau = 1e-3)
except for Yogi's additive second moment (Zaheer et al. 2018), which changes v by at most
(1 - beta2) D_t^2 per round:

    v_t = v_{t-1} - (1 - beta2) D_t^2 sign(v_{t-1} - D_t^2)

Not exact for B·A: A and B are updated separately.
"""

from __future__ import annotations

import torch

from fedumm.fl.strategies.base import STRATEGIES
from fedumm.fl.strategies.fedadam import FedAdam


@STRATEGIES.register("fedyogi")
class FedYogi(FedAdam):
    """Server Yogi on the pseudo-gradient (weighted client mean minus global), per tensor."""

    name = "fedyogi"

    def second_moment(self, v_prev: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """Yogi's v_t = v_{t-1} - (1 - beta2) D_t^2 sign(v_{t-1} - D_t^2) (float64)."""
        return v_prev - (1.0 - self.beta2) * d2 * torch.sign(v_prev - d2)
