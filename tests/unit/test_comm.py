"""Paper-scale communication counts: meta-device models from configs, checked by hand and by peft."""

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

from fedumm.comm import count_lora
from fedumm.errors import ConfigError

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture
def tiny_qwen2(tmp_path):
    cfg = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        architectures=["Qwen2ForCausalLM"],
    )
    path = tmp_path / "config.json"
    cfg.to_json_file(path)
    return path, cfg


def test_tiny_qwen2_counts_match_a_hand_computation(tiny_qwen2):
    path, _ = tiny_qwen2
    out = count_lora(path, rank=4, targets=QKVO)
    # head_dim 8, kv width 2 * 8 = 16. Per layer: q 32*32+32, k 32*16+16, v 32*16+16, o 32*32 (no bias),
    # mlp 3 * 32*64, two RMSNorms 2*32 -> 9344; embeddings 100*32 (tied with lm_head: once); final norm 32.
    assert out["full_params"] == 100 * 32 + 2 * 9344 + 32 == 21920
    # LoRA r (in + out): q 4*(32+32), k 4*(32+16), v 4*(32+16), o 4*(32+32) = 896 per layer
    assert out["lora_params"] == 2 * 896 == 1792
    assert out["lora_modules"] == 8
    assert out["lora_bytes_fp32"] == 4 * 1792 and out["lora_bytes_bf16"] == 2 * 1792
    assert out["full_bytes_fp32"] == 4 * 21920 and out["full_bytes_bf16"] == 2 * 21920
    assert out["reduction_percent"] == pytest.approx(100 * (1 - 1792 / 21920))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_count_equals_peft_trainable_parameters_on_a_real_model(tiny_qwen2):
    path, cfg = tiny_qwen2
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=QKVO)
    )
    trainable, total = model.get_nb_trainable_parameters()
    out = count_lora(path, rank=4, targets=QKVO)
    assert trainable == out["lora_params"]
    assert total - trainable == out["full_params"]


def test_towers_regex_restricts_the_adapted_modules(tiny_qwen2):
    path, _ = tiny_qwen2
    assert count_lora(path, rank=4, targets=QKVO, towers=r"layers\.0\.")["lora_params"] == 896
    assert count_lora(path, rank=4, targets=["mlp"], towers=None)["lora_params"] == 0  # not a Linear


def test_shipped_qwen25_vl_7b_config_on_the_meta_device():
    out = count_lora(MODELS / "Qwen2.5-VL-7B-Instruct.json", rank=16, targets=QKVO)
    assert out["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    assert out["full_params"] == 8_292_166_656  # 8.29 B: language model 7.62 B + vision tower 0.68 B
    # 28 layers x 16 x [(3584+3584) + 2 (3584+512) + (3584+3584)]; the vision tower has qkv/proj, not q_proj
    assert out["lora_params"] == 28 * 16 * (2 * 7168 + 2 * 4096) == 10_092_544
    assert out["lora_modules"] == 112


def test_bad_arguments_are_config_errors(tmp_path, tiny_qwen2):
    path, _ = tiny_qwen2
    with pytest.raises(ConfigError, match="no such"):
        count_lora(tmp_path / "missing.json", rank=4, targets=QKVO)
    with pytest.raises(ConfigError, match="rank"):
        count_lora(path, rank=0, targets=QKVO)
    with pytest.raises(ConfigError, match="targets"):
        count_lora(path, rank=4, targets="q_proj")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ConfigError):
        count_lora(bad, rank=4, targets=QKVO)


# ---- diffusers configs and whole families -------------------------------------------------------------

DIT_ATTN = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
]


def _tiny_dit(**extra) -> dict:
    return {
        "_class_name": "LuminaNextDiT2DModel",
        "sample_size": 4,
        "patch_size": 1,
        "in_channels": 8,
        "hidden_size": 32,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_kv_heads": 4,
        "multiple_of": 16,
        "learn_sigma": False,
        "qk_norm": True,
        "cross_attention_dim": 32,
        **extra,
    }


def test_a_tiny_diffusers_dit_counts_by_hand_and_as_peft_adapts_it(tmp_path):
    from diffusers import ModelMixin
    from peft import inject_adapter_in_model

    path = tmp_path / "dit.json"
    path.write_text(json.dumps(_tiny_dit()))
    out = count_lora(path, rank=4, targets=DIT_ATTN)
    assert out["architecture"] == "LuminaNextDiT2DModel"
    # Lumina-Next's attn1.to_out is nn.Identity: per layer attn1 q, k, v and attn2 q, k, v, out.0,
    # each 32 -> 32, so 7 * 4 * (32 + 32) = 1792 per layer
    assert out["lora_modules"] == 2 * 7
    assert out["lora_params"] == 2 * 7 * 4 * (32 + 32) == 3584
    # the same count peft trains on a real (CPU) build of the config
    torch.manual_seed(0)
    cfg = json.loads(path.read_text())
    cls = getattr(__import__("diffusers"), cfg["_class_name"])
    assert issubclass(cls, ModelMixin)
    model = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, target_modules=DIT_ATTN), cls.from_config(cfg)
    )
    trained = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trained == out["lora_params"]


