"""Trust settings of a run, from its config: the server's defences, client-level DP, the simulated
attackers the round records mark. Engines hand these to :class:`fedumm.server.rounds.RoundLoop`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedumm.config import Config, client_names_of
from fedumm.fl.defense import DefenseSpec, PrivacySpec
from fedumm.fl.privacy import epsilon, noise_for_epsilon

__all__ = ["TrustSettings", "trust_settings", "noise_multiplier_of", "privacy_spec"]


@dataclass(frozen=True, kw_only=True)
class TrustSettings:
    """What the round loop needs besides the strategy: defences, DP, sampling, attacker marks."""

    defense: DefenseSpec
    privacy: PrivacySpec | None = None
    sampling: str = "fixed"
    adversaries: frozenset[str] = frozenset()

    def epsilon_after(self, rounds: int) -> float | None:
        """Epsilon at the configured delta after ``rounds`` rounds (None without DP)."""
        p = self.privacy
        if p is None:
            return None
        return epsilon(
            noise_multiplier=p.noise_multiplier,
            sample_rate=p.sample_rate,
            rounds=rounds,
            delta=p.delta,
            sampling=p.sampling,
            clients=p.clients,
        )


def noise_multiplier_of(cfg: Config) -> float:
    """z as configured, or the smallest z that meets ``privacy.target_epsilon`` after all rounds."""
    p, fed = cfg.privacy, cfg.federation
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    return noise_for_epsilon(
        target_epsilon=float(p.target_epsilon),  # type: ignore[arg-type]
        sample_rate=fed.sample_fraction,
        rounds=fed.rounds,
        delta=p.delta,
        sampling=fed.sampling,
        clients=fed.clients,
    )


def _group_clients(cfg: Config) -> dict[str, int]:
    """How many clients train each adapter group (from every client's task mix)."""
    from fedumm.models import family_info

    info = family_info(cfg.model.family)
    out: dict[str, int] = {}
    for mix in cfg.federation.task_of_clients():
        tasks = {
            "understanding": int(mix in ("understanding", "both")),
            "generation": int(mix in ("generation", "both")),
        }
        for g, n in info.group_examples(tasks).items():
            out[g] = out.get(g, 0) + int(n > 0)
    return out


def privacy_spec(cfg: Config) -> PrivacySpec | None:
    if not cfg.privacy.enabled:
        return None
    fed = cfg.federation
    return PrivacySpec(
        noise_multiplier=noise_multiplier_of(cfg),
        clip_norm=float(cfg.privacy.clip_norm),
        sampling=fed.sampling,
        sample_rate=fed.sample_fraction,
        clients=fed.clients,
        delta=cfg.privacy.delta,
        group_clients=_group_clients(cfg),
    )


def _rule_of(cfg: Config) -> str:
    """The robust rule that runs: ``auto`` is multi-Krum, except where the server must only average
    (DP: the guarantee covers the clipped mean; HE: the server sees no update in the clear)."""
    rule = cfg.federation.defense.rule
    if rule != "auto":
        return rule
    if cfg.privacy.enabled or cfg.federation.secure_aggregation != "none":
        return "none"
    return "auto"


def trust_settings(cfg: Config) -> TrustSettings:
    d = cfg.federation.defense
    spec = DefenseSpec(
        count_cap=d.count_cap,
        norm_bound=d.norm_bound,
        norm_multiple=d.norm_multiple,
        norm_value=d.norm_value,
        rule=_rule_of(cfg),
        trim_fraction=d.trim_fraction,
        krum_f=d.krum_f,
        krum_m=d.krum_m,
        space=d.space,
    )
    adversaries = (
        frozenset(cfg.adversary.chosen(client_names_of(cfg.federation.clients), cfg.seed))
        if cfg.adversary is not None
        else frozenset()
    )
    privacy = privacy_spec(cfg)
    if privacy is not None and math.isinf(privacy.clip_norm) and privacy.noise_multiplier > 0:
        from fedumm.errors import ConfigError

        raise ConfigError("privacy: noise_multiplier > 0 needs a finite clip_norm")
    return TrustSettings(
        defense=spec, privacy=privacy, sampling=cfg.federation.sampling, adversaries=adversaries
    )
