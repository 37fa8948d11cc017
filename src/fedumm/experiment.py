"""One run from a config: data, partition, baselines (zero-shot, centralized) and the federation."""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedumm.client.train import TrainSpec, evaluate_vqa, split_local_val, train_local
from fedumm.config import Config, dump_config
from fedumm.data.partition import build_partition, save_partition
from fedumm.errors import ConfigError
from fedumm.fl.strategies import make_strategy
from fedumm.models.base import LoraSpec
from fedumm.models.janus import JanusFamily
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_, state_num_params
from fedumm.plots import plot_accuracy_per_round
from fedumm.progress import NullProgress, Progress
from fedumm.seeding import derive_seed
from fedumm.server.rounds import RoundLoop
from fedumm.server.run_dir import RunDir
from fedumm.wire import pack_state

log = logging.getLogger(__name__)

__all__ = ["run_experiment", "peak_rss_bytes", "ExperimentData", "load_data"]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass(frozen=True, kw_only=True)
class ExperimentData:
    train: list
    val: list
    test: list


def load_data(cfg: Config) -> ExperimentData:
    """Load the train/val/test splits (building the synthetic world first if asked to)."""
    from fedumm.data.synth import synthesize
    from fedumm.data.vqa import load_split

    d = cfg.data
    if not d.path.exists() or not any(d.path.iterdir()):
        if not d.synthesize_if_missing:
            raise ConfigError(f"data.path {str(d.path)!r} does not exist; run `fedumm data synth --out {d.path}`")
        log.info("synthesizing the world into %s", d.path)
        synthesize(d.path, seed=cfg.seed, images=d.synth_images)
    train = load_split(d.path, d.train_split)
    val = load_split(d.path, d.val_split)
    test = load_split(d.path, d.test_split)
    if d.max_val_questions:
        val = val[: d.max_val_questions]
    if d.max_test_questions:
        test = test[: d.max_test_questions]
    return ExperimentData(train=train, val=val, test=test)


def _train_spec(cfg: Config, epochs: int) -> TrainSpec:
    t = cfg.train
    return TrainSpec(
        epochs=epochs,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        lr=t.lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        eval_batch_size=t.eval_batch_size,
    )


def build_family(cfg: Config) -> tuple[JanusFamily, int]:
    """Load the backbone, note the full-model size, attach LoRA."""
    family = JanusFamily.from_pretrained(
        cfg.model.path,
        device=cfg.model.device,
        prompt_template=cfg.model.prompt_template,
        max_answer_tokens=cfg.model.max_answer_tokens,
    )
    full_bytes = family.full_model_bytes()
    spec = LoraSpec(
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        groups=tuple(cfg.lora.groups),
        target_modules=tuple(cfg.lora.target_modules or ()),
    )
    family.attach_lora(spec, seed=derive_seed(cfg.seed, "lora-init"))
    return family, full_bytes


