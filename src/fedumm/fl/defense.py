"""The server's defences as one policy, applied per adapter group before any strategy aggregates.

Order, for every engine (the round loop calls :func:`defend` once per round):

1. example-count bound: no client weighs more than ``count_cap`` times the median reported count;
2. a norm bound on each client's delta (``norm_bound``: adaptive, a multiple of the round's median
   delta norm; or fixed), or, with client-level DP on, the DP clip to C over the whole adapter;
3. a robust rule (``median``, ``trimmed_mean``, ``multi_krum``; the default ``auto`` is multi-Krum
   in every group with at least ``krum_f + 3`` updates), in the space of the LoRA factors or of the
   products B·A;
4. with DP on: Gaussian noise on the aggregate.

The output is again a list of client updates, so that every registered strategy aggregates it as
usual: a count bound lowers reported counts; a norm bound scales deltas; multi-Krum gives excluded
clients the weight 0 in that group; median and trimmed mean hand every client of the group the
robust statistic, so any weighted mean of the group returns it; DP noise is one draw added to
every client of the group, so any weighted mean returns the noisy mean (strategies that use the
client states only through their weighted mean: FedAvg, FedProx, FedAdam, FedYogi, FFA-LoRA).

Spaces, for LoRA. The norm bound and the DP clip act on the factor delta (A - A0, B - B0); the
robust rules act on the factors (coordinate-wise over A and B separately, Krum distances over the
concatenated factor deltas) or, with ``space="product"``, on the products: the median / trimmed mean
of B_k·A_k refactored to rank r by truncated SVD, and Krum distances between the products' deltas
B_k·A_k - B·A. Frozen factors (FFA-LoRA's A) are never modified and never noised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from fedumm.errors import ConfigError
from fedumm.fl import robust
from fedumm.fl.aggregate import DEFAULT_GROUP, split_by_group
from fedumm.fl.lora_math import lora_product, pair_lora_keys, truncated_factors
from fedumm.fl.privacy import clip_delta, gaussian_like
from fedumm.types import AdapterState, ClientUpdate, DefenseEvent

__all__ = ["RULES", "SPACES", "DefenseSpec", "PrivacySpec", "DefenseOutcome", "defend", "noise_only"]

# auto: multi-Krum in a group with at least krum_f + 3 updates, the plain mean (no event) with fewer
RULES = ("none", "auto", "median", "trimmed_mean", "multi_krum")
SPACES = ("factors", "product")


@dataclass(frozen=True, kw_only=True)
class DefenseSpec:
    """Which defences run and their parameters (``federation.defense`` in the config)."""

    count_cap: float | None = 2.0  # None: reported counts are trusted
    norm_bound: str = "adaptive"  # adaptive | fixed | off
    norm_multiple: float = 2.0  # adaptive: bound = multiple * median delta norm of the group
    norm_value: float | None = None  # fixed: the bound itself
    rule: str = "auto"
    trim_fraction: float = 0.2  # trimmed_mean: share dropped at each end
    krum_f: int = 1  # multi_krum: attackers tolerated
    krum_m: int | None = None  # multi_krum: updates kept (None: n - f)
    space: str = "factors"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"defense rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.space not in SPACES:
            raise ConfigError(f"defense space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.norm_bound not in ("adaptive", "fixed", "off"):
            raise ConfigError(f"norm_bound must be adaptive, fixed or off, got {self.norm_bound!r}")
        if self.norm_bound == "fixed" and not (self.norm_value is not None and self.norm_value > 0):
            raise ConfigError("norm_bound: fixed needs norm_value > 0")


@dataclass(frozen=True, kw_only=True)
class PrivacySpec:
    """Client-level DP-FedAvg parameters (``privacy`` in the config, z resolved)."""

    noise_multiplier: float
    clip_norm: float  # C; math.inf = no clipping
    sampling: str  # poisson | fixed
    sample_rate: float
    clients: int
    delta: float = 1e-5  # the delta epsilon is reported at
    # clients that train each adapter group (E[m_g] = q K_g under Poisson sampling); missing: all
    group_clients: Mapping[str, int] = field(default_factory=dict)

    def expected_clients(self, group: str) -> float:
        return self.sample_rate * self.group_clients.get(group, self.clients)


@dataclass(frozen=True)
class DefenseOutcome:
    updates: list[ClientUpdate]
    events: list[DefenseEvent]
    noise_std: dict[str, float]  # per group, the std of the DP noise on the aggregate


class _Work:
    """One client's update while the defences rework it (copy-on-write: untouched tensors stay)."""

    def __init__(self, u: ClientUpdate, groups: Sequence[str]) -> None:
        self.update = u
        self.state: dict[str, torch.Tensor] = dict(u.state)
        self.num_examples = u.num_examples
        # per-group counts, materialised once a defence changes one (None: as reported)
        self.group_examples: dict[str, int] | None = (
            dict(u.group_examples) if u.group_examples is not None else None
        )
        self.groups = groups
        self.dropped = False  # excluded from the only group (no per-group counts to zero)

    def count(self, group: str) -> int:
        if self.group_examples is None or group == DEFAULT_GROUP:
            return self.num_examples
        return int(self.group_examples.get(group, 0))

    def set_count(self, group: str, n: int) -> None:
        if group == DEFAULT_GROUP:
            self.num_examples = n
            return
        if self.group_examples is None:
            self.group_examples = {g: self.num_examples for g in self.groups}
        self.group_examples[group] = n

    def result(self) -> ClientUpdate:
        return replace(
            self.update, state=self.state, num_examples=self.num_examples, group_examples=self.group_examples
        )


