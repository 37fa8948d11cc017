"""Loader for any dataset in the VQA v2 file format: the synthetic world or real VQA v2 over COCO.

Every malformed input raises a single :class:`~fedumm.errors.DataError` whose message names the
file and the record at fault.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from fedumm.errors import DataError
from fedumm.io import read_json_object

__all__ = [
    "DEFAULT_IMAGE_NAME_PATTERN",
    "VQASample",
    "canonical_answer",
    "load_image",
    "load_split",
    "load_vqa",
    "majority_answer",
    "split_paths",
]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_NAME_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_WORD_TO_DIGIT = {word: str(i) for i, word in enumerate(_NUMBER_WORDS)}
_QUESTION_FIELDS: Mapping[str, type] = {"image_id": int, "question": str, "question_id": int}
_ANNOTATION_FIELDS: Mapping[str, type] = {
    "question_id": int,
    "image_id": int,
    "answers": list,
    "multiple_choice_answer": str,
    "answer_type": str,
    "question_type": str,
}


@dataclass(frozen=True, kw_only=True)
class VQASample:
    """One question with its image path and its annotators' answers."""

    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: tuple[str, ...]
    multiple_choice_answer: str
    answer_type: str
    question_type: str


def canonical_answer(raw: str) -> str:
    """Normalise an answer: lowercase, strip, drop end punctuation, number words to digits."""
    text = raw.strip().lower().rstrip(".!?,").strip()
    return _WORD_TO_DIGIT.get(text, text)


def majority_answer(answers: Sequence[str]) -> str:
    """Most frequent canonical answer; ties go to the earliest one."""
    if not answers:
        raise ValueError("no answers")
    return Counter(canonical_answer(a) for a in answers).most_common(1)[0][0]


def _top_level(doc: Mapping[str, Any], key: str, kind: type, path: Path) -> Any:
    if key not in doc:
        raise DataError(f"{path}: missing top-level key {key!r}")
    if not isinstance(doc[key], kind):
        got = type(doc[key]).__name__
        raise DataError(f"{path}: top-level key {key!r} must be {kind.__name__}, got {got}")
    return doc[key]


def _describe(path: Path, section: str, index: int, record: Any) -> str:
    qid = record.get("question_id") if isinstance(record, dict) else None
    suffix = f" (question_id={qid})" if isinstance(qid, int) and not isinstance(qid, bool) else ""
    return f"{path}: {section}[{index}]{suffix}"


def _check_fields(record: Any, fields: Mapping[str, type], where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    for key, kind in fields.items():
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__}")


def _parse_questions(records: list[Any], path: Path) -> dict[int, dict[str, Any]]:
    by_id: dict[int, dict[str, Any]] = {}
    first_index: dict[int, int] = {}
    for index, record in enumerate(records):
        where = _describe(path, "questions", index, record)
        _check_fields(record, _QUESTION_FIELDS, where)
        qid = record["question_id"]
        if qid in by_id:
            raise DataError(f"{where}: duplicate question_id {qid} (first at questions[{first_index[qid]}])")
        by_id[qid] = record
        first_index[qid] = index
    return by_id


def _answers(record: dict[str, Any], where: str) -> tuple[str, ...]:
    raw = record["answers"]
    if not raw:
        raise DataError(f"{where}: empty answers list")
    answers = []
    for j, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("answer"), str):
            raise DataError(f"{where}: answers[{j}] must be an object with a string 'answer'")
        answers.append(item["answer"])
    return tuple(answers)


def _parse_annotations(
    records: list[Any], path: Path, questions: Mapping[int, dict[str, Any]], questions_path: Path
) -> dict[int, tuple[dict[str, Any], tuple[str, ...]]]:
    by_id: dict[int, tuple[dict[str, Any], tuple[str, ...]]] = {}
    for index, record in enumerate(records):
        where = _describe(path, "annotations", index, record)
        _check_fields(record, _ANNOTATION_FIELDS, where)
        qid = record["question_id"]
        if qid not in questions:
            raise DataError(f"{where}: question_id {qid} is absent from {questions_path}")
        if qid in by_id:
            raise DataError(f"{where}: duplicate annotation for question_id {qid}")
        if record["image_id"] != questions[qid]["image_id"]:
            raise DataError(
                f"{where}: image_id {record['image_id']} differs from the question's image_id "
                f"{questions[qid]['image_id']} in {questions_path}"
            )
        by_id[qid] = (record, _answers(record, where))
    return by_id


