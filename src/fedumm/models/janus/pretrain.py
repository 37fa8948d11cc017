"""Pretrain the built-in tiny Janus on the synthetic world's public split (full training, from scratch).

Two phases: (1) the VQ image tokenizer learns to reconstruct the public images; (2) understanding
(VQA answers) and generation (caption -> image tokens of the frozen VQ) train jointly on the shared
language model, each step one VQA batch plus one caption batch, so neither task erases the other.

Reproduce the shipped checkpoint with ``fedumm pretrain`` (defaults below); it writes a HF directory
(config, model.safetensors, tokenizer, processor) that :class:`.family.JanusFamily` loads exactly
like a real Janus-Pro checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedumm.data.synth import require_current_world
from fedumm.eval.tasks import evaluate_vqa
from fedumm.io import atomic_write_json
from fedumm.models.janus.tiny import build_processor, build_tiny_janus, build_tokenizer
from fedumm.models.schedules import warmup_cosine
from fedumm.progress import NullProgress, Progress

log = logging.getLogger(__name__)

__all__ = ["PretrainSpec", "pretrain"]


@dataclass(frozen=True, kw_only=True)
class PretrainSpec:
    """Pretraining settings; the defaults reproduce the shipped checkpoint."""

    seed: int = 0
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    max_eval_questions: int = 600
    threads: int | None = None
    vq_steps: int = 1000
    vq_batch_size: int = 32
    vq_lr: float = 2e-3
    t2i_batch_size: int = 32
    t2i_weight: float = 1.0
    cfg_drop_prob: float = 0.1
    max_eval_images: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "vq_batch_size", "t2i_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.vq_steps < 0 or self.t2i_weight < 0:
            raise ValueError("PretrainSpec.vq_steps and t2i_weight must be >= 0")


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    make_family: Callable[..., Any],
    spec: PretrainSpec = PretrainSpec(),
    progress: Progress | None = None,
) -> dict:
    """Train a fresh tiny Janus on the ``public`` split and save it; returns a report (also saved as JSON).

    ``make_family(model=..., processor=...)`` wraps the fresh model in the family class (which calls
    this function: the argument keeps the family module out of this one's imports).
    """
    from fedumm.data.synth import VOCABULARY
    from fedumm.data.vqa import load_split
    from fedumm.models.janus import generation as jg

    progress = progress or NullProgress()
    require_current_world(Path(data_dir))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    train = load_split(data_dir, "public")
    val_private = load_split(data_dir, "val")[: spec.max_eval_questions]
    pairs = jg.caption_pairs(data_dir, "public")
    captions = [c for _, c in pairs]
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(VOCABULARY)
    processor = build_processor(tokenizer)
    model = build_tiny_janus(tokenizer)
    family = make_family(model=model, processor=processor)
    family_images = [family.images.get(path) for path, _ in pairs]  # RGB, one DataError per bad file
    report: dict = {"spec": asdict(spec)}

    # phase 1: the VQ image tokenizer alone
    held_out = family_images[: spec.max_eval_images]
    if spec.vq_steps:
        report["vq"] = jg.train_vq(
            model,
            family_images,
            processor,
            steps=spec.vq_steps,
            batch_size=spec.vq_batch_size,
            lr=spec.vq_lr,
            seed=spec.seed,
            progress=progress,
        )
    report["vq_round_trip"] = jg.vq_eval(model, processor, held_out)
    image_tokens = jg.encode_images(model, processor, family_images)  # (N, h*w), the frozen VQ's codes

    # phase 2: understanding and generation together; the VQ tokenizer stays frozen
    params = [p for n, p in model.named_parameters() if "vqmodel" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_("vqmodel" not in n)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(train) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, spec.warmup_steps))
    gen = torch.Generator().manual_seed(spec.seed)
    t2i_gen = torch.Generator().manual_seed(spec.seed + 1)
    progress.start("pretrain", "pretraining steps", total)
    step = 0
    vqa_losses: list[float] = []
    t2i_losses: list[float] = []
    t2i_order: list[int] = []
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for i in range(0, len(order), spec.batch_size):
            batch = family.vqa_batch([train[j] for j in order[i : i + spec.batch_size]], with_answers=True)
            vqa = family.vqa_loss(batch)
            loss = vqa
            if spec.t2i_weight > 0:
                if len(t2i_order) < spec.t2i_batch_size:
                    t2i_order += torch.randperm(len(captions), generator=t2i_gen).tolist()
                idx, t2i_order = t2i_order[: spec.t2i_batch_size], t2i_order[spec.t2i_batch_size :]
                t2i_batch = jg.t2i_batch(
                    model,
                    processor,
                    [captions[j] for j in idx],
                    image_tokens[idx],
                    cfg_drop_prob=spec.cfg_drop_prob,
                    generator=t2i_gen,
                )
                t2i = jg.t2i_loss(model, t2i_batch)
                loss = vqa + spec.t2i_weight * t2i
                t2i_losses.append(float(t2i.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            vqa_losses.append(float(vqa.detach()))
            progress.update(
                "pretrain",
                step,
                f"pretraining (VQA loss {_tail(vqa_losses):.3f}, image-token loss {_tail(t2i_losses):.3f})",
            )
    progress.finish("pretrain")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    public_eval = load_split(data_dir, "public")[: spec.max_eval_questions]
    report.update(
        {
            "steps": step,
            "final_loss": _tail(vqa_losses),
            "final_t2i_loss": _tail(t2i_losses),
            "public_train_vqa_accuracy": evaluate_vqa(family, public_eval),
            "private_val_vqa_accuracy": evaluate_vqa(family, val_private),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "wall_time_s": time.perf_counter() - t0,
            "torch_threads": torch.get_num_threads(),
        }
    )
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    atomic_write_json(tmp / "pretrain_report.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("saved %s", out)
    return report


def _tail(values: list[float], n: int = 50) -> float:
    return sum(values[-n:]) / len(values[-n:]) if values else float("nan")
