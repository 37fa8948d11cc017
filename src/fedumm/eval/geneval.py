"""GenEval judging of generated images from object detections, and the GenEval summary scores.

GenEval is the object-focused text-to-image benchmark of Ghosh et al. 2023,
"GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment"
(arXiv:2310.11513); its reference code is https://github.com/djghosh13/geneval
(``evaluation/evaluate_images.py`` judges one image, ``evaluation/summary_scores.py``
aggregates). This module reimplements those rules on detections supplied as input:

* Per class, detections are ordered by descending score (ties: later detection first, as the
  reference's ascending argsort reversed), kept only if ``score > 0.3`` (``> 0.9`` for every
  class when the prompt's tag is ``counting``), and truncated to the 16 most confident. An
  optional greedy suppression (``max_overlap`` < 1) mirrors the reference's, which is off by
  default.
* An include clause takes the ``count`` most confident kept objects of its class and needs
  at least ``count`` of them (so include means ">= count"; the exact count of counting prompts
  comes from their exclude clause ``count + 1``). Its colour, then its position, is checked
  only on those objects, and only while the clause still holds.
* Colour: the reference classifies each object crop with a zero-shot image-text model; here each
  detection carries that classification as its ``color`` field, an input of this module. At
  least ``count`` of the chosen objects must have the required colour.
* Position: every chosen object must stand in the required relation to every chosen object of
  the referenced include clause (see :func:`relative_position`); if that clause failed, the
  position clause fails with "no target".
* An exclude clause fails when ``count`` or more kept objects of its class are found.
* The summary scores each tag as the mean correctness over its images (every image counts, not
  every prompt), and ``overall`` as the unweighted mean of the tag scores. All scores are
  fractions in [0, 1], as the reference summary computes them (it prints them as percentages).

Arithmetic on scores and boxes is done in single precision, as the reference does on the
detector's float32 output, so threshold and margin edges fall where they fall there.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedumm.data.geneval import COLORS, GenEvalPrompt, load_metadata, read_jsonl_lines
from fedumm.errors import DataError

__all__ = [
    "DEFAULT_JUDGE_CONFIG",
    "Detection",
    "JudgeConfig",
    "evaluate",
    "evaluate_files",
    "judge",
    "load_detections",
    "relative_position",
    "summarize",
]

_DETECTION_LINE_KEYS = frozenset({"index", "detections"})
_DETECTION_KEYS = frozenset({"class", "box", "score", "color"})
_F32 = np.float32


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True, kw_only=True)
class Detection:
    """One detected object: class name, box ``(x1, y1, x2, y2)`` in pixels, confidence and colour.

    ``color`` is the colour classification of the object (one of GenEval's ten colours) made
    outside this module, or None when none was made; None never satisfies a colour clause.
    """

    cls: str
    box: tuple[float, float, float, float]
    score: float
    color: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cls, str) or not self.cls.strip():
            raise ValueError(f"class must be a non-empty string, got {self.cls!r}")
        box = self.box
        if (
            not isinstance(box, (tuple, list))
            or len(box) != 4
            or not all(_is_real(v) and math.isfinite(v) for v in box)
        ):
            raise ValueError(f"box must be four finite numbers [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box must satisfy x1 <= x2 and y1 <= y2, got {list(box)!r}")
        object.__setattr__(self, "box", (x1, y1, x2, y2))
        if not _is_real(self.score) or not math.isfinite(self.score) or not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be a number in [0, 1], got {self.score!r}")
        object.__setattr__(self, "score", float(self.score))
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color must be null or one of {', '.join(COLORS)}, got {self.color!r}")


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """The judging constants; the defaults are the reference's defaults."""

    threshold: float = 0.3
    """Keep a detection when its score is strictly above this (tags other than counting)."""
    counting_threshold: float = 0.9
    """Keep a detection when its score is strictly above this (tag ``counting``)."""
    max_objects: int = 16
    """Keep at most this many detections per class, the most confident first."""
    max_overlap: float = 1.0
    """Drop a detection whose IoU with a more confident kept one of its class reaches this; 1 turns it off."""
    position_margin: float = 0.1
    """Fraction of the two objects' summed width (height) discounted from their centre offset."""

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if (
            not isinstance(self.max_objects, int)
            or isinstance(self.max_objects, bool)
            or self.max_objects < 1
        ):
            raise ValueError(f"max_objects must be a positive integer, got {self.max_objects!r}")
        if not _is_real(self.max_overlap) or not 0.0 < self.max_overlap <= 1.0:
            raise ValueError(f"max_overlap must be a number in (0, 1], got {self.max_overlap!r}")
        if not _is_real(self.position_margin) or not 0.0 <= self.position_margin < 0.5:
            raise ValueError(f"position_margin must be a number in [0, 0.5), got {self.position_margin!r}")


DEFAULT_JUDGE_CONFIG = JudgeConfig()


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], *, margin: float = 0.1
) -> tuple[str, ...]:
    """Return the relations of box A to box B ("left of", "right of", "above", "below"), in that order.

    With centres ``c`` and sizes ``(w, h)``, the centre offset ``o = c_a - c_b`` is shrunk towards
    zero per axis by ``margin * (size_a + size_b)`` (clamped at zero); if both shrunk components are
    below 1e-3 there is no relation. Otherwise each shrunk component is divided by the length of the
    unshrunk offset ``|o|``: below -0.5 on x is "left of", above 0.5 "right of", below -0.5 on y is
    "above", above 0.5 "below" (image y grows downwards). For a purely horizontal offset this needs
    ``|o| > 2 * margin * (w_a + w_b)``. Computed in float32 like the reference.
    """
    ax1, ay1, ax2, ay2 = (_F32(v) for v in box_a)
    bx1, by1, bx2, by2 = (_F32(v) for v in box_b)
    two = _F32(2)
    offset_x = (ax1 + ax2) / two - (bx1 + bx2) / two
    offset_y = (ay1 + ay2) / two - (by1 + by2) / two
    span_x = abs(ax2 - ax1) + abs(bx2 - bx1)
    span_y = abs(ay2 - ay1) + abs(by2 - by1)
    m = _F32(margin)
    shrunk_x = max(abs(offset_x) - m * span_x, _F32(0)) * np.sign(offset_x)
    shrunk_y = max(abs(offset_y) - m * span_y, _F32(0)) * np.sign(offset_y)
    tiny = _F32(1e-3)
    if abs(shrunk_x) < tiny and abs(shrunk_y) < tiny:
        return ()
    length = np.sqrt(offset_x * offset_x + offset_y * offset_y)
    dx, dy = shrunk_x / length, shrunk_y / length
    found: list[str] = []
    if dx < -0.5:
        found.append("left of")
    if dx > 0.5:
        found.append("right of")
    if dy < -0.5:
        found.append("above")
    if dy > 0.5:
        found.append("below")
    return tuple(found)


