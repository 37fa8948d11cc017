"""A GenEval-style prompt set for the synthetic world, with ground-truth scenes for its prompts.

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", arXiv:2310.11513) asks a text-to-image model for objects, counts, colours and
relative positions across six tasks and checks each generated image with a detector. This module
writes such a prompt set in GenEval's metadata format (see :mod:`fedumm.data.geneval`) whose
classes are the synthetic world's shapes and whose colours are its palette (all six are GenEval
colours), and draws, for any prompt over those classes and colours, a scene satisfying it.

Prompts follow the synthetic world's caption wording so that they tokenise into its vocabulary:
"a circle", "a large square and a triangle", "three small diamonds", "an orange circle",
"a circle to the left of a small square", "a red circle and a blue square". Size words vary
the text only (GenEval has no size clause); :func:`render_prompt` honours them.

The tasks encode their clauses as GenEval does: counting includes ``count`` N (2 to 4) and
excludes N + 1 of the class; position lists the reference object first and gives the subject
(the object named first in the text) ``position: [relation, 0]``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from fedumm.data.geneval import COLORS, TAGS, GenEvalPrompt, Requirement, dump_metadata
from fedumm.data.render import CANVAS as _CANVAS
from fedumm.data.render import COLOURS, SHAPES, SIZES, Scene, SceneObject, boxes_separated
from fedumm.data.synth import NUMBER_WORDS, VOCABULARY, tokenize
from fedumm.eval.geneval import relative_position

__all__ = [
    "COUNTS",
    "DEFAULT_PER_TAG",
    "DEFAULT_PROMPTS_FILE",
    "IMAGES_PER_PROMPT",
    "POSITION_MARGIN",
    "PROMPT_RELATIONS",
    "build_prompt_set",
    "render_prompt",
    "write_prompt_set",
]

DEFAULT_PROMPTS_FILE = "geneval_synth_metadata.jsonl"
"""File name of the synthetic world's GenEval metadata."""

IMAGES_PER_PROMPT = 4
"""Images to generate per prompt, as GenEval does (each image is judged; tags average over images)."""

DEFAULT_PER_TAG = 64
"""Default prompts per tag; a tag with fewer distinct prompts takes all (single_object 12, counting 36)."""

COUNTS: tuple[int, ...] = (2, 3, 4)
"""Object counts asked by counting prompts, as in GenEval."""

