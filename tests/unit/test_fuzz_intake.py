"""The server's intake, fuzzed: payload bytes -> unpack -> validate -> defences -> aggregate -> checkpoint.

Generated payloads are random bytes, truncated or bit-flipped valid payloads, safetensors payloads
with wrong keys, shapes, dtypes, non-finite values or malformed metadata, and well-formed hostile
ones (huge values, huge example counts). The properties: nothing but ``InvalidUpdate`` is ever
raised, nothing malformed is accepted, and every checkpoint written holds the reference's keys,
shapes and dtypes with finite values.

The suite runs ``FUZZ_EXAMPLES`` payloads (default 300); the full run of 10,000 is

    FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest tests/unit/test_fuzz_intake.py -q
"""

from __future__ import annotations

import json
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from fedumm.errors import InvalidUpdate
from fedumm.fl.defense import DefenseSpec, defend
from fedumm.fl.strategies import make_strategy
from fedumm.io import read_safetensors
from fedumm.server.run_dir import RunDir
from fedumm.types import ClientUpdate, validate_update
from fedumm.wire import pack_update, unpack_update

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
REF = {
    "lang.q.lora_A.weight": torch.zeros(2, 3),
    "lang.q.lora_B.weight": torch.zeros(3, 2),
    "gen.h.lora_A.weight": torch.zeros(2, 3),
    "gen.h.lora_B.weight": torch.zeros(3, 2),
}
HONEST = [
    ClientUpdate(
        client_id=f"h{i}",
        state={k: torch.full_like(v, 0.01 * (i + 1)) for k, v in REF.items()},
        num_examples=10,
    )
    for i in range(3)
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def group_of(key: str) -> str:
    return key.split(".")[0]


def _good(values: float = 0.5, n: int = 10) -> bytes:
    u = ClientUpdate(
        client_id="x", state={k: torch.full_like(v, values) for k, v in REF.items()}, num_examples=n
    )
    return pack_update(u)


@st.composite
def tensors(draw):
    keys = list(REF)
    out = {}
    for key in draw(
        st.lists(st.sampled_from([*keys, "evil.key", "lang.q.lora_A.weight.x"]), max_size=6, unique=True)
    ):
        ref_shape = tuple(REF.get(key, torch.zeros(2, 2)).shape)
        shape = draw(st.sampled_from([ref_shape, (), (0,), (3, 3), ref_shape[::-1], (*ref_shape, 1)]))
        dtype = draw(st.sampled_from(DTYPES))
        fill = draw(st.sampled_from([0.0, 1.0, -1e30, 3e38, float("nan"), float("inf"), 1e-45]))
        t = torch.full(shape, fill, dtype=torch.float64)
        out[key] = t.to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    return out


@st.composite
def payloads(draw):
    kind = draw(st.sampled_from(["bytes", "mutated", "truncated", "structured", "hostile"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind in ("mutated", "truncated"):
        good = bytearray(_good())
        if kind == "truncated":
            return bytes(good[: draw(st.integers(0, len(good) - 1))])
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(good) - 1))
            good[i] = draw(st.integers(0, 255))
        return bytes(good)
    if kind == "hostile":  # well formed: accepted, then bounded by the defences
        return _good(values=draw(st.sampled_from([1e30, -3e38, 1e-30, 0.0])), n=draw(st.integers(1, 10**18)))
    meta = {}
    for key in ("client_id", "num_examples", "metrics", "group_examples", "codec"):
        if draw(st.booleans()):
            value = draw(JSON_VALUES)
            raw = draw(st.sampled_from(["json", "text"]))
            meta[key] = json.dumps(value) if raw == "json" else str(value)
    return save(draw(tensors()), metadata=meta)


def intake(payload: bytes, tmp_path) -> ClientUpdate | None:
    """The server's path for one payload; an InvalidUpdate is a rejection, anything else a bug."""
    try:
        u = unpack_update(payload, sender="fuzz")
        validate_update(u, REF)
    except InvalidUpdate:
        return None
    return u


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
@given(payload=payloads())
def test_intake_never_crashes_never_accepts_malformed_never_corrupts_checkpoints(payload, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("fuzz", numbered=True))
    accepted = intake(payload, run.path)
    if accepted is None:
        return
    # accepted: exactly the reference's keys, shapes and dtypes, finite, a positive int count
    assert set(accepted.state) == set(REF)
    for k, ref in REF.items():
        t = accepted.state[k]
        assert t.shape == ref.shape and t.dtype == ref.dtype and bool(torch.isfinite(t).all())
    assert isinstance(accepted.num_examples, int) and accepted.num_examples > 0
    updates = [*HONEST, accepted]
    out = defend(global_state=REF, updates=updates, spec=DefenseSpec(), group_of=group_of)
    state = make_strategy("fedavg").aggregate(global_state=REF, updates=out.updates, group_of=group_of)
    run.save_checkpoint(1, state, {})
    _, saved, _, _ = run.load_checkpoint()
    assert set(saved) == set(REF)
    for k, ref in REF.items():
        assert saved[k].shape == ref.shape and saved[k].dtype == ref.dtype
        assert bool(torch.isfinite(saved[k]).all())
    # the norm bound keeps a hostile update within 2x the honest median norm of its group
    assert float(saved["lang.q.lora_B.weight"].abs().max()) <= 1.0
    assert read_safetensors(run.checkpoint_dir / "round-0001.safetensors").keys() == saved.keys()


def test_the_generator_reaches_every_outcome(tmp_path):
    """The fuzzer is not vacuous: hostile payloads are accepted, malformed ones rejected."""
    assert intake(_good(1e30, 10**18), tmp_path) is not None
    assert intake(_good()[:-3], tmp_path) is None
    assert intake(save({"lang.q.lora_A.weight": torch.zeros(2, 3)}, metadata={}), tmp_path) is None
    half = {k: v.half() for k, v in REF.items()}
    meta = {"client_id": "x", "num_examples": "5", "metrics": "{}"}
    assert intake(save(half, metadata=meta), tmp_path) is None  # a precision change is rejected
