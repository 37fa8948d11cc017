"""The trust sections of the config: defaults, YAML spellings, and the combinations refused by name."""

from __future__ import annotations

import pytest

from fedumm.config import load_config
from fedumm.errors import ConfigError
from fedumm.server.trust import trust_settings

BASE = {"data": {"path": "/nonexistent"}}


def cfg(*overrides: str):
    return load_config(None, list(overrides), tree=dict(BASE))


def test_defaults_bound_counts_and_norms_and_exclude_by_krum():
    c = cfg()
    d = c.federation.defense
    assert (d.count_cap, d.norm_bound, d.norm_multiple, d.rule, d.krum_f) == (2.0, "adaptive", 2.0, "auto", 1)
    assert trust_settings(c).defense.rule == "auto"
    assert c.adversary is None and not c.privacy.enabled and c.federation.secure_aggregation == "none"
    t = trust_settings(c)
    assert t.privacy is None and t.adversaries == frozenset() and t.epsilon_after(3) is None


def test_auto_resolves_to_the_plain_mean_under_dp_and_he_and_explicit_rules_stay():
    dp = cfg("privacy.enabled=true", "privacy.noise_multiplier=1", "privacy.clip_norm=1")
    assert dp.federation.defense.rule == "auto" and trust_settings(dp).defense.rule == "none"
    he = cfg("engine=nvflare-poc", "federation.secure_aggregation=he", "federation.defense.norm_bound=off")
    assert trust_settings(he).defense.rule == "none"
    assert trust_settings(cfg("federation.defense.rule=median")).defense.rule == "median"
    assert trust_settings(cfg("federation.defense.rule=none")).defense.rule == "none"


def test_yaml_off_and_null():
    assert cfg("federation.defense.norm_bound=off").federation.defense.norm_bound == "off"
    assert cfg("federation.defense.count_cap=null").federation.defense.count_cap is None


def test_adversary_overrides_and_typos():
    c = cfg(
        "adversary.clients=1",
        "adversary.kind=scale",
        "adversary.strength=-50",
        "adversary.claimed_examples=1000000000",
    )
    assert c.adversary.claimed_examples == 10**9 and len(trust_settings(c).adversaries) == 1
    with pytest.raises(ConfigError, match="did you mean 'claimed_examples'"):
        cfg("adversary.claimed_example=5")
    with pytest.raises(ConfigError, match="adversary.kind"):
        cfg("adversary.clients=1", "adversary.kind=sybil")
    with pytest.raises(ConfigError, match="unknown"):
        cfg("adversary.clients=[site-09]")
    with pytest.raises(ConfigError, match="exceeds"):
        cfg("adversary.clients=5")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.enabled=true"], "exactly one of noise_multiplier and target_epsilon"),
        (
            ["privacy.enabled=true", "privacy.noise_multiplier=1", "federation.strategy=quality_weighted"],
            "weighted mean",
        ),
        (["privacy.enabled=true", "privacy.noise_multiplier=1", "federation.defense.rule=median"], "rule"),
        (["federation.secure_aggregation=he"], "nvflare-poc"),
        (["engine=nvflare-poc", "federation.secure_aggregation=he"], "norm_bound"),
        (
            [
                "engine=nvflare-poc",
                "federation.secure_aggregation=he",
                "federation.defense.norm_bound=off",
                "federation.strategy=fedadam",
            ],
            "plaintext",
        ),
        (
            [
                "federation.strategy=ffa_lora",
                "federation.defense.rule=median",
                "federation.defense.space=product",
            ],
            "frozen",
        ),
        (["federation.defense.norm_bound=fixed"], "norm_value"),
        (
            [
                "engine=nvflare-poc",
                "federation.secure_aggregation=he",
                "federation.defense.norm_bound=off",
                "federation.download_compression=bf16",
            ],
            "download_compression",
        ),
    ],
)
def test_incompatible_combinations_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg(*overrides)


def test_target_epsilon_chooses_the_noise_multiplier():
    from fedumm.fl.privacy import epsilon

    c = cfg(
        "privacy.enabled=true",
        "privacy.target_epsilon=8",
        "federation.rounds=5",
        "federation.sampling=poisson",
        "federation.sample_fraction=0.5",
    )
    t = trust_settings(c)
    z = t.privacy.noise_multiplier
    assert epsilon(noise_multiplier=z, sample_rate=0.5, rounds=5, delta=1e-5) <= 8.0
    assert t.epsilon_after(5) == pytest.approx(8.0, rel=1e-3)
    assert t.privacy.group_clients == {
        "vision": 4,
        "language": 4,
        "generation": 0,
        "alignment": 4,
        "other": 4,
    }
