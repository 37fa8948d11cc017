"""BLIP3o-Model-4B/8B as released: loading the directory in place, and a reduced checkpoint written in
exactly that layout for tests.

The released directory (BLIP3o's ``blip3oQwenForCausalLM`` saved with transformers 4.51):

- ``config.json``: a *flat* Qwen2.5-VL config (text fields at the top level, ``vision_config``
  nested, ``rope_scaling`` with the multimodal ``mrope_section``) with ``model_type: blip3o_qwen``
  and BLIP3o's extra fields (``gen_vision_tower: eva-clip-E-14-plus``, ``gen_pooling:
  early_pool2d_4``, ``n_query: 64``, ...). ``vocab_size`` is 151,668: BLIP3o adds ``[IMG]``,
  ``[/IMG]`` and ``<image>`` (ids 151665-151667) to Qwen's tokenizer and resizes the embeddings to it.
- sharded safetensors (``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``)
  with the legacy Qwen2.5-VL keys ``visual.*``, ``model.embed_tokens``, ``model.layers.N.*``,
  ``model.norm``, ``lm_head`` (absent when the 3B backbone ties it), and BLIP3o's own:
  ``model.latent_queries`` (1 x n_query x hidden), ``model.dit.model.*`` (its copy of Lumina-Next,
  whose first module is the caption projection), ``model.gen_vision_tower.*`` (EVA-CLIP-E/14-plus).
- the tokenizer files, and ``diffusion-decoder/`` (a diffusers folder: an SDXL-size UNet and a VAE
  driven by ``pipeline_llava_gen.py``, which ships there and is no library's code).

Loading (:func:`load_released`): the backbone is transformers' ``Qwen2_5_VLForConditionalGeneration``
built from the flat config (transformers reads the flat layout itself), and its keys are renamed by
transformers' own checkpoint conversion mapping (``visual.*`` -> ``model.visual.*``, ``model.*`` ->
``model.language_model.*``); the DiT is diffusers' ``PixArtAlphaTextProjection`` +
``LuminaNextDiT2DModel`` (the same network as BLIP3o's copy), its shape read from the tensors; every
tensor is accounted for (a missing or unexpected one is a one-line ConfigError). Two things no library
ships are the site's to provide (``fedumm_site.json`` beside ``config.json``, or
``FamilyOptions.extra``): the EVA-CLIP target encoder (generation *training* only) and the decoder from
features to pixels. Without them understanding and feature sampling run; what needs them fails with
one line naming the piece and docs/MODELS.md.

:func:`random_released` builds the same model at the shapes of the shipped configs with random weights
straight on a device, for rehearsals at real scale (``Blip3oFamily.random_weights``).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedumm.errors import ConfigError
from fedumm.models.blip3o.model import Blip3oDiT
from fedumm.models.blip3o.tiny import Blip3oConfig

__all__ = [
    "DECODER_DIR",
    "GENERATION_TEMPLATE",
    "IMAGE_PAD_ID",
    "MODEL_TYPE",
    "QUERY_ID",
    "QUERY_START_ID",
    "SITE_FILE",
    "VQA_TEMPLATE",
    "ReleasedBlip3o",
    "ReleasedConfig",
    "is_released_layout",
    "load_released",
    "random_released",
    "read_prefixed",
    "write_released_layout",
]

MODEL_TYPE = "blip3o_qwen"
QUERY_START_ID = 151665  # "[IMG]": starts the query span
QUERY_END_ID = 151666  # "[/IMG]"
QUERY_ID = 151667  # "<image>": the n_query slots whose embeddings are the latent queries
IMAGE_PAD_ID = 151655  # "<|image_pad|>": Qwen2.5-VL's understanding image token
SITE_FILE = "fedumm_site.json"
DECODER_DIR = "diffusion-decoder"
INDEX_NAME = "model.safetensors.index.json"
DOCS = "docs/MODELS.md"
SAMPLING_STEPS = 30  # BLIP3o's Euler steps

# BLIP3o's prompts (its ``qwen`` conversation template, ChatML; the generation request of its training
# data and inference script; the VQA v2 instruction of its understanding evaluation)
_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
VQA_TEMPLATE = _CHAT.format(
    "<|vision_start|><|image_pad|><|vision_end|>{question}\n"
    "Answer the question using a single word or phrase."
)
GENERATION_TEMPLATE = _CHAT.format("Please generate image based on the following caption: {text}")

# config.json fields that are BLIP3o's (training arguments saved into the config), not Qwen2.5-VL's
BLIP3O_FIELDS = (
    "gen_vision_tower",
    "gen_pooling",
    "n_query",
    "n_und_query",
    "gen_hidden_size",
    "gen_projector_type",
    "mm_projector_type",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_patch_merge_type",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_projector_lr",
    "use_mm_proj",
    "vision_tower_pretrained",
    "image_aspect_ratio",
    "tokenizer_padding_side",
    "tokenizer_model_max_length",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
)
# BLIP3o's DiT constants (``NextDiTCrossAttnConfig`` defaults; the released config does not list them):
# the 8 x 8 grid (EVA-CLIP at 448 px, patch 14, pooled 4 x 4) at patch 1; the rest is read from shapes
DIT_SAMPLE_SIZE, DIT_PATCH_SIZE, DIT_MULTIPLE_OF, DIT_NORM_EPS = 8, 1, 256, 1e-5
# a diffusers parameter BLIP3o's copy of Lumina-Next does not have (unused by the forward): zeroed
DIFFUSERS_ONLY = ("dit.model.pad_token",)

TARGET_ENCODER_MISSING = (
    "BLIP3o generation training needs its target encoder EVA-CLIP-E/14-plus (model.gen_vision_tower.*), "
    "which no library ships: the site provides it as 'target_encoder' in {site}; see " + DOCS
)
DECODER_MISSING = (
    "BLIP3o pixel decoding needs the SDXL diffusion decoder of {dir}, whose pipeline code no library ships: "
    "the site provides it as 'decoder' in {site} (generate_features() samples the features without it); see "
    + DOCS
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None


def is_released_layout(path: str | Path) -> bool:
    """Whether ``path/config.json`` is a released BLIP3o-Model checkpoint (``model_type: blip3o_qwen``)."""
    try:
        obj = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get("model_type") == MODEL_TYPE


# ---- the configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ReleasedConfig(Blip3oConfig):
    """The family's configuration of a released checkpoint: ``backbone`` is the Qwen2.5-VL config
    (nested, as transformers builds it), ``dit`` the Lumina-Next arguments read from the tensors,
    ``blip3o`` BLIP3o's own config fields; features are the DiT's (no standardisation: BLIP3o diffuses
    the pooled EVA-CLIP features as they are)."""

    target_encoder: dict = field(default_factory=dict)
    decoder: dict = field(default_factory=dict)
    blip3o: dict = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.dit["in_channels"])

    @property
    def grid(self) -> int:
        return int(self.dit["sample_size"]) // int(self.dit["patch_size"])


def _backbone_config(flat: Mapping[str, Any]):
    """transformers' Qwen2.5-VL config from the flat 4.51 one, BLIP3o's fields removed."""
    from transformers import Qwen2_5_VLConfig

    qwen = {
        k: v for k, v in flat.items() if k not in BLIP3O_FIELDS and k not in ("model_type", "architectures")
    }
    return Qwen2_5_VLConfig(**qwen)


def _dit_config(shapes: Mapping[str, tuple[int, ...]], lm_hidden: int, where: Path) -> dict:
    """``LuminaNextDiT2DModel`` arguments from the shapes of ``model.dit.model.*`` (BLIP3o builds its
    DiT from code defaults; this reads the sizes so that a reduced checkpoint loads the same way)."""
    p = "model.dit.model."
    need = (
        f"{p}patch_embedder.proj.weight",
        f"{p}caption_projection.linear_1.weight",
        f"{p}layers.0.gate",
        f"{p}layers.0.attn1.to_k.weight",
    )
    lost = [k for k in need if k not in shapes]
    if lost:
        raise ConfigError(f"{where}: no BLIP3o DiT in the checkpoint (missing {lost[:3]})")
    hidden, patch_in = shapes[need[0]]
    heads = shapes[need[2]][0]
    head_dim = hidden // heads
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(rf"{re.escape(p)}layers\.(\d+)\.", k)))
    proj_out, proj_in = shapes[need[1]]
    if proj_in != lm_hidden or proj_out != hidden:
        raise ConfigError(
            f"{where}: the DiT's caption projection maps {proj_in} -> {proj_out}, expected the language "
            f"model's width {lm_hidden} -> the DiT's {hidden}"
        )
    return {
        "sample_size": DIT_SAMPLE_SIZE,
        "patch_size": DIT_PATCH_SIZE,
        "in_channels": patch_in // (DIT_PATCH_SIZE * DIT_PATCH_SIZE),
        "hidden_size": hidden,
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_kv_heads": shapes[need[3]][0] // head_dim,
        "multiple_of": DIT_MULTIPLE_OF,
        "ffn_dim_multiplier": None,
        "norm_eps": DIT_NORM_EPS,
        "learn_sigma": False,
        "qk_norm": f"{p}layers.0.attn1.norm_q.weight" in shapes,
        "cross_attention_dim": hidden,  # behind the caption projection: BLIP3o's blocks take the DiT width
    }


# ---- the model --------------------------------------------------------------------------------------------
class ReleasedBlip3o(nn.Module):
    """A released BLIP3o-Model with the family's module tree: ``backbone``, ``latent_queries``, ``dit``,
    and the site's ``target_encoder`` and ``decoder`` (None until a site provides them)."""

    def __init__(self, config: ReleasedConfig, backbone_config, *, path: Path) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        super().__init__()
        self.config = config
        self.path = path
        self.backbone = Qwen2_5_VLForConditionalGeneration(backbone_config)
        hidden = int(config.backbone["text_config"]["hidden_size"])
        self.latent_queries = nn.Embedding(config.n_query, hidden)
        self.dit = Blip3oDiT(config)
        self.register_module("target_encoder", None)
        self.register_module("decoder", None)
        self.load_report: dict[str, Any] = {}

    def _site(self) -> str:
        return str(self.path / SITE_FILE)

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Target features (B, C, h, w) of images in [-1, 1], by the site's target encoder."""
        if self.target_encoder is None:
            raise ConfigError(TARGET_ENCODER_MISSING.format(site=self._site()))
        out = self.target_encoder(pixel_values)
        want = (pixel_values.shape[0], self.config.feature_dim, self.config.grid, self.config.grid)
        if tuple(out.shape) != want:
            raise ConfigError(
                f"the site's BLIP3o target encoder returned shape {tuple(out.shape)}; the DiT needs {want}"
            )
        return out

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) from features (B, C, h, w), by the site's decoder."""
        if self.decoder is None:
            raise ConfigError(DECODER_MISSING.format(dir=self.path / DECODER_DIR, site=self._site()))
        return self.decoder(features)


