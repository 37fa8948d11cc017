"""run_nvflare: run the federation as a FLARE job (simulator or POC) and follow it from this process.

The launching process owns the backbone: it builds the job, starts FLARE, then polls the results
folder the server writes. For every finished round it evaluates the global adapter, rebuilds the
round's record with those metrics and hands it to ``on_round``, so the run directory, progress and
Ctrl-C behave as with the in-process engine. Every process FLARE started is stopped on the way out,
whatever the way out is.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from fedumm.config import Config
from fedumm.data.partition import load_partition
from fedumm.engines.nvflare.job import build_job, group_map
from fedumm.engines.nvflare.names import ENV_TRAINER_ADDRESS, ENV_TRAINER_KEY, ENV_TRAINER_TIMEOUT
from fedumm.engines.nvflare.procs import ProcessSet, site_threads, thread_env
from fedumm.engines.nvflare.results import ResultsReader, ServerRound, record_from_json
from fedumm.errors import EngineError
from fedumm.fl.strategies import Strategy
from fedumm.progress import NullProgress, Progress
from fedumm.server.run_dir import RunDir
from fedumm.types import AdapterState, RoundRecord

log = logging.getLogger(__name__)

__all__ = ["run_nvflare", "workspace_of"]

POLL_S = 0.25
EXIT_GRACE_S = 30.0  # how long FLARE may take to wind down after the last round


def workspace_of(cfg: Config, run: RunDir) -> Path:
    return Path(cfg.nvflare.workspace or run.path / "nvflare").resolve()


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
    """Run ``cfg.federation`` on FLARE (``cfg.engine`` nvflare-sim or nvflare-poc); return the final
    global adapter. ``run`` must already hold config.yaml and partition.json.

    The strategy runs on the FLARE server; a ``strategy`` given here receives the server's strategy
    state (``load_state_dict``) before each ``on_round`` call, so that checkpoints hold it. A resumed
    run (``start_round`` > 1) starts the server from ``initial_state`` (the global adapter after
    the round before) and the ``strategy``'s current state.
    """
    if cfg.engine not in ("nvflare-sim", "nvflare-poc"):
        raise EngineError(f"run_nvflare: engine must be nvflare-sim or nvflare-poc, got {cfg.engine!r}")
    progress = progress or NullProgress()
    config_file = (run.path / "config.yaml").resolve()
    partition_file = (run.path / "partition.json").resolve()
    for p in (config_file, partition_file):
        if not p.is_file():
            raise EngineError(f"{p} is missing: run_nvflare needs the run directory's config and partition")
    clients = list(load_partition(partition_file).clients)  # the in-process engine's order
    workspace = workspace_of(cfg, run)
    results_dir = workspace / "results"
    if results_dir.exists():
        shutil.rmtree(results_dir)
    results_dir.mkdir(parents=True)

    shared = cfg.nvflare.shared_backbone
    job_dir = build_job(
        cfg,
        workspace / "job",
        initial_state=initial_state,
        groups=group_map(cfg, list(initial_state)),
        client_args=["--config", str(config_file), "--partition", str(partition_file)],
        results_dir=str(results_dir),
        clients=clients,
        python=sys.executable,
        start_round=start_round,
        server_state=strategy.state_dict() if strategy is not None and start_round > 1 else None,
        relay=shared,
    )
    trainer: SharedTrainer | None = None
    if shared:  # one trainer holds the backbone for every site; the sites' processes only relay
        trainer = SharedTrainer(cfg, config_file, partition_file, log_path=workspace / "trainer.log")
        procs = ProcessSet(threads=1, env=trainer.site_env())
    else:  # one machine runs every site here (simulator, local POC): share its cores out between them
        procs = ProcessSet(threads=site_threads(cfg.nvflare.threads_per_site, len(clients)))
    if cfg.engine == "nvflare-sim":
        from fedumm.engines.nvflare.sim import SimBackend

        backend = SimBackend(workspace=workspace, clients=clients, procs=procs, quiet=cfg.nvflare.quiet)
    else:
        from fedumm.engines.nvflare.poc import PocBackend

        backend = PocBackend(cfg=cfg, workspace=workspace, clients=clients, procs=procs)

    progress.start("nvflare", f"{cfg.engine}: starting {len(clients)} clients", cfg.federation.rounds)
    t0 = time.perf_counter()
    with _latched_interrupts() as latch, contextlib.ExitStack() as stack:
        if trainer is not None:
            stack.callback(trainer.cleanup)
            trainer.start(procs)
            backend = _WithTrainer(backend, trainer)
        return _run(
            cfg,
            backend,
            job_dir,
            results_dir,
            initial_state,
            evaluate,
            on_round,
            progress,
            strategy,
            t0,
            latch,
            start_round,
        )


def _run(
    cfg,
    backend,
    job_dir,
    results_dir,
    initial_state,
    evaluate,
    on_round,
    progress,
    strategy,
    t0,
    latch,
    start_round=1,
):
    try:
        backend.start(job_dir)
        log.info("%s: job submitted after %.1f s", cfg.engine, time.perf_counter() - t0)
        reader = ResultsReader(results_dir)
        state = _follow(
            cfg,
            backend,
            reader,
            dict(initial_state),
            evaluate,
            on_round,
            progress,
            strategy,
            latch,
            start_round=start_round,
        )
        backend.finish(EXIT_GRACE_S)
        latch.check()
    except BaseException:
        survivors = backend.stop()
        progress.finish("nvflare")
        if survivors:  # logged, the original error is what the caller needs to see
            log.error("%s: FLARE process(es) survived SIGKILL: %s", cfg.engine, "; ".join(survivors))
        raise
    survivors = backend.stop()
    progress.finish("nvflare")
    if survivors:  # never silently: they would hold ports and memory
        raise EngineError(f"{cfg.engine}: FLARE process(es) survived SIGKILL: {'; '.join(survivors)}")
    log.info("%s: %d rounds in %.1f s", cfg.engine, cfg.federation.rounds, time.perf_counter() - t0)
    return state


class SharedTrainer:
    """The process that trains every site of this machine on one backbone
    (:mod:`fedumm.engines.nvflare.trainer`), started in the run's process set so that it stops with
    FLARE whatever the way out is."""

    def __init__(self, cfg: Config, config_file: Path, partition_file: Path, *, log_path: Path) -> None:
        self.cfg = cfg
        self.config_file = config_file
        self.partition_file = partition_file
        self.log_path = log_path
        # a short directory: a Unix socket's path has at most 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="fedumm-trainer-"))
        self.address = str(self.dir / "trainer.sock")
        self.key = secrets.token_hex(32)
        self.proc = None

    def site_env(self) -> dict[str, str]:
        return {
            ENV_TRAINER_ADDRESS: self.address,
            ENV_TRAINER_KEY: self.key,
            ENV_TRAINER_TIMEOUT: str(self.cfg.nvflare.start_timeout_s),
        }

    def start(self, procs: ProcessSet) -> None:
        # it alone computes: with the threads this process (the in-process engine) would use
        threads = self.cfg.nvflare.threads_per_site or torch.get_num_threads()
        env = procs.env(**thread_env(threads))
        cmd = [sys.executable, "-m", "fedumm.engines.nvflare.trainer", "--config", str(self.config_file)]
        cmd += ["--partition", str(self.partition_file), "--address", self.address]
        self.proc = procs.spawn(cmd, env=env, log_path=self.log_path)
        log.info("shared trainer started (pid %d, %d threads), log %s", self.proc.pid, threads, self.log_path)

    def failure(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"the shared trainer exited with code {self.proc.returncode} (log: {self.log_path})"

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _WithTrainer:
    """A FLARE backend whose run also fails when the shared trainer dies."""

    def __init__(self, backend, trainer: SharedTrainer) -> None:
        self._backend = backend
        self._trainer = trainer

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def failure(self) -> str | None:
        return self._backend.failure() or self._trainer.failure()

    def logs_hint(self) -> str:
        return f"{self._backend.logs_hint()}, {self._trainer.log_path}"


class _Interrupts:
    """Remembers a Ctrl-C (or SIGTERM) while FLARE runs, so that it is not lost.

    The handler raises KeyboardInterrupt as usual; the flag lets the poll loop raise it again
    should library code between two polls have caught and dropped the first one.
    """

    def __init__(self) -> None:
        self.triggered = False

    def check(self) -> None:
        if self.triggered:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _latched_interrupts() -> Iterator[_Interrupts]:
    """While FLARE runs, SIGINT and SIGTERM stop FLARE like Ctrl-C does (never orphaning it)."""
    latch = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield latch
        return

    def handler(signum, frame):
        latch.triggered = True
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield latch
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _follow(
    cfg: Config,
    backend,
    reader: ResultsReader,
    state: dict[str, torch.Tensor],
    evaluate,
    on_round,
    progress: Progress,
    strategy: Strategy | None,
    latch: _Interrupts | None = None,
    *,
    start_round: int = 1,
) -> dict[str, torch.Tensor]:
    """Poll the results folder until the last round (or an error, a dead FLARE, no progress)."""
    nv = cfg.nvflare
    rounds = cfg.federation.rounds
    rnd = start_round
    initial = dict(state)
    he_context = None  # secure aggregation: this process evaluates, so it decrypts with a client key
    # A round's wall time, as the in-process engine counts it: training, aggregation and evaluation.
    # The server starts round r + 1 while this process still evaluates round r, so adding the
    # server's round time to the evaluation would count the overlap twice; from the second round
    # on it is the time between this process finishing round r - 1 and round r.
    t_prev_done: float | None = None
    # the server times rounds out itself; these limits only catch a FLARE that hangs or never starts
    limit = nv.start_timeout_s + nv.round_timeout_s + EXIT_GRACE_S
    last = time.monotonic()
    while True:
        if latch is not None:
            latch.check()
        err = reader.error()
        if err is not None:
            raise EngineError(f"{cfg.engine}: {err['message']}")
        got = reader.next_round(rnd)
        if got is not None:
            if cfg.federation.secure_aggregation == "he":
                from fedumm.engines.nvflare.he import decrypted_global, load_context

                he_context = he_context or load_context(backend.he_context_path())
                got = ServerRound(
                    record=got.record,
                    state=decrypted_global(he_context, got.state, initial),
                    server_state=got.server_state,
                )
            t_eval = time.perf_counter()
            metrics = dict(evaluate(got.state, rnd)) if evaluate else {}
            t_done = time.perf_counter()
            record = record_from_json(
                got.record,
                global_metrics=metrics,
                extra_wall_s=t_done - t_eval,
                wall_time_s=None if t_prev_done is None else t_done - t_prev_done,
            )
            t_prev_done = t_done
            if strategy is not None:
                strategy.load_state_dict(got.server_state)
            if on_round:
                on_round(record, got.state)
            state = got.state
            progress.update("nvflare", rnd, description=f"{cfg.engine}: round {rnd}/{rounds} done")
            rnd += 1
            last = time.monotonic()
            limit = nv.round_timeout_s + EXIT_GRACE_S
            continue
        if rnd > rounds:
            if reader.done() is not None:
                return state
        failure = backend.failure()
        if failure is not None or backend.ended():
            # the server may have written its last files just before the end: look once more
            if (
                reader.error() is None
                and reader.next_round(rnd) is None
                and not (rnd > rounds and reader.done())
            ):
                why = failure or "FLARE ended"
                what = f"round {rnd} was reported" if rnd <= rounds else "the server finished"
                raise EngineError(f"{cfg.engine}: {why} before {what}; {backend.logs_hint()}")
            continue
        if time.monotonic() - last > limit:
            what = "start" if rnd == start_round else f"report round {rnd}"
            raise EngineError(
                f"{cfg.engine}: FLARE did not {what} within {limit:.0f} s; {backend.logs_hint()}"
            )
        time.sleep(POLL_S)
