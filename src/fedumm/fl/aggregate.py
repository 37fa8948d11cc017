"""Pure aggregation maths over adapter states (dicts of tensors). No modules, files or logging.

Averaging LoRA factors A and B separately is *not* averaging the products B·A; the weighted means here
are exact averages of whatever tensors they are given. Which strategies are exact for the LoRA update
is stated in each strategy's docstring.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence

import torch

from fedumm.errors import InvalidUpdate

__all__ = ["normalize_weights", "weighted_mean", "quality_factors", "split_by_group", "DEFAULT_GROUP"]

DEFAULT_GROUP = "all"


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Return weights divided by their sum; each must be finite and >= 0 and the sum > 0."""
    ws = [float(w) for w in weights]
    if not ws:
        raise InvalidUpdate("cannot aggregate zero updates")
    for i, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise InvalidUpdate(f"weight {i} must be finite and >= 0, got {w!r}")
    total = math.fsum(ws)
    if total <= 0:
        raise InvalidUpdate(f"weights sum to {total}; at least one must be > 0")
    return [w / total for w in ws]


def weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean of states key by key, accumulated in float64, returned in each key's dtype."""
    if len(states) != len(weights):
        raise InvalidUpdate(f"{len(states)} states but {len(weights)} weights")
    ws = normalize_weights(weights)
    keys = sorted(states[0])
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for state, w in zip(states, ws, strict=True):
            if w:
                acc += w * state[key].detach().to("cpu", torch.float64)
        out[key] = acc.to(states[0][key].dtype)
    return out


def quality_factors(scores: Sequence[float], *, cap: float = 2.0) -> list[float]:
    """Quality factors q_k = clamp(s_k / median(s), 1/cap, cap) from local validation scores in [0, 1].

    Dividing by the median makes q scale-free (a typical client gets 1) and the clamp bounds any one
    client's influence: a client that reports an inflated score gains at most a factor ``cap`` over a
    typical client, however large its claim. If the median score is 0 every q is 1 (no information).
    """
    if cap < 1 or not math.isfinite(cap):
        raise InvalidUpdate(f"quality cap must be finite and >= 1, got {cap!r}")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or not 0 <= s <= 1:
            raise InvalidUpdate(f"validation score {i} must be a finite number in [0, 1], got {s!r}")
    if not scores:
        return []
    med = statistics.median(float(s) for s in scores)
    if med <= 0:
        return [1.0] * len(scores)
    return [min(cap, max(1.0 / cap, float(s) / med)) for s in scores]


def split_by_group(keys: Sequence[str], group_of: Callable[[str], str] | None) -> dict[str, list[str]]:
    """Partition adapter keys into groups (sorted keys per group); no function: one group 'all'."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        g = group_of(key) if group_of is not None else DEFAULT_GROUP
        groups.setdefault(g, []).append(key)
    return groups
