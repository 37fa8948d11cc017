"""In-process engine overhead: round wall time against the clients' pure training time.

Usage: .venv/bin/python benchmarks/engine_overhead.py configs/demo.yaml --clients 4 16 --rounds 3

Runs the federation in this process (baselines and GenEval off) with ``train_local``, the clients'
local validation and the server's global evaluation timed by wrapping the functions the engine
calls; what remains of each round's wall time is the engine and the loop: serialising and checking
every payload, swapping adapters into the shared backbone, aggregating, recording, checkpointing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import fedumm.client.train as client_train
import fedumm.experiment as experiment
from fedumm.config import load_config

TIMED: defaultdict[str, list[float]] = defaultdict(list)


def _timed(module, name: str, label: str) -> None:
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMED[label].append(time.perf_counter() - t0)

    setattr(module, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _timed(client_train, "train_local", "train")  # called by run_client_round
    _timed(client_train, "evaluate_vqa", "client_eval")
    _timed(client_train, "evaluate_captions", "client_eval")
    _timed(experiment, "evaluate_vqa", "global_eval")  # the server's evaluation (experiment's import)
    rows = []
    for k in args.clients:
        cfg = load_config(
            args.config,
            [
                f"federation.clients={k}",
                f"federation.rounds={args.rounds}",
                "federation.min_partition_size=4",
                "baselines.zero_shot=false",
                "baselines.centralized=false",
                "geneval.enabled=false",
            ],
        )
        TIMED.clear()
        with tempfile.TemporaryDirectory() as out:
            experiment.run_experiment(cfg, out)
            rounds = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        wall = sum(r["wall_time_s"] for r in rounds)
        # the last global evaluation is the final test one, after the rounds
        global_eval = sum(TIMED["global_eval"][:-1])
        train, client_eval = sum(TIMED["train"]), sum(TIMED["client_eval"])
        rest = wall - train - client_eval - global_eval
        rows.append(
            {
                "clients": k,
                "rounds": args.rounds,
                "round_wall_s": wall,
                "train_s": train,
                "client_eval_s": client_eval,
                "global_eval_s": global_eval,
                "overhead_s": rest,
            }
        )
    header = (
        "K",
        "rounds",
        "round wall time (s)",
        "clients' training (s)",
        "clients' validation (s)",
        "global eval (s)",
        "engine + loop (s)",
        "overhead vs training",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (
            r["clients"],
            r["rounds"],
            f"{r['round_wall_s']:.1f}",
            f"{r['train_s']:.1f}",
            f"{r['client_eval_s']:.1f}",
            f"{r['global_eval_s']:.1f}",
            f"{r['overhead_s']:.1f}",
            f"{100 * r['overhead_s'] / r['train_s']:.1f} %",
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
