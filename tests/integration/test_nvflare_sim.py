"""The FLARE simulator engine gives the in-process engine's results (same adapters, same ledger up to
FLARE's own serialisation) and leaves no process behind."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("nvflare")

from fedumm.config import load_config  # noqa: E402
from fedumm.experiment import run_experiment  # noqa: E402
from fedumm.io import read_safetensors  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.nvflare, pytest.mark.slow]

ATOL = 1e-5


def leftover_flare_processes() -> list[str]:
    """Processes started by any fedumm FLARE run (they carry its environment tag) that still live."""
    import psutil

    from fedumm.engines.nvflare.procs import TAG_ENV

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and TAG_ENV in p.environ() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except psutil.Error:
            continue
    return out


@pytest.fixture()
def one_thread(monkeypatch):
    """Every process (this one and FLARE's) computes on one thread: same maths, fair to a 2-core box."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tree(base: dict, engine: str) -> dict:
    tree = copy.deepcopy(base)
    tree["engine"] = engine
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    return tree


def _rounds(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-backbone", "backbone-per-site"])
def test_sim_matches_inprocess(tiny_config_tree, tmp_path, one_thread, shared):
    """Sites relaying to one shared trainer, or each loading its own backbone: the same federation."""
    from fedumm.engines.nvflare._flare import FLModel, ParamsType, fobs_nbytes
    from fedumm.engines.nvflare.controller import pack_params
    from fedumm.engines.nvflare.names import PACKED_META

    ref_dir, sim_dir = tmp_path / "inprocess", tmp_path / "sim"
    run_experiment(load_config(None, tree=_tree(tiny_config_tree, "inprocess")), ref_dir)
    tree = _tree(tiny_config_tree, "nvflare-sim")
    tree.setdefault("nvflare", {})["shared_backbone"] = shared
    cfg = load_config(None, tree=tree)
    summary = run_experiment(cfg, sim_dir)
    assert summary.status == "finished"
    assert leftover_flare_processes() == []

    # the same global adapter after every round
    rounds = cfg.federation.rounds
    states = {}
    for rnd in range(1, rounds + 1):
        name = f"round-{rnd:04d}.safetensors"
        ref = read_safetensors(ref_dir / "checkpoint" / name)
        got = read_safetensors(sim_dir / "checkpoint" / name)
        assert sorted(ref) == sorted(got)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0, msg=f"round {rnd}: {k}")
        states[rnd] = got

    ref_rounds, sim_rounds = _rounds(ref_dir), _rounds(sim_dir)
    assert [r["round"] for r in sim_rounds] == list(range(1, rounds + 1))
    # rounds are timed on the launcher's clock, so they never add up to more than the federation
    # (the server's next round overlaps this process's evaluation and is not counted twice)
    assert 0 < sum(r["wall_time_s"] for r in sim_rounds) <= summary.federated.wall_time_s
    initial = read_safetensors(
        next((sim_dir / "nvflare" / "job").glob("*/app/custom/fedumm_initial_adapter.safetensors"))
    )
    n_tensors = len(initial)
    for ref, got in zip(ref_rounds, sim_rounds, strict=True):
        assert got["clients"] == ref["clients"] and got["dropped"] == ref["dropped"] == []
        assert got["global"] == pytest.approx(ref["global"])
        for c, m in ref["client_metrics"].items():
            assert got["client_metrics"][c] == pytest.approx(m, abs=1e-4)
        # ledger: FLARE ships what the in-process engine ships (the same tensors) plus its own framing:
        # a safetensors header per tensor inside FOBS/msgpack and the Shareable's headers (shared:
        # one safetensors payload in one numpy array, so the framing is per message, not per tensor)
        assert set(got["bytes_up"]) == set(ref["bytes_up"]) and set(got["bytes_down"]) == set(
            ref["bytes_down"]
        )
        for direction in ("bytes_up", "bytes_down"):
            for c in ref[direction]:
                extra = got[direction][c] - ref[direction][c]
                bound = 200 * n_tensors + 1024 if not shared else 1024
                assert 0 < extra < bound, (direction, c, extra)
        # and the server counted exactly the FOBS serialisation of the model it broadcast
        prev = initial if got["round"] == 1 else states[got["round"] - 1]
        meta = {"fedumm_round": got["round"], **({PACKED_META: 1} if shared else {})}
        sent = FLModel(
            params_type=ParamsType.FULL,
            params=pack_params(prev) if shared else prev,
            current_round=got["round"],
            total_rounds=rounds,
            meta=meta,
        )
        assert set(got["bytes_down"].values()) == {fobs_nbytes(sent)}

    # the final adapter saved by the experiment is the last round's
    assert (sim_dir / "global_adapter").is_dir()
    assert summary.bytes_up_per_round == max(r["bytes_up_total"] for r in sim_rounds)


class _InterruptAfterRound:
    """Ctrl-C right after round ``rnd`` has been recorded (a Progress that raises)."""

    def __init__(self, rnd: int) -> None:
        from fedumm.progress import NullProgress

        self.rnd = rnd
        self._null = NullProgress()

    def __getattr__(self, name):
        return getattr(self._null, name)

    def update(self, key, completed, description=None):
        if key == "rounds" and completed == self.rnd:
            raise KeyboardInterrupt


def test_sim_interrupted_then_resumed_matches_inprocess(tiny_config_tree, tmp_path, one_thread):
    """--resume on FLARE: the server restarts from the checkpoint's adapter and strategy state."""
    from fedumm.experiment import resume_experiment

    base = copy.deepcopy(tiny_config_tree)
    base["federation"]["strategy"] = "fedadam"  # server state (Adam moments) must survive the restart
    ref_dir, sim_dir = tmp_path / "inprocess", tmp_path / "sim"
    run_experiment(load_config(None, tree=_tree(base, "inprocess")), ref_dir)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(
            load_config(None, tree=_tree(base, "nvflare-sim")), sim_dir, progress=_InterruptAfterRound(1)
        )
    assert leftover_flare_processes() == []
    assert [r["round"] for r in _rounds(sim_dir)] == [1]
    summary = resume_experiment(sim_dir)
    assert summary.status == "finished" and leftover_flare_processes() == []
    assert [r["round"] for r in _rounds(sim_dir)] == [1, 2]
    ref = read_safetensors(ref_dir / "checkpoint" / "round-0002.safetensors")
    got = read_safetensors(sim_dir / "checkpoint" / "round-0002.safetensors")
    assert sorted(ref) == sorted(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0, msg=k)
    for a, b in zip(_rounds(ref_dir), _rounds(sim_dir), strict=True):
        assert a["clients"] == b["clients"] and b["global"] == pytest.approx(a["global"])


def test_sim_compresses_both_ways_as_inprocess_does(tiny_config_tree, tmp_path, one_thread):
    """int8 uploads with error feedback and a bf16 broadcast: the same adapters and fewer bytes."""
    base = copy.deepcopy(tiny_config_tree)
    base["federation"].update({"compression": "int8", "download_compression": "bf16"})
    ref_dir, sim_dir = tmp_path / "inprocess", tmp_path / "sim"
    run_experiment(load_config(None, tree=_tree(base, "inprocess")), ref_dir)
    summary = run_experiment(load_config(None, tree=_tree(base, "nvflare-sim")), sim_dir)
    assert summary.status == "finished" and leftover_flare_processes() == []
    for rnd in (1, 2):  # round 2 carries round 1's error-feedback residuals
        name = f"round-{rnd:04d}.safetensors"
        ref = read_safetensors(ref_dir / "checkpoint" / name)
        got = read_safetensors(sim_dir / "checkpoint" / name)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0, msg=f"round {rnd}: {k}")
    # the ledger: the in-process engine's compressed payloads plus FLARE's framing per tensor (an int8
    # upload has a value and a scale tensor per key), far below the fp32 adapter on this tiny model
    n = len(ref)
    for a, b in zip(_rounds(ref_dir), _rounds(sim_dir), strict=True):
        for c in a["clients"]:
            assert 0 < b["bytes_up"][c] - a["bytes_up"][c] < 200 * 2 * n + 1024
            assert 0 < b["bytes_down"][c] - a["bytes_down"][c] < 200 * n + 1024
            assert a["bytes_up"][c] < 0.4 * summary.adapter_payload_bytes
            assert a["bytes_down"][c] < 0.55 * summary.adapter_payload_bytes


