"""The model-family contract: everything the rest of fedumm asks of a family, and the LoRA wiring
every family shares.

A family is one folder under ``models/`` (``models/janus/``, ``models/blip3o/``). Its package
``__init__`` registers a :class:`FamilyInfo` in :data:`FAMILIES` (cheap: no model library is
imported), which is what config validation and the FLARE server need: tower names, the adapter
group of a key, which towers each task trains. The heavy class, a :class:`ModelFamily` subclass,
is imported on first load (:meth:`FamilyInfo.load_class`).

A :class:`ModelFamily` holds a frozen backbone (``base``) and at most one peft LoRA adapter on it
(``model``). The shared parts (LoRA targets from the towers, attaching, loading and saving the adapter
in peft's layout, adapter groups, full-model bytes) are implemented here once; a family implements
loading, alignment-token placement, understanding (VQA batches, loss, answers), generation (caption
batches, loss, seeded sampling) and its own pretraining.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fedumm.errors import ConfigError
from fedumm.registry import Registry

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from PIL import Image

    from fedumm.models.images import EncodingCache
    from fedumm.progress import Progress

__all__ = [
    "ALIGNMENT_GROUP",
    "DTYPES",
    "FAMILIES",
    "TASKS",
    "FamilyInfo",
    "FamilyOptions",
    "LoraSpec",
    "ModelFamily",
    "Tower",
    "attach_lora",
    "built_on",
    "spec_from_overrides",
]

ALIGNMENT_GROUP = "alignment"  # the shared alignment tokens: an adapter group of their own
OTHER_GROUP = "other"  # a key no tower claims (never produced by a family's own adapter)
TASKS: tuple[str, ...] = ("understanding", "generation")


@dataclass(frozen=True, kw_only=True)
class Tower:
    """One tower of a family: where it lives in the module tree and what LoRA adapts in it.

    ``prefix`` is a regex matching the tower's module-name prefix (full names, as peft sees them
    inside the base model). ``modules`` are the default LoRA target module names inside it;
    ``whole`` are modules trained entirely (peft ``modules_to_save``: small tensors such as learnable
    query tokens), which travel in the adapter state like LoRA factors.
    """

    prefix: str
    modules: tuple[str, ...]
    whole: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class FamilyInfo:
    """What is known about a family without loading a model (configs, the FLARE server, docs)."""

    name: str
    description: str
    towers: Mapping[str, Tower]
    # task -> towers its gradients reach (per-modality aggregation weights); alignment tokens are
    # trained by every task
    task_towers: Mapping[str, tuple[str, ...]]
    default_prompt_template: str
    loader: str  # "package.module:Class" of the ModelFamily subclass
    # the in-domain generation loss (``caption_loss`` on held-out captions): summary key and label
    generation_loss: str = "image_token_loss"
    generation_loss_label: str = "image-token loss"

    def __post_init__(self) -> None:
        for task, towers in self.task_towers.items():
            if task not in TASKS:
                raise ValueError(f"family {self.name!r}: unknown task {task!r}")
            unknown = [t for t in towers if t not in self.towers]
            if unknown:
                raise ValueError(f"family {self.name!r}: task {task!r} names unknown towers {unknown}")

    @property
    def groups(self) -> tuple[str, ...]:
        """Every adapter group: the towers, then the alignment tokens."""
        return (*self.towers, ALIGNMENT_GROUP)

    def check_groups(self, groups: Sequence[str], what: str = "lora.groups") -> None:
        """A ConfigError naming the first tower this family does not have."""
        for g in groups:
            if g not in self.towers:
                raise ConfigError(
                    f"{what}: family {self.name!r} has no tower {g!r}; its towers: {', '.join(self.towers)}"
                )

    def group_of(self, key: str) -> str:
        """Adapter group of a canonical adapter key: its tower, or the alignment tokens."""
        if ".trainable_tokens_" in key:
            return ALIGNMENT_GROUP
        for g, tower in self.towers.items():
            if re.search(rf"(?:^|\.){tower.prefix}\.", key):
                return g
        return OTHER_GROUP

    def group_examples(self, examples: Mapping[str, int]) -> dict[str, int]:
        """Examples that trained each adapter group, from examples per task."""
        out = {g: 0 for g in self.towers}
        for task, n in examples.items():
            for tower in self.task_towers.get(task, ()):
                out[tower] += n
        everything = sum(examples.values())
        out[ALIGNMENT_GROUP] = everything
        out[OTHER_GROUP] = everything
        return out

    def load_class(self) -> type[ModelFamily]:
        """Import the family's model class (this is where transformers / diffusers get imported)."""
        module, _, name = self.loader.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
            raise TypeError(f"{self.loader} is not a ModelFamily")
        return cls


