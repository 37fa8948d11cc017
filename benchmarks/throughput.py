"""Local training throughput: fedumm's train_local against a plain PyTorch loop on the same model and batches.

Usage: .venv/bin/python benchmarks/throughput.py --data data/demo-world --steps 60 --batch-size 16

Both loops train the same LoRA adapter (built-in tiny Janus, LoRA r=16 on the language tower) from the
same starting weights with AdamW, on the same batches in the same order (train_local's seeded
shuffle). The plain loop builds its batches before the clock starts and does forward, backward and
step only; the difference is what fedumm's loop adds (batch building inside the loop, clipping,
bookkeeping). Each loop runs once untimed over all batches (so both have met every sequence
length), then ``--repeats`` times, alternating which goes first; the table gives the medians.

train_local runs twice per repeat: with the family's encodings cached (a client's second epoch or
round onward: pixels and token ids are computed once per image and prompt) and with that cache
cleared first (a client's first pass over its examples; decoded images stay cached).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from fedumm.client.train import TrainSpec, epoch_batches, train_local
from fedumm.data.vqa import load_split
from fedumm.models.base import LoraSpec
from fedumm.models.janus.family import JanusFamily
from fedumm.seeding import derive_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo-world"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    fam = JanusFamily.from_pretrained(None)
    fam.attach_lora(LoraSpec(), seed=0)
    samples = load_split(args.data, "private")[: args.steps * args.batch_size]
    params = [p for p in fam.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    spec = TrainSpec(epochs=1, batch_size=args.batch_size, lr=1e-3)
    seed = 0

    def reset() -> None:
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)

    # the batches train_local draws with this seed, built beforehand for the plain loop
    order = epoch_batches(
        len(samples),
        0,
        spec,
        torch.Generator().manual_seed(seed),
        torch.Generator().manual_seed(derive_seed(seed, "captions")),
    )
    batches = [fam.vqa_batch([samples[i] for i in idx], with_answers=True) for _, idx in order]

    def fedumm_loop(cold: bool = False) -> float:
        reset()
        if cold:
            fam.encodings.clear()
        t0 = time.perf_counter()
        train_local(fam, samples, spec=spec, seed=seed)
        return time.perf_counter() - t0

    def plain_loop() -> float:
        reset()
        opt = torch.optim.AdamW(params, lr=1e-3)
        fam.model.train()
        t0 = time.perf_counter()
        for batch in batches:
            loss = fam.model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        elapsed = time.perf_counter() - t0
        fam.model.eval()
        return elapsed

    fedumm_loop(), plain_loop()  # warm-up: every shape once for both
    times: dict[str, list[float]] = {"plain": [], "fedumm": [], "fedumm, first pass": []}
    loops = (
        ("plain", plain_loop),
        ("fedumm", fedumm_loop),
        ("fedumm, first pass", lambda: fedumm_loop(cold=True)),
    )
    for r in range(args.repeats):
        for name, fn in loops if r % 2 == 0 else loops[::-1]:
            times[name].append(fn())
    median = {name: statistics.median(t) for name, t in times.items()}
    n = len(samples)
    print("runs (s): " + "; ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in times.items()))
    print("| loop | samples/s | vs plain |")
    print("|---|---|---|")
    rows = {
        "plain": "plain PyTorch (batches built beforehand)",
        "fedumm": "fedumm train_local (encodings cached)",
        "fedumm, first pass": "fedumm train_local, first pass (encodings computed in the loop)",
    }
    for key, label in rows.items():
        print(f"| {label} | {n / median[key]:.1f} | {median['plain'] / median[key]:.3f}x |")


if __name__ == "__main__":
    main()
