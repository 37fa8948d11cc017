"""The attack bench: attacks x defences, the privacy-utility curve, the cost of the default defences.

Usage (each part is resumable: a cell whose summary.json says finished is read, not rerun):

    .venv/bin/python benchmarks/attack_bench.py attacks configs/demo.yaml --out runs/bench-attacks
    .venv/bin/python benchmarks/attack_bench.py backdoor configs/demo.yaml --out runs/bench-attacks
    .venv/bin/python benchmarks/attack_bench.py privacy configs/demo.yaml --out runs/bench-privacy
    .venv/bin/python benchmarks/attack_bench.py defaults configs/demo.yaml --out runs/bench-defaults

- ``attacks``: federated test VQA (and attack success for ``backdoor``) for every attack kind x every
  defence at K = 8 with 0, 1 and 2 malicious clients (``--clients``, ``--malicious`` to change;
  ``--jobs 2`` runs two cells at once, each on one torch thread of a 2-core machine);
- ``backdoor``: the backdoor at full strength (every attacker question poisoned, ``--poison``), its
  trained delta sent as is and boosted by K / attackers (model replacement), per defence; it reads
  the ``attacks`` part's clean cells from the same ``--out`` as the reference success rate;
- ``privacy``: federated VQA against epsilon at K = 16, Poisson client sampling (q = 0.25), for no DP
  and noise multipliers 0.3, 0.6, 1.0, 2.0 (``--noise``), C = ``--clip``;
- ``defaults``: the demo as shipped (default defences: count bound, adaptive norm bound) against the
  same run with every defence off, and the issue's attack (one of 4 clients sends a sign-flipped 50x
  update claiming a billion examples) against both.

GenEval and the baselines are off in every cell (``--keep-geneval`` keeps GenEval); ``--set`` adds
overrides to every cell (e.g. a small world for a quick check). Each part writes ``<part>.md`` (a
markdown table) and ``<part>.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from fedumm.config import load_config
from fedumm.errors import EngineError
from fedumm.experiment import run_experiment
from fedumm.io import atomic_write_json
from fedumm.server.run_dir import RunDir

KINDS = ("sign_flip", "scale", "gaussian", "free_rider", "label_flip", "backdoor")
# attack strengths: scale is the issue's sign-flipped 50x update, gaussian a noise of 10x the honest norm
STRENGTH = {"scale": -50.0, "gaussian": 10.0}
OFF = [
    "federation.defense.count_cap=null",
    "federation.defense.norm_bound=off",
    "federation.defense.rule=none",
]
DEFENCES: dict[str, list[str]] = {
    "none": OFF,
    # the size bounds alone: count cap and adaptive norm bound (the defaults before rule: auto)
    "bounds": ["federation.defense.rule=none"],
    "default": [],  # the bounds + rule auto: multi-Krum (f = 1) in every group of >= 4 updates
    "median": [*OFF, "federation.defense.rule=median"],
    "median (B·A)": [*OFF, "federation.defense.rule=median", "federation.defense.space=product"],
    "trimmed_mean": [*OFF, "federation.defense.rule=trimmed_mean", "federation.defense.trim_fraction=0.25"],
    "multi_krum": [*OFF, "federation.defense.rule=multi_krum", "federation.defense.krum_f=2"],
    "multi_krum (B·A)": [
        *OFF,
        "federation.defense.rule=multi_krum",
        "federation.defense.krum_f=2",
        "federation.defense.space=product",
    ],
}

QUIET = ["baselines.zero_shot=false", "baselines.centralized=false"]
ISSUE_ATTACK = [
    "adversary.clients=1",
    "adversary.kind=scale",
    "adversary.strength=-50",
    "adversary.claimed_examples=1000000000",
]


FAILURE_FILE = "bench_failure.json"  # a cell whose run failed: why, so that a resume does not rerun it


def _no_figures(overrides: Sequence[str], **why) -> dict:
    return {
        "vqa": None,
        "attack_success": None,
        "epsilon": None,
        "noise_multiplier": None,
        "adversarial": [],
        "defence_events": None,
        "flagged_attackers": [],
        **why,
        "overrides": list(overrides),
    }


def run_cell(config: Path, out: Path, overrides: Sequence[str], *, run: bool = True) -> dict:
    """One run (or the finished one already in ``out``); returns the figures the tables need.

    A run that failed (the federation broke down: e.g. every update non-finite) is a result too: its
    error is kept in ``out/bench_failure.json`` beside the run's own failed summary, and read back
    instead of rerunning the same overrides. ``run=False`` only reads: an unfinished cell comes back
    with ``pending`` set.
    """
    summary = RunDir(out).read_summary() if (out / "summary.json").is_file() else None
    failure = out / FAILURE_FILE
    if summary is not None and summary.status == "failed" and failure.is_file():
        kept = json.loads(failure.read_text(encoding="utf-8"))
        if kept.get("overrides") == list(overrides):
            return kept
    t0 = time.perf_counter()
    if summary is None or not summary.finished:
        if not run:
            return _no_figures(overrides, pending=True)
        if (out / "metrics.jsonl").exists():
            import shutil

            shutil.rmtree(out)  # an unfinished cell starts again (its config may have changed)
        try:
            summary = run_experiment(load_config(config, list(overrides)), out)
        except EngineError as exc:  # e.g. every update non-finite: the federation broke down
            res = _no_figures(overrides, failed=str(exc), wall_s=round(time.perf_counter() - t0, 1))
            if (out / "summary.json").is_file():
                atomic_write_json(failure, res)
            return res
    fed = summary.federated
    rounds = RunDir(out).read_rounds()
    events = [e for r in rounds for e in r.get("defense", [])]
    return {
        "vqa": fed.vqa_accuracy if fed else None,
        "attack_success": fed.attack_success if fed else None,
        "epsilon": summary.epsilon,
        "noise_multiplier": summary.noise_multiplier,
        "adversarial": list(summary.adversarial_clients),
        "defence_events": len(events),
        "flagged_attackers": sorted(
            {
                e["client"]
                for e in events
                if e["client"] in summary.adversarial_clients and e["action"] != "trimmed"
            }
        ),
        "wall_s": round(time.perf_counter() - t0, 1),
        "overrides": list(overrides),
    }


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _vqa(row: dict) -> str:
    """The federated VQA of a cell, or why the run produced none."""
    if row.get("pending"):
        return "*pending*"
    if row.get("failed"):
        return f"run failed: {row['failed']}"
    return _fmt(row["vqa"])


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_cells(args, cells: list[tuple[dict, Path, list[str]]]) -> list[dict]:
    """Run ``(row, out, overrides)`` cells, ``--jobs`` at a time; rows come back in the given order.

    With ``--jobs N`` each worker process runs torch on ``--threads`` threads (default: the cores
    / N), so N cells never oversubscribe the machine. Accuracy figures can differ in the last bits
    between thread counts (reduction order); a table should be taken at one setting.
    """
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    done: list[dict | None] = [None] * len(cells)

    def report(i: int, res: dict) -> None:
        done[i] = {**cells[i][0], **res}
        name = cells[i][1].name
        print(f"{name}: VQA {_vqa(res)}, attack success {_fmt(res['attack_success'])}", flush=True)

    if args.table_only:  # read what has finished; run nothing
        for i, (_, out, ov) in enumerate(cells):
            done[i] = {**cells[i][0], **run_cell(args.config, out, ov, run=False)}
    elif jobs == 1 and args.threads is None:
        for i, (_, out, ov) in enumerate(cells):
            report(i, run_cell(args.config, out, ov))
    else:
        ctx = multiprocessing.get_context("spawn")
        # a fresh process a cell (max_tasks_per_child=1): nothing one run caches leaks into the next
        pool = ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,), max_tasks_per_child=1
        )
        todo = []
        for i, (_, out, ov) in enumerate(cells):  # finished cells are read here, not in a new process
            res = run_cell(args.config, out, ov, run=False)
            if res.get("pending"):
                todo.append(i)
            else:
                report(i, res)
        with pool as ex:
            futures = {ex.submit(run_cell, args.config, cells[i][1], cells[i][2]): i for i in todo}
            for fut in as_completed(futures):
                report(futures[fut], fut.result())
    return [r for r in done if r is not None]


def _cell_dir(out: Path, defence: str, rest: str) -> Path:
    """A cell's run directory: the defence's name made path-safe, then what the cell runs."""
    return out / f"{defence.replace(' ', '_').replace('·', '')}-{rest}"


def _clean_cell(args, base: list[str], defence: str) -> tuple[dict, Path, list[str]]:
    """The defence's run without an attacker (the backdoor's trigger is still tested on it, as the
    rate at which an unattacked model answers the target); shared by the attacks and backdoor parts."""
    row = {"defence": defence, "kind": "(none)", "malicious": 0}
    adv = ["adversary.clients=0", "adversary.kind=backdoor"]
    return row, _cell_dir(args.out, defence, "clean-m0"), [*base, *DEFENCES[defence], *adv]


def part_attacks(args) -> tuple[list[dict], str]:
    base = [*QUIET, f"federation.clients={args.clients}", *args.set]
    cells = []
    # attacker count outermost, so a partial run covers every defence at the first counts
    for m in args.malicious:
        for defence in args.defences:
            if m == 0:  # no attacker: one clean run per defence
                cells.append(_clean_cell(args, base, defence))
                continue
            for kind in args.kinds:
                adv = [f"adversary.clients={m}", f"adversary.kind={kind}"]
                if kind in STRENGTH:
                    adv.append(f"adversary.strength={STRENGTH[kind]}")
                row = {"defence": defence, "kind": kind, "malicious": m}
                out = _cell_dir(args.out, defence, f"{kind}-m{m}")
                cells.append((row, out, [*base, *DEFENCES[defence], *adv]))
    rows = _run_cells(args, cells)
    order = list(DEFENCES)
    rows.sort(key=lambda r: (order.index(r["defence"]), r["malicious"]))  # stable: kinds keep their order
    lines = [
        f"| defence | attack | malicious of {args.clients} | federated VQA (%) | backdoor success (%) | "
        "attackers flagged |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        success = _fmt(r["attack_success"]) if r["kind"] in ("backdoor", "(none)") else ""
        flagged = ", ".join(r["flagged_attackers"]) or "-"
        lines.append(
            f"| {r['defence']} | {r['kind']} | {r['malicious']} | {_vqa(r)} | {success} | {flagged} |"
        )
    return rows, pivot(rows, args.clients) + "\n\n" + "\n".join(lines)


def _short(row: dict | None) -> str:
    """A pivot cell: the VQA and how many attackers the defences flagged, or why there is none."""
    if row is None:
        return ""
    if row.get("pending"):
        return "pending"
    if row.get("failed"):
        return "failed"
    vqa = _fmt(row["vqa"])
    m = row["malicious"]
    return f"{vqa} [{len(row['flagged_attackers'])}/{m}]" if m else vqa


def pivot(rows: Sequence[dict], clients: int) -> str:
    """Per attacker count: a defence a row, the clean run and each attack kind a column (federated
    VQA, with [flagged/malicious]); the last column is the backdoor's success, clean -> attacked."""
    at = {(r["defence"], r["malicious"], r["kind"]): r for r in rows}
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    counts = sorted({r["malicious"] for r in rows if r["malicious"]})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    out = []
    for m in counts:
        out += [
            f"Federated test VQA (%), {m} of {clients} clients malicious; [n/{m}]: attackers the "
            "defences flagged (clipped, down-weighted or excluded in some round)",
            "",
            "| defence | clean | " + " | ".join(kinds) + " | backdoor success, clean -> attacked (%) |",
            "|---|" + "---:|" * (len(kinds) + 2),
        ]
        for d in defences:
            clean = at.get((d, 0, "(none)"))
            cells = [_short(at.get((d, m, k))) for k in kinds]
            bd = at.get((d, m, "backdoor"))
            success = (
                f"{_fmt(clean['attack_success'] if clean else None)} -> {_fmt(bd['attack_success'])}"
                if bd is not None and not bd.get("pending") and not bd.get("failed")
                else ""
            )
            out.append(f"| {d} | {_short(clean)} | " + " | ".join(cells) + f" | {success} |")
        out.append("")
    return "\n".join(out).rstrip()


