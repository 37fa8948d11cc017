"""Markdown tables and figures from run and sweep directories (accuracy by K and alpha, bytes, curves)."""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedumm.config import read_yaml_mapping
from fedumm.errors import DataError
from fedumm.io import atomic_write_bytes, atomic_write_text, read_json_object
from fedumm.summary import RunSummary, SettingResult
from fedumm.types import latest_per_round

__all__ = ["RunResult", "collect", "write_report"]

_SWEEP_INDEX = "sweep.json"
_GRID_AXES = ("federation.clients", "federation.alpha", "federation.strategy", "seed")
_FAMILY_AXIS = "model.family"
_ROUNDS_AXIS = "federation.rounds"
_NO_GENEVAL = "No GenEval results in these runs (no `geneval` entry in their summary.json)."


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One federated run as the report sees it (accuracies in percent, bytes per round)."""

    path: Path
    name: str
    strategy: str
    family: str
    clients: int
    alpha: float
    seed: int
    variant: str
    status: str
    federated: float | None
    zero_shot: float | None
    centralized: float | None
    zero_shot_val: float | None
    centralized_val: float | None
    baseline_source: Path | None
    curve: tuple[tuple[int, float], ...]
    bytes_up_per_round: int | None
    bytes_down_per_round: int | None
    client_bytes_per_round: int | None
    clients_per_round: int
    full_model_bytes: int | None
    geneval: dict | None
    wall_time_s: float | None
    geneval_baselines: dict = field(default_factory=dict)  # "zero-shot" / "centralized" -> GenEval
    # the variant without the model family: runs that differ only in their family pair up side by side
    base_variant: str = ""
    # the federated model on each client's own answer distribution: mean, 10th percentile, worst
    client_mean: float | None = None
    client_p10: float | None = None
    client_worst: float | None = None
    rounds: int = 0  # federation.rounds of the run's config
    # the variant without the round count: runs that differ only in it make one convergence row
    rounds_variant: str = ""
    # federation.test_at_rounds: (round, federated test VQA, centralized test VQA after as many epochs)
    by_round: tuple[tuple[int, float, float], ...] = ()

    @property
    def finished(self) -> bool:
        """True when the run finished and has a federated test accuracy."""
        return self.status == "finished" and self.federated is not None


# ------------------------------------------------------------------------------------------- collecting


def _read_rounds(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rounds = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rounds.append(json.loads(line))
        except ValueError:
            raise DataError(f"{path}:{number}: not a JSON line") from None
    return latest_per_round(rounds)


def _summary(path: Path) -> RunSummary:
    return RunSummary.from_json(read_json_object(path), source=str(path))


def _acc(entry: SettingResult | None, val: bool = False) -> float | None:
    if entry is None:
        return None
    return entry.val_vqa_accuracy if val else entry.vqa_accuracy


def _geneval(entry: SettingResult | None) -> dict | None:
    """GenEval of a setting as fractions (``overall``, ``tags``), or None when it has none."""
    if entry is None or entry.geneval_overall is None:
        return None
    tags = {k: v / 100.0 for k, v in entry.geneval.items() if k != "overall"}
    return {"overall": entry.geneval_overall / 100.0, "tags": tags}


def _load_run(
    path: Path,
    *,
    baselines: RunSummary | None,
    source: Path | None,
    variant: str,
    base_variant: str = "",
    rounds_variant: str = "",
) -> RunResult:
    summary = _summary(path / "summary.json")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise DataError(f"{path}: config.yaml missing (not a fedumm run directory)")
    cfg = read_yaml_mapping(cfg_path, "run config", error=DataError)
    fed = cfg.get("federation") or {}
    model = cfg.get("model") or {}
    rounds = _read_rounds(path / "metrics.jsonl")
    base = summary if baselines is None else baselines
    per_client = [
        int(r["bytes_up"].get(c, 0)) + int(r["bytes_down"].get(c, 0))
        for r in rounds
        for c in set(r.get("bytes_up", {})) | set(r.get("bytes_down", {}))
    ]
    curve = tuple(
        (int(r["round"]), float(r["global"]["vqa_accuracy"]))
        for r in rounds
        if isinstance((r.get("global") or {}).get("vqa_accuracy"), int | float)
    )
    return RunResult(
        path=path,
        name=summary.name or path.name,
        strategy=str(fed.get("strategy", "fedavg")),
        family=str(model.get("family", "janus")),
        clients=int(fed.get("clients", 0)),
        alpha=float(fed.get("alpha", 0.0)),
        seed=int(cfg.get("seed", 0)),
        variant=variant,
        status=summary.status,
        federated=_acc(summary.federated),
        zero_shot=_acc(base.zero_shot),
        centralized=_acc(base.centralized),
        zero_shot_val=_acc(base.zero_shot, val=True),
        centralized_val=_acc(base.centralized, val=True),
        baseline_source=source if baselines is not None else path,
        curve=curve,
        bytes_up_per_round=summary.bytes_up_per_round,
        bytes_down_per_round=summary.bytes_down_per_round,
        client_bytes_per_round=max(per_client) if per_client else None,
        clients_per_round=max(
            (len(r.get("clients", ())) for r in rounds), default=int(fed.get("clients", 0))
        ),
        full_model_bytes=summary.full_model_bytes,
        geneval=_geneval(summary.federated),
        wall_time_s=summary.wall_time_s,
        geneval_baselines={
            name: g
            for name, row in (("zero-shot", base.zero_shot), ("centralized", base.centralized))
            if (g := _geneval(row)) is not None
        },
        base_variant=base_variant,
        rounds=int(fed.get("rounds", 0)),
        rounds_variant=rounds_variant,
        by_round=_by_round(summary.federated, base.centralized),
        **_client_view(summary.federated),
    )


def _by_round(
    fed: SettingResult | None, central: SettingResult | None
) -> tuple[tuple[int, float, float], ...]:
    """The rounds at which both the federation and its centralized baseline were scored on the test split."""
    if fed is None or central is None:
        return ()
    both = sorted(set(fed.vqa_by_round) & set(central.vqa_by_round))
    return tuple((r, fed.vqa_by_round[r], central.vqa_by_round[r]) for r in both)


def _client_view(entry: SettingResult | None) -> dict[str, float | None]:
    view = entry.client_vqa_summary if entry is not None else {}
    return {f"client_{k}": view.get(k) for k in ("mean", "p10", "worst")}  # type: ignore[misc]


def _variant(settings: dict, skip: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k not in _GRID_AXES and k not in skip)


def _sweep_cells(sweep_dir: Path) -> list[RunResult]:
    index = read_json_object(sweep_dir / _SWEEP_INDEX)
    cells = index.get("cells")
    if not isinstance(cells, list):
        raise DataError(f"{sweep_dir / _SWEEP_INDEX}: 'cells' list missing")
    baseline_dirs = {c["name"]: sweep_dir / c["dir"] for c in cells if c.get("kind") == "baselines"}
    out = []
    for cell in cells:
        d = sweep_dir / cell["dir"]
        if cell.get("kind") != "federated" or not (d / "summary.json").is_file():
            continue
        out.append(_with_baselines(d, baseline_dirs.get(cell.get("baseline_cell") or ""), cell))
    return out


def _with_baselines(d: Path, base_dir: Path | None, cell: dict) -> RunResult:
    baselines = None
    if base_dir is not None and (base_dir / "summary.json").is_file():
        baselines = _summary(base_dir / "summary.json")
    return _load_run(
        d,
        baselines=baselines,
        source=base_dir if baselines is not None else None,
        variant=_variant(cell.get("settings") or {}),
        base_variant=_variant(cell.get("settings") or {}, skip=(_FAMILY_AXIS,)),
        rounds_variant=_variant(cell.get("settings") or {}, skip=(_ROUNDS_AXIS,)),
    )


def _plain_run(path: Path) -> RunResult:
    """A run directory; a cell of a sweep takes the baselines of its sweep's baseline cell."""
    index_path = path.parent / _SWEEP_INDEX
    if index_path.is_file():
        cells = read_json_object(index_path).get("cells") or []
        by_dir = {c.get("dir"): c for c in cells}
        cell = by_dir.get(path.name)
        if cell and cell.get("kind") == "federated":
            base = by_dir.get(cell.get("baseline_cell"), {}).get("dir")
            return _with_baselines(path, path.parent / base if base else None, cell)
    return _load_run(path, baselines=None, source=None, variant="")


