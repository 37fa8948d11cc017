"""Pure maths of the server's defences against hostile but well-formed updates. No modules or files.

- Example-count bound: a reported count above ``cap`` times the median report counts as that bound.
- Norm bound: a client delta longer than a bound (fixed, or a multiple of the round's median delta
  norm; Sun et al. 2019, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963) is scaled
  down to it.
- Coordinate-wise median and trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", arXiv:1803.01498).
- Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent", NeurIPS 2017): keep the ``m`` updates with the smallest sum of squared distances to their
  ``n - f - 2`` nearest neighbours.

Every function takes plain tensors or numbers and returns new ones (inputs are never mutated).
Which space they act in (LoRA factors A and B, or the products B·A) is the caller's choice: the
tensors handed in are either the factors or the products (see :mod:`fedumm.fl.defense`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from fedumm.errors import InvalidUpdate

__all__ = [
    "count_bound",
    "bound_counts",
    "state_norm",
    "adaptive_norm_bound",
    "clip_scale",
    "coordinate_median",
    "trimmed_mean",
    "trim_count",
    "trimmed_share",
    "pairwise_sq_distances",
    "krum_scores",
    "multi_krum_select",
]


def count_bound(counts: Sequence[int], cap: float) -> int:
    """floor(cap * median of the positive counts); the largest count any client may weigh with."""
    if not math.isfinite(cap) or cap < 1:
        raise InvalidUpdate(f"count cap must be finite and >= 1, got {cap!r}")
    positive = [int(n) for n in counts if n > 0]
    if not positive:
        raise InvalidUpdate("count bound: no positive example count")
    # the median of the reports, so that one inflated report cannot move the bound much
    return max(1, math.floor(cap * statistics.median(positive)))


def bound_counts(counts: Sequence[int], cap: float) -> list[int]:
    """Each count clamped to :func:`count_bound` (zeros stay zero)."""
    bound = count_bound(counts, cap)
    return [min(int(n), bound) for n in counts]


def state_norm(delta: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> float:
    """L2 norm of a delta over ``keys`` (all keys when None), accumulated in float64."""
    keys = sorted(delta) if keys is None else keys
    return math.sqrt(math.fsum(float(delta[k].detach().double().pow(2).sum()) for k in keys))


def adaptive_norm_bound(norms: Sequence[float], multiple: float) -> float:
    """``multiple`` times the median norm of the round (a norm bound that follows training's scale)."""
    if not math.isfinite(multiple) or multiple <= 0:
        raise InvalidUpdate(f"norm bound multiple must be finite and > 0, got {multiple!r}")
    if not norms:
        raise InvalidUpdate("norm bound: no client norms")
    return multiple * statistics.median(float(n) for n in norms)


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings a vector of ``norm`` within ``bound``: min(1, bound / norm)."""
    if bound < 0 or math.isnan(bound):
        raise InvalidUpdate(f"norm bound must be >= 0, got {bound!r}")
    if norm <= bound:
        return 1.0
    return bound / norm


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        raise InvalidUpdate("cannot combine zero tensors")
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape:
            raise InvalidUpdate(f"tensor shapes differ: {tuple(shape)} and {tuple(t.shape)}")
    return torch.stack([t.detach().to("cpu", torch.float64) for t in tensors])  # (n, *shape)


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median in float64; with an even count, the mean of the two middle values."""
    x = _stack(tensors).sort(dim=0).values
    n = x.shape[0]
    if n % 2:
        return x[n // 2].clone()
    return (x[n // 2 - 1] + x[n // 2]) / 2


def trim_count(n: int, fraction: float) -> int:
    """Values dropped at each end by a trimmed mean of ``n`` values: floor(fraction * n)."""
    if not 0 <= fraction < 0.5:
        raise InvalidUpdate(f"trim fraction must be in [0, 0.5), got {fraction!r}")
    return math.floor(fraction * n)


def trimmed_mean(tensors: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the ``floor(fraction * n)`` smallest and largest values."""
    x = _stack(tensors).sort(dim=0).values
    k = trim_count(x.shape[0], fraction)
    return x[k : x.shape[0] - k].mean(dim=0)


def trimmed_share(tensors: Sequence[torch.Tensor], fraction: float) -> list[float]:
    """Per input, the share of its coordinates that the trimmed mean dropped (ties broken by order)."""
    x = _stack(tensors)
    n = x.shape[0]
    k = trim_count(n, fraction)
    if k == 0 or x[0].numel() == 0:
        return [0.0] * n
    rank = x.argsort(dim=0, stable=True).argsort(dim=0, stable=True)  # rank of each value per coordinate
    dropped = (rank < k) | (rank >= n - k)
    return [float(dropped[i].double().mean()) for i in range(n)]


def pairwise_sq_distances(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(n, n) squared Euclidean distances between flattened vectors, in float64.

    Row by row, from the differences themselves (no |a|^2 + |b|^2 - 2ab cancellation), so memory is
    O(n d), not the O(n^2 d) of broadcasting all pairs at once (1.7 GB for 50 tiny adapters)."""
    x = _stack([v.reshape(-1) for v in vectors])  # (n, d)
    n = x.shape[0]
    out = torch.empty((n, n), dtype=torch.float64)
    for i in range(n):
        out[i] = (x - x[i]).pow(2).sum(dim=1)
    return out


def krum_scores(sq_dist: torch.Tensor, f: int) -> list[float]:
    """Krum score of each update: sum of squared distances to its n - f - 2 nearest other updates."""
    n = sq_dist.shape[0]
    if f < 0 or n - f - 2 < 1:
        raise InvalidUpdate(f"multi-Krum needs n - f - 2 >= 1, got n={n}, f={f}")
    scores = []
    for i in range(n):
        others = torch.cat([sq_dist[i, :i], sq_dist[i, i + 1 :]]).sort().values
        scores.append(float(others[: n - f - 2].sum()))
    return scores


def multi_krum_select(sq_dist: torch.Tensor, f: int, m: int | None = None) -> list[int]:
    """Indices (sorted) of the ``m`` updates with the lowest Krum scores; ``m`` defaults to n - f."""
    n = sq_dist.shape[0]
    scores = krum_scores(sq_dist, f)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise InvalidUpdate(f"multi-Krum keeps m in [1, {n}] updates, got m={m}")
    order = sorted(range(n), key=lambda i: (scores[i], i))  # ties: the earlier client
    return sorted(order[:m])
