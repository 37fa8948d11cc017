"""A real-size rehearsal: one federated round of BLIP3o-8B- and Janus-Pro-7B-shaped models (random
weights, nothing downloaded) with K clients sharing one frozen backbone in process.

Usage (where a GPU is lent):
    .venv/bin/python benchmarks/gpu_rehearsal.py --family both --clients 4 16 --device cuda --dtype bf16 \
        --out runs/gpu-rehearsal
Smoke run on CPU (tiny widths, under a minute; what tests/integration/test_gpu_rehearsal.py runs):
    .venv/bin/python benchmarks/gpu_rehearsal.py --tiny --device cpu --dtype fp32 --clients 2 --examples 2 \
        --batch-size 2 --no-warmup --out runs/gpu-rehearsal-smoke
Counts only (the models built on the meta device, no round):
    .venv/bin/python benchmarks/gpu_rehearsal.py --device meta --out runs/gpu-rehearsal-meta

Each family is built once from the configs in configs/models/ (BLIP3o-8B: Qwen2.5-VL-7B-Instruct.json
and BLIP3o-8B-DiT.json; Janus-Pro-7B: Janus-Pro-7B.json) by ``ModelFamily.random_weights``: the
family's own model classes, random weights created straight on the device. LoRA is attached by the
family (rank 16, alpha 32, every tower by default). For each K, fedumm's registered in-process engine
runs one round through the round loop (default defences, FedAvg): each client loads the global
adapter into the shared backbone, trains ``--examples`` VQA questions and ``--examples`` captions of a
procedurally rendered synthetic world (the family's image processor resizes them: Janus-Pro to 384
px, 576 image tokens; BLIP3o to 448 px, 256 image tokens) and sends its adapter back; every payload
is serialised as on a network and counted by the engine's ledger. BLIP3o's generation targets need
its EVA-CLIP-E/14-plus encoder, which no library ships: a site provides it; here a frozen random
patch projection to the DiT's feature shape stands in (its parameters are not in the figures).

Measured per K: peak GPU memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``,
reset before the round; on CPU the process's peak RSS instead, which cannot be reset), the round's
wall time, bytes up and down per round (ledger), and the "one model per client" comparison: K x the
backbone's bytes in the dtype, and K x the 7.5 GB per client of the FedUMM example, against the
measured shared peak. Writes OUT/results.json (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import math
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedumm.client.site import Site, load_data, train_spec
from fedumm.client.train import ClientData
from fedumm.config import load_config
from fedumm.data.partition import client_names
from fedumm.data.synth import synthesize
from fedumm.engines import FederationSetup, run_federation
from fedumm.errors import ConfigError, FedummError
from fedumm.experiment import peak_rss_bytes
from fedumm.fl.strategies import make_strategy
from fedumm.io import atomic_write_json
from fedumm.models import family_class, family_info
from fedumm.models.base import FamilyOptions, LoraSpec, ModelFamily
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_, state_num_bytes, state_num_params
from fedumm.seeding import derive_seed
from fedumm.server.run_dir import RunDir
from fedumm.wire import pack_state

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
# the FedUMM example's memory with one model per client, as issue 12 states it (not measured here)
FEDUMM_EXAMPLE_BYTES_PER_CLIENT = 7.5e9

# family -> (label, backbone config, generator config or None)
SHAPES: dict[str, tuple[str, str, str | None]] = {
    "blip3o": ("BLIP3o-8B", "Qwen2.5-VL-7B-Instruct.json", "BLIP3o-8B-DiT.json"),
    "janus": ("Janus-Pro-7B", "Janus-Pro-7B.json", None),
}
# --tiny: widths and depths cut in copies of the same configs (vocabularies, token ids, patch sizes,
# codebook, DiT grid and latent-query count stay the released ones), merged key by key
TINY: dict[str, dict[str, Any]] = {
    "Janus-Pro-7B.json": {
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        "vision_config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
        },
        "vq_config": {"base_channels": 32, "num_res_blocks": 1, "latent_channels": 32},
    },
    "Qwen2.5-VL-7B-Instruct.json": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "max_window_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        # head dim 32: the (t, h, w) rotary sections split its 16 frequencies
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
    },
    "BLIP3o-8B-DiT.json": {
        "in_channels": 32,
        "hidden_size": 32,
        "num_layers": 2,
        "num_attention_heads": 2,
        "num_kv_heads": 2,
        "cross_attention_dim": 32,
        "_caption_projection": {"in_features": 64},
        "_latent_queries": [64, 64],
    },
}
TINY_BLIP3O_IMAGE_SIZE = 112  # 64 patches of 14 px, 16 language-model tokens (448 px at real size)


def _merged(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_paths(family: str, *, tiny: bool, work: Path) -> tuple[Path, Path | None]:
    """The family's shipped configs, or (``tiny``) reduced copies of them written under ``work``."""
    _, model, generator = SHAPES[family]
    names = [model] + ([generator] if generator else [])
    if not tiny:
        paths = [MODELS / n for n in names]
    else:
        paths = []
        for n in names:
            full = json.loads((MODELS / n).read_text(encoding="utf-8"))
            paths.append(atomic_write_json(work / "tiny-configs" / n, _merged(full, TINY[n])))
    return paths[0], (paths[1] if len(paths) > 1 else None)


