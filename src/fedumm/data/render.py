"""Deterministic drawing and description of synthetic-world scenes: solid shapes on a plain canvas.

The drawing is pure (no randomness, no anti-aliasing) so that a detector or a generation
evaluator can rely on exact colours at object centres. Randomness enters only through
:func:`sample_scene`, which takes an explicit :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fedumm.errors import DataError

__all__ = [
    "prompt_caption",
    "BACKGROUND",
    "CANVAS",
    "COLOURS",
    "MIN_GAP",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "all_combos",
    "boxes_separated",
    "caption_scene",
    "load_scenes",
    "relation",
    "render_scene",
    "sample_scene",
]

CANVAS = 64
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 160, 50),
        "blue": (30, 70, 220),
        "yellow": (240, 210, 0),
        "purple": (140, 40, 190),
        "orange": (250, 130, 0),
    }
)
SIZES: Mapping[str, int] = MappingProxyType({"small": 6, "large": 11})
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
_CAPTION_REL = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
MIN_GAP = 2
"""Minimum number of background pixels between the bounding boxes of two objects."""

_PLACEMENT_TRIES = 40
_SCENE_TRIES = 200


@dataclass(frozen=True, kw_only=True)
class SceneObject:
    """One solid shape: its attributes and its centre in pixels."""

    shape: str
    colour: str
    size: str
    cx: int
    cy: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {tuple(SIZES)}")
        for name in ("cx", "cy"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")

    @property
    def radius(self) -> int:
        """Half the side of the object's bounding box."""
        return SIZES[self.size]

    @property
    def rgb(self) -> tuple[int, int, int]:
        """Fill colour as an RGB triple."""
        return COLOURS[self.colour]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bounding box (x1, y1, x2, y2)."""
        r = self.radius
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description including the bounding box."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "cx": self.cx,
            "cy": self.cy,
            "bbox": list(self.bbox),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> SceneObject:
        """Inverse of :meth:`as_dict` (the bbox entry, if any, is ignored)."""
        return cls(
            shape=record["shape"],
            colour=record["colour"],
            size=record["size"],
            cx=record["cx"],
            cy=record["cy"],
        )


@dataclass(frozen=True, kw_only=True)
class Scene:
    """An ordered collection of objects drawn on one canvas."""

    objects: tuple[SceneObject, ...]


def all_combos() -> tuple[tuple[str, str], ...]:
    """Every (colour, shape) pair in a fixed order."""
    return tuple((colour, shape) for colour in COLOURS for shape in SHAPES)


def boxes_separated(a: SceneObject, b: SceneObject, *, gap: int = MIN_GAP) -> bool:
    """True when at least ``gap`` background pixels separate the two bounding boxes."""
    ax1, ay1, ax2, ay2 = a.bbox
    bx1, by1, bx2, by2 = b.bbox
    return bx1 - ax2 > gap or ax1 - bx2 > gap or by1 - ay2 > gap or ay1 - by2 > gap


def relation(a: SceneObject, b: SceneObject) -> tuple[str, int]:
    """Where ``a`` lies relative to ``b`` along the dominant axis of the centre offset, and that offset.

    Image y grows downwards, so a smaller ``cy`` means "above"; ties go to the horizontal axis.
    """
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return ("left" if dx < 0 else "right"), abs(dx)
    return ("above" if dy < 0 else "below"), abs(dy)


def caption_scene(scene: Scene, *, shapes: bool = True) -> str:
    """Deterministic one-sentence description of all objects, listed left to right.

    With ``shapes=False`` every object is called a "shape" ("a small red shape to the left of a
    large blue shape."): the caption keeps sizes, colours and layout but names no shape.
    """
    if not scene.objects:
        raise ValueError("cannot caption an empty scene")
    objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    phrases = [f"a {o.size} {o.colour} {o.shape if shapes else 'shape'}" for o in objs]
    if len(phrases) == 1:
        return f"{phrases[0]}."
    if len(phrases) == 2:
        rel, _ = relation(objs[0], objs[1])
        return f"{phrases[0]} {_CAPTION_REL[rel]} {phrases[1]}."
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}."


_COUNT_WORDS = ("zero", "one", "two", "three", "four")


def _loose_phrase(obj: SceneObject, rng: np.random.Generator, *, colour: bool, size: bool) -> str:
    words = [obj.size] if size and rng.random() < 0.5 else []
    words += [obj.colour] if colour else []
    return " ".join(["a", *words, obj.shape])


def prompt_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A short, true, prompt-style description (the phrasings of a GenEval prompt), chosen by ``rng``.

    Styles: every object with its colour ("a red circle and a large green square"), every object by
    shape only, counts per shape ("two circles and a square") and, for two separated objects, their
    relative position ("a circle to the left of a small square").
    """
    if not scene.objects:
        raise ValueError("cannot caption an empty scene")
    objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    styles = ["colours", "shapes", "counts"]
    if len(objs) == 2:
        styles.append("position")
    style = styles[int(rng.integers(len(styles)))]
    if style == "counts":
        counts: dict[str, int] = {}
        for o in objs:
            counts[o.shape] = counts.get(o.shape, 0) + 1
        parts = [f"a {shape}" if n == 1 else f"{_COUNT_WORDS[n]} {shape}s" for shape, n in counts.items()]
    elif style == "position":
        rel, _ = relation(objs[0], objs[1])
        a = _loose_phrase(objs[0], rng, colour=False, size=True)
        b = _loose_phrase(objs[1], rng, colour=False, size=True)
        return f"{a} {_CAPTION_REL[rel]} {b}"
    else:
        parts = [_loose_phrase(o, rng, colour=style == "colours", size=True) for o in objs]
    return " and ".join(parts) if len(parts) <= 2 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _check_inside(obj: SceneObject, canvas: int) -> None:
    x1, y1, x2, y2 = obj.bbox
    if x1 < 0 or y1 < 0 or x2 >= canvas or y2 >= canvas:
        raise ValueError(f"object {obj} with bbox {obj.bbox} does not fit a {canvas}x{canvas} canvas")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x1, y1, x2, y2 = obj.bbox
    cx, cy = obj.cx, obj.cy
    if obj.shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=obj.rgb)
    elif obj.shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=obj.rgb)
    else:  # diamond
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=obj.rgb)


