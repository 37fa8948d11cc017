"""Peak memory against the number of clients K, for the in-process engine (and FLARE's simulator).

Usage: .venv/bin/python benchmarks/memory_vs_clients.py configs/demo.yaml --clients 2 4 8 16 32 64 \
           --engines inprocess --out runs/bench-memory [--set geneval.enabled=false]

Each (engine, K) runs one round (baselines off) in its own subprocess; the peak resident memory over
the whole process tree is sampled with psutil, as RSS and as PSS (shared pages split between the
processes that map them). In process, memory should stay flat in K (one backbone, adapters
swapped); FLARE's simulator runs a process per client (two with external trainers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _tree_memory(ps: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) summed over a process and its descendants. RSS counts a page shared by several
    processes (torch's libraries, a memory-mapped checkpoint) once per process; PSS splits it
    between them, so the PSS sum is what the processes take from the machine together."""
    rss = pss = 0
    for p in [ps, *ps.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss


def peak_tree_memory(cmd: list[str]) -> tuple[int, int, float]:
    """Run ``cmd``; return the peak RSS and peak PSS of its process tree (sampled every 0.2 s), and
    its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = _tree_memory(ps)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read()[-2000:]}")
    return peak_rss, peak_pss, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--engines", nargs="+", default=["inprocess"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-memory"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    args = ap.parse_args()
    rows = []
    for engine in args.engines:
        for k in args.clients:
            cmd = [
                sys.executable,
                "-m",
                "fedumm.cli",
                "run",
                str(args.config),
                "--out",
                str(args.out / f"{engine}-K{k}"),
                "--overwrite",
                "--set",
                f"engine={engine}",
                "--set",
                f"federation.clients={k}",
                "--set",
                "federation.rounds=1",
                "--set",
                "federation.min_partition_size=4",
                "--set",
                "baselines.zero_shot=false",
                "--set",
                "baselines.centralized=false",
                *(x for item in args.sets for x in ("--set", item)),
            ]
            peak, pss, wall = peak_tree_memory(cmd)
            row = {"engine": engine, "clients": k, "peak_rss_bytes": peak, "peak_pss_bytes": pss}
            rows.append(row | {"wall_s": wall})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("| engine | K | peak RSS, all processes (MiB) | peak PSS, all processes (MiB) | wall (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['clients']} | {r['peak_rss_bytes'] / 2**20:.0f} |"
            f" {r['peak_pss_bytes'] / 2**20:.0f} | {r['wall_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
