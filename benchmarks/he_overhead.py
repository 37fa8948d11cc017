"""Secure aggregation's cost on the FLARE POC: time and bytes per round with and without HE (CKKS).

Usage: .venv/bin/python benchmarks/he_overhead.py configs/demo.yaml --out runs/bench-he --rounds 3

Runs the same federation twice on ``nvflare-poc`` (baselines and GenEval off; the norm bound and the
robust rule off in both runs, since HE can apply neither and the default rule ``auto`` would run
multi-Krum on the plaintext side only): plaintext FedAvg, then FedAvg over CKKS-encrypted deltas. Per
run: the mean round wall time (from metrics.jsonl, the server's round plus this process's
evaluation), bytes up and down per round (FLARE's serialisation, from the ledger), the federated
VQA, and the largest absolute difference between the two runs' final adapters. ``--set`` adds
overrides to both runs. Writes ``he_overhead.md`` and ``he_overhead.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
from pathlib import Path

from fedumm.config import load_config
from fedumm.experiment import run_experiment
from fedumm.io import read_safetensors
from fedumm.server.run_dir import RunDir


def _free_ports(n: int = 2) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="an override for both runs")
    args = ap.parse_args()
    rows = {}
    for mode in ("none", "he"):
        out = args.out / mode
        shutil.rmtree(out, ignore_errors=True)
        fl, admin = _free_ports()
        cfg = load_config(
            args.config,
            [
                "engine=nvflare-poc",
                f"federation.rounds={args.rounds}",
                f"federation.secure_aggregation={mode}",
                "federation.defense.norm_bound=off",
                "federation.defense.rule=none",
                "baselines.zero_shot=false",
                "baselines.centralized=false",
                "geneval.enabled=false",
                f"nvflare.fl_port={fl}",
                f"nvflare.admin_port={admin}",
                "nvflare.round_timeout_s=1200",
                *args.set,
            ],
        )
        summary = run_experiment(cfg, out)
        rounds = RunDir(out).read_rounds()
        rows[mode] = {
            "round_wall_s": statistics.mean(r["wall_time_s"] for r in rounds),
            "bytes_up_per_round": statistics.mean(r["bytes_up_total"] for r in rounds),
            "bytes_down_per_round": statistics.mean(r["bytes_down_total"] for r in rounds),
            "vqa": summary.federated.vqa_accuracy,
            "total_wall_s": summary.wall_time_s,
        }
        print(mode, rows[mode], flush=True)
    last = f"round-{args.rounds:04d}.safetensors"
    a = read_safetensors(args.out / "none" / "checkpoint" / last)
    b = read_safetensors(args.out / "he" / "checkpoint" / last)
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    lines = [
        "| aggregation | round wall time (s) | bytes up per round | bytes down per round | federated VQA (%) "
        "|",
        "|---|---|---|---|---|",
    ]
    for mode, r in rows.items():
        label = "plaintext FedAvg" if mode == "none" else "FedAvg over CKKS (HE)"
        lines.append(
            f"| {label} | {r['round_wall_s']:.1f} | {r['bytes_up_per_round']:,.0f} | "
            f"{r['bytes_down_per_round']:,.0f} | {r['vqa']:.2f} |"
        )
    lines.append(f"\nlargest |HE - plaintext| in the final adapter after {args.rounds} rounds: {diff:.3g}")
    table = "\n".join(lines)
    (args.out / "he_overhead.json").write_text(json.dumps({**rows, "max_abs_diff": diff}, indent=1))
    (args.out / "he_overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