# ---- reading the shards -----------------------------------------------------------------------------------
def _shards(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        obj = _read_json(index)
        weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: no weight_map")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [path / "model.safetensors"]
    lost = [f.name for f in files if not f.is_file()]
    if lost:
        raise ConfigError(f"{path}: weight files missing: {lost[:3]}")
    return files


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[key] = tuple(handle.get_slice(key).get_shape())
    return out


def read_prefixed(path: str | Path, prefix: str = "model.gen_vision_tower.") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under ``prefix``, the prefix removed: what a site's EVA-CLIP factory loads
    (``read_prefixed(path)`` gives ``vision_tower.model.blocks.0.attn.qkv.weight``, ...)."""
    from safetensors import safe_open

    out = {}
    for f in _shards(Path(path)):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = handle.get_tensor(key)
    return out


def _renamer(backbone) -> Callable[[str], str]:
    """transformers' own legacy-key conversion for the backbone (renamings only)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(backbone)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict.fromkeys(backbone.state_dict(), True)  # which names exist (for the base-model prefix)

    def rename(key: str) -> str:
        new, converted = rename_source_key(
            key, renamings, converters, base_model_prefix=backbone.base_model_prefix, meta_state_dict=meta
        )
        if converted is not None:
            raise ConfigError(f"backbone tensor {key!r} needs a tensor conversion this loader does not apply")
        return new

    return rename


def _route(key: str, rename: Callable[[str], str]) -> str | None:
    """The family's name for a checkpoint key (None: skipped, the EVA-CLIP target encoder)."""
    if key.startswith("model.gen_vision_tower."):
        return None
    if key == "model.latent_queries":
        return "latent_queries.weight"
    if key.startswith("model.dit.model.caption_projection."):
        return "dit.caption_projection." + key[len("model.dit.model.caption_projection.") :]
    if key.startswith("model.dit.model."):
        return "dit.model." + key[len("model.dit.model.") :]
    if key.startswith("model.dit."):
        return key  # nothing else of BLIP3o's DiT holds tensors: unexpected
    return "backbone." + rename(key)


def _few(keys: list[str]) -> str:
    more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
    return f"{keys[:3]}{more}"


def _load_weights(model: ReleasedBlip3o, files: list[Path], where: Path) -> dict[str, Any]:
    """Copy every checkpoint tensor into ``model`` (streamed shard by shard); strict."""
    from safetensors import safe_open

    dest = model.state_dict()
    rename = _renamer(model.backbone)
    filled: set[str] = set()
    unexpected: list[str] = []
    skipped = 0
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    name = _route(key, rename)
                    if name is None:
                        skipped += 1
                        continue
                    if name not in dest:
                        unexpected.append(key)
                        continue
                    tensor = handle.get_tensor(key)
                    if name == "latent_queries.weight" and tensor.dim() == 3:
                        tensor = tensor[0]  # BLIP3o: a (1, n_query, hidden) parameter
                    if tuple(tensor.shape) != tuple(dest[name].shape):
                        raise ConfigError(
                            f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the config says "
                            f"{tuple(dest[name].shape)}"
                        )
                    dest[name].copy_(tensor)
                    filled.add(name)
        allowed = set(DIFFUSERS_ONLY)
        if model.backbone.config.tie_word_embeddings:
            allowed.add("backbone.lm_head.weight")  # tied to the embeddings: not stored
        missing = [k for k in dest if k not in filled and k not in allowed]
        if missing or unexpected:
            raise ConfigError(
                f"{where}: tensors do not match the BLIP3o-Model layout: missing {_few(missing)}, "
                f"unexpected {_few(unexpected)}"
            )
        model.dit.model.pad_token.zero_()
    return {
        "tensors": len(filled),
        "skipped": {"model.gen_vision_tower": skipped},
        "not_in_checkpoint": sorted(allowed & (set(dest) - filled)),
    }


# ---- site pieces ----------------------------------------------------------------------------------------
def _site_piece(spec: Any, what: str, path: Path, flat: Mapping[str, Any]) -> nn.Module:
    """A site's module from ``spec``: an ``nn.Module``, a factory ``(checkpoint_dir, config) -> Module``
    or ``"package.module:factory"``."""
    if isinstance(spec, nn.Module):
        return spec
    factory = spec
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{what} {spec!r} (module:factory) cannot be imported: {exc}") from None
    if not callable(factory):
        raise ConfigError(f"{what} must be 'module:factory', a factory or a torch module, got {spec!r}")
    built = factory(path, dict(flat))
    if not isinstance(built, nn.Module):
        raise ConfigError(f"{what} {spec!r} returned {type(built).__name__}, not a torch module")
    built.requires_grad_(False)
    built.eval()
    return built


def _site_specs(path: Path, extra: Mapping[str, Any]) -> dict[str, Any]:
    specs: dict[str, Any] = {}
    site = path / SITE_FILE
    if site.is_file():
        obj = _read_json(site)
        if not isinstance(obj, dict) or set(obj) - {"target_encoder", "decoder"}:
            raise ConfigError(f"{site}: expected an object with 'target_encoder' and/or 'decoder'")
        specs.update(obj)
    specs.update({k: extra[k] for k in ("target_encoder", "decoder") if extra.get(k) is not None})
    return specs


# ---- loading ----------------------------------------------------------------------------------------------
def _image_processor(path: Path):
    """The checkpoint's image-processor config if it ships one, else Qwen2.5-VL's defaults (BLIP3o's
    code takes the processor of Qwen/Qwen2.5-VL-7B-Instruct, whose values these are)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if (path / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)


def load_released(path: str | Path, extra: Mapping[str, Any] | None = None):
    """(model, tokenizer, image processor) of a released BLIP3o-Model directory; strict, no downloads."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    flat = _read_json(path / "config.json")
    if not isinstance(flat, dict) or flat.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"{path / 'config.json'}: not a BLIP3o-Model config (model_type {MODEL_TYPE!r})")
    n_query = flat.get("n_query")
    if not isinstance(n_query, int) or n_query < 1:
        raise ConfigError(f"{path / 'config.json'}: n_query must be a positive integer, got {n_query!r}")
    backbone_config = _backbone_config(flat)
    files = _shards(path)
    shapes = _shapes(files)
    lm_hidden = int(backbone_config.text_config.hidden_size)
    queries = shapes.get("model.latent_queries")
    if queries is not None and tuple(queries) != (1, n_query, lm_hidden):
        raise ConfigError(
            f"{path}: model.latent_queries has shape {tuple(queries)}, "
            f"the config says (1, {n_query}, {lm_hidden})"
        )
    dit = _dit_config(shapes, lm_hidden, path)
    config = ReleasedConfig(
        backbone=backbone_config.to_dict(),
        dit=dit,
        n_query=n_query,
        query_start_token_id=QUERY_START_ID,
        query_token_id=QUERY_ID,
        rope_size=dit["sample_size"],
        blip3o={k: flat[k] for k in BLIP3O_FIELDS if k in flat},
    )
    model = ReleasedBlip3o(config, backbone_config, path=path)
    report = _load_weights(model, files, path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    vocab = tokenizer.get_vocab()
    for token, want in (("[IMG]", QUERY_START_ID), ("<image>", QUERY_ID), ("<|image_pad|>", IMAGE_PAD_ID)):
        if vocab.get(token) != want:
            raise ConfigError(
                f"{path}: the tokenizer gives {token!r} id {vocab.get(token)}, BLIP3o's is {want}"
            )
    for what, spec in _site_specs(path, extra or {}).items():
        setattr(model, what, _site_piece(spec, what, path, flat))
    report |= {
        "target_encoder": "site" if model.target_encoder is not None else None,
        "decoder": "site" if model.decoder is not None else None,
        "diffusion_decoder_dir": (path / DECODER_DIR).is_dir(),
    }
    model.load_report = report
    return model, tokenizer, _image_processor(path)


# ---- the reduced checkpoint --------------------------------------------------------------------------------
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)  # ids 151643..151664, as in Qwen2.5's tokenizer
BLIP3O_TOKENS = ("[IMG]", "[/IMG]", "<image>")  # 151665..151667
QWEN_REGULAR = 151643  # Qwen2.5's byte-level BPE vocabulary ends here
VOCAB_SIZE = QWEN_REGULAR + len(QWEN_SPECIALS) + len(BLIP3O_TOKENS)  # 151,668: the released embeddings
_PROMPT_WORDS = (
    "system you are a helpful assistant user answer the question using single word or phrase please generate "
    "image based on following caption :"
).split()


