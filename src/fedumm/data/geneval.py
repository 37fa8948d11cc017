"""Reader and writer of GenEval prompt metadata (``evaluation_metadata.jsonl``).

GenEval is the object-focused text-to-image benchmark of Ghosh et al. 2023,
"GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment"
(arXiv:2310.11513); its reference code is https://github.com/djghosh13/geneval.

The metadata file holds one JSON object per line, for example::

    {"tag": "position", "include": [{"class": "kite", "count": 1},
     {"class": "dog", "count": 1, "position": ["above", 0]}], "prompt": "a photo of a dog above a kite"}
    {"tag": "counting", "include": [{"class": "clock", "count": 2}],
     "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}

``include`` entries must all hold (at least ``count`` objects of ``class``, optionally
of a colour and at a position relative to an earlier include entry); ``exclude`` entries
fail the image when ``count`` or more objects of ``class`` are found. A prompt's index is
its 0-based line number, which is how generated images refer back to their prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedumm.errors import DataError
from fedumm.io import atomic_write_text

__all__ = [
    "COLORS",
    "RELATIONS",
    "TAGS",
    "GenEvalPrompt",
    "Requirement",
    "dump_metadata",
    "load_metadata",
    "read_jsonl_lines",
]

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""The six GenEval tasks, in the order the reference metadata lists them."""

COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
"""The colour vocabulary of GenEval, in its reference order (used in reason strings)."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""The relative positions GenEval can require, in its reference order."""

_PROMPT_KEYS = frozenset({"tag", "include", "exclude", "prompt"})
_REQUIREMENT_KEYS = frozenset({"class", "count", "color", "position"})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class Requirement:
    """One include or exclude clause: ``count`` objects of class ``cls``, optionally coloured or placed.

    ``position`` is ``(relation, reference)`` where ``reference`` is the index of an earlier
    include entry of the same prompt, as in the metadata's ``["left of", 0]`` form.
    """

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cls, str) or not self.cls.strip():
            raise ValueError(f"class must be a non-empty string, got {self.cls!r}")
        if not _is_int(self.count) or self.count < 1:
            raise ValueError(f"count must be a positive integer, got {self.count!r}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color must be one of {', '.join(COLORS)}, got {self.color!r}")
        if self.position is not None:
            position = self.position
            if not isinstance(position, (tuple, list)) or len(position) != 2:
                raise ValueError(f"position must be [relation, include index], got {position!r}")
            relation, reference = position
            if relation not in RELATIONS:
                raise ValueError(f"position relation must be one of {', '.join(RELATIONS)}, got {relation!r}")
            if not _is_int(reference) or reference < 0:
                raise ValueError(f"position reference must be a non-negative integer, got {reference!r}")
            object.__setattr__(self, "position", (relation, reference))


@dataclass(frozen=True, kw_only=True)
class GenEvalPrompt:
    """One GenEval prompt: its line index, task tag, text, and include/exclude clauses."""

    index: int
    tag: str
    prompt: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.index) or self.index < 0:
            raise ValueError(f"index must be a non-negative integer, got {self.index!r}")
        if self.tag not in TAGS:
            raise ValueError(f"tag must be one of {', '.join(TAGS)}, got {self.tag!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.include:
            raise ValueError("include must list at least one requirement")
        for where, clauses in (("include", self.include), ("exclude", self.exclude)):
            for j, req in enumerate(clauses):
                if not isinstance(req, Requirement):
                    raise ValueError(f"{where}[{j}] must be a Requirement, got {type(req).__name__}")
        for j, req in enumerate(self.include):
            if req.position is not None and req.position[1] >= j:
                raise ValueError(
                    f"include[{j}].position refers to include entry {req.position[1]}; "
                    f"it must refer to an earlier entry (0..{j - 1})"
                )
        for j, req in enumerate(self.exclude):
            if req.color is not None or req.position is not None:
                raise ValueError(f"exclude[{j}] may only give class and count, not color or position")


def read_jsonl_lines(path: str | os.PathLike[str], what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each line of a JSONL file, 1-based, raising DataError on bad lines.

    Every line must be a JSON object; blank lines are errors because line positions carry meaning.
    ``what`` names the kind of file in the errors (for example ``"GenEval metadata"``).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read {what} file: {exc}") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            raise DataError(f"{path}:{number}: blank line in {what} file (every line must be a JSON object)")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: invalid JSON in {what} file: {exc.msg} (column {exc.colno})"
            ) from exc
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{number}: {what} line must be a JSON object, got {type(record).__name__}"
            )
        yield number, record