def render_scene(scene: Scene, *, canvas: int = CANVAS) -> Image.Image:
    """Draw a scene as an RGB image of side ``canvas`` with solid, aliased fills."""
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _check_inside(obj, canvas)
        _draw_object(draw, obj)
    return image


def _validate_combos(combos: Collection[tuple[str, str]], what: str) -> tuple[tuple[str, str], ...]:
    result = tuple((str(colour), str(shape)) for colour, shape in combos)
    for colour, shape in result:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"{what} contains an unknown combo ({colour!r}, {shape!r})")
    return result


def _place(
    rng: np.random.Generator, colour: str, shape: str, placed: Sequence[SceneObject], canvas: int
) -> SceneObject | None:
    size_names = tuple(SIZES)
    size = size_names[int(rng.integers(len(size_names)))]
    r = SIZES[size]
    if canvas - 2 * r <= 0:
        return None
    for _ in range(_PLACEMENT_TRIES):
        cx = int(rng.integers(r, canvas - r))
        cy = int(rng.integers(r, canvas - r))
        obj = SceneObject(shape=shape, colour=colour, size=size, cx=cx, cy=cy)
        if all(boxes_separated(obj, other) for other in placed):
            return obj
    return None


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int,
    allowed: Collection[tuple[str, str]] | None = None,
    include: Sequence[tuple[str, str]] = (),
    canvas: int = CANVAS,
) -> Scene:
    """Place exactly ``n_objects`` non-overlapping objects at random positions.

    ``allowed`` restricts the (colour, shape) combos drawn at random; ``include`` lists combos
    that must appear (they are placed first and count towards ``n_objects``). Sizes are
    uniform. Raises :class:`DataError` when no valid placement is found after many retries.
    """
    if n_objects < 1:
        raise ValueError(f"n_objects must be >= 1, got {n_objects}")
    combos = _validate_combos(all_combos() if allowed is None else allowed, "allowed")
    required = _validate_combos(include, "include")
    if not combos and len(required) < n_objects:
        raise ValueError("allowed is empty")
    if len(required) > n_objects:
        raise ValueError(f"include has {len(required)} combos but n_objects is {n_objects}")
    for _ in range(_SCENE_TRIES):
        picks = list(required)
        picks += [combos[int(rng.integers(len(combos)))] for _ in range(n_objects - len(required))]
        picks = [picks[i] for i in rng.permutation(len(picks))]
        placed: list[SceneObject] = []
        for colour, shape in picks:
            obj = _place(rng, colour, shape, placed, canvas)
            if obj is None:
                break
            placed.append(obj)
        else:
            return Scene(objects=tuple(placed))
    raise DataError(
        f"cannot place {n_objects} non-overlapping objects on a {canvas}x{canvas} canvas "
        f"after {_SCENE_TRIES} attempts"
    )


def load_scenes(path: Path) -> dict[int, Scene]:
    """Read a ``scenes_{split}.json`` ground-truth file into scenes keyed by image id."""
    path = Path(path)
    try:
        records = json.loads(path.read_bytes())["scenes"]
        return {
            int(r["image_id"]): Scene(objects=tuple(SceneObject.from_dict(o) for o in r["objects"]))
            for r in records
        }
    except OSError as exc:
        raise DataError(f"{path}: cannot read scenes file: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed scene record: {exc!r}") from exc
