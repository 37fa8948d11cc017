"""Grids of runs: a base config, overrides and a cartesian grid, one resumable run directory per cell."""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedumm.config import Config, format_validation_error, load_config, read_yaml_mapping
from fedumm.errors import ConfigError, DataError, FedummError
from fedumm.experiment import resume_experiment, run_experiment
from fedumm.fl.strategies import make_strategy
from fedumm.io import atomic_write_json, read_json_object
from fedumm.progress import NullProgress, Progress
from fedumm.summary import RunSummary, SettingResult
from fedumm.sweep_jobs import check_jobs, run_cells_parallel

__all__ = [
    "Sweep",
    "Cell",
    "CellResult",
    "SweepFile",
    "load_sweep",
    "expand",
    "run_sweep",
    "SWEEP_INDEX",
    "read_index",
]

SWEEP_INDEX = "sweep.json"
log = logging.getLogger(__name__)

# Settings that change the federation but neither the zero-shot nor the centralized baseline, so that
# cells differing only in these share one baseline cell. Everything else (seed, data, model, LoRA,
# local training and federation.rounds, which sets the centralized epochs) is baseline-relevant.
# The centralized baseline pools the clients' training portions, i.e. the training split minus each
# client's local-validation hold-out (train.local_val_fraction), so the pooled set differs between
# partitions only in which few questions are held out; the shared baseline uses the base partition.
_FEDERATION_ONLY = (
    "name",
    "engine",
    "nvflare",
    "baselines",
    "federation.clients",
    "federation.alpha",
    "federation.min_partition_size",
    "federation.sample_fraction",
    "federation.min_clients",
    "federation.strategy",
    "federation.strategy_params",
    "federation.group_strategies",
    "federation.compression",
    "federation.error_feedback",
)
# Short prefixes of well-known keys in cell names; the strategy appears as its bare name.
_ABBREV = {"federation.clients": "K", "federation.alpha": "a", "federation.strategy": "", "seed": "s"}
_NAME_ORDER = ("federation.clients", "federation.alpha", "federation.strategy")
_RESERVED = ("name", "baselines")
_QUESTIONS_PER_IMAGE = 3  # what the synthetic world asks at most per image


def _same(a: Any, b: Any) -> bool:
    """Equal grid values of one type: 1, 1.0 and True are three different values."""
    return type(a) is type(b) and a == b


class SweepFile(BaseModel):
    """Schema of a sweep YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: Path = Field(description="run config, relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, every cell")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values to cross")
    baselines: bool = Field(default=True, description="zero-shot and centralized, once per baseline group")

    @field_validator("grid")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
            seen: list[Any] = []
            for x in values:
                if any(_same(x, y) for y in seen):
                    raise ValueError(f"{key}: duplicate value {x!r}")
                seen.append(x)
        return v


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """A loaded, key-checked sweep file."""

    path: Path
    base: Path
    base_tree: dict
    overrides: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    baselines: bool

    @property
    def name(self) -> str:
        """The sweep's name: its file name without extension."""
        return self.path.stem


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One run of a sweep: its directory name, grid values and validated config."""

    name: str
    kind: Literal["baselines", "federated"]
    settings: tuple[tuple[str, Any], ...]
    seed: int
    baseline_cell: str | None
    config: Config


@dataclass(frozen=True, kw_only=True)
class CellResult:
    """A cell after run_sweep: its summary and the baselines that apply to it."""

    cell: Cell
    dir: Path
    status: str
    skipped: bool
    summary: RunSummary
    zero_shot: SettingResult | None
    centralized: SettingResult | None


# ---------------------------------------------------------------------------------------------- loading


def _format_errors(exc: ValidationError, source: Path) -> str:
    return format_validation_error(exc, source=str(source), schema=SweepFile, show_input=False)


def _check_key(source: Path, section: str, key: str) -> None:
    """A dotted key must name a config field (any depth below a free-form mapping field)."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: {section}.{key}: empty key segment")
    if parts[0] in _RESERVED:
        what = "the cell name" if parts[0] == "name" else "the sweep's top-level `baselines`"
        raise ConfigError(f"{source}: {section}.{key}: set by the sweep ({what}); remove it")
    model: type[BaseModel] | None = Config
    for i, part in enumerate(parts):
        if model is None:
            return
        if part not in model.model_fields:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: {section}.{key}: unknown key {'.'.join(parts[: i + 1])!r}{hint}")
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if i < len(parts) - 1 and model is None and not _is_mapping(ann):
            raise ConfigError(f"{source}: {section}.{key}: {'.'.join(parts[: i + 1])!r} is not a section")


