"""NVIDIA FLARE engines: the federation as a FLARE job (simulator, POC, or exported for production).

Importing this package does not import FLARE; the functions below do (through one guard that
raises EngineError with the install hint when the ``nvflare`` extra is missing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedumm.engines.base import ENGINES, FederationSetup
from fedumm.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fedumm.config import Config
    from fedumm.fl.strategies import Strategy
    from fedumm.progress import Progress
    from fedumm.server.run_dir import RunDir
    from fedumm.types import AdapterState, RoundRecord

__all__ = ["run_nvflare", "export_job", "run_on_flare"]


def run_nvflare(
    cfg: Config,
    run: RunDir,
    *,
    initial_state: AdapterState,
    evaluate: Callable[[AdapterState, int], Mapping[str, float]] | None = None,
    on_round: Callable[[RoundRecord, AdapterState], None] | None = None,
    progress: Progress | None = None,
    strategy: Strategy | None = None,
    start_round: int = 1,
) -> dict[str, torch.Tensor]:
    """Run the federation on FLARE's simulator or a local POC; see :func:`.runner.run_nvflare`."""
    from fedumm.engines.nvflare.runner import run_nvflare as _run

    return _run(
        cfg,
        run,
        initial_state=initial_state,
        evaluate=evaluate,
        on_round=on_round,
        progress=progress,
        strategy=strategy,
        start_round=start_round,
    )


def export_job(cfg: Config, out_dir: str | Path, *, initial_state: AdapterState | None = None) -> Path:
    """Write a FLARE job folder for ``nvflare job submit``; see :func:`.job.export_job`."""
    from fedumm.engines.nvflare.job import export_job as _export

    return _export(cfg, out_dir, initial_state=initial_state)


@ENGINES.register("nvflare-sim")
@ENGINES.register("nvflare-poc")
def run_on_flare(setup: FederationSetup) -> AdapterState:
    """The federation as a FLARE job (its simulator, or a local POC); global evaluation stays here.

    The FLARE server never builds the backbone: this process evaluates, per round, the adapters the
    server wrote. Each FLARE client builds its own site (:func:`fedumm.client.site.build_site`).
    """
    cfg = setup.cfg
    if setup.start_round > 1 and cfg.federation.secure_aggregation == "he":
        raise ConfigError("--resume: a federation under secure aggregation restarts from round 1")
    on_round = setup.on_round

    def record(rec, state) -> None:
        if on_round is not None:
            on_round(rec, state, {})

    return run_nvflare(
        cfg,
        setup.run,
        initial_state=setup.start_state if setup.start_round > 1 else setup.initial_state,
        evaluate=setup.evaluate,
        on_round=record,
        progress=setup.progress,
        strategy=setup.strategy,
        start_round=setup.start_round,
    )