class StandInTargetEncoder(torch.nn.Module):
    """Not EVA-CLIP: a frozen random projection of image patches, (B, 3, H, W) -> (B, C, grid, grid)."""

    def __init__(self, *, channels: int, image_size: int, grid: int) -> None:
        super().__init__()
        side = image_size // grid
        self.proj = torch.nn.Conv2d(3, channels, kernel_size=side, stride=side)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


def family_options(
    family: str, generator: Path | None, args: argparse.Namespace, image_size: int
) -> FamilyOptions:
    """Model options; BLIP3o gets the site's target encoder (the stand-in) and, when tiny, its image size."""
    extra: dict[str, Any] = {}
    if family == "blip3o" and generator is not None:
        dit = json.loads(generator.read_text(encoding="utf-8"))
        grid = int(dit["sample_size"]) // int(dit["patch_size"])
        with torch.device(args.device):
            encoder = StandInTargetEncoder(channels=int(dit["in_channels"]), image_size=image_size, grid=grid)
        extra["target_encoder"] = encoder.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        if args.tiny:
            extra["image_size"] = TINY_BLIP3O_IMAGE_SIZE
    return FamilyOptions(device=args.device, extra=extra)


def memory_now(device: str) -> dict[str, int]:
    if device == "cuda":
        torch.cuda.synchronize()
        return {
            "allocated_bytes": torch.cuda.memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved(),
        }
    return {"peak_rss_bytes": peak_rss_bytes()}


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> dict[str, int]:
    if device == "cuda":
        torch.cuda.synchronize()
        return {
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        }
    return {"peak_rss_bytes": peak_rss_bytes()}


def write_profile(profiler: cProfile.Profile, path: Path, wall: float) -> None:
    """The round's functions by cumulative and by own time (cProfile; GPU time lands on the calls
    that wait for the GPU, such as ``.item()`` and copies to the host)."""
    text = io.StringIO()
    text.write(f"round wall time {wall:.2f} s (profiled)\n")
    for order in ("cumulative", "tottime"):
        text.write(f"\n==== by {order} ====\n")
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(45)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue(), encoding="utf-8")


def run_round(
    family: ModelFamily,
    *,
    name: str,
    k: int,
    world: Path,
    initial: dict,
    args: argparse.Namespace,
    out: Path,
) -> dict[str, Any]:
    """One round of the registered in-process engine with ``k`` clients on the shared backbone."""
    cfg = load_config(
        None,
        tree={
            "name": f"rehearsal-{name}-K{k}",
            "seed": args.seed,
            "data": {"path": str(world)},
            "model": {"family": name, "device": args.device},
            "lora": {"rank": args.rank, "alpha": args.alpha, "groups": list(args.groups_of[name])},
            "train": {
                "batch_size": args.batch_size,
                "eval_batch_size": args.batch_size,
                "lr": args.lr,
                "local_val_fraction": 0.0,  # the round is training and exchange; no local validation
            },
            "federation": {"clients": k, "rounds": 1, "tasks": args.tasks, "strategy": "fedavg"},
            "baselines": {"zero_shot": False, "centralized": False},
        },
    )
    data = load_data(cfg, eval_splits=False)
    n = args.examples
    vqa = data.train if args.tasks in ("understanding", "both") else []
    captions = data.captions if args.tasks in ("generation", "both") else []
    for what, pool in (("questions", vqa), ("captions", captions)):
        if pool and len(pool) < k * n:
            raise ConfigError(f"the world has {len(pool)} {what}, {k} clients x {n} need more")
    sites = {
        cid: Site(
            name=cid,
            family=family,
            data=ClientData(train=vqa[i * n : (i + 1) * n], gen_train=captions[i * n : (i + 1) * n]),
            spec=train_spec(cfg),
        )
        for i, cid in enumerate(client_names(k))
    }
    records = []
    setup = FederationSetup(
        cfg=cfg,
        run=RunDir(out / f"{name}-K{k}"),  # the in-process engine writes nothing there
        sites=sites,
        initial_state=initial,
        strategy=make_strategy("fedavg"),
        start_state=initial,
        on_round=lambda record, state, client_side: records.append(record),
        group_of=family.group_of,
    )
    set_adapter_state_(family.model, initial)
    reset_peak(args.device)
    profiler = cProfile.Profile() if args.profile and k in args.clients else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    final = run_federation(setup)
    peak = peak_memory(args.device)  # synchronises the GPU: queued kernels count in the round
    wall = time.perf_counter() - t0
    if profiler is not None:
        profiler.disable()
        write_profile(profiler, out / f"profile-{name}-K{k}.txt", wall)
    (rec,) = records
    losses = [float(m["train_loss"]) for m in rec.client_metrics.values()]
    return {
        "clients": k,
        "examples_per_client": {"understanding": len(sites[rec.clients[0]].data.train)}
        | {"generation": len(sites[rec.clients[0]].data.gen_train)},
        "steps_per_client": [int(m["steps"]) for m in rec.client_metrics.values()],
        "round_wall_s": wall,
        "loop_wall_s": rec.wall_time_s,
        "per_client_s": wall / k,
        "bytes_up_per_round": sum(rec.bytes_up.values()),
        "bytes_down_per_round": sum(rec.bytes_down.values()),
        "bytes_up": dict(rec.bytes_up),
        "bytes_down": dict(rec.bytes_down),
        "train_loss_mean": sum(losses) / len(losses),
        "defense_events": len(rec.defense),
        "defense": [e.to_json() for e in rec.defense],
        "final_adapter_finite": all(bool(torch.isfinite(t).all()) for t in final.values()),
        **peak,
    }


