"""One run from a config: data, partition, baselines (zero-shot, centralized) and the federation."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedumm.client.train import (
    ClientData,
    TrainSpec,
    evaluate_captions,
    evaluate_vqa,
    num_steps,
    split_local_val,
    train_local,
)
from fedumm.config import Config, dump_config
from fedumm.data.partition import Partition, build_partition, client_names, load_partition, save_partition
from fedumm.errors import CheckpointError, ConfigError
from fedumm.eval.generation import GenerationEvalSpec, evaluate_generation, flat_metrics, load_prompts
from fedumm.fl.strategies import make_strategy
from fedumm.models.base import LoraSpec
from fedumm.models.janus import JanusFamily
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_, state_num_params
from fedumm.plots import plot_accuracy_per_round
from fedumm.progress import NullProgress, Progress
from fedumm.seeding import derive_seed
from fedumm.server.rounds import RoundLoop
from fedumm.server.run_dir import RunDir
from fedumm.types import AdapterState, RoundRecord
from fedumm.wire import pack_state

log = logging.getLogger(__name__)

GENERATION_PARTITION = "generation_partition.json"

__all__ = [
    "run_experiment",
    "peak_rss_bytes",
    "ExperimentData",
    "load_data",
    "make_partition",
    "client_splits",
    "build_family",
    "train_spec",
    "load_client",
    "resume_experiment",
]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass(frozen=True, kw_only=True)
class ExperimentData:
    train: list
    val: list
    test: list
    captions: list = field(default_factory=list)  # caption examples of the train split (generation)
    val_captions: list = field(default_factory=list)  # captions of the val split (in-domain generation loss)
    test_captions: list = field(default_factory=list)  # captions of the test split


def needs_generation(cfg: Config) -> bool:
    """Whether any client trains generation."""
    return bool(set(cfg.federation.task_of_clients()) & {"generation", "both"})


def load_data(cfg: Config, *, eval_splits: bool = True) -> ExperimentData:
    """Load the train/val/test splits (building the synthetic world first if asked to)."""
    from fedumm.data.captions import load_captions
    from fedumm.data.synth import synthesize, world_mismatch
    from fedumm.data.vqa import load_split

    d = cfg.data
    if not d.path.exists() or not any(d.path.iterdir()):
        if not d.synthesize_if_missing:
            raise ConfigError(
                f"data.path {str(d.path)!r} does not exist; run `fedumm data synth --out {d.path}`"
            )
        log.info("synthesizing the world into %s", d.path)
        synthesize(d.path, seed=cfg.seed, images=d.synth_images)
    elif d.synthesize_if_missing and (stale := world_mismatch(d.path, seed=cfg.seed, images=d.synth_images)):
        log.warning("re-rendering the synthetic world in %s (%s)", d.path, stale)
        synthesize(d.path, seed=cfg.seed, images=d.synth_images)
    train = load_split(d.path, d.train_split)
    val = load_split(d.path, d.val_split) if eval_splits else []
    test = load_split(d.path, d.test_split) if eval_splits else []
    if d.max_val_questions:
        val = val[: d.max_val_questions]
    if d.max_test_questions:
        test = test[: d.max_test_questions]
    generation = needs_generation(cfg)
    captions = load_captions(d.path, d.train_split) if generation else []

    def held_out(split: str) -> list:
        # evaluation splits without a captions file (VQA-only data) just skip the generation loss
        if not (generation and eval_splits and (d.path / f"captions_{split}.json").is_file()):
            return []
        return load_captions(d.path, split)

    return ExperimentData(
        train=train,
        val=val,
        test=test,
        captions=captions,
        val_captions=held_out(d.val_split),
        test_captions=held_out(d.test_split),
    )


def _relabel(partition: Partition, names: Sequence[str], everyone: Sequence[str]) -> Partition:
    """Rename a partition's clients to ``names`` and add the others of ``everyone`` with no data."""
    renamed = dict(zip(partition.clients, names, strict=True))
    clients = {n: () for n in everyone}
    counts: dict[str, dict[str, int]] = {n: {} for n in everyone}
    for old, new in renamed.items():
        clients[new] = partition.clients[old]
        counts[new] = dict(partition.answer_counts[old])
    return Partition(clients=clients, answer_counts=counts, meta=None)


