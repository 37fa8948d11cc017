"""One run from a config: data, partition, baselines (zero-shot, centralized) and the federation.

The recipe composes the layers below it: sites from :mod:`fedumm.client.site`, the engine from the
registry in :mod:`fedumm.engines`, evaluation from :mod:`fedumm.eval`; it returns a typed
:class:`~fedumm.summary.RunSummary` (also written as summary.json).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from fedumm.client.adversary import arm, backdoor_test_set
from fedumm.client.site import (
    GENERATION_PARTITION,
    Site,
    build_family,
    client_splits,
    load_data,
    make_generation_partition,
    make_partition,
    train_spec,
)
from fedumm.client.train import num_steps, train_local
from fedumm.config import Config, dump_config
from fedumm.data.contamination import CaptionIndex, contamination, held_out_prompt_set
from fedumm.data.partition import save_partition
from fedumm.engines import FederationSetup, run_federation
from fedumm.errors import CheckpointError, ConfigError
from fedumm.eval.clients import client_accuracies
from fedumm.eval.generation import GenerationEvalSpec, evaluate_generation, flat_metrics, load_prompts
from fedumm.eval.tasks import evaluate_captions, evaluate_vqa, vqa_predictions
from fedumm.eval.vqa import accuracy_from_answers
from fedumm.fl.strategies import make_strategy
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_, state_num_params
from fedumm.plots import plot_accuracy_per_round
from fedumm.progress import NullProgress, Progress
from fedumm.seeding import derive_seed
from fedumm.server.run_dir import RunDir
from fedumm.server.trust import trust_settings
from fedumm.summary import ClientAccuracy, RunSummary, SettingResult
from fedumm.types import AdapterState, RoundRecord
from fedumm.wire import pack_state

log = logging.getLogger(__name__)
# metrics.jsonl, a round's "global": the test VQA after a round of federation.test_at_rounds
TEST_VQA_KEY = "test_vqa_accuracy"

__all__ = ["run_experiment", "resume_experiment", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def resume_experiment(out_dir: str | Path, *, progress: Progress | None = None) -> RunSummary:
    """Continue an interrupted run from its last good checkpoint, with the config saved in it."""
    from fedumm.config import load_config

    run = RunDir(out_dir)
    cfg_path = run.path / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run.path} holds no run to resume (config.yaml missing)")
    return run_experiment(load_config(cfg_path), out_dir, progress=progress, resume=True)


def _geneval_of(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k.removeprefix("geneval_"): v for k, v in metrics.items() if k.startswith("geneval_")}


def run_experiment(
    cfg: Config, out_dir: str | Path, *, progress: Progress | None = None, resume: bool = False
) -> RunSummary:
    """Run zero-shot, centralized and federated training as configured; return the run's summary.

    With ``resume`` the baselines already in summary.json are kept and the federation continues after
    the last good checkpoint; the result is bit-identical to an uninterrupted run, because every
    round depends only on the global adapter, the strategy state and seeds derived from the round.
    """
    progress = progress or NullProgress()
    t_start = time.perf_counter()
    run = RunDir(out_dir)
    previous = run.read_summary() if resume else None
    if previous is not None and previous.finished:
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
    loss_name = family.info.generation_loss
    spec = train_spec(cfg)
    sites = {}
    for name, d in splits.items():
        adversary, d = arm(cfg, name, d, work_dir=run.path)
        sites[name] = Site(name=name, family=family, data=d, spec=spec, adversary=adversary)
    initial = get_adapter_state(family.model)
    bs = cfg.train.eval_batch_size

    def evaluate(state: AdapterState, samples: Sequence, label: str) -> float:
        set_adapter_state_(family.model, state)
        progress.start("eval", f"eval {label}", -(-len(samples) // bs))
        acc = evaluate_vqa(family, samples, batch_size=bs, progress=lambda d, t: progress.update("eval", d))
        progress.finish("eval")
        return acc

    # each client's own answer mix (train and local validation), for the per-client view of the test split
    client_answers = {n: [s.multiple_choice_answer for s in (*d.train, *d.val)] for n, d in splits.items()}

    def evaluate_test(state: AdapterState, label: str) -> tuple[float, dict[str, ClientAccuracy]]:
        """Test accuracy, and every client's accuracy on its own answer distribution (same answers)."""
        set_adapter_state_(family.model, state)
        progress.start("eval", f"eval {label}", -(-len(data.test) // bs))
        preds = vqa_predictions(
            family, data.test, batch_size=bs, progress=lambda d, t: progress.update("eval", d)
        )
        progress.finish("eval")
        return accuracy_from_answers(preds, data.test), client_accuracies(preds, data.test, client_answers)

    def generation_loss(state: AdapterState, samples: Sequence) -> float | None:
        """In-domain generation: the family's generation loss on held-out captions (None without any)."""
        if not samples:
            return None
        set_adapter_state_(family.model, state)
        return round(
            evaluate_captions(family, samples, batch_size=bs, seed=derive_seed(cfg.seed, "gen-loss")), 4
        )

    prompts = (
        load_prompts(cfg.geneval.metadata, per_tag=cfg.geneval.per_tag, seed=cfg.seed)
        if cfg.geneval.enabled
        else []
    )
    contaminated: dict[str, int] = {}
    held_out: list = []
    if prompts:
        # the GenEval prompts against the captions of the train split (what clients may train on)
        index = CaptionIndex(c.caption for c in data.captions)
        contaminated = contamination(prompts, index)
        log.info(
            "GenEval prompts among the training captions: %(verbatim)d of %(prompts)d verbatim,"
            " %(composition)d by composition",
            contaminated,
        )
        if cfg.geneval.held_out:
            held_out = held_out_prompt_set(index, seed=cfg.seed, per_tag=cfg.geneval.per_tag)
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
        metrics = flat_metrics(result)
        if held_out:
            progress.start("geneval", f"GenEval {label}, held-out compositions", n_batches)
            result = evaluate_generation(
                family, held_out, spec=gen_spec, progress=lambda d, t: progress.update("geneval", d)
            )
            progress.finish("geneval")
            metrics |= flat_metrics(result, prefix="geneval_held_out")
        return metrics

    trust = trust_settings(cfg)
    summary = RunSummary(
        name=cfg.name,
        engine=cfg.engine,
        family=cfg.model.family,
        generation_loss_name=loss_name,
        full_model_bytes=full_bytes,
        adapter_params=state_num_params(initial),
        adapter_payload_bytes=len(pack_state(initial)),
        adversarial_clients=tuple(sorted(trust.adversaries)),
        geneval_contamination=contaminated,
        noise_multiplier=trust.privacy.noise_multiplier if trust.privacy else None,
        privacy_delta=trust.privacy.delta if trust.privacy else None,
    )
    start_round, start_state, server_state, client_state = 1, initial, {}, {}
    if previous is not None:
        summary = summary.with_(zero_shot=previous.zero_shot, centralized=previous.centralized)
        try:
            done, start_state, server_state, client_state = run.load_checkpoint()
            start_round = done + 1
        except CheckpointError as exc:
            log.warning("no usable checkpoint (%s); the federation restarts from round 1", exc)
        run.truncate_rounds(start_round - 1)
    try:
        if cfg.baselines.zero_shot and summary.zero_shot is None:
            # the pretrained model as shipped: LoRA B = 0 and no alignment tokens in its prompts
            with family.pretrained_prompts():
                acc, per_client = evaluate_test(initial, "zero-shot (test)")
                val = evaluate(initial, data.val, "zero-shot (val)")
                summary = summary.with_(
                    zero_shot=SettingResult(
                        vqa_accuracy=acc,
                        client_vqa=per_client,
                        val_vqa_accuracy=val,
                        generation_loss=generation_loss(initial, data.test_captions),
                        geneval=_geneval_of(evaluate_gen(initial, "zero-shot", "zero-shot")),
                    )
                )
        if cfg.baselines.centralized and summary.centralized is None:
            t0 = time.perf_counter()
            set_adapter_state_(family.model, initial)
            pooled = [s for d in splits.values() for s in d.train]
            pooled_gen = [s for d in splits.values() for s in d.gen_train]
            central_spec = train_spec(cfg, fed.rounds * cfg.train.local_epochs)
            steps = num_steps(len(pooled), central_spec, len(pooled_gen))
            progress.start("central", "centralized baseline: steps", steps)
            central_by_round: dict[int, float] = {}

            def central_checkpoint(epochs: int) -> None:
                """Test VQA after the examples a federation has seen by a round of test_at_rounds."""
                rnd, rest = divmod(epochs, cfg.train.local_epochs)
                if rest == 0 and rnd in fed.test_at_rounds and rnd != fed.rounds:
                    state = get_adapter_state(family.model)
                    central_by_round[rnd] = evaluate_test(state, f"centralized, {rnd} rounds' epochs (test)")[
                        0
                    ]

            res = train_local(
                family,
                pooled,
                spec=central_spec,
                seed=derive_seed(cfg.seed, "centralized"),
                progress=lambda d, t: progress.update("central", d),
                gen_samples=pooled_gen,
                on_epoch=central_checkpoint if fed.test_at_rounds else None,
            )
            progress.finish("central")
            central_state = get_adapter_state(family.model)
            acc, per_client = evaluate_test(central_state, "centralized (test)")
            val = evaluate(central_state, data.val, "centralized (val)")
            summary = summary.with_(
                centralized=SettingResult(
                    vqa_accuracy=acc,
                    vqa_by_round={**central_by_round, fed.rounds: acc} if fed.test_at_rounds else {},
                    client_vqa=per_client,
                    val_vqa_accuracy=val,
                    train_loss=res.loss,
                    generation_loss=generation_loss(central_state, data.test_captions),
                    geneval=_geneval_of(evaluate_gen(central_state, "centralized", "centralized")),
                    wall_time_s=time.perf_counter() - t0,
                )
            )
            run.write_summary(summary)

        strategy = make_strategy(fed.strategy, group_strategies=fed.group_strategies, **fed.strategy_params)
        strategy.load_state_dict(server_state)
        rounds_done: list[dict] = run.read_rounds()
        progress.start("rounds", "federated rounds", fed.rounds)
        progress.update("rounds", start_round - 1)

        def on_round(
            record: RoundRecord, state: AdapterState, client_side: Mapping[str, torch.Tensor]
        ) -> None:
            run.append_round(record)
            run.save_checkpoint(record.round, state, strategy.state_dict(), client_side)
            rounds_done.append(record.to_json())
            progress.update("rounds", record.round)

        def eval_round(state: AdapterState, rnd: int) -> dict[str, float]:
            metrics = {"vqa_accuracy": evaluate(state, data.val, f"round {rnd} (val)")}
            if rnd in fed.test_at_rounds and rnd != fed.rounds:  # the last round's is the federated result
                metrics[TEST_VQA_KEY] = evaluate_test(state, f"round {rnd} (test)")[0]
            loss = generation_loss(state, data.val_captions)
            if loss is not None:
                metrics[loss_name] = loss
            if rnd % cfg.geneval.every and rnd != fed.rounds:
                return metrics
            return metrics | evaluate_gen(state, f"round {rnd}", f"round-{rnd:04d}")

        t_fed = time.perf_counter()
        final = run_federation(
            FederationSetup(
                cfg=cfg,
                run=run,
                sites=sites,
                initial_state=initial,
                strategy=strategy,
                start_state=start_state,
                start_round=start_round,
                client_state=client_state,
                evaluate=eval_round,
                on_round=on_round,
                progress=progress,
                group_of=family.group_of,
            )
        )
        progress.finish("rounds")
        last = rounds_done[-1]["global"]
        acc, per_client = evaluate_test(final, "federated (test)")
        by_round = {r["round"]: r["global"][TEST_VQA_KEY] for r in rounds_done if TEST_VQA_KEY in r["global"]}
        summary = summary.with_(
            federated=SettingResult(
                vqa_accuracy=acc,
                vqa_by_round={**by_round, fed.rounds: acc} if fed.test_at_rounds else {},
                client_vqa=per_client,
                val_vqa_accuracy=last["vqa_accuracy"],
                rounds=fed.rounds,
                generation_loss=generation_loss(final, data.test_captions),
                # the last round's generations are those of the final adapter (same prompts and seed)
                geneval=_geneval_of(last),
                wall_time_s=time.perf_counter() - t_fed,
            ),
            bytes_up_per_round=max(r["bytes_up_total"] for r in rounds_done),
            bytes_down_per_round=max(r["bytes_down_total"] for r in rounds_done),
        )
        if cfg.adversary is not None and cfg.adversary.kind == "backdoor":
            triggered = backdoor_test_set(cfg.adversary, data.test, run.path)
            rate = evaluate(final, triggered, "attack success (triggered test)")
            summary = summary.with_(federated=replace(summary.federated, attack_success=rate))
        set_adapter_state_(family.model, final)
        run.save_peft_adapter(family)
        summary = summary.with_(status="finished")
    except KeyboardInterrupt:
        summary = summary.with_(status="interrupted")
        raise
    finally:
        summary = _finish(run, summary, t_start)
    return summary


def _finish(run: RunDir, summary: RunSummary, t_start: float) -> RunSummary:
    """Plot what finished and write summary.json (also after an error or Ctrl-C)."""
    rounds = run.read_rounds()
    if rounds:
        val_baselines = {
            "zero-shot": summary.zero_shot.val_vqa_accuracy if summary.zero_shot else None,
            "centralized": summary.centralized.val_vqa_accuracy if summary.centralized else None,
        }
        xs = [r["round"] for r in rounds]
        ys = [r["global"].get("vqa_accuracy") for r in rounds]
        if val_baselines["zero-shot"] is not None:
            xs, ys = [0, *xs], [val_baselines["zero-shot"], *ys]
        plot_accuracy_per_round(run.path / "accuracy_per_round.png", xs, ys, baselines=val_baselines)
        if any("geneval_overall" in r["global"] for r in rounds):
            base = {
                "zero-shot": summary.zero_shot.geneval_overall if summary.zero_shot else None,
                "centralized": summary.centralized.geneval_overall if summary.centralized else None,
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
    eps = [r["epsilon"] for r in rounds if r.get("epsilon") is not None]
    summary = summary.with_(
        epsilon=eps[-1] if eps else summary.epsilon,
        rounds_completed=len(rounds),
        wall_time_s=time.perf_counter() - t_start,
        peak_rss_bytes=peak_rss_bytes(),
        status="failed" if summary.status == "running" else summary.status,
    )
    run.write_summary(summary)
    return summary
