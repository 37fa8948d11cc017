"""The built-in tiny BLIP3o: real library classes at a configuration sized for 2 CPU cores.

- understanding and the autoregressive backbone: transformers ``Qwen2_5_VLForConditionalGeneration``
  (a 2-block ViT with 8-px patches merged 2x2, so a 64x64 image is 16 language-model tokens; a
  4-layer language model of width 128);
- generation: 64 learnable latent queries; the language model's last hidden states at those slots
  go through diffusers ``PixArtAlphaTextProjection`` into diffusers ``LuminaNextDiT2DModel`` (patch
  1 on an 8x8 grid, as BLIP3o's DiT), trained by flow matching to produce the features of a frozen
  image encoder (transformers ``SiglipVisionModel``: 8-px patches, an 8x8 grid of 32-d features);
- pixels: diffusers' VAE ``Decoder`` turns the 8x8 feature grid into a 64x64 image (BLIP3o ships
  an SDXL diffusion decoder for this step; a small deterministic decoder stands in for it).

The tokenizer is a word-level ``tokenizers`` model over the synthetic world's vocabulary with
Qwen2.5-VL's special-token names, wrapped in ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

__all__ = [
    "ALIGNMENT_TOKENS",
    "IMAGE_SIZE",
    "SPECIAL_TOKENS",
    "Blip3oConfig",
    "build_image_processor",
    "build_tokenizer",
    "tiny_config",
]

IMAGE_SIZE = 64
PAD, UNK, BOS, EOS = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
QUERY_START, QUERY = "[IMG]", "<image>"  # BLIP3o: the query span's start and its slots
SPECIAL_TOKENS = (
    PAD,
    UNK,
    BOS,
    EOS,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    "<|video_pad|>",
    QUERY_START,
    QUERY,
)
# reserved for shared alignment tokens: learnable, placed between image and text
ALIGNMENT_TOKENS = tuple(f"<align_{i}>" for i in range(4))


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials first, then the sorted unique vocabulary."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALIGNMENT_TOKENS)}
    for w in sorted(set(words) - set(vocab)):
        vocab[w] = len(vocab)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_PAD},
    )
    # matched whole, before pre-tokenisation (the punctuation splitter would cut them apart)
    tokenizer.add_tokens([t for t in SPECIAL_TOKENS if t not in (PAD, UNK, BOS, EOS)], special_tokens=True)
    tokenizer.add_tokens(list(ALIGNMENT_TOKENS), special_tokens=True)
    return tokenizer


def build_image_processor():
    """Qwen2.5-VL's own image processor (the PIL one: the stock processor class needs torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=8, merge_size=2, temporal_patch_size=2
    )


@dataclass(frozen=True, kw_only=True)
class Blip3oConfig:
    """The composite model's configuration (config.json of a fedumm BLIP3o checkpoint).

    ``backbone`` is a ``Qwen2_5_VLConfig`` dict; ``dit`` the ``LuminaNextDiT2DModel`` arguments;
    ``target_encoder`` a ``SiglipVisionConfig`` dict; ``decoder`` the VAE ``Decoder`` arguments.
    ``feature_mean`` / ``feature_std`` standardise the target features per channel (measured on the
    public images after the encoder is trained), so that flow matching sees unit-variance data.
    """

    backbone: dict
    dit: dict
    target_encoder: dict
    decoder: dict
    n_query: int = 64
    query_start_token_id: int = 0
    query_token_id: int = 0
    feature_mean: list[float] = field(default_factory=list)
    feature_std: list[float] = field(default_factory=list)
    rope_size: int = 16  # side of the DiT's 2-D rotary table (>= the latent grid)

    @property
    def feature_dim(self) -> int:
        return int(self.target_encoder["hidden_size"])

    @property
    def grid(self) -> int:
        return int(self.target_encoder["image_size"]) // int(self.target_encoder["patch_size"])

    def to_json(self) -> dict:
        return {"fedumm_family": "blip3o", **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict) -> Blip3oConfig:
        obj = {k: v for k, v in obj.items() if k != "fedumm_family"}
        return cls(**obj)


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> Blip3oConfig:
    """The built-in configuration for ``tokenizer`` (about 2.9 M parameters)."""
    ids = tokenizer.convert_tokens_to_ids
    hidden = 128
    feature_dim = 32
    backbone = {
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            # head dim 32: the multimodal rotary sections (t, h, w) split its 16 frequencies
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": False,
            "bos_token_id": ids(BOS),
            "eos_token_id": ids(EOS),
            "pad_token_id": ids(PAD),
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "patch_size": 8,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": IMAGE_SIZE,  # one window: full attention in every block
            "fullatt_block_indexes": [0, 1],
            "out_hidden_size": hidden,
            "in_channels": 3,
        },
        "image_token_id": ids(IMAGE_PAD),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids(VISION_START),
        "vision_end_token_id": ids(VISION_END),
        "tie_word_embeddings": False,
    }
    dit = {
        "sample_size": 8,
        "patch_size": 1,
        "in_channels": feature_dim,
        "hidden_size": 96,
        "num_layers": 3,
        "num_attention_heads": 4,
        "num_kv_heads": 4,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "learn_sigma": False,
        "qk_norm": True,
        "cross_attention_dim": 96,  # the DiT's width: the caption projection maps the LM's onto it
    }
    target_encoder = {
        "hidden_size": feature_dim,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "vision_use_head": True,
    }
    decoder = {
        "in_channels": feature_dim,
        "out_channels": 3,
        "up_block_types": ["UpDecoderBlock2D"] * 4,  # 8x8 -> 64x64: three upsamplings
        "block_out_channels": [16, 16, 32, 64],  # the 64x64 stage is the costly one: 16 channels
        "layers_per_block": 0,  # one resnet per stage
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
    }
    return Blip3oConfig(
        backbone=backbone,
        dit=dit,
        target_encoder=target_encoder,
        decoder=decoder,
        n_query=16,
        query_start_token_id=ids(QUERY_START),
        query_token_id=ids(QUERY),
    )
