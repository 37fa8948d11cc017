"""Scores of a model family's current adapter on the two tasks: VQA accuracy and caption loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fedumm.errors import ConfigError
from fedumm.eval.vqa import accuracy_from_answers

__all__ = ["evaluate_vqa", "evaluate_captions", "vqa_predictions"]

Progress = Callable[[int, int], None]  # (batches done, batches total)


@torch.no_grad()
def evaluate_captions(family, samples: Sequence, *, batch_size: int = 64, seed: int = 0) -> float:
    """Mean generation loss of the current model on caption examples (no caption dropout).

    The loss is the family's own (Janus: image-token cross-entropy; BLIP3o: flow-matching MSE, its
    noise drawn from ``seed`` so that two models are scored on the same draws).
    """
    if not samples:
        raise ConfigError("evaluate_captions: no evaluation samples")
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    net = family.net()
    was_training = net.training
    net.eval()
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            batch = family.caption_batch(chunk, generator=gen, cfg_drop_prob=0.0)
            total += float(family.caption_loss(batch)) * len(chunk)
            count += len(chunk)
    finally:
        net.train(was_training)
    return total / count


def vqa_predictions(
    family, samples: Sequence, *, batch_size: int = 64, progress: Progress | None = None
) -> dict[int, str]:
    """The current model's answer to every sample (question id -> answer)."""
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
    return preds


def evaluate_vqa(
    family, samples: Sequence, *, batch_size: int = 64, progress: Progress | None = None
) -> float:
    """Official VQA accuracy (percent, 2 decimals) of the current model on ``samples``."""
    preds = vqa_predictions(family, samples, batch_size=batch_size, progress=progress)
    return accuracy_from_answers(preds, samples)
