"""The Janus family: Janus / Janus-Pro (transformers ``JanusForConditionalGeneration``).

Images are understood through a SigLIP-style vision encoder and an aligner, and generated as VQ
image tokens predicted by the same language model through a generation head. Registering this
package imports no model library; :mod:`.family` holds the model class.
"""

from fedumm.models.base import FAMILIES, FamilyInfo, Tower

INFO = FAMILIES.register("janus")(
    FamilyInfo(
        name="janus",
        description="Janus / Janus-Pro: VQ image tokens predicted by the language model",
        towers={
            "vision": Tower(
                prefix=r"model\.(?:vision_model|aligner)",
                modules=("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "hidden_layers.0"),
                description="understanding encoder (SigLIP ViT) and aligner",
            ),
            "language": Tower(
                prefix=r"model\.language_model",
                modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                description="the shared language model",
            ),
            "generation": Tower(
                prefix=r"model\.(?:generation_aligner|generation_head)",
                modules=("fc1", "hidden_layers.0", "proj_out", "vision_head"),
                description="generation aligner and image-token head",
            ),
        },
        task_towers={"understanding": ("vision", "language"), "generation": ("language", "generation")},
        default_prompt_template="<image_placeholder> question: {question} answer:",
        loader="fedumm.models.janus.family:JanusFamily",
    )
)