def _iou(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> float:
    """IoU with the reference's inclusive-pixel convention (each side length is ``x2 - x1 + 1``)."""
    a = [_F32(v) for v in box_a]
    b = [_F32(v) for v in box_b]
    one, zero = _F32(1), _F32(0)

    def area(x1: Any, y1: Any, x2: Any, y2: Any) -> Any:
        return max(x2 - x1 + one, zero) * max(y2 - y1 + one, zero)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return float(inter / union) if union else 0.0


def _kept_objects(
    tag: str, detections: Sequence[Detection], config: JudgeConfig
) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval keeps, most confident first."""
    threshold = _F32(config.counting_threshold if tag == "counting" else config.threshold)
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if not isinstance(det, Detection):
            raise TypeError(f"detections must be Detection objects, got {type(det).__name__}")
        by_class.setdefault(det.cls, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for cls, dets in by_class.items():
        scores = [_F32(d.score) for d in dets]
        ascending = sorted(range(len(dets)), key=scores.__getitem__)  # stable, like argsort on few items
        order = [i for i in reversed(ascending) if scores[i] > threshold][: config.max_objects]
        chosen: list[Detection] = []
        while order:
            best = order.pop(0)
            chosen.append(dets[best])
            if config.max_overlap < 1.0:
                order = [i for i in order if _iou(dets[best].box, dets[i].box) < config.max_overlap]
        if chosen:
            kept[cls] = chosen
    return kept


def _position_failure(
    objects: Sequence[Detection], targets: Sequence[Detection], relation: str, margin: float
) -> tuple[str, ...] | None:
    """The relations found for the first (object, target) pair lacking ``relation``, or None if all hold."""
    for obj in objects:
        for target in targets:
            found = relative_position(obj.box, target.box, margin=margin)
            if relation not in found:
                return found
    return None


def judge(
    prompt: GenEvalPrompt,
    detections: Sequence[Detection],
    *,
    config: JudgeConfig = DEFAULT_JUDGE_CONFIG,
) -> tuple[bool, str]:
    """Judge one generated image of ``prompt`` from its detections; return ``(correct, reason)``.

    ``reason`` joins one line per failed clause with newlines and is empty when the image is
    correct. The lines have the reference's wording:

    * ``expected {class}>={count}, found {n}``
    * ``expected {color} {class}>={count}, found {n} {color}; and {k} {c1}, {k2} {c2}...``
      (colours of the chosen objects, in GenEval's colour order)
    * ``no target for {class} to be {relation}``
    * ``expected {class} {relation} target, found {relations joined by ' and '} target``
      (relations in the order left of, right of, above, below; the reference joins an
      unordered set, so its order can vary)
    * ``expected {class}<{count}, found {n}``
    """
    if not isinstance(prompt, GenEvalPrompt):
        raise TypeError(f"prompt must be a GenEvalPrompt, got {type(prompt).__name__}")
    objects = _kept_objects(prompt.tag, detections, config)
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in prompt.include:
        chosen = objects.get(req.cls, [])[: req.count]
        holds = True
        if len(chosen) < req.count:
            holds = False
            reasons.append(f"expected {req.cls}>={req.count}, found {len(chosen)}")
        else:
            if req.color is not None:
                colors = [det.color for det in chosen]
                matching = colors.count(req.color)
                if matching < req.count:
                    holds = False
                    tally = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(
                        f"expected {req.color} {req.cls}>={req.count}, "
                        f"found {matching} {req.color}; and {tally}"
                    )
            if req.position is not None and holds:
                relation, reference = req.position
                targets = groups[reference]
                if targets is None:
                    holds = False
                    reasons.append(f"no target for {req.cls} to be {relation}")
                else:
                    found = _position_failure(chosen, targets, relation, config.position_margin)
                    if found is not None:
                        holds = False
                        reasons.append(
                            f"expected {req.cls} {relation} target, found {' and '.join(found)} target"
                        )
        correct = correct and holds
        groups.append(chosen if holds else None)
    for req in prompt.exclude:
        present = len(objects.get(req.cls, []))
        if present >= req.count:
            correct = False
            reasons.append(f"expected {req.cls}<{req.count}, found {present}")
    return correct, "\n".join(reasons)


def _parse_detection(raw: object, where: str) -> Detection:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _DETECTION_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")
    for key in ("class", "box", "score"):
        if key not in raw:
            raise ValueError(f"{where} is missing {key!r}")
    try:
        return Detection(cls=raw["class"], box=raw["box"], score=raw["score"], color=raw.get("color"))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _read_detection_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, list[Detection]]]:
    """Yield ``(line_number, prompt_index, detections)`` per line of a detections file."""
    for number, record in read_jsonl_lines(path, "GenEval detections"):
        try:
            unknown = sorted(set(record) - _DETECTION_LINE_KEYS)
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}")
            for key in ("index", "detections"):
                if key not in record:
                    raise ValueError(f"missing {key!r}")
            index = record["index"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError(f"index must be a non-negative integer, got {index!r}")
            raw = record["detections"]
            if not isinstance(raw, list):
                raise ValueError(f"detections must be a list, got {type(raw).__name__}")
            detections = [_parse_detection(item, f"detections[{j}]") for j, item in enumerate(raw)]
        except ValueError as exc:
            raise DataError(f"{path}:{number}: {exc}") from exc
        yield number, index, detections


def load_detections(path: str | os.PathLike[str]) -> dict[int, list[list[Detection]]]:
    """Read a detections JSONL file into ``{prompt index: [detections of image 1, of image 2, ...]}``.

    Each line is ``{"index": int, "detections": [{"class": str, "box": [x1, y1, x2, y2],
    "score": float, "color": str | null}, ...]}`` and describes one generated image; several lines
    may share an index (several images of one prompt) and stay separate images, in file order.
    ``color`` may be omitted (None). Raises DataError naming ``file:line`` for a bad line.
    """
    grouped: dict[int, list[list[Detection]]] = {}
    for _number, index, detections in _read_detection_lines(path):
        grouped.setdefault(index, []).append(detections)
    return grouped


def summarize(images: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Return ``{"tags": {tag: score}, "overall": score}`` from per-image ``tag``/``correct`` records.

    A tag's score is the fraction of its images judged correct (images, not prompts, are averaged,
    so a prompt with more images weighs more); ``overall`` is the unweighted mean over the tags that
    have images. Tags appear in order of first appearance. Scores are fractions in [0, 1].
    """
    totals: dict[str, list[int]] = {}
    for image in images:
        counts = totals.setdefault(image["tag"], [0, 0])
        counts[0] += bool(image["correct"])
        counts[1] += 1
    if not totals:
        raise DataError("no images to summarize")
    tags = {tag: correct / count for tag, (correct, count) in totals.items()}
    return {"tags": tags, "overall": sum(tags.values()) / len(tags)}


def evaluate(
    prompts: Sequence[GenEvalPrompt],
    detections_by_index: Mapping[int, Sequence[Sequence[Detection]]],
    *,
    config: JudgeConfig = DEFAULT_JUDGE_CONFIG,
) -> dict[str, Any]:
    """Judge every image and summarise: ``{"images": [...], "tags": {tag: score}, "overall": score}``.

    ``detections_by_index`` maps a prompt index to one detection list per generated image (as
    :func:`load_detections` returns). ``images`` holds ``{"index", "tag", "correct", "reason"}`` per
    image, ordered by prompt index then input order; prompts without images are not scored, as in
    the reference. Scores are fractions in [0, 1]: per tag the mean correctness over its images,
    overall the unweighted mean of the tag scores (see :func:`summarize`).
    """
    by_index: dict[int, GenEvalPrompt] = {}
    for prompt in prompts:
        if prompt.index in by_index:
            raise DataError(f"two prompts share index {prompt.index}")
        by_index[prompt.index] = prompt
    images: list[dict[str, Any]] = []
    for index in sorted(detections_by_index):
        prompt = by_index.get(index)
        if prompt is None:
            raise DataError(f"detections refer to prompt index {index}, which the metadata does not have")
        per_image = detections_by_index[index]
        if isinstance(per_image, Detection) or any(isinstance(item, Detection) for item in per_image):
            raise TypeError(
                f"detections_by_index[{index}] must be a list of images, each a list of Detection objects"
            )
        for detections in per_image:
            correct, reason = judge(prompt, detections, config=config)
            images.append({"index": index, "tag": prompt.tag, "correct": correct, "reason": reason})
    if not images:
        raise DataError("no images to evaluate: the detections are empty")
    return {"images": images, **summarize(images)}


def evaluate_files(
    metadata_path: str | os.PathLike[str],
    detections_path: str | os.PathLike[str],
    *,
    config: JudgeConfig = DEFAULT_JUDGE_CONFIG,
) -> dict[str, Any]:
    """Load a GenEval metadata file and a detections file and :func:`evaluate` them."""
    prompts = load_metadata(metadata_path)
    grouped: dict[int, list[list[Detection]]] = {}
    for number, index, detections in _read_detection_lines(detections_path):
        if index >= len(prompts):
            raise DataError(
                f"{detections_path}:{number}: index {index} is out of range for {metadata_path} "
                f"({len(prompts)} prompts, indices 0..{len(prompts) - 1})"
            )
        grouped.setdefault(index, []).append(detections)
    if not grouped:
        raise DataError(f"{detections_path}: no detection lines, so no images to evaluate")
    return evaluate(prompts, grouped, config=config)
