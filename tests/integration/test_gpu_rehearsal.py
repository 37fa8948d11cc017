"""The real-size rehearsal script (benchmarks/gpu_rehearsal.py) runs on the CPU at tiny widths: both
families are built from copies of the released configs with random weights, one round of the
in-process engine per K, and the figures it writes are finite and agree with the ledger's payloads.
Nothing here needs a GPU; without one, ``--device cuda`` is one line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_rehearsal.py"
K, EXAMPLES = 2, 2
HEADER_SLACK = 64  # safetensors header bytes of the broadcast's metadata ({"round": "1"}, padded)
META_SLACK = 1024  # an update's metadata: client id, example counts, metrics


def _script():
    spec = importlib.util.spec_from_file_location("gpu_rehearsal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rehearsal")
    cmd = [
        sys.executable,
        str(SCRIPT),
        *("--tiny", "--device", "cpu", "--dtype", "fp32", "--family", "both"),
        *("--clients", str(K), "--examples", str(EXAMPLES), "--batch-size", "2", "--no-warmup"),
        *("--profile", "--out", str(out)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| BLIP3o-8B (tiny widths) | 2 |" in proc.stdout
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    result["_out"] = str(out)
    return result


def test_the_smoke_run_writes_finite_positive_figures(smoke):
    assert smoke["device"] == "cpu" and smoke["tiny"] and "peak resident set" in smoke["memory"]
    assert [f["family"] for f in smoke["families"]] == ["blip3o", "janus"]
    for fam in smoke["families"]:
        # fp32: four bytes per backbone and adapter parameter (the stand-in target encoder left out)
        assert fam["backbone_params"] > fam["adapter_params"] > 0
        assert fam["backbone_bytes"] == 4 * fam["backbone_params"]
        assert fam["adapter_tensor_bytes"] == 4 * fam["adapter_params"]
        assert sum(fam["backbone_params_per_tower"].values()) <= fam["backbone_params"]
        stand_in = fam["stand_in_target_encoder_params"]
        assert stand_in > 0 if fam["family"] == "blip3o" else stand_in == 0
        (r,) = fam["rounds"]
        assert r["clients"] == K
        assert r["examples_per_client"] == {"understanding": EXAMPLES, "generation": EXAMPLES}
        assert r["steps_per_client"] == [2] * K  # one VQA and one caption batch of 2
        for key in ("round_wall_s", "loop_wall_s", "train_loss_mean", "peak_rss_bytes"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["final_adapter_finite"]
        assert r["one_model_per_client_bytes"] == K * fam["backbone_bytes"]
        assert r["fedumm_example_bytes"] == K * smoke["fedumm_example_bytes_per_client"]
        assert r["one_model_per_client_over_shared"] == pytest.approx(
            K * fam["backbone_bytes"] / r["peak_rss_bytes"]
        )


def test_bytes_per_round_are_k_adapter_payloads_each_way(smoke):
    for fam in smoke["families"]:
        (r,) = fam["rounds"]
        payload = fam["adapter_payload_bytes"]  # the adapter serialised without metadata
        assert payload > fam["adapter_tensor_bytes"]
        assert sorted(r["bytes_down"]) == sorted(r["bytes_up"]) and len(r["bytes_down"]) == K
        # every client receives the same broadcast: the adapter and the round number
        (down,) = set(r["bytes_down"].values())
        assert payload < down <= payload + HEADER_SLACK
        assert r["bytes_down_per_round"] == K * down
        # every client sends its adapter (same keys and shapes) and its metadata
        assert all(payload < up <= payload + META_SLACK for up in r["bytes_up"].values())
        assert r["bytes_up_per_round"] == sum(r["bytes_up"].values())
        assert K * payload < r["bytes_up_per_round"] <= K * (payload + META_SLACK)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = _script().main(["--device", "cuda", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: --device cuda: no CUDA device")
    assert not (tmp_path / "never").exists()


def test_profiles_and_defence_events_are_kept(smoke):
    for fam in smoke["families"]:
        (r,) = fam["rounds"]
        assert len(r["defense"]) == r["defense_events"]
        assert all({"client", "group", "action", "reason"} <= set(e) for e in r["defense"])
        text = (Path(smoke["_out"]) / f"profile-{fam['family']}-K{K}.txt").read_text(encoding="utf-8")
        assert text.startswith("round wall time ")
        assert "==== by cumulative ====" in text and "==== by tottime ====" in text
        assert "run_federation" in text and "train_local" in text
