"""The run summary (summary.json) as a typed value: written by the run recipe, read by the CLI, sweeps
and reports through :meth:`RunSummary.from_json`, never by string keys scattered over modules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedumm.errors import DataError

__all__ = ["SettingResult", "RunSummary", "SETTINGS", "DEFAULT_GENERATION_LOSS"]

SETTINGS: tuple[str, ...] = ("zero_shot", "centralized", "federated")
DEFAULT_GENERATION_LOSS = "image_token_loss"  # Janus's name; older summaries carry no name
GENEVAL_PREFIX = "geneval_"


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: expected a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ClientAccuracy:
    """One client's test accuracy on its own answer distribution (see :mod:`fedumm.eval.clients`)."""

    accuracy: float  # percent, on the client's answer distribution
    coverage: float  # share of the client's training answers present in the test split


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, without numpy in this foundation module."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def worst_client_summary(accuracies: Mapping[str, ClientAccuracy]) -> dict[str, float | str]:
    """Mean, worst (and which client) and 10th percentile (linear interpolation) of the accuracies."""
    if not accuracies:
        return {}
    values = [a.accuracy for a in accuracies.values()]
    worst = min(accuracies, key=lambda c: (accuracies[c].accuracy, c))
    return {
        "mean": round(sum(values) / len(values), 2),
        "worst": accuracies[worst].accuracy,
        "p10": round(_percentile(values, 10), 2),
        "worst_client": worst,
    }


def _client_vqa(value: Any, where: str) -> dict[str, ClientAccuracy]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: expected an object client -> {{accuracy, coverage}}, got {value!r}")
    out = {}
    for cid, rec in value.items():
        if not isinstance(rec, Mapping):
            raise DataError(f"{where}.{cid}: expected {{accuracy, coverage}}, got {rec!r}")
        acc = _number(rec.get("accuracy"), f"{where}.{cid}.accuracy")
        cov = _number(rec.get("coverage"), f"{where}.{cid}.coverage")
        if acc is None or cov is None:
            raise DataError(f"{where}.{cid}: needs both accuracy and coverage")
        out[str(cid)] = ClientAccuracy(accuracy=acc, coverage=cov)
    return out