def _reduced_tokenizer(words):
    """A word-level stand-in for Qwen2.5's byte-level BPE with the real special-token ids: the words at
    the bottom, placeholders up to 151642, then Qwen's 22 specials and BLIP3o's three added tokens."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|unk|>": 0}
    for w in sorted(set(words) | set(_PROMPT_WORDS)):
        vocab.setdefault(w, len(vocab))
    for i in range(len(vocab), QWEN_REGULAR):
        vocab[f"<|reserved_{i}|>"] = i
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    plain = {"<tool_call>", "</tool_call>"} | {
        t for t in QWEN_SPECIALS if "fim" in t or t in ("<|repo_name|>", "<|file_sep|>")
    }
    core.add_tokens([AddedToken(t, special=t not in plain, normalized=False) for t in QWEN_SPECIALS])
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BLIP3O_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|unk|>",
        model_max_length=512,
        padding_side="right",
        extra_special_tokens={"image_token": "<|image_pad|>"},
    )


def _flat_config(*, hidden: int, tied: bool, n_query: int) -> dict:
    """A flat transformers-4.51 Qwen2.5-VL config at reduced widths, with BLIP3o's fields (the real
    values, save ``gen_hidden_size``, which is the feature width of the reduced DiT)."""
    return {
        "architectures": ["blip3oQwenForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "pad_token_id": 151643,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": IMAGE_PAD_ID,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 1024,
        "max_window_layers": 2,
        "model_type": MODEL_TYPE,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        # head dim hidden / 2: the (t, h, w) sections split its hidden / 4 frequencies
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope(hidden // 2)},
        "vocab_size": VOCAB_SIZE,
        # BLIP3o's fields (its run.sh arguments, saved by its trainer)
        "gen_vision_tower": "eva-clip-E-14-plus",
        "gen_pooling": "early_pool2d_4",
        "gen_projector_type": "mlp2x_gelu",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_projector_lr": None,
        "use_mm_proj": True,
        "vision_tower_pretrained": "",
        "n_query": n_query,
        "n_und_query": 0,
        "gen_hidden_size": 32,
        "image_aspect_ratio": "square",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 512,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
    }


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def _eva_tensors(
    width: int, depth: int, patch: int, grid: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """EVA-CLIP-shaped tensors under BLIP3o's names (``EvaClipVisionTower.vision_tower`` =
    ``EVAEncoderWrapper``, whose ``model`` is the EVA ViT), at a reduced width and depth."""
    p = "model.gen_vision_tower.vision_tower.model."
    out = {
        f"{p}cls_token": (1, 1, width),
        f"{p}pos_embed": (1, grid * grid + 1, width),
        f"{p}patch_embed.proj.weight": (width, 3, patch, patch),
        f"{p}patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        b = f"{p}blocks.{i}."
        out |= {
            f"{b}norm1.weight": (width,),
            f"{b}norm1.bias": (width,),
            f"{b}attn.qkv.weight": (3 * width, width),
            f"{b}attn.qkv.bias": (3 * width,),
            f"{b}attn.proj.weight": (width, width),
            f"{b}attn.proj.bias": (width,),
            f"{b}norm2.weight": (width,),
            f"{b}norm2.bias": (width,),
            f"{b}mlp.fc1.weight": (4 * width, width),
            f"{b}mlp.fc1.bias": (4 * width,),
            f"{b}mlp.fc2.weight": (width, 4 * width),
            f"{b}mlp.fc2.bias": (width,),
        }
    return {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in out.items()}


def _legacy_backbone_key(key: str) -> str:
    """Today's Qwen2.5-VL key -> the 4.51 one the release stores (written by hand here, so that the
    loader's use of transformers' conversion is tested against an independent statement of it)."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key  # lm_head


