"""A Janus-Pro directory in the released (transformers-format) layout, at reduced widths, loads strictly
through the Janus family and federates through ``model.path`` with the Janus-Pro chat prompt; image
generation finds its begin-of-image id in generation_config.json; every missing piece is one line.

The directory is written by :func:`fedumm.models.janus.layout.write_janus_pro_layout` from
configs/models/Janus-Pro-1B.json (the converted 1B checkpoint's config), only widths and depths
reduced: the real vocabulary (102,400), token ids, patch size, codebook (16,384 x 8) and VQ levels.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedumm.errors import ConfigError
from fedumm.models import family_class
from fedumm.models.base import FamilyOptions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FULL_CONFIG = json.loads((ROOT / "configs" / "models" / "Janus-Pro-1B.json").read_text(encoding="utf-8"))
PRO_PROMPT = "<|User|>: <image_placeholder>\n{question}\n\n<|Assistant|>:"
RELEASED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def pro_dir(tmp_path_factory) -> Path:
    from fedumm.models.janus.layout import write_janus_pro_layout

    t0 = time.perf_counter()
    # float32 weights: the released ones are bfloat16 (see the sharded test), which a CPU without
    # bfloat16 matrix units trains many times slower
    out = write_janus_pro_layout(
        tmp_path_factory.mktemp("Janus-Pro-1B-reduced"), FULL_CONFIG, seed=0, dtype="float32"
    )
    print(f"wrote the reduced Janus-Pro-1B directory in {time.perf_counter() - t0:.2f} s")
    return out


def _load(path: Path, **kw):
    return family_class("janus").from_pretrained(
        path, options=FamilyOptions(prompt_template=PRO_PROMPT, **kw)
    )


def _variant(src: Path, dst: Path) -> Path:
    """A copy of ``src`` (weights hard-linked: replace them with unlink + write, never in place)."""
    shutil.copytree(
        src,
        dst,
        copy_function=lambda a, b: os.link(a, b) if a.endswith(".safetensors") else shutil.copy2(a, b),
    )
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_the_directory_is_the_released_layout(pro_dir):
    from fedumm.models.janus.layout import JANUS_PRO_TOKENS

    assert {p.name for p in pro_dir.iterdir()} == RELEASED_FILES
    config = json.loads((pro_dir / "config.json").read_text())
    assert config["model_type"] == "janus" and config["architectures"] == ["JanusForConditionalGeneration"]
    assert config["image_token_id"] == FULL_CONFIG["image_token_id"] == 100581
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    text, vision, vq = config["text_config"], config["vision_config"], config["vq_config"]
    # the real fields and values, except the reduced widths and depths
    for key in (
        "vocab_size",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "model_type",
    ):
        assert text[key] == FULL_CONFIG["text_config"][key], key
    for key in ("model_type", "patch_size", "mlp_ratio", "depth"):
        assert vision[key] == FULL_CONFIG["vision_config"][key], key
    for key in ("model_type", "embed_dim", "num_embeddings", "num_hidden_layers"):
        assert vq[key] == FULL_CONFIG["vq_config"][key], key
    assert set(FULL_CONFIG["text_config"]) <= set(text) and set(FULL_CONFIG["vq_config"]) <= set(vq)
    assert text["hidden_size"] < FULL_CONFIG["text_config"]["hidden_size"]
    assert vision["num_image_tokens"] == (vision["image_size"] // vision["patch_size"]) ** 2 == 16
    assert (
        vq["num_patches"] == 4 and vq["projection_dim"] == vq["image_token_embed_dim"] == text["hidden_size"]
    )
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (100000, 100001, 100015)
    gen = json.loads((pro_dir / "generation_config.json").read_text())
    assert gen["_from_model_config"] is False and gen["generation_kwargs"] == {"boi_token_id": 100016}
    assert (gen["guidance_scale"], gen["temperature"], gen["pad_token_id"]) == (5, 1, 100015)
    tok = json.loads((pro_dir / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["pre_tokenizer"]["type"] == "ByteLevel"
    assert {t["content"]: t["id"] for t in tok["added_tokens"]} == JANUS_PRO_TOKENS
    tok_config = json.loads((pro_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert tok_config["extra_special_tokens"] == {
        "image_token": "<image_placeholder>",
        "boi_token": "<begin_of_image>",
        "eoi_token": "<end_of_image>",
    }
    processor = json.loads((pro_dir / "processor_config.json").read_text())
    assert processor == {
        "num_image_tokens": 16,
        "processor_class": "JanusProcessor",
        "use_default_system_prompt": True,
    }
    image = json.loads((pro_dir / "preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "JanusImageProcessor" and image["size"] == {
        "height": 64,
        "width": 64,
    }


def test_it_loads_strictly_with_a_separate_lm_head(pro_dir):
    t0 = time.perf_counter()
    fam = _load(pro_dir)
    print(f"loaded through the family in {time.perf_counter() - t0:.2f} s")
    model = fam.base
    stored = load_file(str(pro_dir / "model.safetensors"))
    params = dict(model.state_dict())
    assert sorted(stored) == sorted(params)  # every tensor accounted for, both ways
    assert all(torch.equal(params[k], stored[k]) for k in stored)
    assert model.dtype == torch.float32  # the stored dtype
    head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
    assert head is not embed and head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)
    assert model.config.tie_word_embeddings is False and model.config.text_config.tie_word_embeddings is False
    # the real special tokens at the real ids, through the stock processor
    tok = fam.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (100000, 100001, 100015)
    assert tok.convert_tokens_to_ids([tok.image_token, tok.boi_token, tok.eoi_token]) == [
        100581,
        100016,
        100593,
    ]
    assert tok.convert_tokens_to_ids(["<|User|>", "<|Assistant|>"]) == [100588, 100589]
    assert model.generation_config.generation_kwargs["boi_token_id"] == 100016
    # the chat template renders the prompt the run uses; the processor adds the default system prompt
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}
    ]
    rendered = fam.processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == PRO_PROMPT.format(question="what colour?")
    assert fam.processor.use_default_system_prompt is True and fam.processor.num_image_tokens == 16
    # the backbone is what the run federates LoRA on: every tower has parameters
    assert all(n > 0 for n in fam.parameter_counts().values())


def test_a_federated_round_runs_on_it_and_peft_loads_the_adapter(pro_dir, tiny_world, tmp_path):
    from peft import PeftModel

    from fedumm.config import load_config
    from fedumm.experiment import run_experiment
    from fedumm.io import read_safetensors
    from fedumm.models.lora_state import get_adapter_state

    tree = {
        "name": "janus-pro-layout",
        "data": {"path": str(tiny_world), "max_val_questions": 8, "max_test_questions": 8},
        "model": {
            "family": "janus",
            "path": str(pro_dir),
            "prompt_template": PRO_PROMPT,
            "max_answer_tokens": 2,
        },
        "lora": {"rank": 2, "alpha": 4, "groups": ["vision", "language", "generation"]},
        "train": {"batch_size": 8, "eval_batch_size": 16},
        "federation": {"clients": 2, "rounds": 1, "tasks": "both", "min_partition_size": 4},
        "baselines": {"zero_shot": False, "centralized": False},
    }
    t0 = time.perf_counter()
    summary = run_experiment(load_config(None, tree=tree), tmp_path / "run")
    print(f"one federated round in {time.perf_counter() - t0:.2f} s")
    assert summary.status == "finished" and summary.family == "janus"
    assert summary.federated.generation_loss is not None and summary.federated.vqa_accuracy is not None
    assert summary.rounds_completed == 1
    base = _load(pro_dir).base
    loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "global_adapter")
    got = get_adapter_state(loaded)
    want = read_safetensors(tmp_path / "run" / "checkpoint" / "round-0001.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    groups = {family_class("janus").info.group_of(k) for k in want}
    assert groups == {"vision", "language", "generation"}


def test_image_generation_finds_boi_in_generation_config(pro_dir):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    fam = _load(pro_dir)
    images = fam.generate(["a red circle"], images_per_prompt=1, seed=0)
    assert len(images) == 1 and images[0].size == (64, 64)
    # transformers' own image generation, given no generation config: everything it needs (the
    # begin-of-image id included) comes from generation_config.json
    model = JanusForConditionalGeneration.from_pretrained(pro_dir, local_files_only=True)
    processor = JanusProcessor.from_pretrained(pro_dir, local_files_only=True)
    assert model.generation_config.generation_kwargs == {"boi_token_id": 100016}
    enc = processor(text=["a red circle"], generation_mode="image", return_tensors="pt")
    assert int(enc["input_ids"][0, -1]) == 100016
    tokens = model.generate(**enc, generation_mode="image", do_sample=False)
    assert tokens.shape == (1, 16)


def test_sharded_weights_load_as_the_7b_ships(tmp_path):
    from fedumm.models.janus.layout import write_janus_pro_layout

    out = write_janus_pro_layout(tmp_path / "sharded", FULL_CONFIG, seed=1, shards=3)  # bfloat16, as released
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)} <= names
    fam = _load(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert fam.base.dtype == torch.bfloat16  # loaded at the stored dtype
    assert fam.base.lm_head.weight is not fam.base.get_input_embeddings().weight
    (out / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json: shard model-00002-of-00003"):
        _load(out)


def test_a_config_without_the_top_level_tie_flag_still_loads_the_separate_head(pro_dir, tmp_path, caplog):
    """JanusConfig defaults tie_word_embeddings to true at the top level, and that value wins when
    the model is built: without the flag transformers alone would tie the head to the embeddings."""
    d = _variant(pro_dir, tmp_path / "no-top-flag")
    _edit_json(d / "config.json", lambda c: c.pop("tie_word_embeddings"))
    with caplog.at_level(logging.WARNING, logger="fedumm.models.janus.layout"):
        fam = _load(d)
    assert "loading it untied" in caplog.text
    stored = load_file(str(d / "model.safetensors"))
    assert torch.equal(fam.base.lm_head.weight, stored["lm_head.weight"])
    assert fam.base.lm_head.weight is not fam.base.get_input_embeddings().weight


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: (d / "generation_config.json").unlink(),
            r"generation_config\.json missing \(image generation",
        ),
        (
            lambda d: _edit_json(d / "generation_config.json", lambda g: g.pop("generation_kwargs")),
            r"generation_config\.json: no generation_kwargs\.boi_token_id",
        ),
        (
            lambda d: _edit_json(d / "generation_config.json", lambda g: g.update(_from_model_config=True)),
            r'_from_model_config is true, so transformers ignores its boi_token_id: set "_from_model_config"',
        ),
        (
            lambda d: _edit_json(
                d / "generation_config.json", lambda g: g.update(generation_kwargs={"boi_token_id": 100593})
            ),
            r"boi_token_id 100593 is not the tokenizer's '<begin_of_image>' \(100016\)",
        ),
        (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json missing"),
        (
            lambda d: [(d / f).unlink() for f in ("preprocessor_config.json", "processor_config.json")],
            r"no preprocessor_config\.json or processor_config\.json",
        ),
        (
            lambda d: _edit_json(d / "tokenizer_config.json", lambda t: t.pop("extra_special_tokens")),
            r"tokenizer_config\.json: the tokenizer has no image_token",
        ),
    ],
    ids=[
        "no-generation-config",
        "no-boi",
        "from-model-config",
        "wrong-boi",
        "no-tokenizer",
        "no-processor",
        "no-image-tokens",
    ],
)
def test_each_missing_piece_is_one_config_error_line(pro_dir, tmp_path, edit, message):
    d = _variant(pro_dir, tmp_path / "broken")
    edit(d)
    with pytest.raises(ConfigError, match=message) as err:
        _load(d)
    assert "\n" not in str(err.value)


def _rewrite_weights(d: Path, fn) -> None:
    path = d / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    path.unlink()  # hard-linked to the shared directory: never write in place
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.pop("lm_head.weight"),
            r"tie_word_embeddings is false but the weights hold no lm_head\.weight",
        ),
        (
            lambda s: s.pop("model.vision_model.post_layernorm.weight"),
            r"do not match config\.json: 1 missing tensor\(s\), e\.g\. 'model\.vision_model\.post_layernorm",
        ),
        (
            lambda s: s.update({"model.extra.weight": torch.zeros(2)}),
            r"the weights do not match config\.json: 1 unexpected tensor\(s\), e\.g\. 'model\.extra\.weight'",
        ),
    ],
    ids=["untied-without-head", "missing-tensor", "unexpected-tensor"],
)
def test_weights_that_do_not_match_are_one_config_error_line(pro_dir, tmp_path, edit, message):
    d = _variant(pro_dir, tmp_path / "weights")
    _rewrite_weights(d, edit)
    with pytest.raises(ConfigError, match=message) as err:
        _load(d)
    assert "\n" not in str(err.value)


def test_the_builtin_tiny_janus_is_tied_and_says_so():
    """The shipped tiny Janus stores only the embedding matrix: its lm_head is that matrix. Its
    config.json now says so in text_config too; the weights load exactly as before."""
    from transformers import JanusConfig, JanusForConditionalGeneration

    cls = family_class("janus")
    path = cls.builtin_path()
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["text_config"]["tie_word_embeddings"] is True
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored_keys = set(f.keys())
    assert "lm_head.weight" not in stored_keys
    fam = cls.from_pretrained(None, options=FamilyOptions())
    model = fam.base
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    stored = load_file(str(path / "model.safetensors"))
    params = dict(model.state_dict())
    assert set(params) - set(stored) == {"lm_head.weight"} and set(stored) <= set(params)
    assert all(torch.equal(params[k], stored[k]) for k in stored)
    # the config as it was before (text_config said untied) builds and loads the very same model
    old = json.loads((path / "config.json").read_text())
    old["text_config"]["tie_word_embeddings"] = False
    before = JanusForConditionalGeneration.from_pretrained(
        path, config=JanusConfig.from_dict(old), local_files_only=True
    )
    assert before.lm_head.weight is before.model.language_model.embed_tokens.weight
    old_params = dict(before.state_dict())
    assert sorted(old_params) == sorted(params) and all(torch.equal(old_params[k], params[k]) for k in params)
    # the tiny builder (what `fedumm pretrain` starts from) builds the same weights either way
    from fedumm.data.synth import VOCABULARY
    from fedumm.models.janus.tiny import build_tiny_janus, build_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        now = build_tiny_janus(build_tokenizer(VOCABULARY))
    cfg = now.config.to_dict()
    cfg["text_config"]["tie_word_embeddings"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        then = JanusForConditionalGeneration(JanusConfig.from_dict(cfg))
    a, b = now.state_dict(), then.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert now.lm_head.weight is now.model.language_model.embed_tokens.weight
