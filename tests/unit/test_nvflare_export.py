"""The FLARE job: exported folder, FLARE's own job validation, per-site settings, the server-side
round engine (FLARE results -> ClientUpdates, dropped clients, ledger) and, slow, the exported job
running in FLARE's simulator the way a provisioned system runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvflare")

from fedumm.config import load_config  # noqa: E402
from fedumm.engines.nvflare import export_job  # noqa: E402
from fedumm.engines.nvflare.client import site_overrides  # noqa: E402
from fedumm.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.nvflare

STATE = {
    "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
    "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
    "base_model.model.model.vision_model.encoder.layers.0.fc1.lora_A.weight": torch.ones(2, 8),
}


def _cfg(tmp_path: Path, **extra):
    tree = {
        "name": "export test",
        "data": {"path": str(tmp_path / "no-data-here")},
        "lora": {"rank": 2, "alpha": 4},
        "federation": {"clients": 2, "rounds": 1, "min_clients": 2},
        "nvflare": {"round_timeout_s": 90},
    }
    tree.update(extra)
    return load_config(None, tree=tree)


def _validate_like_the_server(job_dir: Path):
    """The check FLARE's server runs on `nvflare job submit` (offline: no system needed)."""
    from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
    from nvflare.private.fed.server.job_meta_validator import JobMetaValidator

    return JobMetaValidator().validate(
        job_dir.name, zip_directory_to_bytes(str(job_dir.parent), job_dir.name)
    )


def test_exported_job_folder(tmp_path):
    cfg = _cfg(tmp_path)
    job = export_job(cfg, tmp_path / "out", initial_state=STATE)
    assert job == tmp_path / "out" / "fedumm-export-test"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["name"] == job.name and meta["min_clients"] == 2 and meta["deploy_map"] == {"app": ["@ALL"]}
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    assert [w["path"] for w in server["workflows"]] == ["fedumm.engines.nvflare.controller.FedummController"]
    assert server["workflows"][0]["args"] == {}  # defaults: shipped files, connected clients, run dir
    ex = client["executors"][0]
    assert ex["tasks"] == ["train"]
    assert ex["executor"]["args"]["command"] == [
        "python3",
        "-u",
        "custom/fedumm_client.py",
        "--config",
        "fedumm_config.yaml",
    ]
    assert ex["executor"]["args"]["server_expected_format"] == "pytorch"
    custom = job / "app/custom"
    assert sorted(p.name for p in custom.iterdir()) == [
        "fedumm_client.py",
        "fedumm_config.yaml",
        "fedumm_groups.json",
        "fedumm_initial_adapter.safetensors",
    ]
    assert not (custom / "fedumm").exists()  # the package is installed at the sites, never shipped
    assert load_config(custom / "fedumm_config.yaml") == cfg
    groups = json.loads((custom / "fedumm_groups.json").read_text())
    assert sorted(groups.values()) == ["language", "language", "vision"]
    # nothing in the job refers to this machine
    for f in job.rglob("*.json"):
        assert str(tmp_path) not in f.read_text(), f
    ok, err, derived = _validate_like_the_server(job)
    assert ok, err
    assert derived["byoc"] is True  # custom/ code: passes site allow-lists for the fedumm controller


def test_the_server_tells_clients_the_configured_poll_interval(tmp_path):
    """FLARE's own server configurator reads nvflare.task_poll_s as its task_request_interval (the
    wait it sends a client with every task and every try-again)."""
    import argparse
    import shutil

    from nvflare.apis.workspace import Workspace
    from nvflare.private.fed.server.server_json_config import ServerJsonConfigurator

    for poll, expected in ((None, 2.0), (0.25, 0.25)):
        extra = {"nvflare": {"round_timeout_s": 90, **({"task_poll_s": poll} if poll else {})}}
        job = export_job(_cfg(tmp_path, **extra), tmp_path / "out", initial_state=STATE)
        ws = tmp_path / f"ws-{expected}"
        app = ws / "job" / "app_server"
        shutil.copytree(job / "app", app)
        (ws / "startup").mkdir()
        (ws / "local").mkdir()
        conf = ServerJsonConfigurator(
            workspace_obj=Workspace(str(ws), "server"),
            config_file_name=str(app / "config" / "config_fed_server.json"),
            args=argparse.Namespace(job_id="job", workspace=str(ws)),
            app_root=str(app),
        )
        conf.configure()
        assert conf.runner_config.task_request_interval == expected


