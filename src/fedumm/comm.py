"""Paper-scale communication without weights: full-model and LoRA sizes from architecture configs.

The model is instantiated from its config on the meta device (shapes only: no download, no weights,
no memory), so the counts are those of the real architecture. Two kinds of config are read:

- a Hugging Face ``config.json`` (built as ``architectures[0]``, else ``AutoModel``);
- a diffusers model config, recognised by its ``"_class_name"`` (built as that diffusers class). Two
  optional keys, not diffusers', describe what a unified model puts around its diffusion transformer:
  ``"_caption_projection"`` (``{"_class_name": ..., "in_features": N}``, a diffusers embedding class
  mapping the language model's width to the DiT's; the tree then becomes ``caption_projection`` +
  ``model``) and ``"_latent_queries"`` (``[n_query, width]``: learnable query tokens fed to the
  language model, mounted beside the DiT by :func:`count_family`).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) adds A
(r, in) and B (out, r), that is r * (in + out) parameters, to every adapted ``nn.Linear``. In
:func:`count_lora`, target names match as in peft's list form of ``target_modules``: a module matches
when its qualified name equals a target or ends with ``"." + target``. :func:`count_family` counts
each tower of a registered family the way the family adapts it (its tower prefixes and module names,
the same regular expression the family gives peft) and sums the towers each task trains. Shipped
configs are under ``configs/models/`` (sources in its README).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, PretrainedConfig

from fedumm.errors import ConfigError
from fedumm.models import family_info

__all__ = [
    "BYTES_PER_PARAM",
    "FAMILY_MOUNTS",
    "MetaModel",
    "Mount",
    "build_meta",
    "build_family_meta",
    "build_meta_model",
    "count_family",
    "count_lora",
    "load_config",
    "lora_linear_modules",
    "read_diffusers_config",
    "tower_lora_modules",
]

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}
# keys of a diffusers config that fedumm adds (see the module docstring); diffusers never sees them
_EXTRA_KEYS = ("_caption_projection", "_latent_queries")


def _config_file(path: Path) -> Path:
    return path / "config.json" if path.is_dir() else path


def read_diffusers_config(model_config_path: str | Path) -> dict | None:
    """The config as a dict when it is a diffusers model config (has ``_class_name``), else None."""
    path = Path(model_config_path)
    if not path.exists():
        raise ConfigError(f"{path}: no such model config file or directory")
    file = _config_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None  # a directory without config.json: transformers says what is missing
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: not a JSON model config ({exc})") from None
    return data if isinstance(data, dict) and "_class_name" in data else None


def load_config(model_config_path: str | Path) -> PretrainedConfig:
    """Read a local Hugging Face ``config.json`` (or a directory holding one); never touches the network."""
    path = Path(model_config_path)
    if not path.exists():
        raise ConfigError(f"{path}: no such model config file or directory")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a usable Hugging Face model config ({exc})") from None


def build_meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """Instantiate the config's architecture (``architectures[0]``, else AutoModel) on the meta device."""
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        return cls(config) if cls is not None else AutoModel.from_config(config)


class CaptionProjectedDiT(torch.nn.Module):
    """A caption projection (language-model width to DiT width) in front of a diffusion transformer:
    the module tree ``caption_projection`` + ``model`` of a unified model's DiT. Shapes only."""

    def __init__(self, caption_projection: torch.nn.Module, model: torch.nn.Module) -> None:
        super().__init__()
        self.caption_projection = caption_projection
        self.model = model


