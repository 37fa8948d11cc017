"""Pretrain the built-in tiny BLIP3o on the synthetic world's public split, from scratch, in steps.

Phase 1, the target encoder: a tiny SigLIP (transformers ``SiglipModel``, sigmoid image-text loss)
learns the public images against their texts (captions and the question-answer pairs asked about
them), while the pixel decoder learns to reconstruct each image from the encoder's 8x8 feature
grid; its reconstruction loss also reaches the encoder, so the features keep layout and size as
well as the semantic attributes (colour, shape) that the contrastive texts name. BLIP3o's targets
are semantic CLIP features for the same reason: a plain autoencoder's features leave shape
entangled with position, and the DiT then draws colours but not shapes.

Phase 2, the decoder alone on the now frozen features (sharper pixels).

Phase 3, understanding and generation together: each step one caption batch (language model, latent
queries and DiT learn flow matching on the frozen features) and, every ``vqa_every`` steps, one VQA
batch (the whole Qwen2.5-VL trains): the generator needs more steps than understanding. The public
captions never name a shape, so the generator learns colours, sizes and layouts but not shapes: that
is what the clients' private captions teach.

Gates: the reconstruction must keep an object's shape and colour (the ceiling of any generator in
this feature space) and the generator must draw the colour a public-style prompt asks for on a large
object (small objects are scored and reported, not gated). A run
that misses a gate saves its checkpoint beside the target, never over it, and fails.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedumm.data.synth import require_current_world
from fedumm.errors import DataError
from fedumm.eval.tasks import evaluate_vqa
from fedumm.io import atomic_write_json
from fedumm.models.blip3o import generation as G
from fedumm.models.blip3o.model import Blip3oModel
from fedumm.models.schedules import warmup_cosine
from fedumm.progress import NullProgress, Progress

log = logging.getLogger(__name__)

__all__ = ["PretrainSpec", "pretrain", "gate_scores"]

TEXT_LENGTH = 24  # SigLIP texts are padded to a fixed length (its pooled output is the last token)


@dataclass(frozen=True, kw_only=True)
class PretrainSpec:
    """Pretraining settings, budgeted in steps; the defaults reproduce the shipped checkpoint."""

    seed: int = 0
    threads: int | None = None
    # phase 1: target encoder (contrastive + reconstruction) with the pixel decoder
    encoder_steps: int = 800
    encoder_batch_size: int = 32
    encoder_lr: float = 2e-3
    recon_weight: float = 1.0
    # phase 2: the decoder alone on the frozen features
    decoder_steps: int = 300
    # phase 3: understanding and generation jointly
    joint_steps: int = 3000
    vqa_every: int = 2  # a VQA batch every this many steps (every step has a caption batch)
    batch_size: int = 32
    t2i_batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    t2i_weight: float = 1.0
    cfg_drop_prob: float = 0.1
    # evaluation and gates
    max_eval_questions: int = 600
    gate_images: int = 96
    gate_guidance: float = 3.0
    min_round_trip_shape: float = 0.8
    min_round_trip_colour: float = 0.8
    # the generator gate asks for the prompted colour on large objects only: small ones (radius 6 px,
    # one or two cells of the 8x8 feature grid) are reported beside it, not gated, because the tiny
    # DiT draws them only part of the time (docs/BENCHMARKS.md, "BLIP3o pretraining")
    min_generated_colour_large: float = 0.8

    def __post_init__(self) -> None:
        for name in ("encoder_batch_size", "batch_size", "t2i_batch_size", "gate_images", "vqa_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSpec.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_steps", "decoder_steps", "joint_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainSpec.{name} must be >= 0, got {getattr(self, name)}")


def _siglip(model: Blip3oModel, vocab_size: int, pad_id: int):
    """A SiglipModel whose vision tower *is* the model's target encoder (trained in place)."""
    from transformers import SiglipConfig, SiglipModel

    vision = model.config.target_encoder
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": TEXT_LENGTH,
        "projection_size": vision["hidden_size"],
        "pad_token_id": pad_id,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    siglip.vision_model = model.target_encoder
    return siglip


