"""The released BLIP3o-Model-4B/8B layout, on a reduced checkpoint written in it (real key names, config
fields, token ids and file names; random weights at reduced widths): strict loading, understanding,
feature sampling, the one-line errors for what no library ships, and a one-round federated run that
trains LoRA on the language and generation towers and saves an adapter peft loads.

Generation *training* needs targets from BLIP3o's EVA-CLIP-E/14-plus, which no library ships and which
a site provides (docs/MODELS.md). The federated run here uses a STAND-IN for it: a frozen random
8 x 8-patch projection (``StandInTargetEncoder``), installed exactly as a site installs its encoder
(``fedumm_site.json`` naming ``module:factory``). It makes targets of the right shape, nothing more.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedumm.errors import ConfigError
from fedumm.models import family_class
from fedumm.models.base import FamilyOptions
from fedumm.models.blip3o import layout

pytestmark = pytest.mark.integration

SITE_MODULE = "fedumm_blip3o_layout_test_site"
HIDDEN, FEATURES, N_QUERY = 32, 32, 64


class StandInTargetEncoder(nn.Module):
    """Not EVA-CLIP: a frozen random projection of 8 x 8 patches, (B, 3, 64, 64) -> (B, C, 8, 8)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.proj = nn.Conv2d(3, channels, kernel_size=8, stride=8)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)


def stand_in_target_encoder(checkpoint: Path, config: dict) -> nn.Module:
    """A site factory: (checkpoint directory, config.json) -> module; the features are EVA-CLIP's width."""
    assert (checkpoint / "config.json").is_file() and config["gen_vision_tower"] == "eva-clip-E-14-plus"
    return StandInTargetEncoder(int(config["gen_hidden_size"]))


