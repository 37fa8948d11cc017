"""The FLARE job: FedJob + FedummController on the server + a Client API ScriptRunner on the clients.

One builder serves the simulator, the POC and the export for a provisioned system; they differ only
in where the client finds its config and partition, where the server writes results and which
Python runs the client script. The job ships, in its app's ``custom/`` folder:

- ``fedumm_client.py``: the client entry script (the code is the installed ``fedumm`` package;
  ``set_app_packages(["fedumm"])`` keeps FedJob from copying it into the job)
- ``fedumm_config.yaml``: the resolved config
- ``fedumm_initial_adapter.safetensors``: the initial global adapter (the server has no backbone)
- ``fedumm_groups.json``: adapter key -> adapter group, for per-modality aggregation on the server

Having ``custom/`` content makes the job BYOC for FLARE (``meta.byoc``), which is what lets the
fedumm controller class through a site's component allow-list.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedumm.config import Config, dump_config
from fedumm.engines.nvflare._flare import ExchangeFormat, FedJob, FrameworkType, ScriptRunner, TransferType
from fedumm.engines.nvflare.controller import TASK_NAME, FedummController
from fedumm.engines.nvflare.names import CLIENT_CONTEXT
from fedumm.errors import EngineError
from fedumm.io import atomic_save_safetensors
from fedumm.types import AdapterState

if TYPE_CHECKING:
    import torch

__all__ = [
    "CLIENT_SCRIPT",
    "CONFIG_NAME",
    "INITIAL_NAME",
    "GROUPS_NAME",
    "job_name",
    "group_map",
    "build_job",
    "export_job",
]

CLIENT_SCRIPT = Path(__file__).resolve().with_name("fedumm_client.py")
CONFIG_NAME = "fedumm_config.yaml"
INITIAL_NAME = "fedumm_initial_adapter.safetensors"
SERVER_STATE_NAME = "fedumm_server_state.safetensors"  # the strategy's state when a run resumes
GROUPS_NAME = "fedumm_groups.json"
CONTROLLER_ID = "fedumm_controller"


def job_name(cfg: Config) -> str:
    """A FLARE job name from the run name (letters, digits, ``_`` and ``-``)."""
    return "fedumm-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", cfg.name).strip("-") or "run")


def group_map(cfg: Config, keys: Sequence[str]) -> dict[str, str]:
    """Adapter key -> group, from the model family's description (no model is loaded)."""
    from fedumm.models import family_info

    info = family_info(cfg.model.family)
    return {k: info.group_of(k) for k in sorted(keys)}


