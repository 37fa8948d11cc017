"""Federated data partitioning with Dirichlet label skew.

The non-IID split follows the standard Dirichlet label-skew protocol of Hsu, Qi and Brown (2019),
"Measuring the effects of non-identical data distribution for federated visual classification",
arXiv:1909.06335: for every label class, client proportions are drawn from
``Dirichlet(alpha * ones(K))`` and that class's shuffled samples are cut accordingly. Small ``alpha``
gives strongly skewed clients, large ``alpha`` approaches an IID split; ``alpha == 0`` is taken
to mean an exact IID split (a seeded random permutation cut into near-equal parts).

For visual question answering the "label" is the answer string, so a partition maps client names
to question ids and records the answer histogram of each client.

Every random choice comes from one ``numpy.random.Generator`` seeded with the given seed, so the
same inputs and seed always give the same partition.
"""

from __future__ import annotations

import io
import json
import math
import operator
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from fedumm.errors import ConfigError, DataError
from fedumm.io import atomic_write_bytes

__all__ = [
    "Partition",
    "PartitionMeta",
    "build_partition",
    "client_names",
    "dirichlet_partition",
    "load_partition",
    "partition_stats",
    "save_partition",
]

# The heatmap shows at most this many answer columns (the most frequent ones).
HEATMAP_MAX_ANSWERS = 30
# Cell values are written into the heatmap only when the grid is this small or smaller.
_HEATMAP_ANNOTATE_CELLS = 300
# Longer answer strings are shortened in the heatmap's column labels.
_HEATMAP_LABEL_CHARS = 18

_META_KEYS = ("alpha", "seed", "min_size", "num_clients", "num_samples")


# --------------------------------------------------------------------------------------------
# argument checks


def _as_int(value: object, name: str, *, minimum: int) -> int:
    """Return ``value`` as an int no smaller than ``minimum``, or raise ConfigError naming it."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    return number


def _as_alpha(value: object) -> float:
    """Return ``value`` as a finite non-negative float, or raise ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"alpha must be a number, got {value!r}")
    alpha = float(value)
    if not math.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"alpha must be finite and >= 0, got {value!r}")
    return alpha


# --------------------------------------------------------------------------------------------
# pure maths


def client_names(k: int) -> list[str]:
    """Return ``k`` client names ``site-01`` .. that sort in numeric order."""
    k = _as_int(k, "number of clients", minimum=1)
    width = max(2, len(str(k)))
    return [f"site-{i:0{width}d}" for i in range(1, k + 1)]