def part_backdoor(args) -> tuple[list[dict], str]:
    """The backdoor at full strength: every attacker question poisoned (``--poison``), its delta sent
    as trained (boost 1) and boosted by K / attackers (model replacement), per defence. The clean
    cells are the ``attacks`` part's (same names in ``--out``): their attack success is the rate at
    which an unattacked model answers the target on triggered images."""
    base = [*QUIET, f"federation.clients={args.clients}", *args.set]
    cells = []
    for m in [m for m in args.malicious if m > 0]:
        for defence in args.defences:
            for boost in sorted({1.0, args.clients / m}):
                adv = [
                    f"adversary.clients={m}",
                    "adversary.kind=backdoor",
                    f"adversary.poison_fraction={args.poison}",
                    f"adversary.strength={boost:g}",
                ]
                row = {"defence": defence, "kind": "backdoor", "malicious": m, "boost": boost}
                out = _cell_dir(args.out, defence, f"backdoor-p{args.poison:g}-x{boost:g}-m{m}")
                cells.append((row, out, [*base, *DEFENCES[defence], *adv]))
    # the reference: the attacks part's clean run of each defence
    cells += [_clean_cell(args, base, d) for d in args.defences]
    rows = _run_cells(args, cells)
    clean = {r["defence"]: r for r in rows if r["malicious"] == 0}
    lines = [
        f"Backdoor, every attacker question poisoned (poison_fraction {args.poison:g}), K = {args.clients}: "
        "federated test VQA (%) / attack success (%) [attackers flagged]; boost: the factor on the "
        "attacker's trained delta",
        "",
        "| defence | attackers | clean VQA / success | boost 1 | model replacement (boost K / attackers) |",
        "|---|---|---|---|---|",
    ]

    def cell(r: dict | None) -> str:
        if r is None or r.get("pending") or r.get("failed"):
            return _short(r)
        flagged = f" [{len(r['flagged_attackers'])}/{r['malicious']}]" if r["malicious"] else ""
        return f"{_fmt(r['vqa'])} / {_fmt(r['attack_success'])}{flagged}"

    at = {(r["defence"], r["malicious"], r.get("boost")): r for r in rows}
    for m in sorted({r["malicious"] for r in rows if r["malicious"]}):
        for d in args.defences:
            lines.append(
                f"| {d} | {m} of {args.clients} | {cell(clean.get(d))} | {cell(at.get((d, m, 1.0)))} | "
                f"boost {args.clients / m:g}: {cell(at.get((d, m, args.clients / m)))} |"
            )
    return rows, "\n".join(lines)