def write_released_layout(
    out_dir: str | Path,
    *,
    words=None,
    seed: int = 0,
    hidden: int = 32,
    tied: bool = False,
    feature_dim: int = 32,
    n_query: int = 64,
    shards: int = 2,
) -> Path:
    """Write a reduced checkpoint in the released BLIP3o-Model layout (``tied=True``: the 4B one, whose
    3B backbone ties ``lm_head``): the real key names, config fields, token ids and file names, random
    weights at reduced widths (the real 151,668-token vocabulary, hidden ``hidden``; a DiT of width and
    feature size ``feature_dim``, 2 layers, 2 heads; EVA-CLIP tensors at 2 blocks)."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fedumm.data.synth import VOCABULARY

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = _flat_config(hidden=hidden, tied=tied, n_query=n_query)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = Qwen2_5_VLForConditionalGeneration(_backbone_config(flat))
        dit_args = {
            "sample_size": DIT_SAMPLE_SIZE,
            "patch_size": DIT_PATCH_SIZE,
            "in_channels": feature_dim,
            "hidden_size": feature_dim,
            "num_layers": 2,
            "num_attention_heads": 2,
            "num_kv_heads": 2,
            "multiple_of": DIT_MULTIPLE_OF,
            "ffn_dim_multiplier": None,
            "norm_eps": DIT_NORM_EPS,
            "learn_sigma": False,
            "qk_norm": True,
            "cross_attention_dim": feature_dim,
        }
        holder = Blip3oConfig(
            backbone={"text_config": {"hidden_size": hidden}}, dit=dit_args, target_encoder={}, decoder={}
        )
        dit = Blip3oDiT(holder)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in backbone.state_dict().items():
        if tied and k == "lm_head.weight":
            continue  # tied to the embeddings: transformers does not store it
        tensors[_legacy_backbone_key(k)] = v
    tensors["model.latent_queries"] = torch.randn(1, n_query, hidden, generator=gen)
    for k, v in dit.state_dict().items():
        if k == "model.pad_token":
            continue  # BLIP3o's Lumina-Next has no pad token
        # BLIP3o's caption projection is the first module of its Lumina-Next copy
        tensors["model.dit.model." + k.removeprefix("model.")] = v
    tensors |= _eva_tensors(width=feature_dim, depth=2, patch=14, grid=32, gen=gen)
    keys = sorted(tensors)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].detach().contiguous().clone() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(flat, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "pad_token_id": 151643,
                "transformers_version": "4.51.3",
            },
            indent=2,
        )
    )
    _reduced_tokenizer(words if words is not None else VOCABULARY).save_pretrained(str(out))
    _write_decoder_stub(out / DECODER_DIR)
    return out


def _write_decoder_stub(folder: Path) -> None:
    """``diffusion-decoder/`` with the file names of the release and configs only (no weights): the
    loader never reads it; decoding is the site's."""
    from safetensors.torch import save_file

    for sub in ("unet", "vae", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("unet", "vae"):  # the release's bf16 variant files (loaded with variant="bf16"), empty here
        save_file(
            {}, str(folder / sub / "diffusion_pytorch_model.bf16.safetensors"), metadata={"format": "pt"}
        )
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DiffusionPipeline",  # custom: pipeline_llava_gen.py
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler"})
    )
    (folder / "pipeline_llava_gen.py").write_text(
        '"""Placeholder for the pipeline code the release ships here (reduced layout: not its code)."""\n'
    )


