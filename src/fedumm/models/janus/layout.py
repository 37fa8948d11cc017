"""The released Janus-Pro layout (transformers format) and the checks fedumm makes when it loads one.

The converted checkpoints ``deepseek-community/Janus-Pro-1B`` and ``-7B`` are directories written by
transformers' Janus conversion script (4.52 era): ``config.json`` (``JanusForConditionalGeneration``
with ``text_config`` (Llama), ``vision_config`` (SigLIP-L/16) and ``vq_config`` (VQ-16)),
``generation_config.json`` (``_from_model_config: false``, ``guidance_scale`` 5, ``temperature`` 1,
``pad_token_id`` and ``generation_kwargs.boi_token_id``, which transformers' image generation reads),
the weights (``model.safetensors``, or shards and ``model.safetensors.index.json``), the DeepSeek-LLM
byte-level BPE tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
with ``image_token``, ``boi_token`` and ``eoi_token`` as extra special tokens), the image processor
(``preprocessor_config.json``), the processor (``processor_config.json``: 576 image tokens and the
default system prompt) and the chat template (``chat_template.jinja``: ``<|User|>: ...`` /
``<|Assistant|>:``).

:func:`write_janus_pro_layout` writes such a directory at reduced widths (random weights, a small
byte-level BPE trained on the synthetic world's words with the real special tokens at their real
ids); tests use it because no machine here reaches a model hub. :func:`check_directory` is what
:meth:`JanusFamily.from_pretrained` runs first: every piece a site must provide, one line per problem.
:func:`random_janus_pro` builds the model and processor at a config's full shapes with random weights
straight on a device, for rehearsals at real scale (``JanusFamily.random_weights``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedumm.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "JANUS_PRO_TOKENS",
    "REDUCED",
    "DirectoryInfo",
    "check_directory",
    "check_tokens",
    "checkpoint_keys",
    "random_janus_pro",
    "reduced_config",
    "write_janus_pro_layout",
]

# The special tokens of the converted Janus-Pro tokenizer and their ids. ``image_token_id`` 100581 is
# the config's; bos / eos are the DeepSeek-LLM tokenizer's first added tokens; the pad id 100015 is
# Janus's ``<｜▁pad▁｜>`` (the converted generation_config's pad_token_id); the others as listed in the
# original tokenizer's added tokens.
JANUS_PRO_TOKENS: dict[str, int] = {
    "<｜begin▁of▁sentence｜>": 100000,
    "<｜end▁of▁sentence｜>": 100001,
    "<｜▁pad▁｜>": 100015,
    "<begin_of_image>": 100016,
    "<image_placeholder>": 100581,
    "<patch_placeholder>": 100582,
    "<|ref|>": 100583,
    "<|/ref|>": 100584,
    "<|det|>": 100585,
    "<|/det|>": 100586,
    "<|grounding|>": 100587,
    "<|User|>": 100588,
    "<|Assistant|>": 100589,
    "<end_of_image>": 100593,
}
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
ADDITIONAL = ("<image_placeholder>", "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>")
ADDITIONAL += ("<|grounding|>", "<|User|>", "<|Assistant|>")

# The Janus-Pro conversation format: "<|User|>: " + the user's content (an image is
# <image_placeholder>, on its own line before following text) + "\n\n", "<|Assistant|>: " + the
# answer + end of sentence; a generation prompt ends in "<|Assistant|>:".
CHAT_TEMPLATE = (
    # text with whitespace goes through expressions: the chat-template environment trims blocks
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|User|>: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|Assistant|>: ' }}"
    "{% else %}{{ message['role'] | capitalize ~ ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image_placeholder>' }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<｜end▁of▁sentence｜>' }}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>:' }}{% endif %}"
)
TRANSFORMERS_VERSION = "4.52.0.dev0"  # what the converted checkpoints record


# ---- what a directory holds -------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return data


def checkpoint_keys(path: Path) -> set[str]:
    """Tensor names stored in a HF directory: ``model.safetensors`` or the shards of its index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: no weight_map")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise ConfigError(
                f"{index}: shard {missing[0]} is missing ({len(missing)} of the index's shards)"
            )
        return set(weight_map)
    single = path / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"model.path {str(path)!r}: no model.safetensors (or model.safetensors.index.json)")
    from safetensors import safe_open

    try:
        with safe_open(str(single), "pt") as f:
            return set(f.keys())
    except Exception as exc:  # a truncated or foreign file: safetensors raises its own types
        raise ConfigError(f"{single}: not a safetensors file ({exc})") from None


@dataclass(frozen=True)
class DirectoryInfo:
    """What :func:`check_directory` found: whether the model's output head is its own tensor, the
    begin-of-image id from generation_config.json (None: take the tokenizer's) and any config
    overrides the load needs."""

    separate_lm_head: bool
    boi_token_id: int | None
    config_overrides: dict[str, Any]


