"""A whole 2-client, 2-round federation in process: outputs, ledger, golden numbers, resume."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedumm.config import load_config
from fedumm.errors import CheckpointError, ConfigError
from fedumm.experiment import resume_experiment, run_experiment
from fedumm.progress import NullProgress
from fedumm.server.run_dir import RunDir
from fedumm.summary import RunSummary

pytestmark = pytest.mark.integration


class InterruptAfterRound(NullProgress):
    """Simulates Ctrl-C right after a given round has been recorded."""

    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def update(self, key, completed, description=None):
        if key == "rounds" and completed == self.rnd:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_world, tiny_checkpoint):
    tree = {
        "name": "tiny",
        "seed": 0,
        "data": {"path": str(tiny_world)},
        "model": {"path": str(tiny_checkpoint)},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"batch_size": 8, "lr": 0.005, "eval_batch_size": 32},
        "federation": {"clients": 2, "alpha": 0.5, "min_partition_size": 8, "rounds": 2},
    }
    out = tmp_path_factory.mktemp("run")
    summary = run_experiment(load_config(None, tree=tree), out)
    return tree, out, summary


def test_run_directory_contents(finished_run):
    _, out, summary = finished_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "partition.json",
        "partition.png",
        "accuracy_per_round.png",
        "summary.json",
        "global_adapter/adapter_model.safetensors",
        "global_adapter/adapter_config.json",
    ):
        assert (out / name).is_file(), name
    assert summary.status == "finished"
    for key in ("zero_shot", "centralized", "federated"):
        assert 0 <= summary.setting(key).vqa_accuracy <= 100
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert set(rounds[0]["client_metrics"]) == {"site-01", "site-02"}
    assert json.loads((out / "summary.json").read_text()) == summary.to_json()
    for key in ("zero_shot", "centralized", "federated"):  # every client's view of the test split
        row = summary.setting(key)
        assert set(row.client_vqa) == {"site-01", "site-02"}
        worst = row.client_vqa_summary
        assert worst["worst"] == min(a.accuracy for a in row.client_vqa.values())
        assert all(0 < a.coverage <= 1 for a in row.client_vqa.values())


def test_ledger_counts_real_payloads(finished_run):
    _, out, summary = finished_run
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    adapter = summary.adapter_payload_bytes
    for r in rounds:
        for cid in r["clients"]:
            # down: the adapter payload plus a round tag in the header; up: plus id, counts, metrics
            assert adapter < r["bytes_down"][cid] < adapter + 64
            assert adapter < r["bytes_up"][cid] < adapter + 1024
        assert r["bytes_up_total"] == sum(r["bytes_up"].values())
    # 4 layers x q,k,v,o x rank 4 x (128 + 128) = 16384 fp32 params = 65536 bytes of tensor data
    assert summary.adapter_params == 16384
    assert summary.full_model_bytes > 20 * adapter


def test_global_adapter_loads_with_peft_and_matches_checkpoint(finished_run, tiny_checkpoint):
    _, out, _ = finished_run
    from transformers import JanusForConditionalGeneration

    base = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = PeftModel.from_pretrained(base, out / "global_adapter")
    from fedumm.models.lora_state import get_adapter_state

    loaded = get_adapter_state(model)
    ckpt = load_file(str(out / "checkpoint" / "round-0002.safetensors"))
    assert set(loaded) == set(ckpt)
    assert all(torch.equal(loaded[k], ckpt[k]) for k in ckpt)
    assert any(float(v.abs().sum()) > 0 for k, v in ckpt.items() if "lora_B" in k)  # it trained


def test_golden_numbers(finished_run):
    """Same seed, same machine class -> the same numbers (guards unintended changes in the loop)."""
    _, out, summary = finished_run
    ckpt = load_file(str(out / "checkpoint" / "round-0002.safetensors"))
    checksum = sum(float(v.double().abs().sum()) for v in ckpt.values())
    assert checksum == pytest.approx(GOLDEN["checksum"], rel=1e-4)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["client_metrics"][c]["train_loss"] for r in rounds for c in ("site-01", "site-02")]
    assert losses == pytest.approx(GOLDEN["train_losses"], rel=1e-4)
    assert [r["client_metrics"]["site-01"]["num_examples"] for r in rounds] == [74, 74]
    # the randomly initialised backbone cannot answer yet: 0 is the honest accuracy of both
    assert summary.zero_shot.vqa_accuracy == GOLDEN["zero_shot"]


# from a run on a 2-core x86_64 CPU, torch 2.13.0+cpu (seed 0, tests/conftest.py fixtures)
GOLDEN = {
    "checksum": 568.7038112640339,
    # rounds 1 and 2, clients site-01 and site-02
    "train_losses": [3.2323335647583007, 3.4913748264312745, 3.0417871475219727, 3.1385632514953614],
    "zero_shot": 0.0,
}


def test_interrupted_then_resumed_is_bit_identical(finished_run, tmp_path):
    tree, ref_out, _ = finished_run
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(None, tree=tree), out, progress=InterruptAfterRound(1))
    partial = json.loads((out / "summary.json").read_text())
    assert partial["status"] == "interrupted" and partial["rounds_completed"] == 1
    assert (out / "checkpoint" / "round-0001.safetensors").is_file()
    summary = resume_experiment(out)
    assert summary.status == "finished"
    a = load_file(str(out / "checkpoint" / "round-0002.safetensors"))
    b = load_file(str(ref_out / "checkpoint" / "round-0002.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_time_s"}  # noqa: E731
    ra = [strip(json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rb = [strip(json.loads(x)) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb


def test_corrupt_latest_checkpoint_falls_back_to_previous(finished_run, tmp_path):
    _, ref_out, _ = finished_run
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    (out / "checkpoint" / "round-0002.safetensors").write_bytes(b"\x00garbage")
    rnd, state, _, _ = RunDir(out).load_checkpoint()
    assert rnd == 1 and state
    (out / "checkpoint" / "round-0001.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        RunDir(out).load_checkpoint()


def test_int8_compression_shrinks_uploads(finished_run, tmp_path):
    tree, _, _ = finished_run
    tree = json.loads(json.dumps(tree))
    tree["federation"].update({"rounds": 1, "compression": "int8"})
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    summary = run_experiment(load_config(None, tree=tree), tmp_path / "int8")
    assert summary.zero_shot is None and summary.centralized is None
    r = json.loads((tmp_path / "int8" / "metrics.jsonl").read_text().splitlines()[0])
    adapter = summary.adapter_payload_bytes
    for cid in r["clients"]:
        # int8 values are a quarter of fp32; per-tensor scales and their header entries add ~10%
        assert r["bytes_up"][cid] < 0.4 * adapter
        assert r["bytes_down"][cid] > adapter  # the broadcast stays full precision
    # each client's error-feedback residual waits in its own file, none in the round's checkpoint
    assert load_file(str(tmp_path / "int8" / "checkpoint" / "clients-0001.safetensors")) == {}
    files = sorted((tmp_path / "int8" / "checkpoint" / "clients").glob("*.safetensors"))
    assert [f.name for f in files] == [f"{cid}.0001.safetensors" for cid in sorted(r["clients"])]
    adapter_keys = set(load_file(str(tmp_path / "int8" / "checkpoint" / "round-0001.safetensors")))
    assert all(set(load_file(str(f))) == adapter_keys for f in files)


def test_compressed_run_interrupted_then_resumed_is_bit_identical(finished_run, tmp_path):
    """Error-feedback residuals come back from their files (no memory cache) exactly as they were."""
    tree, _, _ = finished_run
    tree = json.loads(json.dumps(tree))
    tree["federation"].update({"compression": "int8", "residual_cache_mib": 0})
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    cfg = load_config(None, tree=tree)
    run_experiment(cfg, tmp_path / "ref")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=InterruptAfterRound(1))
    resume_experiment(out)
    a = load_file(str(out / "checkpoint" / "round-0002.safetensors"))
    b = load_file(str(tmp_path / "ref" / "checkpoint" / "round-0002.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    for cid in ("site-01", "site-02"):
        names = sorted(p.name for p in (out / "checkpoint" / "clients").glob(f"{cid}.*"))
        assert names == [f"{cid}.0001.safetensors", f"{cid}.0002.safetensors"]
        ra = load_file(str(out / "checkpoint" / "clients" / names[-1]))
        rb = load_file(str(tmp_path / "ref" / "checkpoint" / "clients" / names[-1]))
        assert all(torch.equal(ra[k], rb[k]) for k in rb)


def test_half_precision_downloads_halve_the_broadcast(finished_run, tmp_path):
    tree, ref_out, _ = finished_run
    tree = json.loads(json.dumps(tree))
    tree["federation"].update({"rounds": 1, "download_compression": "bf16"})
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    summary = run_experiment(load_config(None, tree=tree), tmp_path / "bf16")
    r = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    for cid in r["clients"]:
        assert r["bytes_down"][cid] < 0.55 * summary.adapter_payload_bytes
        assert r["bytes_up"][cid] > summary.adapter_payload_bytes  # uploads stay full precision
    got = load_file(str(tmp_path / "bf16" / "checkpoint" / "round-0001.safetensors"))
    ref = load_file(str(ref_out / "checkpoint" / "round-0001.safetensors"))
    assert all(got[k].dtype == torch.float32 for k in got)  # the server keeps the global in fp32
    diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert 0 < diff < 0.05  # clients trained from the rounded broadcast: close, not equal


def test_test_at_rounds_scores_a_round_as_a_shorter_run_ends(finished_run, tmp_path):
    """federation.test_at_rounds: round 2 of a 3-round run is the 2-round run (adapter, records, test
    VQA), and the centralized baseline after 2 rounds' epochs scores what a 2-round baseline scores."""
    tree, ref_out, ref = finished_run
    longer = {**tree, "federation": {**tree["federation"], "rounds": 3, "test_at_rounds": [2]}}
    out = tmp_path / "run"
    summary = run_experiment(load_config(None, tree=longer), out)
    a = load_file(str(out / "checkpoint" / "round-0002.safetensors"))
    b = load_file(str(ref_out / "checkpoint" / "round-0002.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_time_s"}  # noqa: E731
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rounds = [strip(json.loads(x)) for x in (ref_out / "metrics.jsonl").read_text().splitlines()]
    scored = rounds[1]["global"].pop("test_vqa_accuracy")
    assert [strip(r) for r in rounds[:2]] == ref_rounds
    assert "test_vqa_accuracy" not in rounds[0]["global"] and "test_vqa_accuracy" not in rounds[2]["global"]
    assert summary.federated.vqa_by_round == {2: scored, 3: summary.federated.vqa_accuracy}
    assert scored == ref.federated.vqa_accuracy
    assert summary.centralized.vqa_by_round[2] == ref.centralized.vqa_accuracy
    assert summary.centralized.vqa_by_round[3] == summary.centralized.vqa_accuracy
    # and the summary round-trips through its JSON
    again = RunSummary.from_json(json.loads((out / "summary.json").read_text()))
    assert again.federated.vqa_by_round == summary.federated.vqa_by_round


def test_test_at_rounds_outside_the_run_is_refused(finished_run):
    tree, _, _ = finished_run
    bad = {**tree, "federation": {**tree["federation"], "test_at_rounds": [0, 3]}}
    with pytest.raises(ConfigError, match=r"test_at_rounds \[0, 3\]"):
        load_config(None, tree=bad)
