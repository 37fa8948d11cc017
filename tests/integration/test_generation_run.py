"""A modality-heterogeneous federation: understanding-only, generation-only and mixed clients, GenEval."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedumm.config import load_config
from fedumm.data.partition import load_partition
from fedumm.experiment import run_experiment
from fedumm.models.janus.family import JanusFamily

pytestmark = pytest.mark.integration

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@pytest.fixture(scope="module")
def hetero_run(tmp_path_factory, tiny_world, tiny_checkpoint):
    tree = {
        "name": "hetero",
        "seed": 0,
        "data": {"path": str(tiny_world)},
        "model": {"path": str(tiny_checkpoint)},
        "lora": {
            "rank": 4,
            "alpha": 8,
            "groups": ["vision", "language", "generation"],
            "alignment_tokens": 2,
        },
        "train": {"batch_size": 8, "lr": 0.005, "eval_batch_size": 32},
        "federation": {
            "clients": 4,
            "alpha": 0.5,
            "min_partition_size": 4,
            "rounds": 2,
            "client_tasks": ["understanding", "generation", "both", "both"],
        },
        "geneval": {
            "enabled": True,
            "per_tag": 1,
            "images_per_prompt": 2,
            "grid_prompts": 6,
            "held_out": True,
        },
    }
    out = tmp_path_factory.mktemp("hetero")
    summary = run_experiment(load_config(None, tree=tree), out)
    return out, summary


def test_each_client_gets_only_the_data_of_its_task_mix(hetero_run):
    out, _ = hetero_run
    vqa = load_partition(out / "partition.json").clients
    gen = load_partition(out / "generation_partition.json").clients
    assert vqa["site-02"] == () and gen["site-01"] == ()
    assert all(vqa[c] for c in ("site-01", "site-03", "site-04"))
    assert all(gen[c] for c in ("site-02", "site-03", "site-04"))


def test_rounds_report_vqa_and_geneval_and_per_task_client_metrics(hetero_run):
    out, summary = hetero_run
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        g = r["global"]
        assert {"vqa_accuracy", "geneval_overall", *(f"geneval_{t}" for t in TAGS)} <= set(g)
        assert g["geneval_overall"] == pytest.approx(sum(g[f"geneval_{t}"] for t in TAGS) / 6, abs=0.02)
        clients = r["client_metrics"]
        assert "val_vqa_accuracy" in clients["site-01"] and "val_caption_loss" not in clients["site-01"]
        assert "val_caption_loss" in clients["site-02"] and "val_vqa_accuracy" not in clients["site-02"]
        assert {"val_vqa_accuracy", "val_caption_loss"} <= set(clients["site-03"])
    for key in ("zero_shot", "centralized", "federated"):
        assert 0.0 <= summary.setting(key).geneval_overall <= 100.0
        assert 0.0 <= summary.setting(key).vqa_accuracy <= 100.0
    assert summary.federated.geneval_overall == rounds[-1]["global"]["geneval_overall"]
    for name in ("zero-shot", "centralized", "round-0001", "round-0002"):
        assert (out / "geneval" / f"{name}.png").stat().st_size > 1000
    assert (out / "geneval_per_round.png").is_file()


def test_geneval_overlap_with_training_captions_is_reported_and_a_held_out_set_scored(hetero_run, tiny_world):
    from fedumm.data.captions import load_captions
    from fedumm.data.contamination import CaptionIndex, held_out_prompt_set

    out, summary = hetero_run
    c = summary.geneval_contamination
    assert c["prompts"] == 6 and c["unread"] == 0 and 0 <= c["verbatim"] <= c["composition"] <= 6
    index = CaptionIndex(s.caption for s in load_captions(tiny_world, "private"))
    held = held_out_prompt_set(index, seed=0, per_tag=1)
    assert held and not any(index.occurs(p.prompt) for p in held)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for g in [r["global"] for r in rounds] + [summary.federated.geneval]:
        prefix = "geneval_held_out_" if "vqa_accuracy" in g else "held_out_"
        assert 0.0 <= g[f"{prefix}overall"] <= 100.0
        assert {f"{prefix}{p.tag}" for p in held} <= set(g)
    assert json.loads((out / "summary.json").read_text())["geneval_contamination"] == c


def test_in_domain_generation_loss_on_held_out_captions(hetero_run):
    out, summary = hetero_run
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {key: summary.setting(key).generation_loss for key in ("zero_shot", "centralized", "federated")}
    assert all(0.0 < v < 20.0 for v in losses.values())
    # training on captions must lower the loss on the test split's captions (same distribution)
    assert losses["centralized"] < losses["zero_shot"] and losses["federated"] < losses["zero_shot"]
    per_round = [r["global"]["image_token_loss"] for r in rounds]  # on the val split's captions
    assert len(per_round) == 2 and all(0.0 < v < 20.0 for v in per_round)


def test_zero_shot_is_the_pretrained_model_without_alignment_tokens(hetero_run, tiny_world, tiny_checkpoint):
    from fedumm.data.captions import load_captions
    from fedumm.eval.tasks import evaluate_captions

    _, summary = hetero_run
    bare = JanusFamily.from_pretrained(tiny_checkpoint)  # no adapter, no alignment tokens
    expected = evaluate_captions(bare, load_captions(tiny_world, "test"), batch_size=32)
    assert summary.zero_shot.generation_loss == pytest.approx(expected, abs=1e-4)


def test_vqa_only_data_has_no_generation_loss(tiny_world, tmp_path):
    import shutil

    from fedumm.client.site import load_data
    from fedumm.config import Config

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    (world / "captions_test.json").unlink()
    cfg = Config.model_validate({"name": "x", "data": {"path": str(world)}, "federation": {"tasks": "both"}})
    data = load_data(cfg)
    assert data.captions and data.val_captions and data.test_captions == []


def test_the_global_adapter_carries_all_groups_and_the_alignment_tokens(hetero_run, tiny_checkpoint):
    out, _ = hetero_run
    state = load_file(out / "global_adapter" / "adapter_model.safetensors")
    groups = {JanusFamily.info.group_of(k) for k in state}
    assert groups == {"vision", "language", "generation", "alignment"}
    tokens = [v for k, v in state.items() if JanusFamily.info.group_of(k) == "alignment"]
    assert any(float(t.abs().sum()) > 0 for t in tokens)  # trained (peft starts the delta at zero)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_round_records_show_which_groups_each_client_trained(hetero_run):
    out, _ = hetero_run
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["client_metrics"]
    assert first["site-01"]["examples_generation"] == 0 and first["site-01"]["examples_vision"] > 0
    assert first["site-02"]["examples_vision"] == 0 and first["site-02"]["examples_generation"] > 0
    for m in first.values():
        assert m["examples_language"] == m["num_examples"] == m["examples_vision"] + m["examples_generation"]


def test_generate_cli_loads_the_run_adapter_and_its_images_score(hetero_run, tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from fedumm.cli import app
    from fedumm.data.geneval import dump_metadata
    from fedumm.data.geneval_prompts import build_prompt_set

    out, _ = hetero_run
    meta = tmp_path / "meta.jsonl"
    dump_metadata(build_prompt_set(per_tag=1), meta)
    images = tmp_path / "images"
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "generate",
            "--out",
            str(images),
            "--metadata",
            str(meta),
            "--model",
            str(tiny_checkpoint),
            "--adapter",
            str(out / "global_adapter"),
            "--images-per-prompt",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list(images.glob("*.png"))) == 12
    plain = tmp_path / "plain"
    res = runner.invoke(
        app,
        [
            "generate",
            "--out",
            str(plain),
            "--metadata",
            str(meta),
            "--model",
            str(tiny_checkpoint),
            "--images-per-prompt",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    # the adapter (LoRA and alignment tokens) changes what the same seed samples
    assert any((images / p.name).read_bytes() != p.read_bytes() for p in plain.glob("*.png"))
    res = runner.invoke(app, ["eval", "geneval", "--metadata", str(meta), "--images", str(images)])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert len(result["images"]) == 12 and set(result["tags"]) == set(TAGS)
    res = runner.invoke(app, ["generate", "--out", str(tmp_path / "x"), "--adapter", str(tmp_path)])
    assert res.exit_code == 2 and "not a peft adapter" in res.output