def _is_mapping(ann: Any) -> bool:
    return "dict" in str(ann)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep YAML file; the base config path is relative to the sweep file."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file")
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, path)) from None
    for section, keys in (("overrides", spec.overrides), ("grid", spec.grid)):
        for key in keys:
            _check_key(path, section, key)
    all_keys = [*spec.overrides, *spec.grid]
    for a, b in itertools.permutations(all_keys, 2):
        if a == b:
            raise ConfigError(f"{path}: {a}: in both overrides and grid; keep one")
        if b.startswith(a + "."):
            raise ConfigError(f"{path}: {b}: overlaps {a}; set one or the other")
    base = spec.base if spec.base.is_absolute() else path.parent / spec.base
    if not base.is_file():
        raise ConfigError(f"{path}: base: config file {str(base)!r} not found")
    tree = read_yaml_mapping(base)
    return Sweep(
        path=path,
        base=base,
        base_tree=tree,
        overrides=tuple(spec.overrides.items()),
        grid=tuple((k, tuple(v)) for k, v in spec.grid.items()),
        baselines=spec.baselines,
    )


# --------------------------------------------------------------------------------------------- expanding


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "+".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}{_fmt(v)}" for k, v in value.items())
    return str(value)


def _part(key: str, value: Any) -> str:
    prefix = _ABBREV.get(key, key.rsplit(".", 1)[-1])
    text = _fmt(value)
    sep = "_" if prefix and text[:1].isalpha() else ""
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", f"{prefix}{sep}{text}")


def _cell_name(head: list[str], settings: dict[str, Any], seed: int) -> str:
    keys = [k for k in _NAME_ORDER if k in settings] + [
        k for k in settings if k not in _NAME_ORDER and k != "seed"
    ]
    return "-".join([*head, *(_part(k, settings[k]) for k in keys), _part("seed", seed)])


def _is_federation_only(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in _FEDERATION_ONLY)


def _set(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    cur = tree
    for i, part in enumerate(parents):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])!r} is not a section (setting {key})")
        cur = nxt
    cur[last] = copy.deepcopy(value)


def _build(sweep: Sweep, name: str, settings: dict[str, Any], extra: dict[str, Any]) -> Config:
    tree = copy.deepcopy(sweep.base_tree)
    try:
        for key, value in [*sweep.overrides, *settings.items(), *extra.items()]:
            _set(tree, key, value)
        cfg = load_config(None, tree=tree)
    except ConfigError as exc:
        msg = str(exc).replace("<config>: ", "")
        raise ConfigError(f"{sweep.path}: cell {name}: {msg}") from None
    fed = cfg.federation
    try:  # strategy hyperparameters are only checked when the strategy is built
        make_strategy(fed.strategy, group_strategies=fed.group_strategies, **fed.strategy_params)
    except (TypeError, ValueError, FedummError) as exc:
        raise ConfigError(
            f"{sweep.path}: cell {name}: federation.strategy_params {fed.strategy_params} "
            f"for {fed.strategy!r}: {exc}"
        ) from None
    return cfg