class StandInDecoder(nn.Module):
    """Not BLIP3o's SDXL decoder: features (B, C, 8, 8) -> pixels (B, 3, 64, 64) in [-1, 1]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, 3, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(nn.functional.interpolate(self.proj(features), scale_factor=8))


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return layout.write_released_layout(tmp_path_factory.mktemp("blip3o-model-8b"), seed=0)


@pytest.fixture()
def site(released, monkeypatch):
    """The stand-in target encoder, installed as a site installs EVA-CLIP (removed afterwards)."""
    module = types.ModuleType(SITE_MODULE)
    module.target_encoder = stand_in_target_encoder
    monkeypatch.setitem(sys.modules, SITE_MODULE, module)
    hooks = released / layout.SITE_FILE
    hooks.write_text(json.dumps({"target_encoder": f"{SITE_MODULE}:target_encoder"}))
    try:
        yield released
    finally:
        hooks.unlink()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("model-*.safetensors")):
        out |= load_file(str(f))
    return out


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_the_reduced_checkpoint_is_written_in_the_released_layout(released):
    config = json.loads((released / "config.json").read_text())
    assert config["model_type"] == "blip3o_qwen" and config["architectures"] == ["blip3oQwenForCausalLM"]
    assert "text_config" not in config and config["hidden_size"] == HIDDEN  # flat, transformers 4.51
    assert config["rope_scaling"]["type"] == "mrope" and config["vision_config"]["patch_size"] == 14
    assert config["gen_vision_tower"] == "eva-clip-E-14-plus" and config["gen_pooling"] == "early_pool2d_4"
    assert config["n_query"] == N_QUERY and config["vocab_size"] == 151668
    index = json.loads((released / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    state = _tensors(released)
    assert sorted(state) == sorted(index["weight_map"])
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(state)
    assert any(k.startswith("visual.blocks.0.attn.qkv.") for k in state)
    assert any(k.startswith("model.layers.1.self_attn.q_proj.") for k in state)
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in state)
    assert state["model.latent_queries"].shape == (1, N_QUERY, HIDDEN)
    assert state["model.dit.model.caption_projection.linear_1.weight"].shape == (FEATURES, HIDDEN)
    assert "model.dit.model.layers.1.attn2.to_k.weight" in state and "model.dit.model.pad_token" not in state
    assert any(k.startswith("model.gen_vision_tower.vision_tower.model.blocks.") for k in state)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(released)
    assert len(tok) == 151668
    assert tok.convert_tokens_to_ids(["[IMG]", "[/IMG]", "<image>", "<|image_pad|>", "<|im_end|>"]) == [
        151665,
        151666,
        151667,
        151655,
        151645,
    ]
    decoder = released / "diffusion-decoder"
    for name in (
        "model_index.json",
        "pipeline_llava_gen.py",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bf16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bf16.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (decoder / name).is_file(), name


def test_the_backbone_and_the_dit_load_strictly(released):
    fam = family_class("blip3o").from_pretrained(released)
    state = _tensors(released)
    eva = [k for k in state if k.startswith("model.gen_vision_tower.")]
    report = fam.base.load_report
    assert report["tensors"] == len(state) - len(eva)  # every other tensor went somewhere
    assert report["skipped"] == {"model.gen_vision_tower": len(eva)}
    assert report["not_in_checkpoint"] == ["dit.model.pad_token"]  # diffusers' only, unused
    assert report["target_encoder"] is None and report["decoder"] is None
    base = fam.base
    lm = base.backbone.model.language_model
    # transformers' legacy conversion put the 4.51 keys where today's class has them
    assert torch.equal(lm.layers[1].self_attn.q_proj.weight, state["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(lm.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert torch.equal(
        base.backbone.model.visual.blocks[0].attn.qkv.weight, state["visual.blocks.0.attn.qkv.weight"]
    )
    assert torch.equal(base.backbone.lm_head.weight, state["lm_head.weight"])
    assert torch.equal(base.latent_queries.weight, state["model.latent_queries"][0])
    proj = state["model.dit.model.caption_projection.linear_2.weight"]
    assert torch.equal(base.dit.caption_projection.linear_2.weight, proj)
    assert torch.equal(
        base.dit.model.layers[1].attn2.to_v.weight, state["model.dit.model.layers.1.attn2.to_v.weight"]
    )
    assert base.config.dit["num_layers"] == 2 and base.config.dit["in_channels"] == FEATURES
    assert (base.config.feature_dim, base.config.grid, base.config.n_query) == (FEATURES, 8, N_QUERY)
    assert base.config.blip3o["gen_vision_tower"] == "eva-clip-E-14-plus"


def test_the_4b_layout_ties_lm_head(tmp_path):
    path = layout.write_released_layout(tmp_path / "blip3o-model-4b", tied=True, shards=1)
    assert "lm_head.weight" not in _tensors(path)
    fam = family_class("blip3o").from_pretrained(path)
    backbone = fam.base.backbone
    assert backbone.lm_head.weight.data_ptr() == backbone.model.language_model.embed_tokens.weight.data_ptr()
    assert fam.base.load_report["not_in_checkpoint"] == ["backbone.lm_head.weight", "dit.model.pad_token"]


def _rewrite(path: Path, shard: str, change) -> None:
    """Apply ``change`` to the tensors of one shard and keep the index in step."""
    tensors = load_file(str(path / shard))
    change(tensors)
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"] |= dict.fromkeys(tensors, shard)
    index_file.write_text(json.dumps(index))


def test_an_extra_a_missing_or_a_misshapen_tensor_is_one_line(released, tmp_path):
    cls = family_class("blip3o")
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = json.loads((released / "model.safetensors.index.json").read_text())["weight_map"][victim]

    extra = shutil.copytree(released, tmp_path / "extra")
    _rewrite(extra, shard, lambda t: t.update({"model.dit.model.bogus": torch.zeros(2)}))
    with pytest.raises(ConfigError) as exc:
        cls.from_pretrained(extra)
    assert "missing [], unexpected ['model.dit.model.bogus']" in _one_line(exc)

    missing = shutil.copytree(released, tmp_path / "missing")
    _rewrite(missing, shard, lambda t: t.pop(victim))
    with pytest.raises(ConfigError) as exc:
        cls.from_pretrained(missing)
    assert (
        "missing ['backbone.model.language_model.layers.1.mlp.up_proj.weight'], unexpected []"
        in _one_line(exc)
    )

    shape = shutil.copytree(released, tmp_path / "shape")
    _rewrite(shape, shard, lambda t: t.update({victim: torch.zeros(3)}))
    with pytest.raises(ConfigError) as exc:
        cls.from_pretrained(shape)
    assert f"tensor '{victim}' has shape (3,)" in _one_line(exc)


def test_understanding_and_feature_generation_run_and_the_missing_pieces_say_so(released, tiny_world):
    from fedumm.data.captions import load_captions
    from fedumm.data.vqa import load_split

    fam = family_class("blip3o").from_pretrained(released)
    vqa = load_split(tiny_world, "private")[:3]
    captions = load_captions(tiny_world, "private")[:2]
    # BLIP3o's chat prompt, the image expanded to Qwen2.5-VL's merged patches (a 56 x 56 px resize: 4)
    batch = fam.vqa_batch(vqa, with_answers=True)
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == 151644 and ids.count(151655) == 4
    assert torch.isfinite(fam.vqa_loss(batch))
    answers = fam.vqa_answer(vqa)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # generation: the prompt, then [IMG] and the 64 query slots
    query_ids, _ = fam._query_ids(["a red circle"])
    assert query_ids[0, -N_QUERY - 1].item() == 151665 and set(query_ids[0, -N_QUERY:].tolist()) == {151667}
    a = fam.generate_features(["a red circle", "two squares"], images_per_prompt=2, seed=1)
    b = fam.generate_features(["a red circle", "two squares"], images_per_prompt=2, seed=1)
    assert a.shape == (4, FEATURES, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    with pytest.raises(ConfigError) as exc:
        fam.generate(["a red circle"], images_per_prompt=1)
    text = _one_line(exc)
    assert "SDXL diffusion decoder" in text and "diffusion-decoder" in text and "docs/MODELS.md" in text
    with pytest.raises(ConfigError) as exc:
        fam.caption_batch(captions, generator=torch.Generator().manual_seed(0))
    text = _one_line(exc)
    assert "EVA-CLIP-E/14-plus" in text and "fedumm_site.json" in text and "docs/MODELS.md" in text
    # a site's decoder (options.extra here; fedumm_site.json works the same) makes pixels
    options = FamilyOptions(extra={"decoder": StandInDecoder(FEATURES)})
    images = family_class("blip3o").from_pretrained(released, options=options).generate(["a circle"])
    assert len(images) == 4 and images[0].size == (64, 64)


def test_a_one_round_federated_run_trains_both_towers_and_peft_loads_the_adapter(site, tiny_world, tmp_path):
    from peft import PeftModel

    from fedumm.config import load_config
    from fedumm.experiment import run_experiment
    from fedumm.io import read_safetensors
    from fedumm.models import family_info
    from fedumm.models.lora_state import get_adapter_state

    tree = {
        "name": "blip3o-released-layout",
        "data": {"path": str(tiny_world), "max_val_questions": 8, "max_test_questions": 8},
        "model": {"family": "blip3o", "path": str(site)},
        "lora": {"rank": 2, "alpha": 4, "groups": ["language", "generation"]},
        "train": {"batch_size": 8, "eval_batch_size": 16},
        "federation": {"clients": 2, "rounds": 1, "tasks": "both", "min_partition_size": 4},
        "baselines": {"zero_shot": False, "centralized": False},
        "geneval": {"enabled": False},
    }
    out = tmp_path / "run"
    summary = run_experiment(load_config(None, tree=tree), out)
    assert summary.status == "finished" and summary.family == "blip3o"
    assert summary.federated.generation_loss is not None
    want = read_safetensors(out / "checkpoint" / "round-0001.safetensors")
    info = family_info("blip3o")
    assert {info.group_of(k) for k in want} == {"language", "generation"}
    assert any("latent_queries" in k for k in want)  # trained whole
    # the round moved both towers' adapters off their initial (zero) B factors
    for group in ("language", "generation"):
        moved = [k for k in want if info.group_of(k) == group and "lora_B" in k and want[k].abs().sum() > 0]
        assert moved, group
    config = json.loads((out / "global_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    base = family_class("blip3o").from_pretrained(site).base
    loaded = PeftModel.from_pretrained(base, out / "global_adapter")
    got = get_adapter_state(loaded)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