def _delta(work: _Work, global_state: AdapterState, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: work.state[k].detach().double() - global_state[k].detach().double() for k in keys}


def _set_from_delta(work: _Work, global_state: AdapterState, delta: Mapping[str, torch.Tensor]) -> None:
    for k, d in delta.items():
        work.state[k] = (global_state[k].detach().double() + d).to(global_state[k].dtype)


def defend(
    *,
    global_state: AdapterState,
    updates: Sequence[ClientUpdate],
    spec: DefenseSpec,
    group_of: Callable[[str], str] | None = None,
    frozen_suffixes: tuple[str, ...] = (),
    privacy: PrivacySpec | None = None,
    seed: int = 0,
) -> DefenseOutcome:
    """Apply the configured defences to validated updates; inputs are not mutated."""
    groups = split_by_group(list(global_state), group_of)
    names = list(groups)
    work = [_Work(u, names) for u in updates]
    events: list[DefenseEvent] = []
    frozen = frozen_suffixes
    trainable = {g: [k for k in ks if not (frozen and k.endswith(frozen))] for g, ks in groups.items()}

    if spec.count_cap is not None:
        _count_bound(work, names, spec.count_cap, events)
    if privacy is not None:
        _dp_clip(work, global_state, [k for ks in trainable.values() for k in ks], privacy.clip_norm, events)
    elif spec.norm_bound != "off":
        for g in names:
            _norm_bound(work, global_state, g, trainable[g], spec, events)
    if spec.rule != "none":
        for g in names:
            _robust_rule(work, global_state, g, trainable[g], spec, events)
    noise_std: dict[str, float] = {}
    if privacy is not None:
        gen = torch.Generator().manual_seed(seed)
        for g in names:
            std = _dp_noise(work, global_state, g, trainable[g], privacy, gen)
            if std is not None:
                noise_std[g] = std
    return DefenseOutcome(
        updates=[w.result() for w in work if not w.dropped], events=events, noise_std=noise_std
    )


def _count_bound(work: list[_Work], groups: Sequence[str], cap: float, events: list[DefenseEvent]) -> None:
    for g in groups:
        active = [w for w in work if w.count(g) > 0]
        if not active:
            continue
        bound = robust.count_bound([w.count(g) for w in active], cap)
        for w in active:
            n = w.count(g)
            if n > bound:
                w.set_count(g, bound)
                events.append(
                    DefenseEvent(
                        client=w.update.client_id,
                        group=g,
                        action="down_weighted",
                        reason=f"reported {n} examples, more than {cap:g} x the median; counted as {bound}",
                        value=float(n),
                    )
                )
    # the overall count (FedAvg's weight where no per-group counts exist) follows the same bound
    active = [w for w in work if w.num_examples > 0]
    if active and groups != [DEFAULT_GROUP]:
        bound = robust.count_bound([w.num_examples for w in active], cap)
        for w in active:
            w.num_examples = min(w.num_examples, bound)


