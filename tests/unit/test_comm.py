"""Paper-scale communication counts: meta-device models from configs, checked by hand and by peft."""

import json
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