def build_job(
    cfg: Config,
    out_root: str | Path,
    *,
    initial_state: AdapterState,
    groups: Mapping[str, str],
    client_args: Sequence[str],
    results_dir: str = "",
    clients: Sequence[str] = (),
    python: str = "python3",
    min_clients: int | None = None,
    start_round: int = 1,
    server_state: Mapping[str, torch.Tensor] | None = None,
    relay: bool = False,
) -> Path:
    """Write the job folder ``out_root/<job name>`` and return it.

    A resumed federation ships the global adapter after round ``start_round - 1`` as the initial
    adapter and the strategy's state (``server_state``, e.g. FedAdam's moments); the server's
    rounds then count on from ``start_round``.

    ``client_args`` are the client script's arguments (``--config``, optionally ``--partition``),
    relative paths resolve beside the shipped script. ``python`` runs the client script when
    ``cfg.nvflare.launch_external_process`` is on.

    ``relay``: the sites relay their tasks to a shared trainer on their machine (the launcher starts
    it; :mod:`fedumm.engines.nvflare.trainer`): the script then runs inside FLARE's site process and
    the broadcast travels as one packed payload (numpy), so that process never imports torch.
    """
    name = job_name(cfg)
    out_root = Path(out_root)
    target = out_root / name
    if target.exists():
        shutil.rmtree(target)
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedumm-job-") as tmp:
        staging = Path(tmp)
        (staging / CONFIG_NAME).write_text(dump_config(cfg), encoding="utf-8")
        atomic_save_safetensors(staging / INITIAL_NAME, initial_state)
        (staging / GROUPS_NAME).write_text(
            json.dumps(dict(groups), indent=1, sort_keys=True), encoding="utf-8"
        )
        # a copy outside the package, so that FedJob ships it as custom/fedumm_client.py
        script = staging / CLIENT_SCRIPT.name
        shutil.copyfile(CLIENT_SCRIPT, script)

        job = FedJob(name=name, min_clients=min_clients or cfg.federation.min_clients)
        job.set_app_packages(["fedumm"])
        server_files = [CONFIG_NAME, INITIAL_NAME, GROUPS_NAME]
        if server_state:  # a resumed strategy with state of its own (FedAdam's moments, ...)
            atomic_save_safetensors(staging / SERVER_STATE_NAME, dict(server_state))
            server_files.append(SERVER_STATE_NAME)
        he = cfg.federation.secure_aggregation == "he"
        controller = FedummController(
            results_dir=results_dir,
            clients=list(clients),
            start_round=start_round,
            packed=relay and not he,
        )
        job.to_server(controller, id=CONTROLLER_ID)
        # a client that has sent its result, or is told to try again, waits this long before asking
        # for the next round's task (FLARE's 2 s by default; 0.5 s measured no faster at K = 16)
        job.to_server({"server": {"task_request_interval": cfg.nvflare.task_poll_s}})
        for f in server_files:
            job.add_file_to_server(str(staging / f))
        job.add_file_to_clients(str(staging / CONFIG_NAME))
        if he:
            # FLARE's own HE path: the client's delta is CKKS-encrypted before it leaves the site,
            # and what the server broadcasts is decrypted on the site (provisioned client context)
            from fedumm.engines.nvflare._flare import he_filters

            encryptor, decryptor, filter_type = he_filters(CLIENT_CONTEXT)
            job.to_clients(encryptor, filter_type=filter_type.TASK_RESULT, tasks=[TASK_NAME])
            job.to_clients(decryptor, filter_type=filter_type.TASK_DATA, tasks=[TASK_NAME])
        # HE encrypts numpy arrays, a relay passes a packed payload (numpy) on; otherwise the trainer
        # and the server exchange torch tensors
        numpy_only = he or relay
        framework = FrameworkType.NUMPY if numpy_only else FrameworkType.PYTORCH
        exchange = ExchangeFormat.NUMPY if numpy_only else ExchangeFormat.PYTORCH
        job.to_clients(
            ScriptRunner(
                script=str(script),
                script_args=shlex.join(client_args),
                # a relay is light: it runs inside FLARE's site process
                launch_external_process=cfg.nvflare.launch_external_process and not relay,
                command=[python, "-u"],
                framework=framework,  # the trainer sees torch tensors (numpy under HE)
                server_expected_format=exchange,  # so does the server (bf16-safe, no numpy)
                params_transfer_type=TransferType.FULL,
                launch_timeout=cfg.nvflare.start_timeout_s,
            ),
            tasks=[TASK_NAME],
        )
        job.export_job(str(out_root))
    if not (target / "meta.json").is_file():
        raise EngineError(f"FLARE did not write a job folder at {target}")
    _make_portable(target)
    return target


def _make_portable(job_dir: Path) -> None:
    """FedJob writes an in-process script as the absolute path it was given; the site's runner finds
    it by name inside ``custom/``, so store the name."""
    for cfg_file in job_dir.glob("*/config/config_fed_client.json"):
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
        changed = False
        for ex in data.get("executors", []):
            args = ex.get("executor", {}).get("args", {})
            p = args.get("task_script_path")
            if isinstance(p, str) and Path(p).is_absolute():
                args["task_script_path"] = Path(p).name
                changed = True
        if changed:
            cfg_file.write_text(json.dumps(data, indent=2), encoding="utf-8")


def export_job(cfg: Config, out_dir: str | Path, *, initial_state: AdapterState | None = None) -> Path:
    """Write a job folder for ``nvflare job submit`` on a provisioned system; return its path.

    The config travels inside the job; each site points it at its own data and backbone through
    its environment (``FEDUMM_DATA_PATH``, ``FEDUMM_MODEL_PATH``, ``FEDUMM_SITE_OVERRIDES``; see
    :mod:`fedumm.engines.nvflare.client`). Without ``initial_state`` the backbone named by
    ``model.path`` is loaded here once to build the initial adapter (the server never loads it).
    The server federates over the clients connected when the job starts; results land in its run
    directory under ``fedumm/`` (``nvflare job download``).
    """
    if initial_state is None:
        from fedumm.client.site import build_family
        from fedumm.models.lora_state import get_adapter_state

        family, _ = build_family(cfg)
        initial_state = get_adapter_state(family.model)
        del family
    return build_job(
        cfg,
        out_dir,
        initial_state=initial_state,
        groups=group_map(cfg, list(initial_state)),
        client_args=["--config", CONFIG_NAME],
        python="python3",
    )