def check_directory(path: Path) -> DirectoryInfo:
    """Check a Janus directory before transformers reads it; every problem is one ConfigError line.

    - ``config.json``: ``model_type`` janus with a ``text_config``;
    - tied or separate output head: a stored ``lm_head.weight`` means a separate head whatever the
      config says (transformers' ``JanusConfig`` defaults ``tie_word_embeddings`` to true at the top
      level, and that value wins when the model is built; the converted Janus-Pro checkpoints have a
      separate head); a config that asks for a separate head without the tensor is an error;
    - ``generation_config.json``: present; its begin-of-image id is ``generation_kwargs.boi_token_id``
      (or a top-level ``boi_token_id``), honoured only with ``_from_model_config: false`` (else
      transformers drops it); a file written by hand (``_from_model_config: false``) must have it;
    - the tokenizer and processor files the stock ``JanusProcessor`` reads.
    """
    config_file = path / "config.json"
    config = _read_json(config_file)
    if config.get("model_type") != "janus":
        raise ConfigError(f"{config_file}: model_type is {config.get('model_type')!r}, not 'janus'")
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{config_file}: no text_config (a transformers-format Janus config has one)")

    keys = checkpoint_keys(path)
    separate = "lm_head.weight" in keys
    top = config.get("tie_word_embeddings")  # absent: JanusConfig's default, true
    tied_by_config = True if top is None else bool(top)
    overrides: dict[str, Any] = {}
    if separate and tied_by_config:
        log.warning(
            "%s: tie_word_embeddings is %s at the top level but the weights hold their own "
            'lm_head.weight; loading it untied (set "tie_word_embeddings": false to silence this)',
            config_file,
            "absent (transformers' default, true)" if top is None else "true",
        )
        overrides["tie_word_embeddings"] = False
    elif not separate and not tied_by_config:
        raise ConfigError(
            f"{config_file}: tie_word_embeddings is false but the weights hold no lm_head.weight"
            " (a tied model stores only model.language_model.embed_tokens.weight: set it to true)"
        )
    elif not separate and text.get("tie_word_embeddings") is False:
        log.info("%s: text_config says untied, but the model is tied (the top level wins)", config_file)

    gen_file = path / "generation_config.json"
    if not gen_file.is_file():
        raise ConfigError(
            f"model.path {str(path)!r}: generation_config.json missing (image generation reads"
            " generation_kwargs.boi_token_id from it; the converted Janus-Pro checkpoints ship one)"
        )
    gen = _read_json(gen_file)
    kwargs = gen.get("generation_kwargs") or {}
    boi = kwargs.get("boi_token_id", gen.get("boi_token_id")) if isinstance(kwargs, dict) else None
    from_model = bool(gen.get("_from_model_config", False))
    if boi is not None and from_model:
        raise ConfigError(
            f"{gen_file}: _from_model_config is true, so transformers ignores its boi_token_id:"
            ' set "_from_model_config": false'
        )
    if boi is None and not from_model:
        raise ConfigError(
            f"{gen_file}: no generation_kwargs.boi_token_id (the begin-of-image token id image"
            " generation starts from)"
        )
    if boi is not None and (not isinstance(boi, int) or isinstance(boi, bool) or boi < 0):
        raise ConfigError(f"{gen_file}: boi_token_id must be a token id, got {boi!r}")

    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"model.path {str(path)!r}: tokenizer.json missing")
    if not (path / "tokenizer_config.json").is_file():
        raise ConfigError(f"model.path {str(path)!r}: tokenizer_config.json missing")
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise ConfigError(
            f"model.path {str(path)!r}: no preprocessor_config.json or processor_config.json"
            " (the image processor's settings)"
        )
    return DirectoryInfo(separate_lm_head=separate, boi_token_id=boi, config_overrides=overrides)


def check_tokens(path: Path, tokenizer: Any, vocab_size: int, boi_token_id: int | None) -> int:
    """The begin-of-image id, checked against the tokenizer's special tokens; one line per problem."""
    config_file = path / "tokenizer_config.json"
    ids = {}
    for role in ("image_token", "boi_token", "eoi_token"):
        token = getattr(tokenizer, role, None)
        if not token:
            raise ConfigError(
                f"{config_file}: the tokenizer has no {role} (JanusProcessor needs image_token,"
                " boi_token and eoi_token among its extra special tokens)"
            )
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id or tid >= vocab_size:
            raise ConfigError(f"{config_file}: {role} {token!r} is not in the vocabulary (id {tid})")
        ids[role] = int(tid)
    if boi_token_id is not None and boi_token_id != ids["boi_token"]:
        raise ConfigError(
            f"{path / 'generation_config.json'}: boi_token_id {boi_token_id} is not the tokenizer's"
            f" {tokenizer.boi_token!r} ({ids['boi_token']})"
        )
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, role, None) is None:
            raise ConfigError(f"{config_file}: the tokenizer has no {role.removesuffix('_id')}")
    return ids["boi_token"]


