"""The built-in tiny Janus: a real ``JanusForConditionalGeneration`` at a ~2M-parameter configuration.

Its tokenizer is a word-level ``tokenizers`` model over the synthetic world's vocabulary, wrapped in
``PreTrainedTokenizerFast`` so that the stock ``JanusProcessor`` drives it exactly as it drives the
tokenizer of a real Janus-Pro checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

__all__ = [
    "ALIGNMENT_TOKENS",
    "SPECIAL_TOKENS",
    "IMAGE_SIZE",
    "NUM_IMAGE_TOKENS",
    "build_tokenizer",
    "build_processor",
    "build_tiny_janus",
]

SPECIAL_TOKENS = (
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<image_placeholder>",
    "<begin_of_image>",
    "<end_of_image>",
)
# reserved for shared alignment tokens (see JanusFamily.alignment): learnable, placed between image and text
ALIGNMENT_TOKENS = tuple(f"<align_{i}>" for i in range(4))
IMAGE_SIZE = 64
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64 image tokens: an 8x8 grid of 8-px patches
"""Image tokens per image, the same for understanding (vision patches) and generation (VQ codes).

HF Janus ties the two grids. An 8x8 grid keeps an object's colour and shape in its tokens: with 4x4
tokens of 16 px (the size of a whole small object) the VQ round trip lost them (docs/BENCHMARKS.md).
"""


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials first, then the sorted unique vocabulary."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALIGNMENT_TOKENS)}
    for w in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[w] = len(vocab)
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    # matched whole, before pre-tokenisation (the punctuation splitter would cut them apart)
    tokenizer.add_tokens(list(ALIGNMENT_TOKENS), special_tokens=True)
    return tokenizer


def build_processor(
    tokenizer: PreTrainedTokenizerFast, *, num_image_tokens: int = NUM_IMAGE_TOKENS
) -> JanusProcessor:
    """Stock Janus processor at 64x64 with ``num_image_tokens`` image tokens, no default system prompt."""
    image_processor = JanusImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, min_size=8)
    return JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=num_image_tokens,
        use_default_system_prompt=False,
    )


def build_tiny_janus(
    tokenizer: PreTrainedTokenizerFast,
    *,
    codebook_size: int = 512,
    embed_dim: int = 8,
    latent_channels: int = 32,
    patch_size: int | None = None,
) -> JanusForConditionalGeneration:
    """A freshly initialised tiny Janus sized for 2 CPU cores (at the defaults 2.09 M parameters, 8.4 MB).

    ``patch_size`` (default :data:`PATCH_SIZE`) sets both grids: HF Janus ties the generation token
    grid to the understanding patch grid, so the VQ gets one downsampling per halving of the patch.
    """
    ids = tokenizer.convert_tokens_to_ids
    patch = patch_size or PATCH_SIZE
    side = IMAGE_SIZE // patch
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<bos>"),
        eos_token_id=ids("<eos>"),
        tie_word_embeddings=True,  # what the model does: see the JanusConfig below
    )
    vision = JanusVisionConfig(
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch,
        projection_dim=128,
        depth=2,
        num_image_tokens=side * side,
        mlp_ratio=2.0,
    )
    vq = JanusVQVAEConfig(
        embed_dim=embed_dim,
        num_embeddings=codebook_size,
        latent_channels=latent_channels,
        base_channels=32,  # GroupNorm(32 groups) needs at least 32 channels
        # one downsampling per halving of the patch (3 for 8 px: 64 px -> an 8x8 latent grid). HF Janus
        # ties the generation grid to the understanding patch grid (vq num_patches = image_size // patch)
        channel_multiplier=[1, 1, 2, 2, 4][: 1 + (patch.bit_length() - 1)],
        num_res_blocks=1,
        projection_dim=128,
        image_token_embed_dim=128,
        num_hidden_layers=2,
        num_patches=side,
    )
    # the output head is the embedding matrix (lm_head tied to embed_tokens, stored once). JanusConfig's
    # top-level tie_word_embeddings (default true) is what transformers applies; the text config says
    # the same so that each config states what the model does
    config = JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=vq,
        image_token_id=ids("<image_placeholder>"),
        tie_word_embeddings=True,
    )
    return JanusForConditionalGeneration(config)
