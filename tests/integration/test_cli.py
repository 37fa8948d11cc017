"""The command line: clear one-line errors with exit code 2, eval vqa, partition, synth."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedumm.cli import app
from fedumm.eval.vqa import evaluate_files

pytestmark = pytest.mark.integration
runner = CliRunner()


def test_bad_config_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: d}\nfederation: {alpah: 0.5}\n")
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "federation.alpah: unknown key (did you mean 'alpha'?)" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o"), "--set", "lora.rnak=3"])
    assert res.exit_code == 2 and "did you mean 'rank'" in res.output


def test_missing_data_dir_is_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {tmp_path / 'nowhere'}}}\n")
    res = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "fedumm data synth" in res.output


def test_eval_vqa_matches_library(tiny_world, tmp_path):
    q = tiny_world / "v2_OpenEnded_mscoco_val_questions.json"
    a = tiny_world / "v2_mscoco_val_annotations.json"
    anns = json.loads(a.read_text())["annotations"]
    # answer half right (the first annotator's raw answer), half wrong
    results = [
        {"question_id": x["question_id"], "answer": x["answers"][0]["answer"] if i % 2 else "zebra"}
        for i, x in enumerate(anns)
    ]
    r = tmp_path / "results.json"
    r.write_text(json.dumps(results))
    res = runner.invoke(
        app, ["eval", "vqa", "--questions", str(q), "--annotations", str(a), "--results", str(r)]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"overall", "perAnswerType", "perQuestionType"}
    assert out == evaluate_files(q, a, r)
    assert 0 < out["overall"] < 100


def test_eval_vqa_bad_results_exit_2(tiny_world, tmp_path):
    r = tmp_path / "results.json"
    r.write_text('[{"question_id": 1, "answer": "yes"}]')
    res = runner.invoke(
        app,
        [
            "eval",
            "vqa",
            "--questions",
            str(tiny_world / "v2_OpenEnded_mscoco_val_questions.json"),
            "--annotations",
            str(tiny_world / "v2_mscoco_val_annotations.json"),
            "--results",
            str(r),
        ],
    )
    assert res.exit_code == 2 and "error" in res.output


def test_partition_command_writes_json_and_heatmap(tiny_world, tmp_path):
    out = tmp_path / "p.json"
    res = runner.invoke(
        app,
        [
            "partition",
            "--data",
            str(tiny_world),
            "--clients",
            "4",
            "--alpha",
            "0.5",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    ids = [q for c in data["clients"].values() for q in c["question_ids"]]
    questions = json.loads((tiny_world / "v2_OpenEnded_mscoco_private_questions.json").read_text())[
        "questions"
    ]
    assert sorted(ids) == sorted(q["question_id"] for q in questions)  # nothing lost or duplicated
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_synth_command(tmp_path):
    res = runner.invoke(
        app,
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "w"),
            "--images",
            "public=2",
            "--images",
            "private=2",
            "--images",
            "val=1",
            "--images",
            "test=1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "w" / "v2_mscoco_private_annotations.json").is_file()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in res.output.splitlines() if "│" in line]
    rows = {row[0]: row[1:] for row in cells if row}
    assert rows["public"] == ["2", "6", "false"] and rows["private"] == ["2", "6", "true"]
    bad = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--images", "nope=2"])
    assert bad.exit_code != 0 and "unknown split" in bad.output and "Traceback" not in bad.output


def test_comm_counts_from_shipped_config():
    res = runner.invoke(
        app, ["comm", "--model-config", "configs/models/Qwen2.5-VL-3B-Instruct.json", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["lora_params"] < out["full_params"] / 100
    assert out["lora_bytes_bf16"] * 2 == out["lora_bytes_fp32"]


def test_eval_geneval_needs_exactly_one_input(tmp_path):
    res = runner.invoke(app, ["eval", "geneval", "--metadata", str(tmp_path / "m.jsonl")])
    assert res.exit_code == 2 and "exactly one" in res.output


def test_eval_geneval_on_ground_truth_renders(tmp_path):
    import numpy as np

    from fedumm.data.geneval_prompts import build_prompt_set, render_prompt, write_prompt_set
    from fedumm.data.render import render_scene
    from fedumm.eval.detect import image_name

    prompts = build_prompt_set(seed=0, per_tag=2)
    write_prompt_set(tmp_path / "m.jsonl", prompts)
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for p in prompts:
        render_scene(render_prompt(p, rng)).save(tmp_path / "imgs" / image_name(p.index, 0))
    res = runner.invoke(
        app, ["eval", "geneval", "--metadata", str(tmp_path / "m.jsonl"), "--images", str(tmp_path / "imgs")]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["overall"] == 1.0 and len(out["tags"]) == 6


def test_error_text_is_printed_as_given(tmp_path):
    """A GenEval metadata error on line 100 says ':100:', not an emoji (rich's :100: code)."""
    good = json.dumps(
        {
            "tag": "single_object",
            "include": [{"class": "circle", "count": 1}],
            "prompt": "a photo of a circle",
        }
    )
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join([good] * 99 + ['{"tag": "single_object", "prompt": [oops']) + "\n")
    dets = tmp_path / "dets.jsonl"
    dets.write_text("")
    res = runner.invoke(app, ["eval", "geneval", "--metadata", str(meta), "--detections", str(dets)])
    assert res.exit_code == 2
    assert ":100:" in res.output and "\N{HUNDRED POINTS SYMBOL}" not in res.output
    # markup in a message is text too
    bad = tmp_path / "[bold]x[/bold].yaml"
    res = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "[bold]x[/bold].yaml" in res.output


def test_tables_stay_readable_when_stdout_is_not_a_terminal(monkeypatch):
    import io

    from fedumm.cli import _Console, _summary_table
    from fedumm.summary import RunSummary, SettingResult

    monkeypatch.delenv("COLUMNS", raising=False)
    row = SettingResult(
        vqa_accuracy=41.25,
        generation_loss=3.5,
        geneval={
            k: 11.1
            for k in (
                "overall",
                "single_object",
                "two_object",
                "counting",
                "colors",
                "position",
                "color_attr",
            )
        },
    )
    summary = RunSummary(name="demo", status="finished", zero_shot=row, centralized=row, federated=row)
    buf = io.StringIO()
    console = _Console(file=buf)
    assert not console.is_terminal
    console.print(_summary_table(summary, "image-token loss"))
    text = buf.getvalue()
    assert (
        "VQA accuracy (test, %)" in text and "image-token loss (test)" in text and "GenEval overall" in text
    )
    assert max(len(line) for line in text.splitlines()) > 80  # wider than rich's default for a pipe


def test_pyproject_license_is_an_spdx_expression():
    """A TOML table for project.license makes setuptools warn on every install (PEP 639)."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in requires)