def _dirichlet_proportions(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Draw one probability vector from ``Dirichlet(alpha * ones(k))``."""
    props = rng.dirichlet(np.full(k, alpha))
    total = float(props.sum())
    if not np.all(np.isfinite(props)) or total <= 0.0:
        # Guard against an all-zero or non-finite draw for extremely small alpha: the limit of
        # Dirichlet(alpha) as alpha -> 0 puts all mass on one uniformly chosen client.
        props = np.zeros(k)
        props[int(rng.integers(k))] = 1.0
        return props
    return props / total


def dirichlet_partition(
    labels: Sequence[Hashable],
    *,
    num_clients: int,
    alpha: float,
    min_size: int = 1,
    seed: int = 0,
) -> list[list[int]]:
    """Split sample indices over clients with Dirichlet label skew; return sorted indices per client."""
    if isinstance(labels, (str, bytes)):
        raise ConfigError(f"labels must be a sequence of labels, not a single string {labels!r}")
    n = len(labels)
    if n == 0:
        raise ConfigError("labels must not be empty (got 0 labels)")
    k = _as_int(num_clients, "num_clients", minimum=1)
    alpha = _as_alpha(alpha)
    min_size = _as_int(min_size, "min_size", minimum=0)
    seed = _as_int(seed, "seed", minimum=0)
    if k * min_size > n:
        raise ConfigError(
            f"cannot give each of num_clients={k} clients min_size={min_size} samples: "
            f"that needs {k * min_size} samples but there are only {n}"
        )
    rng = np.random.default_rng(seed)

    if alpha == 0.0:
        # IID: a seeded permutation cut into k parts whose sizes differ by at most one. Every part
        # has at least floor(n / k) >= min_size samples, so no top-up is needed.
        return [sorted(part.tolist()) for part in np.array_split(rng.permutation(n), k)]

    # Group indices by label; classes are visited in a fixed (sorted) order so that the random
    # stream is consumed identically for identical inputs.
    groups: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    order = sorted(groups, key=lambda c: (type(c).__name__, str(c)))

    parts: list[list[int]] = [[] for _ in range(k)]
    for label in order:
        idx = np.asarray(groups[label], dtype=np.int64)
        rng.shuffle(idx)
        props = _dirichlet_proportions(rng, alpha, k)
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        cuts = np.clip(cuts, 0, len(idx))
        for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(chunk.tolist())

    # Top-up to min_size. While some client is below min_size, move one randomly chosen index
    # from the currently largest client (lowest position on ties) to the smallest client (lowest
    # position on ties). This terminates: k * min_size <= n means the mean size is >= min_size,
    # so while one client is below min_size the largest one is strictly above the mean and thus
    # keeps >= min_size after giving one away; the total deficit drops by one per move, so there
    # are at most k * min_size moves. Ties break by position and the moved index comes from the
    # seeded generator, so the result stays deterministic.
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    while sizes.min() < min_size:
        src = int(np.argmax(sizes))
        dst = int(np.argmin(sizes))
        donor = parts[src]
        j = int(rng.integers(len(donor)))
        donor[j], donor[-1] = donor[-1], donor[j]  # swap-remove: O(1), order is restored below
        parts[dst].append(donor.pop())
        sizes[src] -= 1
        sizes[dst] += 1

    return [sorted(p) for p in parts]


# --------------------------------------------------------------------------------------------
# partition object


@dataclass(frozen=True, kw_only=True)
class PartitionMeta:
    """How a partition was drawn: Dirichlet concentration, seed, minimum size and totals."""

    alpha: float
    seed: int
    min_size: int
    num_clients: int
    num_samples: int

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready ``meta`` object."""
        return {
            "alpha": self.alpha,
            "seed": self.seed,
            "min_size": self.min_size,
            "num_clients": self.num_clients,
            "num_samples": self.num_samples,
        }


@dataclass(frozen=True, kw_only=True)
class Partition:
    """Client name -> question ids, with each client's answer histogram and optional draw metadata."""

    clients: Mapping[str, tuple[int, ...]]  # name -> question ids
    answer_counts: Mapping[str, Mapping[str, int]]  # name -> answer -> count, sorted by answer
    meta: PartitionMeta | None = field(default=None)

    def __post_init__(self) -> None:
        clients = {str(name): tuple(int(q) for q in ids) for name, ids in self.clients.items()}
        if not clients:
            raise ConfigError("a partition needs at least one client")
        if set(self.answer_counts) != set(clients):
            raise ConfigError(
                f"answer_counts clients {sorted(self.answer_counts)} differ from clients {sorted(clients)}"
            )
        counts: dict[str, Mapping[str, int]] = {}
        owner: dict[int, str] = {}
        for name, ids in clients.items():
            per = {str(a): int(c) for a, c in sorted(self.answer_counts[name].items())}
            if any(c < 0 for c in per.values()) or sum(per.values()) != len(ids):
                raise ConfigError(
                    f"client {name!r}: answer counts sum to {sum(per.values())} "
                    f"but it has {len(ids)} question ids"
                )
            counts[name] = MappingProxyType(per)
            for q in ids:
                if q in owner:
                    raise ConfigError(f"question id {q} is in both client {owner[q]!r} and client {name!r}")
                owner[q] = name
        if self.meta is not None and (
            self.meta.num_clients != len(clients) or self.meta.num_samples != len(owner)
        ):
            raise ConfigError(
                f"meta says {self.meta.num_clients} clients / {self.meta.num_samples} samples, "
                f"partition has {len(clients)} / {len(owner)}"
            )
        object.__setattr__(self, "clients", MappingProxyType(clients))
        object.__setattr__(self, "answer_counts", MappingProxyType(counts))

    @property
    def num_samples(self) -> int:
        """Total number of question ids over all clients."""
        return sum(len(ids) for ids in self.clients.values())

    def to_json(self) -> dict[str, Any]:
        """Return the JSON-ready object ``{"clients": {name: {...}}, "meta": {...}}``."""
        out: dict[str, Any] = {
            "clients": {
                name: {
                    "question_ids": list(ids),
                    "answer_counts": dict(self.answer_counts[name]),
                }
                for name, ids in self.clients.items()
            }
        }
        if self.meta is not None:
            out["meta"] = self.meta.to_json()
        return out

    @classmethod
    def from_json(cls, data: object, *, source: str = "<partition>") -> Partition:
        """Validate a ``to_json`` object and rebuild the partition; DataError names ``source``."""
        return _partition_from_json(data, source)


def build_partition(
    question_ids: Sequence[int],
    answers: Sequence[str],
    *,
    num_clients: int,
    alpha: float,
    min_size: int = 1,
    seed: int = 0,
) -> Partition:
    """Partition question ids over clients by Dirichlet skew of their answers."""
    if len(question_ids) != len(answers):
        raise ConfigError(f"question_ids and answers differ in length: {len(question_ids)} != {len(answers)}")
    qids: list[int] = []
    seen: dict[int, int] = {}
    for pos, q in enumerate(question_ids):
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)):
            raise ConfigError(f"question_ids[{pos}] must be an integer, got {q!r}")
        q = int(q)
        if q in seen:
            raise ConfigError(f"question id {q} appears twice (positions {seen[q]} and {pos})")
        seen[q] = pos
        qids.append(q)
    for pos, a in enumerate(answers):
        if not isinstance(a, str):
            raise ConfigError(f"answers[{pos}] must be a string, got {a!r}")

    parts = dirichlet_partition(answers, num_clients=num_clients, alpha=alpha, min_size=min_size, seed=seed)
    names = client_names(len(parts))
    clients = {name: tuple(qids[i] for i in part) for name, part in zip(names, parts, strict=True)}
    counts = {name: dict(Counter(answers[i] for i in part)) for name, part in zip(names, parts, strict=True)}
    meta = PartitionMeta(
        alpha=float(alpha),
        seed=int(seed),
        min_size=int(min_size),
        num_clients=len(parts),
        num_samples=len(qids),
    )
    return Partition(clients=clients, answer_counts=counts, meta=meta)


