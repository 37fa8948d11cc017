"""Sweeps (expansion, shared baselines, resume, skip) and reports (tables match summaries, PNGs)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import fedumm.sweep as sweep_mod
from fedumm.config import dump_config
from fedumm.errors import ConfigError, DataError
from fedumm.progress import NullProgress
from fedumm.report import collect, write_report
from fedumm.summary import RunSummary
from fedumm.sweep import expand, load_sweep, run_sweep

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"
INTERRUPTED = "K2-a1.0-s0"


def _tiny_tree(world: Path, checkpoint: Path) -> dict:
    """The same run as conftest's tiny_config_tree (checked below), for a module-scoped sweep."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"path": str(world)},
        "model": {"path": str(checkpoint)},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"batch_size": 8, "lr": 0.005, "eval_batch_size": 32},
        "federation": {"clients": 2, "alpha": 0.5, "min_partition_size": 8, "rounds": 2},
    }


# Light cells: train on the 24 questions of the small val split, evaluate 6 test questions, 1 round.
LIGHT = {
    "data.train_split": "val",
    "data.val_split": "test",
    "data.max_val_questions": 6,
    "data.max_test_questions": 6,
    "federation.rounds": 1,
}


def _write_sweep(root: Path, tree: dict, grid: dict, **extra) -> Path:
    (root / "base.yaml").write_text(yaml.safe_dump(tree))
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "overrides": {**LIGHT}, "grid": grid, **extra}))
    return path


class Recorder(NullProgress):
    """Remembers the sweep bar's descriptions; optionally raises Ctrl-C after a cell's first round."""

    def __init__(self, interrupt: str | None = None) -> None:
        self.interrupt = interrupt
        self.current = ""
        self.descriptions: list[str] = []

    def start(self, key, description, total):
        if key == "sweep":
            self.descriptions.append(description)

    def update(self, key, completed, description=None):
        if key == "sweep" and description:
            self.descriptions.append(description)
            self.current = description
        if key == "rounds" and completed == 1 and self.interrupt and f": {self.interrupt} (" in self.current:
            raise KeyboardInterrupt


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(out.glob("*/summary.json"))}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_world, tiny_checkpoint):
    """Run a 2-cell sweep: interrupted in its last cell, resumed, then re-run with nothing to do."""
    root = tmp_path_factory.mktemp("sweep")
    sweep_file = _write_sweep(
        root,
        _tiny_tree(tiny_world, tiny_checkpoint),
        {"federation.clients": [2], "federation.alpha": [0.5, 1.0]},
    )
    out = root / "out"
    spec = load_sweep(sweep_file)
    calls: list[tuple[str, bool]] = []
    resumed: list[str] = []
    real_run, real_resume = sweep_mod.run_experiment, sweep_mod.resume_experiment

    def spy_run(cfg, out_dir, **kw):
        calls.append((cfg.name, cfg.baselines.centralized))
        return real_run(cfg, out_dir, **kw)

    def spy_resume(out_dir, **kw):
        resumed.append(Path(out_dir).name)
        return real_resume(out_dir, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "run_experiment", spy_run)
        mp.setattr(sweep_mod, "resume_experiment", spy_resume)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(spec, out, progress=Recorder(interrupt=INTERRUPTED))
        after_interrupt = json.loads((out / "sweep.json").read_text())
        first_calls = list(calls)
        before_resume = _mtimes(out)
        progress = Recorder()
        results = run_sweep(spec, out, progress=progress)
    return {
        "root": root,
        "sweep_file": sweep_file,
        "out": out,
        "spec": spec,
        "after_interrupt": after_interrupt,
        "first_calls": first_calls,
        "second_calls": calls[len(first_calls) :],
        "resumed": resumed,
        "before_resume": before_resume,
        "results": results,
        "progress": progress,
    }


def test_module_base_is_the_shared_tiny_config(tiny_config_tree, tiny_world, tiny_checkpoint):
    assert _tiny_tree(tiny_world, tiny_checkpoint) == tiny_config_tree