def rehearse(name: str, args: argparse.Namespace, world: Path | None, out: Path) -> dict[str, Any]:
    """Build one family at its released shapes, attach LoRA, and run one round per K."""
    label, _, _ = SHAPES[name]
    model_config, generator_config = config_paths(name, tiny=args.tiny, work=out)
    image_size = 64  # the synthetic world's images; each family's processor resizes them
    options = family_options(name, generator_config, args, image_size)
    reset_peak(args.device)
    t0 = time.perf_counter()
    family = family_class(name).random_weights(
        model_config, generator_config, options=options, dtype=args.dtype, seed=args.seed
    )
    build_s = time.perf_counter() - t0
    build_peak = peak_memory(args.device) if args.device != "meta" else {}
    # the stand-in target encoder is part of the module tree but not of the model being rehearsed
    stand_in = list(options.extra["target_encoder"].parameters()) if "target_encoder" in options.extra else []
    counts = family.parameter_counts()
    backbone_params = counts["total"] - sum(p.numel() for p in stand_in)
    backbone_bytes = family.full_model_bytes() - sum(p.numel() * p.element_size() for p in stand_in)
    family.attach_lora(
        LoraSpec(rank=args.rank, alpha=args.alpha, groups=tuple(args.groups_of[name])),
        seed=derive_seed(args.seed, "lora-init"),
    )
    trainable = [p for p in family.model.parameters() if p.requires_grad]
    row: dict[str, Any] = {
        "family": name,
        "shape": label + (" (tiny widths)" if args.tiny else ""),
        "configs": [
            str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
            for p in (model_config, generator_config)
            if p
        ],
        "groups": list(args.groups_of[name]),
        "tasks": args.tasks,
        "backbone_params": backbone_params,
        "backbone_params_per_tower": {g: v for g, v in counts.items() if g != "total"},
        "backbone_bytes": backbone_bytes,
        "stand_in_target_encoder_params": sum(p.numel() for p in stand_in),
        "adapter_params": sum(p.numel() for p in trainable),
        "adapter_tensor_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "build_s": build_s,
        "memory_build_peak": build_peak,
    }
    if args.device == "meta":
        del family
        return row
    initial = get_adapter_state(family.model)
    row |= {
        "adapter_params": state_num_params(initial),
        "adapter_tensor_bytes": state_num_bytes(initial),
        "adapter_payload_bytes": len(pack_state(initial)),
        "memory_after_build": memory_now(args.device),
    }
    if args.warmup:  # kernels, allocator pools and caches of a first step; not measured
        t0 = time.perf_counter()
        run_round(family, name=name, k=1, world=world, initial=initial, args=args, out=out)
        row["warmup_round_s"] = time.perf_counter() - t0
    rounds = []
    for k in args.clients:
        r = run_round(family, name=name, k=k, world=world, initial=initial, args=args, out=out)
        shared = r.get("peak_allocated_bytes", r.get("peak_rss_bytes"))
        r["one_model_per_client_bytes"] = k * backbone_bytes
        r["one_model_per_client_over_shared"] = k * backbone_bytes / shared
        r["fedumm_example_bytes"] = k * FEDUMM_EXAMPLE_BYTES_PER_CLIENT
        r["fedumm_example_over_shared"] = k * FEDUMM_EXAMPLE_BYTES_PER_CLIENT / shared
        rounds.append(r)
    row["rounds"] = rounds
    del family, initial
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def render_world(args: argparse.Namespace, out: Path) -> Path:
    """The synthetic world (VQA v2 and COCO-caption files): 3 questions and 2 captions per image."""
    if args.data is not None:
        return args.data
    need = max([*args.clients, 1]) * args.examples
    world = out / "world"
    if not (world / "world.json").is_file():
        synthesize(world, seed=args.seed, images={"private": math.ceil(need / 2) + 1})
    return world


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["blip3o", "janus", "both"], default="both")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--device", choices=["cuda", "cpu", "meta"], default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-rehearsal"))
    ap.add_argument("--tiny", action="store_true", help="widths and depths cut (a CPU smoke run)")
    ap.add_argument("--examples", type=int, default=8, help="VQA questions and captions per client")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tasks", choices=["understanding", "generation", "both"], default="both")
    ap.add_argument("--groups", nargs="+", default=None, help="towers to adapt (default: all the family's)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data", type=Path, default=None, help="an existing synthetic world (default: OUT/world)"
    )
    ap.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the unmeasured 1-client round"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also write OUT/profile-FAMILY-KK.txt: cProfile of each measured round (adds overhead)",
    )
    args = ap.parse_args(argv)
    if min(args.clients) < 1 or args.examples < 1 or args.batch_size < 1:
        ap.error("--clients, --examples and --batch-size must be >= 1")
    args.families = ["blip3o", "janus"] if args.family == "both" else [args.family]
    args.groups_of = {f: tuple(args.groups or family_info(f).towers) for f in args.families}
    return args


