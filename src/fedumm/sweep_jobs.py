"""Running a sweep's cells in parallel worker processes (``fedumm sweep --jobs N``).

Each cell is independent of the others (a federated cell reads its baseline cell's numbers only when
the sweep is reported), so N cells can run at once, each in its own spawned process with
``cores // N`` torch threads: the process's cores shared out, never oversubscribed. Two things are
not independent, and the scheduler keeps them apart:

- **The synthetic world.** Cells of different seeds (or world sizes) that share ``data.path``
  render different worlds into the same folder. A cell starts only when no running cell reads
  another world from its folder; this process renders the world before the cell starts, so
  workers never write it.
- **FLARE.** Simulator and POC runs start servers, ports and process trees of their own; ``--jobs``
  runs in-process cells only and refuses a sweep that has others.

Workers report to this process over a pipe in JSON (no pickle crosses it); their run directories
and ``summary.json`` files are the same as a sequential sweep writes, so a sweep may alternate
between ``--jobs 1`` and ``--jobs N`` and resume either way. With the same thread count a cell's
numbers are those of a sequential run (tests/integration/test_sweep_jobs.py); with another they
are another draw of the same run: a whole-tensor sum (the gradient norm that clipping uses, a
mean loss) differs in its last bits between one and two threads, and over tens of rounds or
epochs that moves the trajectory (docs/RESULTS.md: a 40-epoch centralized baseline read 60.97 %
at one thread and 65.06 % at two).

Ctrl-C reaches the workers from the terminal: each saves its run as a sequential sweep would and
ends; this process waits for them, marks their cells interrupted and re-raises. SIGTERM to this
process (``kill``, a batch scheduler's stop) is taken as Ctrl-C, and is passed on to the workers as
SIGINT, which they honour even where they started with SIGINT ignored (a shell's background job).
A worker whose parent is gone without a word (``kill -9``) notices within a second or two and
stops the same way: no worker outlives its sweep to write into a run directory that a new sweep
would start again.
"""

from __future__ import annotations

import _thread
import functools
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from fedumm.errors import ConfigError, FedummError

__all__ = [
    "available_cores",
    "check_jobs",
    "world_key",
    "can_start",
    "run_cells_parallel",
    "cell_worker",
    "watch_parent",
]

log = logging.getLogger(__name__)