def test_sim_matches_inprocess_with_generation_clients(tiny_config_tree, tmp_path, one_thread):
    """A generation-only and a mixed client, alignment tokens and per-group aggregation under FLARE."""
    base = copy.deepcopy(tiny_config_tree)
    base["lora"] = {**base["lora"], "groups": ["language", "generation"], "alignment_tokens": 1}
    base["federation"] = {**base["federation"], "client_tasks": ["generation", "both"]}
    ref_dir, sim_dir = tmp_path / "inprocess", tmp_path / "sim"
    run_experiment(load_config(None, tree=_tree(base, "inprocess")), ref_dir)
    summary = run_experiment(load_config(None, tree=_tree(base, "nvflare-sim")), sim_dir)
    assert summary.status == "finished"
    assert leftover_flare_processes() == []
    for rnd in (1, 2):
        name = f"round-{rnd:04d}.safetensors"
        ref = read_safetensors(ref_dir / "checkpoint" / name)
        got = read_safetensors(sim_dir / "checkpoint" / name)
        assert sorted(ref) == sorted(got) and any("trainable_tokens" in k for k in ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0, msg=f"round {rnd}: {k}")
    for ref, got in zip(_rounds(ref_dir), _rounds(sim_dir), strict=True):
        for c, m in ref["client_metrics"].items():
            assert got["client_metrics"][c] == pytest.approx(m, abs=1e-4)
        assert got["client_metrics"]["site-01"]["examples_vision"] == 0  # generation only


