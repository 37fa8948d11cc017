"""What GenEval can reach with a model's image tokenizer: ground truth, VQ round trip, own samples.

Usage: .venv/bin/python benchmarks/geneval_ceiling.py [--model DIR] [--per-tag 16] [--renders 2]

For each built-in GenEval prompt, ground-truth scenes are rendered (the detector's own check: these
must score 100 %), passed through the model's VQ tokenizer (encode then decode: the best any
generator working in that token space could draw, so the ceiling of its GenEval) and compared with
the model's own samples (CFG 3, 4 per prompt). All three are scored by the built-in detector and the
official GenEval rules.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedumm.data.geneval_prompts import build_prompt_set, render_prompt
from fedumm.data.render import render_scene
from fedumm.eval.detect import detect
from fedumm.eval.generation import GenerationEvalSpec, evaluate_generation, flat_metrics
from fedumm.eval.geneval import evaluate
from fedumm.models.janus.family import JanusFamily
from fedumm.models.janus.generation import reconstruct, vq_eval


def _score(prompts, owners, images) -> dict[str, float]:
    detections: dict[int, list] = {}
    for index, image in zip(owners, images, strict=True):
        detections.setdefault(index, []).append(detect(image))
    return flat_metrics(evaluate(prompts, detections))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="HF Janus dir (default: built-in)")
    ap.add_argument("--per-tag", type=int, default=16)
    ap.add_argument("--renders", type=int, default=2, help="ground-truth renders per prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    family = JanusFamily.from_pretrained(args.model)
    prompts = build_prompt_set(per_tag=args.per_tag)
    rng = np.random.default_rng(args.seed)
    truth, owners = [], []
    for p in prompts:
        for _ in range(args.renders):
            scene = render_prompt(p, rng)
            if scene is not None:
                truth.append(render_scene(scene))
                owners.append(p.index)
    round_trip = reconstruct(family.base, family.processor, truth)
    own = evaluate_generation(family, prompts, spec=GenerationEvalSpec(seed=args.seed))
    result = {
        "prompts": len(prompts),
        "ground_truth": _score(prompts, owners, truth),
        "vq_round_trip": _score(prompts, owners, round_trip),
        "vq_round_trip_quality": vq_eval(family.base, family.processor, truth),
        "model_samples": flat_metrics(own),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
