"""Compressed transport of adapter updates, with error feedback.

Quantised updates follow Konečný et al. 2016 ("Federated Learning: Strategies for Improving
Communication Efficiency", arXiv:1610.05492); error feedback follows Seide et al. 2014 ("1-Bit
Stochastic Gradient Descent and its Application to Data-Parallel Distributed Training of Speech DNNs",
Interspeech 2014) and Karimireddy et al. 2019 ("Error Feedback Fixes SignSGD and other Gradient
Compression Schemes", arXiv:1901.09847): each client adds the residual its last message lost before
encoding the next one, so the sum of what the server decodes tracks the sum of the true deltas within
one message's error instead of drifting.

Codecs (applied to the DELTA of a client state w.r.t. the global state it started from):

- ``none``: float32, lossless for float32/bf16/fp16 inputs;
- ``fp16`` / ``bf16``: half-precision values (fp16 rejects values beyond its range, 65504);
- ``int8``: symmetric per-tensor quantisation, q = round(x / s) in [-127, 127], s = max|x| / 127, one
  float32 scale per tensor stored under ``<key>::scale``;
- ``int8_row``: the same with one scale per row (first dimension) of each tensor of 2 or more dims.

:func:`encode` returns the payload tensors (what :func:`fedumm.wire.pack_state` serialises and the
ledger measures) and the new residual; :func:`decode` turns payload tensors back into float32 deltas.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedumm.errors import InvalidUpdate

__all__ = ["CODECS", "SCALE_SUFFIX", "encode", "decode", "delta_of", "apply_delta"]

CODECS = ("none", "fp16", "bf16", "int8", "int8_row")
SCALE_SUFFIX = "::scale"
_QMAX = 127
_FP16_MAX = float(torch.finfo(torch.float16).max)
_FLOAT_DTYPES = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def _scale_of(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    rows = per_row and x.dim() >= 2
    if x.numel() == 0:
        return torch.zeros((x.shape[0],) if rows else (), dtype=torch.float32)
    if rows:
        return x.reshape(x.shape[0], -1).abs().amax(dim=1) / _QMAX
    return x.abs().amax() / _QMAX


def _broadcast(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return scale.reshape(scale.shape + (1,) * (x.dim() - scale.dim())) if scale.dim() else scale


def _quantize(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _scale_of(x, per_row).to(torch.float32)
    s = _broadcast(scale, x)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(x / safe).clamp(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * _broadcast(scale.to(torch.float32), q)


def _encode_one(key: str, x: torch.Tensor, codec: str) -> dict[str, torch.Tensor]:
    if codec in _FLOAT_DTYPES:
        if codec == "fp16" and x.numel() and float(x.abs().max()) > _FP16_MAX:
            raise ValueError(f"{key}: |value| {float(x.abs().max()):.3g} exceeds the fp16 range; use bf16")
        return {key: x.to(_FLOAT_DTYPES[codec])}
    q, scale = _quantize(x, per_row=codec == "int8_row")
    return {key: q, key + SCALE_SUFFIX: scale}


def encode(
    delta: Mapping[str, torch.Tensor], codec: str, *, residual: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encode ``delta + residual`` with ``codec``; return (payload tensors, new float32 residual)."""
    _check_codec(codec)
    if residual is not None and set(residual) != set(delta):
        raise ValueError(f"residual keys differ from delta keys: {sorted(set(residual) ^ set(delta))[:3]}")
    payload: dict[str, torch.Tensor] = {}
    new_residual: dict[str, torch.Tensor] = {}
    for key in sorted(delta):
        if SCALE_SUFFIX in key:
            raise ValueError(f"{key}: adapter keys may not contain {SCALE_SUFFIX!r}")
        x = delta[key].detach().to("cpu", torch.float32)
        if residual is not None:
            r = residual[key]
            if r.shape != x.shape:
                raise ValueError(
                    f"{key}: residual shape {tuple(r.shape)} differs from delta shape {tuple(x.shape)}"
                )
            x = x + r.detach().to("cpu", torch.float32)
        else:
            x = x.clone()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{key}: delta contains NaN or Inf")
        part = _encode_one(key, x, codec)
        payload.update(part)
        new_residual[key] = x - _decode_one(key, part, codec)
    return {k: payload[k] for k in sorted(payload)}, new_residual


