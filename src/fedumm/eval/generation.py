"""GenEval-style scoring of a model's own generations: sample, detect, judge, summarise, draw a grid.

The prompts are GenEval metadata (the built-in synthetic set or any file in GenEval's format); the
images are sampled with classifier-free guidance under a fixed seed, so two models are compared on
the same random draws; the built-in detector and the official judging rules score them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedumm.data.geneval import GenEvalPrompt, load_metadata
from fedumm.eval.detect import DEFAULT_DETECTOR_CONFIG, DetectorConfig, detect
from fedumm.eval.geneval import evaluate
from fedumm.seeding import derive_seed

log = logging.getLogger(__name__)

__all__ = [
    "GenerationEvalSpec",
    "evaluate_generation",
    "flat_metrics",
    "generate_for_prompts",
    "load_prompts",
]


@dataclass(frozen=True, kw_only=True)
class GenerationEvalSpec:
    images_per_prompt: int = 4
    guidance_scale: float = 3.0
    temperature: float = 1.0
    seed: int = 0
    prompts_per_batch: int = 32
    grid_prompts: int = 12


def load_prompts(metadata: str | Path | None, *, per_tag: int | None, seed: int = 0) -> list[GenEvalPrompt]:
    """GenEval prompts from a metadata file, or the built-in synthetic set (``per_tag`` prompts each)."""
    if metadata is not None:
        prompts = load_metadata(metadata)
        if per_tag is not None:  # the first per_tag prompts of each tag, in file order
            taken: dict[str, int] = {}
            kept = []
            for p in prompts:
                if taken.get(p.tag, 0) < per_tag:
                    kept.append(p)
                    taken[p.tag] = taken.get(p.tag, 0) + 1
            prompts = kept
        return prompts
    from fedumm.data.geneval_prompts import build_prompt_set

    return build_prompt_set(seed=seed, per_tag=per_tag)


def _grid_choice(prompts: Sequence[GenEvalPrompt], n: int) -> list[int]:
    """Positions of up to ``n`` prompts, taken round-robin over the tags."""
    by_tag: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_tag.setdefault(p.tag, []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(n, len(prompts)):
        for positions in by_tag.values():
            if depth < len(positions) and len(chosen) < n:
                chosen.append(positions[depth])
        depth += 1
    return sorted(chosen)


def generate_for_prompts(
    family,
    prompts: Sequence[GenEvalPrompt],
    *,
    spec: GenerationEvalSpec = GenerationEvalSpec(),
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, list]:
    """``images_per_prompt`` images per prompt, ``{prompt index: [PIL images]}``, sampled with the
    family's current adapter in batches of ``prompts_per_batch`` prompts, each batch under its own
    seed derived from ``spec.seed`` (so the draws do not depend on what else is scored)."""
    if not prompts:
        raise ValueError("GenEval needs at least one prompt")
    out: dict[int, list] = {}
    chunks = range(0, len(prompts), spec.prompts_per_batch)
    for b, start in enumerate(chunks):
        chunk = prompts[start : start + spec.prompts_per_batch]
        images = family.generate(
            [p.prompt for p in chunk],
            images_per_prompt=spec.images_per_prompt,
            guidance_scale=spec.guidance_scale,
            temperature=spec.temperature,
            seed=derive_seed(spec.seed, "geneval", rnd=b),
        )
        n = spec.images_per_prompt
        for j, p in enumerate(chunk):
            out[p.index] = images[j * n : (j + 1) * n]
        if progress:
            progress(b + 1, len(chunks))
    return out


def evaluate_generation(
    family,
    prompts: Sequence[GenEvalPrompt],
    *,
    spec: GenerationEvalSpec = GenerationEvalSpec(),
    grid_path: str | Path | None = None,
    grid_title: str = "",
    progress: Callable[[int, int], None] | None = None,
    detector: DetectorConfig = DEFAULT_DETECTOR_CONFIG,
) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images per prompt with the family's current adapter and judge them
    (the built-in detector under ``detector``, the official rules).

    Returns :func:`fedumm.eval.geneval.evaluate`'s result (``images``, ``tags``, ``overall``; scores
    in [0, 1]). With ``grid_path`` an image grid PNG (prompts by samples, frames green when judged
    correct) is written.
    """
    if not prompts:
        raise ValueError("evaluate_generation needs at least one prompt")
    images = generate_for_prompts(family, prompts, spec=spec, progress=progress)
    detections = {index: [detect(img, config=detector) for img in imgs] for index, imgs in images.items()}
    grid_rows = set(_grid_choice(prompts, spec.grid_prompts)) if grid_path else set()
    kept_images = {prompts[i].index: images[prompts[i].index] for i in grid_rows}
    result = evaluate(prompts, detections)
    if grid_path is not None and kept_images:
        from fedumm.plots import plot_image_grid

        verdicts: dict[int, list[bool]] = {}
        for record in result["images"]:
            verdicts.setdefault(record["index"], []).append(bool(record["correct"]))
        by_index = {p.index: p for p in prompts}
        rows = [
            (f"{by_index[i].tag}: {by_index[i].prompt}", kept_images[i], verdicts[i])
            for i in sorted(kept_images)
        ]
        plot_image_grid(grid_path, rows, title=grid_title)
    return result


def flat_metrics(result: dict[str, Any], prefix: str = "geneval") -> dict[str, float]:
    """``{"geneval_overall": ..., "geneval_<tag>": ...}`` in percent, for round records and tables."""
    out = {f"{prefix}_overall": round(100.0 * result["overall"], 2)}
    out.update({f"{prefix}_{tag}": round(100.0 * score, 2) for tag, score in result["tags"].items()})
    return out