def _dp_clip(
    work: list[_Work],
    global_state: AdapterState,
    keys: Sequence[str],
    clip: float,
    events: list[DefenseEvent],
) -> None:
    if math.isinf(clip):
        return  # C = inf: nothing is clipped, and the tensors stay exactly as sent
    for w in work:
        delta = _delta(w, global_state, keys)
        clipped, norm, scale = clip_delta(delta, clip)
        if scale < 1.0:
            _set_from_delta(w, global_state, clipped)
            events.append(
                DefenseEvent(
                    client=w.update.client_id,
                    group="*",
                    action="clipped",
                    reason=f"DP clip: delta norm {norm:.4g} > C = {clip:g}",
                    value=norm,
                )
            )


def _norm_bound(
    work: list[_Work],
    global_state: AdapterState,
    group: str,
    keys: Sequence[str],
    spec: DefenseSpec,
    events: list[DefenseEvent],
) -> None:
    active = [w for w in work if w.count(group) > 0]
    if not active or not keys:
        return
    deltas = [_delta(w, global_state, keys) for w in active]
    norms = [robust.state_norm(d) for d in deltas]
    if spec.norm_bound == "adaptive":
        bound = robust.adaptive_norm_bound(norms, spec.norm_multiple)
        how = f"{spec.norm_multiple:g} x the median delta norm"
    else:
        bound = float(spec.norm_value)  # type: ignore[arg-type]
        how = "the fixed bound"
    for w, d, n in zip(active, deltas, norms, strict=True):
        scale = robust.clip_scale(n, bound)
        if scale < 1.0:
            _set_from_delta(w, global_state, {k: t * scale for k, t in d.items()})
            events.append(
                DefenseEvent(
                    client=w.update.client_id,
                    group=group,
                    action="clipped",
                    reason=f"delta norm {n:.4g} above {how} ({bound:.4g}); scaled by {scale:.4g}",
                    value=n,
                )
            )


def _robust_rule(
    work: list[_Work],
    global_state: AdapterState,
    group: str,
    keys: Sequence[str],
    spec: DefenseSpec,
    events: list[DefenseEvent],
) -> None:
    active = [w for w in work if w.count(group) > 0]
    if not active or not keys:
        return
    if spec.rule == "auto":
        if len(active) >= spec.krum_f + 3:
            _multi_krum(active, global_state, group, keys, spec, events)
        return
    if spec.rule == "multi_krum":
        _multi_krum(active, global_state, group, keys, spec, events)
        return
    n = len(active)
    if n < 3:  # a median or a trimmed mean of one or two updates is their mean: say so
        events.append(
            DefenseEvent(
                client="*",
                group=group,
                action="skipped",
                reason=f"{spec.rule} needs at least 3 clients in the group, got {n}",
                value=float(n),
            )
        )
        return
    pairs, other = pair_lora_keys(keys) if spec.space == "product" else ([], list(keys))
    if spec.rule == "trimmed_mean":
        stat = lambda ts: robust.trimmed_mean(ts, spec.trim_fraction)  # noqa: E731
    else:
        stat = robust.coordinate_median
    shares = [0.0] * n
    values: dict[str, torch.Tensor] = {}
    for k in other:
        tensors = [w.state[k] for w in active]
        values[k] = stat(tensors)
        if spec.rule == "trimmed_mean":
            for i, s in enumerate(robust.trimmed_share(tensors, spec.trim_fraction)):
                shares[i] += s * tensors[0].numel()
    for p in pairs:
        products = [lora_product(w.state[p.b_key], w.state[p.a_key]) for w in active]  # (out, in)
        rank = global_state[p.a_key].shape[0]
        b, a = truncated_factors(stat(products), rank)
        values[p.b_key], values[p.a_key] = b, a
        if spec.rule == "trimmed_mean":
            for i, s in enumerate(robust.trimmed_share(products, spec.trim_fraction)):
                shares[i] += s * products[0].numel()
    for w in active:
        for k, v in values.items():
            w.state[k] = v.to(global_state[k].dtype)
    if spec.rule == "trimmed_mean":
        total = sum(global_state[k].numel() for k in other) + sum(
            global_state[p.b_key].shape[0] * global_state[p.a_key].shape[1] for p in pairs
        )
        for w, s in zip(active, shares, strict=True):
            if s > 0:
                events.append(
                    DefenseEvent(
                        client=w.update.client_id,
                        group=group,
                        action="trimmed",
                        reason=f"trimmed mean dropped {s / total:.1%} of its coordinates ({spec.space})",
                        value=s / total,
                    )
                )


