"""``fedumm sweep --jobs N``: cells in worker processes give the results a sequential sweep gives at the
same thread count, the runs resume either way, worlds of different seeds never share a folder at
once, and a failing cell is one error naming it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml

import fedumm.sweep as sweep_mod
from fedumm.config import load_config
from fedumm.errors import ConfigError, FedummError
from fedumm.sweep import expand, load_sweep, run_sweep
from fedumm.sweep_jobs import available_cores, can_start, check_jobs, run_cells_parallel, watch_parent

LIGHT = {
    "data.train_split": "val",
    "data.val_split": "test",
    "data.max_val_questions": 6,
    "data.max_test_questions": 6,
    "federation.rounds": 1,
}


def _sweep_file(root: Path, tree: dict, grid: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "base.yaml").write_text(yaml.safe_dump(tree))
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "overrides": dict(LIGHT), "grid": grid}))
    return path


def _timeless(result):
    """A setting's results without its wall time (the one field two equal runs differ in)."""
    return None if result is None else dataclasses.replace(result, wall_time_s=None)


def _rounds(d: Path) -> list[tuple]:
    """Each round's global metrics and client losses (not its wall times)."""
    out = []
    for line in (d / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        losses = {c: m.get("train_loss") for c, m in (r.get("client_metrics") or {}).items()}
        out.append((r["round"], r.get("global"), losses))
    return out


def _fake(name: str, *, path: str, seed: int, synth: bool = True, engine: str = "inprocess"):
    data = SimpleNamespace(path=Path(path), synthesize_if_missing=synth, synth_images={"val": 4})
    return SimpleNamespace(name=name, config=SimpleNamespace(data=data, seed=seed, engine=engine))


def test_cells_of_different_worlds_in_one_folder_never_run_together(tmp_path):
    a0 = _fake("a0", path=str(tmp_path / "w"), seed=0)
    b0 = _fake("b0", path=str(tmp_path / "w"), seed=0)
    a1 = _fake("a1", path=str(tmp_path / "w"), seed=1)
    elsewhere = _fake("e1", path=str(tmp_path / "other"), seed=1)
    user_data = _fake("u1", path=str(tmp_path / "w"), seed=1, synth=False)  # renders nothing
    assert can_start(b0, [a0]) and can_start(a0, [])
    assert not can_start(a1, [a0]) and not can_start(a0, [b0, a1])
    assert can_start(elsewhere, [a0, b0]) and can_start(user_data, [a0])
    resized = _fake("r0", path=str(tmp_path / "w"), seed=0)
    resized.config.data.synth_images = {"val": 8}
    assert not can_start(resized, [a0])


def test_jobs_are_checked_before_anything_runs(tmp_path):
    cells = [_fake("a", path=str(tmp_path), seed=0), _fake("b", path=str(tmp_path), seed=0)]
    assert check_jobs(2, cells, cores=8) == 4 and check_jobs(3, cells, cores=8) == 2
    assert check_jobs(1, cells, cores=2) == 2
    with pytest.raises(ConfigError, match="--jobs 4 is more than the 2 core"):
        check_jobs(4, cells, cores=2)
    with pytest.raises(ConfigError, match="at least 1"):
        check_jobs(0, cells, cores=2)
    flare = [*cells, _fake("sim", path=str(tmp_path), seed=0, engine="nvflare-sim")]
    with pytest.raises(ConfigError, match="in-process cells only; sim use a FLARE engine"):
        check_jobs(2, flare, cores=8)
    assert check_jobs(1, flare, cores=8) == 8  # one at a time: FLARE cells run as they always did


def test_a_failing_cell_is_one_error_naming_it(tmp_path, tiny_config_tree):
    tree = json.loads(json.dumps(tiny_config_tree))
    tree["data"]["path"] = str(tmp_path / "missing-world")
    cell = SimpleNamespace(name="broken", config=load_config(None, tree=tree))
    ended: list[tuple[str, dict]] = []
    with pytest.raises(FedummError, match=r"cell broken failed: data.path .*missing-world.* does not exist"):
        run_cells_parallel(
            [cell],
            out=tmp_path / "out",
            resume=lambda c: False,
            jobs=1,
            threads=1,
            prepare=lambda c: None,  # the worker meets the missing world itself
            on_start=lambda c: None,
            on_end=lambda c, msg: ended.append((c.name, msg)),
            describe=lambda done, running: None,
        )
    assert [(n, m["ok"], m["kind"]) for n, m in ended] == [("broken", False, "ConfigError")]


@pytest.mark.integration
@pytest.mark.slow
def test_parallel_cells_equal_sequential_ones_and_resume_either_way(tmp_path, tiny_config_tree, monkeypatch):
    if available_cores() < 2:
        pytest.skip("needs 2 cores for 2 jobs")
    grid = {"federation.clients": [2], "federation.alpha": [0.5, 1.0]}
    spec = load_sweep(_sweep_file(tmp_path / "s", tiny_config_tree, grid))
    threads = check_jobs(2, expand(spec))
    parallel = run_sweep(spec, tmp_path / "par", jobs=2)
    assert [r.cell.name for r in parallel] == ["baselines-s0", "K2-a0.5-s0", "K2-a1.0-s0"]
    assert all(r.status == "finished" and not r.skipped for r in parallel)
    index = json.loads((tmp_path / "par" / "sweep.json").read_text())
    assert [c["status"] for c in index["cells"]] == ["finished"] * 3
    assert all(isinstance(c["wall_time_s"], float) for c in index["cells"])

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sequential = run_sweep(spec, tmp_path / "seq")
    finally:
        torch.set_num_threads(before)
    for p, s in zip(parallel, sequential, strict=True):
        assert _timeless(p.summary.federated) == _timeless(s.summary.federated), p.cell.name
        assert _timeless(p.centralized) == _timeless(s.centralized)
        assert _timeless(p.zero_shot) == _timeless(s.zero_shot)
        pd, sd = tmp_path / "par" / p.cell.name, tmp_path / "seq" / s.cell.name
        assert (pd / "config.yaml").read_text() == (sd / "config.yaml").read_text()
        assert _rounds(pd) == _rounds(sd) and _rounds(pd)

    # a sequential sweep over the parallel one's directory finds every cell finished (same configs)
    def never(*a, **k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(sweep_mod, "run_experiment", never)
    monkeypatch.setattr(sweep_mod, "resume_experiment", never)
    again = run_sweep(spec, tmp_path / "par")
    assert all(r.skipped and r.status == "finished" for r in again)


def test_watch_parent_interrupts_the_main_thread_once_the_parent_is_gone():
    gone = threading.Event()
    watcher = watch_parent(lambda: not gone.is_set(), interval=0.02)
    with pytest.raises(KeyboardInterrupt):
        gone.set()
        time.sleep(10)  # interrupted within an interval or two, as by Ctrl-C
    watcher.join(1)
    assert not watcher.is_alive()


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    return [p for p in parent.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def _wait_for(what, check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_parallel_sweep_leaves_no_worker_behind_and_resumes(tmp_path, tiny_config_tree, how):
    """SIGTERM to the sweep is Ctrl-C: workers save and end, the cells read interrupted. After SIGKILL
    the workers notice their parent is gone and stop by themselves. Either way the cells resume."""
    if available_cores() < 2:
        pytest.skip("needs 2 cores for 2 jobs")
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config_tree))
    path = tmp_path / "sweep.yaml"
    overrides = dict(LIGHT, **{"federation.rounds": 200, "geneval.enabled": False})
    grid = {"federation.alpha": [0.5, 1.0]}
    path.write_text(
        yaml.safe_dump({"base": "base.yaml", "overrides": overrides, "grid": grid, "baselines": False})
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-c",
        "from fedumm.cli import app; app()",
        "sweep",
        str(path),
        "--out",
        str(out),
        "-j",
        "2",
    ]
    # started as a shell's background job is: SIGINT ignored, which the workers must not inherit
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        parent = psutil.Process(proc.pid)
        workers = _wait_for("two workers", lambda: (w := _workers(parent)) and len(w) == 2 and w)
        # each worker has finished a round (a checkpoint to resume from) before the sweep is stopped
        _wait_for(
            "a round of each cell",
            lambda: all((out / n / "checkpoint" / "latest.json").is_file() for n in ("a0.5-s0", "a1.0-s0")),
        )
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(timeout=180)
        if how == "SIGTERM":
            assert proc.returncode == 130, proc.stderr.read().decode()[-2000:]
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers still running after the sweep stopped: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
    index = {c["name"]: c["status"] for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert set(index) == {"a0.5-s0", "a1.0-s0"}
    if how == "SIGTERM":
        assert set(index.values()) == {"interrupted"}
    spec = load_sweep(path)
    for cell in expand(spec):
        assert sweep_mod._state(spec, cell, out / cell.name) == "resume"