def test_exported_in_process_trainer_is_found_by_name(tmp_path):
    cfg = _cfg(tmp_path, nvflare={"launch_external_process": False})
    job = export_job(cfg, tmp_path / "out", initial_state=STATE)
    args = json.loads((job / "app/config/config_fed_client.json").read_text())["executors"][0]["executor"][
        "args"
    ]
    assert args["task_script_path"] == "fedumm_client.py"
    assert args["task_script_args"] == "--config fedumm_config.yaml"


def test_export_builds_the_initial_adapter_from_the_config(tmp_path, tiny_checkpoint):
    """Without an initial state the exporter loads the backbone once to build the initial adapter."""
    from fedumm.client.site import build_family
    from fedumm.io import read_safetensors
    from fedumm.models.lora_state import get_adapter_state

    cfg = _cfg(tmp_path, model={"path": str(tiny_checkpoint)})
    job = export_job(cfg, tmp_path / "out")
    shipped = read_safetensors(job / "app/custom/fedumm_initial_adapter.safetensors")
    family, _ = build_family(cfg)
    expected = get_adapter_state(family.model)
    assert sorted(shipped) == sorted(expected)
    for k in expected:
        assert torch.equal(shipped[k], expected[k])


def test_site_overrides(tmp_path):
    f = tmp_path / "site.txt"
    f.write_text("# this site\nmodel.device=cpu\n\ntrain.eval_batch_size=8\n")
    env = {
        "FEDUMM_DATA_PATH": "/data/site-a",
        "FEDUMM_MODEL_PATH": "/models/janus",
        "FEDUMM_SITE_OVERRIDES": str(f),
    }
    assert site_overrides(env) == [
        "data.path=/data/site-a",
        "model.path=/models/janus",
        "model.device=cpu",
        "train.eval_batch_size=8",
    ]
    assert site_overrides({}) == []
    with pytest.raises(ConfigError, match="FEDUMM_SITE_OVERRIDES"):
        site_overrides({"FEDUMM_SITE_OVERRIDES": str(tmp_path / "missing")})


