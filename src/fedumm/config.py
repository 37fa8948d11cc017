"""The one typed configuration tree (pydantic), loaded from YAML with checked dotted overrides."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedumm.errors import ConfigError, FedummError

__all__ = ["Config", "load_config", "apply_overrides", "format_validation_error", "dump_config"]


Task = Literal["understanding", "generation", "both"]
TASKS: tuple[str, ...] = ("understanding", "generation", "both")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    path: Path = Field(description="directory of a VQA v2-format dataset (e.g. from `fedumm data synth`)")
    train_split: str = "private"
    val_split: str = "val"
    test_split: str = "test"
    max_val_questions: int | None = Field(default=None, ge=1, description="cap per-round validation size")
    max_test_questions: int | None = Field(default=None, ge=1, description="cap final test size")
    synthesize_if_missing: bool = Field(
        default=False, description="build the synthetic world if path is empty"
    )
    synth_images: dict[str, int] | None = Field(
        default=None, description="images per split when synthesizing"
    )


class ModelConfig(_Strict):
    family: str = Field(default="janus", description="a registered model family (fedumm.models)")
    path: Path | None = Field(
        default=None, description="local checkpoint dir; null = the family's built-in tiny model"
    )
    prompt_template: str | None = Field(
        default=None, description="VQA prompt with {question} and the image token; null = the family's"
    )
    max_answer_tokens: int = Field(default=3, ge=1, le=64)
    device: str = "cpu"

    @field_validator("family")
    @classmethod
    def _registered(cls, v: str) -> str:
        from fedumm.models import family_info

        try:
            family_info(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v


class LoraConfigModel(_Strict):
    rank: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    groups: tuple[str, ...] = Field(default=("language",), description="towers to adapt (the family's)")
    target_modules: tuple[str, ...] | None = Field(default=None, description="null = each tower's defaults")
    alignment_tokens: int = Field(
        default=0,
        ge=0,
        le=64,
        description="shared learnable tokens between image and text, aggregated over all clients (0 = off)",
    )

    @field_validator("groups")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one LoRA group is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate groups in {list(v)}")
        return v


class TrainConfig(_Strict):
    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    eval_batch_size: int = Field(default=64, ge=1)
    local_val_fraction: float = Field(default=0.1, ge=0, lt=1, description="held out per client for q_k")


# Rules a DP or HE run accepts: none, and auto (which resolves to none there: server/trust.py).
_MEAN_RULES = ("none", "auto")


class DefenseConfig(_Strict):
    """Server defences against hostile but well-formed updates (docs/SECURITY.md)."""

    count_cap: float | None = Field(
        default=2.0, ge=1, description="no client weighs more than cap x the median count; null = off"
    )
    norm_bound: Literal["adaptive", "fixed", "off"] = Field(
        default="adaptive", description="bound each client's delta norm (per adapter group)"
    )
    norm_multiple: float = Field(default=2.0, gt=0, description="adaptive: multiple of the median norm")
    norm_value: float | None = Field(default=None, gt=0, description="fixed: the bound")
    rule: Literal["auto", "none", "median", "trimmed_mean", "multi_krum"] = Field(
        default="auto",
        description=(
            "robust aggregation rule applied before the strategy; auto: multi_krum (krum_f) in every "
            "group with at least krum_f + 3 updates, none with fewer, under DP or under HE"
        ),
    )
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5, description="trimmed_mean: share cut per end")
    krum_f: int = Field(default=1, ge=0, description="multi_krum: attackers tolerated")
    krum_m: int | None = Field(default=None, ge=1, description="multi_krum: updates kept (null = n - f)")
    space: Literal["factors", "product"] = Field(
        default="factors", description="robust rules on LoRA factors A, B or on the products B.A"
    )

    @field_validator("norm_bound", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: `norm_bound: off` means "off"
        return "off" if v is False else v

    @model_validator(mode="after")
    def _fixed(self) -> DefenseConfig:
        if self.norm_bound == "fixed" and self.norm_value is None:
            raise ValueError("norm_bound: fixed needs norm_value")
        return self


class FederationConfig(_Strict):
    clients: int = Field(default=4, ge=1)
    alpha: float = Field(default=0.5, ge=0, description="Dirichlet concentration; 0 = IID")
    min_partition_size: int = Field(default=8, ge=1)
    rounds: int = Field(default=5, ge=1)
    sample_fraction: float = Field(default=1.0, gt=0, le=1)
    min_clients: int = Field(default=1, ge=1)
    strategy: str = "fedavg"
    strategy_params: dict[str, float] = Field(default_factory=dict)
    compression: Literal["none", "fp16", "bf16", "int8", "int8_row"] = Field(
        default="none", description="client->server transport of the adapter delta"
    )
    download_compression: Literal["none", "fp16", "bf16"] = Field(
        default="none", description="server->client transport of the global adapter (in process)"
    )
    error_feedback: bool = Field(default=True, description="carry each client's quantisation error forward")
    residual_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="precision error-feedback residuals are kept in between rounds"
    )
    residual_cache_mib: float = Field(
        default=64, ge=0, description="memory for residuals; the rest wait in the run's checkpoint/clients/"
    )
    group_strategies: dict[str, str] = Field(
        default_factory=dict, description="per adapter group (the family's towers, alignment), a strategy"
    )
    tasks: Task = Field(default="understanding", description="every client's task mix")
    task_fractions: dict[Task, float] | None = Field(
        default=None, description="share of clients per task mix, e.g. {understanding: 0.25, both: 0.75}"
    )
    client_tasks: list[Task] | None = Field(default=None, description="one task mix per client, in order")
    sampling: Literal["fixed", "poisson"] = Field(
        default="fixed",
        description="fixed: round(sample_fraction x K) clients a round; poisson: each with that chance",
    )
    defense: DefenseConfig = DefenseConfig()
    secure_aggregation: Literal["none", "he"] = Field(
        default="none", description="he: FedAvg over CKKS-encrypted deltas on FLARE (nvflare-poc)"
    )
    test_at_rounds: list[int] = Field(
        default_factory=list,
        description=(
            "also score the global adapter on the test split after these rounds, and the centralized"
            " baseline after the same examples seen (round x local epochs): retention by rounds from one run"
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        from fedumm.fl.strategies import STRATEGIES

        STRATEGIES.get(self.strategy)  # unknown name -> ConfigError with a suggestion
        for name in self.group_strategies.values():
            STRATEGIES.get(name)
        if self.min_clients > self.clients:
            raise ValueError(f"min_clients={self.min_clients} exceeds clients={self.clients}")
        if self.task_fractions is not None and self.client_tasks is not None:
            raise ValueError("give task_fractions or client_tasks, not both")
        if self.task_fractions is not None:
            total = sum(self.task_fractions.values())
            if any(v < 0 for v in self.task_fractions.values()) or abs(total - 1.0) > 1e-6:
                raise ValueError(f"task_fractions must be >= 0 and sum to 1, got {self.task_fractions}")
        if self.client_tasks is not None and len(self.client_tasks) != self.clients:
            raise ValueError(f"client_tasks lists {len(self.client_tasks)} clients, clients={self.clients}")
        bad = [r for r in self.test_at_rounds if not 1 <= r <= self.rounds]
        if bad:
            raise ValueError(f"test_at_rounds {bad}: each must be a round from 1 to rounds={self.rounds}")
        return self

    @field_validator("test_at_rounds")
    @classmethod
    def _sorted_rounds(cls, value: list[int]) -> list[int]:
        return sorted(set(value))

    def task_of_clients(self) -> list[Task]:
        """The task mix of each client, in client order.

        With fractions, counts are rounded by largest remainder and clients are assigned in the order
        understanding, generation, both (client-00 first).
        """
        if self.client_tasks is not None:
            return list(self.client_tasks)
        if self.task_fractions is None:
            return [self.tasks] * self.clients
        exact = {t: self.task_fractions[t] * self.clients for t in TASKS if t in self.task_fractions}
        counts = {t: int(v) for t, v in exact.items()}
        by_remainder = sorted(exact, key=lambda t: -(exact[t] - counts[t]))
        for t in by_remainder[: self.clients - sum(counts.values())]:
            counts[t] += 1
        return [t for t, n in counts.items() for _ in range(n)]


class GenEvalConfig(_Strict):
    """GenEval-style evaluation of generated images (built-in prompts and detector by default)."""

    enabled: bool = Field(default=False, description="score generation at every evaluation")
    metadata: Path | None = Field(default=None, description="GenEval metadata JSONL; null = built-in set")
    per_tag: int | None = Field(default=16, ge=1, description="prompts per tag (null = all)")
    images_per_prompt: int = Field(default=4, ge=1, le=64)
    guidance_scale: float = Field(default=3.0, ge=1.0)
    temperature: float = Field(default=1.0, ge=0.0)
    grid_prompts: int = Field(default=12, ge=0, description="prompts shown in each image-grid PNG")
    every: int = Field(default=1, ge=1, description="score every N rounds (the last round always)")
    held_out: bool = Field(
        default=False,
        description="also score the built-in prompts whose compositions occur in no training caption",
    )

    @model_validator(mode="after")
    def _held_out_builtin(self) -> GenEvalConfig:
        if self.held_out and self.metadata is not None:
            raise ValueError("held_out: the held-out-composition set is built from the built-in prompts")
        return self


class NvflareConfig(_Strict):
    """Settings of the NVIDIA FLARE engines (ignored by the in-process engine)."""

    workspace: Path | None = Field(default=None, description="FLARE workspace; null = RUN_DIR/nvflare")
    fl_port: int = Field(default=18002, ge=1024, le=65535, description="POC server port (loopback)")
    admin_port: int = Field(default=18003, ge=1024, le=65535, description="POC admin port (loopback)")
    round_timeout_s: float = Field(default=600.0, gt=0, description="a client slower than this is dropped")
    start_timeout_s: float = Field(default=180.0, gt=0, description="POC start-up and job submission limit")
    launch_external_process: bool = Field(default=True, description="client trainer in its own process")
    shared_backbone: bool = Field(
        default=True,
        description="simulator and local POC: one trainer process holds the backbone for every site; "
        "the sites' FLARE processes relay (false: each site loads its own)",
    )
    threads_per_site: int | None = Field(
        default=None, ge=1, description="torch threads of each site process; null = the cores / the sites"
    )
    task_poll_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description="how long a FLARE client waits after a result, or when the server has no task yet, "
        "before it asks again (FLARE's server.task_request_interval, whose default this is)",
    )
    quiet: bool = Field(default=True, description="only warnings from FLARE on the console")

    @model_validator(mode="after")
    def _ports(self) -> NvflareConfig:
        if self.fl_port == self.admin_port:
            raise ValueError(f"fl_port and admin_port must differ, both are {self.fl_port}")
        return self


# strategies that use client states only through their example-weighted mean (DP noise on the mean
# passes through them unchanged); quality_weighted weighs by client-reported scores, product_space
# averages products of individual factors
DP_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "ffa_lora")
# strategies whose aggregate is a weighted sum of the client deltas, which CKKS can compute encrypted
HE_STRATEGIES = ("fedavg", "fedprox")


class PrivacyConfig(_Strict):
    """Client-level differential privacy (DP-FedAvg) with a dp-accounting accountant."""

    enabled: bool = False
    noise_multiplier: float | None = Field(default=None, ge=0, description="z; or give target_epsilon")
    target_epsilon: float | None = Field(default=None, gt=0, description="choose z for federation.rounds")
    clip_norm: float = Field(default=1.0, gt=0, description="C, each client's delta norm bound (.inf = none)")
    delta: float = Field(default=1e-5, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self) -> PrivacyConfig:
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy: give exactly one of noise_multiplier and target_epsilon")
        return self


ADVERSARY_KINDS = ("sign_flip", "scale", "gaussian", "free_rider", "label_flip", "backdoor")


class AdversaryConfig(_Strict):
    """Simulated malicious clients (absent = none). docs/SECURITY.md lists what each kind sends."""

    clients: int | list[str] = Field(description="a count (chosen from the seed) or client names")
    kind: Literal["sign_flip", "scale", "gaussian", "free_rider", "label_flip", "backdoor"] = "sign_flip"
    strength: float = Field(
        default=1.0,
        allow_inf_nan=False,
        description="scale: delta x strength; gaussian: norm multiple; label_flip, backdoor: boost",
    )
    claimed_examples: int | None = Field(default=None, ge=1, description="the count it reports")
    target_answer: str = Field(default="purple", description="backdoor: the answer its trigger maps to")
    trigger_size: int = Field(default=8, ge=1, le=64, description="backdoor: trigger patch side (px)")
    poison_fraction: float = Field(
        default=0.5, gt=0, le=1, description="backdoor: share of its questions added with the trigger"
    )

    def chosen(self, names: list[str], seed: int) -> list[str]:
        """The adversarial clients among ``names`` (a count is drawn from the seed, deterministically)."""
        import numpy as np

        from fedumm.seeding import derive_seed

        if isinstance(self.clients, list):
            unknown = [c for c in self.clients if c not in names]
            if unknown:
                raise ConfigError(f"adversary.clients: unknown {unknown}; the clients: {', '.join(names)}")
            return sorted(self.clients)
        if self.clients > len(names):
            raise ConfigError(f"adversary.clients={self.clients} exceeds the {len(names)} clients")
        rng = np.random.default_rng(derive_seed(seed, "adversary"))
        return sorted(names[i] for i in rng.choice(len(names), size=self.clients, replace=False))


class BaselinesConfig(_Strict):
    zero_shot: bool = True
    centralized: bool = True


class Config(_Strict):
    """A whole run: data, model, LoRA, local training, federation, baselines, engine."""

    name: str = "run"
    seed: int = Field(default=0, ge=0)
    engine: Literal["inprocess", "nvflare-sim", "nvflare-poc"] = "inprocess"
    data: DataConfig
    model: ModelConfig = ModelConfig()
    lora: LoraConfigModel = LoraConfigModel()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    geneval: GenEvalConfig = GenEvalConfig()
    nvflare: NvflareConfig = NvflareConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    adversary: AdversaryConfig | None = None

    @model_validator(mode="after")
    def _trust_fits(self) -> Config:
        """Defences, DP and secure aggregation that cannot work together are refused here, by name."""
        fed = self.federation
        strategies = [fed.strategy, *fed.group_strategies.values()]
        refactors = fed.defense.rule in ("median", "trimmed_mean")  # multi-Krum only measures distances
        if fed.defense.space == "product" and refactors and "ffa_lora" in strategies:
            raise ValueError(
                "federation.defense.space=product refactors A and B, but ffa_lora keeps A frozen; "
                "use space: factors"
            )
        if self.privacy.enabled:
            bad = [s for s in strategies if s not in DP_STRATEGIES]
            if bad:
                raise ValueError(
                    f"privacy: strategy {bad[0]!r} does not aggregate through a weighted mean, so DP noise "
                    f"on the mean does not bound it; use one of {', '.join(DP_STRATEGIES)}"
                )
            if fed.defense.rule not in _MEAN_RULES:
                raise ValueError(
                    f"privacy: federation.defense.rule={fed.defense.rule!r} is not a mean; the DP "
                    "guarantee covers the clipped mean only (set rule: none)"
                )
            if fed.sampling == "poisson" and self.privacy.clip_norm == float("inf"):
                raise ValueError("privacy: Poisson sampling scales clipped deltas; give a finite clip_norm")
        if fed.secure_aggregation == "he":
            if self.engine != "nvflare-poc":
                raise ValueError(
                    "federation.secure_aggregation=he runs on engine nvflare-poc (the POC provisions the "
                    f"HE context), not {self.engine!r}"
                )
            bad = [s for s in strategies if s not in HE_STRATEGIES]
            if bad:
                raise ValueError(
                    f"federation.secure_aggregation=he: strategy {bad[0]!r} needs plaintext updates; "
                    f"use one of {', '.join(HE_STRATEGIES)}"
                )
            if fed.defense.rule not in _MEAN_RULES or fed.defense.norm_bound != "off":
                raise ValueError(
                    "federation.secure_aggregation=he: the server sees no delta in the clear, so "
                    "defense.rule and defense.norm_bound cannot run; set rule: none and norm_bound: off"
                )
            if self.privacy.enabled:
                raise ValueError("federation.secure_aggregation=he with privacy is not supported yet")
            if (fed.compression, fed.download_compression) != ("none", "none"):
                raise ValueError(
                    "federation.secure_aggregation=he encrypts fp32 deltas: set compression and "
                    "download_compression to none"
                )
        if self.adversary is not None:
            try:
                self.adversary.chosen(client_names_of(fed.clients), self.seed)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _family_fits(self) -> Config:
        """Towers and groups are the family's; every task some client trains must reach an adapter."""
        from fedumm.models import family_info

        info = family_info(self.model.family)
        try:
            info.check_groups(self.lora.groups)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        for g in self.federation.group_strategies:
            if g not in info.groups:
                raise ValueError(
                    f"federation.group_strategies: family {info.name!r} has no adapter group {g!r}; "
                    f"its groups: {', '.join(info.groups)}"
                )
        mixes = set(self.federation.task_of_clients())
        for task, mix in (("understanding", "understanding"), ("generation", "generation")):
            if mixes & {mix, "both"}:
                reach = info.task_towers.get(task, ())
                if not set(reach) & set(self.lora.groups):
                    raise ValueError(
                        f"{task} clients need LoRA on one of the {info.name} towers {list(reach)}, "
                        f"lora.groups is {list(self.lora.groups)}"
                    )
        return self


