"""Local training and evaluation on one client's data, FL-agnostic (also the centralized baseline)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedumm.errors import ConfigError
from fedumm.eval.tasks import evaluate_captions, evaluate_vqa
from fedumm.models.lora_state import adapter_param_map, get_adapter_state, set_adapter_state_
from fedumm.seeding import derive_seed
from fedumm.types import AdapterState, ClientUpdate

log = logging.getLogger(__name__)

__all__ = [
    "ClientData",
    "TrainSpec",
    "TrainResult",
    "epoch_batches",
    "run_client_round",
    "split_local_val",
    "train_local",
]

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
    caption_loss: float | None = None  # mean text-to-image loss over the last epoch


@dataclass(frozen=True, kw_only=True)
class ClientData:
    """One client's local data: VQA (understanding) and caption (generation) examples, train and val."""

    train: Sequence = ()
    val: Sequence = ()
    gen_train: Sequence = ()
    gen_val: Sequence = ()

    @property
    def num_examples(self) -> int:
        return len(self.train) + len(self.gen_train)

    def task_examples(self) -> dict[str, int]:
        """Training examples per task (the family turns them into per-group weights)."""
        return {"understanding": len(self.train), "generation": len(self.gen_train)}


def num_steps(n: int, spec: TrainSpec, n_gen: int = 0) -> int:
    """Optimizer steps that ``train_local`` takes on ``n`` VQA and ``n_gen`` caption examples."""
    batches = math.ceil(n / spec.batch_size) + math.ceil(n_gen / spec.batch_size)
    return spec.epochs * math.ceil(batches / spec.grad_accum)


def epoch_batches(
    n: int, n_gen: int, spec: TrainSpec, gen: torch.Generator, gen_gen: torch.Generator
) -> list[tuple[str, list[int]]]:
    """One epoch's batches: ('vqa' | 'caption', indices), task order shuffled when both are present."""
    batches: list[tuple[str, list[int]]] = []
    if n:
        order = torch.randperm(n, generator=gen).tolist()
        batches += [("vqa", order[i : i + spec.batch_size]) for i in range(0, n, spec.batch_size)]
    if n_gen:
        order = torch.randperm(n_gen, generator=gen_gen).tolist()
        caption = [("caption", order[i : i + spec.batch_size]) for i in range(0, n_gen, spec.batch_size)]
        if batches:
            mixed = batches + caption
            batches = [mixed[i] for i in torch.randperm(len(mixed), generator=gen_gen).tolist()]
        else:
            batches = caption
    return batches


def train_local(
    family,
    samples: Sequence,
    *,
    spec: TrainSpec,
    seed: int,
    progress: Progress | None = None,
    proximal_mu: float = 0.0,
    gen_samples: Sequence = (),
    cfg_drop_prob: float = 0.1,
    on_epoch: Callable[[int], None] | None = None,
) -> TrainResult:
    """E epochs of AdamW with gradient accumulation over ``samples``, seeded shuffling; trains in place.

    ``gen_samples`` (caption examples) add text-to-image batches, shuffled in among the VQA batches;
    each optimizer step sees one task. ``proximal_mu`` > 0 adds FedProx's mu/2 * ||w - w_start||^2
    over the trainable adapter weights, anchored at the weights the call starts from (the global
    adapter). ``on_epoch(n)`` runs after the n-th epoch's last step (e.g. to score the model so far)
    under its own RNG state and leaves training exactly as it found it: the epochs after it are the
    same as without the call.
    """
    if not samples and not gen_samples:
        raise ConfigError("train_local: no training samples")
    model = family.model
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    gen_gen = torch.Generator().manual_seed(derive_seed(seed, "captions"))
    total = num_steps(len(samples), spec, len(gen_samples))
    step = 0
    last_epoch_losses: dict[str, list[float]] = {}
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA dropout, if any
        for epoch in range(spec.epochs):
            batches = epoch_batches(len(samples), len(gen_samples), spec, gen, gen_gen)
            last_epoch_losses = {"vqa": [], "caption": []}
            opt.zero_grad(set_to_none=True)
            for b, (task, idx) in enumerate(batches):
                if task == "vqa":
                    batch = family.vqa_batch([samples[i] for i in idx], with_answers=True)
                    loss = family.vqa_loss(batch)
                else:
                    batch = family.caption_batch(
                        [gen_samples[i] for i in idx], generator=gen_gen, cfg_drop_prob=cfg_drop_prob
                    )
                    loss = family.caption_loss(batch)
                total_loss = loss
                if anchors:
                    prox = sum((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True))
                    total_loss = loss + 0.5 * proximal_mu * prox
                # scale so that an accumulated step averages over its micro-batches
                group = min(spec.grad_accum, len(batches) - (b // spec.grad_accum) * spec.grad_accum)
                (total_loss / group).backward()
                last_epoch_losses[task].append(float(loss.detach()))
                if (b + 1) % spec.grad_accum == 0 or b + 1 == len(batches):
                    if spec.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    if progress:
                        progress(step, total)
            if on_epoch is not None:
                with torch.random.fork_rng(devices=[]):
                    on_epoch(epoch + 1)
                model.train()
    model.eval()
    everything = last_epoch_losses["vqa"] + last_epoch_losses["caption"]
    caption = last_epoch_losses["caption"]
    return TrainResult(
        loss=sum(everything) / len(everything),
        steps=step,
        examples=len(samples) + len(gen_samples),
        caption_loss=sum(caption) / len(caption) if caption else None,
    )


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
    data: ClientData,
    spec: TrainSpec,
    base_seed: int,
    rnd: int,
    progress: Progress | None = None,
    proximal_mu: float = 0.0,
    frozen_suffixes: tuple[str, ...] = (),
) -> ClientUpdate:
    """One client's round: load the global adapter, train locally, score on local validation.

    ``proximal_mu`` and ``frozen_suffixes`` come from the strategy (FedProx's term; FFA-LoRA's frozen A).
    Metrics: ``val_vqa_accuracy`` and ``val_caption_loss`` where the client has such validation
    data; quality scores ``val_score_vision`` (VQA accuracy / 100), ``val_score_generation``
    (exp(-caption loss), the mean per-token likelihood) and ``val_score`` (the first of the two).
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
            data.train,
            spec=spec,
            seed=derive_seed(base_seed, "client-train", client_id, rnd),
            progress=progress,
            proximal_mu=proximal_mu,
            gen_samples=data.gen_train,
        )
    finally:
        for p in toggled:
            p.requires_grad_(True)
    metrics: dict[str, float] = {"train_loss": result.loss, "steps": float(result.steps)}
    if result.caption_loss is not None:
        metrics["train_caption_loss"] = result.caption_loss
    if data.val:
        acc = evaluate_vqa(family, data.val, batch_size=spec.eval_batch_size)
        metrics["val_score_vision"] = acc / 100.0
        metrics["val_vqa_accuracy"] = acc
    if data.gen_val:
        loss = evaluate_captions(family, data.gen_val, batch_size=spec.eval_batch_size)
        metrics["val_caption_loss"] = loss
        metrics["val_score_generation"] = math.exp(-loss)
    for key in ("val_score_vision", "val_score_generation"):
        if key in metrics:
            metrics["val_score"] = metrics[key]
            break
    return ClientUpdate(
        client_id=client_id,
        state=get_adapter_state(family.model),
        num_examples=data.num_examples,
        metrics=metrics,
        group_examples=family.info.group_examples(data.task_examples()),
    )


def state_delta_norm(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a - b over all keys (diagnostics)."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))