def _texts_per_image(data_dir: Path) -> dict[Path, list[str]]:
    """Public texts about each public image: its captions and 'question answer' for its questions."""
    from fedumm.data.captions import load_captions
    from fedumm.data.vqa import load_split

    texts: dict[Path, list[str]] = {}
    for c in load_captions(data_dir, "public"):
        texts.setdefault(Path(c.image_path), []).append(c.caption)
    for q in load_split(data_dir, "public"):
        texts.setdefault(Path(q.image_path), []).append(f"{q.question} {q.multiple_choice_answer}")
    return texts


def _train_encoder(family, data_dir: Path, spec: PretrainSpec, progress: Progress) -> dict[str, float | int]:
    """Phase 1 (and 2): SigLIP contrastive + reconstruction, then the decoder alone."""
    model, tok = family.base, family.tokenizer
    texts = _texts_per_image(data_dir)
    paths = sorted(texts)
    pixels = G.pixels_from_images([family.images.get(p) for p in paths])  # (N, 3, 64, 64)
    siglip = _siglip(model, len(tok), tok.pad_token_id)
    enc_params = list(siglip.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.AdamW(enc_params, lr=spec.encoder_lr, weight_decay=spec.weight_decay)
    total = spec.encoder_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total, min(100, total // 10 + 1))
    )
    rng = random.Random(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    order: list[int] = []
    c_losses, r_losses = [], []
    siglip.train()
    model.decoder.train()
    progress.start("encoder", "target encoder (SigLIP) + decoder", total)
    for step in range(total):
        if len(order) < spec.encoder_batch_size:
            order += torch.randperm(len(paths), generator=gen).tolist()
        idx, order = order[: spec.encoder_batch_size], order[spec.encoder_batch_size :]
        batch_text = [rng.choice(texts[paths[i]]) for i in idx]
        enc = tok(
            batch_text, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        )
        px = pixels[idx]
        out = siglip(input_ids=enc["input_ids"], pixel_values=px, return_loss=True)
        grid = out.vision_model_output.last_hidden_state  # (B, 64, C)
        b, n, c = grid.shape
        side = int(n**0.5)
        recon = model.decoder(grid.transpose(1, 2).reshape(b, c, side, side))
        r_loss = F.mse_loss(recon, px)
        loss = out.loss + spec.recon_weight * r_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc_params, 1.0)
        opt.step()
        sched.step()
        c_losses.append(float(out.loss.detach()))
        r_losses.append(float(r_loss.detach()))
        progress.update(
            "encoder", step + 1, f"target encoder (SigLIP {_tail(c_losses):.3f}, recon {_tail(r_losses):.4f})"
        )
    progress.finish("encoder")

    # feature statistics on the public images, then the decoder alone on the frozen features
    model.target_encoder.eval()
    for p in model.target_encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        raw = torch.cat(
            [
                model.target_encoder(pixel_values=pixels[i : i + 256]).last_hidden_state
                for i in range(0, len(paths), 256)
            ]
        )  # (N, 64, C)
        flat = raw.reshape(-1, raw.shape[-1])
        model.set_feature_stats(flat.mean(0), flat.std(0).clamp(min=1e-4))
    dec_opt = torch.optim.AdamW(model.decoder.parameters(), lr=spec.encoder_lr / 2)
    d_losses = []
    progress.start("decoder", "pixel decoder", spec.decoder_steps)
    side = int(raw.shape[1] ** 0.5)
    grids = raw.transpose(1, 2).reshape(raw.shape[0], raw.shape[2], side, side)
    for step in range(spec.decoder_steps):
        if len(order) < spec.encoder_batch_size:
            order += torch.randperm(len(paths), generator=gen).tolist()
        idx, order = order[: spec.encoder_batch_size], order[spec.encoder_batch_size :]
        loss = F.mse_loss(model.decoder(grids[idx]), pixels[idx])
        dec_opt.zero_grad(set_to_none=True)
        loss.backward()
        dec_opt.step()
        d_losses.append(float(loss.detach()))
        progress.update("decoder", step + 1, f"pixel decoder (MSE {_tail(d_losses):.4f})")
    progress.finish("decoder")
    model.decoder.eval()
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    return {
        "steps": total,
        "final_contrastive_loss": _tail(c_losses),
        "final_reconstruction_mse": _tail(r_losses),
        "decoder_steps": spec.decoder_steps,
        "final_decoder_mse": _tail(d_losses),
        "images": len(paths),
    }


def _train_joint(family, data_dir: Path, spec: PretrainSpec, progress: Progress) -> dict:
    """Phase 3: VQA on the whole Qwen2.5-VL plus flow matching on LM, latent queries and DiT."""
    from fedumm.data.captions import load_captions
    from fedumm.data.vqa import load_split

    model = family.base
    train = load_split(data_dir, "public")
    captions = load_captions(data_dir, "public")
    trainable = [
        p for name, p in model.named_parameters() if not name.startswith(("target_encoder.", "decoder."))
    ]
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("target_encoder.", "decoder.")))
    opt = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
    total = spec.joint_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, spec.warmup_steps))
    gen = torch.Generator().manual_seed(spec.seed + 1)
    t2i_gen = torch.Generator().manual_seed(spec.seed + 2)
    vqa_order: list[int] = []
    cap_order: list[int] = []
    vqa_losses, flow_losses = [], []
    model.train()
    model.target_encoder.eval()
    model.decoder.eval()
    progress.start("pretrain", "understanding + generation", total)
    for step in range(total):
        loss = torch.zeros(())
        if step % spec.vqa_every == 0:
            if len(vqa_order) < spec.batch_size:
                vqa_order += torch.randperm(len(train), generator=gen).tolist()
            idx, vqa_order = vqa_order[: spec.batch_size], vqa_order[spec.batch_size :]
            vqa = family.vqa_loss(family.vqa_batch([train[i] for i in idx], with_answers=True))
            loss = loss + vqa
            vqa_losses.append(float(vqa.detach()))
        if spec.t2i_weight > 0:
            if len(cap_order) < spec.t2i_batch_size:
                cap_order += torch.randperm(len(captions), generator=t2i_gen).tolist()
            cidx, cap_order = cap_order[: spec.t2i_batch_size], cap_order[spec.t2i_batch_size :]
            batch = family.caption_batch(
                [captions[i] for i in cidx], generator=t2i_gen, cfg_drop_prob=spec.cfg_drop_prob
            )
            flow = family.caption_loss(batch)
            loss = loss + spec.t2i_weight * flow
            flow_losses.append(float(flow.detach()))
        if loss.requires_grad:  # a step with neither task (t2i_weight 0 between VQA steps) is skipped
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
        sched.step()
        progress.update(
            "pretrain",
            step + 1,
            f"understanding + generation (VQA {_tail(vqa_losses):.3f}, flow {_tail(flow_losses):.3f})",
        )
    progress.finish("pretrain")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": total, "final_vqa_loss": _tail(vqa_losses), "final_flow_loss": _tail(flow_losses)}


