"""A real local FLARE system (provisioned POC: server + clients over loopback with mutual TLS):
same results as in-process, a killed client is dropped, a lost quorum is a clear error, and no
process outlives the run (also on Ctrl-C)."""

from __future__ import annotations

import _thread
import copy
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvflare")
psutil = pytest.importorskip("psutil")

from fedumm.config import load_config  # noqa: E402
from fedumm.errors import EngineError  # noqa: E402
from fedumm.experiment import run_experiment  # noqa: E402
from fedumm.io import read_safetensors  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.nvflare, pytest.mark.slow]


def leftover_flare_processes() -> list[str]:
    """Processes started by any fedumm FLARE run (they carry its environment tag) that still live."""
    from fedumm.engines.nvflare.procs import TAG_ENV

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and TAG_ENV in p.environ() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except psutil.Error:
            continue
    return out


def _free_ports(n: int = 2) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture()
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    assert leftover_flare_processes() == []


def _tree(base: dict, engine: str, *, clients: int = 2, min_clients: int = 1) -> dict:
    tree = copy.deepcopy(base)
    tree["engine"] = engine
    tree["baselines"] = {"zero_shot": False, "centralized": False}
    tree["federation"].update(clients=clients, min_clients=min_clients)
    fl_port, admin_port = _free_ports()
    tree["nvflare"] = {
        "fl_port": fl_port,
        "admin_port": admin_port,
        "round_timeout_s": 60,
        "start_timeout_s": 120,
    }
    return tree


def _rounds(path: Path) -> list[dict]:
    p = path / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _when(cond, action, timeout: float = 200.0) -> threading.Thread:
    """Run ``action`` once ``cond()`` holds (in a thread, while the run goes on)."""

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                action()
                return
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _kill_trainer(site: str) -> list[int]:
    """SIGKILL the fedumm client process (the Client API trainer) of ``site``."""
    killed = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any("fedumm_client.py" in a for a in p.info["cmdline"] or []) and f"/{site}/" in p.cwd() + "/":
                p.kill()
                killed.append(p.pid)
        except psutil.Error:
            continue
    return killed


def test_poc_matches_inprocess(tiny_config_tree, tmp_path, one_thread):
    ref_dir, poc_dir = tmp_path / "inprocess", tmp_path / "poc"
    run_experiment(load_config(None, tree=_tree(tiny_config_tree, "inprocess")), ref_dir)
    cfg = load_config(None, tree=_tree(tiny_config_tree, "nvflare-poc"))
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("fedumm-poc-*"))
    summary = run_experiment(cfg, poc_dir)
    assert summary.status == "finished"
    for rnd in range(1, cfg.federation.rounds + 1):
        ref = read_safetensors(ref_dir / "checkpoint" / f"round-{rnd:04d}.safetensors")
        got = read_safetensors(poc_dir / "checkpoint" / f"round-{rnd:04d}.safetensors")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0)
    rounds = _rounds(poc_dir)
    assert [r["clients"] for r in rounds] == [["site-01", "site-02"]] * cfg.federation.rounds
    # every participant's logs and the downloaded job are kept; the POC workspace (keys) is gone
    logs = poc_dir / "nvflare" / "poc" / "logs"
    assert {p.name for p in logs.iterdir()} == {"server", "site-01", "site-02"}
    assert (logs / "server" / "log.txt").stat().st_size > 0
    assert any((poc_dir / "nvflare" / "poc" / "job_result").rglob("workspace/log.txt"))  # server job log
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("fedumm-poc-*")) <= before


def _kill_after_round_1(out: Path, site: str, killed: list[int]) -> None:
    """Kill ``site``'s trainer as soon as the server has aggregated round 1 (in round 2, or, if it was
    quick enough to answer round 2 first, before round 3)."""
    _when(
        lambda: (out / "nvflare" / "results" / "round-0001.json").exists(),
        lambda: killed.extend(_kill_trainer(site)),
    )


def test_poc_killed_client_is_dropped(tiny_config_tree, tmp_path, one_thread):
    tree = _tree(tiny_config_tree, "nvflare-poc", clients=3, min_clients=2)
    tree["federation"]["rounds"] = 3
    tree["nvflare"]["shared_backbone"] = False  # each site its own trainer, as in production
    cfg = load_config(None, tree=tree)
    out = tmp_path / "run"
    killed: list[int] = []
    _kill_after_round_1(out, "site-03", killed)
    summary = run_experiment(cfg, out)
    assert killed, "the site-03 trainer was not found"
    assert summary.status == "finished"
    r1, *later = _rounds(out)
    assert r1["clients"] == ["site-01", "site-02", "site-03"] and r1["dropped"] == []
    assert later[-1]["clients"] == ["site-01", "site-02"] and later[-1]["dropped"] == ["site-03"]
    first_drop = next(i for i, r in enumerate(later) if r["dropped"])
    for r in later[first_drop:]:  # once dropped, for good (its trainer is gone), and nobody else
        assert r["dropped"] == ["site-03"] and set(r["bytes_up"]) == {"site-01", "site-02"}


def test_poc_lost_quorum_is_an_engine_error(tiny_config_tree, tmp_path, one_thread):
    tree = _tree(tiny_config_tree, "nvflare-poc", clients=3, min_clients=3)
    tree["federation"]["rounds"] = 3
    tree["nvflare"]["shared_backbone"] = False  # each site its own trainer, as in production
    cfg = load_config(None, tree=tree)
    out = tmp_path / "run"
    killed: list[int] = []
    _kill_after_round_1(out, "site-03", killed)
    with pytest.raises(
        EngineError, match=r"round [23]: only 2 valid client update\(s\).*min_clients=3.*site-03"
    ):
        run_experiment(cfg, out)
    assert killed
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert 1 <= len(_rounds(out)) <= 2


def test_poc_ctrl_c_stops_every_process(tiny_config_tree, tmp_path, one_thread):
    cfg = load_config(None, tree=_tree(tiny_config_tree, "nvflare-poc"))
    out = tmp_path / "run"
    started = out / "nvflare" / "results" / "started.json"  # the server's controller is running
    _when(started.exists, _thread.interrupt_main)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out)
    assert time.monotonic() - t0 < 120
    assert leftover_flare_processes() == []
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
