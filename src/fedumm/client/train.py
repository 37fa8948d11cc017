"""Local training and evaluation on one client's data, FL-agnostic (also the centralized baseline)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedumm.errors import ConfigError
from fedumm.eval.vqa import accuracy_from_answers
from fedumm.models.lora_state import adapter_param_map, get_adapter_state, set_adapter_state_
from fedumm.seeding import derive_seed
from fedumm.types import AdapterState, ClientUpdate

log = logging.getLogger(__name__)

__all__ = ["TrainSpec", "TrainResult", "train_local", "evaluate_vqa", "run_client_round", "split_local_val"]

Progress = Callable[[int, int], None]  # (steps done, steps total)


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """Local optimisation settings; a fresh AdamW per call (no optimizer state crosses rounds)."""

    epochs: int = 1
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_batch_size: int = 64


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    loss: float  # mean loss over the last epoch
    steps: int  # optimizer steps
    examples: int  # examples per epoch


def num_steps(n: int, spec: TrainSpec) -> int:
    """Optimizer steps that ``train_local`` takes on ``n`` examples."""
    batches = math.ceil(n / spec.batch_size)
    return spec.epochs * math.ceil(batches / spec.grad_accum)


def train_local(
    family,
    samples: Sequence,
    *,
    spec: TrainSpec,
    seed: int,
    progress: Progress | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """E epochs of AdamW with gradient accumulation over ``samples``, seeded shuffling; trains in place.

    ``proximal_mu`` > 0 adds FedProx's mu/2 * ||w - w_start||^2 over the trainable adapter weights,
    anchored at the weights the call starts from (the global adapter).
    """
    if not samples:
        raise ConfigError("train_local: no training samples")
    model = family.model
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    total = num_steps(len(samples), spec)
    step = 0
    last_epoch_losses: list[float] = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA dropout, if any
        for _ in range(spec.epochs):
            order = torch.randperm(len(samples), generator=gen).tolist()
            batches = [order[i : i + spec.batch_size] for i in range(0, len(order), spec.batch_size)]
            last_epoch_losses = []
            opt.zero_grad(set_to_none=True)
            for b, idx in enumerate(batches):
                batch = family.vqa_batch([samples[i] for i in idx], with_answers=True)
                loss = family.vqa_loss(batch)
                total_loss = loss
                if anchors:
                    prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True))
                    total_loss = loss + 0.5 * proximal_mu * prox
                # scale so that an accumulated step averages over its micro-batches
                group = min(spec.grad_accum, len(batches) - (b // spec.grad_accum) * spec.grad_accum)
                (total_loss / group).backward()
                last_epoch_losses.append(float(loss.detach()))
                if (b + 1) % spec.grad_accum == 0 or b + 1 == len(batches):
                    if spec.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    if progress:
                        progress(step, total)
    model.eval()
    mean_loss = sum(last_epoch_losses) / len(last_epoch_losses)
    return TrainResult(loss=mean_loss, steps=step, examples=len(samples))


def evaluate_vqa(
    family, samples: Sequence, *, batch_size: int = 64, progress: Progress | None = None
) -> float:
    """Official VQA accuracy (percent, 2 decimals) of the current model on ``samples``."""
    if not samples:
        raise ConfigError("evaluate_vqa: no evaluation samples")
    preds: dict[int, str] = {}
    total = math.ceil(len(samples) / batch_size)
    for b, i in enumerate(range(0, len(samples), batch_size)):
        chunk = samples[i : i + batch_size]
        for s, a in zip(chunk, family.vqa_answer(chunk), strict=True):
            preds[s.question_id] = a
        if progress:
            progress(b + 1, total)
    return accuracy_from_answers(preds, samples)


def split_local_val(samples: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded fraction of a client's examples as its local validation set (at least 1)."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=gen).tolist()
    k = max(1, round(len(samples) * fraction))
    val = sorted(order[:k])
    train = sorted(order[k:])
    return [samples[i] for i in train], [samples[i] for i in val]


def run_client_round(
    family,
    *,
    client_id: str,
    global_state: AdapterState,
    train_samples: Sequence,
    val_samples: Sequence,
    spec: TrainSpec,
    base_seed: int,
    rnd: int,
    progress: Progress | None = None,
    proximal_mu: float = 0.0,
    frozen_suffixes: tuple[str, ...] = (),
) -> ClientUpdate:
    """One client's round: load the global adapter, train locally, score on local validation.

    ``proximal_mu`` and ``frozen_suffixes`` come from the strategy (FedProx's term; FFA-LoRA's frozen A).
    """
    set_adapter_state_(family.model, global_state)
    toggled = [
        p
        for k, p in adapter_param_map(family.model).items()
        if frozen_suffixes and k.endswith(frozen_suffixes)
    ]
    toggled = [p for p in toggled if p.requires_grad]
    for p in toggled:
        p.requires_grad_(False)
    try:
        result = train_local(
            family,
            train_samples,
            spec=spec,
            seed=derive_seed(base_seed, "client-train", client_id, rnd),
            progress=progress,
            proximal_mu=proximal_mu,
        )
    finally:
        for p in toggled:
            p.requires_grad_(True)
    metrics: dict[str, float] = {"train_loss": result.loss, "steps": float(result.steps)}
    if val_samples:
        acc = evaluate_vqa(family, val_samples, batch_size=spec.eval_batch_size)
        metrics["val_score"] = acc / 100.0
        metrics["val_vqa_accuracy"] = acc
    return ClientUpdate(
        client_id=client_id,
        state=get_adapter_state(family.model),
        num_examples=len(train_samples),
        metrics=metrics,
        group_examples=None,
    )


def state_delta_norm(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a - b over all keys (diagnostics)."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))
