"""Procedural synthetic world written in the exact VQA v2 and COCO caption file formats.

The "public" split (pretraining) and the "private"/"val"/"test" splits differ on purpose:
public scenes hold 1-3 objects, never show :data:`HELD_OUT_COMBOS` and are only asked colour,
shape, existence and total-count questions; the other splits hold 2-4 objects of any combo and
add spatial-relation, attribute-counting and held-out-existence questions. Every image has one
canonical caption ("a small red circle to the left of a large blue square."); images outside the
public split also have a second, prompt-style caption in GenEval's phrasings ("two circles and a
square", "a circle to the left of a small square"), which pretraining never sees.

Generation has its own public/private shift: public captions never name a shape ("a small red
shape to the left of a large blue shape."). Pretraining teaches the shape words through VQA only,
so the pretrained generator draws colours, sizes and layouts on demand but not shapes; drawing a
named shape is what the clients' private caption-image pairs teach. (In the field: public
alt-text describes a scan coarsely; a hospital's reports name the structures.)
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from fedumm.data import render
from fedumm.data.render import CANVAS, COLOURS, RELATIONS, SHAPES, SIZES, Scene, SceneObject
from fedumm.data.vqa import majority_answer

__all__ = [
    "DEFAULT_IMAGES",
    "FORMAT_VERSION",
    "HELD_OUT_COMBOS",
    "SPLITS",
    "VOCABULARY",
    "SplitFiles",
    "WorldManifest",
    "image_file_name",
    "synthesize",
    "tokenize",
    "world_mismatch",
    "require_current_world",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
SPLITS: tuple[str, ...] = ("public", "private", "val", "test")
DEFAULT_IMAGES = MappingProxyType({"public": 3000, "private": 1000, "val": 250, "test": 250})
HELD_OUT_COMBOS = (("purple", "triangle"), ("orange", "diamond"), ("green", "circle"))
"""(colour, shape) combos that never appear in public images or questions."""
SPLIT_ID_STRIDE = 1_000_000
ANNOTATORS = 10
WRONG_ANSWER_PROB = 0.08
MAX_WRONG_ANSWERS = 3
MIN_SPATIAL_OFFSET = 8
HELD_OUT_INCLUDE_PROB = 0.25
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
DIGITS: tuple[str, ...] = tuple(str(i) for i in range(len(NUMBER_WORDS)))

_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_QUESTION_REL = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_PLURALS = {shape: f"{shape}s" for shape in SHAPES}
_TEMPLATE_WORDS = (
    "what color is the shape object is there a an how many objects are where relative to of and yes no"
).split()
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {*_TEMPLATE_WORDS, *SHAPES, *_PLURALS.values(), *COLOURS, *SIZES, *RELATIONS, *NUMBER_WORDS, *DIGITS}
        | {"?", ".", ","}
    )
)
"""Every token of a generated question, caption or canonical answer (see :func:`tokenize`)."""

_PUBLIC_KINDS = MappingProxyType({"colour": 0.25, "shape": 0.25, "existence": 0.3, "count": 0.2})
# About half of the other splits' questions are spatial or attribute-counting ones.
_PRIVATE_KINDS = MappingProxyType(
    {
        "colour": 0.1,
        "shape": 0.1,
        "existence": 0.1,
        "count": 0.1,
        "held_out": 0.1,
        "relation": 0.15,
        "where": 0.1,
        "attribute_count": 0.25,
    }
)
_INFO = {
    "description": "fedumm synthetic world in the VQA v2 format",
    "version": "2.0",
    "year": 2017,
    "contributor": "fedumm",
    "date_created": "2017-04-26 17:00:44",
}
_LICENSE = {
    "name": "Creative Commons Attribution 4.0 International License",
    "url": "http://creativecommons.org/licenses/by/4.0/",
}


@dataclass(frozen=True, kw_only=True)
class _SplitConfig:
    min_objects: int
    max_objects: int
    kinds: Mapping[str, float]
    allowed: tuple[tuple[str, str], ...]
    held_out_include_prob: float
    prompt_captions: bool  # a second, prompt-style caption per image (generation fine-tuning data)
    caption_shapes: bool  # captions name shapes; public ones say "shape" instead


class _QA(NamedTuple):
    question: str
    answer: str
    question_type: str
    answer_type: str
    wrong: tuple[str, ...]  # plausible wrong answers an annotator may give


@dataclass(frozen=True, kw_only=True)
class SplitFiles:
    """Paths and sizes of one generated split."""

    name: str
    questions_path: Path
    annotations_path: Path
    captions_path: Path
    scenes_path: Path
    image_dir: Path
    num_images: int
    num_questions: int
    captions_name_shapes: bool


@dataclass(frozen=True, kw_only=True)
class WorldManifest:
    """What :func:`synthesize` wrote."""

    root: Path
    seed: int
    world_path: Path
    splits: tuple[SplitFiles, ...]

    @property
    def split_names(self) -> tuple[str, ...]:
        """Names of the generated splits, in canonical order."""
        return tuple(s.name for s in self.splits)

    def split(self, name: str) -> SplitFiles:
        """Files of the split called ``name``."""
        for files in self.splits:
            if files.name == name:
                return files
        raise KeyError(f"split {name!r} not in world {self.root} (has {self.split_names})")


def _config(split: str) -> _SplitConfig:
    if split == "public":
        allowed = tuple(c for c in render.all_combos() if c not in HELD_OUT_COMBOS)
        return _SplitConfig(
            min_objects=1,
            max_objects=3,
            kinds=_PUBLIC_KINDS,
            allowed=allowed,
            held_out_include_prob=0.0,
            prompt_captions=False,
            caption_shapes=False,
        )
    return _SplitConfig(
        min_objects=2,
        max_objects=4,
        kinds=_PRIVATE_KINDS,
        allowed=render.all_combos(),
        held_out_include_prob=HELD_OUT_INCLUDE_PROB,
        prompt_captions=True,
        caption_shapes=True,
    )


def tokenize(text: str) -> list[str]:
    """Lowercase, split on whitespace and split off punctuation."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def image_file_name(split: str, image_id: int) -> str:
    """COCO-style image file name."""
    return f"COCO_{split}_{image_id:012d}.jpg"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def _others(answer: str, pool: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in pool if p != answer)