FAMILIES: Registry[FamilyInfo] = Registry("model family")
"""Registered families by name; filled by each family package (see :mod:`fedumm.models`)."""


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """LoRA hyperparameters (paper defaults r=16, alpha=32) and which towers to adapt."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    groups: tuple[str, ...] = ("language",)  # towers, names from the family
    target_modules: tuple[str, ...] = ()  # empty: each tower's default modules


@dataclass(frozen=True, kw_only=True)
class FamilyOptions:
    """Run-time options of a loaded family (from ``model.*`` and ``lora.alignment_tokens``)."""

    prompt_template: str | None = None  # None: the family's default
    max_answer_tokens: int = 3
    alignment_tokens: int = 0
    device: str = "cpu"
    extra: Mapping[str, Any] = field(default_factory=dict)  # family-specific settings


def spec_from_overrides(cls: type, overrides: Mapping[str, Any], **fixed: Any) -> Any:
    """A (frozen) dataclass spec with ``overrides`` applied; an unknown or bad field is a ConfigError."""
    import dataclasses
    import difflib

    names = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if key not in names or key in fixed:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{cls.__name__}: unknown setting {key!r}{hint}; settings: {', '.join(names)}")
    try:
        return cls(**fixed, **overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


@contextlib.contextmanager
def built_on(device: str | torch.device, dtype: str, *, seed: int) -> Iterator[None]:
    """Within the block, new modules are created on ``device`` in ``dtype`` (``bf16`` or ``fp32``) and
    initialised from ``seed``: a model of several billion parameters never exists anywhere else first.

    The default dtype is process-wide; it is restored when the block ends.
    """
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    where = torch.device(device)
    previous = torch.get_default_dtype()
    # the random state of the device the weights are drawn on is forked too, then restored
    forked = [where.index or 0] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), where:
        torch.manual_seed(seed)
        torch.set_default_dtype(getattr(torch, DTYPES[dtype]))
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def attach_lora(
    model: torch.nn.Module,
    *,
    spec: LoraSpec,
    target: str,
    seed: int,
    trainable_tokens: dict[str, list[int]] | None = None,
    modules_to_save: Sequence[str] = (),
) -> PeftModel:
    """Wrap ``model`` with peft LoRA; the backbone is frozen, only adapter weights train.

    ``trainable_tokens`` (module name -> token ids) also trains those rows of an embedding through
    peft's trainable-token adapter (the shared alignment tokens); ``modules_to_save`` trains those
    modules whole.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target,
        bias="none",
        trainable_token_indices=trainable_tokens or None,
        modules_to_save=list(modules_to_save) or None,
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing: a FutureWarning per run
        # that the user can do nothing about
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)  # the initial A matrices are the same on every client and server
        peft_model = get_peft_model(model, config)
    return peft_model


