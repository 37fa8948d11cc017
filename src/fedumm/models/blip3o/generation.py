"""BLIP3o generation: the query condition, the flow-matching loss and the seeded Euler sampler.

Flow matching as in BLIP3o (and Lumina-Next): for target features x and noise e ~ N(0, I) at noise
level s, x_s = (1 - s) x + s e; the DiT predicts the velocity e - x (MSE), with the timestep s *
1000. Noise levels are logit-normal (s = sigmoid(n), n ~ N(0, 1)), as in SD3, not uniform.
Classifier-free guidance: the condition is zeroed for a fraction of training examples (BLIP3o's
``mask_drop``), and at sampling time the zero condition is the unconditional branch. Sampling
integrates from s = 1 (noise) to 0 with diffusers' ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

__all__ = [
    "TIMESTEP_SCALE",
    "condition",
    "draw_noise",
    "flow_loss",
    "images_from_pixels",
    "pixels_from_images",
    "sample",
]

TIMESTEP_SCALE = 1000.0  # the DiT sees s * 1000, the scheduler's timestep convention
SAMPLE_BATCH = 128  # images per DiT call when sampling (bounds memory)


def pixels_from_images(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] from RGB images (the target encoder's and decoder's range)."""
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def images_from_pixels(pixels: torch.Tensor) -> list[Image.Image]:
    """RGB images from (N, 3, H, W) in [-1, 1] (clamped)."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def condition(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The language model's last hidden states at the query slots: (B, n_query, hidden).

    ``input_ids`` are left-padded and end with the ``n_query`` slots, whose embeddings are replaced
    by the latent queries. Positions count real tokens only (text positions on all three rotary
    axes, as Qwen2.5-VL gives text).
    """
    lm = model.backbone.model.language_model
    n = model.config.n_query
    embeds = model.backbone.get_input_embeddings()(input_ids[:, :-n])  # (B, T - n, hidden)
    queries = model.latent_queries(torch.arange(n, device=input_ids.device))  # (n, hidden)
    embeds = torch.cat([embeds, queries.unsqueeze(0).expand(input_ids.shape[0], -1, -1)], dim=1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = lm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions.unsqueeze(0).expand(3, -1, -1),
        use_cache=False,
    )
    return out.last_hidden_state[:, -n:]


def draw_noise(
    shape: torch.Size | Sequence[int],
    *,
    generator: torch.Generator,
    cfg_drop_prob: float,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Noise (B, C, h, w), noise levels (B,) and condition keep-masks (B,) from ``generator``."""
    b = int(shape[0])
    noise = torch.randn(tuple(shape), generator=generator)
    # logit-normal noise levels (Esser et al. 2024, arXiv:2403.03206) rather than BLIP3o's uniform
    # ones: they weight the middle of the path, where an object's place and size are decided; with
    # uniform levels the tiny DiT learns to leave small objects out (docs/BENCHMARKS.md)
    sigma = torch.sigmoid(torch.randn(b, generator=generator))
    keep = (torch.rand(b, generator=generator) >= cfg_drop_prob).float()
    return {"noise": noise.to(device), "sigma": sigma.to(device), "keep": keep.to(device)}


def flow_loss(model: torch.nn.Module, cond: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the predicted velocity against noise - features."""
    x, noise, sigma = batch["features"], batch["noise"], batch["sigma"]
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x + s * noise
    cond = cond * batch["keep"].view(-1, 1, 1)  # dropped captions: the zero (unconditional) condition
    velocity = model.dit(noisy, sigma * TIMESTEP_SCALE, cond)
    return F.mse_loss(velocity.float(), (noise - x).float())


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    cond: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    temperature: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Standardised features (N, C, h, w) for conditions (N, n_query, hidden), seeded.

    The initial noise is drawn for all N at once from ``seed`` (so a batch split does not change the
    draws), scaled by ``temperature``; each Euler step evaluates the conditional and the zero
    condition and mixes them with ``guidance_scale``.
    """
    cfg = model.config
    n = cond.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((n, cfg.feature_dim, cfg.grid, cfg.grid), generator=gen).to(cond.device) * temperature
    out = []
    for start in range(0, n, SAMPLE_BATCH):
        xb, cb = x[start : start + SAMPLE_BATCH], cond[start : start + SAMPLE_BATCH]
        scheduler = FlowMatchEulerDiscreteScheduler()  # stateful (step index): one per batch
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), device=cond.device)
        both = torch.cat([torch.zeros_like(cb), cb])
        for t in scheduler.timesteps:
            v = model.dit(torch.cat([xb, xb]), t.expand(2 * xb.shape[0]).to(xb.dtype), both)
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
            xb = scheduler.step(v, t, xb).prev_sample
        out.append(xb)
    return torch.cat(out)