def _empty_partition(names: Sequence[str]) -> Partition:
    return Partition(clients={n: () for n in names}, answer_counts={n: {} for n in names}, meta=None)


def make_partition(cfg: Config, train: Sequence) -> Partition:
    """Dirichlet partition of the VQA training split over the understanding clients, seeded from the run seed.

    Clients whose task mix has no understanding are listed with no examples.
    """
    fed = cfg.federation
    names = client_names(fed.clients)
    tasks = fed.task_of_clients()
    mine = [n for n, t in zip(names, tasks, strict=True) if t in ("understanding", "both")]
    if not mine:
        return _empty_partition(names)
    part = build_partition(
        [s.question_id for s in train],
        [s.multiple_choice_answer for s in train],
        num_clients=len(mine),
        alpha=fed.alpha,
        min_size=fed.min_partition_size,
        seed=derive_seed(cfg.seed, "partition"),
    )
    return part if len(mine) == len(names) else _relabel(part, mine, names)


def make_generation_partition(cfg: Config, captions: Sequence) -> Partition:
    """Dirichlet partition of the caption images over the generation clients, skewed by object class.

    Ids are image ids (every caption of an image goes to the same client); the label of an image is
    the first object class its first caption names.
    """
    from fedumm.data.captions import caption_class, captions_by_image

    fed = cfg.federation
    names = client_names(fed.clients)
    tasks = fed.task_of_clients()
    mine = [n for n, t in zip(names, tasks, strict=True) if t in ("generation", "both")]
    if not mine:
        return _empty_partition(names)
    grouped = captions_by_image(captions)
    if not grouped:
        raise ConfigError(f"data.path {str(cfg.data.path)!r}: split {cfg.data.train_split!r} has no captions")
    part = build_partition(
        list(grouped),
        [caption_class(c[0].caption) for c in grouped.values()],
        num_clients=len(mine),
        alpha=fed.alpha,
        min_size=max(1, min(fed.min_partition_size, len(grouped) // max(1, len(mine)))),
        seed=derive_seed(cfg.seed, "generation-partition"),
    )
    return _relabel(part, mine, names)


def _client_data(cfg: Config, name: str, vqa: Sequence, captions: Sequence) -> ClientData:
    train, val = split_local_val(vqa, cfg.train.local_val_fraction, derive_seed(cfg.seed, "local-val", name))
    gen_train, gen_val = split_local_val(
        captions, cfg.train.local_val_fraction, derive_seed(cfg.seed, "local-val-captions", name)
    )
    return ClientData(train=train, val=val, gen_train=gen_train, gen_val=gen_val)


def local_client_data(cfg: Config, name: str, vqa: Sequence, captions: Sequence, *, task: str) -> ClientData:
    """A site's data when all of its split is its own (production), for its task mix."""
    vqa = vqa if task in ("understanding", "both") else []
    captions = captions if task in ("generation", "both") else []
    return _client_data(cfg, name, vqa, captions)


def client_splits(
    cfg: Config,
    train: Sequence,
    partition: Partition,
    captions: Sequence = (),
    gen_partition: Partition | None = None,
) -> dict[str, ClientData]:
    """Per client: local training and validation examples (VQA and captions)."""
    by_id = {s.question_id: s for s in train}
    by_image: dict[int, list] = {}
    for c in captions:
        by_image.setdefault(c.image_id, []).append(c)
    out = {}
    for name, qids in partition.clients.items():
        samples = [by_id[q] for q in qids]
        mine = [
            c for i in (gen_partition.clients.get(name, ()) if gen_partition else ()) for c in by_image[i]
        ]
        out[name] = _client_data(cfg, name, samples, mine)
    return out


def train_spec(cfg: Config, epochs: int | None = None) -> TrainSpec:
    t = cfg.train
    return TrainSpec(
        epochs=epochs or t.local_epochs,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        lr=t.lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        eval_batch_size=t.eval_batch_size,
    )


def build_family(cfg: Config) -> tuple[JanusFamily, int]:
    """Load the backbone, note the full-model size, attach LoRA (same initial adapter everywhere)."""
    family = JanusFamily.from_pretrained(
        cfg.model.path,
        device=cfg.model.device,
        prompt_template=cfg.model.prompt_template,
        max_answer_tokens=cfg.model.max_answer_tokens,
        alignment_tokens=cfg.lora.alignment_tokens,
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


def load_client(cfg: Config, partition_path: str | Path, client: str) -> tuple[JanusFamily, ClientData]:
    """Everything one client process needs: its model and its local data.

    ``partition_path`` is the run's partition.json; a generation_partition.json beside it assigns
    caption images.
    """
    data = load_data(cfg, eval_splits=False)
    part = load_partition(partition_path)
    if client not in part.clients:
        raise ConfigError(
            f"client {client!r} is not in {partition_path} (clients: {', '.join(part.clients)})"
        )
    gen_path = Path(partition_path).with_name(GENERATION_PARTITION)
    gen_part = load_partition(gen_path) if data.captions and gen_path.is_file() else None
    splits = client_splits(
        cfg,
        data.train,
        Partition(clients={client: part.clients[client]}, answer_counts={client: part.answer_counts[client]}),
        data.captions,
        gen_part,
    )
    family, _ = build_family(cfg)
    return family, splits[client]


def resume_experiment(out_dir: str | Path, *, progress: Progress | None = None) -> dict:
    """Continue an interrupted run from its last good checkpoint, with the config saved in it."""
    from fedumm.config import load_config

    run = RunDir(out_dir)
    cfg_path = run.path / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run.path} holds no run to resume (config.yaml missing)")
    return run_experiment(load_config(cfg_path), out_dir, progress=progress, resume=True)


def run_experiment(
    cfg: Config, out_dir: str | Path, *, progress: Progress | None = None, resume: bool = False
) -> dict:
    """Run zero-shot, centralized and federated training as configured; return summary.json's content.

    With ``resume`` the baselines already in summary.json are kept and the federation continues after
    the last good checkpoint; the result is bit-identical to an uninterrupted run, because every
    round depends only on the global adapter, the strategy state and seeds derived from the round.
    """
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    run = RunDir(out_dir)
    previous = run.read_summary() if resume else {}
    if resume and previous.get("status") == "finished":
        return previous
    run.create(dump_config(cfg), resume=resume)
    data = load_data(cfg)
    fed = cfg.federation

    partition = make_partition(cfg, data.train)
    save_partition(partition, run.path / "partition.json")
    gen_partition = None
    if data.captions:
        gen_partition = make_generation_partition(cfg, data.captions)
        save_partition(gen_partition, run.path / GENERATION_PARTITION)
    splits = client_splits(cfg, data.train, partition, data.captions, gen_partition)

    family, full_bytes = build_family(cfg)
    initial = get_adapter_state(family.model)
    bs = cfg.train.eval_batch_size

    def evaluate(state: AdapterState, samples: Sequence, label: str) -> float:
        set_adapter_state_(family.model, state)
        progress.start("eval", f"eval {label}", -(-len(samples) // bs))
        acc = evaluate_vqa(family, samples, batch_size=bs, progress=lambda d, t: progress.update("eval", d))
        progress.finish("eval")
        return acc

    def generation_loss(state: AdapterState, samples: Sequence) -> dict[str, float]:
        """In-domain generation: mean image-token cross-entropy on held-out captions ({} without any)."""
        if not samples:
            return {}
        set_adapter_state_(family.model, state)
        return {"image_token_loss": round(evaluate_captions(family, samples, batch_size=bs), 4)}

    prompts = (
        load_prompts(cfg.geneval.metadata, per_tag=cfg.geneval.per_tag, seed=cfg.seed)
        if cfg.geneval.enabled
        else []
    )
    gen_spec = GenerationEvalSpec(
        images_per_prompt=cfg.geneval.images_per_prompt,
        guidance_scale=cfg.geneval.guidance_scale,
        temperature=cfg.geneval.temperature,
        seed=derive_seed(cfg.seed, "geneval"),
        grid_prompts=cfg.geneval.grid_prompts,
    )

    def evaluate_gen(state: AdapterState, label: str, grid_name: str) -> dict[str, float]:
        """GenEval overall and per tag (percent), with an image grid; {} when GenEval is off."""
        if not prompts:
            return {}
        set_adapter_state_(family.model, state)
        n_batches = -(-len(prompts) // gen_spec.prompts_per_batch)
        progress.start("geneval", f"GenEval {label}", n_batches)
        result = evaluate_generation(
            family,
            prompts,
            spec=gen_spec,
            grid_path=run.path / "geneval" / f"{grid_name}.png" if gen_spec.grid_prompts else None,
            grid_title=f"{cfg.name}: {label}",
            progress=lambda d, t: progress.update("geneval", d),
        )
        progress.finish("geneval")
        return flat_metrics(result)

    summary: dict = {
        "name": cfg.name,
        "engine": cfg.engine,
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
    start_round, start_state, server_state, client_state = 1, initial, {}, {}
    if resume:
        for key in ("zero_shot", "centralized"):
            summary[key] = previous.get(key)
        val_baselines["zero-shot"] = (summary["zero_shot"] or {}).get("val_vqa_accuracy")
        val_baselines["centralized"] = (summary["centralized"] or {}).get("val_vqa_accuracy")
        try:
            done, start_state, server_state, client_state = run.load_checkpoint()
            start_round = done + 1
        except CheckpointError as exc:
            log.warning("no usable checkpoint (%s); the federation restarts from round 1", exc)
        run.truncate_rounds(start_round - 1)
    try:
        if cfg.baselines.zero_shot and summary["zero_shot"] is None:
            # the pretrained model as shipped: LoRA B = 0 and no alignment tokens in its prompts
            with family.pretrained_prompts():
                acc = evaluate(initial, data.test, "zero-shot (test)")
                val_baselines["zero-shot"] = evaluate(initial, data.val, "zero-shot (val)")
                summary["zero_shot"] = {
                    "vqa_accuracy": acc,
                    "val_vqa_accuracy": val_baselines["zero-shot"],
                    **generation_loss(initial, data.test_captions),
                    **evaluate_gen(initial, "zero-shot", "zero-shot"),
                }
        if cfg.baselines.centralized and summary["centralized"] is None:
            t0 = time.perf_counter()
            set_adapter_state_(family.model, initial)
            pooled = [s for d in splits.values() for s in d.train]
            pooled_gen = [s for d in splits.values() for s in d.gen_train]
            spec = train_spec(cfg, fed.rounds * cfg.train.local_epochs)
            steps = num_steps(len(pooled), spec, len(pooled_gen))
            progress.start("central", "centralized baseline: steps", steps)
            res = train_local(
                family,
                pooled,
                spec=spec,
                seed=derive_seed(cfg.seed, "centralized"),
                progress=lambda d, t: progress.update("central", d),
                gen_samples=pooled_gen,
            )
            progress.finish("central")
            central_state = get_adapter_state(family.model)
            acc = evaluate(central_state, data.test, "centralized (test)")
            val_baselines["centralized"] = evaluate(central_state, data.val, "centralized (val)")
            summary["centralized"] = {
                "vqa_accuracy": acc,
                "val_vqa_accuracy": val_baselines["centralized"],
                "train_loss": res.loss,
                **generation_loss(central_state, data.test_captions),
                **evaluate_gen(central_state, "centralized", "centralized"),
                "wall_time_s": time.perf_counter() - t0,
            }
            run.write_summary(summary)

        strategy = make_strategy(fed.strategy, group_strategies=fed.group_strategies, **fed.strategy_params)
        strategy.load_state_dict(server_state)
        rounds_done: list[dict] = run.read_rounds()
        progress.start("rounds", "federated rounds", fed.rounds)
        progress.update("rounds", start_round - 1)

        engine = None

        def on_round(record: RoundRecord, state: AdapterState) -> None:
            run.append_round(record)
            client_side = engine.state_dict() if engine is not None else {}
            run.save_checkpoint(record.round, state, strategy.state_dict(), client_side)
            rounds_done.append(record.to_json())
            progress.update("rounds", record.round)

        def eval_round(state: AdapterState, rnd: int) -> dict[str, float]:
            metrics = {"vqa_accuracy": evaluate(state, data.val, f"round {rnd} (val)")}
            metrics |= generation_loss(state, data.val_captions)
            if rnd % cfg.geneval.every and rnd != fed.rounds:
                return metrics
            return metrics | evaluate_gen(state, f"round {rnd}", f"round-{rnd:04d}")

        t_fed = time.perf_counter()
        if cfg.engine == "inprocess":
            from fedumm.engines.inprocess import InProcessEngine

            engine = InProcessEngine(
                family=family,
                client_data=splits,
                spec=train_spec(cfg),
                seed=cfg.seed,
                progress=progress,
                proximal_mu=strategy.proximal_mu,
                frozen_suffixes=strategy.frozen_suffixes,
                codec=fed.compression,
                error_feedback=fed.error_feedback,
            )
            engine.load_state_dict(client_state)
            loop = RoundLoop(
                engine=engine,
                strategy=strategy,
                clients=list(splits),
                num_rounds=fed.rounds,
                seed=cfg.seed,
                sample_fraction=fed.sample_fraction,
                min_clients=fed.min_clients,
                group_of=family.group_of,
                evaluate=eval_round,
                on_round=on_round,
            )
            final = loop.run(start_state, start_round=start_round)
        else:
            from fedumm.engines.nvflare import run_nvflare

            # the FLARE server never builds the backbone: global evaluation happens here, per round,
            # on the adapters the server wrote
            if start_round > 1:
                raise ConfigError("--resume is supported by the in-process engine only")
            if fed.compression != "none":
                raise ConfigError(f"federation.compression={fed.compression!r} is in-process only for now")
            final = run_nvflare(
                cfg,
                run,
                initial_state=initial,
                evaluate=eval_round,
                on_round=on_round,
                progress=progress,
                strategy=strategy,
            )
        progress.finish("rounds")
        summary["federated"] = {
            "vqa_accuracy": evaluate(final, data.test, "federated (test)"),
            "val_vqa_accuracy": rounds_done[-1]["global"]["vqa_accuracy"],
            "rounds": fed.rounds,
            **generation_loss(final, data.test_captions),
            # the last round's generations are those of the final adapter (same prompts and seed)
            **{k: v for k, v in rounds_done[-1]["global"].items() if k.startswith("geneval_")},
            "wall_time_s": time.perf_counter() - t_fed,
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
        _finish(run, summary, val_baselines, t_start)
    return summary


def _finish(run: RunDir, summary: dict, val_baselines: dict, t_start: float) -> None:
    """Plot what finished and write summary.json (also after an error or Ctrl-C)."""
    rounds = run.read_rounds()
    if rounds:
        xs = [r["round"] for r in rounds]
        ys = [r["global"].get("vqa_accuracy") for r in rounds]
        if val_baselines["zero-shot"] is not None:
            xs, ys = [0, *xs], [val_baselines["zero-shot"], *ys]
        plot_accuracy_per_round(run.path / "accuracy_per_round.png", xs, ys, baselines=val_baselines)
        if any("geneval_overall" in r["global"] for r in rounds):
            base = {
                name: (summary.get(key) or {}).get("geneval_overall")
                for name, key in (("zero-shot", "zero_shot"), ("centralized", "centralized"))
            }
            scored = [r for r in rounds if "geneval_overall" in r["global"]]
            xs = [r["round"] for r in scored]
            ys = [r["global"]["geneval_overall"] for r in scored]
            if base["zero-shot"] is not None:
                xs, ys = [0, *xs], [base["zero-shot"], *ys]
            plot_accuracy_per_round(
                run.path / "geneval_per_round.png",
                xs,
                ys,
                baselines=base,
                title="GenEval overall (built-in detector)",
                ylabel="GenEval overall (%)",
            )
    summary["rounds_completed"] = len(rounds)
    summary["wall_time_s"] = time.perf_counter() - t_start
    summary["peak_rss_bytes"] = peak_rss_bytes()
    if summary["status"] == "running":
        summary["status"] = "failed"
    run.write_summary(summary)
