"""The defence policy: per group, composed with every strategy, each action recorded; DP wiring."""

from __future__ import annotations

import math

import pytest
import torch

from fedumm.fl.defense import DefenseSpec, PrivacySpec, defend, noise_only
from fedumm.fl.lora_math import lora_product
from fedumm.fl.strategies import STRATEGIES, make_strategy
from fedumm.fl.strategies.server_opt import ServerOptimizer
from fedumm.types import ClientUpdate

A, B = "lang.q.lora_A.weight", "lang.q.lora_B.weight"
GA, GB = "gen.h.lora_A.weight", "gen.h.lora_B.weight"
OFF = DefenseSpec(count_cap=None, norm_bound="off", rule="none")


def group_of(key: str) -> str:
    return key.split(".")[0]


def state(a: float, b: float, *, ga: float = 0.0, gb: float = 0.0) -> dict[str, torch.Tensor]:
    # rank 1: A (1, 2), B (2, 1)
    f = torch.float32
    return {
        A: torch.tensor([[a, a]], dtype=f),
        B: torch.tensor([[b], [b]], dtype=f),
        GA: torch.tensor([[ga, ga]], dtype=f),
        GB: torch.tensor([[gb], [gb]], dtype=f),
    }


G0 = state(0.0, 0.0)


def upd(cid: str, s, n: int = 10, groups=None) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid, state=s, num_examples=n, group_examples=groups, metrics={"val_score": 0.5}
    )


def test_no_defence_returns_the_same_tensors():
    ups = [upd("a", state(1, 1)), upd("b", state(2, 2))]
    out = defend(global_state=G0, updates=ups, spec=OFF, group_of=group_of)
    assert out.events == [] and out.noise_std == {}
    assert all(o.state[k] is u.state[k] for o, u in zip(out.updates, ups, strict=True) for k in u.state)


def test_count_bound_caps_a_billion_example_claim_per_group():
    ups = [
        upd("a", state(1, 1), 10, {"lang": 10, "gen": 10}),
        upd("b", state(1, 1), 20, {"lang": 20, "gen": 0}),
        upd("c", state(1, 1), 30, {"lang": 30, "gen": 30}),
        upd("evil", state(1, 1), 10**9, {"lang": 10**9, "gen": 10**9}),
    ]
    out = defend(
        global_state=G0,
        updates=ups,
        spec=DefenseSpec(count_cap=2.0, norm_bound="off", rule="none"),
        group_of=group_of,
    )
    evil = out.updates[-1]
    # lang: median(10, 20, 30, 1e9) = 25 -> 50; gen: median(10, 30, 1e9) = 30 -> 60 (b trains no gen)
    assert evil.group_examples == {"lang": 50, "gen": 60} and evil.num_examples == 50
    assert [(e.client, e.group, e.action) for e in out.events] == [
        ("evil", "gen", "down_weighted"),
        ("evil", "lang", "down_weighted"),
    ]
    assert "1000000000" in out.events[0].reason
    # FedAvg's lang weight of the attacker is now 50 / 110, not ~1
    new = make_strategy("fedavg").aggregate(global_state=G0, updates=out.updates, group_of=group_of)
    assert torch.allclose(new[A], torch.ones(1, 2))


def test_adaptive_norm_bound_clips_the_outlier_in_its_group_only():
    ups = [upd("a", state(1, 0, ga=1)), upd("b", state(2, 0, ga=1)), upd("c", state(-100, 0, ga=1))]
    spec = DefenseSpec(count_cap=None, norm_bound="adaptive", norm_multiple=2.0)
    out = defend(global_state=G0, updates=ups, spec=spec, group_of=group_of)
    # lang norms: sqrt(2) * (1, 2, 100); median sqrt(2) * 2; bound 4 sqrt(2) -> c scaled by 0.04
    c = out.updates[2].state
    assert torch.allclose(c[A], torch.tensor([[-4.0, -4.0]]))
    assert c[GA] is ups[2].state[GA]  # gen: every norm equal, nothing clipped
    assert [(e.client, e.group, e.action) for e in out.events] == [("c", "lang", "clipped")]


def test_fixed_norm_bound():
    ups = [upd("a", state(3, 4 / math.sqrt(2)))]  # lang delta norm sqrt(9 + 9 + 8 + 8) > 1
    spec = DefenseSpec(count_cap=None, norm_bound="fixed", norm_value=1.0)
    out = defend(global_state=G0, updates=ups, spec=spec, group_of=group_of)
    d = out.updates[0].state
    assert math.sqrt(float(d[A].pow(2).sum() + d[B].pow(2).sum())) == pytest.approx(1.0, rel=1e-6)


