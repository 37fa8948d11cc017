"""Update validation and the wire format (what the ledger measures)."""

import math

import pytest
import torch

from fedumm.errors import InvalidUpdate
from fedumm.types import ClientUpdate, validate_update
from fedumm.wire import pack_state, pack_update, unpack_state, unpack_update

REF = {"x.lora_A.weight": torch.zeros(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}


def make(**kw):
    base = dict(
        client_id="site-01",
        state={k: torch.ones_like(v) for k, v in REF.items()},
        num_examples=4,
        metrics={"val_score": 0.5},
    )
    base.update(kw)
    return ClientUpdate(**base)


@pytest.mark.parametrize("n", [0, -1, 1.5, True, None])
def test_rejects_bad_example_count(n):
    with pytest.raises(InvalidUpdate, match="num_examples"):
        validate_update(make(num_examples=n), REF)


def test_rejects_wrong_keys_shapes_and_values():
    with pytest.raises(InvalidUpdate, match="keys differ"):
        validate_update(make(state={"x.lora_A.weight": torch.zeros(2, 3)}), REF)
    with pytest.raises(InvalidUpdate, match="shape"):
        validate_update(
            make(state={"x.lora_A.weight": torch.zeros(3, 3), "x.lora_B.weight": torch.zeros(3, 2)}), REF
        )
    bad = {k: v.clone() for k, v in REF.items()}
    bad["x.lora_B.weight"][0, 0] = math.nan
    with pytest.raises(InvalidUpdate, match="NaN"):
        validate_update(make(state=bad), REF)
    with pytest.raises(InvalidUpdate, match="metric"):
        validate_update(make(metrics={"val_score": math.inf}), REF)


def test_update_round_trip_and_size_is_real_payload():
    u = make(group_examples={"language": 4})
    payload = pack_update(u)
    back = unpack_update(payload, sender="site-01")
    assert back.client_id == "site-01" and back.num_examples == 4 and back.metrics == {"val_score": 0.5}
    assert back.group_examples == {"language": 4}
    assert all(torch.equal(back.state[k], u.state[k]) for k in REF)
    # payload holds 12 fp32 values = 48 bytes of tensor data plus a JSON header
    assert len(payload) > 48 and len(payload) < 48 + 1024


def test_unpack_rejects_garbage_and_missing_count():
    with pytest.raises(InvalidUpdate, match="site-02"):
        unpack_update(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", sender="site-02")
    with pytest.raises(InvalidUpdate, match="num_examples"):
        unpack_update(pack_state(REF, {"client_id": "a", "metrics": "{}"}), sender="a")
    state, meta = unpack_state(pack_state(REF, {"round": "3"}))
    assert meta == {"round": "3"} and list(state) == sorted(REF)
