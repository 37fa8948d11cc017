"""ResidualStore: exact float32 round trips through disk, a bounded cache, two versions, rewind."""

from __future__ import annotations

import pytest
import torch

from fedumm.errors import ConfigError
from fedumm.fl.residuals import ResidualStore


def _res(seed: int, n: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A.weight": torch.randn(4, n, generator=g),
        "a.lora_B.weight": torch.randn(n, 4, generator=g),
    }


def test_residuals_come_back_from_disk_bit_for_bit_and_the_cache_stays_bounded(tmp_path):
    one = 2 * 4 * 256 * 4  # bytes of one client's residual in float32
    store = ResidualStore(tmp_path, cache_bytes=3 * one)
    for i in range(10):
        store.put(f"c{i}", 1, _res(i))
        assert store.memory_bytes <= 3 * one
    assert store.memory_bytes == 3 * one and store.clients() == [f"c{i}" for i in range(10)]
    for i in range(10):  # c0..c6 were evicted from memory: read back from their files
        got = store.get(f"c{i}")
        assert all(torch.equal(got[k], v) for k, v in _res(i).items())
    assert store.get("never") is None
    reopened = ResidualStore(tmp_path, cache_bytes=0)
    assert reopened.memory_bytes == 0
    assert torch.equal(reopened.get("c3")["a.lora_B.weight"], _res(3)["a.lora_B.weight"])
    assert reopened.memory_bytes == 0  # a zero budget keeps nothing in memory


def test_get_returns_a_copy(tmp_path):
    store = ResidualStore(tmp_path)
    store.put("c", 1, _res(0))
    store.get("c")["a.lora_A.weight"].zero_()
    assert torch.equal(store.get("c")["a.lora_A.weight"], _res(0)["a.lora_A.weight"])


def test_half_precision_halves_the_files_and_rounds_to_bfloat16(tmp_path):
    full, half = ResidualStore(tmp_path / "f"), ResidualStore(tmp_path / "h", dtype="bfloat16")
    full.put("c", 1, _res(0))
    half.put("c", 1, _res(0))
    assert half.disk_bytes() < 0.55 * full.disk_bytes()
    got = ResidualStore(tmp_path / "h").get("c")
    for k, v in _res(0).items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.to(torch.bfloat16).float())


def test_two_versions_are_kept_and_rewind_drops_later_rounds(tmp_path):
    store = ResidualStore(tmp_path)
    for rnd in (1, 3, 4):
        store.put("c", rnd, _res(rnd))
    store.put("d", 4, _res(40))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c.0003.safetensors",
        "c.0004.safetensors",
        "d.0004.safetensors",
    ]
    # round 4's checkpoint was unreadable: the run resumes after round 3
    again = ResidualStore(tmp_path)
    again.rewind(3)
    assert again.clients() == ["c"]
    assert torch.equal(again.get("c")["a.lora_A.weight"], _res(3)["a.lora_A.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.0003.safetensors"]
    again.rewind(0)  # a fresh run in the same directory starts with no residuals
    assert again.clients() == [] and list(tmp_path.iterdir()) == []


def test_memory_only_store_keeps_everything(tmp_path):
    store = ResidualStore(cache_bytes=0)
    store.put("c", 1, _res(0))
    assert store.memory_bytes > 0 and torch.equal(
        store.get("c")["a.lora_A.weight"], _res(0)["a.lora_A.weight"]
    )
    assert store.disk_bytes() == 0


def test_bad_dtype_and_client_ids_are_named(tmp_path):
    with pytest.raises(ConfigError, match="int4"):
        ResidualStore(tmp_path, dtype="int4")
    with pytest.raises(ConfigError, match="../x"):
        ResidualStore(tmp_path).put("../x", 1, _res(0))
