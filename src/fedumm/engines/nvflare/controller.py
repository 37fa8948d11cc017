"""Server side of the FLARE job: a ModelController that runs fedumm's RoundLoop.

The controller never builds the backbone: it loads the resolved config, the initial adapter and the
key -> adapter-group map shipped in the job, and runs :class:`fedumm.server.rounds.RoundLoop` with an
engine whose ``run_round`` is one FLARE broadcast. Each round's record and global adapter go to a
results folder (see :mod:`fedumm.engines.nvflare.results`); global evaluation happens elsewhere.

Constructor arguments are written into ``config_fed_server.json`` by FedJob, so they are JSON builtins
stored under their own names.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence

from fedumm.config import Config, load_config
from fedumm.engines.nvflare._flare import (
    FLModel,
    ModelController,
    ParamsType,
    fobs_nbytes,
    register_tensor_decomposer,
)
from fedumm.engines.nvflare.names import CODEC_META, ERROR_KEY, HE_META, PACKED_KEY, PACKED_META
from fedumm.engines.nvflare.results import ResultsWriter
from fedumm.errors import EngineError, InvalidUpdate
from fedumm.fl.compress import apply_delta, decode, delta_of, encode
from fedumm.fl.strategies import make_strategy
from fedumm.io import read_safetensors
from fedumm.server.rounds import RoundLoop, RoundOutcome
from fedumm.server.trust import trust_settings
from fedumm.types import AdapterState, ClientUpdate, RoundRecord

log = logging.getLogger(__name__)

__all__ = ["FedummController", "FlareRoundEngine", "TASK_NAME", "ERROR_KEY", "CODEC_META", "RESULTS_SUBDIR"]

TASK_NAME = "train"
RESULTS_SUBDIR = "fedumm"  # default results folder inside the server's run directory
_FLARE_META = ("client_name", "props")  # meta keys the controller adds to results on arrival


def _flmodel_nbytes(model: FLModel) -> int:
    """Bytes of what the client sent: its FLModel without the meta the controller added on arrival."""
    meta = {k: v for k, v in (model.meta or {}).items() if k not in _FLARE_META}
    sent = FLModel(
        params_type=model.params_type,
        params=model.params,
        metrics=model.metrics,
        meta=meta,
        current_round=model.current_round,
        total_rounds=model.total_rounds,
    )
    return fobs_nbytes(sent)


def pack_params(params: AdapterState) -> dict:
    """Tensors as one safetensors payload in one uint8 array: what a relaying site passes on to the
    shared trainer without decoding it (so its process needs no torch)."""
    import numpy as np
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in params.items()})
    return {PACKED_KEY: np.frombuffer(blob, dtype=np.uint8)}


def unpack_params(params, *, sender: str) -> AdapterState:
    """The tensors of a packed message; InvalidUpdate naming ``sender`` when it is not one payload."""
    import numpy as np
    from safetensors.torch import load

    blob = params.get(PACKED_KEY) if isinstance(params, dict) else None
    if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1 or len(params) != 1:
        raise InvalidUpdate(f"{sender}: a packed message must hold one uint8 array {PACKED_KEY!r}")
    try:
        return load(blob.tobytes())
    except Exception as exc:  # safetensors' own parser: no pickle, bounded by the header it checks
        raise InvalidUpdate(f"{sender}: the packed payload is not a safetensors file ({exc})") from None


class FlareRoundEngine:
    """fedumm Engine: one round = one FLARE broadcast to the sampled clients."""

    def __init__(self, controller: FedummController, cfg: Config, *, packed: bool = False) -> None:
        self.controller = controller
        self.cfg = cfg
        self.packed = packed  # broadcasts as one payload (the sites relay to a shared trainer)
        self.he = cfg.federation.secure_aggregation == "he"
        self.timeout = max(1, math.ceil(cfg.nvflare.round_timeout_s))
        self.last_errors: dict[str, str] = {}
        self.sent: AdapterState | None = None  # the decoded half-precision broadcast of this round

    def run_round(self, rnd: int, clients: Sequence[str], global_state: AdapterState) -> RoundOutcome:
        ctl = self.controller
        if ctl.abort_signal is not None and ctl.abort_signal.triggered:
            raise EngineError(f"round {rnd}: the FLARE job was aborted")
        model = self._broadcast(rnd, global_state)
        down = fobs_nbytes(model)
        targets = list(clients)
        # Wait for every sampled client until the timeout (min_responses reached early does not end
        # the round: the in-process engine also aggregates every sampled client that answers).
        results = ctl.broadcast_model(
            data=model,
            task_name=TASK_NAME,
            targets=targets,
            min_responses=min(self.cfg.federation.min_clients, len(targets)),
            timeout=self.timeout,
            wait_time_after_min_received=self.timeout,
        )
        if ctl.abort_signal is not None and ctl.abort_signal.triggered:
            raise EngineError(f"round {rnd}: the FLARE job was aborted")
        updates: list[ClientUpdate] = []
        bytes_up: dict[str, int] = {}
        bytes_down: dict[str, int] = {}
        seen: set[str] = set()
        dropped: list[str] = []
        for r in results:
            meta = dict(r.meta or {})
            name = meta.get("client_name")
            if name not in targets or name in seen:
                log.warning("round %d: ignoring a result from %r (not sampled or duplicate)", rnd, name)
                continue
            seen.add(name)
            bytes_down[name] = down
            bytes_up[name] = _flmodel_nbytes(r)
            if meta.get(ERROR_KEY):
                self.last_errors[name] = str(meta[ERROR_KEY])
                log.warning("round %d: %s could not train: %s", rnd, name, meta[ERROR_KEY])
                dropped.append(name)
                continue
            updates.append(self._to_update(rnd, name, r, global_state))
        for name in targets:
            if name not in seen:
                log.warning(
                    "round %d: no result from %s within %d s (failed or timed out)", rnd, name, self.timeout
                )
                dropped.append(name)
        return RoundOutcome(
            updates=updates,
            bytes_up=dict(sorted(bytes_up.items())),
            bytes_down=dict(sorted(bytes_down.items())),
            dropped=tuple(dropped),
        )

    def _broadcast(self, rnd: int, global_state) -> FLModel:
        """The global adapter (plaintext), or under HE: W_0 in round 1, then the encrypted sum D_t."""
        if not self.he:
            codec = self.cfg.federation.download_compression
            meta: dict = {"fedumm_round": rnd}
            if codec == "none":
                params = {k: v.detach().cpu().contiguous() for k, v in global_state.items()}
                self.sent = None
            else:  # half precision; clients train from what they decode, see _to_update
                params, _ = encode(global_state, codec)
                self.sent = decode(params, codec, sender="server")
                meta[CODEC_META] = codec
            if self.packed:
                params = pack_params(params)
                meta[PACKED_META] = 1
            return FLModel(
                params_type=ParamsType.FULL,
                params=params,
                current_round=rnd,
                total_rounds=self.cfg.federation.rounds,
                meta=meta,
            )
        import tenseal as ts

        from fedumm.engines.nvflare._flare import he_meta_keys

        keys_key, algo_key, ckks = he_meta_keys()
        meta: dict = {"fedumm_round": rnd, HE_META: "init" if rnd == 1 else "delta"}
        if rnd == 1:
            params = {k: v.detach().cpu().numpy() for k, v in global_state.items()}
        else:
            # serialised, as FLARE's HEModelShareableGenerator sends them: a vector whose context has no
            # secret key cannot be deep-copied for the broadcast; HEModelDecryptor deserialises bytes
            params = {
                k: v.serialize() if isinstance(v, ts.CKKSVector) else v for k, v in global_state.items()
            }
            meta[keys_key] = {k: isinstance(v, ts.CKKSVector) for k, v in global_state.items()}
            meta[algo_key] = ckks
        return FLModel(
            params_type=ParamsType.FULL,
            params=params,
            current_round=rnd,
            total_rounds=self.cfg.federation.rounds,
            meta=meta,
        )

    def _to_update(self, rnd: int, name: str, r: FLModel, global_state: AdapterState) -> ClientUpdate:
        """As sent; whatever is malformed is left for RoundLoop's validate_update to reject."""
        meta = dict(r.meta or {})
        params = r.params if isinstance(r.params, dict) else {}
        if meta.get(PACKED_META) and not self.he:
            try:
                params = unpack_params(params, sender=name)
            except InvalidUpdate as exc:  # rejected below, naming the sender
                log.warning("round %d: %s", rnd, exc)
                params = {}
        if self.he:
            pass  # encrypted deltas: EncryptedFedAvg validates and sums them as they are
        elif meta.get(CODEC_META, "none") != "none":  # a compressed delta onto the fp32 global
            try:
                params = apply_delta(global_state, decode(params, str(meta[CODEC_META]), sender=name))
            except (InvalidUpdate, ValueError) as exc:  # malformed: rejected below
                log.warning("round %d: %s sent a compressed update that does not decode (%s)", rnd, name, exc)
                params = {}
        elif r.params_type == ParamsType.DIFF:
            try:
                params = {k: global_state[k] + v for k, v in params.items()}
            except Exception as exc:  # keys or shapes do not match: rejected below
                log.warning("round %d: %s sent a DIFF that does not apply (%s)", rnd, name, exc)
                params = {}
        elif self.sent is not None:  # a full state trained from the half-precision broadcast
            try:
                params = apply_delta(global_state, delta_of(params, self.sent))
            except (InvalidUpdate, ValueError) as exc:
                log.warning("round %d: %s sent a state that does not match (%s)", rnd, name, exc)
                params = {}
        return ClientUpdate(
            client_id=name,  # the authenticated FLARE site name, not a name the client claims
            state=params,
            num_examples=meta.get("num_examples"),  # type: ignore[arg-type]
            metrics=dict(r.metrics or {}),
            group_examples=meta.get("group_examples"),
        )