def collect(paths: Iterable[str | Path]) -> list[RunResult]:
    """Federated runs under the given run or sweep directories, deduplicated, in a stable order."""
    found: dict[str, RunResult] = {}
    for raw in paths:
        p = Path(raw)
        if (p / _SWEEP_INDEX).is_file():
            runs = _sweep_cells(p)
        elif (p / "summary.json").is_file():
            runs = [_plain_run(p)]
        else:
            raise DataError(f"{p}: neither a run directory (summary.json) nor a sweep directory (sweep.json)")
        for r in runs:
            found.setdefault(os.path.realpath(r.path), r)
    if len({r.family for r in found.values()}) > 1:
        # runs of different families never share a table: name the family wherever the grid did not
        mark = f"{_FAMILY_AXIS}="
        found = {
            k: r
            if mark in r.variant
            else replace(r, variant=", ".join(filter(None, [f"{mark}{r.family}", r.variant])))
            for k, r in found.items()
        }
    return sorted(
        found.values(), key=lambda r: (r.strategy, r.variant, r.clients, r.alpha, r.seed, str(r.path))
    )


# ----------------------------------------------------------------------------------------------- tables


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {statistics.stdev(values):.2f}"


def _alpha(a: float) -> str:
    return repr(float(a))


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "---:") -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join(["---", *[align] * (len(header) - 1)]) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _unique_baselines(runs: Sequence[RunResult], attr: str) -> list[float]:
    """One value per baseline source (a shared baseline cell counts once)."""
    seen: dict[str, float] = {}
    for r in runs:
        value = getattr(r, attr)
        if value is not None:
            seen.setdefault(os.path.realpath(r.baseline_source or r.path), value)
    return list(seen.values())