# ---- random weights at the released shapes -------------------------------------------------------------
IMAGE_SIDE = 448  # BLIP3o's image resolution (EVA-CLIP-E/14-plus at 448 px): the understanding input here


def random_released(
    where: Path,
    flat: Mapping[str, Any],
    dit_config: Mapping[str, Any],
    *,
    device: Any,
    dtype: str,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
):
    """(model, tokenizer, image processor) of a BLIP3o-Model at the shapes of a Qwen2.5-VL ``config.json``
    (``flat``, e.g. configs/models/Qwen2.5-VL-7B-Instruct.json, in ``where``) and of its DiT's diffusers
    config (e.g. configs/models/BLIP3o-8B-DiT.json), random weights created on ``device`` in ``dtype``.

    As released: the 151,668-token vocabulary and BLIP3o's token ids (the word-level stand-in tokenizer of
    the reduced checkpoint), the latent queries of the DiT config, the DiT behind its caption projection.
    Qwen2.5-VL's image processor gives every image ``extra["image_size"]`` px square (default
    :data:`IMAGE_SIDE`); the site's target encoder and decoder come from ``fedumm_site.json`` in ``where``
    or ``extra``, as for a released directory.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fedumm.data.synth import VOCABULARY
    from fedumm.models.base import DTYPES, built_on

    extra = dict(extra or {})
    # the config's torch_dtype would otherwise build the language model alone in it
    flat = dict(flat) | {"vocab_size": VOCAB_SIZE, "torch_dtype": DTYPES.get(dtype, dtype)}
    try:
        backbone_config = _backbone_config(flat)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: not a Qwen2.5-VL config ({exc})") from None
    lm_hidden = int(backbone_config.text_config.hidden_size)
    projection = dit_config.get("_caption_projection")
    queries = dit_config.get("_latent_queries")
    if not isinstance(projection, Mapping) or projection.get("in_features") != lm_hidden:
        raise ConfigError(
            f"the DiT config's _caption_projection must take the language model's width {lm_hidden}, "
            f"got {projection!r}"
        )
    if not (isinstance(queries, list) and len(queries) == 2 and queries[1] == lm_hidden and queries[0] > 0):
        raise ConfigError(f"the DiT config's _latent_queries must be [n_query, {lm_hidden}], got {queries!r}")
    dit = {k: v for k, v in dit_config.items() if not k.startswith("_")}
    config = ReleasedConfig(
        backbone=backbone_config.to_dict(),
        dit=dit,
        n_query=int(queries[0]),
        query_start_token_id=QUERY_START_ID,
        query_token_id=QUERY_ID,
        rope_size=int(dit.get("sample_size", DIT_SAMPLE_SIZE)),
    )
    with built_on(device, dtype, seed=seed):
        try:
            model = ReleasedBlip3o(config, backbone_config, path=where)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"the DiT config cannot build Lumina-Next ({exc})") from None
    for what, spec in _site_specs(where, extra).items():
        setattr(model, what, _site_piece(spec, what, where, flat).to(device))
    vision = backbone_config.vision_config
    side = int(extra.get("image_size", IMAGE_SIDE))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        min_pixels=side * side,
        max_pixels=side * side,
    )
    return model, _reduced_tokenizer(VOCABULARY), image_processor