def test_shipped_blip3o_8b_dit_config():
    out = count_lora(MODELS / "BLIP3o-8B-DiT.json", rank=16, targets=DIT_ATTN)
    assert out["architecture"] == "PixArtAlphaTextProjection + LuminaNextDiT2DModel"
    # 24 layers x 7 linears x 16 x (1792 + 1792): the DiT attention at r = 16 is 9.63 M
    assert out["lora_params"] == 24 * 7 * 16 * (1792 + 1792) == 9_633_792
    assert out["lora_modules"] == 24 * 7
    # the caption projection 3584 -> 1792 -> 1792 (two biased linears) sits in front of the DiT
    cfg = json.loads((MODELS / "BLIP3o-8B-DiT.json").read_text())
    assert cfg["_caption_projection"]["in_features"] == 3584 and cfg["_latent_queries"] == [64, 3584]
    projection = 3584 * 1792 + 1792 + 1792 * 1792 + 1792
    assert projection == 9_637_376
    assert out["full_params"] == 1_365_012_128  # about 1.37 B, as the released DiT
    assert out["full_params"] - projection == _dit_alone_params(cfg)


def _dit_alone_params(cfg: dict) -> int:
    import diffusers

    init = {k: v for k, v in cfg.items() if not k.startswith("_caption") and k != "_latent_queries"}
    with torch.device("meta"):
        model = getattr(diffusers, cfg["_class_name"]).from_config(init)
    return sum(p.numel() for p in model.parameters())


def test_blip3o_4b_dit_differs_only_in_the_projection_width():
    c8 = json.loads((MODELS / "BLIP3o-8B-DiT.json").read_text())
    c4 = json.loads((MODELS / "BLIP3o-4B-DiT.json").read_text())
    assert set(c8) == set(c4)
    assert {k for k in c8 if c8[k] != c4[k]} == {"_caption_projection", "_latent_queries"}
    assert c4["_caption_projection"]["in_features"] == 2048 and c4["_latent_queries"] == [64, 2048]


def test_shipped_janus_pro_configs_on_the_meta_device():
    from fedumm.comm import build_meta

    one = build_meta(MODELS / "Janus-Pro-1B.json").model
    # the parameter count of deepseek-community/Janus-Pro-1B's model.safetensors (separate lm_head)
    assert sum(p.numel() for p in one.parameters()) == 2_076_636_811
    assert one.lm_head.weight is not one.model.language_model.embed_tokens.weight
    out = count_lora(MODELS / "Janus-Pro-1B.json", rank=16, targets=QKVO, towers="language_model")
    # 24 layers x 16 x 4 x (2048 + 2048): hidden 2048, 16 heads of 128, no GQA
    assert out["lora_params"] == 24 * 16 * 4 * (2048 + 2048) == 6_291_456
    seven = count_lora(MODELS / "Janus-Pro-7B.json", rank=16, targets=QKVO, towers="language_model")
    assert seven["lora_params"] == 30 * 16 * 4 * (4096 + 4096) == 15_728_640
    assert seven["full_params"] == 7_407_773_323


@pytest.fixture(scope="module")
def blip3o_8b():
    from fedumm.comm import count_family

    return count_family(
        "blip3o",
        model_config=MODELS / "Qwen2.5-VL-7B-Instruct.json",
        generator_config=MODELS / "BLIP3o-8B-DiT.json",
        rank=16,
    )


def test_blip3o_8b_towers_and_the_bytes_of_a_client_training_both_tasks(blip3o_8b):
    t = blip3o_8b["towers"]
    # vision: 32 ViT blocks x 16 x [(1280 + 3840) qkv + (1280 + 1280) proj]
    assert t["vision"]["lora_params"] == 32 * 16 * (5120 + 2560) == 3_932_160
    assert t["language"]["lora_params"] == 10_092_544  # as count_lora's q, k, v, o above
    assert t["generation"]["lora_params"] == 9_633_792  # the DiT attention
    # the 64 latent queries of width 3584 are trained whole and travel with the adapter
    assert t["generation"]["whole_modules"] == ["latent_queries"]
    assert t["generation"]["whole_params"] == 64 * 3584 == 229_376
    assert t["generation"]["params"] == 9_633_792 + 229_376
    both = blip3o_8b["tasks"]["both"]
    assert both["towers"] == ["vision", "language", "generation"]
    assert both["params"] == 3_932_160 + 10_092_544 + 9_863_168 == 23_887_872
    assert both["bytes_fp32"] == 4 * 23_887_872 and both["bytes_bf16"] == 2 * 23_887_872
    assert blip3o_8b["tasks"]["understanding"]["params"] == 3_932_160 + 10_092_544
    assert blip3o_8b["tasks"]["generation"]["params"] == 10_092_544 + 9_863_168
    # backbone 8,292,166,656 + caption projection and DiT 1,365,012,128 + latent queries
    assert blip3o_8b["full_params"] == 8_292_166_656 + 1_365_012_128 + 229_376


