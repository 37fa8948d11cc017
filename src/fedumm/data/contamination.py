"""GenEval prompts against the training captions: verbatim overlap and held-out compositions.

The synthetic world's GenEval prompts use its caption wording, so a prompt can occur among the
captions the clients train on ("two circles", "a small circle and a large square"), and a model can
score on it by recall rather than composition. This module measures that overlap and tells, for any
prompt over the world's shapes, whether its composition ever occurs in a set of captions:

- a **verbatim** overlap is a prompt whose text equals a caption (case, a final full stop and
  "a"/"an" aside);
- a prompt's **composition** is what it asks: its objects (count, size, colour, shape; a missing
  attribute is left open) and how they relate ("and", or a relation from the reference object). It
  **occurs** in a caption when the caption names objects with at least those attributes in that
  relation (one object: any phrase of the caption; "and": two distinct phrases; a relation: the
  caption's own subject and reference).

A *held-out-composition* prompt occurs in none of the captions; :func:`held_out_prompt_set` builds a
GenEval prompt set of those only (which leaves out the tags whose every composition is trained on,
typically single_object and colors).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedumm.data.geneval import GenEvalPrompt
from fedumm.data.geneval_prompts import build_prompt_set
from fedumm.data.render import COLOURS, SHAPES, SIZES
from fedumm.data.synth import NUMBER_WORDS

__all__ = ["CaptionIndex", "Composition", "contamination", "held_out_prompt_set", "parse_composition"]

_COUNT = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBER_WORDS) if i}}
_RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
_SHAPE_OF = {**{s: s for s in SHAPES}, **{f"{s}s": s for s in SHAPES}}

Obj = tuple[int, str | None, str | None, str]  # (count, size, colour, shape)


@dataclass(frozen=True)
class Composition:
    """The objects a text names, and their relation: "and" or (relation, subject 0, reference 1)."""

    objects: tuple[Obj, ...]
    relation: str | None = None  # None for one object or "and"-lists; else a GenEval relation


def _phrase(words: list[str], text: str) -> Obj:
    if len(words) < 2 or words[0] not in _COUNT or words[-1] not in _SHAPE_OF:
        raise ValueError(f"{text!r}: cannot read {' '.join(words)!r} as an object")
    middle = words[1:-1]
    size = next((w for w in middle if w in SIZES), None)
    colour = next((w for w in middle if w in COLOURS), None)
    if len(middle) != (size is not None) + (colour is not None):
        raise ValueError(f"{text!r}: unknown words in {' '.join(words)!r}")
    return (_COUNT[words[0]], size, colour, _SHAPE_OF[words[-1]])


def parse_composition(text: str) -> Composition:
    """Read a caption or prompt of the synthetic world's wording (ValueError if it is not one)."""
    clean = re.sub(r"[.\s]+$", "", text.strip().lower())
    for words, rel in _RELATIONS.items():
        if f" {words} " in clean:
            subject, reference = clean.split(f" {words} ", 1)
            return Composition(
                objects=(_phrase(subject.split(), text), _phrase(reference.split(), text)), relation=rel
            )
    parts = [p for p in re.split(r",\s*|\s+and\s+", clean) if p]
    return Composition(objects=tuple(_phrase(p.split(), text) for p in parts))


def _open(obj: Obj) -> list[Obj]:
    """The object and every version of it with size and/or colour left open."""
    n, size, colour, shape = obj
    return [(n, s, c, shape) for s in {size, None} for c in {colour, None}]


def _normal_text(text: str) -> str:
    words = re.sub(r"[.\s]+$", "", text.strip().lower()).split()
    return " ".join("a" if w == "an" else w for w in words)


class CaptionIndex:
    """Every composition the captions hold, so a prompt's occurrence is a set look-up."""

    def __init__(self, captions: Iterable[str]) -> None:
        self.texts: set[str] = set()
        self.singles: set[Obj] = set()
        self.pairs: set[frozenset[Obj] | tuple[Obj, Obj]] = set()
        self.relations: set[tuple[Obj, str, Obj]] = set()
        for caption in captions:
            self.texts.add(_normal_text(caption))
            try:
                comp = parse_composition(caption)
            except ValueError:
                continue  # not in the world's wording: it can only match verbatim
            for obj in comp.objects:
                self.singles.update(_open(obj))
            if comp.relation is not None:
                subject, reference = comp.objects
                for s, r in itertools.product(_open(subject), _open(reference)):
                    self.relations.add((s, comp.relation, r))
            for a, b in itertools.combinations(comp.objects, 2):
                for x, y in itertools.product(_open(a), _open(b)):
                    self.pairs.add(frozenset((x, y)) if x != y else (x, y))

    def verbatim(self, prompt: str) -> bool:
        return _normal_text(prompt) in self.texts

    def occurs(self, prompt: str) -> bool:
        """True when the prompt's composition occurs in some caption (see the module docstring)."""
        comp = parse_composition(prompt)
        if comp.relation is not None:
            subject, reference = comp.objects
            return (subject, comp.relation, reference) in self.relations
        if len(comp.objects) == 1:
            return comp.objects[0] in self.singles
        if len(comp.objects) == 2:
            a, b = comp.objects
            return (frozenset((a, b)) if a != b else (a, b)) in self.pairs
        raise ValueError(f"{prompt!r}: prompts name one or two objects")


def contamination(prompts: Sequence[GenEvalPrompt], index: CaptionIndex) -> dict[str, int]:
    """How many prompts occur verbatim, and how many by composition, among the indexed captions.

    Prompts outside the world's wording (a real GenEval metadata file's COCO classes) can only be
    compared verbatim; ``unread`` counts them."""
    composed = unread = 0
    for p in prompts:
        try:
            composed += index.occurs(p.prompt)
        except ValueError:
            unread += 1
    return {
        "prompts": len(prompts),
        "verbatim": sum(index.verbatim(p.prompt) for p in prompts),
        "composition": composed,
        "unread": unread,
    }


def held_out_prompt_set(
    index: CaptionIndex, *, seed: int = 0, per_tag: int | None = None
) -> list[GenEvalPrompt]:
    """GenEval prompts over the world whose compositions occur in none of the indexed captions."""
    return build_prompt_set(seed=seed, per_tag=per_tag, keep=lambda text: not index.occurs(text))