def test_server_side_never_imports_model_code():
    # the server loads the config (which validates family, towers and groups) and maps adapter keys
    # to groups, all from the families' registrations: no model library, no family's model module
    code = (
        "import sys, fedumm.engines.nvflare.controller, fedumm.engines.nvflare.results\n"
        "from fedumm.config import load_config\n"
        "from fedumm.engines.nvflare.job import group_map\n"
        "for fam in ('janus', 'blip3o'):\n"
        "    cfg = load_config(None, ['model.family=' + fam], tree={'data': {'path': 'x'}})\n"
        "    assert group_map(cfg, ['a.lora_A.weight']) == {'a.lora_A.weight': 'other'}\n"
        "heavy = ('transformers', 'peft', 'diffusers', 'fedumm.models.janus.family',"
        " 'fedumm.models.blip3o.family', 'fedumm.experiment', 'fedumm.client.site')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the server-side round engine, with a stand-in for FLARE's broadcast ----


class _FakeController:
    abort_signal = None

    def __init__(self, results):
        self.results = results
        self.calls = []

    def broadcast_model(self, data, **kw):
        self.calls.append((data, kw))
        return self.results


def _result(name, state=None, **meta):
    from fedumm.engines.nvflare._flare import FLModel, ParamsType

    return FLModel(
        params_type=ParamsType.FULL,
        params={k: v + 1 for k, v in STATE.items()} if state is None else state,
        meta={"client_name": name, "props": {}, **meta},
        metrics={"train_loss": 1.0},
        current_round=1,
    )


def test_round_engine_converts_results_and_lists_dropped(tmp_path):
    from fedumm.engines.nvflare.controller import ERROR_KEY, FlareRoundEngine
    from fedumm.fl.strategies import make_strategy
    from fedumm.server.rounds import RoundLoop

    cfg = _cfg(tmp_path, federation={"clients": 5, "rounds": 1, "min_clients": 2})
    ctl = _FakeController(
        [
            _result("site-a", num_examples=10),
            _result("site-b", num_examples=30),
            _result("site-c", params={}, **{ERROR_KEY: "round 1: CUDA out of memory"}),
            _result("site-d"),  # no num_examples: rejected by validate_update, never defaulted
            _result("site-x", num_examples=5),  # not sampled: ignored
            _result("site-a", num_examples=99),  # duplicate: ignored
        ]
    )
    engine = FlareRoundEngine(ctl, cfg)
    records = []
    final = RoundLoop(
        engine=engine,
        strategy=make_strategy("fedavg"),
        clients=["site-a", "site-b", "site-c", "site-d", "site-e"],
        num_rounds=1,
        seed=0,
        min_clients=2,
        on_round=lambda r, s: records.append(r),
    ).run(STATE)
    (rec,) = records
    assert rec.clients == ("site-a", "site-b")
    assert rec.dropped == ("site-c", "site-d", "site-e")
    assert rec.client_metrics["site-b"]["num_examples"] == 30
    for k, v in STATE.items():
        torch.testing.assert_close(final[k], v + 1)
    assert set(rec.bytes_up) == set(rec.bytes_down) == {"site-a", "site-b", "site-c", "site-d"}
    assert engine.last_errors == {"site-c": "round 1: CUDA out of memory"}
    ((sent, kw),) = ctl.calls
    assert kw["targets"] == ["site-a", "site-b", "site-c", "site-d", "site-e"]
    assert kw["min_responses"] == 2 and kw["timeout"] == 90 and kw["wait_time_after_min_received"] == 90
    assert sent.current_round == 1 and sent.meta == {"fedumm_round": 1}


def test_results_folder_roundtrip(tmp_path):
    from fedumm.engines.nvflare.results import ResultsReader, ResultsWriter, record_from_json
    from fedumm.types import RoundRecord

    w, r = ResultsWriter(tmp_path), ResultsReader(tmp_path)
    assert r.next_round(1) is None and r.done() is None and r.error() is None
    rec = RoundRecord(
        round=1,
        clients=("site-01",),
        dropped=("site-02",),
        global_metrics={},
        client_metrics={"site-01": {"num_examples": 3}},
        bytes_up={"site-01": 10},
        bytes_down={"site-01": 12},
        wall_time_s=1.5,
    )
    w.round(rec, STATE, {})
    got = r.next_round(1)
    assert torch.equal(got.state[next(iter(STATE))], next(iter(STATE.values())))
    again = record_from_json(got.record, global_metrics={"vqa_accuracy": 50.0}, extra_wall_s=0.5)
    assert again.global_metrics == {"vqa_accuracy": 50.0} and again.wall_time_s == 2.0
    assert again.to_json() == rec.to_json() | {"global": {"vqa_accuracy": 50.0}, "wall_time_s": 2.0}
    # the launcher's own interval between finished rounds replaces the server's time where given
    timed = record_from_json(got.record, global_metrics={}, extra_wall_s=0.5, wall_time_s=0.75)
    assert timed.wall_time_s == 0.75
    w.error(ValueError("boom"))
    assert r.error() == {"type": "ValueError", "message": "boom"}


# ---- slow: the exported job on FLARE's simulator, set up like production sites ----


@pytest.mark.slow
def test_exported_job_runs_in_the_flare_simulator(tmp_path, tiny_world, tiny_checkpoint, monkeypatch):
    """No partition file: each site trains on all of its own training split, found through its
    environment (the config's data.path points nowhere)."""
    cfg = _cfg(
        tmp_path,
        model={"path": str(tiny_checkpoint)},
        lora={"rank": 4, "alpha": 8},
        train={"batch_size": 8, "eval_batch_size": 32},
    )
    job = export_job(cfg, tmp_path / "out")
    ws = tmp_path / "ws"
    monkeypatch.setenv("FEDUMM_DATA_PATH", str(tiny_world))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    nvflare_cli = Path(sys.executable).with_name("nvflare")
    # -t 1: with two clients on two threads of one simulator process, FLARE's external-process
    # Client API once wrote site-2's bootstrap file under site-1's app folder (shared working
    # directory) and the round timed out; one thread runs the sites in turn
    cmd = [str(nvflare_cli), "simulator", str(job), "-w", str(ws), "-c", "site-1,site-2", "-t", "1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    results = ws / "server" / "simulate_job" / "fedumm"
    assert json.loads((results / "done.json").read_text()) == {"rounds": 1}
    rec = json.loads((results / "round-0001.json").read_text())
    assert rec["clients"] == ["site-1", "site-2"] and rec["dropped"] == []
    from fedumm.data.vqa import load_split

    n_train = len(load_split(tiny_world, cfg.data.train_split))
    for m in rec["client_metrics"].values():  # the whole split minus the local validation share
        assert 0.8 * n_train <= m["num_examples"] < n_train


def test_taken_port_is_named():
    import socket

    from fedumm.engines.nvflare.procs import check_ports_free
    from fedumm.errors import EngineError

    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(EngineError, match=rf"port {port} \(nvflare.fl_port\) is not free"):
            check_ports_free({"nvflare.fl_port": port})


def test_missing_flare_is_an_engine_error_with_the_install_hint(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['nvflare'] = None  # as if the extra were not installed\n"
        "from fedumm.errors import EngineError\n"
        "from fedumm.engines.nvflare import export_job\n"
        "try:\n"
        "    export_job(None, '.')\n"
        "except EngineError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert "pip install 'fedumm[nvflare]'" in out.stdout