def part_privacy(args) -> tuple[list[dict], str]:
    base = [
        *QUIET,
        f"federation.clients={args.clients_dp}",
        "federation.sampling=poisson",
        f"federation.sample_fraction={args.rate}",
        *args.set,
    ]
    rows = [{"noise": None, **run_cell(args.config, args.out / "no-dp", base)}]
    for z in args.noise:
        dp = ["privacy.enabled=true", f"privacy.noise_multiplier={z}", f"privacy.clip_norm={args.clip}"]
        rows.append({"noise": z, **run_cell(args.config, args.out / f"z{z}", [*base, *dp])})
        print(f"z={z}: epsilon {_fmt(rows[-1]['epsilon'])}, VQA {_vqa(rows[-1])}", flush=True)
    lines = [
        "| noise multiplier z | epsilon (delta 1e-5) | federated VQA (%) | setting |",
        "|---|---|---|---|",
    ]
    for r in rows:
        z = "no DP" if r["noise"] is None else f"{r['noise']:g}"
        eps = "inf" if r["noise"] is None else _fmt(r["epsilon"])
        setting = f"K = {args.clients_dp}, Poisson q = {args.rate}, C = {args.clip}"
        lines.append(f"| {z} | {eps} | {_vqa(r)} | {setting} |")
    return rows, "\n".join(lines)


