"""Command line: parses, loads the config, calls one library function, prints with rich."""

from __future__ import annotations

import io
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedumm.errors import ConfigError, DataError, FedummError
from fedumm.io import atomic_write_bytes
from fedumm.summary import SETTINGS, RunSummary, SettingResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Federated LoRA fine-tuning of unified multimodal models.",
)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: build the synthetic world.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluation with the official metrics.")
app.add_typer(data_app, name="data")
nvflare_app = typer.Typer(no_args_is_help=True, help="NVIDIA FLARE: jobs for a provisioned system.")
app.add_typer(eval_app, name="eval")
app.add_typer(nvflare_app, name="nvflare")


class _Console(Console):
    """A rich console that prints text as given: no emoji codes (``:100:`` in an error message stays
    ``:100:``) and, when the output is not a terminal (a CI log, a pipe), a width that keeps tables
    readable instead of rich's 80 columns."""

    def __init__(self, **kwargs) -> None:
        super().__init__(emoji=False, **kwargs)

    @property
    def size(self) -> ConsoleDimensions:  # type: ignore[override]
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and not self.is_terminal and "COLUMNS" not in self._environ:
            return ConsoleDimensions(max(size.width, NON_TERMINAL_WIDTH), size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


NON_TERMINAL_WIDTH = 160
console = _Console(stderr=True)
out_console = _Console()


class RichProgress:
    """fedumm.progress.Progress drawn with rich bars (one bar per key)."""

    def __init__(self, progress: Progress) -> None:
        self.p = progress
        self.tasks: dict[str, int] = {}

    def start(self, key: str, description: str, total: int) -> None:
        if key in self.tasks:
            self.p.remove_task(self.tasks[key])
        self.tasks[key] = self.p.add_task(description, total=total)

    def update(self, key: str, completed: int, description: str | None = None) -> None:
        if key in self.tasks:
            kw = {"description": description} if description else {}
            self.p.update(self.tasks[key], completed=completed, **kw)

    def finish(self, key: str) -> None:
        task = self.tasks.pop(key, None)
        if task is not None:
            self.p.remove_task(task)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
    code = 2 if isinstance(exc, ConfigError | DataError) else 1
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # library deprecation notices are not actionable for a user of the command line
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _summary_table(summary: RunSummary, loss_label: str) -> Table:
    t = Table(title=f"fedumm run '{summary.name}' ({summary.status})")
    t.add_column("setting")
    t.add_column("VQA accuracy (test, %)", justify="right")
    rows = [summary.setting(name) or SettingResult() for name in SETTINGS]
    loss = any(r.generation_loss is not None for r in rows)
    if loss:
        t.add_column(f"{loss_label} (test)", justify="right")
    tags = [k for k in GENEVAL_COLUMNS if any(k in r.geneval for r in rows)]
    for key in tags:
        t.add_column(GENEVAL_COLUMNS[key], justify="right")
    for name, row in zip(SETTINGS, rows, strict=True):
        value = row.generation_loss
        cells = [f"{value:.3f}" if value is not None else "-"] if loss else []
        t.add_row(
            name.replace("_", "-"), _pct(row.vqa_accuracy), *cells, *(_pct(row.geneval.get(k)) for k in tags)
        )
    return t


GENEVAL_COLUMNS = {
    "overall": "GenEval overall",
    "single_object": "single",
    "two_object": "two",
    "counting": "counting",
    "colors": "colors",
    "position": "position",
    "color_attr": "color attr",
}


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. federation.rounds=3")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="continue the interrupted run in this directory")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="delete an existing run in --out first")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run zero-shot, centralized and federated training as the config says (or --resume a run)."""
    _setup_logging(verbose)
    from fedumm.config import load_config
    from fedumm.experiment import resume_experiment, run_experiment

    target = resume or out
    try:
        if resume is not None:
            if config is not None or set_:
                raise ConfigError(
                    "--resume takes the config saved in the run directory; drop CONFIG and --set"
                )
        elif config is None or out is None:
            raise ConfigError(
                "usage: fedumm run CONFIG.yaml --out DIR [--set KEY=VALUE ...] | fedumm run --resume DIR"
            )
        with _progress() as bars:
            if resume is not None:
                summary = resume_experiment(resume, progress=RichProgress(bars))
            else:
                cfg = load_config(config, set_ or [])
                if overwrite and (out / "metrics.jsonl").exists():
                    shutil.rmtree(out)
                summary = run_experiment(cfg, out, progress=RichProgress(bars))
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/]: finished rounds are kept in {target}; continue with --resume {target}"
        )
        raise typer.Exit(130) from None
    except FedummError as exc:
        _fail(exc)
    from fedumm.models import family_info

    out_console.print(_summary_table(summary, family_info(summary.family).generation_loss_label))
    mb = 1024 * 1024
    up, down = (summary.bytes_up_per_round or 0) / mb, (summary.bytes_down_per_round or 0) / mb
    out_console.print(
        f"bytes per round: up {up:.3f} MiB, down {down:.3f} MiB; "
        f"full model {(summary.full_model_bytes or 0) / mb:.2f} MiB; wall {summary.wall_time_s or 0:.1f} s; "
        f"peak RSS {(summary.peak_rss_bytes or 0) / mb:.0f} MiB; outputs in {target}"
    )


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML: base config, overrides, grid")],
    out: Annotated[Path, typer.Option("--out", help="sweep directory (one run directory per cell)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells and exit")] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="run only the cells with this grid value, e.g. --only federation.clients=16 "
            "(repeatable; the same key twice means either value); their baseline cells run too",
        ),
    ] = None,
    cell: Annotated[
        list[str] | None,
        typer.Option(
            "--cell",
            help="run only this cell, by name as --dry-run lists it (repeatable; not with --only); "
            "its baseline cell runs too",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="cells run at once, each in its own process with cores / jobs torch threads "
            "(in-process cells only)",
        ),
    ] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a grid of runs, one directory per cell; run the same command again to resume."""
    _setup_logging(verbose)
    from fedumm.sweep import expand, load_sweep, parse_cells, parse_only, run_sweep, select

    try:
        spec = load_sweep(sweep_file)
        chosen = parse_only(spec, only or [])
        named = parse_cells(spec, cell or [])
        if dry_run:
            cells = select(expand(spec), chosen, named)
        else:
            with _progress() as bars:
                results = run_sweep(
                    spec, out, progress=RichProgress(bars), only=chosen, names=named, jobs=jobs
                )
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/]: finished cells are kept in {out}; run the same command to continue"
        )
        raise typer.Exit(130) from None
    except FedummError as exc:
        _fail(exc)
    if dry_run:
        t = Table(title=f"sweep {spec.name}: {len(cells)} cells")
        for col in ("cell", "kind", "baselines from"):
            t.add_column(col)
        for c in cells:
            t.add_row(c.name, c.kind, c.baseline_cell or "-")
        out_console.print(t)
        return
    t = Table(title=f"sweep {spec.name} ({out})")
    t.add_column("cell")
    t.add_column("status")
    for col in ("federated", "centralized", "zero-shot", "wall (s)"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(
            r.cell.name,
            "kept" if r.skipped else r.status,
            _pct(r.summary.federated.vqa_accuracy if r.summary.federated else None)
            if r.cell.kind == "federated"
            else "-",
            _pct(r.centralized.vqa_accuracy if r.centralized else None),
            _pct(r.zero_shot.vqa_accuracy if r.zero_shot else None),
            f"{r.summary.wall_time_s or 0:.1f}",
        )
    out_console.print(t)
    out_console.print(f"next: fedumm report {out} --out {out / 'report'}")
    out_console.print(f"keep the results without checkpoints: fedumm archive {out} --out ARCHIVE_DIR")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories and/or sweep directories")],
    out: Annotated[Path, typer.Option("--out", help="report directory (report.md and its PNGs)")],
    update: Annotated[
        Path | None,
        typer.Option("--update", help="also put the report between the report markers of this markdown file"),
    ] = None,
) -> None:
    """Markdown tables (accuracy by K and alpha, communication, GenEval) and figures from runs."""
    _setup_logging(False)
    from fedumm.report import collect, embed_report, write_report

    try:
        results = collect(runs)
        path = write_report(results, out)
        if update is not None:
            embed_report(path, update)
    except FedummError as exc:
        _fail(exc)
    finished = sum(r.finished for r in results)
    out_console.print(f"wrote {path} ({len(results)} runs, {finished} finished)")
    if update is not None:
        out_console.print(f"updated {update}")


@app.command()
def archive(
    sweep_dir: Annotated[Path, typer.Argument(help="sweep directory (sweep.json and one run per cell)")],
    out: Annotated[Path, typer.Option("--out", help="archive directory (merged with an archive there)")],
) -> None:
    """Copy a sweep's finished results without checkpoints: enough for `fedumm report` and a resume."""
    _setup_logging(False)
    from fedumm.archive import archive_sweep

    try:
        res = archive_sweep(sweep_dir, out)
    except FedummError as exc:
        _fail(exc)
    out_console.print(
        f"archived {len(res.copied)} finished cell(s) into {res.out} ({res.bytes_written / 1e6:.2f} MB); "
        f"{len(res.kept)} archived earlier kept, {len(res.left)} not finished"
    )
    out_console.print(f"report: fedumm report {res.out} --out REPORT_DIR")
    out_console.print(
        f"resume elsewhere: cp -r {res.out} SWEEP_DIR && fedumm sweep SWEEP.yaml --out SWEEP_DIR"
    )


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    seed: Annotated[int, typer.Option(help="world seed")] = 0,
    images: Annotated[
        list[str] | None, typer.Option(help="images per split, e.g. --images public=3000")
    ] = None,
) -> None:
    """Render the synthetic world in VQA v2 / COCO formats."""
    _setup_logging(False)
    from fedumm.data.synth import synthesize

    try:
        sizes = None
        if images:
            sizes = {}
            for item in images:
                split, _, n = item.partition("=")
                if not n.isdigit():
                    raise ConfigError(f"--images {item!r}: expected SPLIT=COUNT")
                sizes[split] = int(n)
        with _progress() as bars:
            rp = RichProgress(bars)

            def cb(split: str, done: int, total: int) -> None:
                if done <= 1:
                    rp.start("synth", f"rendering {split}", total)
                rp.update("synth", done)

            manifest = synthesize(out, seed=seed, images=sizes, progress=cb)
    except ValueError as exc:  # an unknown split, a negative count
        _fail(ConfigError(f"fedumm data synth: {exc}"))
    except FedummError as exc:
        _fail(exc)
    t = Table(title=f"synthetic world (seed {seed}) in {out}")
    for col in ("split", "images", "questions", "captions name shapes"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for files in manifest.splits:
        t.add_row(
            files.name,
            str(files.num_images),
            str(files.num_questions),
            str(files.captions_name_shapes).lower(),
        )
    out_console.print(t)


@app.command()
def partition(
    data: Annotated[Path, typer.Option("--data", help="VQA v2-format dataset directory")],
    clients: Annotated[int, typer.Option("--clients", help="number of clients K")],
    alpha: Annotated[float, typer.Option("--alpha", help="Dirichlet concentration (0 = IID)")],
    out: Annotated[Path, typer.Option("--out", help="output FILE.json (a heatmap PNG is written beside it)")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    split: Annotated[str, typer.Option(help="split to partition")] = "private",
    min_size: Annotated[int, typer.Option(help="minimum questions per client")] = 1,
) -> None:
    """Partition a split's questions over K clients by Dirichlet label skew over answers."""
    _setup_logging(False)
    from fedumm.data.partition import build_partition, partition_stats, save_partition
    from fedumm.data.vqa import load_split

    try:
        samples = load_split(data, split, check_images=False)
        part = build_partition(
            [s.question_id for s in samples],
            [s.multiple_choice_answer for s in samples],
            num_clients=clients,
            alpha=alpha,
            min_size=min_size,
            seed=seed,
        )
        png = save_partition(part, out)
    except FedummError as exc:
        _fail(exc)
    stats = partition_stats(part)
    out_console.print(f"wrote {out} and {png}")
    out_console.print_json(json.dumps(stats))


@eval_app.command("vqa")
def eval_vqa(
    questions: Annotated[Path, typer.Option("--questions")],
    annotations: Annotated[Path, typer.Option("--annotations")],
    results: Annotated[Path, typer.Option("--results", help='[{"question_id", "answer"}, ...]')],
) -> None:
    """Official VQA v2 accuracy (overall, perAnswerType, perQuestionType) as JSON."""
    from fedumm.eval.vqa import evaluate_files

    try:
        scores = evaluate_files(questions, annotations, results)
    except FedummError as exc:
        _fail(exc)
    sys.stdout.write(json.dumps(scores, indent=2) + "\n")


@eval_app.command("geneval")
def eval_geneval(
    metadata: Annotated[Path, typer.Option("--metadata", help="GenEval metadata JSONL")],
    detections: Annotated[
        Path | None, typer.Option("--detections", help="precomputed detections JSONL")
    ] = None,
    images: Annotated[
        Path | None, typer.Option("--images", help="dir of {index:05d}_{sample:02d}.png images")
    ] = None,
) -> None:
    """GenEval judge (official rules) on precomputed detections or on images (built-in detector)."""
    from fedumm.data.geneval import load_metadata
    from fedumm.eval.detect import evaluate_images
    from fedumm.eval.geneval import evaluate_files

    try:
        if (detections is None) == (images is None):
            raise ConfigError("give exactly one of --detections FILE or --images DIR")
        if detections is not None:
            result = evaluate_files(metadata, detections)
        else:
            result = evaluate_images(load_metadata(metadata), images)
    except FedummError as exc:
        _fail(exc)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="folder for {index:05d}_{sample:02d}.png images")],
    metadata: Annotated[
        Path | None, typer.Option("--metadata", help="GenEval metadata JSONL (default: the built-in set)")
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="checkpoint dir (default: the family's built-in)")
    ] = None,
    family: Annotated[str, typer.Option("--family", help="model family (janus, blip3o)")] = "janus",
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="peft adapter dir, e.g. RUN/global_adapter")
    ] = None,
    images_per_prompt: Annotated[int, typer.Option(min=1, max=64)] = 4,
    guidance_scale: Annotated[float, typer.Option(min=1.0)] = 3.0,
    temperature: Annotated[float, typer.Option(min=0.0)] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    batch: Annotated[int, typer.Option(min=1, help="prompts per sampling batch")] = 32,
) -> None:
    """Sample images for GenEval prompts, named for `fedumm eval geneval --images`."""
    _setup_logging(False)
    from fedumm.data.geneval_prompts import DEFAULT_PROMPTS_FILE, build_prompt_set, write_prompt_set
    from fedumm.eval.generation import load_prompts
    from fedumm.models import load_family
    from fedumm.seeding import derive_seed

    try:
        prompts = load_prompts(metadata, per_tag=None) if metadata else build_prompt_set()
        net = load_family(family, model)
        if adapter is not None:
            net.load_adapter(adapter)
        out.mkdir(parents=True, exist_ok=True)
        if metadata is None:
            write_prompt_set(out / DEFAULT_PROMPTS_FILE, prompts)
        chunks = range(0, len(prompts), batch)
        with _progress() as bars:
            task = bars.add_task("sampling", total=len(chunks))
            for b, start in enumerate(chunks):
                chunk = prompts[start : start + batch]
                images = net.generate(
                    [p.prompt for p in chunk],
                    images_per_prompt=images_per_prompt,
                    guidance_scale=guidance_scale,
                    temperature=temperature,
                    seed=derive_seed(seed, "generate", rnd=b),
                )
                for j, p in enumerate(chunk):
                    for k in range(images_per_prompt):
                        buf = io.BytesIO()
                        images[j * images_per_prompt + k].save(buf, format="PNG")
                        atomic_write_bytes(out / f"{p.index:05d}_{k:02d}.png", buf.getvalue())
                bars.update(task, completed=b + 1)
    except FedummError as exc:
        _fail(exc)
    where = f"--metadata {metadata}" if metadata else f"--metadata {out / DEFAULT_PROMPTS_FILE}"
    out_console.print(
        f"wrote {len(prompts) * images_per_prompt} images to {out}; "
        f"score them with: fedumm eval geneval {where} --images {out}"
    )


