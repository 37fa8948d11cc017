"""Caption-to-image pairs (generation training data) from COCO-format ``captions_{split}.json`` files.

A COCO captions file may hold several captions per image (COCO itself has five); each caption is one
training example. Every malformed input raises one :class:`~fedumm.errors.DataError` naming the file
and the record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedumm.data.render import SHAPES
from fedumm.errors import DataError

__all__ = ["CaptionSample", "load_captions", "caption_class", "captions_by_image"]


@dataclass(frozen=True, kw_only=True)
class CaptionSample:
    """One caption of one image."""

    caption_id: int
    image_id: int
    image_path: Path
    caption: str


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where} must be an integer, got {value!r}")
    return value


def load_captions(data_dir: str | Path, split: str) -> list[CaptionSample]:
    """All captions of ``split``, in annotation order; images live in ``images/{split}/``."""
    root = Path(data_dir)
    path = root / f"captions_{split}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: captions file not found (generation needs COCO-format captions)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read JSON ({exc})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{path}: expected a COCO captions object with 'images' and 'annotations' lists")
    files: dict[int, str] = {}
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict):
            raise DataError(f"{where} must be an object")
        name = im.get("file_name")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise DataError(f"{where}.file_name must be a plain file name, got {name!r}")
        files[_int(im.get("id"), f"{where}.id")] = name
    out: list[CaptionSample] = []
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where} must be an object")
        cid = _int(ann.get("id"), f"{where}.id")
        if cid in seen:
            raise DataError(f"{where}: caption id {cid} appears twice")
        seen.add(cid)
        image_id = _int(ann.get("image_id"), f"{where}.image_id")
        if image_id not in files:
            raise DataError(f"{where}: image_id {image_id} is not in 'images'")
        text = ann.get("caption")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}.caption must be a non-empty string, got {text!r}")
        out.append(
            CaptionSample(
                caption_id=cid,
                image_id=image_id,
                image_path=root / "images" / split / files[image_id],
                caption=text.strip(),
            )
        )
    return out


def caption_class(text: str, classes: Sequence[str] = SHAPES) -> str:
    """The first object class a caption names ("two circles and a square" -> "circle"), else "other"."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    for word in words:
        for cls in classes:
            if word in (cls, f"{cls}s", f"{cls}es"):
                return cls
    return "other"


def captions_by_image(samples: Sequence[CaptionSample]) -> dict[int, list[CaptionSample]]:
    """Captions grouped by image id, images in first-appearance order."""
    out: dict[int, list[CaptionSample]] = {}
    for s in samples:
        out.setdefault(s.image_id, []).append(s)
    return out