PROMPT_RELATIONS: Mapping[str, str] = MappingProxyType(
    {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
)
"""Per GenEval relation, its wording in prompts (the synthetic world's caption wording)."""

POSITION_MARGIN = 0.15
"""Margin of :func:`relative_position` by which ground-truth scenes of position prompts hold.

GenEval's judge uses 0.1; the larger margin leaves room for a detector's box to be off by a pixel.
The scenes also hold no other relation even at margin 0 (the centre offset is within 30 degrees
of the required direction), so a prompt asking for another relation fails on them.
"""

_SIZE_CHOICES: tuple[str | None, ...] = (None, *SIZES)
_PLURALS = {f"{shape}s": shape for shape in SHAPES}
_SCENE_TRIES = 200
_PLACEMENT_TRIES = 100


@dataclass(frozen=True, kw_only=True)
class _Draft:
    """A prompt before it is numbered."""

    tag: str
    prompt: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = ()


def _phrase(shape: str, *, size: str | None = None, colour: str | None = None, count: int = 1) -> str:
    """Noun phrase such as "a small red circle", "an orange square" or "three diamonds"."""
    words = [w for w in (size, colour) if w is not None]
    noun = shape if count == 1 else f"{shape}s"
    head = " ".join([*words, noun])
    if count == 1:
        return f"{'an' if head[0] in 'aeiou' else 'a'} {head}"
    return f"{NUMBER_WORDS[count]} {head}"


def _single_object() -> Iterator[list[_Draft]]:
    for shape in SHAPES:
        include = (Requirement(cls=shape, count=1),)
        yield [
            _Draft(tag="single_object", prompt=_phrase(shape, size=s), include=include) for s in _SIZE_CHOICES
        ]


def _two_object() -> Iterator[list[_Draft]]:
    for a, b in itertools.permutations(SHAPES, 2):
        include = (Requirement(cls=a, count=1), Requirement(cls=b, count=1))
        yield [
            _Draft(
                tag="two_object", prompt=f"{_phrase(a, size=sa)} and {_phrase(b, size=sb)}", include=include
            )
            for sa, sb in itertools.product(_SIZE_CHOICES, repeat=2)
        ]


def _counting() -> Iterator[list[_Draft]]:
    for shape in SHAPES:
        for n in COUNTS:
            include = (Requirement(cls=shape, count=n),)
            exclude = (Requirement(cls=shape, count=n + 1),)
            yield [
                _Draft(
                    tag="counting", prompt=_phrase(shape, size=s, count=n), include=include, exclude=exclude
                )
                for s in _SIZE_CHOICES
            ]


def _colors() -> Iterator[list[_Draft]]:
    for shape in SHAPES:
        for colour in COLOURS:
            include = (Requirement(cls=shape, count=1, color=colour),)
            yield [
                _Draft(tag="colors", prompt=_phrase(shape, size=s, colour=colour), include=include)
                for s in _SIZE_CHOICES
            ]


def _position() -> Iterator[list[_Draft]]:
    for subject, reference in itertools.permutations(SHAPES, 2):
        for rel, words in PROMPT_RELATIONS.items():
            include = (
                Requirement(cls=reference, count=1),
                Requirement(cls=subject, count=1, position=(rel, 0)),
            )
            yield [
                _Draft(
                    tag="position",
                    prompt=f"{_phrase(subject, size=ss)} {words} {_phrase(reference, size=sr)}",
                    include=include,
                )
                for ss, sr in itertools.product(_SIZE_CHOICES, repeat=2)
            ]


def _color_attr() -> Iterator[list[_Draft]]:
    for a, b in itertools.permutations(SHAPES, 2):
        for ca, cb in itertools.permutations(COLOURS, 2):
            include = (Requirement(cls=a, count=1, color=ca), Requirement(cls=b, count=1, color=cb))
            yield [
                _Draft(
                    tag="color_attr",
                    prompt=f"{_phrase(a, size=sa, colour=ca)} and {_phrase(b, size=sb, colour=cb)}",
                    include=include,
                )
                for sa, sb in itertools.product(_SIZE_CHOICES, repeat=2)
            ]


_GENERATORS = {
    "single_object": _single_object,
    "two_object": _two_object,
    "counting": _counting,
    "colors": _colors,
    "position": _position,
    "color_attr": _color_attr,
}


def _select(groups: list[list[_Draft]], limit: int, rng: np.random.Generator) -> list[_Draft]:
    """Up to ``limit`` drafts spread evenly over the groups (same clauses), in enumeration order.

    Rounds visit the groups in a fresh random order and take one unused wording of each, so every
    clause set appears once before any appears twice.
    """
    unused = [list(rng.permutation(len(group))) for group in groups]
    chosen: list[tuple[int, int]] = []
    while len(chosen) < limit and any(unused):
        for g in rng.permutation(len(groups)):
            if len(chosen) >= limit:
                break
            if unused[g]:
                chosen.append((int(g), int(unused[g].pop())))
    return [groups[g][v] for g, v in sorted(chosen)]


def build_prompt_set(
    *, seed: int = 0, per_tag: int | None = None, keep: Callable[[str], bool] | None = None
) -> list[GenEvalPrompt]:
    """GenEval prompts over the synthetic world, tags in GenEval's order, indices ``0..n-1``.

    Each tag takes ``per_tag`` prompts (default :data:`DEFAULT_PER_TAG`), or all of its distinct
    prompts when it has fewer; the choice depends only on ``seed``. No two prompts share a text.
    ``keep`` filters the candidate texts before the choice (a held-out set keeps what no training
    caption composes; a tag with no candidate left has no prompts).
    """
    if per_tag is None:
        per_tag = DEFAULT_PER_TAG
    if isinstance(per_tag, bool) or not isinstance(per_tag, int) or per_tag < 1:
        raise ValueError(f"per_tag must be a positive integer, got {per_tag!r}")
    drafts: list[_Draft] = []
    for position, tag in enumerate(TAGS):
        rng = np.random.default_rng([seed, position])
        groups = list(_GENERATORS[tag]())
        if keep is not None:
            groups = [g for g in ([d for d in group if keep(d.prompt)] for group in groups) if g]
        drafts += _select(groups, per_tag, rng)
    vocabulary = set(VOCABULARY)
    for draft in drafts:
        missing = [t for t in tokenize(draft.prompt) if t not in vocabulary]
        if missing:
            raise RuntimeError(f"prompt {draft.prompt!r} uses words outside the vocabulary: {missing}")
    return [
        GenEvalPrompt(index=i, tag=d.tag, prompt=d.prompt, include=d.include, exclude=d.exclude)
        for i, d in enumerate(drafts)
    ]


def write_prompt_set(path: str | os.PathLike[str], prompts: Sequence[GenEvalPrompt]) -> Path:
    """Write prompts as GenEval metadata JSONL (atomically, via ``dump_metadata``); returns the path."""
    target = Path(path)
    dump_metadata(prompts, target)
    return target


def _mentioned_sizes(text: str) -> dict[str, str]:
    """Per shape named in ``text``, the size word directly before it (or before its colour word)."""
    tokens = tokenize(text)
    sizes: dict[str, str] = {}
    for i, token in enumerate(tokens):
        shape = token if token in SHAPES else _PLURALS.get(token)
        if shape is None:
            continue
        j = i - 1
        while j >= 0 and tokens[j] in COLOURS:
            j -= 1
        if j >= 0 and tokens[j] in SIZES:
            sizes.setdefault(shape, tokens[j])
    return sizes


def _positions_hold(objects: Sequence[SceneObject], groups: Sequence[range], prompt: GenEvalPrompt) -> bool:
    """Every position clause holds between the placed objects, by a margin and with no other relation."""
    for j, req in enumerate(prompt.include):
        if req.position is None:
            continue
        rel, reference = req.position
        for a in groups[j]:
            for b in groups[reference]:
                box_a, box_b = objects[a].bbox, objects[b].bbox
                if relative_position(box_a, box_b, margin=0.0) != (rel,):
                    return False
                if rel not in relative_position(box_a, box_b, margin=POSITION_MARGIN):
                    return False
    return True


def _place(
    rng: np.random.Generator, shape: str, colour: str, size: str, placed: Sequence[SceneObject], canvas: int
) -> SceneObject | None:
    """The object at a random place clear of the placed ones, or None after many tries."""
    r = SIZES[size]
    for _ in range(_PLACEMENT_TRIES):
        obj = SceneObject(
            shape=shape,
            colour=colour,
            size=size,
            cx=int(rng.integers(r, canvas - r)),
            cy=int(rng.integers(r, canvas - r)),
        )
        if all(boxes_separated(obj, other) for other in placed):
            return obj
    return None


def render_prompt(prompt: GenEvalPrompt, rng: np.random.Generator, *, canvas: int = _CANVAS) -> Scene | None:
    """A ground-truth scene satisfying ``prompt``, or None when its clauses cannot be drawn.

    The scene holds exactly the included objects with their classes, counts and colours; position
    clauses hold on the drawn boxes by :data:`POSITION_MARGIN`. Sizes named in the text are
    honoured; every other attribute (colour when not required, size, place) is drawn from ``rng``.
    None when a class is not a shape, a colour not in the palette, an exclude clause is violated
    by the included objects themselves, or no placement is found.
    """
    if not isinstance(prompt, GenEvalPrompt):
        raise TypeError(f"prompt must be a GenEvalPrompt, got {type(prompt).__name__}")
    if any(req.cls not in SHAPES for req in (*prompt.include, *prompt.exclude)):
        return None
    if any(req.color is not None and req.color not in COLOURS for req in prompt.include):
        return None
    for req in prompt.exclude:
        if sum(r.count for r in prompt.include if r.cls == req.cls) >= req.count:
            return None
    sizes = _mentioned_sizes(prompt.prompt)
    palette = tuple(c for c in COLORS if c in COLOURS)
    size_names = tuple(SIZES)
    specs: list[tuple[str, str, str]] = []
    groups: list[range] = []
    for req in prompt.include:
        start = len(specs)
        for _ in range(req.count):
            colour = req.color if req.color is not None else palette[int(rng.integers(len(palette)))]
            size = sizes.get(req.cls) or size_names[int(rng.integers(len(size_names)))]
            specs.append((req.cls, colour, size))
        groups.append(range(start, len(specs)))
    if any(canvas - 2 * SIZES[size] <= 0 for _, _, size in specs):
        return None
    for _ in range(_SCENE_TRIES):
        placed: list[SceneObject] = []
        for shape, colour, size in specs:
            obj = _place(rng, shape, colour, size, placed, canvas)
            if obj is None:
                break
            placed.append(obj)
        else:
            if _positions_hold(placed, groups, prompt):
                return Scene(objects=tuple(placed))
    return None
