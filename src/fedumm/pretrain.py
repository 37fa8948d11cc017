"""Pretrain the built-in tiny Janus on the synthetic world's public split (full training, from scratch).

Reproduce the shipped checkpoint with ``fedumm pretrain`` (defaults below); it writes a HF directory
(config, model.safetensors, tokenizer, processor) that ``JanusFamily.from_pretrained`` loads exactly
like a real Janus-Pro checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedumm.client.train import evaluate_vqa
from fedumm.io import atomic_write_json
from fedumm.models.janus import BUILTIN_PATH, JanusFamily
from fedumm.models.janus_tiny import build_processor, build_tiny_janus, build_tokenizer
from fedumm.progress import NullProgress, Progress

log = logging.getLogger(__name__)

__all__ = ["PretrainSpec", "pretrain"]


@dataclass(frozen=True, kw_only=True)
class PretrainSpec:
    """Pretraining settings; the defaults reproduce the shipped checkpoint."""

    seed: int = 0
    epochs: int = 16
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    max_eval_questions: int = 600
    threads: int | None = None


def _lr_lambda(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path = BUILTIN_PATH,
    *,
    spec: PretrainSpec = PretrainSpec(),
    progress: Progress | None = None,
) -> dict:
    """Train a fresh tiny Janus on ``public`` VQA and save it; returns a report (also saved as JSON)."""
    from fedumm.data.synth import VOCABULARY
    from fedumm.data.vqa import load_split

    progress = progress or NullProgress()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    t0 = time.perf_counter()
    train = load_split(data_dir, "public")
    val_private = load_split(data_dir, "val")[: spec.max_eval_questions]
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(VOCABULARY)
    processor = build_processor(tokenizer)
    model = build_tiny_janus(tokenizer)
    family = JanusFamily(model=model, processor=processor)
    # the VQ tokenizer and generation parts are not used by understanding; train the rest
    params = [p for n, p in model.named_parameters() if "vqmodel" not in n and "generation_" not in n]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(train) / spec.batch_size)
    total = spec.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_lambda(s, total, spec.warmup_steps))
    gen = torch.Generator().manual_seed(spec.seed)
    progress.start("pretrain", "pretraining steps", total)
    step = 0
    losses: list[float] = []
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(len(train), generator=gen).tolist()
        for i in range(0, len(order), spec.batch_size):
            batch = family.vqa_batch([train[j] for j in order[i : i + spec.batch_size]], with_answers=True)
            loss = family.vqa_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            progress.update(
                "pretrain", step, f"pretraining (loss {sum(losses[-50:]) / len(losses[-50:]):.3f})"
            )
    progress.finish("pretrain")
    model.eval()
    public_eval = load_split(data_dir, "public")[: spec.max_eval_questions]
    report = {
        "spec": asdict(spec),
        "steps": step,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "public_train_vqa_accuracy": evaluate_vqa(family, public_eval),
        "private_val_vqa_accuracy": evaluate_vqa(family, val_private),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "wall_time_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }
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