class FedummController(ModelController):
    """Runs fedumm's RoundLoop on the FLARE server.

    Args:
        config_file: the resolved fedumm config (YAML); relative paths are inside the app's custom/.
        initial_adapter: safetensors file of the initial global adapter (same rule).
        groups_file: JSON map adapter key -> adapter group (per-modality aggregation; same rule).
        results_dir: where round results go; "" = ``<server run dir>/fedumm`` (downloaded with the job).
        clients: the clients to federate over, in sampling order; empty = the clients connected when
            the job starts, sorted by name.
        start_round: the first round to run (a resumed federation: ``initial_adapter`` is the global
            adapter after the round before it).
        server_state_file: safetensors file of the strategy's state to resume from ("" or an empty
            file: a fresh strategy).
        packed: broadcast each global adapter as one safetensors payload (the sites relay it to a
            shared trainer unread); results come back packed either way they are marked.
    """

    def __init__(
        self,
        config_file: str = "fedumm_config.yaml",
        initial_adapter: str = "fedumm_initial_adapter.safetensors",
        groups_file: str = "fedumm_groups.json",
        results_dir: str = "",
        clients: list | None = None,
        start_round: int = 1,
        server_state_file: str = "fedumm_server_state.safetensors",
        packed: bool = False,
    ) -> None:
        super().__init__(persistor_id="", ignore_result_error=True)
        self.config_file = config_file
        self.initial_adapter = initial_adapter
        self.groups_file = groups_file
        self.results_dir = results_dir
        self.clients = list(clients) if clients else None
        self.start_round = int(start_round)
        self.server_state_file = server_state_file
        self.packed = bool(packed)

    def _resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.get_app_dir(), "custom", path)

    def run(self) -> None:
        register_tensor_decomposer()
        results = ResultsWriter(self.results_dir or os.path.join(self.get_run_dir(), RESULTS_SUBDIR))
        engine: FlareRoundEngine | None = None
        try:
            cfg = load_config(self._resolve(self.config_file))
            initial = read_safetensors(self._resolve(self.initial_adapter))
            with open(self._resolve(self.groups_file), encoding="utf-8") as f:
                groups: dict[str, str] = json.load(f)
            clients = list(self.clients or []) or sorted(c.name for c in self.engine.get_clients())
            if not clients:
                raise EngineError("no FLARE clients to federate over")
            fed = cfg.federation
            strategy = make_strategy(
                fed.strategy, group_strategies=fed.group_strategies, **fed.strategy_params
            )
            server_file = self._resolve(self.server_state_file) if self.server_state_file else ""
            if server_file and os.path.isfile(server_file):
                strategy.load_state_dict(read_safetensors(server_file))
            engine = FlareRoundEngine(self, cfg, packed=self.packed)
            results.started(clients, rounds=fed.rounds)
            self.info(f"fedumm: {fed.rounds} rounds of {fed.strategy} over {', '.join(clients)}")
            secure = None
            if engine.he:
                from fedumm.engines.nvflare._flare import register_he_decomposers
                from fedumm.engines.nvflare.he import EncryptedFedAvg

                register_he_decomposers()
                secure = EncryptedFedAvg(initial)
                self.info("fedumm: secure aggregation (CKKS); the server holds no secret key")

            def on_round(record: RoundRecord, state: AdapterState) -> None:
                if secure is not None:  # the encrypted sum of the deltas, as the launcher decrypts it
                    from fedumm.engines.nvflare.he import serialize_state

                    state = serialize_state(state)
                results.round(record, state, strategy.state_dict())
                self.info(f"fedumm: round {record.round} aggregated from {', '.join(record.clients)}")

            loop = RoundLoop(
                engine=engine,
                strategy=strategy,
                clients=clients,
                num_rounds=fed.rounds,
                seed=cfg.seed,
                sample_fraction=fed.sample_fraction,
                min_clients=fed.min_clients,
                group_of=lambda key: groups.get(key, "other"),
                evaluate=None,
                on_round=on_round,
                trust=trust_settings(cfg),
                secure=secure,
            )
            if engine.he and self.start_round > 1:
                raise EngineError("a federation under secure aggregation cannot resume (W_0 is gone)")
            loop.run(initial, start_round=self.start_round)
            results.done(fed.rounds)
        except Exception as exc:
            if engine is not None and engine.last_errors and isinstance(exc, EngineError):
                detail = "; ".join(f"{k}: {v}" for k, v in sorted(engine.last_errors.items()))
                exc = EngineError(f"{exc}; client errors: {detail}")
            results.error(exc)
            self.panic(f"fedumm server loop failed: {type(exc).__name__}: {exc}")