def _image_namer(pattern: str, data_subtype: str) -> Callable[[int], str]:
    try:
        pattern.format(data_subtype=data_subtype, image_id=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"image_name_pattern {pattern!r} may only use the fields {{data_subtype}} and {{image_id}}"
        ) from exc
    return lambda image_id: pattern.format(data_subtype=data_subtype, image_id=image_id)


def load_vqa(
    questions_path: Path,
    annotations_path: Path,
    image_dir: Path,
    *,
    image_name_pattern: str | None = None,
    check_images: bool = True,
) -> list[VQASample]:
    """Load a VQA v2 questions/annotations pair into samples ordered as the questions file.

    Image file names follow ``image_name_pattern`` (default COCO naming from the questions file's
    ``data_subtype``); with ``check_images`` each image file must exist (it is not decoded).
    """
    questions_path, annotations_path = Path(questions_path), Path(annotations_path)
    qdoc = read_json_object(questions_path)
    adoc = read_json_object(annotations_path)
    data_subtype = _top_level(qdoc, "data_subtype", str, questions_path)
    questions = _parse_questions(_top_level(qdoc, "questions", list, questions_path), questions_path)
    annotations = _parse_annotations(
        _top_level(adoc, "annotations", list, annotations_path), annotations_path, questions, questions_path
    )
    unanswered = [qid for qid in questions if qid not in annotations]
    if unanswered:
        raise DataError(
            f"{questions_path}: question_id {unanswered[0]} has no annotation in {annotations_path} "
            f"({len(unanswered)} question(s) without annotation)"
        )
    name_of = _image_namer(image_name_pattern or DEFAULT_IMAGE_NAME_PATTERN, data_subtype)
    checked: set[int] = set()
    samples = []
    for qid, question in questions.items():
        image_id = question["image_id"]
        image_path = Path(image_dir) / name_of(image_id)
        if check_images and image_id not in checked:
            if not image_path.is_file():
                raise DataError(
                    f"{image_path}: image file not found (needed by question_id {qid} in {questions_path})"
                )
            checked.add(image_id)
        record, answers = annotations[qid]
        samples.append(
            VQASample(
                question_id=qid,
                image_id=image_id,
                image_path=image_path,
                question=question["question"],
                answers=answers,
                multiple_choice_answer=record["multiple_choice_answer"],
                answer_type=record["answer_type"],
                question_type=record["question_type"],
            )
        )
    logger.debug("loaded %d VQA samples from %s", len(samples), questions_path)
    return samples


def split_paths(data_dir: Path, split: str) -> tuple[Path, Path, Path]:
    """Questions file, annotations file and image folder of a split under VQA v2 naming.

    Images are looked for in ``images/{split}/`` then ``{split}/``; the first that exists wins
    (the first when neither does).
    """
    data_dir = Path(data_dir)
    candidates = (data_dir / "images" / split, data_dir / split)
    image_dir = next((c for c in candidates if c.is_dir()), candidates[0])
    return (
        data_dir / f"v2_OpenEnded_mscoco_{split}_questions.json",
        data_dir / f"v2_mscoco_{split}_annotations.json",
        image_dir,
    )


def load_split(data_dir: Path, split: str, *, check_images: bool = True) -> list[VQASample]:
    """Load split ``split`` of a VQA v2-format dataset rooted at ``data_dir``."""
    questions_path, annotations_path, image_dir = split_paths(data_dir, split)
    return load_vqa(questions_path, annotations_path, image_dir, check_images=check_images)


def load_image(path: Path) -> Image.Image:
    """Decode an image file into RGB, raising :class:`DataError` naming the file if it cannot."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image: {exc}") from exc