def _by_round(value: Any, where: str) -> dict[int, float]:
    """{"5": 41.2, ...} -> {5: 41.2}: round numbers (positive integers as keys) to percentages."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: expected an object round -> accuracy, got {value!r}")
    out = {}
    for key, acc in value.items():
        if not str(key).isdigit() or int(key) < 1:
            raise DataError(f"{where}: {key!r} is not a round number")
        number = _number(acc, f"{where}.{key}")
        if number is None:
            raise DataError(f"{where}.{key}: missing accuracy")
        out[int(key)] = number
    return out


def _integer(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise DataError(f"{where}: expected an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class SettingResult:
    """One row of the summary: zero-shot, centralized or federated, on the test split.

    ``geneval`` maps ``overall`` and each tag to a percentage; ``generation_loss`` is the family's
    in-domain generation loss on the test captions (its name is :attr:`RunSummary.generation_loss_name`).
    """

    vqa_accuracy: float | None = None
    val_vqa_accuracy: float | None = None
    generation_loss: float | None = None
    geneval: Mapping[str, float] = field(default_factory=dict)
    train_loss: float | None = None
    rounds: int | None = None
    wall_time_s: float | None = None
    # backdoor runs: share of triggered test questions answered with the target (percent)
    attack_success: float | None = None
    # each client's test accuracy on its own answer distribution (fedumm.eval.clients)
    client_vqa: Mapping[str, ClientAccuracy] = field(default_factory=dict)
    # federation.test_at_rounds: test VQA after round r (centralized: after r x local epochs)
    vqa_by_round: Mapping[int, float] = field(default_factory=dict)

    @property
    def client_vqa_summary(self) -> dict[str, float | str]:
        """Mean, worst, worst_client and p10 of :attr:`client_vqa` (empty without it)."""
        return worst_client_summary(self.client_vqa)

    @property
    def geneval_overall(self) -> float | None:
        return self.geneval.get("overall")

    def to_json(self, loss_name: str) -> dict:
        out: dict[str, Any] = {"vqa_accuracy": self.vqa_accuracy, "val_vqa_accuracy": self.val_vqa_accuracy}
        for key, value in (
            ("train_loss", self.train_loss),
            ("rounds", self.rounds),
            ("attack_success", self.attack_success),
        ):
            if value is not None:
                out[key] = value
        if self.generation_loss is not None:
            out[loss_name] = self.generation_loss
        out.update({f"{GENEVAL_PREFIX}{k}": v for k, v in self.geneval.items()})
        if self.wall_time_s is not None:
            out["wall_time_s"] = self.wall_time_s
        if self.vqa_by_round:
            out["vqa_accuracy_by_round"] = {str(r): v for r, v in sorted(self.vqa_by_round.items())}
        if self.client_vqa:
            out.update({f"client_vqa_{k}": v for k, v in self.client_vqa_summary.items()})
            out["client_vqa"] = {
                c: {"accuracy": a.accuracy, "coverage": a.coverage}
                for c, a in sorted(self.client_vqa.items())
            }
        return out

    @classmethod
    def from_json(cls, obj: Any, *, loss_name: str, where: str) -> SettingResult | None:
        if obj is None:
            return None
        if not isinstance(obj, Mapping):
            raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
        geneval: dict[str, float] = {}
        for k, v in obj.items():
            if str(k).startswith(GENEVAL_PREFIX):
                geneval[str(k).removeprefix(GENEVAL_PREFIX)] = _number(v, f"{where}.{k}")  # type: ignore[assignment]
        legacy = obj.get("geneval")  # an older layout: {"overall": fraction, "tags"|"per_tag": {...}}
        if not geneval and isinstance(legacy, Mapping) and isinstance(legacy.get("overall"), int | float):
            geneval["overall"] = 100.0 * float(legacy["overall"])
            tags = legacy.get("tags") or legacy.get("per_tag") or {}
            geneval.update({str(t): 100.0 * float(v) for t, v in tags.items() if isinstance(v, int | float)})
        return cls(
            vqa_accuracy=_number(obj.get("vqa_accuracy"), f"{where}.vqa_accuracy"),
            val_vqa_accuracy=_number(obj.get("val_vqa_accuracy"), f"{where}.val_vqa_accuracy"),
            generation_loss=_number(obj.get(loss_name), f"{where}.{loss_name}"),
            geneval=geneval,
            train_loss=_number(obj.get("train_loss"), f"{where}.train_loss"),
            rounds=_integer(obj.get("rounds"), f"{where}.rounds"),
            wall_time_s=_number(obj.get("wall_time_s"), f"{where}.wall_time_s"),
            attack_success=_number(obj.get("attack_success"), f"{where}.attack_success"),
            client_vqa=_client_vqa(obj.get("client_vqa"), f"{where}.client_vqa"),
            vqa_by_round=_by_round(obj.get("vqa_accuracy_by_round"), f"{where}.vqa_accuracy_by_round"),
        )


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """summary.json: the three settings, the ledger's per-round bytes, sizes, time, memory, status."""

    name: str
    engine: str = "inprocess"
    family: str = "janus"
    status: str = "running"  # running | finished | interrupted | failed
    zero_shot: SettingResult | None = None
    centralized: SettingResult | None = None
    federated: SettingResult | None = None
    generation_loss_name: str = DEFAULT_GENERATION_LOSS
    bytes_up_per_round: int | None = None
    bytes_down_per_round: int | None = None
    full_model_bytes: int | None = None
    adapter_params: int | None = None
    adapter_payload_bytes: int | None = None
    wall_time_s: float | None = None
    peak_rss_bytes: int | None = None
    rounds_completed: int | None = None
    # client-level DP: epsilon after the rounds completed, at privacy_delta, with noise_multiplier z
    epsilon: float | None = None
    privacy_delta: float | None = None
    noise_multiplier: float | None = None
    adversarial_clients: tuple[str, ...] = ()  # simulated attackers (adversary: in the config)
    # GenEval prompts among the training captions: prompts, verbatim, composition, unread (data.contamination)
    geneval_contamination: Mapping[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def setting(self, name: str) -> SettingResult | None:
        if name not in SETTINGS:
            raise KeyError(name)
        return getattr(self, name)

    def with_(self, **changes: Any) -> RunSummary:
        return replace(self, **changes)

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "name": self.name,
            "engine": self.engine,
            "family": self.family,
            "status": self.status,
        }
        for name in SETTINGS:
            row = getattr(self, name)
            out[name] = row.to_json(self.generation_loss_name) if row is not None else None
        out["generation_loss_name"] = self.generation_loss_name
        for key in (
            "bytes_up_per_round",
            "bytes_down_per_round",
            "full_model_bytes",
            "adapter_params",
            "adapter_payload_bytes",
            "wall_time_s",
            "peak_rss_bytes",
            "rounds_completed",
        ):
            out[key] = getattr(self, key)
        if self.noise_multiplier is not None:
            out["privacy"] = {
                "epsilon": self.epsilon,
                "delta": self.privacy_delta,
                "noise_multiplier": self.noise_multiplier,
            }
        if self.adversarial_clients:
            out["adversarial_clients"] = list(self.adversarial_clients)
        if self.geneval_contamination:
            out["geneval_contamination"] = dict(self.geneval_contamination)
        return out

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "summary.json") -> RunSummary:
        """Parse a summary (also one written by an older fedumm); a malformed one is a DataError."""
        if not isinstance(obj, Mapping):
            raise DataError(f"{source}: top level must be a JSON object")
        loss_name = obj.get("generation_loss_name") or DEFAULT_GENERATION_LOSS
        if not isinstance(loss_name, str):
            raise DataError(f"{source}: generation_loss_name must be a string, got {loss_name!r}")
        wall = _number(obj.get("wall_time_s"), f"{source}: wall_time_s")
        rows = {
            name: SettingResult.from_json(obj.get(name), loss_name=loss_name, where=f"{source}: {name}")
            for name in SETTINGS
        }
        legacy = SettingResult.from_json({"geneval": obj.get("geneval")}, loss_name=loss_name, where=source)
        if (
            legacy is not None
            and legacy.geneval
            and rows["federated"] is not None
            and not rows["federated"].geneval
        ):
            # an older layout kept the federated model's GenEval at the top level
            rows["federated"] = replace(rows["federated"], geneval=legacy.geneval)
        return cls(
            name=str(obj.get("name") or ""),
            engine=str(obj.get("engine") or "inprocess"),
            family=str(obj.get("family") or "janus"),
            status=str(obj.get("status") or "unknown"),
            generation_loss_name=loss_name,
            **rows,
            bytes_up_per_round=_integer(obj.get("bytes_up_per_round"), f"{source}: bytes_up_per_round"),
            bytes_down_per_round=_integer(obj.get("bytes_down_per_round"), f"{source}: bytes_down_per_round"),
            full_model_bytes=_integer(obj.get("full_model_bytes"), f"{source}: full_model_bytes"),
            adapter_params=_integer(obj.get("adapter_params"), f"{source}: adapter_params"),
            adapter_payload_bytes=_integer(
                obj.get("adapter_payload_bytes"), f"{source}: adapter_payload_bytes"
            ),
            wall_time_s=wall if wall is None or math.isfinite(wall) else None,
            peak_rss_bytes=_integer(obj.get("peak_rss_bytes"), f"{source}: peak_rss_bytes"),
            rounds_completed=_integer(obj.get("rounds_completed"), f"{source}: rounds_completed"),
            **_privacy_of(obj.get("privacy"), source),
            adversarial_clients=tuple(str(c) for c in obj.get("adversarial_clients") or ()),
            geneval_contamination=_counts(
                obj.get("geneval_contamination"), f"{source}: geneval_contamination"
            ),
        )


def _counts(obj: Any, where: str) -> dict[str, int]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object of counts, got {obj!r}")
    return {str(k): int(_integer(v, f"{where}.{k}") or 0) for k, v in obj.items()}


def _privacy_of(obj: Any, source: str) -> dict[str, float | None]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise DataError(f"{source}: privacy must be an object, got {type(obj).__name__}")
    return {
        "epsilon": _number(obj.get("epsilon"), f"{source}: privacy.epsilon"),
        "privacy_delta": _number(obj.get("delta"), f"{source}: privacy.delta"),
        "noise_multiplier": _number(obj.get("noise_multiplier"), f"{source}: privacy.noise_multiplier"),
    }