def test_expand_names_groups_and_baseline_settings(tiny_config_tree, tmp_path):
    spec = load_sweep(
        _write_sweep(
            tmp_path,
            tiny_config_tree,
            {
                "federation.clients": [2, 3],
                "federation.alpha": [0.1, 1.0],
                "federation.strategy": ["fedavg", "quality_weighted"],
                "seed": [0, 1],
            },
        )
    )
    cells = expand(spec)
    assert [c.name for c in cells[:2]] == ["baselines-s0", "baselines-s1"]
    fed = [c for c in cells if c.kind == "federated"]
    assert len(fed) == 16 and fed[0].name == "K2-a0.1-fedavg-s0"
    assert "K3-a1.0-quality_weighted-s1" in {c.name for c in fed}
    assert all(c.baseline_cell == f"baselines-s{c.seed}" for c in fed)
    assert all(not c.config.baselines.zero_shot and not c.config.baselines.centralized for c in fed)
    assert all(c.config.name == c.name and c.config.seed == c.seed for c in cells)
    base = cells[0].config
    assert base.baselines.zero_shot and base.baselines.centralized
    assert base.federation.rounds == 1  # the centralized epochs follow rounds x local_epochs
    assert base.federation.sample_fraction == 0.5 and base.federation.min_clients == 1


def test_bad_grid_value_fails_up_front_naming_the_cell(tiny_config_tree, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("nothing may run")

    monkeypatch.setattr(sweep_mod, "run_experiment", never)
    spec = load_sweep(_write_sweep(tmp_path, tiny_config_tree, {"federation.alpha": [0.5, -1]}))
    with pytest.raises(ConfigError, match=r"cell a-1-s0: federation\.alpha: .*greater than or equal to 0"):
        run_sweep(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    spec = load_sweep(_write_sweep(tmp_path, tiny_config_tree, {"federation.clients": [2, 5]}))
    with pytest.raises(ConfigError, match=r"cell K5-s0: federation.clients=5 x .* needs 40 .* has 24"):
        expand(spec)
    spec = load_sweep(_write_sweep(tmp_path, tiny_config_tree, {"federation.strategy_params.cap": [2.0]}))
    with pytest.raises(ConfigError, match=r"cell cap2.0-s0: federation.strategy_params .* 'fedavg'"):
        expand(spec)
    bad_key = _write_sweep(tmp_path, tiny_config_tree, {"federation.alpah": [0.5]})
    with pytest.raises(ConfigError, match=r"grid\.federation\.alpah: unknown key .*did you mean 'alpha'"):
        load_sweep(bad_key)
    bad_top = tmp_path / "top.yaml"
    bad_top.write_text("base: base.yaml\ngrdi: {seed: [0]}\n")
    with pytest.raises(ConfigError, match=r"grdi: unknown key \(did you mean 'grid'\?\)"):
        load_sweep(bad_top)


def test_sweep_runs_baselines_once_and_records_cells(swept):
    assert swept["first_calls"] == [
        ("baselines-s0", True),
        ("K2-a0.5-s0", False),
        ("K2-a1.0-s0", False),
    ]
    status = {c["name"]: c["status"] for c in swept["after_interrupt"]["cells"]}
    assert status == {"baselines-s0": "finished", "K2-a0.5-s0": "finished", INTERRUPTED: "interrupted"}
    index = json.loads((swept["out"] / "sweep.json").read_text())
    assert [(c["name"], c["kind"], c["baseline_cell"], c["status"]) for c in index["cells"]] == [
        ("baselines-s0", "baselines", None, "finished"),
        ("K2-a0.5-s0", "federated", "baselines-s0", "finished"),
        ("K2-a1.0-s0", "federated", "baselines-s0", "finished"),
    ]
    assert index["cells"][1]["settings"] == {"federation.clients": 2, "federation.alpha": 0.5}
    base = RunSummary.from_json(json.loads((swept["out"] / "baselines-s0" / "summary.json").read_text()))
    for r in swept["results"]:
        assert r.status == "finished" and r.summary.status == "finished"
        assert r.zero_shot == base.zero_shot and r.centralized == base.centralized
        if r.cell.kind == "federated":
            assert r.summary.zero_shot is None and r.summary.centralized is None
    assert any("ETA" in d for d in swept["progress"].descriptions)


def test_rerun_resumes_the_interrupted_cell_and_skips_finished_ones(swept, monkeypatch):
    assert swept["second_calls"] == [] and swept["resumed"] == [INTERRUPTED]
    after = _mtimes(swept["out"])
    assert {k: v for k, v in after.items() if k != INTERRUPTED} == {
        k: v for k, v in swept["before_resume"].items() if k != INTERRUPTED
    }
    assert [r.skipped for r in swept["results"]] == [True, True, False]

    def never(*a, **k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(sweep_mod, "run_experiment", never)
    monkeypatch.setattr(sweep_mod, "resume_experiment", never)
    again = run_sweep(swept["spec"], swept["out"])
    assert all(r.skipped and r.status == "finished" for r in again)
    assert _mtimes(swept["out"]) == after


def test_changed_config_is_refused_naming_the_cell(swept, tmp_path):
    raw = yaml.safe_load(swept["sweep_file"].read_text())
    raw["overrides"]["train.lr"] = 0.5
    changed = swept["root"] / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match=r"cell baselines-s0: .* holds a run with another config \(train.lr differ\)"
    ):
        run_sweep(load_sweep(changed), swept["out"])


def _edit_saved_configs(out: Path, edit) -> None:
    for path in out.glob("*/config.yaml"):
        tree = yaml.safe_load(path.read_text())
        edit(tree)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))