def run_experiment(cfg: Config, out_dir: str | Path, *, progress: Progress | None = None) -> dict:
    """Run zero-shot, centralized and federated training as configured; return summary.json's content."""
    from fedumm.engines.inprocess import InProcessEngine

    progress = progress or NullProgress()
    t_start = time.perf_counter()
    run = RunDir(out_dir)
    run.create(dump_config(cfg))
    data = load_data(cfg)
    fed = cfg.federation

    # ---- partition the private training split ----
    part = build_partition(
        [s.question_id for s in data.train],
        [s.multiple_choice_answer for s in data.train],
        num_clients=fed.clients,
        alpha=fed.alpha,
        min_size=fed.min_partition_size,
        seed=derive_seed(cfg.seed, "partition"),
    )
    save_partition(part, run.path / "partition.json")
    by_id = {s.question_id: s for s in data.train}
    client_data = {}
    for name, qids in part.clients.items():
        samples = [by_id[q] for q in qids]
        client_data[name] = split_local_val(
            samples, cfg.train.local_val_fraction, derive_seed(cfg.seed, "local-val", name)
        )

    family, full_bytes = build_family(cfg)
    initial = get_adapter_state(family.model)
    bs = cfg.train.eval_batch_size

    def evaluate(state, split_samples, label: str) -> float:
        set_adapter_state_(family.model, state)
        progress.start("eval", f"eval {label}", -(-len(split_samples) // bs))
        acc = evaluate_vqa(family, split_samples, batch_size=bs, progress=lambda d, t: progress.update("eval", d))
        progress.finish("eval")
        return acc

    summary: dict = {
        "name": cfg.name,
        "status": "running",
        "zero_shot": None,
        "centralized": None,
        "federated": None,
        "bytes_up_per_round": None,
        "bytes_down_per_round": None,
        "full_model_bytes": full_bytes,
        "adapter_params": state_num_params(initial),
        "adapter_payload_bytes": len(pack_state(initial)),
        "wall_time_s": None,
        "peak_rss_bytes": None,
    }
    val_baselines: dict[str, float | None] = {"zero-shot": None, "centralized": None}
    try:
        if cfg.baselines.zero_shot:
            acc = evaluate(initial, data.test, "zero-shot (test)")
            val_baselines["zero-shot"] = evaluate(initial, data.val, "zero-shot (val)")
            summary["zero_shot"] = {"vqa_accuracy": acc, "val_vqa_accuracy": val_baselines["zero-shot"]}
        if cfg.baselines.centralized:
            t0 = time.perf_counter()
            set_adapter_state_(family.model, initial)
            pooled = [s for train, _ in client_data.values() for s in train]
            epochs = fed.rounds * cfg.train.local_epochs
            spec = _train_spec(cfg, epochs)
            from fedumm.client.train import num_steps

            progress.start("central", "centralized baseline: steps", num_steps(len(pooled), spec))
            res = train_local(
                family, pooled, spec=spec, seed=derive_seed(cfg.seed, "centralized"),
                progress=lambda d, t: progress.update("central", d),
            )
            progress.finish("central")
            central_state = get_adapter_state(family.model)
            acc = evaluate(central_state, data.test, "centralized (test)")
            val_baselines["centralized"] = evaluate(central_state, data.val, "centralized (val)")
            summary["centralized"] = {
                "vqa_accuracy": acc,
                "val_vqa_accuracy": val_baselines["centralized"],
                "train_loss": res.loss,
                "wall_time_s": time.perf_counter() - t0,
            }
            run.write_summary(summary)

        strategy = make_strategy(fed.strategy, **fed.strategy_params)
        engine = InProcessEngine(
            family=family, client_data=client_data, spec=_train_spec(cfg, cfg.train.local_epochs),
            seed=cfg.seed, progress=progress,
        )
        rounds_done: list[dict] = []
        progress.start("rounds", "federated rounds", fed.rounds)

        def on_round(record, state) -> None:
            run.append_round(record)
            run.save_checkpoint(record.round, state, strategy.state_dict())
            rounds_done.append(record.to_json())
            progress.update("rounds", record.round)

        loop = RoundLoop(
            engine=engine,
            strategy=strategy,
            clients=list(client_data),
            num_rounds=fed.rounds,
            seed=cfg.seed,
            sample_fraction=fed.sample_fraction,
            min_clients=fed.min_clients,
            group_of=family.group_of,
            evaluate=lambda state, rnd: {"vqa_accuracy": evaluate(state, data.val, f"round {rnd} (val)")},
            on_round=on_round,
        )
        final = loop.run(initial)
        progress.finish("rounds")
        summary["federated"] = {
            "vqa_accuracy": evaluate(final, data.test, "federated (test)"),
            "val_vqa_accuracy": rounds_done[-1]["global"]["vqa_accuracy"],
            "rounds": fed.rounds,
        }
        set_adapter_state_(family.model, final)
        run.save_peft_adapter(family.model)
        summary["bytes_up_per_round"] = max(r["bytes_up_total"] for r in rounds_done)
        summary["bytes_down_per_round"] = max(r["bytes_down_total"] for r in rounds_done)
        summary["status"] = "finished"
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise
    finally:
        rounds = run.read_rounds()
        if rounds:
            plot_accuracy_per_round(
                run.path / "accuracy_per_round.png",
                [0] + [r["round"] for r in rounds] if val_baselines["zero-shot"] is not None else [r["round"] for r in rounds],
                ([val_baselines["zero-shot"]] if val_baselines["zero-shot"] is not None else [])
                + [r["global"].get("vqa_accuracy") for r in rounds],
                baselines=val_baselines,
            )
        summary["rounds_completed"] = len(rounds)
        summary["wall_time_s"] = time.perf_counter() - t_start
        summary["peak_rss_bytes"] = peak_rss_bytes()
        if summary["status"] == "running":
            summary["status"] = "failed"
        run.write_summary(summary)
    return summary