def _diffusers_class(name: Any, where: str, namespace: Any, base: type) -> type:
    cls = getattr(namespace, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{where}: _class_name {name!r} is not a diffusers {base.__name__} class")
    return cls


def _build_diffusers_meta(cfg: Mapping[str, Any], path: Path) -> torch.nn.Module:
    """The diffusers model of ``cfg`` on the meta device (with its caption projection, if named)."""
    import diffusers  # only for diffusers configs (a second or two to import)
    import diffusers.models.embeddings

    name = cfg["_class_name"]
    cls = _diffusers_class(name, str(path), diffusers, diffusers.ModelMixin)
    init = {k: v for k, v in cfg.items() if k not in _EXTRA_KEYS}
    proj = cfg.get("_caption_projection")
    if proj is not None and not (isinstance(proj, dict) and isinstance(proj.get("in_features"), int)):
        raise ConfigError(
            f'{path}: _caption_projection must be {{"_class_name": ..., "in_features": N}}, got {proj!r}'
        )
    try:
        with torch.device("meta"):
            model = cls.from_config(init)
            if proj is None:
                return model
            pcls = _diffusers_class(
                proj.get("_class_name", "PixArtAlphaTextProjection"),
                f"{path}: _caption_projection",
                diffusers.models.embeddings,
                torch.nn.Module,
            )
            kwargs = {k: v for k, v in proj.items() if k != "_class_name"}
            kwargs.setdefault("hidden_size", cfg.get("hidden_size"))
            return CaptionProjectedDiT(pcls(**kwargs), model)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError, ZeroDivisionError, RuntimeError) as exc:
        raise ConfigError(f"{path}: not a usable diffusers {name} config ({exc})") from None


def _latent_queries(cfg: Mapping[str, Any] | None, path: Path) -> tuple[int, int] | None:
    shape = (cfg or {}).get("_latent_queries")
    if shape is None:
        return None
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) and x > 0 for x in shape)):
        raise ConfigError(f"{path}: _latent_queries must be [n_query, width], got {shape!r}")
    return shape[0], shape[1]


@dataclass(frozen=True)
class MetaModel:
    """A model built on the meta device, with its config's model type and an architecture label."""

    model: torch.nn.Module
    model_type: str
    architecture: str


def build_meta(model_config_path: str | Path) -> MetaModel:
    """Build a Hugging Face or diffusers config's model on the meta device."""
    path = Path(model_config_path)
    cfg = read_diffusers_config(path)
    if cfg is not None:
        model = _build_diffusers_meta(cfg, path)
        arch = str(cfg["_class_name"])
        if isinstance(model, CaptionProjectedDiT):
            arch = f"{type(model.caption_projection).__name__} + {arch}"
        return MetaModel(model, str(cfg["_class_name"]), arch)
    config = load_config(path)
    model = build_meta_model(config)
    return MetaModel(model, config.model_type, type(model).__name__)


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_linear_modules(
    model: torch.nn.Module, targets: Sequence[str], towers: str | None = None
) -> list[tuple[str, torch.nn.Linear]]:
    """The ``nn.Linear`` modules LoRA adapts: name matches a target and, if given, the ``towers`` regex."""
    tower_re = re.compile(towers) if towers else None
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _matches(name, targets):
            if tower_re is None or tower_re.search(name):
                out.append((name, module))
    return out


