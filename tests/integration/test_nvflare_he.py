"""Secure aggregation on a real FLARE POC: CKKS-encrypted deltas (FLARE's HE filters, HEBuilder's
provisioned contexts), summed by a server without a secret key, equal plaintext FedAvg."""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch

pytest.importorskip("nvflare")
pytest.importorskip("tenseal")

from fedumm.config import load_config  # noqa: E402
from fedumm.errors import ConfigError  # noqa: E402
from fedumm.experiment import run_experiment  # noqa: E402
from fedumm.io import read_safetensors  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.nvflare, pytest.mark.slow]


def _free_ports(n: int = 2) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture()
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tree(base: dict, engine: str, he: bool) -> dict:
    tree = copy.deepcopy(base)
    tree["engine"] = engine
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    # the norm bound needs plaintext deltas: off in both runs, so they aggregate the same way
    tree["federation"].update(defense={"norm_bound": "off"}, secure_aggregation="he" if he else "none")
    fl_port, admin_port = _free_ports()
    tree["nvflare"] = {
        "fl_port": fl_port,
        "admin_port": admin_port,
        "round_timeout_s": 120,
        "start_timeout_s": 180,
    }
    return tree


def test_he_refuses_what_needs_plaintext(tiny_config_tree):
    tree = _tree(tiny_config_tree, "nvflare-poc", he=True)
    tree["federation"]["defense"] = {"norm_bound": "adaptive"}
    with pytest.raises(ConfigError, match="norm_bound"):
        load_config(None, tree=tree)
    tree["federation"].update(defense={"norm_bound": "off"}, strategy="fedadam")
    with pytest.raises(ConfigError, match="plaintext"):
        load_config(None, tree=tree)


def test_he_on_the_poc_matches_plaintext_fedavg(tiny_config_tree, tmp_path, one_thread):
    ref_dir, he_dir = tmp_path / "plain", tmp_path / "he"
    run_experiment(load_config(None, tree=_tree(tiny_config_tree, "inprocess", he=False)), ref_dir)
    summary = run_experiment(load_config(None, tree=_tree(tiny_config_tree, "nvflare-poc", he=True)), he_dir)
    assert summary.status == "finished"
    diffs = []
    for rnd in (1, 2):
        ref = read_safetensors(ref_dir / "checkpoint" / f"round-{rnd:04d}.safetensors")
        got = read_safetensors(he_dir / "checkpoint" / f"round-{rnd:04d}.safetensors")
        assert sorted(ref) == sorted(got)
        diffs.append(max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref))
    # round 1 is the CKKS error alone; in round 2 the clients also trained from a start point that
    # differed by it, and local training amplifies the difference
    print(f"largest |HE on the POC - plaintext FedAvg| per round: {', '.join(f'{d:.3g}' for d in diffs)}")
    assert diffs[0] < 1e-5 and diffs[1] < 1e-4
    # what crossed the wire up was ciphertext: far larger than the fp32 delta
    plain = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    enc = [json.loads(x) for x in (he_dir / "metrics.jsonl").read_text().splitlines()]
    for p, e in zip(plain, enc, strict=True):
        assert all(e["bytes_up"][c] > 5 * p["bytes_up"][c] for c in p["bytes_up"])
    logs = he_dir / "nvflare" / "poc" / "logs"
    client_log = "".join(p.read_text(errors="replace") for p in logs.glob("site-*/**/log.txt"))
    assert "Encrypting vars" in client_log or "HE encryption" in client_log