def _near_numbers(n: int) -> tuple[str, ...]:
    return tuple(str(v) for v in (n - 1, n + 1) if 0 <= v < len(DIGITS))


def _yes_no(question: str, question_type: str, yes: bool) -> _QA:
    answer = "yes" if yes else "no"
    return _QA(question, answer, question_type, "yes/no", _others(answer, ("yes", "no")))


def _ask_colour(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    counts = Counter(o.shape for o in scene.objects)
    unique = [o for o in scene.objects if counts[o.shape] == 1]
    if not unique:
        return None
    obj = _pick(rng, unique)
    wrong = _others(obj.colour, tuple(COLOURS))
    return _QA(f"what color is the {obj.shape}?", obj.colour, "what color is the", "other", wrong)


def _ask_shape(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    counts = Counter(o.colour for o in scene.objects)
    unique = [o for o in scene.objects if counts[o.colour] == 1]
    if not unique:
        return None
    obj = _pick(rng, unique)
    wrong = _others(obj.shape, SHAPES)
    return _QA(f"what shape is the {obj.colour} object?", obj.shape, "what shape is the", "other", wrong)


def _existence(
    rng: np.random.Generator, scene: Scene, pool: tuple[tuple[str, str], ...], p_yes: float
) -> _QA:
    present = {(o.colour, o.shape) for o in scene.objects}
    yes_pool = [c for c in pool if c in present]
    no_pool = [c for c in pool if c not in present]
    yes = bool(yes_pool) and (not no_pool or rng.random() < p_yes)
    colour, shape = _pick(rng, yes_pool if yes else no_pool)
    return _yes_no(f"is there {_article(colour)} {colour} {shape}?", "is there a", yes)


def _ask_existence(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    return _existence(rng, scene, cfg.allowed, 0.5)


def _ask_held_out(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    # Scenes seldom hold a held-out combo, so ask about one whenever present to keep yes/no balanced.
    return _existence(rng, scene, HELD_OUT_COMBOS, 1.0)


def _ask_count(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    n = len(scene.objects)
    return _QA("how many objects are there?", str(n), "how many", "number", _near_numbers(n))


def _ask_attribute_count(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    by_colour = rng.random() < 0.5
    values = [o.colour if by_colour else o.shape for o in scene.objects]
    absent = [v for v in (tuple(COLOURS) if by_colour else SHAPES) if v not in values]
    value = _pick(rng, absent) if absent and rng.random() < 0.25 else _pick(rng, sorted(set(values)))
    n = values.count(value)
    noun = f"{value} objects" if by_colour else _PLURALS[value]
    return _QA(f"how many {noun} are there?", str(n), "how many", "number", _near_numbers(n))


def _spatial_pair(scene: Scene, rng: np.random.Generator) -> tuple[SceneObject, SceneObject, str] | None:
    """A random ordered pair of unambiguous objects with a clear dominant-axis relation."""
    counts = Counter((o.colour, o.shape) for o in scene.objects)
    unique = [o for o in scene.objects if counts[(o.colour, o.shape)] == 1]
    pairs = []
    for a in unique:
        for b in unique:
            if a is not b and abs(a.cx - b.cx) != abs(a.cy - b.cy):
                rel, offset = render.relation(a, b)
                if offset >= MIN_SPATIAL_OFFSET:
                    pairs.append((a, b, rel))
    return _pick(rng, pairs) if pairs else None


def _ask_relation(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    pair = _spatial_pair(scene, rng)
    if pair is None:
        return None
    a, b, rel = pair
    yes = rng.random() < 0.5
    asked = _QUESTION_REL[rel if yes else _OPPOSITE[rel]]
    return _yes_no(f"is the {a.colour} {a.shape} {asked} the {b.colour} {b.shape}?", "is the", yes)


def _ask_where(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig) -> _QA | None:
    pair = _spatial_pair(scene, rng)
    if pair is None:
        return None
    a, b, rel = pair
    question = f"where is the {a.colour} {a.shape} relative to the {b.colour} {b.shape}?"
    return _QA(question, rel, "where is the", "other", _others(rel, RELATIONS))


_ASKERS: Mapping[str, Callable[[Scene, np.random.Generator, _SplitConfig], _QA | None]] = MappingProxyType(
    {
        "colour": _ask_colour,
        "shape": _ask_shape,
        "existence": _ask_existence,
        "count": _ask_count,
        "held_out": _ask_held_out,
        "relation": _ask_relation,
        "where": _ask_where,
        "attribute_count": _ask_attribute_count,
    }
)


def _ask(scene: Scene, rng: np.random.Generator, cfg: _SplitConfig, n_questions: int) -> list[_QA]:
    kinds = tuple(cfg.kinds)
    weights = np.array([cfg.kinds[k] for k in kinds], dtype=float)
    weights /= weights.sum()
    result: list[_QA] = []
    for _ in range(20 * n_questions):
        if len(result) == n_questions:
            break
        qa = _ASKERS[kinds[int(rng.choice(len(kinds), p=weights))]](scene, rng, cfg)
        if qa is not None and all(qa.question != other.question for other in result):
            result.append(qa)
    return result


def _surface(answer: str, rng: np.random.Generator) -> str:
    """A raw annotator spelling of ``answer`` that canonicalises back to it."""
    if answer in DIGITS and rng.random() < 0.3:
        word = NUMBER_WORDS[int(answer)]
        return word.capitalize() if rng.random() < 0.4 else word
    r = rng.random()
    if r < 0.6:
        return answer
    if r < 0.75:
        return answer.capitalize()
    if r < 0.85:
        return f"{answer}."
    if r < 0.92:
        return f"{answer}!"
    return f" {answer}" if r < 0.96 else f"{answer} "


def _annotate(qa: _QA, rng: np.random.Generator) -> list[dict[str, Any]]:
    answers = []
    n_wrong = 0
    for answer_id in range(1, ANNOTATORS + 1):
        wrong = bool(qa.wrong) and n_wrong < MAX_WRONG_ANSWERS and rng.random() < WRONG_ANSWER_PROB
        n_wrong += wrong
        text = _surface(_pick(rng, qa.wrong) if wrong else qa.answer, rng)
        confidence = rng.choice(("yes", "maybe", "no"), p=(0.2, 0.5, 0.3) if wrong else (0.85, 0.12, 0.03))
        answers.append({"answer": text, "answer_confidence": str(confidence), "answer_id": answer_id})
    return answers


def _annotation(qa: _QA, image_id: int, question_id: int, rng: np.random.Generator) -> dict[str, Any]:
    answers = _annotate(qa, rng)
    return {
        "question_type": qa.question_type,
        "multiple_choice_answer": majority_answer([a["answer"] for a in answers]),
        "answers": answers,
        "image_id": image_id,
        "answer_type": qa.answer_type,
        "question_id": question_id,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _jpeg_bytes(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    render.render_scene(scene, canvas=CANVAS).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _sample_split_scene(rng: np.random.Generator, cfg: _SplitConfig) -> Scene:
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    include = ()
    if cfg.held_out_include_prob > 0 and rng.random() < cfg.held_out_include_prob:
        include = (_pick(rng, HELD_OUT_COMBOS),)
    return render.sample_scene(rng, n_objects=n_objects, allowed=cfg.allowed, include=include, canvas=CANVAS)


def _write_split(
    out_dir: Path,
    split: str,
    n_images: int,
    *,
    seed: int,
    questions_per_image: int,
    progress: Callable[[str, int, int], None] | None,
) -> SplitFiles:
    split_index = SPLITS.index(split)
    cfg = _config(split)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations, cap_images, captions, scenes = [], [], [], [], []
    for index in range(n_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, index]))
        image_id = (split_index + 1) * SPLIT_ID_STRIDE + index
        file_name = image_file_name(split, image_id)
        scene = _sample_split_scene(rng, cfg)
        _write_atomic(image_dir / file_name, _jpeg_bytes(scene))
        for k, qa in enumerate(_ask(scene, rng, cfg, questions_per_image)):
            question_id = image_id * 10 + k
            questions.append({"image_id": image_id, "question": qa.question, "question_id": question_id})
            annotations.append(_annotation(qa, image_id, question_id, rng))
        cap_images.append({"id": image_id, "file_name": file_name, "width": CANVAS, "height": CANVAS})
        caption = render.caption_scene(scene, shapes=cfg.caption_shapes)
        captions.append({"id": image_id, "image_id": image_id, "caption": caption})
        if cfg.prompt_captions:
            # a second, prompt-style caption from its own stream, so images and questions are unchanged
            prompt_rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, index, 1]))
            captions.append(
                {
                    "id": image_id * 10 + 1,
                    "image_id": image_id,
                    "caption": render.prompt_caption(scene, prompt_rng),
                }
            )
        scenes.append(
            {"image_id": image_id, "file_name": file_name, "objects": [o.as_dict() for o in scene.objects]}
        )
        if progress is not None:
            progress(split, index + 1, n_images)
    files = SplitFiles(
        name=split,
        questions_path=out_dir / f"v2_OpenEnded_mscoco_{split}_questions.json",
        annotations_path=out_dir / f"v2_mscoco_{split}_annotations.json",
        captions_path=out_dir / f"captions_{split}.json",
        scenes_path=out_dir / f"scenes_{split}.json",
        image_dir=image_dir,
        num_images=n_images,
        num_questions=len(questions),
        captions_name_shapes=cfg.caption_shapes,
    )
    _write_json(
        files.questions_path,
        {
            "info": _INFO,
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "license": _LICENSE,
            "data_subtype": split,
            "questions": questions,
        },
    )
    _write_json(
        files.annotations_path,
        {"info": _INFO, "license": _LICENSE, "data_subtype": split, "annotations": annotations},
    )
    _write_json(
        files.captions_path,
        {"info": _INFO, "licenses": [_LICENSE], "images": cap_images, "annotations": captions},
    )
    _write_json(files.scenes_path, {"data_subtype": split, "canvas": CANVAS, "scenes": scenes})
    logger.info("wrote split %s: %d images, %d questions", split, n_images, len(questions))
    return files


def _image_counts(images: Mapping[str, int] | None) -> dict[str, int]:
    requested = dict(DEFAULT_IMAGES if images is None else images)
    unknown = sorted(set(requested) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected a subset of {SPLITS}")
    for name, count in requested.items():
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < SPLIT_ID_STRIDE:
            raise ValueError(
                f"image count for split {name!r} must be an int in [0, {SPLIT_ID_STRIDE}), got {count!r}"
            )
    return {name: requested[name] for name in SPLITS if name in requested}


def synthesize(
    out_dir: Path,
    *,
    seed: int = 0,
    images: Mapping[str, int] | None = None,
    questions_per_image: int = 3,
    progress: Callable[[str, int, int], None] | None = None,
) -> WorldManifest:
    """Generate the synthetic world under ``out_dir``; the same seed gives byte-identical files.

    ``images`` maps split names (a subset of :data:`SPLITS`) to image counts; ``progress`` is
    called as ``progress(split, done, total)`` after every image. Each image gets up to
    ``questions_per_image`` distinct questions. Writes ``images/{split}/COCO_{split}_{id:012d}.jpg``,
    ``v2_OpenEnded_mscoco_{split}_questions.json``, ``v2_mscoco_{split}_annotations.json``,
    ``captions_{split}.json``, ``scenes_{split}.json`` and ``world.json``; files of an earlier,
    larger world in the same folder are overwritten but not removed.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not 1 <= questions_per_image <= 10:
        raise ValueError(f"questions_per_image must be in [1, 10], got {questions_per_image}")
    counts = _image_counts(images)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    splits = tuple(
        _write_split(root, name, n, seed=seed, questions_per_image=questions_per_image, progress=progress)
        for name, n in counts.items()
    )
    world_path = root / "world.json"
    _write_json(
        world_path,
        {
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "canvas": CANVAS,
            "questions_per_image": questions_per_image,
            "splits": {s.name: {"images": s.num_images, "questions": s.num_questions} for s in splits},
            "shapes": list(SHAPES),
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "sizes": dict(SIZES),
            "held_out_combos": [list(c) for c in HELD_OUT_COMBOS],
            "captions_name_shapes": {s.name: s.captions_name_shapes for s in splits},
        },
    )
    return WorldManifest(root=root, seed=seed, world_path=world_path, splits=splits)


def world_mismatch(root: Path, *, seed: int | None = None, images: Mapping[str, int] | None = None) -> str:
    """Why the synthetic world in ``root`` is not the one asked for; "" when it is or is not synthetic.

    The format version always counts; ``seed`` and ``images`` (``None``: the default sizes) are
    compared only when a seed is given. A folder without ``world.json`` is a user's dataset: "".
    """
    from fedumm.io import read_json_object

    world_file = Path(root) / "world.json"
    if not world_file.is_file():
        return ""
    world = read_json_object(world_file)
    if world.get("format_version") != FORMAT_VERSION:
        return f"format {world.get('format_version')!r}, this fedumm writes {FORMAT_VERSION}"
    if seed is None:
        return ""
    if world.get("seed") != seed:
        return f"seed {world.get('seed')!r}, the config's seed is {seed}"
    have = {name: (v or {}).get("images") for name, v in (world.get("splits") or {}).items()}
    want = dict(DEFAULT_IMAGES if images is None else images)
    if any(have.get(name) != n for name, n in want.items()):
        return f"images per split {have}, the config asks for {want}"
    return ""


def require_current_world(data_dir: Path) -> None:
    """A synthetic world (one with a ``world.json``) must have the current format version (pretraining)."""
    from fedumm.errors import DataError

    if why := world_mismatch(data_dir):
        raise DataError(
            f"{Path(data_dir) / 'world.json'}: synthetic world of {why}; "
            f"render it again with `fedumm data synth --out {data_dir}`"
        )
