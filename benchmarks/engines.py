"""Engine overhead: start-up, per-round wall time and peak memory of in-process vs FLARE engines.

Usage (from the repository root):
    .venv/bin/python benchmarks/engines.py configs/demo.yaml --engines inprocess nvflare-sim nvflare-poc \
        --rounds 3 --out runs/bench-engines

Each engine runs the same config (baselines off) in its own subprocess so that peak memory is per
engine; the peak over the whole process tree (FLARE starts several processes) is sampled with psutil,
as RSS and as PSS (see memory_vs_clients.py). ``--set`` passes overrides, e.g. federation.clients=16.
Prints a markdown table and writes results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memory_vs_clients import peak_tree_memory

from fedumm.summary import RunSummary


def run_engine(config: Path, engine: str, rounds: int, out: Path, sets: list[str]) -> dict:
    run_dir = out / engine
    cmd = [
        sys.executable,
        "-m",
        "fedumm.cli",
        "run",
        str(config),
        "--out",
        str(run_dir),
        "--overwrite",
        "--set",
        f"engine={engine}",
        "--set",
        f"federation.rounds={rounds}",
        "--set",
        "baselines.zero_shot=false",
        "--set",
        "baselines.centralized=false",
    ]
    cmd += [x for item in sets for x in ("--set", item)]
    peak, pss, wall = peak_tree_memory(cmd)
    summary = RunSummary.from_json(json.loads((run_dir / "summary.json").read_text()))
    rounds_ = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = [r["wall_time_s"] for r in rounds_]
    fed_wall = summary.federated.wall_time_s
    return {
        "engine": engine,
        "process_wall_s": wall,
        "federation_wall_s": fed_wall,
        "round_wall_s": per_round,
        "steady_round_s": sum(per_round[1:]) / max(1, len(per_round) - 1),
        "startup_s": fed_wall - sum(per_round),
        "peak_rss_tree_bytes": peak,
        "peak_pss_tree_bytes": pss,
        "peak_rss_launcher_bytes": summary.peak_rss_bytes,
        "federated_vqa_accuracy": summary.federated.vqa_accuracy,
        "bytes_up_per_round": summary.bytes_up_per_round,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--engines", nargs="+", default=["inprocess", "nvflare-sim", "nvflare-poc"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-engines"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_engine(args.config, e, args.rounds, args.out, args.sets) for e in args.engines]
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    gib = 1024**3
    print(
        "| engine | federation wall (s) | start-up + teardown (s) | steady round (s) "
        "| peak RSS, all processes (GiB) | peak PSS, all processes (GiB) "
        "| federated VQA acc | bytes up / round |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['engine']} | {r['federation_wall_s']:.1f} | {r['startup_s']:.1f} "
            f"| {r['steady_round_s']:.1f} | {r['peak_rss_tree_bytes'] / gib:.2f} "
            f"| {r['peak_pss_tree_bytes'] / gib:.2f} "
            f"| {r['federated_vqa_accuracy']:.2f} | {r['bytes_up_per_round']:,} |"
        )


if __name__ == "__main__":
    main()