def test_janus_pro_1b_towers_by_hand():
    from fedumm.comm import count_family

    out = count_family("janus", model_config=MODELS / "Janus-Pro-1B.json", rank=16)
    t = out["towers"]
    # SigLIP-L: 24 layers x [4 x 16 x (1024 + 1024) q, k, v, projection_layer + 16 x (1024 + 4096) fc1],
    # aligner fc1 16 x (1024 + 2048) and hidden_layers.0 16 x (2048 + 2048)
    assert t["vision"]["lora_params"] == 24 * (4 * 16 * 2048 + 16 * 5120) + 16 * 3072 + 16 * 4096
    assert t["language"]["lora_params"] == 6_291_456
    # generation aligner fc1 8 -> 2048 and hidden_layers.0, head proj_out 2048 -> 2048 and
    # vision_head 2048 -> 16384 (one logit per VQ code)
    assert t["generation"]["lora_params"] == 16 * (2056 + 4096 + 4096 + 18432) == 458_880
    assert t["generation"]["lora_modules"] == 4 and t["generation"]["whole_params"] == 0
    assert out["tasks"]["both"]["params"] == sum(row["params"] for row in t.values())
    assert out["full_params"] == 2_076_636_811


def test_family_counts_adapt_the_modules_the_family_gives_peft():
    from types import SimpleNamespace

    from fedumm.comm import build_family_meta, tower_lora_modules
    from fedumm.models import family_info
    from fedumm.models.base import LoraSpec, ModelFamily

    info = family_info("janus")
    root, _ = build_family_meta("janus", MODELS / "Janus-Pro-1B.json")
    spec = LoraSpec(groups=tuple(info.towers))
    target = ModelFamily.lora_target(SimpleNamespace(info=info), spec)
    theirs = {
        n for n, m in root.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(target, n)
    }
    ours = {n for t in info.towers.values() for n, _ in tower_lora_modules(root, t.prefix, t.modules)}
    assert ours == theirs and len(ours) == 122 + 96 + 4


def test_family_pairing_errors_are_one_line_config_errors(tmp_path):
    from fedumm.comm import count_family

    with pytest.raises(ConfigError, match="3584 features but .* is 2048 wide"):
        count_family(
            "blip3o",
            model_config=MODELS / "Qwen2.5-VL-3B-Instruct.json",
            generator_config=MODELS / "BLIP3o-8B-DiT.json",
        )
    with pytest.raises(ConfigError, match="needs its generator's config"):
        count_family("blip3o", model_config=MODELS / "Qwen2.5-VL-3B-Instruct.json")
    with pytest.raises(ConfigError, match="no separate generator"):
        count_family(
            "janus", model_config=MODELS / "Janus-Pro-1B.json", generator_config=MODELS / "BLIP3o-4B-DiT.json"
        )
    with pytest.raises(ConfigError, match="tower 'vision' .* matches no module"):
        count_family("janus", model_config=MODELS / "Qwen2.5-VL-3B-Instruct.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"_class_name": "LuminaNextDiT2DModel",', "not a JSON model config"),
        ('{"_class_name": "NoSuchTransformer"}', "'NoSuchTransformer' is not a diffusers ModelMixin class"),
        (json.dumps(_tiny_dit(hidden_size="wide")), "not a usable diffusers LuminaNextDiT2DModel config"),
        (json.dumps(_tiny_dit(_caption_projection=12)), "_caption_projection must be"),
        (json.dumps(_tiny_dit(_latent_queries=[64])), r"_latent_queries must be \[n_query, width\]"),
    ],
)
def test_a_malformed_dit_config_is_one_clear_error(tmp_path, content, message):
    from typer.testing import CliRunner

    from fedumm.cli import app

    bad = tmp_path / "dit.json"
    bad.write_text(content)
    res = CliRunner().invoke(
        app,
        [
            "comm",
            "--family",
            "blip3o",
            "--model-config",
            str(MODELS / "Qwen2.5-VL-3B-Instruct.json"),
            "--dit-config",
            str(bad),
        ],
    )
    assert res.exit_code == 2, res.output
    assert re.search(message, res.output) and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_prints_every_tower_and_the_per_round_bytes():
    from typer.testing import CliRunner

    from fedumm.cli import app

    args = ["comm", "--family", "janus", "--model-config", str(MODELS / "Janus-Pro-1B.json")]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("language", "6,291,456", "generation", "458,880", "both tasks", "11,976,832"):
        assert text in res.output
    res = CliRunner().invoke(app, [*args, "--json"])
    out = json.loads(res.stdout)
    assert out["tasks"]["both"]["bytes_bf16"] == 2 * 11_976_832
    assert set(out["towers"]) == {"vision", "language", "generation"}
    wrong = CliRunner().invoke(app, [*args, "--towers", "language_model"])
    assert wrong.exit_code == 2 and "--family counts every tower" in wrong.output
    wrong = CliRunner().invoke(
        app, ["comm", "--model-config", str(MODELS / "Janus-Pro-1B.json"), "--dit-config", "x.json"]
    )
    assert wrong.exit_code == 2 and "--dit-config needs --family" in wrong.output