class ModelFamily(ABC):
    """A frozen backbone with at most one peft LoRA adapter, and the task hooks the loop needs.

    Subclasses set :attr:`info`, build ``base`` (an ``nn.Module``) and implement the abstract
    methods. ``model`` is the peft-wrapped backbone once :meth:`attach_lora` or :meth:`load_adapter`
    ran, else None (then the bare backbone runs the task hooks).
    """

    info: ClassVar[FamilyInfo]

    base: torch.nn.Module
    model: PeftModel | None
    device: torch.device
    # what the task hooks compute once per image or prompt (pixels, token ids); clear() forgets it
    encodings: EncodingCache

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def builtin_path(cls) -> Path:
        """The shipped tiny checkpoint of this family."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path | None, *, options: FamilyOptions) -> ModelFamily:
        """Load a local checkpoint directory (None: the built-in one); never downloads."""

    @classmethod
    def random_weights(
        cls,
        model_config: str | Path,
        generator_config: str | Path | None = None,
        *,
        options: FamilyOptions | None = None,
        dtype: str = "bf16",
        seed: int = 0,
    ) -> ModelFamily:
        """This family at the shapes of a released model's configs (``configs/models/``), freshly
        initialised straight on ``options.device`` in ``dtype`` (``bf16`` or ``fp32``): no checkpoint, no
        download. For rehearsing memory and time at real scale; the weights are random."""
        raise ConfigError(f"family {cls.info.name!r} cannot be built from configs with random weights")

    @classmethod
    @abstractmethod
    def write_tiny(cls, out_dir: str | Path, *, seed: int = 0) -> Path:
        """A freshly initialised (untrained) tiny checkpoint over the synthetic world's vocabulary, in
        ``out_dir``: what tests and benchmarks build instead of the shipped one."""

    # ---- pretraining ---------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def pretrain(
        cls,
        data_dir: str | Path,
        out_dir: str | Path | None = None,
        *,
        seed: int = 0,
        overrides: Mapping[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> dict:
        """Pretrain the built-in tiny model from scratch on the world's public split and save it to
        ``out_dir`` (None: the built-in path); return the report (also saved beside the weights).

        ``overrides`` set fields of the family's pretraining spec; an unknown field is a ConfigError.
        """

    # ---- alignment tokens ----------------------------------------------------------------------------
    @abstractmethod
    def alignment_token_ids(self) -> list[int]:
        """Token ids of the shared alignment tokens in use (empty when off)."""

    @abstractmethod
    def use_alignment(self, n: int) -> None:
        """Place ``n`` shared alignment tokens in every prompt from now on (0: none)."""

    @property
    @abstractmethod
    def num_alignment(self) -> int:
        """Alignment tokens in use."""

    @contextlib.contextmanager
    def pretrained_prompts(self) -> Iterator[ModelFamily]:
        """Within the block, prompts carry no alignment tokens: the pretrained model's own format.

        The zero-shot baseline is the pretrained model as shipped, which never saw the (reserved,
        untrained) alignment tokens; inserting them would handicap it.
        """
        n = self.num_alignment
        self.use_alignment(0)
        try:
            yield self
        finally:
            self.use_alignment(n)

    # ---- understanding (VQA) -------------------------------------------------------------------------
    @abstractmethod
    def vqa_batch(self, samples: Sequence[Any], *, with_answers: bool) -> dict[str, torch.Tensor]:
        """A batch of VQA samples (``question``, ``image_path``, ``multiple_choice_answer``)."""

    @abstractmethod
    def vqa_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens."""

    @abstractmethod
    def vqa_answer(self, samples: Sequence[Any]) -> list[str]:
        """Greedy short answers, decoded without special tokens."""

    # ---- generation (text -> image) ------------------------------------------------------------------
    @abstractmethod
    def caption_batch(
        self, samples: Sequence[Any], *, generator: torch.Generator, cfg_drop_prob: float = 0.1
    ) -> dict[str, torch.Tensor]:
        """Text-to-image training batch of caption samples (``caption``, ``image_path``); captions are
        dropped (for classifier-free guidance) with probability ``cfg_drop_prob``, drawn from
        ``generator`` (as is any other training noise), so a batch is a function of its seed."""

    @abstractmethod
    def caption_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The family's own generation training loss on a caption batch (lower is better)."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        *,
        images_per_prompt: int = 4,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[Image.Image]:
        """Sample images for ``prompts`` with classifier-free guidance (prompt-major order, seeded)."""

    # ---- shared: LoRA, adapter files, groups, counts -------------------------------------------------
    def net(self) -> torch.nn.Module:
        """The module the task hooks run: the peft model when an adapter is on, else the backbone."""
        return self.model if self.model is not None else self.base

    def trainable_tokens(self) -> dict[str, list[int]] | None:
        """peft ``trainable_token_indices`` for the alignment tokens (None when off)."""
        ids = self.alignment_token_ids()
        return {"embed_tokens": ids} if ids else None

    def lora_target(self, spec: LoraSpec) -> str:
        """Regex (peft fullmatch) for the LoRA target modules inside the chosen towers."""
        self.info.check_groups(spec.groups)
        parts = []
        for g in spec.groups:
            tower = self.info.towers[g]
            mods = spec.target_modules or tower.modules
            if not mods:
                continue
            alt = "|".join(re.escape(m) for m in mods)
            parts.append(rf"{tower.prefix}\.(?:.*\.)?(?:{alt})")
        return "|".join(f"(?:{p})" for p in parts) if parts else r"(?!x)x"

    def modules_to_save(self, spec: LoraSpec) -> list[str]:
        """Modules of the chosen towers trained whole (peft ``modules_to_save``)."""
        return [m for g in spec.groups for m in self.info.towers[g].whole]

    def attach_lora(self, spec: LoraSpec, *, seed: int) -> PeftModel:
        """Freeze the backbone and add the LoRA adapter (same initial adapter on every participant)."""
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.model = attach_lora(
            self.base,
            spec=spec,
            target=self.lora_target(spec),
            seed=seed,
            trainable_tokens=self.trainable_tokens(),
            modules_to_save=self.modules_to_save(spec),
        )
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if n == 0:
            raise ConfigError(
                f"LoRA matched no module for groups {spec.groups} and targets {spec.target_modules}"
            )
        return self.model

    def load_adapter(self, path: str | Path) -> PeftModel:
        """Load a saved peft adapter (e.g. a run's ``global_adapter/``), alignment tokens included."""
        from peft import PeftModel

        path = Path(path)
        config_file = path / "adapter_config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a peft adapter directory ({exc})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{config_file}: top level must be a JSON object")
        tokens = (config.get("trainable_token_indices") or {}).get("embed_tokens") or []
        self.use_alignment(len(tokens))
        if self.num_alignment and self.alignment_token_ids() != list(tokens):
            raise ConfigError(
                f"{config_file}: trainable tokens {tokens} are not this model's alignment tokens"
            )
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.model = PeftModel.from_pretrained(self.base, path, is_trainable=False)
        return self.model

    def save_adapter(self, path: str | Path) -> Path:
        """Save the adapter in peft's layout (``PeftModel.from_pretrained(base, path)`` reads it)."""
        if self.model is None:
            raise ConfigError("save_adapter: no adapter is attached")
        self.model.save_pretrained(str(path))
        return Path(path)

    def group_of(self, key: str) -> str:
        return self.info.group_of(key)

    def full_model_bytes(self) -> int:
        """Bytes of every backbone parameter at its stored dtype (what full fine-tuning would send)."""
        return sum(
            p.numel() * p.element_size()
            for n, p in self.base.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n and "trainable_tokens" not in n
        )

    def parameter_counts(self) -> dict[str, int]:
        """Backbone parameters per tower (and ``total``), for the ledger and docs."""
        counts = {g: 0 for g in self.info.towers}
        total = 0
        for n, p in self.base.named_parameters():
            if "lora_" in n or "modules_to_save" in n or "trainable_tokens" in n:
                continue
            total += p.numel()
            g = self.info.group_of(n)
            if g in counts:
                counts[g] += p.numel()
        return counts | {"total": total}
