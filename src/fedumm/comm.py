"""Paper-scale communication without weights: full-model and LoRA sizes from a Hugging Face config.

The model is instantiated from its ``config.json`` on the meta device (shapes only: no download, no
weights, no memory), so the counts are those of the real architecture. LoRA (Hu et al. 2021, "LoRA:
Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) adds A (r, in) and B (out, r), that
is r * (in + out) parameters, to every adapted ``nn.Linear``. Target names match as in peft's list form
of ``target_modules``: a module matches when its qualified name equals a target or ends with
``"." + target``. Shipped configs are under ``configs/models/`` (sources in its README).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, PretrainedConfig

from fedumm.errors import ConfigError

__all__ = ["load_config", "build_meta_model", "lora_linear_modules", "count_lora", "BYTES_PER_PARAM"]

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}


def load_config(model_config_path: str | Path) -> PretrainedConfig:
    """Read a local Hugging Face ``config.json`` (or a directory holding one); never touches the network."""
    path = Path(model_config_path)
    if not path.exists():
        raise ConfigError(f"{path}: no such model config file or directory")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: not a usable Hugging Face model config ({exc})") from None


def build_meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """Instantiate the config's architecture (``architectures[0]``, else AutoModel) on the meta device."""
    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        return cls(config) if cls is not None else AutoModel.from_config(config)


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


def count_lora(
    model_config_path: str | Path, *, rank: int, targets: Sequence[str], towers: str | None = None
) -> dict:
    """Full-model and LoRA parameter counts and bytes (fp32, bf16) for ``rank`` on ``targets``.

    ``towers`` is a regular expression searched in each module's qualified name (for Qwen2.5-VL:
    ``"language_model"`` for the LLM, ``"visual"`` for the vision tower); None adapts the whole model.
    Full-model parameters are counted once even when tied (``model.parameters()`` deduplicates).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be an int >= 1, got {rank!r}")
    if isinstance(targets, str) or not targets:
        raise ConfigError(f"targets must be a non-empty list of module names, got {targets!r}")
    config = load_config(model_config_path)
    model = build_meta_model(config)
    full = sum(p.numel() for p in model.parameters())
    modules = lora_linear_modules(model, targets, towers)
    lora = sum(rank * (m.in_features + m.out_features) for _, m in modules)
    out: dict = {
        "config": str(model_config_path),
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "rank": rank,
        "targets": list(targets),
        "towers": towers,
        "lora_modules": len(modules),
        "full_params": full,
        "lora_params": lora,
    }
    for prec, nbytes in BYTES_PER_PARAM.items():
        out[f"full_bytes_{prec}"] = full * nbytes
        out[f"lora_bytes_{prec}"] = lora * nbytes
    out["lora_percent"] = 100.0 * lora / full
    out["reduction_percent"] = 100.0 - out["lora_percent"]
    return out