def _train_questions(cfg: Config, cache: dict) -> tuple[int, bool] | None:
    """Questions in the training split (exact when on disk, an upper bound when still to synthesize)."""
    d = cfg.data
    key = (str(d.path), d.train_split, str(d.synth_images))
    if key not in cache:
        qfile = d.path / f"v2_OpenEnded_mscoco_{d.train_split}_questions.json"
        found: tuple[int, bool] | None = None
        if qfile.is_file():
            try:
                found = (len(json.loads(qfile.read_text(encoding="utf-8"))["questions"]), True)
            except (OSError, ValueError, KeyError, TypeError):
                found = None  # the run reports a malformed file with its own error
        elif d.synthesize_if_missing and not (d.path.exists() and any(d.path.iterdir())):
            from fedumm.data.synth import DEFAULT_IMAGES

            images = dict(DEFAULT_IMAGES if d.synth_images is None else d.synth_images)
            if d.train_split in images:
                found = (images[d.train_split] * _QUESTIONS_PER_IMAGE, False)
        cache[key] = found
    return cache[key]


def _check_capacity(sweep: Sweep, cell: Cell, cache: dict) -> None:
    fed = cell.config.federation
    found = _train_questions(cell.config, cache)
    if found is None:
        return
    n, exact = found
    need = fed.clients * fed.min_partition_size
    if need > n:
        split = cell.config.data.train_split
        have = f"split {split!r} has {n} questions" if exact else f"split {split!r} will have at most {n}"
        raise ConfigError(
            f"{sweep.path}: cell {cell.name}: federation.clients={fed.clients} x "
            f"federation.min_partition_size={fed.min_partition_size} needs {need} training questions "
            f"but {have}"
        )


