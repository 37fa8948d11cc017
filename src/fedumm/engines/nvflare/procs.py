"""Processes a FLARE run starts, and stopping every one of them (also on errors and Ctrl-C).

FLARE starts its job processes and external trainers in sessions of their own (``setsid``), so a
process group does not hold them all. Every process started here gets its own process group and
an environment tag (``FEDUMM_NVFLARE_RUN``) that its descendants inherit; stopping sends SIGTERM to
the groups and to every tagged or descendant process, waits a grace period, sends SIGKILL to what is
left and returns whatever still survives (normally nothing).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from fedumm.engines.nvflare.client import ENV_TORCH_THREADS
from fedumm.errors import EngineError

log = logging.getLogger(__name__)

__all__ = [
    "TAG_ENV",
    "ProcessSet",
    "check_ports_free",
    "describe",
    "site_threads",
    "thread_env",
    "usable_cores",
]

TAG_ENV = "FEDUMM_NVFLARE_RUN"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def site_threads(requested: int | None, sites_here: int) -> int:
    """Torch threads for each of ``sites_here`` site processes on this machine: ``requested``, or the
    usable cores shared out (at least one), so that K trainers never run K x cores threads."""
    if requested is not None:
        return requested
    return max(1, usable_cores() // max(1, sites_here))


def thread_env(threads: int) -> dict[str, str]:
    """The variables that hold torch and OpenMP/MKL in a started process to ``threads`` threads."""
    n = str(threads)
    return {ENV_TORCH_THREADS: n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} ({' '.join(p.cmdline())[:160]})"
    except psutil.Error:
        return str(p.pid)


class ProcessSet:
    """What one run started: its Popen objects, their descendants and everything carrying its tag."""

    def __init__(self, *, threads: int | None = None, env: Mapping[str, str] | None = None) -> None:
        """``threads``: the torch/OpenMP threads each started process (and its trainers) may use;
        ``env``: variables every started process gets (e.g. the shared trainer's address)."""
        self.tag = uuid.uuid4().hex
        self.threads = threads
        self.extra_env = dict(env or {})
        self.popens: list[subprocess.Popen] = []
        self._seen: dict[int, float] = {}  # pid -> create_time (guards against pid reuse)
        self._logs: list = []

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        if self.threads is not None:
            env.update(thread_env(self.threads))
        env.update(self.extra_env)
        env.update(extra)
        env[TAG_ENV] = self.tag
        return env

    def spawn(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | Path | None = None,
        log_path: str | Path | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` in a new session (its own process group), output to ``log_path`` or inherited."""
        out = None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(out)
        env = dict(env)
        env[TAG_ENV] = self.tag
        p = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
        self.popens.append(p)
        self._remember(p.pid)
        log.debug("started %s: %s", p.pid, " ".join(cmd))
        return p

    def _remember(self, pid: int) -> None:
        try:
            self._seen[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass

    def snapshot(self) -> None:
        """Remember every current descendant (call while the run goes on)."""
        for p in self.popens:
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    if c.pid not in self._seen:
                        self._remember(c.pid)
            except psutil.Error:
                continue

    def alive(self) -> list[psutil.Process]:
        """Live processes of this run: remembered ones, their descendants and tagged ones."""
        self.snapshot()
        found: dict[int, psutil.Process] = {}
        for pid, ctime in list(self._seen.items()):
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - ctime) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = proc
            except psutil.Error:
                continue
        me = os.getpid()
        uid = os.getuid()
        for proc in psutil.process_iter(["pid", "uids"]):
            try:
                if proc.pid == me or proc.pid in found or proc.info["uids"].real != uid:
                    continue
                if proc.environ().get(TAG_ENV) == self.tag and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        return list(found.values())

    def wait_all_exit(self, timeout: float) -> list[psutil.Process]:
        """Wait until nothing of this run is alive (or ``timeout``); return what still lives."""
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            left = self.alive()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.3)

    def _reap(self) -> None:
        for p in self.popens:
            p.poll()

    def stop(self, grace: float = 10.0) -> list[str]:
        """SIGTERM everything, SIGKILL after ``grace`` seconds; return descriptions of survivors.

        A Ctrl-C while waiting skips the rest of the grace period (everything is killed at once)
        and is re-raised once nothing is left.
        """
        interrupted = False
        self._signal_all(signal.SIGTERM)
        try:
            left = self.wait_all_exit(grace)
        except KeyboardInterrupt:
            interrupted = True
            left = self.alive()
        if left:
            if not interrupted:
                log.warning("killing %d FLARE process(es) that ignored SIGTERM for %.0f s", len(left), grace)
            self._signal_all(signal.SIGKILL)
            left = self._wait_uninterrupted(5.0)
        for p in self.popens:
            try:
                p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        for f in self._logs:
            f.close()
        self._logs.clear()
        if interrupted:
            raise KeyboardInterrupt
        return [describe(p) for p in left]

    def _wait_uninterrupted(self, timeout: float) -> list[psutil.Process]:
        while True:
            try:
                return self.wait_all_exit(timeout)
            except KeyboardInterrupt:
                self._signal_all(signal.SIGKILL)

    def _signal_all(self, sig: signal.Signals) -> None:
        """``sig`` to the process group of every started process and to every live process of the run."""
        for p in self.popens:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.alive():
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass


def check_ports_free(ports: Mapping[str, int]) -> None:
    """Refuse to start when a port the server will listen on (all interfaces) is taken."""
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as exc:
                raise EngineError(
                    f"port {port} ({name}) is not free ({exc.strerror}); set {name} to a free port"
                ) from None