def part_defaults(args) -> tuple[list[dict], str]:
    cells = {
        "clean, default defences": [],
        "clean, no defence": OFF,
        "issue attack, default defences": ISSUE_ATTACK,
        "issue attack, no defence": [*OFF, *ISSUE_ATTACK],
    }
    rows = []
    extra = [] if args.keep_geneval else ["geneval.enabled=false"]
    for label, ov in cells.items():
        name = label.replace(", ", "-").replace(" ", "_")
        res = run_cell(args.config, args.out / name, [*QUIET, *extra, *args.set, *ov])
        rows.append({"cell": label, **res})
        print(f"{label}: VQA {_vqa(res)}", flush=True)
    clean = rows[0]["vqa"]
    lines = ["| run | federated VQA (%) | vs clean with default defences (points) |", "|---|---|---|"]
    for r in rows:
        diff = None if clean is None or r["vqa"] is None else r["vqa"] - clean
        lines.append(f"| {r['cell']} | {_vqa(r)} | {_fmt(diff)} |")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["attacks", "backdoor", "privacy", "defaults"])
    ap.add_argument("config", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=8, help="attacks: K")
    ap.add_argument("--malicious", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=list(DEFENCES))
    ap.add_argument("--poison", type=float, default=1.0, help="backdoor: the attackers' poison_fraction")
    ap.add_argument("--clients-dp", type=int, default=16, help="privacy: K")
    ap.add_argument("--rate", type=float, default=0.25, help="privacy: Poisson sample rate q")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.3, 0.6, 1.0, 2.0])
    ap.add_argument("--clip", type=float, default=0.05, help="privacy: C, the clip norm of a client delta")
    ap.add_argument(
        "--jobs", type=int, default=1, help="attacks, backdoor: cells run at once, each in its own process"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="attacks, backdoor: torch threads a cell (cores/jobs)"
    )
    ap.add_argument(
        "--table-only", action="store_true", help="attacks, backdoor: tabulate finished cells, run none"
    )
    ap.add_argument("--keep-geneval", action="store_true", help="defaults: keep GenEval on")
    ap.add_argument("--set", action="append", default=[], help="an override for every cell")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part != "defaults" and not args.keep_geneval:
        args.set = ["geneval.enabled=false", *args.set]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = {
        "attacks": part_attacks,
        "backdoor": part_backdoor,
        "privacy": part_privacy,
        "defaults": part_defaults,
    }
    rows, table = parts[args.part](args)
    (args.out / f"{args.part}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (args.out / f"{args.part}.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"{args.part}: {len(rows)} cells, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
