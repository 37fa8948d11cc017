"""A simulated attacker under FLARE's simulator: the same attack, marks and defences as in process."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("nvflare")

from fedumm.config import load_config  # noqa: E402
from fedumm.experiment import run_experiment  # noqa: E402
from fedumm.io import read_safetensors  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.nvflare, pytest.mark.slow]


def _tree(base: dict, engine: str) -> dict:
    tree = copy.deepcopy(base)
    tree["engine"] = engine
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    tree["federation"].update(clients=3, rounds=1, min_partition_size=4)
    tree["adversary"] = {"clients": ["site-02"], "kind": "scale", "strength": -50, "claimed_examples": 10**9}
    return tree


def test_sim_attacker_matches_inprocess(tiny_config_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_experiment(load_config(None, tree=_tree(tiny_config_tree, "inprocess")), tmp_path / "ref")
    run_experiment(load_config(None, tree=_tree(tiny_config_tree, "nvflare-sim")), tmp_path / "sim")
    ref = read_safetensors(tmp_path / "ref" / "checkpoint" / "round-0001.safetensors")
    got = read_safetensors(tmp_path / "sim" / "checkpoint" / "round-0001.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0)
    (r_ref,) = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    (r_sim,) = [json.loads(x) for x in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()]
    assert r_sim["adversarial"] == r_ref["adversarial"] == ["site-02"]
    assert [(e["client"], e["action"]) for e in r_sim["defense"]] == [
        (e["client"], e["action"]) for e in r_ref["defense"]
    ]
    assert r_sim["client_metrics"]["site-02"]["num_examples"] == 10**9
