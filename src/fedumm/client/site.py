"""Building a site: its data, its slice of the partition, its model and its training spec.

Every engine builds its sites through this module (the in-process engine all of them in one process,
a FLARE client its own), so a site is the same wherever it runs. The run recipe
(:mod:`fedumm.experiment`) uses it too; nothing here knows about rounds or engines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedumm.client.adversary import Adversary, arm
from fedumm.client.train import ClientData, TrainSpec, split_local_val
from fedumm.config import Config
from fedumm.data.partition import Partition, build_partition, client_names, load_partition
from fedumm.errors import ConfigError
from fedumm.models import load_family
from fedumm.models.base import FamilyOptions, LoraSpec, ModelFamily
from fedumm.seeding import derive_seed

log = logging.getLogger(__name__)

GENERATION_PARTITION = "generation_partition.json"

__all__ = [
    "GENERATION_PARTITION",
    "RunData",
    "Site",
    "build_family",
    "build_site",
    "client_splits",
    "family_options",
    "load_client",
    "load_data",
    "local_client_data",
    "lora_spec",
    "make_generation_partition",
    "make_partition",
    "partitioned_client_data",
    "prepare_world",
    "needs_generation",
    "train_spec",
]


@dataclass(frozen=True, kw_only=True)
class RunData:
    train: list
    val: list
    test: list
    captions: list = field(default_factory=list)  # caption examples of the train split (generation)
    val_captions: list = field(default_factory=list)  # captions of the val split (in-domain generation loss)
    test_captions: list = field(default_factory=list)  # captions of the test split


def needs_generation(cfg: Config) -> bool:
    """Whether any client trains generation."""
    return bool(set(cfg.federation.task_of_clients()) & {"generation", "both"})


def prepare_world(cfg: Config) -> None:
    """Make ``data.path`` hold the world the config reads: build the synthetic world when it is
    missing, or re-render it for another seed or size, where ``data.synthesize_if_missing`` asks."""
    from fedumm.data.synth import synthesize, world_mismatch

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


def load_data(cfg: Config, *, eval_splits: bool = True) -> RunData:
    """Load the train/val/test splits (building the synthetic world first if asked to)."""
    from fedumm.data.captions import load_captions
    from fedumm.data.vqa import load_split

    d = cfg.data
    prepare_world(cfg)
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

    return RunData(
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


def lora_spec(cfg: Config) -> LoraSpec:
    return LoraSpec(
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        groups=tuple(cfg.lora.groups),
        target_modules=tuple(cfg.lora.target_modules or ()),
    )


def family_options(cfg: Config) -> FamilyOptions:
    return FamilyOptions(
        prompt_template=cfg.model.prompt_template,
        max_answer_tokens=cfg.model.max_answer_tokens,
        alignment_tokens=cfg.lora.alignment_tokens,
        device=cfg.model.device,
    )


def build_family(cfg: Config) -> tuple[ModelFamily, int]:
    """Load the configured family's backbone, note the full-model size, attach LoRA (the same
    initial adapter on every participant)."""
    family = load_family(cfg.model.family, cfg.model.path, options=family_options(cfg))
    full_bytes = family.full_model_bytes()
    family.attach_lora(lora_spec(cfg), seed=derive_seed(cfg.seed, "lora-init"))
    return family, full_bytes


def load_client(cfg: Config, partition_path: str | Path, client: str) -> tuple[ModelFamily, ClientData]:
    """Everything one client process needs: its model and its local data.

    ``partition_path`` is the run's partition.json; a generation_partition.json beside it assigns
    caption images.
    """
    data = partitioned_client_data(cfg, partition_path, client)
    family, _ = build_family(cfg)
    return family, data


def partitioned_client_data(
    cfg: Config, partition_path: str | Path, client: str, *, run_data: RunData | None = None
) -> ClientData:
    """Client ``client``'s local data as the run's partition (and generation partition) assign it;
    ``run_data``: the training splits already loaded (a process building many sites loads them once)."""
    data = run_data if run_data is not None else load_data(cfg, eval_splits=False)
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
    return splits[client]


@dataclass(frozen=True, kw_only=True)
class Site:
    """One site ready to train: its model (LoRA attached), its data and its local training spec."""

    name: str
    family: ModelFamily
    data: ClientData
    spec: TrainSpec
    adversary: Adversary | None = None  # a simulated attacker (fedumm.client.adversary); None: honest


def build_site(
    cfg: Config,
    name: str,
    *,
    partition_path: str | Path | None = None,
    family: ModelFamily | None = None,
    run_data: RunData | None = None,
) -> Site:
    """A site as an engine's client process builds it.

    With ``partition_path`` (simulation, POC) the run's partition says which examples are this
    site's; without (production) every example of its own training split is its data, for its task
    mix (``federation.tasks``). ``family``: a backbone (LoRA attached) this site shares with others
    trained in the same process; ``run_data``: the training splits already loaded; each is loaded
    here when not given.
    """
    run_data = run_data if run_data is not None else load_data(cfg, eval_splits=False)
    if family is None:
        family, _ = build_family(cfg)
    if partition_path is not None:
        data = partitioned_client_data(cfg, partition_path, name, run_data=run_data)
        # simulation: the run directory (beside the partition) holds an attacker's triggered images
        adversary, data = arm(cfg, name, data, work_dir=Path(partition_path).parent)
        return Site(name=name, family=family, data=data, spec=train_spec(cfg), adversary=adversary)
    data = local_client_data(cfg, name, run_data.train, run_data.captions, task=cfg.federation.tasks)
    return Site(name=name, family=family, data=data, spec=train_spec(cfg))
