"""Secure aggregation on FLARE: FedAvg over CKKS-encrypted adapter deltas (TenSEAL, FLARE's HE path).

Who holds what:

- every client holds the provisioned client context (public and secret key: ``client_context.tenseal``
  written by FLARE's ``HEBuilder``); FLARE's ``HEModelEncryptor`` filter encrypts the client's
  adapter delta before it leaves the site and ``HEModelDecryptor`` decrypts what the server sends;
- the server holds no secret key. It adds the encrypted deltas, each multiplied by its plaintext
  FedAvg weight (the clients' example counts, bounded by the count bound), and keeps the encrypted
  running sum D_t of the aggregated deltas; the global adapter is W_0 + D_t, where W_0 (the LoRA
  initialisation) is public to every participant;
- the launching process of a simulation evaluates the global adapter, so it plays a key holder (a
  client-side evaluator) and decrypts D_t with a client context.

CKKS is approximate: each value carries an error of about 2^-(scale bits) relative to its magnitude;
the test against plaintext FedAvg reports the largest absolute difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import tenseal as ts
import torch

from fedumm.engines.nvflare.names import CLIENT_CONTEXT, HE_META, PLAIN_SUFFIX
from fedumm.errors import InvalidUpdate

__all__ = [
    "make_context",
    "encrypt_state",
    "check_encrypted",
    "weighted_sum",
    "add_encrypted",
    "serialize_state",
    "deserialize_state",
    "decrypt_state",
    "decrypted_global",
    "load_context",
    "EncryptedFedAvg",
    "HE_META",
    "CLIENT_CONTEXT",
]


def make_context(poly_modulus_degree: int = 8192, coeff_mod_bit_sizes=(60, 40, 40), scale_bits: int = 40):
    """A CKKS context with HEBuilder's defaults (for tests; a POC gets its context provisioned)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.generate_relin_keys()
    ctx.global_scale = 2**scale_bits
    return ctx


def encrypt_state(ctx, state: Mapping[str, torch.Tensor]) -> dict[str, ts.CKKSVector]:
    """Each tensor flattened and encrypted (what HEModelEncryptor does to each array)."""
    return {k: ts.ckks_vector(ctx, state[k].detach().double().reshape(-1).tolist()) for k in sorted(state)}


def check_encrypted(params: Mapping, reference: Mapping[str, torch.Tensor], *, sender: str) -> None:
    """Reject encrypted params whose keys or vector sizes differ from the adapter's."""
    if set(params) != set(reference):
        missing = sorted(set(reference) - set(params))[:3]
        extra = sorted(set(params) - set(reference))[:3]
        raise InvalidUpdate(
            f"client {sender!r}: encrypted keys differ (missing {missing}, unexpected {extra})"
        )
    for k, ref in reference.items():
        v = params[k]
        if not isinstance(v, ts.CKKSVector):
            raise InvalidUpdate(f"client {sender!r}: {k} is {type(v).__name__}, not a CKKS vector")
        if v.size() != ref.numel():
            raise InvalidUpdate(f"client {sender!r}: {k} encrypts {v.size()} values, expected {ref.numel()}")


def weighted_sum(vectors: Sequence[ts.CKKSVector], weights: Sequence[float]) -> ts.CKKSVector:
    """sum_k w_k E(x_k) with normalised plaintext weights: one ciphertext-plaintext multiplication."""
    total = math.fsum(weights)
    if not vectors or total <= 0:
        raise InvalidUpdate("encrypted FedAvg needs at least one update with a weight > 0")
    out = None
    for v, w in zip(vectors, weights, strict=True):
        if w <= 0:
            continue
        term = v * (w / total)
        out = term if out is None else out + term
    return out


def add_encrypted(a: Mapping | None, b: Mapping) -> dict:
    """D_t = D_{t-1} + delta_t key by key (additions cost no multiplicative depth)."""
    return dict(b) if a is None else {k: a[k] + b[k] for k in sorted(b)}