@pytest.fixture(scope="module")
def tiny_blip3o(tmp_path_factory):
    from fedumm.models import family_class

    return family_class("blip3o").write_tiny(tmp_path_factory.mktemp("blip3o-tiny"), seed=0)


def test_sim_matches_inprocess_with_the_blip3o_family(tiny_config_tree, tiny_blip3o, tmp_path, one_thread):
    """The second family under FLARE: LoRA on all three towers, the latent queries trained whole,
    an alignment token, clients training both tasks; the same adapters and metrics as in process."""
    base = copy.deepcopy(tiny_config_tree)
    base["model"] = {"family": "blip3o", "path": str(tiny_blip3o)}
    base["lora"] = {**base["lora"], "groups": ["vision", "language", "generation"], "alignment_tokens": 1}
    base["federation"] = {**base["federation"], "tasks": "both"}
    ref_dir, sim_dir = tmp_path / "inprocess", tmp_path / "sim"
    run_experiment(load_config(None, tree=_tree(base, "inprocess")), ref_dir)
    summary = run_experiment(load_config(None, tree=_tree(base, "nvflare-sim")), sim_dir)
    assert summary.status == "finished" and summary.family == "blip3o"
    assert leftover_flare_processes() == []
    for rnd in (1, 2):
        name = f"round-{rnd:04d}.safetensors"
        ref = read_safetensors(ref_dir / "checkpoint" / name)
        got = read_safetensors(sim_dir / "checkpoint" / name)
        assert sorted(ref) == sorted(got)
        assert any("latent_queries" in k for k in ref) and any(".dit." in k for k in ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=0, msg=f"round {rnd}: {k}")
    for ref, got in zip(_rounds(ref_dir), _rounds(sim_dir), strict=True):
        assert got["global"] == pytest.approx(ref["global"])
        for c, m in ref["client_metrics"].items():
            assert got["client_metrics"][c] == pytest.approx(m, abs=1e-4)
        assert ref["global"]["flow_loss"] > 0  # the family's own generation loss, per round


class _InterruptAfterRound:
    """A progress sink that acts like Ctrl-C right after round ``rnd`` has been recorded."""

    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def start(self, key, description, total):
        pass

    def update(self, key, completed, description=None):
        if key == "rounds" and completed == self.rnd:
            raise KeyboardInterrupt

    def finish(self, key):
        pass


def test_sim_ctrl_c_stops_flare(tiny_config_tree, tmp_path, one_thread):
    cfg = load_config(None, tree=_tree(tiny_config_tree, "nvflare-sim"))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=_InterruptAfterRound(1))
    assert leftover_flare_processes() == []
    assert [r["round"] for r in _rounds(out)] == [1]
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


def test_sim_stops_naming_the_shared_trainer_when_it_dies(tiny_config_tree, tmp_path, one_thread):
    """SIGKILL the shared trainer after round 1: the run fails with an EngineError that names it
    (the sites report it with their next task; the runner sees it exit), nothing is left running."""
    import threading
    import time

    import psutil

    from fedumm.errors import EngineError

    tree = _tree(tiny_config_tree, "nvflare-sim")
    tree["federation"]["rounds"] = 3
    cfg = load_config(None, tree=tree)
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_after_round_1():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (out / "nvflare" / "results" / "round-0001.json").exists():
            time.sleep(0.2)
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "fedumm.engines.nvflare.trainer" in " ".join(p.info["cmdline"] or []):
                p.kill()
                killed.append(p.pid)

    watcher = threading.Thread(target=kill_after_round_1, daemon=True)
    watcher.start()
    with pytest.raises(EngineError, match="shared trainer"):
        run_experiment(cfg, out)
    watcher.join(10)
    assert killed, "the shared trainer was not found"
    assert leftover_flare_processes() == []
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert 1 <= len(_rounds(out)) <= 2
