"""`fedumm pretrain` on a tiny world: both phases run and the result is a loadable Janus checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fedumm.models.janus.family import BUILTIN_PATH, JanusFamily
from fedumm.models.janus.pretrain import PretrainSpec, pretrain
from fedumm.models.janus.tiny import ALIGNMENT_TOKENS

pytestmark = pytest.mark.integration


def test_pretrain_trains_the_vq_tokenizer_then_understanding_and_generation(tiny_world, tmp_path):
    spec = PretrainSpec(
        epochs=1,
        batch_size=16,
        warmup_steps=2,
        vq_steps=3,
        vq_batch_size=8,
        t2i_batch_size=8,
        max_eval_questions=16,
        max_eval_images=8,
    )
    report = pretrain(tiny_world, tmp_path / "ckpt", make_family=JanusFamily, spec=spec)
    assert report["vq"]["steps"] == 3
    assert math.isfinite(report["final_t2i_loss"]) and math.isfinite(report["final_loss"])
    assert report["vq_round_trip"]["psnr_db"] > 0
    saved = json.loads((tmp_path / "ckpt" / "pretrain_report.json").read_text())
    assert saved["steps"] == report["steps"] > 0
    fam = JanusFamily.from_pretrained(tmp_path / "ckpt")
    assert [
        fam.tokenizer.convert_ids_to_tokens(i)
        for i in fam.tokenizer.convert_tokens_to_ids(list(ALIGNMENT_TOKENS))
    ] == list(ALIGNMENT_TOKENS)
    assert len(fam.generate(["a red circle"], images_per_prompt=1)) == 1
    with pytest.raises(ValueError, match="vq_batch_size"):
        PretrainSpec(vq_batch_size=0)


def test_shipped_checkpoint_covers_generation_and_stays_small():
    weights = BUILTIN_PATH / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    report = json.loads((BUILTIN_PATH / "pretrain_report.json").read_text())
    assert report["vq"]["steps"] > 0 and report["spec"]["t2i_weight"] > 0
    assert report["wall_time_s"] <= 30 * 60
    state = load_file(weights)
    codebook = state["model.vqmodel.quantize.embedding.weight"]
    assert torch.allclose(codebook.norm(dim=-1), torch.ones(codebook.shape[0]), atol=1e-4)  # trained VQ


def test_pretrain_refuses_a_synthetic_world_of_an_older_format(tmp_path):
    from fedumm.data import synth
    from fedumm.errors import DataError

    world = synth.synthesize(tmp_path / "w", seed=0, images={"public": 2, "val": 1}).root
    doc = json.loads((world / "world.json").read_text())
    doc["format_version"] = synth.FORMAT_VERSION - 1
    (world / "world.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"world\.json: synthetic world of format 1.*fedumm data synth"):
        JanusFamily.pretrain(world, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    (world / "world.json").write_text("[]")
    with pytest.raises(DataError, match="top level must be a JSON object"):
        JanusFamily.pretrain(world, tmp_path / "ckpt")
