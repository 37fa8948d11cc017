"""Cross-device scale in process: rounds of equal work at K = 10, 100, 1,000 clients.

Usage: .venv/bin/python benchmarks/cross_device.py configs/demo.yaml --clients 10 100 1000 \
           --sampled 10 --images-per-client 10 --rounds 3 --out runs/bench-xd \
           [--set federation.compression=int8]

For each K a world of ``K x --images-per-client`` private images is rendered (about 3 questions an
image), so every client holds about the same number of examples whatever K is, and ``--sampled``
clients train each round (sample fraction sampled / K). Each K runs in its own subprocess; the peak
resident memory of the process tree is sampled with psutil. Reported per K: peak RSS, the world's
questions, the mean wall time and steps of rounds 2.. (round 1 meets every image for the first time),
and the error-feedback residual files left under ``checkpoint/clients/`` (with compression on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from memory_vs_clients import peak_tree_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--sampled", type=int, default=10, help="clients trained per round")
    ap.add_argument("--images-per-client", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-partition", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-xd"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2 (round 1 is reported apart)")
    fedumm = [sys.executable, "-m", "fedumm.cli"]
    rows = []
    for k in args.clients:
        if args.sampled > k:
            raise SystemExit(f"--sampled {args.sampled} exceeds K = {k}")
        world = args.out / f"world-K{k}"
        images = {"public": 0, "private": k * args.images_per_client, "val": 100, "test": 120}
        if not (world / "world.json").exists():
            subprocess.run(
                [*fedumm, "data", "synth", "--out", str(world)]
                + [x for split, n in images.items() for x in ("--images", f"{split}={n}")],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        run = args.out / f"K{k}"
        overrides = {
            "data.path": str(world),
            "data.synth_images": json.dumps(images),
            "federation.clients": k,
            "federation.sample_fraction": args.sampled / k,
            "federation.rounds": args.rounds,
            "federation.min_partition_size": args.min_partition,
            "baselines.zero_shot": "false",
            "baselines.centralized": "false",
            "geneval.enabled": "false",
        }
        cmd = [*fedumm, "run", str(args.config), "--out", str(run), "--overwrite"]
        cmd += [x for key, v in overrides.items() for x in ("--set", f"{key}={v}")]
        cmd += [x for item in args.sets for x in ("--set", item)]
        peak, _, wall = peak_tree_memory(cmd)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        later = records[1:]
        residuals = sorted((run / "checkpoint" / "clients").glob("*.safetensors"))
        questions = len(
            json.loads((world / "v2_OpenEnded_mscoco_private_questions.json").read_text())["questions"]
        )
        rows.append(
            {
                "clients": k,
                "sample_fraction": args.sampled / k,
                "questions": questions,
                "peak_rss_bytes": peak,
                "wall_s": wall,
                "round1_s": records[0]["wall_time_s"],
                "round_s": statistics.mean(r["wall_time_s"] for r in later),
                "steps": statistics.mean(
                    sum(m.get("steps", 0) for m in r["client_metrics"].values()) for r in later
                ),
                "residual_files": len(residuals),
                "residual_bytes": sum(p.stat().st_size for p in residuals),
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(
        "| K | sample fraction | private questions | peak RSS (MiB) | round 1 (s) | rounds 2.. (s) |"
        " steps a round | residual files (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['clients']:,} | {r['sample_fraction']:g} | {r['questions']:,} |"
            f" {r['peak_rss_bytes'] / 2**20:.0f} | {r['round1_s']:.1f} | {r['round_s']:.1f} |"
            f" {r['steps']:.0f} | {r['residual_files']} ({r['residual_bytes'] / 1e6:.1f}) |"
        )


if __name__ == "__main__":
    main()