def expand(sweep: Sweep) -> list[Cell]:
    """All cells, baseline cells first, each config validated (a bad value fails here, naming the cell)."""
    keys = [k for k, _ in sweep.grid]
    combos = [
        dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in sweep.grid))
    ]
    off = {"baselines.zero_shot": False, "baselines.centralized": False}
    baselines: dict[str, Cell] = {}
    federated: list[Cell] = []
    base_seed = dict(sweep.overrides).get("seed", sweep.base_tree.get("seed", 0))
    for settings in combos:
        seed = settings.get("seed", base_seed)
        name = _cell_name([], settings, seed)
        cfg = _build(sweep, name, settings, {**off, "name": name})
        base_name = None
        if sweep.baselines:
            relevant = {k: v for k, v in settings.items() if not _is_federation_only(k)}
            base_name = _cell_name(["baselines"], relevant, seed)
            if base_name not in baselines:
                baselines[base_name] = _baseline_cell(sweep, base_name, relevant, seed)
        federated.append(
            Cell(
                name=name,
                kind="federated",
                settings=tuple(settings.items()),
                seed=cfg.seed,
                baseline_cell=base_name,
                config=cfg,
            )
        )
    cells = [*baselines.values(), *federated]
    names = [c.name for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{sweep.path}: grid values give clashing cell names: {', '.join(dupes)}")
    cache: dict = {}
    for cell in cells:
        _check_capacity(sweep, cell, cache)
    return cells


def _baseline_cell(sweep: Sweep, name: str, relevant: dict[str, Any], seed: int) -> Cell:
    on = {"baselines.zero_shot": True, "baselines.centralized": True, "name": name}
    clients = _build(sweep, name, relevant, on).federation.clients
    # run_experiment always federates after the baselines; this cell's federation is a by-product that
    # no table uses, so it trains one sampled client per round (the baselines do not depend on it)
    cfg = _build(
        sweep,
        name,
        relevant,
        {**on, "federation.sample_fraction": 1.0 / clients, "federation.min_clients": 1},
    )
    return Cell(
        name=name,
        kind="baselines",
        settings=tuple(relevant.items()),
        seed=seed,
        baseline_cell=None,
        config=cfg,
    )


# ----------------------------------------------------------------------------------------------- running


def _state(sweep: Sweep, cell: Cell, d: Path) -> str:
    """'finished', 'resume' or 'new'; an existing run with another config is an error."""
    summary_path, metrics = d / "summary.json", d / "metrics.jsonl"
    if not (summary_path.is_file() or metrics.is_file()):
        return "new"
    cfg_path = d / "config.yaml"
    if cfg_path.is_file():
        # Read back through today's schema: a knob added since the run was saved takes its default
        # (knobs are added with defaults that keep the earlier behaviour), so a version upgrade does
        # not orphan a sweep's finished cells; a changed value is still a different run.
        try:
            saved = load_config(cfg_path).model_dump(mode="json")
        except ConfigError as exc:
            raise ConfigError(
                f"{sweep.path}: cell {cell.name}: {cfg_path} cannot be read by this version ({exc}); "
                "move that directory away to rerun the cell"
            ) from None
        differ = _differing_keys(saved, cell.config.model_dump(mode="json"))
        if differ:
            shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
            raise ConfigError(
                f"{sweep.path}: cell {cell.name}: {d} holds a run with another config ({shown} "
                "differ); restore the sweep file or move that directory away"
            )
    if summary_path.is_file() and _read_summary(summary_path).finished:
        return "finished"
    return "resume"


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees (a whole list counts as one value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(key)
            else:
                out.extend(_differing_keys(a[k], b[k], key))
        return out
    return [] if a == b else [prefix or "<config>"]


def _read_summary(path: Path) -> RunSummary:
    try:
        return RunSummary.from_json(read_json_object(path, error=ConfigError), source=str(path))
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def read_index(sweep_dir: str | Path) -> dict:
    """The sweep.json of a sweep directory."""
    path = Path(sweep_dir) / SWEEP_INDEX
    if not path.is_file():
        raise ConfigError(f"{sweep_dir}: not a sweep directory ({SWEEP_INDEX} missing)")
    return read_json_object(path, error=ConfigError)


def _write_index(sweep: Sweep, out: Path, cells: list[Cell], status: dict, wall: dict) -> None:
    atomic_write_json(
        out / SWEEP_INDEX,
        {
            "sweep": str(sweep.path),
            "base": str(sweep.base),
            "overrides": dict(sweep.overrides),
            "grid": {k: list(v) for k, v in sweep.grid},
            "baselines": sweep.baselines,
            "cells": [
                {
                    "name": c.name,
                    "dir": c.name,
                    "kind": c.kind,
                    "settings": dict(c.settings),
                    "seed": c.seed,
                    "baseline_cell": c.baseline_cell,
                    "status": status[c.name],
                    "wall_time_s": wall.get(c.name),
                }
                for c in cells
            ],
        },
    )


def _run_parallel(
    sweep: Sweep,
    out: Path,
    every: list[Cell],
    cells: list[Cell],
    states: dict[str, str],
    status: dict[str, str],
    wall_of: dict[str, float],
    wall_by_kind: dict[str, list[float]],
    record: Any,
    progress: Progress,
    jobs: int,
    threads: int,
) -> None:
    from fedumm.client.site import prepare_world

    todo = [c for c in cells if states[c.name] != "finished"]
    finished_before = len(cells) - len(todo)
    log.info(
        "sweep %s: %d cell(s) to run, %d at a time, %d torch thread(s) each",
        sweep.name,
        len(todo),
        jobs,
        threads,
    )

    def on_start(cell: Cell) -> None:
        status[cell.name] = "running"
        _write_index(sweep, out, every, status, wall_of)

    def on_end(cell: Cell, msg: dict) -> None:
        d = out / cell.name
        saved = _read_summary(d / "summary.json") if (d / "summary.json").is_file() else None
        if msg.get("ok") and saved is not None:
            record(cell, saved)
        else:
            status[cell.name] = (saved.status if saved else "") or (
                "interrupted" if msg.get("interrupted") else "failed"
            )
            if status[cell.name] in ("running", "finished"):
                status[cell.name] = "failed"
        _write_index(sweep, out, every, status, wall_of)

    def describe(done: int, running: list[str]) -> None:
        left = [c for c in todo if status[c.name] != "finished"]
        eta = _eta(left, wall_by_kind, jobs)
        now = ", ".join(running) if running else "none"
        progress.update(
            "sweep",
            finished_before + done,
            description=f"sweep {sweep.name}: running {now} ({finished_before + done}/{len(cells)}, {eta})",
        )

    run_cells_parallel(
        todo,
        out=out,
        resume=lambda c: states[c.name] == "resume",
        jobs=jobs,
        threads=threads,
        prepare=lambda c: prepare_world(c.config),
        on_start=on_start,
        on_end=on_end,
        describe=describe,
    )


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _eta(remaining: list[Cell], wall: dict[str, list[float]], jobs: int = 1) -> str:
    """Remaining time from the mean wall time of finished cells of the same kind (else any kind),
    ``jobs`` cells at a time."""
    every = [w for ws in wall.values() for w in ws]
    if not every:
        return "ETA unknown"
    total = 0.0
    for cell in remaining:
        ws = wall.get(cell.kind) or every
        total += sum(ws) / len(ws)
    return f"ETA {_fmt_duration(total / max(1, min(jobs, len(remaining))))}"


def parse_only(sweep: Sweep, items: list[str]) -> dict[str, tuple[Any, ...]]:
    """`KEY=VALUE` filters (repeatable; one key given twice means either value) checked against the grid."""
    grid = dict(sweep.grid)
    chosen: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--only {item!r}: expected KEY=VALUE, for example federation.clients=16")
        if key not in grid:
            keys = ", ".join(grid) or "none"
            raise ConfigError(f"--only {item!r}: {key} is not a grid key of {sweep.path} (grid keys: {keys})")
        matches = [v for v in grid[key] if _fmt(v) == text.strip()]
        if not matches:
            values = ", ".join(_fmt(v) for v in grid[key])
            raise ConfigError(f"--only {item!r}: {text.strip()!r} is not a grid value of {key} ({values})")
        values = chosen.setdefault(key, [])
        values.extend(m for m in matches if not any(_same(m, v) for v in values))
    return {k: tuple(v) for k, v in chosen.items()}


def parse_cells(sweep: Sweep, names: list[str]) -> tuple[str, ...]:
    """Cell names (`--cell`, repeatable) checked against the sweep's cells, in the order given."""
    known = [c.name for c in expand(sweep)]
    chosen: list[str] = []
    for raw in names:
        name = raw.strip()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            listing = f" (list them: fedumm sweep {sweep.path} --dry-run)"
            hint = f"; did you mean {close[0]}?" if close else listing
            raise ConfigError(f"--cell {raw!r}: no such cell in {sweep.path}{hint}")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def select(
    cells: list[Cell], only: dict[str, tuple[Any, ...]], names: tuple[str, ...] | list[str] = ()
) -> list[Cell]:
    """The federated cells whose grid values match every filter, and the baseline cells they take from.

    With `names` (from :func:`parse_cells`) instead: those cells and the baseline cells they take from,
    in the sweep's order. `--only` filters make a product of grid values; `--cell` picks any set of
    cells, e.g. the rest of one seed in one setting together with another setting, so that `--jobs`
    keeps every worker busy across both.
    """
    if names:
        if only:
            raise ConfigError("--cell and --only do not combine: give the cells by name or by grid value")
        keep = set(names)
        keep |= {c.baseline_cell for c in cells if c.name in keep and c.baseline_cell}
        return [c for c in cells if c.name in keep]
    if not only:
        return cells

    def matches(cell: Cell) -> bool:
        settings = dict(cell.settings)
        return all(any(_same(settings[k], v) for v in values) for k, values in only.items())

    keep = {c.name for c in cells if c.kind == "federated" and matches(c)}
    keep |= {c.baseline_cell for c in cells if c.name in keep and c.baseline_cell}
    return [c for c in cells if c.name in keep]


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
    only: dict[str, tuple[Any, ...]] | None = None,
    names: tuple[str, ...] = (),
    jobs: int = 1,
) -> list[CellResult]:
    """Run every cell not finished yet (resuming interrupted ones), keep sweep.json current, return all.

    With `only` (grid key -> values), run just the matching federated cells and their baseline cells;
    with `names` (cell names), just those cells and their baseline cells. sweep.json still lists every
    cell, so a later run without a filter continues with the rest.
    With `jobs` > 1, that many cells run at once in worker processes (:mod:`fedumm.sweep_jobs`).
    """
    # Baseline cells run first with zero-shot and centralized on; federated cells run with both off and
    # take the numbers of their baseline cell. The first failing cell stops the sweep (rerun to resume).
    progress = progress or NullProgress()
    every = expand(sweep)
    cells = select(every, only or {}, names)
    threads = check_jobs(jobs, cells) if jobs != 1 else None
    out = Path(out_dir)
    states = {c.name: _state(sweep, c, out / c.name) for c in every}  # every check before any run
    out.mkdir(parents=True, exist_ok=True)
    status = {c.name: ("finished" if states[c.name] == "finished" else "pending") for c in every}
    wall_of: dict[str, float] = {}
    wall_by_kind: dict[str, list[float]] = {}
    summaries: dict[str, RunSummary] = {}

    def record(cell: Cell, summary: RunSummary) -> None:
        summaries[cell.name] = summary
        status[cell.name] = summary.status or "failed"
        w = summary.wall_time_s
        if status[cell.name] == "finished" and isinstance(w, int | float) and math.isfinite(w):
            wall_of[cell.name] = float(w)
            wall_by_kind.setdefault(cell.kind, []).append(float(w))

    for cell in every:
        if states[cell.name] == "finished":
            record(cell, _read_summary(out / cell.name / "summary.json"))
    _write_index(sweep, out, every, status, wall_of)

    n = len(cells)
    progress.start("sweep", f"sweep {sweep.name}", n)
    if threads is not None:
        _run_parallel(
            sweep, out, every, cells, states, status, wall_of, wall_by_kind, record, progress, jobs, threads
        )
    for i, cell in enumerate(cells if threads is None else []):
        eta = _eta([c for c in cells[i:] if states[c.name] != "finished"], wall_by_kind)
        progress.update("sweep", i, description=f"sweep {sweep.name}: {cell.name} ({i + 1}/{n}, {eta})")
        if states[cell.name] == "finished":
            continue
        d = out / cell.name
        status[cell.name] = "running"
        _write_index(sweep, out, every, status, wall_of)
        try:
            if states[cell.name] == "resume":
                summary = resume_experiment(d, progress=progress)
            else:
                summary = run_experiment(cell.config, d, progress=progress)
        except BaseException as exc:
            saved = _read_summary(d / "summary.json") if (d / "summary.json").is_file() else None
            interrupted = isinstance(exc, KeyboardInterrupt)
            status[cell.name] = (saved.status if saved else "") or (
                "interrupted" if interrupted else "failed"
            )
            if status[cell.name] in ("running", "finished"):
                status[cell.name] = "failed"
            _write_index(sweep, out, every, status, wall_of)
            raise
        record(cell, summary)
        _write_index(sweep, out, every, status, wall_of)
    progress.update("sweep", n, description=f"sweep {sweep.name}: done")
    progress.finish("sweep")

    results = []
    for cell in cells:
        summary = summaries[cell.name]
        source = summaries.get(cell.baseline_cell or cell.name)
        results.append(
            CellResult(
                cell=cell,
                dir=out / cell.name,
                status=status[cell.name],
                skipped=states[cell.name] == "finished",
                summary=summary,
                zero_shot=source.zero_shot if source else None,
                centralized=source.centralized if source else None,
            )
        )
    return results
