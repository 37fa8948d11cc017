"""The shared trainer's socket protocol (relay <-> trainer), the packed broadcast the server sends to
relaying sites, and what a relay does when the trainer is gone. The federation end to end through a
shared trainer is in tests/integration/test_nvflare_sim.py (equal to in-process tensor for tensor)."""

from __future__ import annotations

import subprocess
import sys
import threading
from multiprocessing.connection import Pipe

import numpy as np
import pytest
import torch

pytest.importorskip("nvflare")

from fedumm.engines.nvflare.client import Reply  # noqa: E402
from fedumm.engines.nvflare.names import CODEC_META, ERROR_KEY, PACKED_KEY, PACKED_META  # noqa: E402
from fedumm.engines.nvflare.trainer import TrainerServer, decode_payload, encode_payload  # noqa: E402
from fedumm.errors import InvalidUpdate  # noqa: E402

pytestmark = pytest.mark.nvflare

STATE = {"a.lora_A.weight": torch.arange(6.0).reshape(2, 3), "a.lora_B.weight": torch.ones(3, 2)}


class FakeRounds:
    """SiteRounds' surface: adds sites through ``build``, answers a round with the state + 1."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.sites: dict = {}
        self.errors: dict[str, str] = {}
        self.fail = fail
        self.builds: list[str] = []
        self.calls: list[tuple] = []

    def add(self, name, build):
        self.builds.append(name)
        if name in self.fail:
            self.errors[name] = f"{name} cannot load its model or data: OSError: no data"
        else:
            self.sites[name] = build()

    def error_reply(self, message):
        return Reply("FULL", {}, {ERROR_KEY: message}, {})

    def round(self, name, rnd, params, meta):
        self.calls.append((name, rnd, dict(meta)))
        if name in self.errors:
            return self.error_reply(self.errors[name])
        if any(isinstance(v, np.ndarray) for v in params.values()):  # HE: arrays in, a delta out
            return Reply(
                "DIFF", {k: np.asarray(v, dtype=np.float64) * 0 + rnd for k, v in params.items()}, {}, {}
            )
        out = {k: v + 1 for k, v in params.items()}
        return Reply("FULL", out, {"num_examples": 7}, {"train_loss": 0.5})


def _session(rounds, server=None):
    """A relay's end of a session whose trainer end a thread serves (as TrainerServer.serve does)."""
    server = server or TrainerServer(rounds, lambda n: f"site {n}")
    relay_end, trainer_end = Pipe()

    def serve():
        while server.handle(trainer_end):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return relay_end, t, server


def _hello(conn, site):
    import json

    conn.send_bytes(json.dumps({"site": site}).encode())
    return json.loads(conn.recv_bytes().decode())


def test_payloads_round_trip_torch_including_bfloat16_and_numpy():
    state = {"x": torch.randn(3, 2).to(torch.bfloat16), "y": torch.arange(4, dtype=torch.int8)}
    kind, blob = encode_payload(state)
    assert kind == "packed"
    back = decode_payload(kind, blob)
    assert back["x"].dtype == torch.bfloat16 and torch.equal(back["x"], state["x"])
    assert torch.equal(back["y"], state["y"])
    arrays = {"x": np.linspace(0, 1, 5)}
    kind, blob = encode_payload(arrays)
    assert kind == "arrays"
    np.testing.assert_array_equal(decode_payload(kind, blob)["x"], arrays["x"])
    with pytest.raises(ValueError, match="unknown payload kind"):
        decode_payload("pickle", b"")


def test_a_relay_session_builds_its_site_once_and_trains_through_the_trainer():
    from fedumm.engines.nvflare.controller import pack_params, unpack_params
    from fedumm.engines.nvflare.relay import forward

    rounds = FakeRounds()
    conn, t, server = _session(rounds)
    assert _hello(conn, "site-1") == {"ok": True, "error": None}
    sent = pack_params(STATE)
    meta = {PACKED_META: 1, "fedumm_round": 2, "client_name": "not forwarded", CODEC_META: "none"}
    ptype, params, out_meta, metrics = forward(conn, 2, sent, meta)
    assert ptype == "FULL" and metrics == {"train_loss": 0.5}
    assert out_meta == {"num_examples": 7, PACKED_META: 1}
    got = unpack_params(params, sender="site-1")
    for k, v in STATE.items():
        assert torch.equal(got[k], v + 1)
    # only the meta the trainer reads crosses the socket
    assert rounds.calls == [("site-1", 2, {PACKED_META: 1, "fedumm_round": 2, CODEC_META: "none"})]
    # a second relay for the same site (a restarted FLARE process) does not build it again
    conn2, t2, _ = _session(rounds, server)
    assert _hello(conn2, "site-1")["ok"] is True
    assert rounds.builds == ["site-1"]
    conn.close()
    conn2.close()
    t.join(5)
    t2.join(5)
    assert not t.is_alive() and not t2.is_alive()  # a relay hanging up ends its session


def test_a_site_that_cannot_load_reports_why_with_every_task():
    from fedumm.engines.nvflare.controller import pack_params
    from fedumm.engines.nvflare.relay import forward

    conn, _, _ = _session(FakeRounds(fail={"site-2"}))
    hello = _hello(conn, "site-2")
    assert hello["ok"] is False and "no data" in hello["error"]
    ptype, params, meta, _ = forward(conn, 1, pack_params(STATE), {PACKED_META: 1})
    assert params == {} and PACKED_META not in meta and "cannot load" in meta[ERROR_KEY]
    conn.close()