def test_cells_saved_before_a_knob_existed_stay_finished(swept, tmp_path, monkeypatch):
    # a run saved by an earlier version lacks knobs added since (with defaults that keep the earlier
    # behaviour): its cells are still finished, not "another config"
    out = tmp_path / "out"
    shutil.copytree(swept["out"], out)
    _edit_saved_configs(out, lambda tree: tree["nvflare"].pop("task_poll_s"))

    def never(*a, **k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(sweep_mod, "run_experiment", never)
    monkeypatch.setattr(sweep_mod, "resume_experiment", never)
    again = run_sweep(swept["spec"], out)
    assert again and all(r.skipped and r.status == "finished" for r in again)

    # a saved knob this version does not know is one clear error naming the file
    _edit_saved_configs(out, lambda tree: tree["train"].update(removed_knob=1))
    with pytest.raises(ConfigError, match=r"config.yaml cannot be read by this version .*removed_knob"):
        run_sweep(swept["spec"], out)


def _md_table(md: str, after: str) -> list[list[str]]:
    """Rows (header first) of the first markdown table after the line containing ``after``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
        elif rows:
            break
    return [rows[0], *rows[2:]]


def test_report_tables_match_the_summaries(swept, tmp_path):
    out = swept["out"]
    results = collect([out])
    assert [(r.clients, r.alpha, r.path.name) for r in results] == [
        (2, 0.5, "K2-a0.5-s0"),
        (2, 1.0, "K2-a1.0-s0"),
    ]
    md_path = write_report(results, tmp_path / "report")
    md = md_path.read_text()
    summaries = {p: json.loads((out / p / "summary.json").read_text()) for p in (INTERRUPTED, "K2-a0.5-s0")}
    base = json.loads((out / "baselines-s0" / "summary.json").read_text())

    table = _md_table(md, "Federated VQA accuracy (test split")
    assert table[0] == ["K \\ alpha", "0.5", "1.0"]
    rows = {r[0]: r[1:] for r in table[1:]}
    fed = [summaries[n]["federated"]["vqa_accuracy"] for n in ("K2-a0.5-s0", INTERRUPTED)]
    assert rows["2"] == [f"{v:.2f}" for v in fed]
    assert rows["centralized"] == [f"{base['centralized']['vqa_accuracy']:.2f}"] * 2
    assert rows["zero-shot"] == [f"{base['zero_shot']['vqa_accuracy']:.2f}"] * 2
    central = base["centralized"]["vqa_accuracy"]
    retention = _md_table(md, "Retention (federated / centralized")
    expected = [f"{100 * v / central:.2f}" if central else "-" for v in fed]
    assert retention[1] == ["2", *expected]

    worst = _md_table(md, "to the answers the client holds")
    assert worst[0] == ["K", "alpha", "global", "client mean", "client p10", "worst client", "seeds"]
    for row, name in zip(worst[1:], ("K2-a0.5-s0", INTERRUPTED), strict=True):
        f = summaries[name]["federated"]
        keys = ("vqa_accuracy", "client_vqa_mean", "client_vqa_p10", "client_vqa_worst")
        view = [f"{f[k]:.2f}" for k in keys]
        assert row == ["2", name.split("-a")[1].split("-")[0], *view, "1"]
        assert f["client_vqa_worst"] == min(c["accuracy"] for c in f["client_vqa"].values())

    comm = _md_table(md, "Bytes per round as serialised")
    assert comm[0][:2] == ["strategy", "K"]
    (row,) = comm[1:]
    total = max(s["bytes_up_per_round"] + s["bytes_down_per_round"] for s in summaries.values())
    full = 2 * summaries[INTERRUPTED]["full_model_bytes"]
    assert row[:2] == ["`fedavg`", "2"]
    assert int(row[3].replace(",", "")) == total
    assert int(row[4].replace(",", "")) == full and int(row[5].replace(",", "")) == 2 * full
    assert float(row[6]) == pytest.approx(100 * (1 - total / (2 * full)), abs=1e-3)

    assert "no GenEval results in these runs".lower() in md.lower()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["curves-fedavg.png", "heatmap-fedavg.png"]
    for link in links:
        assert (md_path.parent / link).read_bytes().startswith(PNG)
    again = write_report(collect([out / INTERRUPTED, out]), tmp_path / "again")
    assert again.read_text().replace(str(out / INTERRUPTED), "X") == md.replace(str(out / INTERRUPTED), "X")


def _fake_run(
    root: Path,
    name: str,
    *,
    k: int,
    alpha: float,
    seed: int,
    acc: float,
    central: float,
    family: str | None = None,
    rounds: int | None = None,
    **extra,
):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"seed": seed, "federation": {"clients": k, "alpha": alpha, "strategy": "fedavg"}}
    if rounds is not None:
        cfg["federation"]["rounds"] = rounds
    if family is not None:
        cfg["model"] = {"family": family}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rounds = [
        {
            "round": r,
            "clients": [f"site-{i:02d}" for i in range(1, k + 1)],
            "global": {"vqa_accuracy": acc - 2 + r},
            "bytes_up": {f"site-{i:02d}": 110 for i in range(1, k + 1)},
            "bytes_down": {f"site-{i:02d}": 100 for i in range(1, k + 1)},
        }
        for r in (1, 2)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary = {
        "name": name,
        "status": "finished",
        "zero_shot": {"vqa_accuracy": 10.0, "val_vqa_accuracy": 11.0},
        "centralized": {"vqa_accuracy": central, "val_vqa_accuracy": central},
        "federated": {"vqa_accuracy": acc},
        "bytes_up_per_round": 110 * k,
        "bytes_down_per_round": 100 * k,
        "full_model_bytes": 10_000,
        "wall_time_s": 1.0,
        **extra,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_report_mean_std_over_seeds_and_geneval(tmp_path):
    geneval = {"geneval": {"overall": 0.5, "tags": {"colors": 0.75, "counting": 0.25}}}
    dirs = [
        _fake_run(tmp_path, "a", k=2, alpha=0.1, seed=0, acc=40.0, central=50.0, **geneval),
        _fake_run(tmp_path, "b", k=2, alpha=0.1, seed=1, acc=44.0, central=55.0),
        _fake_run(tmp_path, "c", k=4, alpha=1.0, seed=0, acc=30.0, central=60.0),
    ]
    md = write_report(collect(reversed(dirs)), tmp_path / "rep").read_text()
    table = _md_table(md, "Federated VQA accuracy (test split")
    assert table[0] == ["K \\ alpha", "0.1", "1.0"]
    assert table[1] == ["2", "42.00 ± 2.83", "-"] and table[2] == ["4", "-", "30.00"]
    assert table[3] == ["centralized", "52.50 ± 3.54", "60.00"]
    assert table[4] == ["zero-shot", "10.00 ± 0.00", "10.00"]
    assert _md_table(md, "Retention (federated")[1] == ["2", "80.00 ± 0.00", "-"]
    comm = _md_table(md, "Bytes per round as serialised")
    assert comm[1] == ["`fedavg`", "2", "210", "420", "20,000", "40,000", "98.950"]
    assert comm[2] == ["`fedavg`", "4", "210", "840", "20,000", "80,000", "98.950"]
    assert _md_table(md, "GenEval scores")[1] == ["2", "0.1", "0.500", "0.750", "0.250"]
    with pytest.raises(DataError, match="neither a run directory"):
        collect([tmp_path / "nowhere"])


def test_report_reads_a_round_written_twice_once_the_later_line_standing(tmp_path):
    """A run that started over (or two processes writing one directory) leaves rounds 1-2 twice in
    metrics.jsonl; the report counts each round once, with its later line."""
    d = _fake_run(tmp_path, "twice", k=2, alpha=0.1, seed=0, acc=40.0, central=50.0)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    stale = [{**r, "global": {"vqa_accuracy": 0.0}} for r in rows]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*stale, *rows]))
    (run,) = collect([d])
    assert run.curve == ((1, 39.0), (2, 40.0))
    runs_table = _md_table(write_report([run], tmp_path / "rep").read_text(), "## Runs")
    assert runs_table[1][runs_table[0].index("rounds")] == "2"
    (d / "metrics.jsonl").write_text(json.dumps({"global": {}}) + "\n")
    with pytest.raises(DataError, match="integer 'round'"):
        collect([d])


def test_report_retention_by_rounds(tmp_path):
    dirs = [
        _fake_run(tmp_path, "r5s0", k=16, alpha=0.1, seed=0, acc=40.0, central=50.0, rounds=5),
        _fake_run(tmp_path, "r5s1", k=16, alpha=0.1, seed=1, acc=44.0, central=55.0, rounds=5),
        _fake_run(tmp_path, "r10s0", k=16, alpha=0.1, seed=0, acc=45.0, central=50.0, rounds=10),
        _fake_run(tmp_path, "k2r10", k=2, alpha=1.0, seed=0, acc=30.0, central=60.0, rounds=10),
    ]
    md = write_report(collect(dirs), tmp_path / "rep").read_text()
    table = _md_table(md, "in brackets the federated test VQA")
    assert table[0] == ["K, alpha", "5 rounds", "10 rounds"]
    assert table[1] == ["2, 1.0", "-", "50.00 (30.00, n=1)"]
    assert table[2] == ["16, 0.1", "80.00 ± 0.00 (42.00 ± 2.83, n=2)", "90.00 (45.00, n=1)"]
    # one round count: no such section
    single = write_report(collect(dirs[:2]), tmp_path / "single").read_text()
    assert "Retention by rounds" not in single


def test_report_retention_by_rounds_from_rounds_scored_inside_one_run(tmp_path):
    """federation.test_at_rounds: a 10-round run scored after round 5 gives the 5-round point itself;
    a separate 5-round run of the same seed is the same measurement and is not counted twice."""

    def scored(acc5, acc10, c5, c10):
        return {
            "federated": {"vqa_accuracy": acc10, "vqa_accuracy_by_round": {"5": acc5, "10": acc10}},
            "centralized": {
                "vqa_accuracy": c10,
                "val_vqa_accuracy": c10,
                "vqa_accuracy_by_round": {"5": c5, "10": c10},
            },
        }

    dirs = [
        _fake_run(
            tmp_path,
            "s0",
            k=16,
            alpha=0.1,
            seed=0,
            acc=0,
            central=0,
            rounds=10,
            **scored(40.0, 45.0, 50.0, 50.0),
        ),
        _fake_run(
            tmp_path,
            "s1",
            k=16,
            alpha=0.1,
            seed=1,
            acc=0,
            central=0,
            rounds=10,
            **scored(33.0, 36.0, 55.0, 40.0),
        ),
        _fake_run(tmp_path, "s0r5", k=16, alpha=0.1, seed=0, acc=40.0, central=50.0, rounds=5),
    ]
    md = write_report(collect(dirs), tmp_path / "rep").read_text()
    table = _md_table(md, "in brackets the federated test VQA")
    assert table[0] == ["K, alpha", "5 rounds", "10 rounds"]
    assert table[1] == ["16, 0.1", "70.00 ± 14.14 (36.50 ± 4.95, n=2)", "90.00 ± 0.00 (40.50 ± 6.36, n=2)"]
    # the rounds scored inside the runs alone (every run 10 rounds long) give the same section
    md = write_report(collect(dirs[:2]), tmp_path / "rep-inside").read_text()
    assert _md_table(md, "in brackets the federated test VQA")[1] == table[1]


def test_report_puts_two_families_side_by_side_and_never_in_one_table(tmp_path):
    geneval = {"geneval": {"overall": 0.25, "tags": {"colors": 0.5}}}
    dirs = [
        _fake_run(tmp_path, "j2", k=2, alpha=0.1, seed=0, acc=40.0, central=50.0, family="janus"),
        _fake_run(tmp_path, "b2", k=2, alpha=0.1, seed=0, acc=30.0, central=60.0, family="blip3o", **geneval),
        _fake_run(tmp_path, "j4", k=4, alpha=0.1, seed=0, acc=45.0, central=50.0, family="janus"),
    ]
    md = write_report(collect(dirs), tmp_path / "rep").read_text()
    side = _md_table(md, "Model families side by side")
    assert side[0] == [
        "strategy",
        "K",
        "alpha",
        *(f"{f} {c}" for c in ("VQA", "retention", "GenEval", "bytes/round") for f in ("blip3o", "janus")),
    ]
    assert side[1] == ["`fedavg`", "2", "0.1", "30.00", "40.00", "50.00", "80.00", "25.00", "-", "420", "420"]
    assert side[2] == ["`fedavg`", "4", "0.1", "-", "45.00", "-", "90.00", "-", "-", "-", "840"]
    # two plain janus runs carry a baseline each (equal here): mean ± std over the two
    assert side[3][:5] == ["zero-shot", "-", "-", "10.00", "10.00 ± 0.00"]
    assert side[4][:5] == ["centralized", "-", "-", "60.00", "50.00 ± 0.00"]
    # each family keeps its own accuracy tables: the K = 2 cell is not a mean of the two families
    janus = md.split("### Strategy `fedavg` (model.family=janus)")[1]
    assert _md_table(janus, "Federated VQA accuracy")[1] == ["2", "40.00"]
    blip3o = md.split("### Strategy `fedavg` (model.family=blip3o)")[1]
    assert _md_table(blip3o, "Federated VQA accuracy")[1] == ["2", "30.00"]
    # one family only: no side-by-side section
    single = write_report(collect(dirs[::2]), tmp_path / "single").read_text()
    assert "Model families side by side" not in single


def test_a_family_axis_gives_each_family_its_own_baseline_cell(tiny_config_tree, tmp_path):
    tree = {**tiny_config_tree, "model": {"path": None}, "lora": {**tiny_config_tree["lora"]}}
    tree["lora"]["groups"] = ["language", "generation"]
    spec = load_sweep(
        _write_sweep(tmp_path, tree, {"model.family": ["janus", "blip3o"], "federation.clients": [2, 3]})
    )
    cells = expand(spec)
    assert [c.name for c in cells if c.kind == "baselines"] == [
        "baselines-family_janus-s0",
        "baselines-family_blip3o-s0",
    ]
    fed = [c for c in cells if c.kind == "federated"]
    assert len(fed) == 4
    for c in fed:
        assert c.baseline_cell == f"baselines-family_{c.config.model.family}-s0"
        assert c.name.endswith(f"family_{c.config.model.family}-s0")


def _recording_run(ran: list[str]):
    def fake_run(cfg, out_dir, **kw):  # records the cell; a finished summary on disk, as a real run leaves
        ran.append(cfg.name)
        Path(out_dir).mkdir(parents=True)
        summary = RunSummary(name=cfg.name, status="finished", wall_time_s=1.0)
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary.to_json()))
        (Path(out_dir) / "config.yaml").write_text(dump_config(cfg))
        return summary

    return fake_run


def _two_by_two_by_two(tiny_config_tree, tmp_path):
    """K in {2, 3} x alpha in {0.1, 1.0} x seed in {0, 1}."""
    grid = {"federation.clients": [2, 3], "federation.alpha": [0.1, 1.0], "seed": [0, 1]}
    return load_sweep(_write_sweep(tmp_path, tiny_config_tree, grid))


def test_only_runs_the_matching_cells_and_their_baselines_and_a_later_run_continues(
    tiny_config_tree, tmp_path, monkeypatch
):
    spec = _two_by_two_by_two(tiny_config_tree, tmp_path)
    ran: list[str] = []
    monkeypatch.setattr(sweep_mod, "run_experiment", _recording_run(ran))
    only = sweep_mod.parse_only(spec, ["federation.clients=3", "seed=1", "seed=0", "federation.alpha=1.0"])
    assert only == {"federation.clients": (3,), "seed": (1, 0), "federation.alpha": (1.0,)}
    out = tmp_path / "out"
    results = run_sweep(spec, out, only=only)
    assert ran == ["baselines-s0", "baselines-s1", "K3-a1.0-s0", "K3-a1.0-s1"]
    assert [r.cell.name for r in results] == ran
    index = json.loads((out / "sweep.json").read_text())
    status = {c["name"]: c["status"] for c in index["cells"]}
    assert len(status) == 10 and sorted(n for n, s in status.items() if s == "finished") == sorted(ran)
    assert status["K2-a0.1-s0"] == "pending"
    # one filter on seed alone: only the seed-1 cells not run yet, and their (finished) baseline cell
    ran.clear()
    run_sweep(spec, out, only=sweep_mod.parse_only(spec, ["seed=1"]))
    assert ran == ["K2-a0.1-s1", "K3-a0.1-s1", "K2-a1.0-s1"]  # the grid file lists alpha first
    ran.clear()
    run_sweep(spec, out)  # no filter: the rest
    assert ran == ["K2-a0.1-s0", "K3-a0.1-s0", "K2-a1.0-s0"]
    for bad, message in [
        ("federation.clients", "expected KEY=VALUE"),
        ("federation.rounds=2", r"not a grid key .*\(grid keys: federation.alpha, federation.clients, seed"),
        ("federation.alpha=0.5", r"'0.5' is not a grid value of federation.alpha \(0.1, 1.0\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sweep_mod.parse_only(spec, [bad])


def test_cell_runs_named_cells_of_two_settings_and_their_baselines(tiny_config_tree, tmp_path, monkeypatch):
    spec = _two_by_two_by_two(tiny_config_tree, tmp_path)
    ran: list[str] = []
    monkeypatch.setattr(sweep_mod, "run_experiment", _recording_run(ran))
    # two settings no product of --only values picks alone (K3-a0.1-s1 and K2-a1.0-s0)
    names = sweep_mod.parse_cells(spec, ["K2-a1.0-s0", " K3-a0.1-s1", "K2-a1.0-s0"])
    assert names == ("K2-a1.0-s0", "K3-a0.1-s1")
    out = tmp_path / "out"
    run_sweep(spec, out, names=names)
    assert ran == ["baselines-s0", "baselines-s1", "K3-a0.1-s1", "K2-a1.0-s0"]  # the sweep's order
    status = {c["name"]: c["status"] for c in json.loads((out / "sweep.json").read_text())["cells"]}
    assert sorted(n for n, s in status.items() if s == "finished") == sorted(ran)
    ran.clear()
    run_sweep(spec, out, names=sweep_mod.parse_cells(spec, ["baselines-s1", "K2-a1.0-s0"]))
    assert ran == []  # both finished
    with pytest.raises(ConfigError, match=r"--cell 'K3-a1.0-s9': no such cell .*you mean K3-a1.0-s[01]\?"):
        sweep_mod.parse_cells(spec, ["K3-a1.0-s9"])
    with pytest.raises(ConfigError, match="--cell and --only do not combine"):
        run_sweep(spec, out, only=sweep_mod.parse_only(spec, ["seed=1"]), names=names)
    assert ran == []


def test_cli_commands_when_registered(swept, tmp_path):
    from typer.testing import CliRunner

    from fedumm.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    if not {"sweep", "report"} <= names:
        pytest.skip("fedumm sweep / fedumm report are not registered in the CLI yet")
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(swept["out"]), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: nowhere.yaml\n")
    res = runner.invoke(app, ["sweep", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not found" in res.output


def _tree_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_archive_keeps_what_a_report_and_a_resume_need_and_nothing_else(swept, tmp_path, monkeypatch):
    from fedumm.archive import ARCHIVED_FILES, archive_sweep

    out, arch = swept["out"], tmp_path / "archive"
    res = archive_sweep(out, arch)
    cells = ["baselines-s0", "K2-a0.5-s0", INTERRUPTED]
    assert res.copied == cells and res.kept == [] and res.left == []
    expected = {"sweep.json"} | {f"{c}/{f}" for c in cells for f in ARCHIVED_FILES}
    assert _tree_files(arch) == expected  # no checkpoint, adapter, partition or plot
    assert res.bytes_written == sum((out / f).stat().st_size for f in expected - {"sweep.json"})
    for f in expected - {"sweep.json"}:
        assert (arch / f).read_bytes() == (out / f).read_bytes()
    assert sum((out / f).stat().st_size for f in _tree_files(out)) > 5 * res.bytes_written

    # the same report from the archive as from the sweep directory
    md = write_report(collect([out]), tmp_path / "rep").read_text().replace(str(out), "X")
    md_arch = write_report(collect([arch]), tmp_path / "rep-arch").read_text().replace(str(arch), "X")
    assert md_arch == md

    # a copy of the archive resumes: every archived cell is finished, none runs again
    def never(*a, **k):
        raise AssertionError("an archived cell ran again")

    monkeypatch.setattr(sweep_mod, "run_experiment", never)
    monkeypatch.setattr(sweep_mod, "resume_experiment", never)
    restored = tmp_path / "restored"
    shutil.copytree(arch, restored)
    again = run_sweep(swept["spec"], restored)
    assert [r.cell.name for r in again] == cells and all(r.skipped for r in again)
    original = {r.cell.name: r.summary.federated for r in swept["results"]}
    assert {r.cell.name: r.summary.federated for r in again} == original


def test_archive_merges_sittings_and_refuses_what_does_not_belong(swept, tmp_path):
    from fedumm.archive import archive_sweep

    # sitting 1 finished the baseline and one cell; the other is still to run
    first = tmp_path / "first"
    shutil.copytree(swept["out"], first)
    shutil.rmtree(first / INTERRUPTED)
    arch = tmp_path / "archive"
    res = archive_sweep(first, arch)
    assert res.copied == ["baselines-s0", "K2-a0.5-s0"] and res.left == [INTERRUPTED]
    status = {c["name"]: c["status"] for c in json.loads((arch / "sweep.json").read_text())["cells"]}
    assert status == {"baselines-s0": "finished", "K2-a0.5-s0": "finished", INTERRUPTED: "pending"}

    # sitting 2 (another checkout) holds only the last cell: the archive gains it, keeps the others
    second = tmp_path / "second"
    shutil.copytree(swept["out"], second)
    shutil.rmtree(second / "K2-a0.5-s0")
    shutil.rmtree(second / "baselines-s0")
    res = archive_sweep(second, arch)
    assert res.copied == [INTERRUPTED] and res.kept == ["baselines-s0", "K2-a0.5-s0"] and res.left == []
    index = json.loads((arch / "sweep.json").read_text())
    assert all(c["status"] == "finished" for c in index["cells"])
    assert [c["wall_time_s"] is not None for c in index["cells"]] == [True, True, True]

    # a cell archived from a run with another config is refused, and nothing is written
    _edit_saved_configs(second, lambda tree: tree["train"].update(lr=0.5))
    before = {f: (arch / f).read_bytes() for f in _tree_files(arch)}
    with pytest.raises(ConfigError, match=rf"cell {INTERRUPTED} was archived from a run with another config"):
        archive_sweep(second, arch)
    assert {f: (arch / f).read_bytes() for f in _tree_files(arch)} == before

    # another sweep's archive, a non-empty folder that is no archive, a target inside the sweep
    other = tmp_path / "other"
    shutil.copytree(swept["out"], other)
    index = json.loads((other / "sweep.json").read_text())
    index["grid"]["federation.alpha"] = [0.1]
    (other / "sweep.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="holds the archive of another sweep .grid differ"):
        archive_sweep(other, arch)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and holds no sweep.json"):
        archive_sweep(swept["out"], junk)
    with pytest.raises(ConfigError, match="must lie outside the sweep directory"):
        archive_sweep(swept["out"], swept["out"] / "archive")
    with pytest.raises(ConfigError, match="not a sweep directory"):
        archive_sweep(junk, tmp_path / "fresh")

    # a hostile cell directory in sweep.json never reaches outside the archive
    hostile = tmp_path / "hostile"
    shutil.copytree(swept["out"], hostile)
    index = json.loads((hostile / "sweep.json").read_text())
    index["cells"][0]["dir"] = "../escape"
    (hostile / "sweep.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="'../escape' is not a plain directory name"):
        archive_sweep(hostile, tmp_path / "fresh")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "fresh").exists()


def test_cli_archive(swept, tmp_path):
    from typer.testing import CliRunner

    from fedumm.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["archive", str(swept["out"]), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "archived 3 finished cell(s)" in res.output and "0 not finished" in res.output
    res = runner.invoke(app, ["archive", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "not a sweep directory" in res.output