def client_names_of(k: int) -> list[str]:
    """Client names of a federation of ``k`` (the partition's names)."""
    from fedumm.data.partition import client_names

    return list(client_names(k))


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _submodel(ann: Any) -> type[BaseModel] | None:
    """The section model of a field annotation (``Section`` or ``Section | None``), else None."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    models = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _suggest(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """'did you mean' for an unknown key at ``loc`` (walks the schema)."""
    cur: type[BaseModel] | None = model
    for part in loc[:-1]:
        if cur is None or part not in cur.model_fields:
            return ""
        cur = _submodel(cur.model_fields[part].annotation)
    if cur is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), _field_names(cur), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_validation_error(
    exc: ValidationError, *, source: str, schema: type[BaseModel] | None = None, show_input: bool = True
) -> str:
    """One line per problem: 'source: a.b: message (got value)'; did-you-mean from ``schema``."""
    schema = schema or Config
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: {where}: unknown key{_suggest(schema, loc)}")
        elif err["type"] == "missing":
            lines.append(f"{source}: {where}: required key is missing")
        elif not loc:  # a check across sections names its keys itself; the input is the whole tree
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err.get('input')!r})" if show_input else ""
            lines.append(f"{source}: {where}: {msg}{got}")
    return "; ".join(lines)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--set {dotted!r}: empty key segment")
    cur = tree
    model: type[BaseModel] | None = Config
    for i, part in enumerate(parts):
        if model is not None and part not in model.model_fields:
            raise ConfigError(
                f"--set {dotted}: unknown key {'.'.join(parts[: i + 1])!r}"
                f"{_suggest(Config, tuple(parts[: i + 1]))}"
            )
        if i == len(parts) - 1:
            cur[part] = value
            return
        model = _submodel(model.model_fields[part].annotation) if model is not None else None
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])!r} is not a section")
        cur = nxt


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply 'a.b=value' overrides (YAML values) to a raw config dict, checked against the schema."""
    out = yaml.safe_load(yaml.safe_dump(tree)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. federation.rounds=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: cannot parse value ({exc})") from None
        _set_dotted(out, key.strip(), value)
    return out


def read_yaml_mapping(
    path: str | Path, what: str = "config file", *, error: type[FedummError] = ConfigError
) -> dict:
    """A YAML file whose top level is a mapping; a missing file or bad YAML is one ``error``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: {what} not found")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise error(f"{p}: top level must be a mapping, got {type(tree).__name__}")
    return tree


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, tree: dict | None = None
) -> Config:
    """Read YAML (or take ``tree``), apply overrides, validate; any problem is one ConfigError."""
    source = str(path) if path else "<config>"
    if tree is None:
        tree = read_yaml_mapping(path)  # type: ignore[arg-type]
    tree = apply_overrides(tree, list(overrides or []))
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source)) from None
    return cfg  # relative paths are relative to the working directory, like --out


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (saved beside every result)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
