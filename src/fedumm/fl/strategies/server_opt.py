"""Server optimizers: strategies that step the global adapter along the pseudo-gradient
D_t = weighted_mean_k(x_k) - x_t (weights n_k, as FedAvg) and keep per-tensor buffers between rounds
(FedAvgM's momentum, FedAdam's and FedYogi's moments).

The buffers are explicit server state (float32), checkpointed by :meth:`state_dict` as
``<buffer>/<tensor key>`` plus ``step`` so that a resumed run continues exactly; a round that fails
leaves them untouched. Subclasses name their buffers, give each one's value before the first round and
compute the step (:meth:`ServerOptimizer.update`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.aggregate import weighted_mean
from fedumm.fl.strategies.base import Strategy, group_weight_base
from fedumm.types import AdapterState, ClientUpdate

__all__ = ["STEP_KEY", "ServerOptimizer", "hyperparameter"]

STEP_KEY = "step"


def hyperparameter(name: str, value: object, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    """``value`` as a float when it is a finite number in the interval, else InvalidUpdate naming it."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InvalidUpdate(f"{name} must be a finite number in {lb}{lo}, {hi}{rb}, got {value!r}")
    return float(value)


class ServerOptimizer(Strategy):
    """A server step on the pseudo-gradient with per-tensor buffers (see the module docstring)."""

    fixed_point = "global"  # identical clients equal to the global state leave it unchanged
    #: names of the per-tensor buffers (state keys ``<name>/<tensor key>``)
    buffers: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._buf: dict[str, dict[str, torch.Tensor]] = {b: {} for b in self.buffers}
        self._step = 0

    def client_weights(self, updates: Sequence[ClientUpdate], group: str) -> list[float]:
        return [float(group_weight_base(u, group)) for u in updates]

    def initial(self, buffer: str, shape: torch.Size) -> torch.Tensor:
        """A buffer's value before the first round (float32); default zeros."""
        return torch.zeros(shape, dtype=torch.float32)

    def update(
        self, x: torch.Tensor, d: torch.Tensor, prev: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The new value of a tensor and its new buffers, from its global value ``x``, the pseudo-gradient
        ``d`` (both float64) and the previous buffers (float64); buffers are stored as float32."""
        raise NotImplementedError

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
            prev = {b: t.double() for b, t in self._buffers_of(k, x.shape).items()}
            new_x, new_buf = self.update(x, mean[k] - x, prev)
            out[k] = new_x.to(global_part[k].dtype)
            for b in self.buffers:
                self._buf[b][k] = new_buf[b].float()
        return out

    def _buffers_of(self, key: str, shape: torch.Size) -> dict[str, torch.Tensor]:
        out = {}
        for b in self.buffers:
            t = self._buf[b].get(key)
            if t is None:
                t = self.initial(b, shape)
            elif t.shape != shape:
                raise InvalidUpdate(
                    f"{self.name}: server buffer {b} of {key} has shape {tuple(t.shape)}, "
                    f"state has {tuple(shape)}"
                )
            out[b] = t
        return out

    def aggregate(
        self,
        *,
        global_state: AdapterState,
        updates: Sequence[ClientUpdate],
        group_of: Callable[[str], str] | None = None,
    ) -> dict[str, torch.Tensor]:
        saved = {b: dict(d) for b, d in self._buf.items()}  # buffers are replaced, never modified in place
        try:
            new = super().aggregate(global_state=global_state, updates=updates, group_of=group_of)
        except BaseException:
            self._buf = saved  # a failed round leaves the server state untouched
            raise
        self._step += 1
        return new

    @property
    def step(self) -> int:
        """Rounds aggregated so far (restored by :meth:`load_state_dict`)."""
        return self._step

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{b}/{k}": t.clone() for b, d in self._buf.items() for k, t in d.items()}
        out[STEP_KEY] = torch.tensor(self._step, dtype=torch.int64)
        return {k: out[k] for k in sorted(out)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        buf: dict[str, dict[str, torch.Tensor]] = {b: {} for b in self.buffers}
        step = 0
        for key, t in state.items():
            name, sep, tensor_key = key.partition("/")
            if key == STEP_KEY:
                step = int(t)
            elif sep and name in buf:
                buf[name][tensor_key] = t.detach().to("cpu", torch.float32).clone()
            else:
                raise ValueError(f"strategy {self.name!r}: unexpected server state key {key!r}")
        first, *rest = self.buffers
        for b in rest:
            if set(buf[b]) != set(buf[first]):
                raise ValueError(
                    f"strategy {self.name!r}: server buffers {first} and {b} cover different keys: "
                    f"{sorted(set(buf[b]) ^ set(buf[first]))[:3]}"
                )
            for k, t in buf[b].items():
                if t.shape != buf[first][k].shape:
                    raise ValueError(
                        f"strategy {self.name!r}: buffers of {k} have shapes "
                        f"{tuple(buf[first][k].shape)} and {tuple(t.shape)}"
                    )
        self._buf, self._step = buf, step