def test_under_he_the_relay_passes_arrays_and_gets_arrays_back():
    from fedumm.engines.nvflare.relay import forward

    conn, _, _ = _session(FakeRounds())
    _hello(conn, "site-3")
    arrays = {k: v.numpy().ravel().astype(np.float64) for k, v in STATE.items()}
    ptype, params, meta, _ = forward(conn, 3, arrays, {"fedumm_he": "delta"})
    assert ptype == "DIFF" and PACKED_META not in meta
    assert all(
        isinstance(v, np.ndarray) and v.dtype == np.float64 and (v == 3).all() for v in params.values()
    )
    conn.close()


def test_a_broadcast_that_does_not_decode_loses_the_round_not_the_session():
    import json

    from fedumm.engines.nvflare.controller import pack_params
    from fedumm.engines.nvflare.relay import forward

    rounds = FakeRounds()
    conn, t, server = _session(rounds)
    _hello(conn, "site-4")
    conn.send_bytes(json.dumps({"round": 1, "meta": {}, "kind": "packed"}).encode())
    conn.send_bytes(b"not a safetensors file")
    reply = json.loads(conn.recv_bytes().decode())
    conn.recv_bytes()
    assert "does not decode" in reply["meta"][ERROR_KEY]
    assert rounds.calls == []  # nothing trained on garbage
    _, params, _, _ = forward(conn, 2, pack_params(STATE), {PACKED_META: 1})  # the next round works
    assert PACKED_KEY in params
    conn.close()
    t.join(5)


def test_a_session_that_does_not_start_with_a_site_name_is_closed():
    import json

    conn, t, _ = _session(FakeRounds())
    conn.send_bytes(json.dumps({"round": 1}).encode())
    t.join(5)
    assert not t.is_alive()
    with pytest.raises(EOFError):
        conn.recv_bytes()


@pytest.mark.parametrize(
    "params",
    [
        {PACKED_KEY: np.zeros(8, dtype=np.float32)},  # not bytes
        {PACKED_KEY: np.frombuffer(b"garbage!", dtype=np.uint8)},  # not a safetensors file
        {PACKED_KEY: np.zeros(8, dtype=np.uint8), "extra": np.zeros(1, dtype=np.uint8)},
        {"weights": np.zeros(8, dtype=np.uint8)},
    ],
    ids=["float-array", "garbage", "extra-key", "no-payload"],
)
def test_a_malformed_packed_result_is_an_invalid_update_naming_its_sender(params):
    from fedumm.engines.nvflare.controller import unpack_params

    with pytest.raises(InvalidUpdate, match="site-9"):
        unpack_params(params, sender="site-9")


def test_the_round_engine_unpacks_results_and_packs_its_broadcast(tmp_path):
    from fedumm.config import load_config
    from fedumm.engines.nvflare._flare import FLModel, ParamsType
    from fedumm.engines.nvflare.controller import FlareRoundEngine, pack_params, unpack_params

    cfg = load_config(None, tree={"data": {"path": str(tmp_path)}, "federation": {"clients": 2}})

    class Ctl:
        abort_signal = None

        def broadcast_model(self, data, **kw):
            self.sent = data
            good = FLModel(
                params_type=ParamsType.FULL,
                params=pack_params({k: v + 1 for k, v in STATE.items()}),
                meta={"client_name": "site-1", "num_examples": 3, PACKED_META: 1},
            )
            bad = FLModel(
                params_type=ParamsType.FULL,
                params={PACKED_KEY: np.frombuffer(b"garbage!", dtype=np.uint8)},
                meta={"client_name": "site-2", "num_examples": 3, PACKED_META: 1},
            )
            return [good, bad]

    ctl = Ctl()
    outcome = FlareRoundEngine(ctl, cfg, packed=True).run_round(1, ["site-1", "site-2"], STATE)
    assert ctl.sent.meta[PACKED_META] == 1 and list(ctl.sent.params) == [PACKED_KEY]
    assert torch.equal(
        unpack_params(ctl.sent.params, sender="server")["a.lora_A.weight"], STATE["a.lora_A.weight"]
    )
    by = {u.client_id: u for u in outcome.updates}
    assert torch.equal(by["site-1"].state["a.lora_B.weight"], STATE["a.lora_B.weight"] + 1)
    assert by["site-2"].state == {}  # left for the round's validation to reject, naming site-2


def test_the_relay_imports_no_torch():
    code = "import sys, fedumm.engines.nvflare.relay; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_relay_without_a_trainer_gives_up_at_its_deadline(tmp_path):
    from fedumm.engines.nvflare.relay import connect

    with pytest.raises(ConnectionError, match="did not listen"):
        connect(str(tmp_path / "nobody.sock"), b"k", timeout=0.3)


def test_the_run_fails_naming_the_shared_trainer_when_it_dies(tmp_path):
    from fedumm.config import load_config
    from fedumm.engines.nvflare.procs import ProcessSet
    from fedumm.engines.nvflare.runner import SharedTrainer, _WithTrainer

    cfg = load_config(None, tree={"data": {"path": str(tmp_path)}})
    trainer = SharedTrainer(cfg, tmp_path / "c.yaml", tmp_path / "p.json", log_path=tmp_path / "t.log")
    procs = ProcessSet(threads=1, env=trainer.site_env())
    env = procs.env()
    assert env["FEDUMM_TRAINER_ADDRESS"] == trainer.address and len(env["FEDUMM_TRAINER_KEY"]) == 64
    assert len(trainer.address.encode()) < 108  # a Unix socket path's limit
    trainer.start(procs)  # the config file does not exist: the trainer exits with an error
    trainer.proc.wait(60)

    class Backend:
        def failure(self):
            return None

        def logs_hint(self):
            return "logs: here"

    wrapped = _WithTrainer(Backend(), trainer)
    assert "shared trainer exited with code" in wrapped.failure()
    assert str(tmp_path / "t.log") in wrapped.logs_hint()
    procs.stop()
    trainer.cleanup()
    assert not trainer.dir.exists()
