"""Per-client error-feedback residuals, bounded in memory and kept on disk between rounds.

Under compressed uploads with error feedback every client keeps the part of its last delta that the
codec lost (:mod:`fedumm.fl.compress`). In a cross-device federation most clients are idle most rounds,
and each residual is as large as an adapter (95 MB for BLIP3o-8B's), so holding them all in memory
grows with K. :class:`ResidualStore` keeps them as safetensors files, one per client and round, in
``directory`` (a run's ``checkpoint/clients/``), with a small least-recently-used cache in memory
(``cache_bytes``) and, optionally, in half precision (``dtype``: bfloat16 or float16 halve the files
and the cache; float32, the default, keeps error feedback exact).

Files are named ``<client id>.<round>.safetensors`` and written atomically. A client keeps its newest
two versions, so a resume from the latest complete checkpoint, or the one before it when the latest is
corrupt, finds the residual that round left (:meth:`ResidualStore.rewind`). Nothing is unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fedumm.errors import ConfigError
from fedumm.fl.compress import delta_of, encode
from fedumm.io import atomic_save_safetensors, read_safetensors
from fedumm.lru import ByteLRU

__all__ = ["RESIDUAL_DTYPES", "ResidualStore", "compressed_delta"]

RESIDUAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAME = re.compile(r"^(?P<cid>[A-Za-z0-9_-][A-Za-z0-9_.-]*)\.(?P<rnd>\d{4,})\.safetensors$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ResidualStore:
    """Each client's newest residual: in a bounded LRU in memory and, with a directory, on disk."""

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        dtype: str = "float32",
        cache_bytes: int = 64 << 20,
    ) -> None:
        if dtype not in RESIDUAL_DTYPES:
            raise ConfigError(f"residual dtype {dtype!r}: choose one of {', '.join(RESIDUAL_DTYPES)}")
        self.directory = Path(directory) if directory is not None else None
        self.dtype = RESIDUAL_DTYPES[dtype]
        self.cache_bytes = cache_bytes
        # without a directory memory is all there is: then the cache keeps everything
        self._cache = ByteLRU(cache_bytes if self.directory is not None else float("inf"), _nbytes)
        self._versions: dict[str, list[int]] = {}  # client -> rounds on disk, ascending
        if self.directory is not None and self.directory.is_dir():
            self._scan()

    # ---- reading and writing ----
    def get(self, cid: str) -> dict[str, torch.Tensor] | None:
        """The client's newest residual in float32 (a fresh copy), or None if it has none yet."""
        held = self._cache.get(cid)
        if held is None and self.directory is not None and self._versions.get(cid):
            held = read_safetensors(self._file(cid, self._versions[cid][-1]))
            self._cache.put(cid, held)
        if held is None:
            return None
        return {k: t.to(torch.float32, copy=True) for k, t in held.items()}

    def put(self, cid: str, rnd: int, residual: Mapping[str, torch.Tensor]) -> None:
        """Keep ``residual`` as the client's state after round ``rnd``."""
        stored = {k: t.detach().to("cpu", self.dtype).contiguous() for k, t in residual.items()}
        if self.directory is not None:
            if not _SAFE_ID.match(cid):
                raise ConfigError(f"client id {cid!r} cannot name a residual file (letters, digits, . _ -)")
            atomic_save_safetensors(self._file(cid, rnd), stored, {"client": cid, "round": str(rnd)})
            versions = [r for r in self._versions.get(cid, []) if r != rnd] + [rnd]
            versions.sort()
            for old in versions[:-2]:  # the newest two: a resume may fall back one round
                self._file(cid, old).unlink(missing_ok=True)
            self._versions[cid] = versions[-2:]
        self._cache.put(cid, stored)

    def rewind(self, done: int) -> None:
        """Resume after round ``done``: forget (and delete) every version written by a later round."""
        self._cache.clear()
        for cid, versions in list(self._versions.items()):
            for rnd in [r for r in versions if r > done]:
                self._file(cid, rnd).unlink(missing_ok=True)
            kept = [r for r in versions if r <= done]
            if kept:
                self._versions[cid] = kept
            else:
                del self._versions[cid]

    # ---- what it holds ----
    def clients(self) -> list[str]:
        """Clients with a residual, sorted."""
        return sorted(set(self._versions) | set(self._cache.keys()))

    @property
    def memory_bytes(self) -> int:
        """Bytes of residual tensors held in memory now (at most ``cache_bytes`` with a directory)."""
        return self._cache.nbytes

    def disk_bytes(self) -> int:
        """Bytes of residual files on disk (every kept version)."""
        if self.directory is None:
            return 0
        return sum(self._file(c, r).stat().st_size for c, vs in self._versions.items() for r in vs)

    # ---- internals ----
    def _file(self, cid: str, rnd: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{cid}.{rnd:04d}.safetensors"

    def _scan(self) -> None:
        assert self.directory is not None
        for path in sorted(self.directory.iterdir()):
            m = _NAME.match(path.name)
            if m is None:
                continue
            self._versions.setdefault(m["cid"], []).append(int(m["rnd"]))
        for versions in self._versions.values():
            versions.sort()


def compressed_delta(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    codec: str,
    *,
    client: str,
    rnd: int,
    residuals: ResidualStore | None,
) -> dict[str, torch.Tensor]:
    """What a client uploads under compression: ``state - reference`` encoded with ``codec``, plus
    (with ``residuals``: error feedback) the residual its last upload lost, the new one kept."""
    residual = residuals.get(client) if residuals is not None else None
    payload, new_residual = encode(delta_of(state, reference), codec, residual=residual)
    if residuals is not None:
        residuals.put(client, rnd, new_residual)
    return payload