# --------------------------------------------------------------------------------------------
# statistics


def partition_stats(partition: Partition) -> dict[str, Any]:
    """Return client size statistics and label-skew heterogeneity (total-variation distances)."""
    names = list(partition.clients)
    sizes = np.array([len(partition.clients[n]) for n in names], dtype=np.float64)
    answers = sorted({a for n in names for a in partition.answer_counts[n]})
    col = {a: j for j, a in enumerate(answers)}
    mat = np.zeros((len(names), len(answers)), dtype=np.float64)
    for i, n in enumerate(names):
        for a, c in partition.answer_counts[n].items():
            mat[i, col[a]] = c
    total = mat.sum()
    # Total-variation distance of each non-empty client's answer distribution to the pooled one:
    # 0 for a client that mirrors the global mix, 1 for a client whose answers never occur elsewhere.
    tv: list[float] = []
    if total > 0:
        glob = mat.sum(axis=0) / total
        for row in mat:
            if row.sum() > 0:
                tv.append(0.5 * float(np.abs(row / row.sum() - glob).sum()))
    return {
        "num_clients": len(names),
        "num_samples": int(sizes.sum()),
        "num_answers": len(answers),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": float(sizes.mean()),
        "size_std": float(sizes.std()),
        "empty_clients": int((sizes == 0).sum()),
        "mean_tv_distance": float(np.mean(tv)) if tv else 0.0,
        "max_tv_distance": float(np.max(tv)) if tv else 0.0,
    }


# --------------------------------------------------------------------------------------------
# files


