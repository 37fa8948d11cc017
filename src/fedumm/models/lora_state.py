"""The one canonical adapter state: adapter-name-free peft keys, CPU copies, strict checks on load."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from peft import PeftModel, get_peft_model_state_dict

from fedumm.errors import AdapterStateError

__all__ = [
    "get_adapter_state",
    "set_adapter_state_",
    "adapter_param_map",
    "state_num_bytes",
    "state_num_params",
]


def adapter_param_map(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """Map canonical (name-free) keys to the live trainable parameters of ``adapter_name``.

    Canonical keys are exactly the keys of ``peft.get_peft_model_state_dict`` (peft's own saving
    layout), so a state saved by peft and a state produced here are interchangeable.
    """
    canonical = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    tag = re.escape(adapter_name)
    out: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        key = re.sub(rf"\.{tag}(?=\.|$)", "", name)  # lora_A.default.weight -> lora_A.weight
        key = key.replace(".modules_to_save.", ".")
        if key in canonical:
            out[key] = param
    missing = canonical - set(out)
    if missing:
        raise AdapterStateError(f"cannot map adapter keys to live parameters: {sorted(missing)[:3]}")
    return {k: out[k] for k in sorted(out)}


def get_adapter_state(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Return the adapter as sorted canonical keys -> detached CPU clones (never live storage)."""
    return {
        k: p.detach().to("cpu", copy=True).clone() for k, p in adapter_param_map(model, adapter_name).items()
    }


def set_adapter_state_(
    model: PeftModel, state: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Copy ``state`` into the live adapter parameters in place, after a strict key and shape check."""
    params = adapter_param_map(model, adapter_name)
    if set(state) != set(params):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise AdapterStateError(f"adapter keys do not match the model: missing {missing}, unexpected {extra}")
    for key, param in params.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise AdapterStateError(f"{key}: expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(param.shape):
            raise AdapterStateError(
                f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(param.shape)}"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.device, param.dtype))


def state_num_params(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def state_num_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """In-memory tensor bytes (the ledger measures serialised payloads separately)."""
    return sum(t.numel() * t.element_size() for t in state.values())