def _parse_requirement(raw: object, where: str) -> Requirement:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _REQUIREMENT_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}")
    for key in ("class", "count"):
        if key not in raw:
            raise ValueError(f"{where} is missing {key!r}")
    position = raw.get("position")
    if position is not None and not (isinstance(position, list) and len(position) == 2):
        raise ValueError(
            f"{where}.position must be a two-element list [relation, include index], got {position!r}"
        )
    try:
        return Requirement(
            cls=raw["class"],
            count=raw["count"],
            color=raw.get("color"),
            position=None if position is None else (position[0], position[1]),
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _parse_prompt(index: int, record: dict[str, Any]) -> GenEvalPrompt:
    unknown = sorted(set(record) - _PROMPT_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}")
    for key in ("tag", "include", "prompt"):
        if key not in record:
            raise ValueError(f"missing {key!r}")
    clauses: dict[str, tuple[Requirement, ...]] = {}
    for key in ("include", "exclude"):
        raw = record.get(key, [])
        if not isinstance(raw, list):
            raise ValueError(f"{key} must be a list, got {type(raw).__name__}")
        clauses[key] = tuple(_parse_requirement(item, f"{key}[{j}]") for j, item in enumerate(raw))
    return GenEvalPrompt(
        index=index,
        tag=record["tag"],
        prompt=record["prompt"],
        include=clauses["include"],
        exclude=clauses["exclude"],
    )


def load_metadata(path: str | os.PathLike[str]) -> list[GenEvalPrompt]:
    """Read and validate a GenEval metadata JSONL file; a prompt's index is its 0-based line number.

    Raises DataError naming ``file:line`` (1-based) and the problem for the first bad line.
    """
    prompts: list[GenEvalPrompt] = []
    for number, record in read_jsonl_lines(path, "GenEval metadata"):
        try:
            prompts.append(_parse_prompt(number - 1, record))
        except ValueError as exc:
            raise DataError(f"{path}:{number}: {exc}") from exc
    if not prompts:
        raise DataError(f"{path}: GenEval metadata file has no prompts")
    return prompts


def _requirement_record(req: Requirement) -> dict[str, Any]:
    record: dict[str, Any] = {"class": req.cls, "count": req.count}
    if req.color is not None:
        record["color"] = req.color
    if req.position is not None:
        record["position"] = [req.position[0], req.position[1]]
    return record


def _prompt_record(prompt: GenEvalPrompt) -> dict[str, Any]:
    record: dict[str, Any] = {"tag": prompt.tag, "include": [_requirement_record(r) for r in prompt.include]}
    if prompt.exclude:
        record["exclude"] = [_requirement_record(r) for r in prompt.exclude]
    record["prompt"] = prompt.prompt
    return record


def dump_metadata(prompts: Iterable[GenEvalPrompt], path: str | os.PathLike[str]) -> None:
    """Write prompts as a GenEval metadata JSONL file, atomically (temporary file, then rename).

    The key order and spacing follow the reference file, so loading and dumping it reproduces it
    byte for byte. Indices are line numbers in this format, so the prompts must be numbered
    ``0..n-1`` in order; anything else raises DataError.
    """
    target = Path(path)
    lines: list[str] = []
    for position, prompt in enumerate(prompts):
        if prompt.index != position:
            raise DataError(
                f"{target}: prompt at position {position} has index {prompt.index}; GenEval indices are "
                "line numbers, so prompts must be numbered 0..n-1 in order"
            )
        lines.append(json.dumps(_prompt_record(prompt)) + "\n")
    atomic_write_text(target, "".join(lines))