def _decode_one(key: str, part: Mapping[str, torch.Tensor], codec: str) -> torch.Tensor:
    if codec in _FLOAT_DTYPES:
        return part[key].to(torch.float32)
    return _dequantize(part[key], part[key + SCALE_SUFFIX])


def _check_int8(key: str, q: torch.Tensor, scale: torch.Tensor, codec: str, sender: str) -> None:
    if q.dtype != torch.int8:
        raise InvalidUpdate(f"{sender}: {key} has dtype {q.dtype}, expected int8 for codec {codec!r}")
    if not scale.is_floating_point() or not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise InvalidUpdate(f"{sender}: {key}{SCALE_SUFFIX} must hold finite float scales >= 0")
    if codec == "int8_row" and q.dim() >= 2:
        expected: tuple[int, ...] = (q.shape[0],)
    else:
        expected = ()
    if tuple(scale.shape) != expected:
        raise InvalidUpdate(
            f"{sender}: {key}{SCALE_SUFFIX} has shape {tuple(scale.shape)}, expected {expected}"
        )


def decode(
    payload: Mapping[str, torch.Tensor], codec: str, *, sender: str = "peer"
) -> dict[str, torch.Tensor]:
    """Decode payload tensors to float32 deltas; malformed payloads raise InvalidUpdate naming ``sender``."""
    _check_codec(codec)
    out: dict[str, torch.Tensor] = {}
    if codec in _FLOAT_DTYPES:
        for key, t in payload.items():
            if SCALE_SUFFIX in key or not t.is_floating_point():
                raise InvalidUpdate(f"{sender}: {key} ({t.dtype}) is not a float tensor of codec {codec!r}")
            out[key] = t.detach().to("cpu", torch.float32).clone()
    else:
        values = sorted(k for k in payload if not k.endswith(SCALE_SUFFIX))
        scales = sorted(k[: -len(SCALE_SUFFIX)] for k in payload if k.endswith(SCALE_SUFFIX))
        if values != scales:
            raise InvalidUpdate(
                f"{sender}: int8 values and scales do not pair up: {sorted(set(values) ^ set(scales))[:3]}"
            )
        for key in values:
            q, scale = payload[key], payload[key + SCALE_SUFFIX]
            _check_int8(key, q, scale, codec, sender)
            out[key] = _dequantize(q.detach().cpu(), scale.detach().cpu())
    for key, t in out.items():
        if not bool(torch.isfinite(t).all()):
            raise InvalidUpdate(f"{sender}: {key} decodes to NaN or Inf")
    return {k: out[k] for k in sorted(out)}


def delta_of(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """state - reference key by key, in float32 (keys and shapes must match)."""
    if set(state) != set(reference):
        raise ValueError(f"state and reference keys differ: {sorted(set(state) ^ set(reference))[:3]}")
    out = {}
    for k in sorted(state):
        if state[k].shape != reference[k].shape:
            raise ValueError(
                f"{k}: shape {tuple(state[k].shape)} differs from reference {tuple(reference[k].shape)}"
            )
        out[k] = state[k].detach().to("cpu", torch.float32) - reference[k].detach().to("cpu", torch.float32)
    return out


def apply_delta(
    reference: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """reference + delta key by key, computed in float32 and returned in each reference tensor's dtype."""
    if set(delta) != set(reference):
        raise InvalidUpdate(f"delta and reference keys differ: {sorted(set(delta) ^ set(reference))[:3]}")
    out = {}
    for k in sorted(reference):
        ref = reference[k]
        if delta[k].shape != ref.shape:
            raise InvalidUpdate(f"{k}: delta shape {tuple(delta[k].shape)} differs from {tuple(ref.shape)}")
        out[k] = (ref.detach().to("cpu", torch.float32) + delta[k].to(torch.float32)).to(ref.dtype)
    return out
