"""Image generation with a Janus model: VQ tokenizer training, text-to-image-token training, sampling.

HF's ``JanusVQVAE`` is frozen at inference and its ``forward`` cannot train it end to end: its
quantizer picks codes by raw L2 distance and hands the decoder raw codebook rows, while
``decode`` (used for generation) hands the decoder L2-normalised rows. :func:`vq_loss` therefore
keeps the codebook on the unit sphere (:func:`normalize_codebook`), picks codes with HF's own
quantizer (so ``vqmodel.encode`` gives the indices training used) and decodes normalised rows
exactly as ``vqmodel.decode`` does.

Text-to-image training (:func:`t2i_batch`, :func:`t2i_loss`) builds the sequence HF's
``generate(generation_mode="image")`` builds at inference: the left-padded prompt ending in the
begin-of-image token, then image tokens embedded by ``generation_embeddings`` and
``generation_aligner``, scored by ``generation_head``. Caption dropout turns a prompt into HF's
unconditional prompt (every token except BOS and BOI replaced by the pad token, attention mask
unchanged), which is what classifier-free guidance subtracts at sampling time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import GenerationConfig, JanusForConditionalGeneration, JanusProcessor
from transformers.generation import LogitsProcessor, LogitsProcessorList

from fedumm.errors import ConfigError, DataError
from fedumm.progress import NullProgress, Progress

__all__ = [
    "BETA",
    "caption_pairs",
    "check_generation_config",
    "encode_images",
    "generation_tokens",
    "generate_images",
    "normalize_codebook",
    "pixel_values",
    "reconstruct",
    "t2i_batch",
    "t2i_loss",
    "t2i_parameters",
    "tensors_to_pil",
    "train_t2i",
    "train_vq",
    "vq_eval",
    "vq_loss",
    "vq_parameters",
]

BETA = 0.25  # commitment weight (HF's quantizer default)
IGNORE = -100
LOWPASS = 4  # pooling window of the low-pass reconstruction term


# ---- helpers ---------------------------------------------------------------------------------------
def _janus(model: torch.nn.Module) -> JanusForConditionalGeneration:
    """The Janus module itself, also inside a peft wrapper (LoRA layers are injected in place)."""
    if isinstance(model, JanusForConditionalGeneration):
        return model
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else None
    if isinstance(base, JanusForConditionalGeneration):
        return base
    raise TypeError(
        f"expected a JanusForConditionalGeneration (optionally peft-wrapped), got {type(model).__name__}"
    )


def generation_tokens(model: torch.nn.Module) -> int:
    """Image tokens per generated image: HF's ``generate`` samples the vision tower's patch count."""
    return int(_janus(model).config.vision_config.num_image_tokens)


def check_generation_config(model: torch.nn.Module) -> None:
    """Raise ConfigError unless the VQ latent grid, ``vqmodel.decode`` and ``generate`` agree."""
    config = _janus(model).config
    size = config.vision_config.image_size
    levels = len(config.vq_config.channel_multiplier)
    side = size // 2 ** (levels - 1)  # the VQ encoder halves the resolution at all but the last level
    decode_side = config.vq_config.num_patches  # JanusConfig sets it to image_size // vision patch_size
    sampled = generation_tokens(model)
    if side != decode_side or side * side != sampled:
        raise ConfigError(
            f"VQ encoder gives a {side}x{side} token grid ({levels} levels on {size} px)"
            f" but vqmodel.decode expects {decode_side}x{decode_side} and generate samples {sampled} tokens"
            f" (both follow the vision patch grid): give vq_config.channel_multiplier"
            f" {1 + round(math.log2(size / max(decode_side, 1)))} levels"
            f" or set the vision patch size to {2 ** (levels - 1)}"
        )


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rgb(images: Iterable[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def pixel_values(processor: JanusProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Processor-normalised pixels (B, 3, H, W) of RGB images."""
    return processor.image_processor(images=_rgb(images), return_tensors="pt")["pixel_values"]


def tensors_to_pil(processor: JanusProcessor, pixels: torch.Tensor) -> list[Image.Image]:
    """PIL images from processor-normalised pixels (B, 3, H, W) via the processor's postprocess."""
    # the PIL image processor's unnormalize assumes channels-first arrays, so pass (3, H, W) tensors
    out = processor.postprocess(list(pixels.detach().float().cpu()), return_tensors="PIL.Image.Image")
    return list(out["pixel_values"])


def _unit_range(processor: JanusProcessor, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) mapped from processor space back to [0, 1]."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(ip.image_std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels * std + mean).clamp(0.0, 1.0)


