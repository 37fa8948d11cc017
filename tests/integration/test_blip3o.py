"""The BLIP3o family end to end: its pretraining (phases, report, gates), the shipped checkpoint, the
flow-matching loss against a hand computation, and the checkpoint's strict loading."""

from __future__ import annotations

import json

import pytest
import torch

from fedumm.errors import ConfigError, DataError
from fedumm.models import family_class

pytestmark = pytest.mark.integration

TINY_STEPS = {
    "encoder_steps": 3,
    "encoder_batch_size": 8,
    "decoder_steps": 2,
    "joint_steps": 3,
    "batch_size": 8,
    "t2i_batch_size": 8,
    "warmup_steps": 1,
    "max_eval_questions": 8,
    "gate_images": 4,
}
NO_GATES = {"min_round_trip_shape": 0.0, "min_round_trip_colour": 0.0, "min_generated_colour_large": 0.0}


def test_pretrain_runs_every_phase_and_saves_a_loadable_checkpoint(tiny_world, tmp_path):
    cls = family_class("blip3o")
    report = cls.pretrain(tiny_world, tmp_path / "ckpt", overrides=TINY_STEPS | NO_GATES)
    assert report["encoder"]["steps"] == 3 and report["encoder"]["decoder_steps"] == 2
    assert report["joint"]["steps"] == 3
    for key in ("final_contrastive_loss", "final_reconstruction_mse", "final_decoder_mse"):
        assert report["encoder"][key] > 0
    assert report["joint"]["final_vqa_loss"] > 0 and report["joint"]["final_flow_loss"] > 0
    assert set(report["gates"]) >= {
        "round_trip_shape",
        "round_trip_colour",
        "generated_colour",
        "generated_colour_large",
        "generated_colour_small",
        "generated_shape",
    }
    assert report["gates_passed"] is True
    saved = json.loads((tmp_path / "ckpt" / "pretrain_report.json").read_text())
    assert saved["joint"]["steps"] == 3
    fam = cls.from_pretrained(tmp_path / "ckpt")
    # the target features were standardised with statistics measured after phase 1
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert len(config["feature_mean"]) == len(config["feature_std"]) == fam.base.config.feature_dim
    assert len(fam.generate(["a red circle"], images_per_prompt=1)) == 1


def test_a_missed_gate_keeps_the_target_and_names_the_gate(tiny_world, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("the previous checkpoint")
    with pytest.raises(DataError, match=r"missed its gates \(round_trip_shape .* < 1\.01"):
        family_class("blip3o").pretrain(
            tiny_world, target, overrides=TINY_STEPS | NO_GATES | {"min_round_trip_shape": 1.01}
        )
    assert (target / "keep.txt").read_text() == "the previous checkpoint"
    failed = tmp_path / "ckpt.failed-gates"
    assert json.loads((failed / "pretrain_report.json").read_text())["gates_passed"] is False


def test_unknown_pretraining_setting_is_a_config_error(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting 'joint_step' \(did you mean 'joint_steps'\?\)"):
        family_class("blip3o").pretrain(tiny_world, tmp_path / "x", overrides={"joint_step": 3})
    with pytest.raises(ConfigError, match="joint_steps must be >= 0"):
        family_class("blip3o").pretrain(tiny_world, tmp_path / "x", overrides={"joint_steps": -1})
    assert not (tmp_path / "x").exists()


def test_flow_loss_is_the_mse_of_the_velocity(tmp_path):
    """x_s = (1 - s) x + s e and the target e - x, computed here by hand on the family's DiT."""
    from fedumm.models.blip3o import generation as G

    fam = family_class("blip3o").from_pretrained(family_class("blip3o").write_tiny(tmp_path / "b", seed=0))
    model = fam.base
    c, g = model.config.feature_dim, model.config.grid
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, g, g, generator=gen)
    cond = torch.randn(3, model.config.n_query, 128, generator=gen)
    noise = G.draw_noise(x.shape, generator=gen, cfg_drop_prob=0.5, device=torch.device("cpu"))
    got = G.flow_loss(model, cond, {"features": x} | noise)
    s = noise["sigma"].view(-1, 1, 1, 1)
    v = model.dit(
        (1 - s) * x + s * noise["noise"], noise["sigma"] * 1000, cond * noise["keep"].view(-1, 1, 1)
    )
    assert float(got) == pytest.approx(float(((v - (noise["noise"] - x)) ** 2).mean()), rel=1e-6)
    assert set(noise["keep"].tolist()) <= {0.0, 1.0}


def test_checkpoint_loads_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    cls = family_class("blip3o")
    ckpt = cls.write_tiny(tmp_path / "b", seed=0)
    state = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("dit.model.") for k in state) and "latent_queries.weight" in state
    # two seeded builds are identical: the DiT's uninitialised pad token is zeroed
    again = load_file(str(cls.write_tiny(tmp_path / "c", seed=0) / "model.safetensors"))
    assert all(torch.equal(state[k], again[k]) for k in state)
    extra = dict(state) | {"bogus.weight": torch.zeros(1)}
    save_file(extra, str(ckpt / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"unexpected \['bogus.weight'\]"):
        cls.from_pretrained(ckpt)
    del extra["bogus.weight"], extra["latent_queries.weight"]
    save_file(extra, str(ckpt / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"missing \['latent_queries.weight'\]"):
        cls.from_pretrained(ckpt)
    with pytest.raises(ConfigError, match="holds no BLIP3o checkpoint"):
        cls.from_pretrained(tmp_path / "nowhere")


def test_the_shipped_checkpoint_is_what_the_command_builds_and_passed_its_gates():
    from dataclasses import asdict

    from fedumm.models import load_family
    from fedumm.models.blip3o.family import BUILTIN_PATH
    from fedumm.models.blip3o.pretrain import PretrainSpec

    weights = BUILTIN_PATH / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    report = json.loads((BUILTIN_PATH / "pretrain_report.json").read_text())
    # the report's settings are today's defaults: `fedumm pretrain --family blip3o` rebuilds it
    assert report["spec"] == asdict(PretrainSpec())
    assert report["gates_passed"] is True
    spec = report["spec"]
    assert report["gates"]["round_trip_shape"] >= spec["min_round_trip_shape"]
    assert report["gates"]["round_trip_colour"] >= spec["min_round_trip_colour"]
    assert report["gates"]["generated_colour_large"] >= spec["min_generated_colour_large"]
    assert report["encoder"]["steps"] == spec["encoder_steps"]
    assert report["joint"]["steps"] == spec["joint_steps"]
    family = load_family("blip3o", None)
    assert sum(p.numel() for p in family.base.parameters()) == report["num_parameters"]
    (image,) = family.generate(["a large red shape."], images_per_prompt=1)
    assert image.size == (64, 64)
