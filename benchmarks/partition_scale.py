"""Time to partition a cross-device population: K clients by Dirichlet answer skew, with a minimum size.

Usage: .venv/bin/python benchmarks/partition_scale.py --data data/paper-world --split private \
           --questions 40000 --clients 10 100 1000 --alpha 0.1 0.5 1.0 --min-size 32 --repeats 3

The questions are drawn with replacement from the split's answer distribution (fresh question ids),
so a population of any size keeps that split's label skew. Each (K, alpha) times `build_partition`
(the Dirichlet draw, the top-up to the minimum size and the partition's validation) and writing the
partition JSON (`save_partition` without its heatmap), best of `--repeats`. Prints one JSON line per
cell and writes them all to `--out` when given.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fedumm.data.partition import build_partition, save_partition
from fedumm.data.vqa import load_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a world in the VQA v2 layout")
    ap.add_argument("--split", default="private")
    ap.add_argument("--questions", type=int, default=40_000, help="population size (questions)")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    ap.add_argument("--min-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for all cells")
    args = ap.parse_args()

    samples = load_split(args.data, args.split, check_images=False)
    pool = [s.multiple_choice_answer for s in samples]
    rng = np.random.default_rng(args.seed)
    answers = [pool[i] for i in rng.integers(len(pool), size=args.questions)]
    qids = list(range(args.questions))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.clients:
            for alpha in args.alpha:
                build_s, save_s = [], []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    part = build_partition(
                        qids, answers, num_clients=k, alpha=alpha, min_size=args.min_size, seed=args.seed + r
                    )
                    t1 = time.perf_counter()
                    save_partition(part, Path(tmp) / f"p{k}.json", heatmap=False)
                    build_s.append(t1 - t0)
                    save_s.append(time.perf_counter() - t1)
                sizes = [len(ids) for ids in part.clients.values()]
                row = {
                    "clients": k,
                    "alpha": alpha,
                    "questions": args.questions,
                    "answers": len(set(answers)),
                    "min_size": args.min_size,
                    "build_s": round(min(build_s), 4),
                    "save_s": round(min(save_s), 4),
                    "smallest": min(sizes),
                    "largest": max(sizes),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