def _check_rank(rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be an int >= 1, got {rank!r}")


def _add_bytes(out: dict, kind: str, params: int) -> None:
    for prec, nbytes in BYTES_PER_PARAM.items():
        out[f"{kind}_bytes_{prec}"] = params * nbytes


def count_lora(
    model_config_path: str | Path, *, rank: int, targets: Sequence[str], towers: str | None = None
) -> dict:
    """Full-model and LoRA parameter counts and bytes (fp32, bf16) for ``rank`` on ``targets``.

    The config is a Hugging Face or a diffusers one (see the module docstring). ``towers`` is a regular
    expression searched in each module's qualified name (for Qwen2.5-VL: ``"language_model"`` for the
    LLM, ``"visual"`` for the vision tower); None adapts the whole model. Full-model parameters are
    counted once even when tied (``model.parameters()`` deduplicates).
    """
    _check_rank(rank)
    if isinstance(targets, str) or not targets:
        raise ConfigError(f"targets must be a non-empty list of module names, got {targets!r}")
    built = build_meta(model_config_path)
    full = sum(p.numel() for p in built.model.parameters())
    modules = lora_linear_modules(built.model, targets, towers)
    lora = sum(rank * (m.in_features + m.out_features) for _, m in modules)
    out: dict = {
        "config": str(model_config_path),
        "model_type": built.model_type,
        "architecture": built.architecture,
        "rank": rank,
        "targets": list(targets),
        "towers": towers,
        "lora_modules": len(modules),
        "full_params": full,
        "lora_params": lora,
    }
    _add_bytes(out, "full", full)
    _add_bytes(out, "lora", lora)
    out["lora_percent"] = 100.0 * lora / full
    out["reduction_percent"] = 100.0 - out["lora_percent"]
    return out


# ---- whole families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """Where a family's module tree puts the real models, so that its towers' prefixes apply verbatim.

    ``backbone``: attribute holding the Hugging Face model ("" = the model is the root);
    ``generator``: attribute holding the diffusers model of a separate generator config (None: the
    family has none); ``queries``: attribute of the generator config's ``_latent_queries``.
    """

    backbone: str = ""
    generator: str | None = None
    queries: str = "latent_queries"


# Each family's module tree (see its models/<family>/model.py or the transformers class it wraps).
FAMILY_MOUNTS: dict[str, Mount] = {
    # backbone = the Hugging Face backbone, dit = caption projection + DiT (from --dit-config),
    # latent_queries = the query tokens (n_query x hidden)
    "blip3o": Mount(backbone="backbone", generator="dit"),
    # the Hugging Face model itself, as the family wraps it (model.vision_model, model.language_model, ...)
    "janus": Mount(),
}


def _tower_regex(prefix: str, modules: Sequence[str]) -> re.Pattern[str]:
    """The family's LoRA target expression for one tower (peft fullmatches it on module names)."""
    alt = "|".join(re.escape(m) for m in modules)
    return re.compile(rf"{prefix}\.(?:.*\.)?(?:{alt})")


def tower_lora_modules(
    root: torch.nn.Module, prefix: str, modules: Sequence[str]
) -> list[tuple[str, torch.nn.Linear]]:
    """The ``nn.Linear`` modules of ``root`` a tower (``prefix``, target ``modules``) adapts."""
    expr = _tower_regex(prefix, modules)
    return [(n, m) for n, m in root.named_modules() if isinstance(m, torch.nn.Linear) and expr.fullmatch(n)]


def build_family_meta(
    family: str, model_config: str | Path, generator_config: str | Path | None = None
) -> tuple[torch.nn.Module, dict[str, str]]:
    """A family's module tree on the meta device (see :data:`FAMILY_MOUNTS`) and its architectures."""
    mount = FAMILY_MOUNTS.get(family)
    if mount is None:
        raise ConfigError(
            f"family {family!r}: no module layout known to comm; known: {', '.join(FAMILY_MOUNTS)}"
        )
    if mount.generator is None and generator_config is not None:
        raise ConfigError(f"family {family!r} has no separate generator config (drop --dit-config)")
    if mount.generator is not None and generator_config is None:
        raise ConfigError(f"family {family!r} needs its generator's config (--dit-config)")
    backbone = build_meta(model_config)
    kinds = {"model": backbone.architecture}
    if mount.backbone:
        root = torch.nn.Module()
        setattr(root, mount.backbone, backbone.model)
    else:
        root = backbone.model
    if mount.generator is not None and generator_config is not None:
        gpath = Path(generator_config)
        gcfg = read_diffusers_config(gpath)
        if gcfg is None:
            raise ConfigError(f"{gpath}: not a diffusers model config (it has no _class_name)")
        gen = _build_diffusers_meta(gcfg, gpath)
        kinds["generator"] = str(gcfg["_class_name"])
        width = _backbone_width(backbone.model)
        if isinstance(gen, CaptionProjectedDiT):
            fin = gcfg["_caption_projection"]["in_features"]
            if width is not None and fin != width:
                raise ConfigError(
                    f"{gpath}: its caption projection takes {fin} features but {model_config}'s "
                    f"language model is {width} wide (pair each DiT config with its own backbone)"
                )
        setattr(root, mount.generator, gen)
        queries = _latent_queries(gcfg, gpath)
        if queries is not None:
            if width is not None and queries[1] != width:
                raise ConfigError(
                    f"{gpath}: _latent_queries are {queries[1]} wide but {model_config}'s language "
                    f"model is {width} wide"
                )
            with torch.device("meta"):
                setattr(root, mount.queries, torch.nn.Embedding(*queries))
    return root, kinds


def _backbone_width(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return None
    return int(config.get_text_config().hidden_size)


def _whole_params(root: torch.nn.Module, names: Sequence[str]) -> tuple[int, list[str]]:
    """Parameters of the modules trained whole (peft ``modules_to_save``: matched by name suffix)."""
    params: dict[int, int] = {}
    found = []
    for name, module in root.named_modules():
        if names and _matches(name, names):
            found.append(name)
            for p in module.parameters():
                params[id(p)] = p.numel()
    return sum(params.values()), found


def count_family(
    family: str,
    *,
    model_config: str | Path,
    generator_config: str | Path | None = None,
    rank: int = 16,
    targets: Sequence[str] | None = None,
) -> dict:
    """Per-tower LoRA (and whole-module) sizes of a registered family at paper scale, and per task.

    The family's module tree is assembled on the meta device from ``model_config`` (Hugging Face)
    and, for a family with a separate generator, ``generator_config`` (diffusers). Each tower adapts
    its default modules (``targets`` replaces them in every tower, like ``lora.target_modules``) and
    trains its ``whole`` modules entirely. ``tasks`` sums the towers each task trains
    (``task_towers``); ``"both"`` is a client that trains every task: the union of their towers, the
    adapter it sends (and receives) each round. Alignment tokens (``lora.alignment_tokens``) are not
    counted. Bytes are one direction, one client.
    """
    _check_rank(rank)
    if targets is not None and (isinstance(targets, str) or not targets):
        raise ConfigError(f"targets must be a non-empty list of module names, got {targets!r}")
    info = family_info(family)
    root, kinds = build_family_meta(family, model_config, generator_config)
    full = sum(p.numel() for p in root.parameters())
    names = list(root.named_modules())
    towers: dict[str, dict] = {}
    for tname, tower in info.towers.items():
        present = re.compile(rf"{tower.prefix}\.")
        if not any(present.match(n) for n, _ in names):
            raise ConfigError(
                f"family {family!r}: tower {tname!r} ({tower.prefix}) matches no module of "
                f"{model_config}"
                + (f" + {generator_config}" if generator_config else "")
                + " (is it this family's config?)"
            )
        mods = tuple(targets) if targets is not None else tower.modules
        linears = tower_lora_modules(root, tower.prefix, mods)
        lora = sum(rank * (m.in_features + m.out_features) for _, m in linears)
        whole, whole_found = _whole_params(root, tower.whole)
        row = {
            "prefix": tower.prefix,
            "targets": list(mods),
            "whole": list(tower.whole),
            "lora_modules": len(linears),
            "lora_params": lora,
            "whole_modules": whole_found,
            "whole_params": whole,
            "params": lora + whole,
        }
        for prec, nbytes in BYTES_PER_PARAM.items():
            row[f"bytes_{prec}"] = (lora + whole) * nbytes
        towers[tname] = row
    tasks: dict[str, dict] = {}
    every: list[str] = []
    for task, used in info.task_towers.items():
        every += [t for t in used if t not in every]
        tasks[task] = _task_row(used, towers, full)
    tasks["both"] = _task_row([t for t in info.towers if t in every], towers, full)
    out: dict = {
        "family": family,
        "model_config": str(model_config),
        "generator_config": None if generator_config is None else str(generator_config),
        "architectures": kinds,
        "rank": rank,
        "full_params": full,
    }
    _add_bytes(out, "full", full)
    out["towers"] = towers
    out["tasks"] = tasks
    return out


def _task_row(used: Sequence[str], towers: Mapping[str, Mapping[str, Any]], full: int) -> dict:
    params = sum(towers[t]["params"] for t in used)
    row: dict = {"towers": list(used), "params": params}
    for prec, nbytes in BYTES_PER_PARAM.items():
        row[f"bytes_{prec}"] = params * nbytes
    row["percent_of_full"] = 100.0 * params / full
    return row
