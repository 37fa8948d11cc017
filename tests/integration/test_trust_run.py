"""Whole federations with the trust features: DP wiring is the identity at z = 0 and C = inf, attacks
are marked and bounded, epsilon is recorded per round, a backdoor reports its attack success."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from fedumm.config import load_config
from fedumm.experiment import run_experiment
from fedumm.io import read_safetensors

pytestmark = pytest.mark.integration


def _tree(base: dict, **sections) -> dict:
    tree = copy.deepcopy(base)
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            tree[k] = {**tree[k], **v}
        else:
            tree[k] = v
    return tree


def _rounds(path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_dp_at_zero_noise_and_infinite_clip_is_bit_identical(tiny_config_tree, tmp_path):
    plain = run_experiment(load_config(None, tree=_tree(tiny_config_tree)), tmp_path / "plain")
    dp_tree = _tree(
        tiny_config_tree, privacy={"enabled": True, "noise_multiplier": 0.0, "clip_norm": math.inf}
    )
    dp = run_experiment(load_config(None, tree=dp_tree), tmp_path / "dp")
    for rnd in (1, 2):
        a = read_safetensors(tmp_path / "plain" / "checkpoint" / f"round-{rnd:04d}.safetensors")
        b = read_safetensors(tmp_path / "dp" / "checkpoint" / f"round-{rnd:04d}.safetensors")
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert dp.federated.vqa_accuracy == plain.federated.vqa_accuracy
    assert [r["epsilon"] for r in _rounds(tmp_path / "dp")] == [math.inf, math.inf]  # z = 0: no guarantee
    assert dp.noise_multiplier == 0.0 and plain.noise_multiplier is None


def test_scaled_attacker_with_a_billion_examples_is_marked_and_bounded(tiny_config_tree, tmp_path):
    tree = _tree(
        tiny_config_tree,
        federation={"clients": 3, "rounds": 1, "min_partition_size": 4},
        adversary={"clients": ["site-03"], "kind": "scale", "strength": -50, "claimed_examples": 10**9},
    )
    summary = run_experiment(load_config(None, tree=tree), tmp_path / "run")
    (r,) = _rounds(tmp_path / "run")
    assert r["adversarial"] == ["site-03"] and summary.adversarial_clients == ("site-03",)
    assert r["client_metrics"]["site-03"]["num_examples"] == 10**9  # what it claimed is kept in the log
    actions = {(e["client"], e["action"]) for e in r["defense"]}
    assert ("site-03", "down_weighted") in actions and ("site-03", "clipped") in actions
    assert all(e["client"] == "site-03" for e in r["defense"])  # the honest clients are untouched


def test_by_default_multi_krum_excludes_the_scaled_attacker_among_four(tiny_config_tree, tmp_path):
    tree = _tree(
        tiny_config_tree,
        federation={"clients": 4, "rounds": 1, "min_partition_size": 4},
        adversary={"clients": ["site-04"], "kind": "scale", "strength": -50, "claimed_examples": 10**9},
    )
    cfg = load_config(None, tree=tree)
    assert cfg.federation.defense.rule == "auto"
    run_experiment(cfg, tmp_path / "run")
    (r,) = _rounds(tmp_path / "run")
    excluded = {(e["client"], e["group"]) for e in r["defense"] if e["action"] == "excluded"}
    groups = {e["group"] for e in r["defense"] if e["action"] == "excluded"}
    assert groups and excluded == {("site-04", g) for g in groups}  # one exclusion (f = 1), the attacker's
    assert all("multi-Krum" in e["reason"] for e in r["defense"] if e["action"] == "excluded")


def test_dp_with_poisson_sampling_records_epsilon_every_round(tiny_config_tree, tmp_path):
    tree = _tree(
        tiny_config_tree,
        federation={
            "clients": 3,
            "rounds": 2,
            "min_partition_size": 4,
            "sampling": "poisson",
            "sample_fraction": 0.7,
        },
        privacy={"enabled": True, "noise_multiplier": 1.0, "clip_norm": 0.5},
    )
    summary = run_experiment(load_config(None, tree=tree), tmp_path / "run")
    eps = [r["epsilon"] for r in _rounds(tmp_path / "run")]
    from fedumm.fl.privacy import epsilon

    assert eps == [epsilon(noise_multiplier=1.0, sample_rate=0.7, rounds=t, delta=1e-5) for t in (1, 2)]
    assert eps[0] < eps[1] and summary.epsilon == eps[1]
    summary_json = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary_json["privacy"] == {"epsilon": eps[1], "delta": 1e-5, "noise_multiplier": 1.0}


def test_backdoor_reports_attack_success_beside_clean_accuracy(tiny_config_tree, tmp_path):
    tree = _tree(
        tiny_config_tree,
        federation={"rounds": 1},
        adversary={"clients": 1, "kind": "backdoor", "target_answer": "purple"},
    )
    summary = run_experiment(load_config(None, tree=tree), tmp_path / "run")
    assert 0.0 <= summary.federated.attack_success <= 100.0
    assert 0.0 <= summary.federated.vqa_accuracy <= 100.0
    triggered = list((tmp_path / "run" / "adversary").rglob("*-trigger.png"))
    assert any("test" in p.parts for p in triggered) and any(
        summary.adversarial_clients[0] in p.parts for p in triggered
    )
