"""Model-adapter protocol and LoRA wiring shared by every model family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedumm.registry import Registry

__all__ = ["LoraSpec", "ModelAdapter", "MODELS", "attach_lora"]


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """LoRA hyperparameters (paper defaults r=16, alpha=32) and which towers to adapt."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    groups: tuple[str, ...] = ("language",)  # towers: vision, language, generation
    target_modules: tuple[str, ...] = ()  # empty: each tower's default modules


def attach_lora(
    model: torch.nn.Module,
    *,
    spec: LoraSpec,
    target: str,
    seed: int,
    trainable_tokens: dict[str, list[int]] | None = None,
) -> PeftModel:
    """Wrap ``model`` with peft LoRA; the backbone is frozen, only adapter weights train.

    ``trainable_tokens`` (module name -> token ids) also trains those rows of an embedding through
    peft's trainable-token adapter (the shared alignment tokens).
    """
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target,
        bias="none",
        trainable_token_indices=trainable_tokens or None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial A matrices are the same on every client and server
        peft_model = get_peft_model(model, config)
    return peft_model


class ModelAdapter(Protocol):
    """What the training loop needs from a model family (the Janus family implements it)."""

    model: PeftModel

    def vqa_batch(self, samples: Sequence[Any], *, with_answers: bool) -> dict[str, torch.Tensor]: ...

    def vqa_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def vqa_answer(self, samples: Sequence[Any]) -> list[str]: ...


MODELS: Registry[Any] = Registry("model family")
