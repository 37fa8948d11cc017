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