def _dump_json(data: Mapping[str, Any]) -> str:
    """Format a partition JSON object with one line per client (large id lists stay compact)."""

    def one(value: object) -> str:
        return json.dumps(value, ensure_ascii=False)

    clients = ",\n".join(f"  {one(name)}: {one(entry)}" for name, entry in data["clients"].items())
    parts = [f' "clients": {{\n{clients}\n }}']
    parts += [f" {one(key)}: {one(value)}" for key, value in data.items() if key != "clients"]
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _render_heatmap(partition: Partition) -> bytes:
    """Draw clients x most frequent answers as a PNG and return its bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    names = list(partition.clients)
    totals: Counter[str] = Counter()
    for n in names:
        totals.update(partition.answer_counts[n])
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [a for a, _ in ranked[:HEATMAP_MAX_ANSWERS]]
    mat = np.array(
        [[partition.answer_counts[n].get(a, 0) for a in shown] for n in names], dtype=np.int64
    ).reshape(len(names), len(shown))

    k = len(names)
    width = min(4.0 + 0.42 * max(len(shown), 1), 18.0)
    height = min(2.5 + 0.28 * k, 24.0)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    alpha_text = "?" if partition.meta is None else f"{partition.meta.alpha:g}"
    iid = partition.meta is not None and partition.meta.alpha == 0
    title = f"Answers per client: K={k}, alpha={alpha_text}" + (" (IID)" if iid else "")
    if len(totals) > len(shown):
        title += f"\n{len(shown)} most frequent of {len(totals)} answers"
    ax.set_title(title, fontsize=11)

    if mat.size == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        # A square-root colour scale keeps small counts visible next to one dominant cell.
        norm = PowerNorm(gamma=0.5, vmin=0, vmax=max(int(mat.max()), 1))
        image = ax.imshow(mat, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="questions (square-root scale)", shrink=0.8, aspect=30)
        labels = [a if len(a) <= _HEATMAP_LABEL_CHARS else a[: _HEATMAP_LABEL_CHARS - 1] + "…" for a in shown]
        ax.set_xticks(range(len(shown)), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
        # Show every client label up to 40 rows; above that, label every n-th row to stay legible.
        step = max(1, math.ceil(k / 40))
        rows = list(range(0, k, step))
        ax.set_yticks(rows, [names[i] for i in rows], fontsize=8)
        ax.set_xlabel("answer")
        ax.set_ylabel("client")
        if mat.size <= _HEATMAP_ANNOTATE_CELLS:
            top = mat.max() if mat.max() > 0 else 1
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    colour = "black" if mat[i, j] > 0.6 * top else "white"
                    ax.text(j, i, str(mat[i, j]), ha="center", va="center", fontsize=7, color=colour)

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_partition(partition: Partition, path: Path, *, heatmap: bool = True) -> Path | None:
    """Write the partition JSON atomically and, by default, a heatmap PNG beside it; return the PNG path."""
    path = Path(path)
    png = path.with_suffix(".png")
    if heatmap and png == path:
        raise ConfigError(f"partition file {path} must not end in .png: the heatmap is written beside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _dump_json(partition.to_json()).encode("utf-8"))
        if not heatmap:
            return None
        atomic_write_bytes(png, _render_heatmap(partition))
    except OSError as exc:
        raise DataError(f"cannot write partition {path}: {exc}") from exc
    return png


class _DuplicateKey(Exception):
    """A JSON object repeats a key."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a dict from JSON pairs, refusing repeated keys."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _partition_from_json(data: object, source: str) -> Partition:
    """Check the structure of a partition JSON object and build the Partition."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: top level must be an object, got {type(data).__name__}")
    extra = set(data) - {"clients", "meta"}
    if extra:
        raise DataError(f"{source}: unknown top-level keys {sorted(extra)}")
    raw_clients = data.get("clients")
    if not isinstance(raw_clients, dict) or not raw_clients:
        raise DataError(f"{source}: 'clients' must be a non-empty object")

    clients: dict[str, tuple[int, ...]] = {}
    counts: dict[str, dict[str, int]] = {}
    owner: dict[int, str] = {}
    for name, entry in raw_clients.items():
        where = f"{source}: client {name!r}"
        if not name:
            raise DataError(f"{source}: a client has an empty name")
        if not isinstance(entry, dict) or set(entry) != {"question_ids", "answer_counts"}:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{where}: expected keys ['answer_counts', 'question_ids'], got {got}")
        ids, per = entry["question_ids"], entry["answer_counts"]
        if not isinstance(ids, list) or not all(_is_int(q) for q in ids):
            raise DataError(f"{where}: 'question_ids' must be a list of integers")
        if not isinstance(per, dict) or not all(_is_int(c) and c >= 0 for c in per.values()):
            raise DataError(f"{where}: 'answer_counts' must map answers to non-negative integers")
        if sum(per.values()) != len(ids):
            raise DataError(
                f"{where}: answer counts sum to {sum(per.values())} but there are {len(ids)} question ids"
            )
        for q in ids:
            if q in owner:
                if owner[q] == name:
                    raise DataError(f"{where}: question id {q} is listed twice")
                raise DataError(
                    f"{source}: question id {q} is in both client {owner[q]!r} and client {name!r}"
                )
            owner[q] = name
        clients[name] = tuple(ids)
        counts[name] = per

    meta: PartitionMeta | None = None
    if "meta" in data:
        raw = data["meta"]
        if not isinstance(raw, dict) or set(raw) != set(_META_KEYS):
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise DataError(f"{source}: 'meta' must have keys {sorted(_META_KEYS)}, got {got}")
        alpha = raw["alpha"]
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha < 0
        ):
            raise DataError(f"{source}: meta 'alpha' must be a finite number >= 0, got {alpha!r}")
        for key in ("seed", "min_size", "num_clients", "num_samples"):
            if not _is_int(raw[key]) or raw[key] < 0:
                raise DataError(f"{source}: meta {key!r} must be a non-negative integer, got {raw[key]!r}")
        if raw["num_clients"] != len(clients) or raw["num_samples"] != len(owner):
            raise DataError(
                f"{source}: meta says {raw['num_clients']} clients / {raw['num_samples']} samples "
                f"but the file has {len(clients)} / {len(owner)}"
            )
        meta = PartitionMeta(
            alpha=float(alpha),
            seed=raw["seed"],
            min_size=raw["min_size"],
            num_clients=raw["num_clients"],
            num_samples=raw["num_samples"],
        )
    return Partition(clients=clients, answer_counts=counts, meta=meta)


def load_partition(path: Path | str) -> Partition:
    """Read and validate a partition JSON file written by ``save_partition``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read partition file {path}: {exc}") from exc
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise DataError(f"{path}: key {exc.args[0]!r} appears twice in one object") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    return _partition_from_json(data, str(path))
