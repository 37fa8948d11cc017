"""GenEval of a pretrained model against it with a fine-tuned adapter, over seeds and sampler settings.

Usage: .venv/bin/python benchmarks/geneval_noise.py --adapter runs/demo/global_adapter
           [--family janus|blip3o] [--model DIR] [--per-tag 16] [--seeds 0 1] [--cfg 3 5]
           [--temperature 1.0 0.8]

One GenEval score is a single draw of a sampler. This script scores both models (the pretrained
one exactly as shipped, without alignment tokens, as a run's zero-shot row; and the same model with
the adapter a run saved) on the same built-in prompts for every seed x CFG x temperature, then
reports each setting, the mean over all settings per model and tag, the gain per setting, and per
object class the images judged correct (over all settings) on the prompts that name one class.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from statistics import mean

from fedumm.eval.generation import GenerationEvalSpec, evaluate_generation, flat_metrics, load_prompts
from fedumm.models import load_family
from fedumm.models.base import ModelFamily


def _scores(family: ModelFamily, prompts, settings) -> tuple[list[dict[str, float]], dict[str, str]]:
    out = []
    classes_of = {p.index: {r.cls for r in p.include} for p in prompts}
    by_class: dict[str, list[int]] = {}  # class -> [correct, images], prompts naming one class only
    for seed, cfg, temperature in settings:
        spec = GenerationEvalSpec(seed=seed, guidance_scale=cfg, temperature=temperature)
        result = evaluate_generation(family, prompts, spec=spec)
        metrics = flat_metrics(result)
        out.append({"seed": seed, "cfg": cfg, "temperature": temperature, **metrics})
        for record in result["images"]:
            classes = classes_of[record["index"]]
            if len(classes) == 1:
                tally = by_class.setdefault(next(iter(classes)), [0, 0])
                tally[0] += bool(record["correct"])
                tally[1] += 1
        print(
            f"  seed {seed} cfg {cfg} T {temperature}: overall {metrics['geneval_overall']:.2f}", flush=True
        )
    return out, {cls: f"{c}/{n}" for cls, (c, n) in sorted(by_class.items())}


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in rows[0] if k.startswith("geneval_")]
    return {k: round(mean(r[k] for r in rows), 2) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, required=True, help="a run's global_adapter/ directory")
    ap.add_argument("--family", default="janus", help="model family of the run (janus, blip3o)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the built-in)")
    ap.add_argument("--per-tag", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cfg", type=float, nargs="+", default=[3.0, 5.0])
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0, 0.8])
    args = ap.parse_args()
    t0 = time.perf_counter()
    prompts = load_prompts(None, per_tag=args.per_tag)
    settings = list(itertools.product(args.seeds, args.cfg, args.temperature))
    family = load_family(args.family, args.model)
    print("pretrained (zero-shot)", flush=True)
    with family.pretrained_prompts():
        base, base_classes = _scores(family, prompts, settings)
    family.load_adapter(args.adapter)
    print(f"with {args.adapter}", flush=True)
    tuned, tuned_classes = _scores(family, prompts, settings)
    gains = [t["geneval_overall"] - b["geneval_overall"] for b, t in zip(base, tuned, strict=True)]
    result = {
        "prompts": len(prompts),
        "settings": len(settings),
        "zero_shot": {"mean": _summary(base), "by_class": base_classes, "runs": base},
        "fine_tuned": {"mean": _summary(tuned), "by_class": tuned_classes, "runs": tuned},
        "overall_gain": {
            "mean": round(mean(gains), 2),
            "min": round(min(gains), 2),
            "max": round(max(gains), 2),
            "settings_with_gain": sum(g > 0 for g in gains),
        },
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