def gate_scores(family, *, images: int, guidance: float, seed: int = 0) -> dict[str, float]:
    """Shape and colour scores of reconstructions and of the generator, by the built-in detector.

    - ``round_trip_shape`` / ``round_trip_colour``: one-object renders, encoded and decoded; the
      fraction where the detector finds an object of the drawn shape / colour;
    - ``generated_colour``: public-style prompts ("a large red shape.", "a small red shape.")
      sampled once each; the fraction with an object of the asked colour, also split by the asked
      size (``generated_colour_large`` / ``generated_colour_small``);
    - ``generated_shape``: prompts naming colour and shape ("a red circle"); the fraction with an
      object of both. The public captions never name shapes, so this one is at chance before
      fine-tuning, by design (reported, not gated).
    """
    from fedumm.data.render import COLOURS, SHAPES, SIZES, sample_scene
    from fedumm.eval.detect import detect

    rng = np.random.default_rng(seed)
    model = family.base
    scenes = [sample_scene(rng, n_objects=1) for _ in range(images)]
    truth = [s.objects[0] for s in scenes]
    from fedumm.data.render import render_scene

    with torch.no_grad():
        pixels = G.pixels_from_images([render_scene(s) for s in scenes])
        recon = G.images_from_pixels(model.decode_features(model.encode_features(pixels)))
    found = [detect(img) for img in recon]
    shape_ok = [any(d.cls == o.shape for d in ds) for o, ds in zip(truth, found, strict=True)]
    colour_ok = [any(d.color == o.colour for d in ds) for o, ds in zip(truth, found, strict=True)]

    colours, sizes = list(COLOURS), list(SIZES)
    # sizes alternate, so that every gate with two images or more sees both
    asks = [(colours[(i // len(sizes)) % len(colours)], sizes[i % len(sizes)]) for i in range(images)]
    public_style = [f"a {size} {colour} shape." for colour, size in asks]
    gen_colour = family.generate(public_style, images_per_prompt=1, guidance_scale=guidance, seed=seed)
    colour_hits = [
        any(d.color == c for d in detect(img)) for (c, _), img in zip(asks, gen_colour, strict=True)
    ]
    by_size = {
        size: [hit for (_, s), hit in zip(asks, colour_hits, strict=True) if s == size] for size in sizes
    }
    named = [(colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]) for i in range(images)]
    gen_shape = family.generate(
        [f"a {c} {s}" for c, s in named], images_per_prompt=1, guidance_scale=guidance, seed=seed + 1
    )
    shape_hits = [
        any(d.color == c and d.cls == s for d in detect(img))
        for (c, s), img in zip(named, gen_shape, strict=True)
    ]
    return {
        "round_trip_shape": float(np.mean(shape_ok)),
        "round_trip_colour": float(np.mean(colour_ok)),
        "round_trip_psnr_db": _psnr(pixels, G.pixels_from_images(recon)),
        "generated_colour": float(np.mean(colour_hits)),
        **{f"generated_colour_{size}": float(np.mean(hits)) for size, hits in by_size.items() if hits},
        "generated_shape": float(np.mean(shape_hits)),
        "images": images,
    }


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) / 2).pow(2).mean())  # images in [-1, 1]: the [0, 1] range's MSE
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def pretrain(
    family,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    spec: PretrainSpec = PretrainSpec(),
    progress: Progress | None = None,
) -> dict:
    """Train ``family`` (a freshly built tiny BLIP3o) on the ``public`` split and save it; returns the
    report (also saved beside the weights).

    When a gate fails the checkpoint goes to ``<out_dir>.failed-gates`` (the target is left as it
    was) and DataError names the gate.
    """
    from fedumm.data.vqa import load_split

    progress = progress or NullProgress()
    data_dir = Path(data_dir)
    require_current_world(data_dir)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    model: Blip3oModel = family.base
    report: dict = {"spec": asdict(spec)}

    t1 = time.perf_counter()
    report["encoder"] = _train_encoder(family, data_dir, spec, progress) | {
        "wall_time_s": time.perf_counter() - t1
    }
    t1 = time.perf_counter()
    report["joint"] = _train_joint(family, data_dir, spec, progress) | {
        "wall_time_s": time.perf_counter() - t1
    }

    progress.start("gates", "evaluating", 1)
    public_eval = load_split(data_dir, "public")[: spec.max_eval_questions]
    val_private = load_split(data_dir, "val")[: spec.max_eval_questions]
    report["public_train_vqa_accuracy"] = evaluate_vqa(family, public_eval)
    report["private_val_vqa_accuracy"] = evaluate_vqa(family, val_private)
    report["gates"] = gate_scores(
        family, images=spec.gate_images, guidance=spec.gate_guidance, seed=spec.seed
    )
    progress.finish("gates")
    failed = [
        f"{name} {report['gates'][name]:.3f} < {limit}"
        for name, limit in (
            ("round_trip_shape", spec.min_round_trip_shape),
            ("round_trip_colour", spec.min_round_trip_colour),
            ("generated_colour_large", spec.min_generated_colour_large),
        )
        if report["gates"][name] < limit
    ]
    report["gates_passed"] = not failed
    report["num_parameters"] = sum(p.numel() for p in model.parameters())
    report["wall_time_s"] = time.perf_counter() - t0
    report["torch_threads"] = torch.get_num_threads()

    out = Path(out_dir)
    target = out if not failed else out.with_name(out.name + ".failed-gates")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    family.save_pretrained(tmp)
    atomic_write_json(tmp / "pretrain_report.json", report)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("saved %s", target)
    if failed:
        raise DataError(
            f"BLIP3o pretraining missed its gates ({'; '.join(failed)}); checkpoint kept in {target}"
        )
    return report


def _tail(values: list[float], n: int = 50) -> float:
    return sum(values[-n:]) / len(values[-n:]) if values else float("nan")
