"""Secure aggregation maths: CKKS FedAvg (the server without a secret key) against plaintext FedAvg."""

from __future__ import annotations

import pytest
import torch

ts = pytest.importorskip("tenseal")

from fedumm.engines.nvflare.he import (  # noqa: E402
    EncryptedFedAvg,
    decrypted_global,
    encrypt_state,
    make_context,
    serialize_state,
)
from fedumm.errors import InvalidUpdate  # noqa: E402
from fedumm.fl.strategies import make_strategy  # noqa: E402
from fedumm.types import ClientUpdate  # noqa: E402


def group_of(key: str) -> str:
    return key.split(".")[0]


def test_encrypted_fedavg_equals_plaintext_fedavg_within_ckks_precision():
    ctx = make_context()
    server_ctx = ts.context_from(ctx.serialize(save_secret_key=False))  # what the server could hold
    gen = torch.Generator().manual_seed(0)
    w0 = {
        "lang.q.lora_A.weight": torch.randn(4, 64, generator=gen),
        "lang.q.lora_B.weight": torch.zeros(64, 4),
    }
    w0["gen.h.lora_A.weight"] = torch.randn(4, 32, generator=gen)
    w0["gen.h.lora_B.weight"] = torch.zeros(32, 4)
    secure, plain = EncryptedFedAvg(w0), make_strategy("fedavg")
    glob = dict(w0)
    worst = 0.0
    for _ in range(3):
        states = [
            {k: glob[k] + 0.05 * torch.randn(v.shape, generator=gen) for k, v in w0.items()} for _ in range(3)
        ]
        counts = [(10, {"lang": 10, "gen": 0}), (30, {"lang": 30, "gen": 30}), (60, {"lang": 0, "gen": 60})]
        plain_updates = [
            ClientUpdate(client_id=f"c{i}", state=s, num_examples=n, group_examples=g)
            for i, (s, (n, g)) in enumerate(zip(states, counts, strict=True))
        ]
        enc_updates = []
        for u in plain_updates:
            delta = {k: u.state[k] - glob[k] for k in w0}
            # encrypted by the client, shipped as bytes, recomposed by the server with no secret key
            wire = {k: v.serialize() for k, v in encrypt_state(ctx, delta).items()}
            recv = {k: ts.ckks_vector_from(server_ctx, b) for k, b in wire.items()}
            enc_updates.append(
                ClientUpdate(
                    client_id=u.client_id,
                    state=recv,
                    num_examples=u.num_examples,
                    group_examples=u.group_examples,
                )
            )
        for u in enc_updates:
            secure.validate(u, w0)
        total = secure.aggregate(global_state=None, updates=enc_updates, group_of=group_of)
        with pytest.raises(ValueError, match="secret"):
            total["lang.q.lora_B.weight"].decrypt()  # the server cannot read its own sum
        glob = plain.aggregate(global_state=glob, updates=plain_updates, group_of=group_of)
        got = decrypted_global(ctx, serialize_state(total), w0)  # the key holder's view
        worst = max(worst, max(float((got[k].double() - glob[k].double()).abs().max()) for k in w0))
    print(f"largest |HE - plaintext FedAvg| over 3 rounds: {worst:.3g}")
    assert worst < 1e-5, worst


def test_encrypted_updates_are_checked():
    ctx = make_context()
    w0 = {"a": torch.zeros(3), "b": torch.zeros(2)}
    secure = EncryptedFedAvg(w0)
    good = encrypt_state(ctx, w0)
    with pytest.raises(InvalidUpdate, match="encrypts 3 values, expected 2"):
        secure.validate(ClientUpdate(client_id="x", state={**good, "b": good["a"]}, num_examples=1), w0)
    with pytest.raises(InvalidUpdate, match="not a CKKS vector"):
        secure.validate(ClientUpdate(client_id="x", state={**good, "b": torch.zeros(2)}, num_examples=1), w0)
    with pytest.raises(InvalidUpdate, match="num_examples"):
        secure.validate(ClientUpdate(client_id="x", state=good, num_examples=0), w0)
