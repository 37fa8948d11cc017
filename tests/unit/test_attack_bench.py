"""benchmarks/attack_bench.py keeps what a cell's run ended with: a failed federation is a result (read
back, not rerun, on resume), an unfinished one is rerun, and ``run=False`` only reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fedumm.errors import EngineError
from fedumm.server.run_dir import RunDir
from fedumm.summary import RunSummary, SettingResult

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "attack_bench.py"


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("attack_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls: list[list[str]] = []
    monkeypatch.setattr(module, "load_config", lambda config, overrides: list(overrides))

    def fake_run(overrides, out):  # what run_experiment leaves: a summary, then raises or returns
        calls.append(overrides)
        run = RunDir(out)
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / "metrics.jsonl").write_text("", encoding="utf-8")
        if "diverge" in overrides:
            run.write_summary(RunSummary(name="cell", status="failed", adversarial_clients=("site-04",)))
            raise EngineError("round 5: only 0 valid client update(s)")
        fed = SettingResult(vqa_accuracy=51.5, rounds=5)
        summary = RunSummary(name="cell", status="finished", federated=fed)
        run.write_summary(summary)
        return summary

    monkeypatch.setattr(module, "run_experiment", fake_run)
    module.calls = calls
    return module


def test_a_failed_cell_is_kept_and_not_rerun(bench, tmp_path):
    out = tmp_path / "none-scale-m1"
    first = bench.run_cell(Path("c.yaml"), out, ["diverge"])
    assert first["failed"] == "round 5: only 0 valid client update(s)" and first["vqa"] is None
    again = bench.run_cell(Path("c.yaml"), out, ["diverge"])
    assert again == first
    assert len(bench.calls) == 1  # read back, not rerun


def test_a_failed_cell_with_other_overrides_runs_again(bench, tmp_path):
    out = tmp_path / "cell"
    bench.run_cell(Path("c.yaml"), out, ["diverge"])
    res = bench.run_cell(Path("c.yaml"), out, ["fine"])
    assert res["vqa"] == 51.5 and "failed" not in res
    assert bench.calls == [["diverge"], ["fine"]]


def test_read_only_reports_unfinished_cells_as_pending(bench, tmp_path):
    out = tmp_path / "cell"
    RunDir(out).path.mkdir(parents=True)
    RunDir(out).write_summary(RunSummary(name="cell", status="running"))
    res = bench.run_cell(Path("c.yaml"), out, ["fine"], run=False)
    assert res["pending"] and res["vqa"] is None and bench._vqa(res) == "*pending*"
    assert bench.calls == [] and (out / "summary.json").is_file()  # nothing ran or was removed
    bench.run_cell(Path("c.yaml"), out, ["fine"])
    done = bench.run_cell(Path("c.yaml"), out, ["fine"], run=False)
    assert done["vqa"] == 51.5 and len(bench.calls) == 1
