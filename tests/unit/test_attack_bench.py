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


def test_pivot_puts_each_cell_under_its_defence_and_attack(bench):
    def row(defence, m, kind, vqa, success=None, flagged=(), **extra):
        return {
            "defence": defence,
            "malicious": m,
            "kind": kind,
            "vqa": vqa,
            "attack_success": success,
            "flagged_attackers": list(flagged),
            **extra,
        }

    rows = [
        row("none", 0, "(none)", 50.69, 0.28),
        row("none", 1, "scale", 0.28),
        row("none", 1, "backdoor", 51.53, 1.13),
        row("default", 0, "(none)", 52.61, 1.41),
        row("default", 1, "scale", 55.78, flagged=["site-03"]),
        row("default", 1, "backdoor", None, pending=True),
        row("none", 2, "scale", None, failed="round 5: only 0 valid client update(s)"),
    ]
    lines = bench.pivot(rows, 8).splitlines()
    one = lines.index(next(x for x in lines if x.startswith("Federated test VQA (%), 1 of 8")))
    two = lines.index(next(x for x in lines if x.startswith("Federated test VQA (%), 2 of 8")))
    header = "| defence | clean | scale | backdoor | backdoor success, clean -> attacked (%) |"
    assert lines[one + 2] == header
    assert lines[one + 4] == "| none | 50.69 | 0.28 [0/1] | 51.53 [0/1] | 0.28 -> 1.13 |"
    assert lines[one + 5] == "| default | 52.61 | 55.78 [1/1] | pending |  |"
    assert lines[two + 4] == "| none | 50.69 | failed |  |  |"
    assert lines[two + 5] == "| default | 52.61 |  |  |  |"  # a cell not in the rows at all: blank


def test_backdoor_part_runs_each_boost_and_reads_the_clean_reference(bench, tmp_path):
    import argparse

    clean = tmp_path / "none-clean-m0"  # the attacks part's clean cell, already finished
    RunDir(clean).path.mkdir(parents=True)
    fed = SettingResult(vqa_accuracy=50.69, rounds=5, attack_success=0.28)
    RunDir(clean).write_summary(RunSummary(name="cell", status="finished", federated=fed))
    args = argparse.Namespace(
        config=Path("c.yaml"),
        out=tmp_path,
        clients=8,
        malicious=[0, 1, 2],
        defences=["none"],
        poison=1.0,
        set=[],
        jobs=1,
        threads=None,
        table_only=False,
    )
    rows, table = bench.part_backdoor(args)
    ran = {tuple(c[-4:]) for c in bench.calls}
    assert ran == {
        (
            f"adversary.clients={m}",
            "adversary.kind=backdoor",
            "adversary.poison_fraction=1.0",
            f"adversary.strength={b}",
        )
        for m, b in [(1, "1"), (1, "8"), (2, "1"), (2, "4")]
    }
    assert len(bench.calls) == 4  # the clean reference is read, not rerun
    assert "| none | 1 of 8 | 50.69 / 0.28 | 51.50 / - [0/1] | boost 8: 51.50 / - [0/1] |" in table
    assert "| none | 2 of 8 | 50.69 / 0.28 | 51.50 / - [0/2] | boost 4: 51.50 / - [0/2] |" in table