def table(result: dict[str, Any]) -> str:
    mem = "peak GPU allocated (GiB)" if result["device"] == "cuda" else "peak RSS, process (GiB)"
    counts = [
        f"{row['shape']}: backbone {row['backbone_params']:,} parameters "
        f"({row['backbone_bytes'] / 1e9:.2f} GB in {result['dtype']}), "
        f"adapter {row['adapter_params']:,} ({row['adapter_tensor_bytes'] / 1e6:.1f} MB)"
        for row in result["families"]
    ]
    if not any(row.get("rounds") for row in result["families"]):
        return "\n".join(counts)
    lines = [
        f"| model | K | {mem} | round (s) | bytes up / down per round | K x backbone (GiB) | K x 7.5 GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["families"]:
        for r in row.get("rounds", []):
            shared = r.get("peak_allocated_bytes", r.get("peak_rss_bytes"))
            lines.append(
                f"| {row['shape']} | {r['clients']} | {shared / 2**30:.2f} | {r['round_wall_s']:.1f} | "
                f"{r['bytes_up_per_round']:,} / {r['bytes_down_per_round']:,} | "
                f"{r['one_model_per_client_bytes'] / 2**30:.1f} | {r['fedumm_example_bytes'] / 1e9:.0f} GB |"
            )
    return "\n".join([*counts, "", *lines])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda: no CUDA device is visible to torch {torch.__version__}; "
            "use --device cpu --tiny for a smoke run, or --device meta for the counts",
            file=sys.stderr,
        )
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": " ".join(["benchmarks/gpu_rehearsal.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or "cpu",
        "dtype": args.dtype,
        "tiny": args.tiny,
        "torch": torch.__version__,
        "memory": {
            "cuda": "torch.cuda.max_memory_allocated / max_memory_reserved, reset before each round",
            "cpu": "the process's peak resident set so far (ru_maxrss): not reset between rounds",
            "meta": "none: counts only",
        }[args.device],
        "fedumm_example_bytes_per_client": FEDUMM_EXAMPLE_BYTES_PER_CLIENT,
        "examples_per_client_per_task": args.examples,
        "batch_size": args.batch_size,
        "lora": {"rank": args.rank, "alpha": args.alpha},
        "families": [],
    }
    try:
        world = None if args.device == "meta" else render_world(args, out)
        for name in args.families:
            result["families"].append(rehearse(name, args, world, out))
            atomic_write_json(out / "results.json", result)  # what finished survives a later failure
    except FedummError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(out / "results.json", result)
    print(table(result))
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
