"""Compact copies of a sweep's results: what ``fedumm report`` reads and a resumed sweep keeps.

A sweep directory holds, per cell, checkpoints, adapters, partitions and plots beside three small
files: ``config.yaml`` (the cell's resolved config), ``summary.json`` (its final numbers) and
``metrics.jsonl`` (one line per round). Those three and ``sweep.json`` are all a report needs, and all
a sweep needs to count a cell as finished. :func:`archive_sweep` copies them, for finished cells
only, into an archive directory that can be committed beside the docs it backs or sent to a
colleague; ``fedumm report ARCHIVE`` then gives the same report as the sweep directory, and a copy
of the archive given to ``fedumm sweep --out`` skips the archived cells and runs the rest.

Archiving into an existing archive of the same sweep merges: cells finished since are added, cells
archived earlier are kept, and a cell whose saved config differs between the two is refused (two
different runs under one name). The copy reads no pickle and writes each file atomically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedumm.errors import ConfigError, DataError
from fedumm.io import atomic_write_bytes, atomic_write_json, read_json_object
from fedumm.summary import RunSummary
from fedumm.sweep import SWEEP_INDEX, read_index

__all__ = ["ARCHIVED_FILES", "ArchiveResult", "archive_sweep"]

# what a report and a resumed sweep read of a finished cell; everything else stays behind
ARCHIVED_FILES = ("config.yaml", "summary.json", "metrics.jsonl")
# what makes two indexes the same sweep (the base config's path may be spelled differently per
# checkout; each cell's saved config is compared on its own)
_SWEEP_KEYS = ("overrides", "grid", "baselines")
_SAFE_DIR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


@dataclass
class ArchiveResult:
    out: Path
    copied: list[str] = field(default_factory=list)  # finished in the sweep, now in the archive
    kept: list[str] = field(default_factory=list)  # archived earlier, not finished in the sweep
    left: list[str] = field(default_factory=list)  # neither: still to run
    bytes_written: int = 0


def _cells(index: dict[str, Any], where: Path) -> list[dict[str, Any]]:
    cells = index.get("cells")
    if not isinstance(cells, list):
        raise ConfigError(f"{where / SWEEP_INDEX}: 'cells' must be a list")
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("name"), str):
            raise ConfigError(f"{where / SWEEP_INDEX}: cell {i} is not an object with a name")
        d = cell.get("dir", cell["name"])
        if not isinstance(d, str) or not _SAFE_DIR.fullmatch(d) or ".." in d:
            raise ConfigError(
                f"{where / SWEEP_INDEX}: cell {cell['name']!r}: dir {d!r} is not a plain directory name"
            )
    return cells


def _finished(d: Path) -> bool:
    path = d / "summary.json"
    if not path.is_file():
        return False
    try:
        return RunSummary.from_json(read_json_object(path), source=str(path)).finished
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def _config(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None


def archive_sweep(sweep_dir: str | Path, out: str | Path) -> ArchiveResult:
    """Copy the finished cells' ``config.yaml``, ``summary.json`` and ``metrics.jsonl`` and the sweep
    index from ``sweep_dir`` into ``out`` (merging with an archive of the same sweep already there)."""
    src, dst = Path(sweep_dir), Path(out)
    index = read_index(src)
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"{dst}: the archive must lie outside the sweep directory {src}")
    cells = _cells(index, src)
    earlier = read_index(dst) if (dst / SWEEP_INDEX).is_file() else None
    if earlier is None and dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"{dst}: exists, is not empty and holds no {SWEEP_INDEX}; choose another --out")
    if earlier is not None:
        differ = [k for k in _SWEEP_KEYS if earlier.get(k) != index.get(k)]
        if differ:
            raise ConfigError(
                f"{dst}: holds the archive of another sweep ({', '.join(differ)} differ); "
                "choose another --out"
            )
        _cells(earlier, dst)

    result = ArchiveResult(out=dst)
    plan: list[tuple[dict[str, Any], Path, Path]] = []
    for cell in cells:  # every check before any write
        d = cell.get("dir", cell["name"])
        here, there = src / d, dst / d
        if _finished(here):
            if (there / "config.yaml").is_file() and (here / "config.yaml").is_file():
                if _config(there / "config.yaml") != _config(here / "config.yaml"):
                    raise ConfigError(
                        f"{dst}: cell {cell['name']} was archived from a run with another config "
                        f"than {here}; move one of them away"
                    )
            plan.append((cell, here, there))
        elif _finished(there):
            result.kept.append(cell["name"])
        else:
            result.left.append(cell["name"])
    for cell, here, there in plan:
        for name in ARCHIVED_FILES:
            if (here / name).is_file():
                data = (here / name).read_bytes()
                atomic_write_bytes(there / name, data)
                result.bytes_written += len(data)
        result.copied.append(cell["name"])

    done = set(result.copied) | set(result.kept)
    new_index = dict(index)
    new_index["cells"] = [
        {**cell, "status": "finished" if cell["name"] in done else "pending"}
        | ({} if cell["name"] in done else {"wall_time_s": None})
        for cell in cells
    ]
    if earlier is not None:  # wall times of cells archived earlier survive the merge
        before = {c["name"]: c for c in earlier["cells"]}
        for c in new_index["cells"]:
            if c["name"] in result.kept and c["name"] in before:
                c["wall_time_s"] = before[c["name"]].get("wall_time_s")
    atomic_write_json(dst / SWEEP_INDEX, new_index)
    return result
