"""Product-space aggregation: average the LoRA products, then re-factor to rank r by truncated SVD.

For each LoRA module the server forms dW = sum_k w_k B_k A_k (w_k proportional to n_k, as FedAvg) and
returns B' = U_r sqrt(S_r), A' = sqrt(S_r) V_r^T from its SVD, with each singular pair's sign fixed so
the largest-magnitude entry of U's column is positive. B'A' is the best rank-r approximation of the
averaged product (Eckart and Young 1936, "The approximation of one matrix by another of lower rank"):
EXACT whenever that average has rank <= r (for instance identical clients, or a frozen common A), and
otherwise the closest rank-r matrix in Frobenius and spectral norm. The factors themselves change gauge
(B', A' need not equal any client's factors even when B'A' does). Averaging products of full adapter
states or of their updates is the same here since the LoRA scaling alpha/r is common to all clients.
Keys that are not LoRA factors are averaged as FedAvg does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedumm.fl.aggregate import weighted_mean
from fedumm.fl.lora_math import low_rank_mean_factors, pair_lora_keys
from fedumm.fl.strategies.base import STRATEGIES, Strategy, group_weight_base
from fedumm.types import ClientUpdate


@STRATEGIES.register("product_space")
class ProductSpace(Strategy):
    """w_k proportional to n_k; LoRA products averaged, then re-factored by a truncated SVD."""

    name = "product_space"
    fixed_point = "product"  # identical clients reproduce B·A, not necessarily B and A

    def __init__(self) -> None:
        pass

    def client_weights(self, updates: Sequence[ClientUpdate], group: str) -> list[float]:
        return [float(group_weight_base(u, group)) for u in updates]

    def combine(
        self,
        global_part: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        pairs, other = pair_lora_keys(global_part)
        out = weighted_mean([{k: s[k] for k in other} for s in states], weights) if other else {}
        for p in pairs:
            rank = int(global_part[p.a_key].shape[0])
            b, a = low_rank_mean_factors(
                [s[p.b_key] for s in states], [s[p.a_key] for s in states], weights, rank
            )
            out[p.b_key] = b.to(global_part[p.b_key].dtype)
            out[p.a_key] = a.to(global_part[p.a_key].dtype)
        return {k: out[k] for k in sorted(out)}