def caption_pairs(data_dir: str | Path, split: str = "public") -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a COCO-format ``captions_{split}.json``, in annotation order."""
    root = Path(data_dir)
    path = root / f"captions_{split}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        return [
            (root / "images" / split / files[int(a["image_id"])], str(a["caption"]))
            for a in data["annotations"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read COCO captions ({exc})") from None


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- VQ tokenizer -----------------------------------------------------------------------------------
def vq_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of the VQ tokenizer (encoder, codebook, quant convs, decoder)."""
    return list(_janus(model).model.vqmodel.parameters())


@torch.no_grad()
def normalize_codebook(model: torch.nn.Module) -> None:
    """Project the codebook rows onto the unit sphere in place (HF's encode then picks codes by cosine)."""
    weight = _janus(model).model.vqmodel.quantize.embedding.weight  # (K, D)
    weight.copy_(F.normalize(weight, dim=-1))


def _vq_forward(vq: torch.nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode, quantise (HF's rule, straight-through), decode; tensors for the loss and statistics."""
    z = vq.quant_conv(vq.encoder(pixels))  # (B, D, h, w)
    b, d, h, w = z.shape
    with torch.no_grad():
        indices = vq.quantize(z.detach())[2]  # (B*h*w,) HF's own nearest-code rule, same as vqmodel.encode
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D), row-major over the grid like HF
    zn = F.normalize(z_flat, dim=-1)
    codes = F.normalize(vq.quantize.embedding.weight, dim=-1)[indices]  # (B*h*w, D), what decode feeds
    codebook_loss = F.mse_loss(codes, zn.detach())
    commit_loss = F.mse_loss(zn, codes.detach())
    zq = zn + (codes - zn).detach()  # straight-through estimator
    zq = zq.view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
    recon = vq.decoder(vq.post_quant_conv(zq))  # (B, 3, H, W)
    return {
        "recon": recon,
        "latents": zn.detach(),
        "indices": indices,
        "codebook_loss": codebook_loss,
        "commit_loss": commit_loss,
    }


def _usage(indices: torch.Tensor, num_codes: int) -> tuple[float, float]:
    """Fraction of codes used and the perplexity of the code histogram."""
    hist = torch.bincount(indices.flatten(), minlength=num_codes).float()  # (K,)
    p = hist / hist.sum().clamp_min(1.0)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((hist > 0).float().mean()), float(entropy.exp())


def _vq_objective(
    vq: torch.nn.Module, pixels: torch.Tensor, lowpass_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Loss, float statistics and forward tensors of one VQ step on pixels (B, 3, H, W)."""
    out = _vq_forward(vq, pixels)
    recon = out["recon"]
    l1 = (recon - pixels).abs().mean()
    l2 = F.mse_loss(recon, pixels)
    loss = l1 + l2 + out["codebook_loss"] + BETA * out["commit_loss"]
    if lowpass_weight > 0.0:
        # the same terms on 4x4-pooled pixels (B, 3, H/4, W/4): colour counts more than exact edges
        pooled_r, pooled_p = F.avg_pool2d(recon, LOWPASS), F.avg_pool2d(pixels, LOWPASS)
        loss = loss + lowpass_weight * ((pooled_r - pooled_p).abs().mean() + F.mse_loss(pooled_r, pooled_p))
    usage, perplexity = _usage(out["indices"], vq.quantize.num_embeddings)
    stats = {
        "loss": float(loss.detach()),
        "recon_l1": float(l1.detach()),
        "recon_l2": float(l2.detach()),
        "codebook": float(out["codebook_loss"].detach()),
        "commit": float(out["commit_loss"].detach()),
        "code_usage": usage,
        "perplexity": perplexity,
    }
    return loss, stats, out


def vq_loss(
    model: torch.nn.Module, pixel_values: torch.Tensor, *, lowpass_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """VQ loss on normalised pixels (B, 3, H, W): L1 + L2 recon (+ low-pass) + codebook + beta * commit."""
    loss, stats, _ = _vq_objective(_janus(model).model.vqmodel, pixel_values, lowpass_weight)
    return loss, stats


def _patch_error(recon: torch.Tensor, pixels: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Mean absolute reconstruction error per latent patch (B*h*w,), in the latents' row-major order."""
    error = (recon - pixels).abs().mean(1, keepdim=True)  # (B, 1, H, W)
    side = int(math.isqrt(num_latents // pixels.shape[0]))
    return F.adaptive_avg_pool2d(error, side).flatten()  # (B*h*w,)


def _reinit_dead_codes(
    weight: torch.nn.Parameter,
    ema_counts: torch.Tensor,
    latents: torch.Tensor,
    patch_error: torch.Tensor,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    threshold: float,
) -> int:
    """Move codes used less than ``threshold`` (EMA) onto badly reconstructed latents; returns how many."""
    dead = (ema_counts < threshold).nonzero().flatten()  # (n_dead,)
    if dead.numel() == 0:
        return 0
    # sample latents by their patch's reconstruction error, so that spare codes go to objects and
    # edges rather than splitting the (easy, most frequent) background into near-duplicate codes
    weights = patch_error.detach().float().cpu().clamp_min(1e-12)  # (B*h*w,)
    pick = torch.multinomial(weights, dead.numel(), replacement=True, generator=generator)
    noise = 0.01 * torch.randn(dead.numel(), latents.shape[1], generator=generator)
    with torch.no_grad():
        fresh = F.normalize(latents[pick.to(latents.device)] + noise.to(latents.device), dim=-1)
        weight[dead] = fresh.to(weight.dtype)
    state = opt.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0.0
    ema_counts[dead] = threshold * 4  # grace period before it can be re-initialised again
    return int(dead.numel())


def train_vq(
    model: torch.nn.Module,
    images: Sequence[Image.Image],
    processor: JanusProcessor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    warmup_steps: int = 20,
    reinit_dead_codes: bool = True,
    reinit_every: int = 25,
    lowpass_weight: float = 1.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the VQ tokenizer alone on ``images`` with AdamW; returns the final statistics."""
    if steps < 1 or batch_size < 1 or not images:
        raise ValueError(
            f"train_vq needs steps, batch_size >= 1 and images (got {steps}, {batch_size}, {len(images)})"
        )
    progress = progress or NullProgress()
    janus = _janus(model)
    check_generation_config(janus)
    vq = janus.model.vqmodel
    device = _device(janus)
    data = pixel_values(processor, images)  # (N, 3, H, W), kept on the CPU
    params = vq_parameters(janus)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    normalize_codebook(janus)
    weight = vq.quantize.embedding.weight  # (K, D)
    num_codes = weight.shape[0]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    # a code is dead when its per-step pick count (EMA) falls below once per ~20 batches
    threshold = 0.05
    ema_counts = torch.full((num_codes,), 4 * threshold, device=device)  # (K,) starts alive for ~30 steps
    was_training = vq.training
    vq.train()
    t0 = time.perf_counter()
    progress.start("vq", "VQ tokenizer steps", steps)
    order: list[int] = []
    recent: list[dict[str, float]] = []
    reinitialised = 0
    try:
        for step in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(data), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = data[idx].to(device)  # (B, 3, H, W)
            loss, step_stats, out = _vq_objective(vq, batch, lowpass_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            normalize_codebook(janus)
            counts = torch.bincount(out["indices"], minlength=num_codes).float()  # (K,)
            ema_counts.mul_(0.95).add_(counts, alpha=0.05)
            if reinit_dead_codes and (step + 1) % reinit_every == 0 and step + 1 < int(0.8 * steps):
                latents = out["latents"]  # (B*h*w, D)
                error = _patch_error(out["recon"].detach(), batch, latents.shape[0])  # (B*h*w,)
                reinitialised += _reinit_dead_codes(weight, ema_counts, latents, error, opt, gen, threshold)
            recent = [*recent[-19:], step_stats]
            progress.update("vq", step + 1, f"VQ tokenizer (loss {recent[-1]['loss']:.3f})")
    finally:
        progress.finish("vq")
        vq.train(was_training)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    stats = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]}
    stats.update(
        {
            "steps": steps,
            "codes_reinitialised": reinitialised,
            "codes_alive": int((ema_counts >= threshold).sum()),
            "wall_time_s": time.perf_counter() - t0,
        }
    )
    return stats


@torch.no_grad()
def encode_images(
    model: torch.nn.Module, processor: JanusProcessor, images: Sequence[Image.Image], *, batch_size: int = 64
) -> torch.Tensor:
    """Image-token ids (N, h*w) from the frozen VQ tokenizer (``vqmodel.encode``), on the CPU."""
    janus = _janus(model)
    check_generation_config(janus)
    vq = janus.model.vqmodel
    device = _device(janus)
    dtype = next(vq.parameters()).dtype  # the processor gives float32; a bfloat16 model takes its own
    was_training = vq.training
    vq.eval()
    try:
        chunks = []
        for i in range(0, len(images), batch_size):
            pixels = pixel_values(processor, images[i : i + batch_size]).to(device, dtype)  # (b, 3, H, W)
            tokens = vq.encode(pixels).image_tokens  # (b*h*w,)
            chunks.append(tokens.view(pixels.shape[0], -1).cpu())  # (b, h*w)
    finally:
        vq.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.long)


@torch.no_grad()
def reconstruct(
    model: torch.nn.Module, processor: JanusProcessor, images: Sequence[Image.Image]
) -> list[Image.Image]:
    """Images after a VQ round trip (``vqmodel.encode`` then ``decode_image_tokens``)."""
    janus = _janus(model)
    tokens = encode_images(janus, processor, images).to(_device(janus))  # (N, h*w)
    pixels = janus.decode_image_tokens(tokens).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return tensors_to_pil(processor, pixels)


@torch.no_grad()
def vq_eval(
    model: torch.nn.Module, processor: JanusProcessor, images: Sequence[Image.Image], *, batch_size: int = 64
) -> dict[str, float]:
    """Round-trip quality through HF's encode/decode: PSNR (dB) and mean abs error in [0, 1], code usage."""
    janus = _janus(model)
    device = _device(janus)
    sq, ab, n = 0.0, 0.0, 0
    used = torch.zeros(janus.model.vqmodel.quantize.num_embeddings, dtype=torch.bool)
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        pixels = pixel_values(processor, chunk).to(device)  # (b, 3, H, W)
        tokens = encode_images(janus, processor, chunk).to(device)  # (b, h*w)
        recon = janus.decode_image_tokens(tokens).permute(0, 3, 1, 2)  # (b, 3, H, W)
        a, r = _unit_range(processor, pixels), _unit_range(processor, recon)
        sq += float(((a - r) ** 2).sum())
        ab += float((a - r).abs().sum())
        n += a.numel()
        used[tokens.flatten().cpu()] = True
    mse = sq / max(n, 1)
    return {
        "psnr_db": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "mean_abs_error": ab / max(n, 1),
        "code_usage": float(used.float().mean()),
    }


# ---- text-to-image tokens ---------------------------------------------------------------------------
def t2i_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters text-to-image training updates: language model and generation embeddings/aligner/head."""
    inner = _janus(model).model
    mods = (
        inner.language_model,
        inner.generation_embeddings,
        inner.generation_aligner,
        inner.generation_head,
    )
    return [p for m in mods for p in m.parameters()]


def _special_ids(processor: JanusProcessor) -> tuple[int, int, int]:
    tok = processor.tokenizer
    return tok.bos_token_id, tok.convert_tokens_to_ids(tok.boi_token), tok.pad_token_id


def t2i_batch(
    model: torch.nn.Module,
    processor: JanusProcessor,
    captions: Sequence[str],
    images: Sequence[Image.Image] | torch.Tensor,
    *,
    cfg_drop_prob: float = 0.1,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Prompt ids (left-padded, ending in BOI), image-token targets, attention mask and labels."""
    # ``images``: PIL images (encoded with the frozen VQ) or precomputed image-token ids (B, h*w)
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions but {len(images)} images")
    if not 0.0 <= cfg_drop_prob <= 1.0:
        raise ValueError(f"cfg_drop_prob must be in [0, 1], got {cfg_drop_prob}")
    janus = _janus(model)
    device = _device(janus)
    if isinstance(images, torch.Tensor):
        tokens = images.long().cpu()  # (B, h*w)
    else:
        tokens = encode_images(janus, processor, images)  # (B, h*w)
    if tokens.ndim != 2 or tokens.shape[1] != generation_tokens(janus):
        raise ValueError(f"image tokens must be (B, {generation_tokens(janus)}), got {tuple(tokens.shape)}")
    bos, boi, pad = _special_ids(processor)
    enc = processor(text=list(captions), generation_mode="image", return_tensors="pt", padding=True)
    input_ids = enc["input_ids"].clone()  # (B, L), left-padded, last token BOI
    prompt_mask = enc["attention_mask"]  # (B, L)
    dropped = torch.rand(len(captions), generator=generator) < cfg_drop_prob  # (B,)
    # HF's unconditional branch: every token but BOS and BOI becomes pad, attention mask unchanged
    blank = dropped[:, None] & (input_ids != bos) & (input_ids != boi)  # (B, L)
    input_ids[blank] = pad
    b, n = tokens.shape
    attention_mask = torch.cat([prompt_mask, torch.ones(b, n, dtype=prompt_mask.dtype)], dim=1)  # (B, L+N)
    # (B, L+N), HF convention: unshifted, shifted inside the loss
    labels = torch.cat([torch.full_like(input_ids, IGNORE), tokens], dim=1)
    batch = {
        "input_ids": input_ids,
        "image_tokens": tokens,
        "attention_mask": attention_mask,
        "labels": labels,
        "dropped": dropped,
    }
    return {k: v.to(device) for k, v in batch.items()}


def t2i_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-image-token cross-entropy from ``generation_head`` (teacher forcing)."""
    janus = _janus(model)
    text = janus.get_input_embeddings()(batch["input_ids"])  # (B, L, H)
    image = janus.prepare_embeddings_for_image_generation(batch["image_tokens"])  # (B, N, H)
    embeds = torch.cat([text, image.to(text.dtype)], dim=1)  # (B, L+N, H)
    hidden = janus.model.language_model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]  # (B, L+N-1): position t predicts token t+1
    keep = labels != IGNORE  # only image-token targets
    logits = janus.model.generation_head(hidden[:, :-1][keep])  # (B*N, K)
    return F.cross_entropy(logits.float(), labels[keep])


def train_t2i(
    model: torch.nn.Module,
    processor: JanusProcessor,
    captions: Sequence[str],
    images: Sequence[Image.Image] | torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    cfg_drop_prob: float = 0.1,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
    params: Sequence[torch.nn.Parameter] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train text-to-image-token prediction (default: :func:`t2i_parameters`); the VQ stays frozen."""
    if steps < 1 or batch_size < 1 or len(captions) != len(images) or not captions:
        raise ValueError("train_t2i needs steps >= 1, batch_size >= 1 and as many captions as images")
    progress = progress or NullProgress()
    janus = _janus(model)
    check_generation_config(janus)
    # (N, h*w) image-token targets, encoded once
    tokens = images if isinstance(images, torch.Tensor) else encode_images(janus, processor, images)
    params = list(params) if params is not None else t2i_parameters(janus)
    flags = {id(p): p.requires_grad for p in params}
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    progress.start("t2i", "text-to-image steps", steps)
    order: list[int] = []
    losses: list[float] = []
    try:
        for step in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(captions), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = t2i_batch(
                janus,
                processor,
                [captions[i] for i in idx],
                tokens[idx],
                cfg_drop_prob=cfg_drop_prob,
                generator=gen,
            )
            loss = t2i_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            progress.update(
                "t2i", step + 1, f"text-to-image (loss {sum(losses[-20:]) / len(losses[-20:]):.3f})"
            )
    finally:
        progress.finish("t2i")
        model.train(was_training)
        for p in params:
            p.requires_grad_(flags[id(p)])
    return {
        "steps": steps,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "first_loss": losses[0],
        "wall_time_s": time.perf_counter() - t0,
    }


# ---- sampling ---------------------------------------------------------------------------------------
class _ConditionalOnly(LogitsProcessor):
    """Keeps the conditional half of HF's doubled batch (guidance scale 1: no guidance)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores[: scores.shape[0] // 2]  # (2B, K) -> (B, K)


@torch.no_grad()
def generate_images(
    model: torch.nn.Module,
    processor: JanusProcessor,
    prompts: Sequence[str],
    *,
    num_images_per_prompt: int = 4,
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[Image.Image]:
    """Sample images with HF's ``generate(generation_mode="image")`` and CFG; prompt-major order, seeded."""
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale must be >= 1, got {guidance_scale}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    janus = _janus(model)
    check_generation_config(janus)
    device = _device(janus)
    bos, boi, pad = _special_ids(processor)
    # the begin-of-image id transformers' image generation masks around: generation_config.json's
    # (``JanusFamily.from_pretrained`` checked it is the tokenizer's), else the tokenizer's
    boi = int((getattr(janus.generation_config, "generation_kwargs", None) or {}).get("boi_token_id", boi))
    enc = processor(text=list(prompts), generation_mode="image", return_tensors="pt", padding=True)
    sample = temperature > 0.0
    config = GenerationConfig(
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=top_k if sample else None,
        guidance_scale=guidance_scale,
        num_return_sequences=num_images_per_prompt,
        bos_token_id=bos,
        pad_token_id=pad,
        eos_token_id=processor.tokenizer.eos_token_id,
        generation_kwargs={"boi_token_id": boi},
    )
    # HF adds its CFG processor only for scale > 1; at scale 1 the doubled batch must still be halved
    processors = LogitsProcessorList([_ConditionalOnly()]) if guidance_scale == 1.0 else None
    was_training = janus.training
    janus.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            tokens = janus.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                generation_config=config,
                logits_processor=processors,
                generation_mode="image",
            )  # (P * n, h*w)
        pixels = janus.decode_image_tokens(tokens).permute(0, 3, 1, 2)  # (P * n, 3, H, W)
    finally:
        janus.train(was_training)
    return tensors_to_pil(processor, pixels)
