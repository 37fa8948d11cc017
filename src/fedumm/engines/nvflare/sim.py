"""The FLARE simulator as a backend: one ``simulator`` process (server in it, one process per client)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedumm.engines.nvflare.procs import ProcessSet

log = logging.getLogger(__name__)

__all__ = ["SimBackend", "quiet_log_config"]


def quiet_log_config(path: Path) -> Path:
    """FLARE's default log config with the console at WARNING (the log files keep INFO)."""
    from fedumm.engines.nvflare._flare import log_utils

    src = Path(log_utils.__file__).with_name("log_config.json")
    cfg = json.loads(src.read_text(encoding="utf-8"))
    cfg["handlers"]["consoleHandler"]["level"] = "WARNING"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


LOST_WORKER = re.compile(
    r"SimulatorClientRunner - ERROR - (?P<what>(?:Communication error with|Subprocess died for) "
    r"client (?P<site>[\w.-]+)\b.*)$"
)
"""A line of the simulator's error log saying that it lost a site's worker process (FLARE 2.x)."""


class SimBackend:
    """``python -m nvflare.private.fed.app.simulator.simulator JOB -w WS -c CLIENTS -t K``."""

    name = "nvflare-sim"

    def __init__(self, *, workspace: Path, clients: Sequence[str], procs: ProcessSet, quiet: bool) -> None:
        self.workspace = workspace
        self.sim_ws = workspace / "sim"
        self.clients = list(clients)
        self.procs = procs
        self.quiet = quiet
        self.proc: subprocess.Popen | None = None
        self.console_log = workspace / "sim_console.log"
        self._error_log_offset = 0
        self._lost: tuple[str, str] | None = None

    def logs_hint(self) -> str:
        return f"logs: {self.sim_ws}/server/log.txt, {self.sim_ws}/<site>/log.txt, {self.console_log}"

    def start(self, job_dir: Path) -> None:
        if self.sim_ws.exists():
            shutil.rmtree(self.sim_ws)
        cmd = [
            sys.executable,
            "-m",
            "nvflare.private.fed.app.simulator.simulator",
            str(job_dir),
            "-w",
            str(self.sim_ws),
            "-c",
            ",".join(self.clients),
            "-t",
            str(len(self.clients)),  # every client at once: each keeps its trainer for the whole job
        ]
        if self.quiet:
            cmd += ["-l", str(quiet_log_config(self.workspace / "log_config.json"))]
        env = self.procs.env(MPLCONFIGDIR=str(self.workspace / "mpl"))
        self.proc = self.procs.spawn(
            cmd, env=env, cwd=self.workspace, log_path=self.console_log if self.quiet else None
        )
        log.info("FLARE simulator started (pid %d), workspace %s", self.proc.pid, self.sim_ws)

    def failure(self) -> str | None:
        """None while the simulator runs or after a clean exit; a message once it failed, or once
        it lost a site's worker (the server would wait the whole round timeout for that site)."""
        self.procs.snapshot()
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is not None and rc != 0:
            return f"the FLARE simulator exited with code {rc}"
        lost = self._lost_worker()
        if lost is not None:
            return (
                f"the FLARE simulator lost the worker of {lost[0]} ({lost[1]}); the server would wait "
                f"for it until the round times out. Run again (FLARE's simulator can lose a worker "
                f"while it starts many at once on few cores)"
            )
        return None

    def _lost_worker(self) -> tuple[str, str] | None:
        """(site, FLARE's words) of a worker the simulator reports dead or unreachable, if any
        (once found, for good)."""
        if self._lost is not None:
            return self._lost
        path = self.sim_ws / "server" / "error_log.txt"
        try:
            with path.open("rb") as f:
                f.seek(self._error_log_offset)
                data = f.read()
        except OSError:
            return None
        end = data.rfind(b"\n") + 1  # whole lines only; the rest is read next time
        self._error_log_offset += end
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            match = LOST_WORKER.search(line)
            if match is not None:
                self._lost = (match["site"], match["what"].strip())
                return self._lost
        return None

    def ended(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def finish(self, timeout: float) -> None:
        """After the last round: let the simulator shut down on its own."""
        if self.proc is None:
            return
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("the FLARE simulator did not exit %.0f s after the last round; stopping it", timeout)
            return
        if rc != 0:
            log.warning(
                "the FLARE simulator exited with code %d after the last round (%s)", rc, self.logs_hint()
            )

    def stop(self) -> list[str]:
        return self.procs.stop()