def test_multi_krum_excludes_the_far_update_and_any_strategy_ignores_it():
    ups = [upd(c, state(v, v)) for c, v in (("a", 1.0), ("b", 1.1), ("c", 0.9), ("d", 1.05), ("evil", -50.0))]
    spec = DefenseSpec(count_cap=None, norm_bound="off", rule="multi_krum", krum_f=1)
    out = defend(global_state=G0, updates=ups, spec=spec, group_of=group_of)
    excluded = {(e.client, e.group) for e in out.events if e.action == "excluded"}
    assert ("evil", "lang") in excluded and not any(c != "evil" for c, g in excluded if g == "lang")
    new = make_strategy("fedavg").aggregate(global_state=G0, updates=out.updates, group_of=group_of)
    assert torch.allclose(new[A], torch.full((1, 2), 1.0125))


def test_coordinate_median_in_factor_and_product_space():
    # products B_k A_k = b_k a_k ones(2, 2) with b a = 1, 6, 6: median 6 (product space);
    # the factor medians a = 2, b = 2 give 4 (factor space)
    ups = [upd("a", state(1, 1)), upd("b", state(3, 2)), upd("c", state(2, 3))]
    for space, expect in (("factors", 4.0), ("product", 6.0)):
        spec = DefenseSpec(count_cap=None, norm_bound="off", rule="median", space=space)
        out = defend(global_state=G0, updates=ups, spec=spec, group_of=group_of)
        for name in STRATEGIES.names():
            if issubclass(STRATEGIES.get(name), ServerOptimizer) or name == "ffa_lora":
                continue  # server optimisers step towards the median; FFA-LoRA needs A frozen
            new = make_strategy(name).aggregate(global_state=G0, updates=out.updates, group_of=group_of)
            assert torch.allclose(
                lora_product(new[B], new[A]), torch.full((2, 2), expect, dtype=torch.float64)
            ), (
                space,
                name,
            )


def test_trimmed_mean_records_each_client_share():
    ups = [upd(c, state(v, v)) for c, v in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0), ("evil", 99.0))]
    spec = DefenseSpec(count_cap=None, norm_bound="off", rule="trimmed_mean", trim_fraction=0.2)
    out = defend(global_state=G0, updates=ups, spec=spec, group_of=group_of)
    new = make_strategy("fedavg").aggregate(global_state=G0, updates=out.updates, group_of=group_of)
    assert torch.allclose(new[A], torch.full((1, 2), 3.0))
    shares = {e.client: e.value for e in out.events if e.group == "lang"}
    assert shares["evil"] == 1.0 and shares["a"] == 1.0 and "b" not in shares


def test_auto_is_multi_krum_from_f_plus_3_updates_and_the_plain_mean_below():
    five = [
        upd(c, state(v, v)) for c, v in (("a", 1.0), ("b", 1.1), ("c", 0.9), ("d", 1.05), ("evil", -50.0))
    ]
    auto = DefenseSpec(count_cap=None, norm_bound="off", rule="auto", krum_f=1)
    krum = DefenseSpec(count_cap=None, norm_bound="off", rule="multi_krum", krum_f=1)
    a = defend(global_state=G0, updates=five, spec=auto, group_of=group_of)
    k = defend(global_state=G0, updates=five, spec=krum, group_of=group_of)
    assert a.events == k.events and ("evil", "lang", "excluded") in {
        (e.client, e.group, e.action) for e in a.events
    }
    fed = make_strategy("fedavg")
    got, ref = (fed.aggregate(global_state=G0, updates=o.updates, group_of=group_of) for o in (a, k))
    assert all(torch.equal(got[key], ref[key]) for key in ref)
    # three updates (f + 2): too few for Krum's neighbourhoods; auto averages them and records nothing
    three = five[:2] + five[-1:]
    out = defend(global_state=G0, updates=three, spec=auto, group_of=group_of)
    assert out.events == []
    mean = fed.aggregate(global_state=G0, updates=out.updates, group_of=group_of)
    assert torch.allclose(mean[A], torch.full((1, 2), (1.0 + 1.1 - 50.0) / 3))
    assert DefenseSpec().rule == "auto"


def test_a_robust_rule_with_too_few_clients_is_recorded_not_silent():
    ups = [upd("a", state(1, 1)), upd("b", state(2, 2))]
    spec = DefenseSpec(count_cap=None, norm_bound="off", rule="median")
    out = defend(global_state=G0, updates=ups, spec=spec, group_of=group_of)
    assert {e.action for e in out.events} == {"skipped"}