def _krum_vector(w: _Work, global_state: AdapterState, keys: Sequence[str], space: str) -> torch.Tensor:
    if space == "factors":
        return torch.cat([(w.state[k].double() - global_state[k].double()).reshape(-1) for k in keys])
    pairs, other = pair_lora_keys(keys)
    parts = [(w.state[k].double() - global_state[k].double()).reshape(-1) for k in other]
    for p in pairs:
        mine = lora_product(w.state[p.b_key], w.state[p.a_key])
        base = lora_product(global_state[p.b_key], global_state[p.a_key])
        parts.append((mine - base).reshape(-1))
    return torch.cat(parts)


def _multi_krum(
    active: list[_Work],
    global_state: AdapterState,
    group: str,
    keys: Sequence[str],
    spec: DefenseSpec,
    events: list[DefenseEvent],
) -> None:
    n, f = len(active), spec.krum_f
    if n - f - 2 < 1:
        events.append(
            DefenseEvent(
                client="*",
                group=group,
                action="skipped",
                reason=f"multi-Krum with f={f} needs at least {f + 3} clients in the group, got {n}",
                value=float(n),
            )
        )
        return
    vectors = [_krum_vector(w, global_state, keys, spec.space) for w in active]
    sq = robust.pairwise_sq_distances(vectors)
    scores = robust.krum_scores(sq, f)
    keep = set(robust.multi_krum_select(sq, f, spec.krum_m))
    m = len(keep)
    for i, w in enumerate(active):
        if i in keep:
            continue
        if group == DEFAULT_GROUP:
            w.dropped = True
        else:
            w.set_count(group, 0)
        events.append(
            DefenseEvent(
                client=w.update.client_id,
                group=group,
                action="excluded",
                reason=f"multi-Krum score {scores[i]:.4g} not among the {m} lowest ({spec.space})",
                value=scores[i],
            )
        )


def _dp_noise(
    work: list[_Work],
    global_state: AdapterState,
    group: str,
    keys: Sequence[str],
    privacy: PrivacySpec,
    gen: torch.Generator,
) -> float | None:
    active = [w for w in work if w.count(group) > 0]
    if not active or not keys:
        return None
    z, clip = privacy.noise_multiplier, privacy.clip_norm
    if privacy.sampling == "poisson":
        # the fixed-denominator estimator: sum of clipped deltas / E[m_g], every client weighing 1
        denom = privacy.expected_clients(group)
        for w in active:
            d = _delta(w, global_state, keys)
            _set_from_delta(w, global_state, {k: t * (len(active) / denom) for k, t in d.items()})
            w.set_count(group, 1)
        std = z * clip / denom
    else:
        total = sum(w.count(group) for w in active)
        std = z * clip * max(w.count(group) for w in active) / total
    if z == 0:
        return 0.0  # no draw at all: DP at z = 0 leaves the updates exactly as they were
    if math.isinf(std):
        raise ConfigError("privacy: noise needs a finite clip_norm (C) when noise_multiplier > 0")
    noise = {k: gaussian_like(global_state[k], std, gen) for k in keys}  # one draw for the group
    for w in active:
        for k in keys:
            w.state[k] = (w.state[k].detach().double() + noise[k]).to(global_state[k].dtype)
    return std


def noise_only(
    *,
    global_state: AdapterState,
    privacy: PrivacySpec,
    group_of: Callable[[str], str] | None = None,
    frozen_suffixes: tuple[str, ...] = (),
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A Poisson round that sampled no client still releases noise: global + N(0, (z C / E[m_g])^2)."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.detach().clone() for k, v in global_state.items()}
    stds: dict[str, float] = {}
    for g, keys in split_by_group(list(global_state), group_of).items():
        keys = [k for k in keys if not (frozen_suffixes and k.endswith(frozen_suffixes))]
        std = privacy.noise_multiplier * privacy.clip_norm / privacy.expected_clients(g)
        if not keys or std == 0:
            continue
        for k in keys:
            out[k] = (out[k].double() + gaussian_like(out[k], std, gen)).to(global_state[k].dtype)
        stds[g] = std
    return out, stds