GRACE_S = 5.0  # after Ctrl-C: how long workers get to notice it themselves before it is sent on
STOP_S = 120.0  # ... and to save their run and end, before they are terminated


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_jobs(jobs: int, cells: Sequence[Any], *, cores: int | None = None) -> int:
    """Torch threads per job for ``jobs`` parallel cells; a clear error where it cannot work."""
    cores = available_cores() if cores is None else cores
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs > cores:
        raise ConfigError(
            f"--jobs {jobs} is more than the {cores} core(s) this process may use: the cells would "
            f"fight over them; use --jobs {cores} or fewer"
        )
    flare = [c.name for c in cells if c.config.engine != "inprocess"]
    if jobs > 1 and flare:
        raise ConfigError(
            f"--jobs runs in-process cells only; {', '.join(flare[:3])}"
            + (f" and {len(flare) - 3} more" if len(flare) > 3 else "")
            + " use a FLARE engine (run them with --jobs 1)"
        )
    return max(1, cores // jobs)


def world_key(cfg: Any) -> tuple[str, str] | None:
    """(folder, the world rendered there) when the cell renders its world, else None."""
    d = cfg.data
    if not d.synthesize_if_missing:
        return None
    images = json.dumps(None if d.synth_images is None else dict(d.synth_images), sort_keys=True)
    return str(Path(d.path).resolve()), f"seed={cfg.seed} images={images}"


def can_start(cell: Any, running: Sequence[Any]) -> bool:
    """Whether ``cell`` may start beside the ``running`` cells: never while one of them reads another
    world from the same folder."""
    mine = world_key(cell.config)
    if mine is None:
        return True
    for other in running:
        theirs = world_key(other.config)
        if theirs is not None and theirs[0] == mine[0] and theirs[1] != mine[1]:
            return False
    return True


PARENT_POLL_S = 1.0  # how often a worker checks that its sweep is still there


def _send(conn: Connection, **msg: Any) -> None:
    try:
        conn.send_bytes(json.dumps(msg).encode("utf-8"))
    except OSError:  # the sweep is gone; the run directory holds what the cell saved
        log.warning("the sweep that started this cell is gone; its report was not delivered")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def watch_parent(alive: Callable[[], bool], interval: float = PARENT_POLL_S) -> threading.Thread:
    """A daemon thread that interrupts the main thread (as Ctrl-C would) once ``alive()`` is false."""

    def watch() -> None:
        while alive():
            time.sleep(interval)
        _thread.interrupt_main()

    t = threading.Thread(target=watch, name="fedumm-parent-watch", daemon=True)
    t.start()
    return t


def cell_worker(conn: Connection, tree: dict, directory: str, resume: bool, threads: int) -> None:
    """One cell in a worker process: run (or resume) it and report how it ended, in JSON."""
    import torch

    from fedumm.config import load_config
    from fedumm.experiment import resume_experiment, run_experiment

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the shell started us ignoring it
    signal.signal(signal.SIGTERM, _interrupt)
    parent = os.getppid()
    watch_parent(lambda: os.getppid() == parent)
    try:
        if resume:
            resume_experiment(Path(directory))
        else:
            run_experiment(load_config(None, tree=tree), Path(directory))
        _send(conn, ok=True)
    except KeyboardInterrupt:
        _send(conn, ok=False, interrupted=True, error="interrupted")
    except FedummError as exc:
        _send(conn, ok=False, interrupted=False, error=str(exc), kind=type(exc).__name__)
    except Exception as exc:  # reported to the sweep with its traceback, never lost
        _send(
            conn,
            ok=False,
            interrupted=False,
            error=f"{type(exc).__name__}: {exc}",
            kind=type(exc).__name__,
            traceback=traceback.format_exc(),
        )
    finally:
        conn.close()


@dataclass
class _Running:
    cell: Any
    proc: Any
    conn: Connection
    started: float


def _sigterm_as_ctrl_c(fn: Callable[..., None]) -> Callable[..., None]:
    """In the main thread, SIGTERM raises KeyboardInterrupt while ``fn`` runs (its workers are
    stopped on the way out as on Ctrl-C); the previous handler is restored after."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


@_sigterm_as_ctrl_c
def run_cells_parallel(
    cells: Sequence[Any],
    *,
    out: Path,
    resume: Callable[[Any], bool],
    jobs: int,
    threads: int,
    prepare: Callable[[Any], None],
    on_start: Callable[[Any], None],
    on_end: Callable[[Any, dict], None],
    describe: Callable[[int, list[str]], None],
) -> None:
    """Run ``cells`` (those still to run) ``jobs`` at a time. ``prepare(cell)`` runs here before a
    cell starts (its world); ``on_end(cell, message)`` gets each worker's report. The first failure
    stops new cells from starting; the running ones finish, then the failure is raised."""
    ctx = mp.get_context("spawn")
    pending = list(cells)
    running: dict[str, _Running] = {}
    failure: tuple[Any, dict] | None = None
    done = 0
    try:
        while pending or running:
            while failure is None and pending and len(running) < jobs:
                nxt = next((c for c in pending if can_start(c, [r.cell for r in running.values()])), None)
                if nxt is None:
                    break
                pending.remove(nxt)
                prepare(nxt)
                ours, theirs = ctx.Pipe(duplex=False)
                tree = nxt.config.model_dump(mode="json")
                proc = ctx.Process(
                    target=cell_worker,
                    args=(theirs, tree, str(out / nxt.name), resume(nxt), threads),
                    name=f"fedumm-sweep-{nxt.name}",
                )
                proc.start()
                theirs.close()
                running[nxt.name] = _Running(nxt, proc, ours, time.monotonic())
                on_start(nxt)
                describe(done, sorted(running))
            if not running:
                break
            ready = wait([r.conn for r in running.values()])
            for name, r in list(running.items()):
                if r.conn not in ready:
                    continue
                try:
                    msg = json.loads(r.conn.recv_bytes().decode("utf-8"))
                except (EOFError, OSError, ValueError):
                    r.proc.join()
                    msg = {
                        "ok": False,
                        "interrupted": False,
                        "error": f"its worker process ended with exit code {r.proc.exitcode} "
                        "before reporting (killed, out of memory?)",
                    }
                r.conn.close()
                r.proc.join()
                del running[name]
                done += 1
                on_end(r.cell, msg)
                if not msg.get("ok") and failure is None:
                    failure = (r.cell, msg)
                    if pending:
                        log.warning(
                            "cell %s failed; no new cell starts, %d still running", name, len(running)
                        )
                describe(done, sorted(running))
    except KeyboardInterrupt:
        _stop(running, on_end)
        raise
    if failure is not None:
        cell, msg = failure
        if msg.get("interrupted"):
            raise KeyboardInterrupt
        if msg.get("traceback"):
            log.error("cell %s failed:\n%s", cell.name, msg["traceback"])
        raise FedummError(f"cell {cell.name} failed: {msg.get('error')}")


def _stop(running: dict[str, _Running], on_end: Callable[[Any, dict], None]) -> None:
    """After Ctrl-C here: let the workers save their runs and end, then report their cells."""
    deadline = time.monotonic() + GRACE_S
    for r in running.values():
        r.proc.join(max(0.0, deadline - time.monotonic()))
    for r in running.values():  # a terminal's Ctrl-C reaches them too; a kill of this one does not
        if r.proc.is_alive() and r.proc.pid is not None:
            os.kill(r.proc.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_S
    for r in running.values():
        r.proc.join(max(0.0, deadline - time.monotonic()))
        if r.proc.is_alive():
            log.error("cell %s: worker did not stop within %.0f s; terminated", r.cell.name, STOP_S)
            r.proc.terminate()
            r.proc.join(10)
        r.conn.close()
        on_end(r.cell, {"ok": False, "interrupted": True, "error": "interrupted"})