# ---- writing a reduced directory ---------------------------------------------------------------------
REDUCED = {
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
    "vision": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64},
    "vq": {"base_channels": 32, "num_res_blocks": 1, "latent_channels": 32},
}
"""Default reductions of the 1B config: widths and depths only (vocabulary, codebook, patch size,
VQ levels, MLP ratios, aligner depths and token ids stay the released ones)."""


def reduced_config(
    full: Mapping[str, Any],
    *,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    vq: Mapping[str, Any] | None = None,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """The converted checkpoint's ``config.json`` for ``full`` (e.g. configs/models/Janus-Pro-1B.json),
    with the given text / vision / VQ fields replaced; the aligners' widths follow the text width and
    the image-token count follows the image and patch size, as in the released configs."""
    text_cfg = dict(full["text_config"]) | dict(REDUCED["text"] if text is None else text)
    if "num_key_value_heads" not in (text or {}):  # the released models use full multi-head attention
        text_cfg["num_key_value_heads"] = text_cfg["num_attention_heads"]
    text_cfg |= {
        "bos_token_id": JANUS_PRO_TOKENS[BOS],
        "eos_token_id": JANUS_PRO_TOKENS[EOS],
        "pad_token_id": JANUS_PRO_TOKENS[PAD],
        "torch_dtype": dtype,
        "tie_word_embeddings": False,
    }
    vision_cfg = dict(full["vision_config"]) | dict(REDUCED["vision"] if vision is None else vision)
    side = vision_cfg["image_size"] // vision_cfg["patch_size"]
    vision_cfg["num_image_tokens"] = side * side
    vision_cfg["projection_dim"] = text_cfg["hidden_size"]
    vq_cfg = dict(full["vq_config"]) | dict(REDUCED["vq"] if vq is None else vq)
    vq_cfg["num_patches"] = side
    vq_cfg["projection_dim"] = text_cfg["hidden_size"]
    vq_cfg["image_token_embed_dim"] = text_cfg["hidden_size"]
    return {
        "architectures": ["JanusForConditionalGeneration"],
        "image_token_id": JANUS_PRO_TOKENS[IMAGE],
        "model_type": "janus",
        "text_config": text_cfg,
        "tie_word_embeddings": False,  # the converted checkpoints store lm_head.weight
        "torch_dtype": dtype,
        "transformers_version": TRANSFORMERS_VERSION,
        "vision_config": vision_cfg,
        "vq_config": vq_cfg,
    }


def _byte_level_tokenizer(words: Iterable[str], vocab_size: int):
    """A byte-level BPE (DeepSeek-LLM's kind) trained on ``words``, the real special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(words), trainer=trainer)
    spec = json.loads(core.to_str())
    vocab = spec["model"]["vocab"]
    # the real ids: the base vocabulary fills [0, 100000) in the released tokenizer; here the specials
    # sit at their own ids beyond a small trained vocabulary
    if max(vocab.values()) >= min(JANUS_PRO_TOKENS.values()):
        raise ValueError("the trained vocabulary reaches the special-token ids")
    vocab.update(JANUS_PRO_TOKENS)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the special-token ids")
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in sorted(JANUS_PRO_TOKENS, key=JANUS_PRO_TOKENS.get)
        ]
    )
    bos = JANUS_PRO_TOKENS[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)]
    )
    return tok


def _corpus(words: Iterable[str] | None) -> list[str]:
    """What the stand-in BPE is trained on: ``words`` (default: the synthetic world's) and the chat
    format's words."""
    if words is None:
        from fedumm.data.synth import VOCABULARY

        words = list(VOCABULARY)
    words = list(words)
    corpus = [" ".join(words), *(f" {w}" for w in words), "You are a helpful language and vision assistant."]
    corpus += ["You are able to understand the visual content that the user provides,"]
    corpus += ["and assist the user with a variety of tasks using natural language.", "User Assistant: \n\n"]
    return corpus


def _added_tokens_decoder() -> dict[str, dict[str, Any]]:
    return {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in sorted(JANUS_PRO_TOKENS.items(), key=lambda kv: kv[1])
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_janus_pro_layout(
    out_dir: str | Path,
    full_config: Mapping[str, Any],
    *,
    words: Iterable[str] | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    shards: int = 1,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    vq: Mapping[str, Any] | None = None,
) -> Path:
    """Write a randomly initialised Janus-Pro directory in the released layout at reduced widths.

    ``full_config`` is the converted checkpoint's config (``configs/models/Janus-Pro-1B.json``);
    ``text`` / ``vision`` / ``vq`` replace fields of its sub-configs (default :data:`REDUCED`).
    ``words`` train the byte-level BPE (default: the synthetic world's vocabulary and the chat
    format's words). ``shards`` > 1 writes ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json``, as the 7B checkpoint ships; 1 writes ``model.safetensors``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import JanusConfig, JanusForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = reduced_config(full_config, text=text, vision=vision, vq=vq, dtype=dtype)
    tok = _byte_level_tokenizer(_corpus(words), config["text_config"]["vocab_size"])
    tok.save(str(out / "tokenizer.json"))

    # weights: the model transformers builds from this config, at its stored dtype
    built = JanusConfig.from_dict({k: v for k, v in config.items() if k != "transformers_version"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(built)
    if model.lm_head.weight is model.model.language_model.embed_tokens.weight:
        raise RuntimeError("the reduced Janus-Pro model came out tied; its config says otherwise")
    torch_dtype = getattr(torch, dtype)
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(out / fname), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, fname)
        total = sum(v.numel() * v.element_size() for v in state.values())
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )

    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {
            "_from_model_config": False,
            "bos_token_id": JANUS_PRO_TOKENS[BOS],
            "eos_token_id": JANUS_PRO_TOKENS[EOS],
            "generation_kwargs": {"boi_token_id": JANUS_PRO_TOKENS[BOI]},
            "guidance_scale": 5,
            "pad_token_id": JANUS_PRO_TOKENS[PAD],
            "temperature": 1,
            "transformers_version": TRANSFORMERS_VERSION,
        },
    )
    specials = {"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI}
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": _added_tokens_decoder(),
            "additional_special_tokens": list(ADDITIONAL),
            "bos_token": BOS,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS,
            "extra_special_tokens": specials,
            "legacy": True,
            "model_max_length": config["text_config"]["max_position_embeddings"],
            "pad_token": PAD,
            "processor_class": "JanusProcessor",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": None,
            "use_default_system_prompt": False,
        },
    )
    _write_json(
        out / "special_tokens_map.json",
        {"additional_special_tokens": list(ADDITIONAL), "bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
    )
    size = config["vision_config"]["image_size"]
    _write_json(
        out / "preprocessor_config.json",
        {
            "background_color": [127, 127, 127],
            "do_convert_rgb": None,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "JanusImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "min_size": 14,
            "processor_class": "JanusProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": size, "width": size},
        },
    )
    _write_json(
        out / "processor_config.json",
        {
            "num_image_tokens": config["vision_config"]["num_image_tokens"],
            "processor_class": "JanusProcessor",
            "use_default_system_prompt": True,
        },
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out


# ---- random weights at the released shapes -------------------------------------------------------------
def random_janus_pro(full_config: Mapping[str, Any], *, device: Any, dtype: str, seed: int = 0):
    """(model, processor) at the shapes of ``full_config`` (a converted checkpoint's ``config.json``, e.g.
    configs/models/Janus-Pro-7B.json), random weights created on ``device`` in ``dtype`` (``bf16``,
    ``fp32``): nothing is read or written but the config.

    The processor is the released one's (image size and image-token count from the config, mean and std
    0.5, no default system prompt, the chat template); its tokenizer has the real special tokens at their
    real ids with a small byte-level BPE over the synthetic world's words in place of DeepSeek-LLM's.
    """
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessorPil,
        JanusProcessor,
        PreTrainedTokenizerFast,
    )

    from fedumm.models.base import DTYPES, built_on

    try:
        config = reduced_config(full_config, text={}, vision={}, vq={}, dtype=DTYPES.get(dtype, dtype))
        built = JanusConfig.from_dict({k: v for k, v in config.items() if k != "transformers_version"})
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"not a Janus-Pro config.json ({type(exc).__name__}: {exc})") from None
    with built_on(device, dtype, seed=seed):
        model = JanusForConditionalGeneration(built)
    if model.lm_head.weight is model.model.language_model.embed_tokens.weight:
        raise ConfigError("the Janus-Pro model came out with lm_head tied; its config says otherwise")
    # transformers' image generation reads the begin-of-image id from here (see JanusFamily.from_pretrained)
    model.generation_config.generation_kwargs = {"boi_token_id": JANUS_PRO_TOKENS[BOI]}
    text = config["text_config"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(_corpus(None), text["vocab_size"]),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=text["max_position_embeddings"],
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )
    vision = config["vision_config"]
    size = vision["image_size"]
    image_processor = JanusImageProcessorPil(
        size={"height": size, "width": size},
        min_size=14,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        background_color=[127, 127, 127],
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=vision["num_image_tokens"],
        use_default_system_prompt=False,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
