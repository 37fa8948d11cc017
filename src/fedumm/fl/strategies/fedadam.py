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
task-dependent: tune eta first. m and v are explicit server state (float32), checkpointed by
:meth:`state_dict` so a resumed run continues exactly. Not exact for B·A: A and B are updated
separately, and identical clients are a fixed point only when they equal the global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.aggregate import weighted_mean
from fedumm.fl.strategies.base import STRATEGIES, Strategy, group_weight_base
from fedumm.types import AdapterState, ClientUpdate

M_PREFIX = "m/"
V_PREFIX = "v/"
STEP_KEY = "step"


def _number(name: str, value: object, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InvalidUpdate(f"{name} must be a finite number in {lb}{lo}, {hi}{rb}, got {value!r}")
    return float(value)


@STRATEGIES.register("fedadam")
class FedAdam(Strategy):
    """Server Adam on the pseudo-gradient (weighted client mean minus global), per tensor."""

    name = "fedadam"
    fixed_point = "global"  # identical clients equal to the global state leave it unchanged

    def __init__(
        self, *, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.eta = _number(f"{self.name}: eta", eta, 0.0, math.inf, lo_open=True, hi_open=True)
        self.beta1 = _number(f"{self.name}: beta1", beta1, 0.0, 1.0, lo_open=False, hi_open=True)
        self.beta2 = _number(f"{self.name}: beta2", beta2, 0.0, 1.0, lo_open=False, hi_open=True)
        self.tau = _number(f"{self.name}: tau", tau, 0.0, math.inf, lo_open=True, hi_open=True)
        self._m: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}
        self._step = 0

    def client_weights(self, updates: Sequence[ClientUpdate], group: str) -> list[float]:
        return [float(group_weight_base(u, group)) for u in updates]

    def second_moment(self, v_prev: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """Adam's v_t = beta2 v_{t-1} + (1 - beta2) D_t^2 (float64)."""
        return self.beta2 * v_prev + (1.0 - self.beta2) * d2

    def combine(
        self,
        global_part: Mapping[str, torch.Tensor],
        states: Sequence[Mapping[str, torch.Tensor]],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        keys = sorted(global_part)
        mean = weighted_mean(
            [{k: s[k].detach().to("cpu", torch.float64) for k in keys} for s in states], weights
        )
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            x = global_part[k].detach().to("cpu", torch.float64)
            d = mean[k] - x
            m_prev, v_prev = self._moments(k, x.shape)
            m = (self.beta1 * m_prev.double() + (1.0 - self.beta1) * d).float()
            v = self.second_moment(v_prev.double(), d * d).float()
            out[k] = (x + self.eta * m.double() / (v.double().sqrt() + self.tau)).to(global_part[k].dtype)
            self._m[k], self._v[k] = m, v
        return out

    def _moments(self, key: str, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._m:
            return torch.zeros(shape, dtype=torch.float32), torch.full(
                shape, self.tau**2, dtype=torch.float32
            )
        m, v = self._m[key], self._v[key]
        if m.shape != shape:
            raise InvalidUpdate(
                f"{self.name}: server moments of {key} have shape {tuple(m.shape)}, state has {tuple(shape)}"
            )
        return m, v

    def aggregate(
        self,
        *,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        group_of: Callable[[str], str] | None = None,
    ) -> dict[str, torch.Tensor]:
        m, v = dict(self._m), dict(self._v)  # moments are replaced, never modified in place
        try:
            new = super().aggregate(global_state=global_state, updates=updates, group_of=group_of)
        except BaseException:
            self._m, self._v = m, v  # a failed round leaves the server state untouched
            raise
        self._step += 1
        return new

    @property
    def step(self) -> int:
        """Rounds aggregated so far (restored by :meth:`load_state_dict`)."""
        return self._step

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {M_PREFIX + k: t.clone() for k, t in self._m.items()}
        out |= {V_PREFIX + k: t.clone() for k, t in self._v.items()}
        out[STEP_KEY] = torch.tensor(self._step, dtype=torch.int64)
        return {k: out[k] for k in sorted(out)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        m: dict[str, torch.Tensor] = {}
        v: dict[str, torch.Tensor] = {}
        step = 0
        for key, t in state.items():
            if key == STEP_KEY:
                step = int(t)
            elif key.startswith(M_PREFIX):
                m[key[len(M_PREFIX) :]] = t.detach().to("cpu", torch.float32).clone()
            elif key.startswith(V_PREFIX):
                v[key[len(V_PREFIX) :]] = t.detach().to("cpu", torch.float32).clone()
            else:
                raise ValueError(f"strategy {self.name!r}: unexpected server state key {key!r}")
        if set(m) != set(v):
            raise ValueError(
                f"strategy {self.name!r}: first and second moments cover different keys: "
                f"{sorted(set(m) ^ set(v))[:3]}"
            )
        for k in m:
            if m[k].shape != v[k].shape:
                raise ValueError(
                    f"strategy {self.name!r}: moments of {k} have shapes {tuple(m[k].shape)} and "
                    f"{tuple(v[k].shape)}"
                )
        self._m, self._v, self._step = m, v, step