def serialize_state(enc: Mapping) -> dict[str, torch.Tensor]:
    """Encrypted vectors as uint8 tensors (safetensors-storable, no pickle); plaintext entries (a
    delta nobody trained yet) as float tensors under ``key + PLAIN_SUFFIX``."""
    out = {}
    for k in sorted(enc):
        v = enc[k]
        if isinstance(v, ts.CKKSVector):
            out[k] = torch.frombuffer(bytearray(v.serialize()), dtype=torch.uint8)
        else:
            out[k + PLAIN_SUFFIX] = torch.as_tensor(np.asarray(v), dtype=torch.float32).reshape(-1)
    return out


def deserialize_state(ctx, tensors: Mapping[str, torch.Tensor]) -> dict:
    out: dict = {}
    for k, t in sorted(tensors.items()):
        if k.endswith(PLAIN_SUFFIX):
            out[k[: -len(PLAIN_SUFFIX)]] = t.numpy()
        else:
            out[k] = ts.ckks_vector_from(ctx, bytes(t.numpy().tobytes()))
    return out


def decrypt_state(ctx, enc: Mapping, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decrypt with ``ctx``'s secret key (plaintext entries as they are), reshaped and cast like ``like``."""
    out = {}
    for k, ref in sorted(like.items()):
        v = enc[k]
        values = np.asarray(v.decrypt() if isinstance(v, ts.CKKSVector) else v, dtype=np.float64)
        out[k] = torch.from_numpy(values).reshape(ref.shape).to(ref.dtype)
    return out


def decrypted_global(ctx, tensors: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]):
    """W_0 + D_t from a results file of the server (the launcher holds a client context)."""
    delta = decrypt_state(ctx, deserialize_state(ctx, tensors), initial)
    return {k: (initial[k].double() + delta[k].double()).to(initial[k].dtype) for k in sorted(initial)}


def load_context(path) -> ts.Context:
    """A TenSEAL context from a provisioned file (TenSEAL's own format, not a pickle)."""
    with open(path, "rb") as f:
        return ts.context_from(f.read())


class EncryptedFedAvg:
    """FedAvg on the server without a secret key: D_t = D_{t-1} + sum_k w_k E(delta_k), per group.

    Used by :class:`fedumm.server.rounds.RoundLoop` in place of the strategy's aggregation (its
    ``secure`` hook); weights are the group's example counts after the count bound.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        self.reference = {k: v.detach().cpu() for k, v in reference.items()}
        self.total: dict | None = None

    def validate(self, update, reference) -> None:
        from dataclasses import replace

        from fedumm.types import validate_update

        # counts and metrics as for plaintext updates; the state as encrypted vectors of the right sizes
        validate_update(replace(update, state=self.reference), self.reference)
        check_encrypted(update.state, self.reference, sender=update.client_id)

    def aggregate(self, *, global_state, updates, group_of=None) -> dict:
        from fedumm.fl.aggregate import split_by_group
        from fedumm.fl.strategies.base import group_weight_base

        step: dict = {}
        for group, keys in split_by_group(list(self.reference), group_of).items():
            weights = [float(group_weight_base(u, group)) for u in updates]
            for k in keys:
                if sum(weights) > 0:
                    step[k] = weighted_sum([u.state[k] for u in updates], weights)
                elif self.total is None or k not in self.total:
                    step[k] = np.zeros(self.reference[k].numel(), dtype=np.float32)  # nobody trained it
        prev = self.total or {}
        total = {}
        for k in sorted(self.reference):
            if k not in step:
                total[k] = prev[k]
            elif k in prev and isinstance(prev[k], ts.CKKSVector):
                total[k] = prev[k] + step[k] if isinstance(step[k], ts.CKKSVector) else prev[k]
            else:
                total[k] = step[k]
        self.total = total
        return dict(total)
