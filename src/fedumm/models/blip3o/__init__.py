"""The BLIP3o family: Qwen2.5-VL for understanding, learnable latent queries whose last hidden states
condition a Lumina-Next diffusion transformer, trained by flow matching to produce the features of a
frozen image encoder, which a decoder turns into pixels (Chen et al. 2025, "BLIP3-o: A Family of
Fully Open Unified Multimodal Models", arXiv:2505.09568).

Registering this package imports no model library; :mod:`.family` holds the model class.
"""

from fedumm.models.base import FAMILIES, FamilyInfo, Tower

INFO = FAMILIES.register("blip3o")(
    FamilyInfo(
        name="blip3o",
        description="BLIP3o: Qwen2.5-VL + latent queries + a flow-matching Lumina-Next DiT",
        towers={
            "vision": Tower(
                prefix=r"backbone\.model\.visual",
                modules=("attn.qkv", "attn.proj"),
                description="understanding ViT of Qwen2.5-VL (its attention)",
            ),
            "language": Tower(
                prefix=r"backbone\.model\.language_model",
                modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                description="the shared language model",
            ),
            "generation": Tower(
                prefix=r"(?:dit|latent_queries)",
                modules=(
                    "attn1.to_q",
                    "attn1.to_k",
                    "attn1.to_v",
                    "attn1.to_out.0",
                    "attn2.to_q",
                    "attn2.to_k",
                    "attn2.to_v",
                    "attn2.to_out.0",
                ),
                whole=("latent_queries",),
                description="the DiT's self- and cross-attention, and the latent query tokens",
            ),
        },
        task_towers={"understanding": ("vision", "language"), "generation": ("language", "generation")},
        default_prompt_template="<|vision_start|><|image_pad|><|vision_end|> question: {question} answer:",
        loader="fedumm.models.blip3o.family:Blip3oFamily",
        generation_loss="flow_loss",
        generation_loss_label="flow-matching loss",
    )
)
