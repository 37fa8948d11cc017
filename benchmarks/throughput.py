"""Local training throughput: fedumm's train_local against a plain PyTorch loop on the same model and batch.

Usage: .venv/bin/python benchmarks/throughput.py --data data/demo-world --steps 60 --batch-size 16

Both loops train the same LoRA adapter (built-in tiny Janus, LoRA r=16 on the language tower) on the
same samples with AdamW; the plain loop pre-builds its batches once, so the difference is what
fedumm's loop adds (batch building through the Janus processor, clipping, bookkeeping).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedumm.client.train import TrainSpec, train_local
from fedumm.data.vqa import load_split
from fedumm.models.base import LoraSpec
from fedumm.models.janus.family import JanusFamily


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/demo-world"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    fam = JanusFamily.from_pretrained(None)
    fam.attach_lora(LoraSpec(), seed=0)
    samples = load_split(args.data, "private")[: args.steps * args.batch_size]
    start = {n: p.detach().clone() for n, p in fam.model.named_parameters() if p.requires_grad}

    # fedumm's loop (one epoch over steps x batch_size samples)
    spec = TrainSpec(epochs=1, batch_size=args.batch_size, lr=1e-3)
    train_local(fam, samples[: args.batch_size * 4], spec=spec, seed=0)  # warm-up
    t0 = time.perf_counter()
    train_local(fam, samples, spec=spec, seed=0)
    fedumm_s = time.perf_counter() - t0

    # plain loop: batches built beforehand, forward/backward/step only
    with torch.no_grad():
        for n, p in fam.model.named_parameters():
            if n in start:
                p.copy_(start[n])
    batches = [
        fam.vqa_batch(samples[i : i + args.batch_size], with_answers=True)
        for i in range(0, len(samples), args.batch_size)
    ]
    params = [p for p in fam.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    fam.model.train()
    t0 = time.perf_counter()
    for batch in batches:
        loss = fam.model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    plain_s = time.perf_counter() - t0
    n = len(samples)
    print("| loop | samples/s | overhead |")
    print("|---|---|---|")
    print(f"| plain PyTorch (pre-built batches) | {n / plain_s:.1f} | - |")
    print(f"| fedumm train_local | {n / fedumm_s:.1f} | {100 * (fedumm_s / plain_s - 1):+.1f}% |")


if __name__ == "__main__":
    main()
