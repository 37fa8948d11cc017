"""The BLIP3o model as one module: Qwen2.5-VL backbone, latent queries, DiT, target encoder, decoder.

Module tree (these names are the adapter keys' prefixes, see the family's towers)::

    backbone          Qwen2_5_VLForConditionalGeneration (model.visual, model.language_model, lm_head)
    latent_queries    nn.Embedding(n_query, hidden): the learnable query tokens
    dit               caption_projection (PixArtAlphaTextProjection) + model (LuminaNextDiT2DModel)
    target_encoder    SiglipVisionModel (frozen; makes the flow-matching targets)
    decoder           diffusers VAE Decoder (frozen; features -> pixels)

A checkpoint directory holds ``config.json`` (:class:`.tiny.Blip3oConfig`), ``model.safetensors``
(every tensor of the tree above, loaded strictly), the tokenizer and the image processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
from safetensors.torch import load_file
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from fedumm.errors import ConfigError
from fedumm.io import atomic_save_safetensors, atomic_write_json
from fedumm.models.blip3o.tiny import Blip3oConfig

__all__ = ["Blip3oDiT", "Blip3oModel", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Blip3oDiT(nn.Module):
    """BLIP3o's DiT: a caption projection from the language model's width, then Lumina-Next."""

    def __init__(self, config: Blip3oConfig) -> None:
        super().__init__()
        hidden = int(config.backbone["text_config"]["hidden_size"])
        self.caption_projection = PixArtAlphaTextProjection(
            in_features=hidden, hidden_size=config.dit["hidden_size"]
        )
        self.model = LuminaNextDiT2DModel(**config.dit)
        # uninitialised memory in diffusers (torch.empty): zeroed, or two seeded builds differ
        with torch.no_grad():
            self.model.pad_token.zero_()
        head_dim = config.dit["hidden_size"] // config.dit["num_attention_heads"]
        # complex rotary table, recomputed (never saved): (rope_size, rope_size, head_dim / 2)
        self.register_buffer(
            "rotary",
            get_2d_rotary_pos_embed_lumina(head_dim, config.rope_size, config.rope_size),
            persistent=False,
        )

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Velocity for noisy features ``x`` (B, C, h, w) at ``timestep`` (B,), given the language
        model's hidden states at the query slots ``condition`` (B, n_query, hidden)."""
        # inputs in the DiT's dtype: noise, noise levels and caption drops are drawn in float32
        dtype = self.caption_projection.linear_1.weight.dtype
        cond = self.caption_projection(condition.to(dtype))  # (B, n_query, dit hidden)
        mask = torch.ones(cond.shape[:2], device=cond.device, dtype=torch.long)
        return self.model(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=cond,
            encoder_mask=mask,
            image_rotary_emb=self.rotary,
            cross_attention_kwargs={},
        ).sample


class Blip3oModel(nn.Module):
    """The composite BLIP3o model (see the module docstring for its tree)."""

    def __init__(self, config: Blip3oConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config.backbone))
        hidden = int(config.backbone["text_config"]["hidden_size"])
        self.latent_queries = nn.Embedding(config.n_query, hidden)
        nn.init.normal_(self.latent_queries.weight, std=0.02)
        self.dit = Blip3oDiT(config)
        self.target_encoder = SiglipVisionModel(SiglipVisionConfig(**config.target_encoder))
        self.decoder = Decoder(
            **{**config.decoder, "up_block_types": tuple(config.decoder["up_block_types"])}
        )
        mean = torch.tensor(config.feature_mean or [0.0] * config.feature_dim)
        std = torch.tensor(config.feature_std or [1.0] * config.feature_dim)
        self.register_buffer("feature_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("feature_std", std.view(1, -1, 1, 1), persistent=False)

    # ---- features <-> pixels --------------------------------------------------------------------------
    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Standardised target features (B, C, h, w) of images in [-1, 1] (B, 3, H, W)."""
        hidden = self.target_encoder(pixel_values=pixel_values).last_hidden_state  # (B, h*w, C)
        b, n, c = hidden.shape
        side = int(n**0.5)
        grid = hidden.transpose(1, 2).reshape(b, c, side, side)
        return (grid - self.feature_mean) / self.feature_std

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) from standardised features (B, C, h, w)."""
        return self.decoder(features * self.feature_std + self.feature_mean)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics of the (trained) encoder's features on the public images."""
        self.feature_mean.copy_(mean.view(1, -1, 1, 1))
        self.feature_std.copy_(std.view(1, -1, 1, 1))
        self.config = Blip3oConfig(
            **{
                **{k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
                "feature_mean": [float(x) for x in mean.flatten()],
                "feature_std": [float(x) for x in std.flatten()],
            }
        )

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """config.json and model.safetensors (every tensor, contiguous CPU copies)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CONFIG_NAME, self.config.to_json())
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(out / WEIGHTS_NAME, state, {"format": "pt"})

    @classmethod
    def load(cls, path: str | Path) -> Blip3oModel:
        """Build from config.json and load model.safetensors strictly (every tensor accounted for)."""
        path = Path(path)
        try:
            obj = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path / CONFIG_NAME}: cannot read a BLIP3o config ({exc})") from None
        if not isinstance(obj, dict) or obj.get("fedumm_family") != "blip3o":
            raise ConfigError(f"{path / CONFIG_NAME}: not a fedumm BLIP3o checkpoint (fedumm_family missing)")
        try:
            config = Blip3oConfig.from_json(obj)
        except TypeError as exc:
            raise ConfigError(f"{path / CONFIG_NAME}: {exc}") from None
        model = cls(config)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise ConfigError(f"{weights}: missing")
        state = load_file(str(weights))
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(
                f"{weights}: tensors do not match the config: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )
        return model
