"""Compressed transport: round-trip error bounds, error feedback, payload sizes on the wire."""

import pytest
import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.compress import CODECS, SCALE_SUFFIX, apply_delta, decode, delta_of, encode
from fedumm.wire import pack_state, unpack_state


def lora_delta(seed, r=16, d=256, scale=1e-3):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.q_proj.lora_A.weight": scale * torch.randn(r, d, generator=g),
        "m.q_proj.lora_B.weight": scale * torch.randn(d, r, generator=g),
        "m.bias": scale * torch.randn(d, generator=g),
    }


@pytest.mark.parametrize(
    ("codec", "unit_roundoff", "half_subnormal"),
    [("fp16", 2.0**-11, 2.0**-25), ("bf16", 2.0**-8, 0.0), ("none", 0.0, 0.0)],
)
def test_float_codecs_round_trip_within_roundoff(codec, unit_roundoff, half_subnormal):
    delta = lora_delta(0)
    payload, res = encode(delta, codec)
    out = decode(payload, codec)
    for k, x in delta.items():
        assert out[k].dtype == torch.float32
        # round to nearest: |x - fl(x)| <= u |x| for normal numbers; below fp16's smallest normal
        # (6.1e-5, where small LoRA deltas live) the error is up to half the subnormal spacing 2^-24
        bound = torch.maximum(unit_roundoff * x.abs(), torch.tensor(half_subnormal))
        assert bool(((out[k] - x).abs() <= bound).all())
        assert torch.equal(res[k], x - out[k])


@pytest.mark.parametrize("codec", ["int8", "int8_row"])
def test_int8_error_is_at_most_half_a_step(codec):
    delta = lora_delta(1)
    payload, res = encode(delta, codec)
    out = decode(payload, codec)
    for k, x in delta.items():
        assert payload[k].dtype == torch.int8
        if codec == "int8_row" and x.dim() == 2:
            step = x.abs().amax(dim=1, keepdim=True) / 127  # one scale per row
            assert payload[k + SCALE_SUFFIX].shape == (x.shape[0],)
        else:
            step = x.abs().max() / 127  # one scale per tensor
            assert payload[k + SCALE_SUFFIX].shape == ()
        assert bool(((out[k] - x).abs() <= step / 2 * (1 + 1e-5)).all())
        assert float((out[k] - x).abs().max()) > 0  # it is lossy
        assert torch.allclose(res[k], x - out[k])


def test_int8_hand_computed():
    payload, _ = encode({"w": torch.tensor([[1.27, -0.5, 0.004], [0.0, 0.0, 0.0]])}, "int8_row")
    # row 0: scale 1.27 / 127 = 0.01 -> q = [127, -50, 0] ; row 1: all zero -> scale 0, q = 0
    assert payload["w"].tolist() == [[127, -50, 0], [0, 0, 0]]
    assert payload["w" + SCALE_SUFFIX].tolist() == pytest.approx([0.01, 0.0])
    assert torch.allclose(
        decode(payload, "int8_row")["w"], torch.tensor([[1.27, -0.5, 0.0], [0.0, 0.0, 0.0]])
    )


def test_error_feedback_bounds_the_drift_of_a_persistent_small_signal():
    # entries below half a quantisation step (1/127/2 ~ 0.0039) vanish every round without feedback
    delta = {"w": torch.tensor([1.0, 0.003, 0.003, -0.003])}
    true_sum = torch.zeros(4)
    sums = {"ef": torch.zeros(4), "plain": torch.zeros(4)}
    residual = None
    for _ in range(50):
        true_sum += delta["w"]
        payload, residual = encode(delta, "int8", residual=residual)
        sums["ef"] += decode(payload, "int8")["w"]
        plain, _ = encode(delta, "int8")
        sums["plain"] += decode(plain, "int8")["w"]
        assert float((true_sum - sums["ef"]).abs().max()) <= 1 / 127 / 2 * 1.01  # one message's error, always
    assert float((true_sum - sums["plain"]).abs().max()) == pytest.approx(
        50 * 0.003, rel=1e-4
    )  # linear growth