@app.command()
def comm(
    model_config: Annotated[
        Path, typer.Option("--model-config", help="Hugging Face config.json (or a diffusers model config)")
    ],
    lora_r: Annotated[int, typer.Option("--lora-r", help="LoRA rank")] = 16,
    targets: Annotated[
        str | None,
        typer.Option(
            help="comma-separated module names (default q_proj,k_proj,v_proj,o_proj; "
            "with --family: each tower's own)"
        ),
    ] = None,
    towers: Annotated[
        str | None, typer.Option(help="regex of module names to adapt, e.g. language_model")
    ] = None,
    family: Annotated[
        str | None,
        typer.Option("--family", help="count every tower of this family (janus, blip3o) and each task"),
    ] = None,
    dit_config: Annotated[
        Path | None,
        typer.Option("--dit-config", help="with --family blip3o: the DiT's diffusers config"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON only")] = False,
) -> None:
    """Count LoRA vs full-model parameters and bytes from configs on the meta device (no weights).

    With --family, every tower of the family is counted as the family adapts it, and the bytes per
    round of a client training each task (and both) are printed.
    """
    _setup_logging(False)
    from fedumm.comm import count_family, count_lora

    names = [t for t in targets.split(",") if t] if targets is not None else None
    try:
        if family is None:
            if dit_config is not None:
                raise ConfigError("--dit-config needs --family (the family that mounts the DiT)")
            result = count_lora(
                model_config,
                rank=lora_r,
                targets=names if names is not None else ["q_proj", "k_proj", "v_proj", "o_proj"],
                towers=towers,
            )
        else:
            if towers is not None:
                raise ConfigError("--towers is for a single config; --family counts every tower")
            result = count_family(
                family, model_config=model_config, generator_config=dit_config, rank=lora_r, targets=names
            )
    except FedummError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    if family is not None:
        _print_family_comm(result)
        return
    t = Table(title=f"{result['architecture']} LoRA r={lora_r} on {','.join(result['targets'])}")
    for col in ("", "params", "fp32 GB", "bf16 GB"):
        t.add_column(col, justify="right")
    for kind in ("full", "lora"):
        t.add_row(
            kind,
            f"{result[f'{kind}_params']:,}",
            f"{result[f'{kind}_bytes_fp32'] / 1e9:.4f}",
            f"{result[f'{kind}_bytes_bf16'] / 1e9:.4f}",
        )
    out_console.print(t)
    out_console.print(
        f"LoRA is {result['lora_percent']:.3f}% of the model: "
        f"{result['reduction_percent']:.2f}% less per round"
    )


def _print_family_comm(result: dict) -> None:
    """Tables of ``fedumm comm --family``: one row per tower, then one per task."""
    archs = " + ".join(result["architectures"].values())
    t = Table(title=f"{result['family']} ({archs}) LoRA r={result['rank']}, per tower")
    for col in ("tower", "LoRA targets", "modules", "LoRA params", "whole params", "fp32 MB", "bf16 MB"):
        t.add_column(col, justify="left" if col in ("tower", "LoRA targets") else "right")
    for name, row in result["towers"].items():
        whole = f"{row['whole_params']:,} ({', '.join(row['whole'])})" if row["whole"] else "0"
        t.add_row(
            name,
            ",".join(row["targets"]),
            str(row["lora_modules"]),
            f"{row['lora_params']:,}",
            whole,
            f"{row['bytes_fp32'] / 1e6:.2f}",
            f"{row['bytes_bf16'] / 1e6:.2f}",
        )
    out_console.print(t)
    t = Table(title="per round, one client, one direction")
    for col in ("client trains", "towers", "params", "fp32 MB", "bf16 MB", "% of model"):
        t.add_column(col, justify="left" if col in ("client trains", "towers") else "right")
    for task, row in result["tasks"].items():
        t.add_row(
            "both tasks" if task == "both" else task,
            "+".join(row["towers"]),
            f"{row['params']:,}",
            f"{row['bytes_fp32'] / 1e6:.2f}",
            f"{row['bytes_bf16'] / 1e6:.2f}",
            f"{row['percent_of_full']:.3f}",
        )
    out_console.print(t)
    out_console.print(
        f"full model: {result['full_params']:,} parameters, "
        f"{result['full_bytes_fp32'] / 1e9:.2f} GB fp32, {result['full_bytes_bf16'] / 1e9:.2f} GB bf16"
    )


@app.command()
def pretrain(
    data: Annotated[Path, typer.Option("--data", help="synthetic world (built here if missing)")] = Path(
        "data/world"
    ),
    family: Annotated[
        str, typer.Option("--family", help="model family to pretrain (janus, blip3o)")
    ] = "janus",
    out: Annotated[
        Path | None, typer.Option("--out", help="checkpoint dir (default: the family's built-in)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="a pretraining setting of the family, e.g. --set epochs=2"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Janus: epochs of joint training")] = None,
    vq_steps: Annotated[int | None, typer.Option(help="Janus: VQ image-tokenizer steps (0: skip)")] = None,
) -> None:
    """Pretrain a family's built-in tiny model on the public split (reproduces the shipped checkpoint)."""
    _setup_logging(False)
    import yaml

    from fedumm.data.synth import synthesize
    from fedumm.models import family_class

    try:
        cls = family_class(family)
        overrides: dict = {}
        for item in set_ or []:
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epochs=2")
            overrides[key.strip()] = yaml.safe_load(raw)
        legacy = {"epochs": epochs, "vq_steps": vq_steps}
        overrides |= {k: v for k, v in legacy.items() if v is not None}
        if not (data / "world.json").exists():
            console.print(f"building the synthetic world in {data} (seed {seed})")
            synthesize(data, seed=seed)
        with _progress() as bars:
            report = cls.pretrain(data, out, seed=seed, overrides=overrides, progress=RichProgress(bars))
    except FedummError as exc:
        _fail(exc)
    out_console.print_json(json.dumps(report))


@app.command()
def privacy(
    sample_rate: Annotated[float, typer.Option("--sample-rate", help="q: share of clients per round")],
    rounds: Annotated[int, typer.Option("--rounds", help="T: rounds")],
    delta: Annotated[float, typer.Option("--delta", help="the delta of (epsilon, delta)-DP")] = 1e-5,
    noise_multiplier: Annotated[
        float | None, typer.Option("--noise-multiplier", help="z: noise std / clip norm (gives epsilon)")
    ] = None,
    target_epsilon: Annotated[
        float | None, typer.Option("--target-epsilon", help="the epsilon to reach (gives z)")
    ] = None,
    sampling: Annotated[str, typer.Option(help="poisson or fixed (round(q K) clients, needs --clients)")] = (
        "poisson"
    ),
    clients: Annotated[int | None, typer.Option("--clients", help="K (fixed-size sampling)")] = None,
) -> None:
    """Plan client-level DP: epsilon for a noise multiplier, or the noise multiplier for an epsilon (JSON)."""
    from fedumm.fl.privacy import accountant_name, epsilon, noise_for_epsilon

    try:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ConfigError("give exactly one of --noise-multiplier Z and --target-epsilon E")
        common = dict(sample_rate=sample_rate, rounds=rounds, delta=delta, sampling=sampling, clients=clients)
        if noise_multiplier is not None:
            z = noise_multiplier
            eps = epsilon(noise_multiplier=z, **common)
        else:
            z = noise_for_epsilon(target_epsilon=target_epsilon, **common)
            eps = epsilon(noise_multiplier=z, **common)
    except FedummError as exc:
        _fail(exc)
    result = {
        "epsilon": eps if eps != float("inf") else None,  # JSON has no infinity: null = no guarantee
        "delta": delta,
        "noise_multiplier": z,
        "sample_rate": sample_rate,
        "rounds": rounds,
        "sampling": sampling,
        "accountant": accountant_name(sampling),
    }
    if clients is not None:
        result["clients"] = clients
    if target_epsilon is not None:
        result["target_epsilon"] = target_epsilon
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


@nvflare_app.command("export")
def nvflare_export(
    config: Annotated[Path, typer.Argument(help="YAML config")],
    out: Annotated[Path, typer.Option("--out", help="folder to write the job folder into")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. federation.rounds=3")
    ] = None,
) -> None:
    """Write a FLARE job folder for `nvflare job submit` (see docs/DEPLOY.md)."""
    _setup_logging(False)
    from fedumm.config import load_config

    try:
        cfg = load_config(config, set_ or [])
        from fedumm.engines.nvflare import export_job

        job = export_job(cfg, out)
    except FedummError as exc:
        _fail(exc)
    out_console.print(f"wrote {job}\nsubmit with: nvflare job submit -j {job} (from an admin startup kit)")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