def privacy(z: float, clip: float, sampling: str = "fixed", q: float = 1.0, k: int = 3) -> PrivacySpec:
    return PrivacySpec(noise_multiplier=z, clip_norm=clip, sampling=sampling, sample_rate=q, clients=k)


def test_dp_at_zero_noise_and_infinite_clip_is_the_identity():
    ups = [upd("a", state(1, 2), 10), upd("b", state(5, -3), 30)]
    out = defend(global_state=G0, updates=ups, spec=OFF, group_of=group_of, privacy=privacy(0.0, math.inf))
    assert all(o.state[k] is u.state[k] for o, u in zip(out.updates, ups, strict=True) for k in u.state)
    assert [o.num_examples for o in out.updates] == [10, 30]


def test_dp_clips_over_the_whole_adapter_and_adds_one_draw_of_the_right_std():
    ups = [upd("a", state(3, 0, ga=4), 10), upd("b", state(0.1, 0), 30)]
    out = defend(global_state=G0, updates=ups, spec=OFF, group_of=group_of, privacy=privacy(0.0, 1.0))
    a = out.updates[0].state
    total = sum(float(a[k].pow(2).sum()) for k in a)
    assert total == pytest.approx(1.0, rel=1e-6) and [e.action for e in out.events] == ["clipped"]
    # noise: std z C max_k w_k = 2 * 1 * 30 / 40 for lang; identical on both clients
    out = defend(global_state=G0, updates=ups, spec=OFF, group_of=group_of, privacy=privacy(2.0, 1.0), seed=1)
    assert out.noise_std["lang"] == pytest.approx(1.5)
    da = (
        out.updates[0].state[B]
        - defend(global_state=G0, updates=ups, spec=OFF, group_of=group_of, privacy=privacy(0.0, 1.0))
        .updates[0]
        .state[B]
    )
    db = out.updates[1].state[B] - ups[1].state[B]
    assert torch.allclose(da, db, atol=1e-6) and float(da.abs().sum()) > 0


def test_dp_poisson_uses_the_fixed_denominator_with_uniform_weights():
    ups = [upd("a", state(0.5, 0), 10), upd("b", state(0.25, 0), 1000)]
    p = privacy(0.0, 10.0, sampling="poisson", q=0.5, k=8)  # E[m] = 4
    out = defend(global_state=G0, updates=ups, spec=OFF, group_of=group_of, privacy=p)
    new = make_strategy("fedavg").aggregate(global_state=G0, updates=out.updates, group_of=group_of)
    # (0.5 + 0.25) / 4, whatever the example counts
    assert torch.allclose(new[A], torch.full((1, 2), 0.1875))
    noisy, stds = noise_only(global_state=G0, privacy=privacy(1.0, 2.0, "poisson", 0.5, 8), group_of=group_of)
    assert stds == {"lang": 0.5, "gen": 0.5} and float(noisy[A].abs().sum()) > 0


def test_ffa_lora_with_dp_noises_b_only():
    ffa = make_strategy("ffa_lora")
    g = state(0.3, 0.0, ga=0.3)  # A at its shared initial value
    ups = [upd("a", state(0.3, 1.0, ga=0.3, gb=2.0), 10), upd("b", state(0.3, -1.0, ga=0.3), 10)]
    out = defend(
        global_state=g,
        updates=ups,
        spec=OFF,
        group_of=group_of,
        privacy=privacy(1.0, 5.0),
        frozen_suffixes=ffa.frozen_suffixes,
        seed=3,
    )
    for o in out.updates:
        assert torch.equal(o.state[A], g[A]) and torch.equal(o.state[GA], g[GA])  # A: frozen, no noise
    new = ffa.aggregate(global_state=g, updates=out.updates, group_of=group_of)  # accepted: A untouched
    assert not torch.equal(new[B], torch.zeros(2, 1))


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_default_defences_keep_every_strategy_fixed_point(name):
    """Identical honest clients trip no defence and every strategy aggregates them as without one."""
    strategy = make_strategy(name)
    g = state(0.2, 0.0, ga=0.2)
    s = state(0.2, 0.5, ga=0.2, gb=0.1)
    ups = [upd(c, s, 10) for c in ("a", "b", "c")]
    out = defend(global_state=g, updates=ups, spec=DefenseSpec(), group_of=group_of)
    assert out.events == []
    ref = make_strategy(name).aggregate(global_state=g, updates=ups, group_of=group_of)
    got = strategy.aggregate(global_state=g, updates=out.updates, group_of=group_of)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