def test_error_feedback_tracks_the_running_sum_of_random_deltas():
    gen = torch.Generator().manual_seed(0)
    true_sum, ef_sum, plain_sum, residual = torch.zeros(8, 32), torch.zeros(8, 32), torch.zeros(8, 32), None
    ef_drift, plain_drift = [], []
    for _ in range(50):
        d = {"w": torch.randn(8, 32, generator=gen) * 1e-2 + 2e-4}  # a small common bias, as in training
        true_sum += d["w"]
        payload, residual = encode(d, "int8", residual=residual)
        ef_sum += decode(payload, "int8")["w"]
        plain_sum += decode(encode(d, "int8")[0], "int8")["w"]
        ef_drift.append(float((true_sum - ef_sum).abs().max()))
        plain_drift.append(float((true_sum - plain_sum).abs().max()))
    step = float(d["w"].abs().max()) / 127  # about one quantisation step of these deltas
    assert max(ef_drift) < 1.5 * step  # bounded by half a step of the (delta + residual) sent
    assert plain_drift[-1] > 3 * max(ef_drift)  # without feedback the errors accumulate


def test_payload_sizes_on_the_wire():
    delta = lora_delta(2, r=16, d=512)
    raw = {c: len(pack_state(encode(delta, c)[0], {"codec": c})) for c in CODECS}
    n = sum(t.numel() for t in delta.values())
    assert raw["none"] == pytest.approx(4 * n, rel=0.02)
    assert raw["fp16"] / raw["none"] == pytest.approx(0.5, abs=0.01)
    assert raw["bf16"] == raw["fp16"]
    assert raw["int8"] / raw["none"] == pytest.approx(0.25, abs=0.01)  # 1 byte per value + 3 scalar scales
    rows = 16 + 512  # A has 16 rows, B has 512 (the bias is 1-D: one scale)
    assert raw["int8_row"] - raw["int8"] == pytest.approx(4 * (rows - 2), abs=200)
    # what the wire carries decodes to what encode produced
    payload, _ = encode(delta, "int8")
    tensors, meta = unpack_state(pack_state(payload, {"codec": "int8"}))
    assert meta == {"codec": "int8"}
    assert all(torch.equal(decode(tensors, "int8")[k], decode(payload, "int8")[k]) for k in delta)


def test_encode_does_not_mutate_and_delta_helpers_round_trip():
    g = lora_delta(3, scale=1.0)
    state = {k: v + 0.01 for k, v in g.items()}
    copies = {k: v.clone() for k, v in state.items()}
    delta = delta_of(state, g)
    res = {k: torch.full_like(v, 1e-4) for k, v in delta.items()}
    res_copy = {k: v.clone() for k, v in res.items()}
    payload, _ = encode(delta, "fp16", residual=res)
    assert all(torch.equal(state[k], copies[k]) and torch.equal(res[k], res_copy[k]) for k in state)
    back = apply_delta(g, decode(payload, "fp16"))
    assert all(torch.allclose(back[k], state[k] + 1e-4, atol=1e-5) for k in state)


def test_bad_inputs_are_rejected():
    d = {"w": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="unknown codec"):
        encode(d, "int4")
    with pytest.raises(ValueError, match="residual"):
        encode(d, "int8", residual={"v": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="fp16"):
        encode({"w": torch.tensor([7e4])}, "fp16")
    with pytest.raises(ValueError, match="NaN"):
        encode({"w": torch.tensor([float("nan")])}, "int8")
    payload, _ = encode(d, "int8")
    with pytest.raises(InvalidUpdate, match="pair up"):
        decode({"w": payload["w"]}, "int8", sender="c7")
    with pytest.raises(InvalidUpdate, match="c7"):
        decode(
            {"w": payload["w"].float(), "w" + SCALE_SUFFIX: payload["w" + SCALE_SUFFIX]}, "int8", sender="c7"
        )
    with pytest.raises(InvalidUpdate, match="scales"):
        decode({"w": payload["w"], "w" + SCALE_SUFFIX: torch.tensor(-1.0)}, "int8")
    with pytest.raises(InvalidUpdate, match="shape"):
        decode({"w": payload["w"], "w" + SCALE_SUFFIX: torch.ones(2)}, "int8")
    with pytest.raises(InvalidUpdate):
        decode({"w": torch.ones(2, dtype=torch.int8)}, "fp16")