def _groups(results: Sequence[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        if r.finished:
            groups.setdefault((r.strategy, r.variant), []).append(r)
    return dict(sorted(groups.items()))


def _title(strategy: str, variant: str) -> str:
    return f"`{strategy}`" + (f" ({variant})" if variant else "")


def _slug(strategy: str, variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", strategy + (f"-{variant}" if variant else "")).strip("_")


def _accuracy_tables(runs: list[RunResult]) -> list[str]:
    ks = sorted({r.clients for r in runs})
    alphas = sorted({r.alpha for r in runs})
    header = ["K \\ alpha", *(_alpha(a) for a in alphas)]

    def at(k: int | None, a: float) -> list[RunResult]:
        return [r for r in runs if r.alpha == a and (k is None or r.clients == k)]

    rows: list[list[object]] = [
        [k, *(_mean_std([r.federated for r in at(k, a)]) for a in alphas)] for k in ks
    ]
    rows.append(["centralized", *(_mean_std(_unique_baselines(at(None, a), "centralized")) for a in alphas)])
    rows.append(["zero-shot", *(_mean_std(_unique_baselines(at(None, a), "zero_shot")) for a in alphas)])
    retention = [
        [
            k,
            *(
                _mean_std([100.0 * r.federated / r.centralized for r in at(k, a) if r.centralized])
                for a in alphas
            ),
        ]
        for k in ks
    ]
    return [
        "Federated VQA accuracy (test split, %), mean ± std over seeds:",
        "",
        *_table(header, rows),
        "Retention (federated / centralized of the same seed, %):",
        "",
        *_table(header, retention),
    ]


def _convergence_section(results: Sequence[RunResult]) -> list[str]:
    """Retention (federated / centralized of the same seed and the same examples seen) against the
    round count, for runs that differ only in ``federation.rounds`` (a sweep axis)."""
    # (strategy, variant) -> (K, alpha, rounds, seed) -> (federated, centralized); a round scored inside
    # a longer run (federation.test_at_rounds) is the same measurement as a run of that many rounds
    groups: dict[tuple[str, str], dict[tuple[int, float, int, int], tuple[float, float]]] = {}
    for r in results:
        if not (r.finished and r.centralized):
            continue
        points = groups.setdefault((r.strategy, r.rounds_variant), {})
        points[(r.clients, r.alpha, r.rounds, r.seed)] = (r.federated, r.centralized)  # type: ignore[assignment]
        for n, fed_acc, central_acc in r.by_round:
            points.setdefault((r.clients, r.alpha, n, r.seed), (fed_acc, central_acc))
    lines: list[str] = []
    for (strategy, variant), points in sorted(groups.items()):
        rounds = sorted({key[2] for key in points})
        if len(rounds) < 2:
            continue
        settings = sorted({key[:2] for key in points})
        header = ["K, alpha", *(f"{n} rounds" for n in rounds)]

        def cell(k: int, a: float, n: int, points=points) -> str:
            got = [v for key, v in points.items() if key[:3] == (k, a, n)]
            if not got:
                return "-"
            ret = _mean_std([100.0 * f / c for f, c in got])
            fed = _mean_std([f for f, _ in got])
            return f"{ret} ({fed}, n={len(got)})"

        rows = [[f"{k}, {_alpha(a)}", *(cell(k, a, n) for n in rounds)] for k, a in settings]
        lines += [
            f"### Strategy {_title(strategy, variant)}",
            "",
            "Retention (%), mean ± std over seeds; in brackets the federated test VQA (%) and the number "
            "of seeds. Each round count has its own centralized baseline (rounds x local epochs; a round"
            " scored inside a longer run, federation.test_at_rounds, against the baseline's state after as"
            " many epochs):",
            "",
            *_table(header, rows),
        ]
    return lines or ["No runs that differ only in their round count.", ""]


def _worst_client_section(groups: dict[tuple[str, str], list[RunResult]]) -> list[str]:
    """Per strategy: global accuracy beside the clients' mean, 10th percentile and worst."""
    lines: list[str] = []
    for (strategy, variant), runs in groups.items():
        runs = [r for r in runs if r.client_worst is not None]
        if not runs:
            continue
        cells = sorted({(r.clients, r.alpha) for r in runs})
        rows = []
        for k, a in cells:
            at = [r for r in runs if (r.clients, r.alpha) == (k, a)]
            rows.append(
                [
                    k,
                    _alpha(a),
                    _mean_std([r.federated for r in at]),
                    _mean_std([r.client_mean for r in at]),
                    _mean_std([r.client_p10 for r in at]),
                    _mean_std([r.client_worst for r in at]),
                    len(at),
                ]
            )
        header = ["K", "alpha", "global", "client mean", "client p10", "worst client", "seeds"]
        lines += [f"### Strategy {_title(strategy, variant)}", "", *_table(header, rows)]
    if not lines:
        return ["No run reports per-client accuracy (summary.json `client_vqa`).", ""]
    return [
        "The federated model on each client's own answer distribution (the test split re-weighted",
        "to the answers the client holds; `fedumm.eval.clients`), %, mean ± std over seeds:",
        "",
        *lines,
    ]


def _communication_table(results: Sequence[RunResult]) -> list[str]:
    rows: dict[tuple[str, str, int], list[RunResult]] = {}
    for r in results:
        if r.finished and r.bytes_up_per_round is not None and r.bytes_down_per_round is not None:
            rows.setdefault((r.strategy, r.variant, r.clients), []).append(r)
    if not rows:
        return ["No finished runs with a communication ledger.", ""]
    body = []
    for (strategy, variant, k), runs in sorted(rows.items()):
        lora_total = max(r.bytes_up_per_round + r.bytes_down_per_round for r in runs)
        lora_client = max((r.client_bytes_per_round or 0) for r in runs)
        full = max((r.full_model_bytes or 0) for r in runs)
        participants = max(r.clients_per_round for r in runs)
        full_total = 2 * full * participants
        reduction = f"{100.0 * (1 - lora_total / full_total):.3f}" if full_total else "-"
        body.append(
            [
                _title(strategy, variant),
                k,
                f"{lora_client:,}",
                f"{lora_total:,}",
                f"{2 * full:,}",
                f"{full_total:,}",
                reduction,
            ]
        )
    header = [
        "strategy",
        "K",
        "LoRA per client (up + down, B)",
        "LoRA per round, all clients (B)",
        "full FT per client (2 × model, B)",
        "full FT per round, all clients (B)",
        "reduction (%)",
    ]
    return [
        "Bytes per round as serialised (the largest round of any run with these settings); full fine-tuning "
        "would send the whole model down and up to every participating client.",
        "",
        *_table(header, body),
    ]


def _geneval_section(groups: dict[tuple[str, str], list[RunResult]]) -> list[str]:
    with_geneval = {key: [r for r in runs if r.geneval] for key, runs in groups.items()}
    with_geneval = {key: runs for key, runs in with_geneval.items() if runs}
    if not with_geneval:
        return [_NO_GENEVAL, ""]
    lines = ["GenEval scores (fractions of images judged correct, mean over seeds):", ""]
    for (strategy, variant), runs in with_geneval.items():
        tags = sorted({t for r in runs for t in r.geneval["tags"]})
        keys = sorted({(r.clients, r.alpha) for r in runs})
        body = []
        for name in ("zero-shot", "centralized"):
            seen = {
                (g["overall"], tuple(sorted(g["tags"].items()))): g
                for r in runs
                if (g := r.geneval_baselines.get(name)) is not None
            }
            if seen:  # shared by every cell of a seed: mean over the distinct ones (one per seed)
                vals = [statistics.fmean(g["overall"] for g in seen.values())]
                vals += [statistics.fmean(g["tags"].get(t, math.nan) for g in seen.values()) for t in tags]
                body.append([name, "-", *("-" if math.isnan(v) else f"{v:.3f}" for v in vals)])
        for k, a in keys:
            sel = [r for r in runs if (r.clients, r.alpha) == (k, a)]
            vals = [statistics.fmean(r.geneval["overall"] for r in sel)]
            for t in tags:
                xs = [r.geneval["tags"][t] for r in sel if t in r.geneval["tags"]]
                vals.append(statistics.fmean(xs) if xs else math.nan)
            body.append([k, _alpha(a), *("-" if math.isnan(v) else f"{v:.3f}" for v in vals)])
        lines += [f"### {_title(strategy, variant)}", "", *_table(["K", "alpha", "overall", *tags], body)]
    return lines


def _families_section(results: Sequence[RunResult]) -> list[str]:
    """One row per (strategy, K, alpha) and the families side by side, when more than one ran."""
    finished = [r for r in results if r.finished]
    families = sorted({r.family for r in finished})
    if len(families) < 2:
        return []
    cells: dict[tuple[str, str, int, float], dict[str, list[RunResult]]] = {}
    for r in finished:
        key = (r.strategy, r.base_variant, r.clients, r.alpha)
        cells.setdefault(key, {}).setdefault(r.family, []).append(r)

    def vqa(runs: list[RunResult]) -> str:
        return _mean_std([r.federated for r in runs])

    def retention(runs: list[RunResult]) -> str:
        return _mean_std([100.0 * r.federated / r.centralized for r in runs if r.centralized])

    def geneval(runs: list[RunResult]) -> str:
        xs = [100.0 * r.geneval["overall"] for r in runs if r.geneval]
        return _mean_std(xs)

    def per_round(runs: list[RunResult]) -> str:
        xs = [
            r.bytes_up_per_round + r.bytes_down_per_round
            for r in runs
            if r.bytes_up_per_round is not None and r.bytes_down_per_round is not None
        ]
        return f"{max(xs):,}" if xs else "-"

    columns = (("VQA", vqa), ("retention", retention), ("GenEval", geneval), ("bytes/round", per_round))
    header = ["strategy", "K", "alpha"] + [f"{f} {name}" for name, _ in columns for f in families]
    body: list[list[object]] = []
    for (strategy, base_variant, k, a), by_family in sorted(cells.items()):
        row: list[object] = [_title(strategy, base_variant), k, _alpha(a)]
        for _, fn in columns:
            row += [fn(by_family[f]) if f in by_family else "-" for f in families]
        body.append(row)
    baselines: list[list[object]] = []
    for name, attr in (("zero-shot", "zero_shot"), ("centralized", "centralized")):
        row = [name, "-", "-"]
        for label, _ in columns:
            for f in families:
                runs = [r for r in finished if r.family == f]
                if label == "VQA":
                    row.append(_mean_std(_unique_baselines(runs, attr)))
                elif label == "GenEval":
                    seen = {
                        os.path.realpath(r.baseline_source or r.path): 100.0 * g["overall"]
                        for r in runs
                        if (g := r.geneval_baselines.get(name)) is not None
                    }
                    row.append(_mean_std(list(seen.values())))
                else:
                    row.append("-")
        baselines.append(row)
    return [
        "## Model families side by side",
        "",
        "Each family's federated runs beside the other's with the same strategy, K and alpha (every other "
        "setting equal): federated test VQA accuracy (%), retention (federated / centralized of the same "
        "family and seed, %), GenEval overall of the final global model (%), and bytes per round (up + "
        "down, all clients, the largest round). Mean ± std over seeds.",
        "",
        *_table(header, [*body, *baselines]),
    ]


def _runs_table(results: Sequence[RunResult]) -> list[str]:
    header = [
        "run",
        "strategy",
        "K",
        "alpha",
        "seed",
        "status",
        "federated",
        "centralized",
        "zero-shot",
        "rounds",
        "wall time (s)",
    ]

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    body = [
        [
            f"`{r.path}`",
            r.strategy,
            r.clients,
            _alpha(r.alpha),
            r.seed,
            r.status,
            num(r.federated),
            num(r.centralized),
            num(r.zero_shot),
            len(r.curve),
            "-" if r.wall_time_s is None else f"{r.wall_time_s:.1f}",
        ]
        for r in results
    ]
    return _table(header, body)


# ---------------------------------------------------------------------------------------------- figures


def _png(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


def _curves(runs: list[RunResult], title: str, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ks = sorted({r.clients for r in runs})
    alphas = sorted({r.alpha for r in runs})
    styles = ["-", "--", ":", "-."]
    for ki, k in enumerate(ks):
        for ai, a in enumerate(alphas):
            sel = [r for r in runs if r.clients == k and r.alpha == a and r.curve]
            if not sel:
                continue
            by_round: dict[int, list[float]] = {}
            for r in sel:
                for rnd, acc in r.curve:
                    by_round.setdefault(rnd, []).append(acc)
            xs = sorted(by_round)
            ax.plot(
                xs,
                [statistics.fmean(by_round[x]) for x in xs],
                color=f"C{ki % 10}",
                linestyle=styles[ai % len(styles)],
                marker="o",
                markersize=3,
                label=f"K={k}, alpha={_alpha(a)}",
            )
    for value, label, style in (
        (_unique_baselines(runs, "centralized_val"), "centralized", "--"),
        (_unique_baselines(runs, "zero_shot_val"), "zero-shot", ":"),
    ):
        if value:
            ax.axhline(statistics.fmean(value), color="0.35", linestyle=style, linewidth=1, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("VQA accuracy, validation (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _png(fig, path)


def _heatmap(runs: list[RunResult], title: str, path: Path) -> Path:
    ks = sorted({r.clients for r in runs})
    alphas = sorted({r.alpha for r in runs})
    grid = [
        [
            statistics.fmean(v)
            if (v := [r.federated for r in runs if r.clients == k and r.alpha == a])
            else math.nan
            for a in alphas
        ]
        for k in ks
    ]
    fig = Figure(figsize=(1.6 + 1.1 * len(alphas), 1.2 + 0.7 * len(ks)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0.0, vmax=100.0)
    ax.set_xticks(range(len(alphas)), [_alpha(a) for a in alphas])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("Dirichlet alpha")
    ax.set_ylabel("clients K")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="black" if v > 50 else "white")
    fig.colorbar(image, ax=ax, label="VQA accuracy, test (%)")
    return _png(fig, path)


# ----------------------------------------------------------------------------------------------- report


def write_report(results: Sequence[RunResult], out_dir: str | Path) -> Path:
    """Write out_dir/report.md and the PNGs it links; return the markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _groups(results)
    finished = sum(r.finished for r in results)
    lines = [
        "# fedumm report",
        "",
        f"{len(results)} federated run(s), {finished} finished. Accuracies are VQA v2 accuracy in percent; "
        "tables use the test split, curves the validation split. A sweep's federated cells take the "
        "zero-shot and centralized numbers of the baseline cell of their seed.",
        "",
    ]
    lines += _families_section(results)
    lines += ["## Federated VQA accuracy by K and alpha", ""]
    if not groups:
        lines += ["No finished runs.", ""]
    for (strategy, variant), runs in groups.items():
        lines += [f"### Strategy {_title(strategy, variant)}", "", *_accuracy_tables(runs)]
    lines += ["## Worst-client accuracy", "", *_worst_client_section(groups)]
    finished = [r for r in results if r.finished]
    if len({r.rounds for r in finished}) > 1 or any(r.by_round for r in finished):
        lines += ["## Retention by rounds", "", *_convergence_section(results)]
    lines += ["## Communication per round", "", *_communication_table(results)]
    lines += ["## Accuracy per round", ""]
    for (strategy, variant), runs in groups.items():
        name = f"curves-{_slug(strategy, variant)}.png"
        _curves(runs, f"{strategy} {variant}".strip() + ": global validation accuracy", out / name)
        lines += [f"![accuracy per round, {_title(strategy, variant)}]({name})", ""]
    lines += ["## Federated accuracy heatmaps (K by alpha)", ""]
    for (strategy, variant), runs in groups.items():
        name = f"heatmap-{_slug(strategy, variant)}.png"
        _heatmap(runs, f"{strategy} {variant}".strip() + ": federated test accuracy (%)", out / name)
        lines += [f"![K by alpha, {_title(strategy, variant)}]({name})", ""]
    lines += ["## GenEval", "", *_geneval_section(groups)]
    lines += ["## Runs", "", *_runs_table(results)]
    return atomic_write_text(out / "report.md", "\n".join(lines).rstrip("\n") + "\n")


BEGIN_MARK = "<!-- fedumm report: begin -->"
END_MARK = "<!-- fedumm report: end -->"


def embed_report(report_md: str | Path, target: str | Path) -> Path:
    """Replace the block between the report markers in ``target`` with ``report_md``'s content.

    Headings are demoted one level and image links made relative to ``target``'s folder, so a
    document such as docs/RESULTS.md is regenerated by ``fedumm report ... --update``.
    """
    src, dst = Path(report_md), Path(target)
    try:
        text = dst.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{dst}: cannot read ({exc})") from None
    if (
        text.count(BEGIN_MARK) != 1
        or text.count(END_MARK) != 1
        or text.index(BEGIN_MARK) > text.index(END_MARK)
    ):
        raise DataError(f"{dst}: needs exactly one '{BEGIN_MARK}' line before one '{END_MARK}' line")
    prefix = Path(os.path.relpath(src.parent.resolve(), dst.parent.resolve())).as_posix()
    body = []
    for line in src.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            line = "#" + line
        line = re.sub(r"\]\(([^/)]+\.png)\)", lambda m: f"]({prefix}/{m.group(1)})", line)
        body.append(line)
    head, rest = text.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    return atomic_write_text(
        dst, head + BEGIN_MARK + "\n" + "\n".join(body).strip("\n") + "\n" + END_MARK + tail
    )
