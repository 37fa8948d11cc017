"""FLARE site processes on one machine share its cores out instead of each taking all of them."""

from __future__ import annotations

import pytest

pytest.importorskip("nvflare")

from fedumm.config import load_config  # noqa: E402
from fedumm.engines.nvflare.client import ENV_TORCH_THREADS  # noqa: E402
from fedumm.engines.nvflare.procs import ProcessSet, site_threads, usable_cores  # noqa: E402
from fedumm.errors import ConfigError  # noqa: E402


def test_cores_are_shared_out_between_the_sites(monkeypatch):
    monkeypatch.setattr("fedumm.engines.nvflare.procs.usable_cores", lambda: 16)
    assert [site_threads(None, k) for k in (1, 2, 4, 16, 32)] == [16, 8, 4, 1, 1]
    assert site_threads(3, 32) == 3  # what the config asks for wins
    assert 1 <= usable_cores()


def test_every_started_process_gets_the_thread_budget():
    env = ProcessSet(threads=2).env({"PATH": "/bin", "OMP_NUM_THREADS": "64"})
    assert env[ENV_TORCH_THREADS] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert ENV_TORCH_THREADS not in ProcessSet().env({"PATH": "/bin"})


def test_threads_per_site_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="threads_per_site"):
        load_config(None, tree={"data": {"path": str(tmp_path)}, "nvflare": {"threads_per_site": 0}})


class _Running:
    """A started simulator that is still running."""

    pid = 0

    def poll(self):
        return None


def test_the_simulator_losing_a_worker_fails_the_run_naming_the_site(tmp_path):
    """FLARE's simulator can lose a worker while it starts many at once (a connection reset): its
    server would then wait the whole round timeout for that site. The backend reports it at once."""
    from fedumm.engines.nvflare.sim import SimBackend

    backend = SimBackend(workspace=tmp_path, clients=["site-01", "site-03"], procs=ProcessSet(), quiet=True)
    backend.proc = _Running()
    assert backend.failure() is None  # no error log yet
    log = tmp_path / "sim" / "server" / "error_log.txt"
    log.parent.mkdir(parents=True)
    log.write_text("2026-12-03 09:00:30,001 - ServerRunner - ERROR - something else went wrong\n")
    assert backend.failure() is None
    line = (
        "2026-12-03 09:00:38,043 - SimulatorClientRunner - ERROR - Communication error with client "
        "site-03: [Errno 104] Connection reset by peer"
    )
    with log.open("a") as f:
        f.write(line[:60])  # a line still being written is not read yet
    assert backend.failure() is None
    with log.open("a") as f:
        f.write(line[60:] + "\n")
    why = backend.failure()
    assert why is not None and "site-03" in why and "Connection reset by peer" in why
    assert "site-01" not in why
    assert backend.failure() == why  # and it stays failed
