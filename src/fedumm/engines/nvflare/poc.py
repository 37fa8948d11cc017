"""A local POC system as a backend: provisioned server + K clients over loopback with mutual TLS.

Everything lives in a fresh temporary directory with its own HOME and MPLCONFIGDIR (FLARE keeps
startup-kit registrations under ``~/.nvflare``), so nothing outside it changes:

1. write a project.yml (server with ``nvflare.fl_port``/``admin_port``, the clients, one project
   admin) and provision it with ``nvflare poc prepare -i project.yml`` (certificates, signed kits)
2. start the server and every client with their startup kit's ``sub_start.sh --once`` (the process
   itself, without the restart loop), each in a process group of its own
3. log in as the project admin, wait until every client is connected, submit the job
4. after the last round: wait for the job to finish, download its result and copy every
   participant's logs into ``WORKSPACE/poc``
5. always: abort the job if it still runs, shut the system down, stop whatever is left (SIGTERM,
   then SIGKILL), delete the temporary directory
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from fedumm.config import Config
from fedumm.engines.nvflare._flare import new_secure_session
from fedumm.engines.nvflare.procs import ProcessSet, check_ports_free
from fedumm.errors import EngineError

log = logging.getLogger(__name__)

__all__ = ["PocBackend", "project_yml", "ADMIN", "PROJECT"]

PROJECT = "fedumm_poc"
ADMIN = "admin@fedumm.local"
ORG = "fedumm"
STATUS_POLL_S = 2.0


def project_yml(clients: Sequence[str], *, fl_port: int, admin_port: int, he: bool = False) -> str:
    """A POC project: one server on localhost, the clients, one project admin, default builders
    (with ``he``, FLARE's HEBuilder too: a CKKS context per participant, the server's without the
    secret key, signed like every other startup file)."""
    lines = [
        "api_version: 3",
        f"name: {PROJECT}",
        "description: fedumm local POC",
        "participants:",
        "  - name: server",
        "    type: server",
        f"    org: {ORG}",
        f"    fed_learn_port: {fl_port}",
        f"    admin_port: {admin_port}",
    ]
    for c in clients:
        lines += [f"  - name: {c}", "    type: client", f"    org: {ORG}"]
    lines += [
        f"  - name: {ADMIN}",
        "    type: admin",
        f"    org: {ORG}",
        "    role: project_admin",
        "builders:",
        "  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder",
        "  - path: nvflare.lighter.impl.static_file.StaticFileBuilder",
        "    args:",
        "      config_folder: config",
        "  - path: nvflare.lighter.impl.cert.CertBuilder",
        *(["  - path: nvflare.lighter.impl.he.HEBuilder"] if he else []),
        "  - path: nvflare.lighter.impl.signature.SignatureBuilder",
    ]
    return "\n".join(lines) + "\n"


class PocBackend:
    name = "nvflare-poc"

    def __init__(self, *, cfg: Config, workspace: Path, clients: Sequence[str], procs: ProcessSet) -> None:
        self.cfg = cfg
        self.workspace = workspace
        self.out = workspace / "poc"  # logs and the downloaded job result end up here
        self.clients = list(clients)
        self.procs = procs
        self.tmp: Path | None = None
        self.prod: Path | None = None
        self.session = None
        self.job_id: str | None = None
        self._status: str | None = None
        self._status_t = 0.0
        self.kits: dict[str, object] = {}  # participant -> its Popen

    # ---- helpers ----
    def _env(self) -> dict[str, str]:
        assert self.tmp is not None
        bin_dir = str(Path(sys.executable).parent)
        return self.procs.env(
            HOME=str(self.tmp / "home"),
            MPLCONFIGDIR=str(self.tmp / "mpl"),
            NVFLARE_POC_WORKSPACE=str(self.tmp / "poc"),
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),  # sub_start.sh runs `python3`
        )

    def logs_hint(self) -> str:
        where = self.prod if self.prod is not None else self.tmp
        return f"logs: {self.out} (copied from {where} when the run ends)"

    def _participants(self) -> list[str]:
        return ["server", *self.clients]

    # ---- lifecycle ----
    def start(self, job_dir: Path) -> None:
        nv = self.cfg.nvflare
        check_ports_free({"nvflare.fl_port": nv.fl_port, "nvflare.admin_port": nv.admin_port})
        if nv.quiet:  # the admin API logs its connection steps at INFO in this process
            logging.getLogger("nvflare").setLevel(logging.WARNING)
        deadline = time.monotonic() + nv.start_timeout_s
        self.tmp = Path(tempfile.mkdtemp(prefix="fedumm-poc-"))
        (self.tmp / "home").mkdir()
        env = self._env()
        proj = self.tmp / "project.yml"  # outside the POC workspace, as FLARE requires
        proj.write_text(
            project_yml(
                self.clients,
                fl_port=nv.fl_port,
                admin_port=nv.admin_port,
                he=self.cfg.federation.secure_aggregation == "he",
            ),
            encoding="utf-8",
        )
        prep = self.procs.spawn(
            [sys.executable, "-m", "nvflare.cli", "poc", "prepare", "-i", str(proj), "--force"],
            env=env,
            cwd=self.tmp,
            log_path=self.tmp / "prepare.log",
        )
        try:
            rc = prep.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise EngineError(
                f"nvflare-poc: provisioning did not finish within {nv.start_timeout_s:.0f} s"
            ) from None
        prods = sorted((self.tmp / "poc" / PROJECT).glob("prod_*"))
        if rc != 0 or not prods:
            tail = _tail(self.tmp / "prepare.log")
            raise EngineError(f"nvflare-poc: `nvflare poc prepare` failed (exit {rc}): {tail}")
        self.prod = prods[-1]
        for name in self._participants():
            kit = self.prod / name
            self.kits[name] = self.procs.spawn(
                ["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
                env=env,
                cwd=kit,
                log_path=kit / "console.log",
            )
        self._login(deadline)
        self._wait_clients(deadline)
        try:
            self.job_id = _quiet(self.session.submit_job, str(job_dir))
        except Exception as exc:
            raise EngineError(f"nvflare-poc: job submission failed: {exc}") from None
        log.info("nvflare-poc: job %s submitted", self.job_id)

    def he_context_path(self) -> Path:
        """A client's provisioned CKKS context (public and secret key), for the evaluating launcher."""
        if self.prod is None:
            raise EngineError("nvflare-poc: no provisioned system (secure aggregation needs one)")
        from fedumm.engines.nvflare.names import CLIENT_CONTEXT

        path = self.prod / self.clients[0] / "startup" / CLIENT_CONTEXT
        if not path.is_file():
            raise EngineError(f"nvflare-poc: {path} is missing; was the POC provisioned with HEBuilder?")
        return path

    def _login(self, deadline: float) -> None:
        assert self.prod is not None
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self.session = _quiet(
                    new_secure_session,
                    username=ADMIN,
                    startup_kit_location=str(self.prod / ADMIN),
                    timeout=max(1.0, min(10.0, deadline - time.monotonic())),
                )
                return
            except Exception as exc:  # the server is still starting
                last = exc
                time.sleep(1.0)
        raise EngineError(
            f"nvflare-poc: could not log in to the POC server within "
            f"{self.cfg.nvflare.start_timeout_s:.0f} s ({last}); {self.logs_hint()}"
        )

    def _wait_clients(self, deadline: float) -> None:
        want = set(self.clients)
        have: set[str] = set()
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                have = {c.name for c in _quiet(self.session.get_connected_client_list)}
            except Exception as exc:
                log.debug("client list: %s", exc)
            if want <= have:
                return
            time.sleep(1.0)
        raise EngineError(
            f"nvflare-poc: clients {', '.join(sorted(want - have))} did not connect within "
            f"{self.cfg.nvflare.start_timeout_s:.0f} s; {self.logs_hint()}"
        )

    def _server_exit(self) -> int | None:
        server = self.kits.get("server")
        return None if server is None else server.poll()

    def _check_alive(self) -> None:
        rc = self._server_exit()
        if rc is not None:
            raise EngineError(f"nvflare-poc: the POC server exited with code {rc}; {self.logs_hint()}")

    def status(self, *, fresh: bool = False) -> str | None:
        if self.session is None or self.job_id is None:
            return None
        now = time.monotonic()
        if fresh or now - self._status_t >= STATUS_POLL_S:
            self._status_t = now
            try:
                self._status = _quiet(self.session.get_job_status, self.job_id)
            except Exception as exc:
                log.debug("job status: %s", exc)
        return self._status

    def failure(self) -> str | None:
        self.procs.snapshot()
        rc = self._server_exit()
        if rc is not None:
            return f"the POC server exited with code {rc}"
        st = self.status()
        if st and st.startswith("FINISHED") and st != "FINISHED:COMPLETED":
            return f"the FLARE job ended with status {st}"
        return None

    def ended(self) -> bool:
        st = self.status()
        return bool(st and st.startswith("FINISHED"))

    def finish(self, timeout: float) -> None:
        """After the last round: wait for the job to end, then download its result."""
        deadline = time.monotonic() + timeout
        st = self.status(fresh=True)
        while not (st and st.startswith("FINISHED")) and time.monotonic() < deadline:
            time.sleep(1.0)
            st = self.status(fresh=True)
        if st != "FINISHED:COMPLETED":
            log.warning("nvflare-poc: job %s status %s after the last round", self.job_id, st)
        try:
            dest = self.out / "job_result"
            if dest.exists():
                shutil.rmtree(dest)
            _quiet(self.session.download_job_result, self.job_id, destination=str(dest))
        except Exception as exc:
            log.warning("nvflare-poc: could not download the job result: %s", exc)

    def stop(self) -> list[str]:
        interrupted = False
        t0 = time.monotonic()
        try:
            self._shutdown()
        except KeyboardInterrupt:  # a second Ctrl-C: no more graceful waiting
            interrupted = True
        except Exception as exc:
            log.warning("nvflare-poc: orderly shutdown failed (%s); stopping the processes", exc)
        t1 = time.monotonic()
        try:
            survivors = self.procs.stop(grace=0.0 if interrupted else 10.0)
            log.info(
                "nvflare-poc: stopped in %.1f s (orderly shutdown %.1f s)", time.monotonic() - t0, t1 - t0
            )
        finally:
            self._collect_logs()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
        if interrupted:
            raise KeyboardInterrupt
        return survivors

    def _shutdown(self) -> None:
        if self.session is not None:
            st = self.status(fresh=True)
            if self.job_id and st and not st.startswith("FINISHED"):
                try:
                    _quiet(self.session.abort_job, self.job_id)
                except Exception as exc:
                    log.debug("abort: %s", exc)
            try:
                _quiet(self.session.shutdown, "all", wait=False)
            except Exception as exc:
                log.debug("shutdown: %s", exc)
            try:
                _quiet(self.session.close)
            except Exception:
                pass
            self.session = None
        if self.prod is not None:
            for name in self._participants():
                (self.prod / name / "shutdown.fl").touch()
        left = self.procs.wait_all_exit(15.0)
        if left:
            log.info("nvflare-poc: %d process(es) still up after the shutdown request", len(left))

    def _collect_logs(self) -> None:
        if self.tmp is not None and (self.tmp / "prepare.log").is_file():
            self.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.tmp / "prepare.log", self.out / "prepare.log")
        if self.prod is None:
            return
        for name in self._participants():
            src = self.prod / name
            dst = self.out / "logs" / name
            found = [src / f for f in ("log.txt", "error_log.txt", "console.log")]
            if self.job_id:  # the job's own logs at this participant
                found += [src / self.job_id / f for f in ("log.txt", "error_log.txt")]
            for f in found:
                if f.is_file():
                    target = dst / f.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)


def _quiet(fn, *args, **kwargs):
    """Call a FLARE admin API function that prints to the console; its output goes to the log."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            return fn(*args, **kwargs)
    finally:
        if buf.getvalue().strip():
            log.debug("FLARE admin API: %s", buf.getvalue().strip())


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:].strip()
    except OSError:
        return "(no output)"
