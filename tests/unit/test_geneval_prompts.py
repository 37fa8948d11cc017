"""Tests of the synthetic world's GenEval-style prompt set (GenEval: arXiv:2310.11513)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from fedumm.data.geneval import COLORS, TAGS, GenEvalPrompt, Requirement, load_metadata
from fedumm.data.geneval_prompts import (
    COUNTS,
    DEFAULT_PROMPTS_FILE,
    IMAGES_PER_PROMPT,
    POSITION_MARGIN,
    PROMPT_RELATIONS,
    build_prompt_set,
    render_prompt,
    write_prompt_set,
)
from fedumm.data.render import COLOURS, SHAPES, SIZES, Scene
from fedumm.data.synth import VOCABULARY, tokenize
from fedumm.eval.geneval import Detection, judge, relative_position


@pytest.fixture(scope="module")
def prompts() -> list[GenEvalPrompt]:
    return build_prompt_set()


def oracle(scene: Scene) -> list[Detection]:
    """Perfect detections of a scene: its objects with score 1."""
    return [Detection(cls=o.shape, box=o.bbox, score=1.0, color=o.colour) for o in scene.objects]


def test_constants():
    assert IMAGES_PER_PROMPT == 4
    assert DEFAULT_PROMPTS_FILE == "geneval_synth_metadata.jsonl"
    assert COUNTS == (2, 3, 4)
    assert set(PROMPT_RELATIONS) == {"left of", "right of", "above", "below"}
    assert POSITION_MARGIN > 0.1  # stricter than the judge's default margin


def test_palette_is_within_geneval_colours():
    assert set(COLOURS) <= set(COLORS)


def test_size_and_tags(prompts):
    assert len(prompts) >= 300
    assert [p.index for p in prompts] == list(range(len(prompts)))
    tags = [p.tag for p in prompts]
    assert list(dict.fromkeys(tags)) == list(TAGS)  # all six, in GenEval's order, grouped
    counts = Counter(tags)
    assert counts["single_object"] == 12  # 4 shapes x (no size word, small, large)
    assert counts["counting"] == 36  # 4 shapes x 3 counts x 3 size wordings
    for tag in ("two_object", "colors", "position", "color_attr"):
        assert counts[tag] == 64


def test_no_duplicate_prompts(prompts):
    texts = [p.prompt for p in prompts]
    assert len(set(texts)) == len(texts)


def test_deterministic_for_seed(prompts):
    assert build_prompt_set() == prompts
    assert build_prompt_set(seed=0) == prompts
    other = build_prompt_set(seed=1)
    assert len(other) == len(prompts)
    assert other != prompts


def test_prompts_tokenise_into_vocabulary(prompts):
    vocabulary = set(VOCABULARY)
    for p in prompts:
        tokens = tokenize(p.prompt)
        assert tokens and set(tokens) <= vocabulary, p.prompt


def test_round_trip_through_metadata(tmp_path, prompts):
    path = write_prompt_set(tmp_path / DEFAULT_PROMPTS_FILE, prompts)
    assert path == tmp_path / DEFAULT_PROMPTS_FILE
    assert load_metadata(path) == prompts
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert (
        first
        == '{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}'
    )


def test_clauses_follow_geneval(prompts):
    for p in prompts:
        for req in (*p.include, *p.exclude):
            assert req.cls in SHAPES
            assert req.color is None or req.color in COLOURS
        if p.tag == "single_object":
            assert p.include == (Requirement(cls=p.include[0].cls, count=1),) and not p.exclude
        elif p.tag == "two_object":
            assert len(p.include) == 2 and p.include[0].cls != p.include[1].cls
            assert all(r.count == 1 and r.color is None and r.position is None for r in p.include)
        elif p.tag == "counting":
            (inc,) = p.include
            assert inc.count in COUNTS and inc.color is None
            assert p.exclude == (Requirement(cls=inc.cls, count=inc.count + 1),)
            assert p.prompt.endswith(f"{inc.cls}s")
        elif p.tag == "colors":
            (inc,) = p.include
            assert inc.count == 1 and inc.color in COLOURS
            assert p.prompt.endswith(f"{inc.color} {inc.cls}")
        elif p.tag == "position":
            reference, subject = p.include
            assert reference.position is None and subject.position is not None
            relation, target = subject.position
            assert target == 0 and reference.cls != subject.cls
            # the subject is named first, as in GenEval's "a photo of a dog right of a teddy bear"
            head, tail = p.prompt.split(f" {PROMPT_RELATIONS[relation]} ")
            assert head.endswith(subject.cls) and tail.endswith(reference.cls)
        elif p.tag == "color_attr":
            a, b = p.include
            assert a.cls != b.cls and a.color != b.color and a.color and b.color
            assert p.prompt.startswith(("a ", "an ")) and f"{a.color} {a.cls} and " in p.prompt
        if p.tag != "counting":
            assert not p.exclude


def test_clause_sets_are_spread_evenly(prompts):
    def key(p: GenEvalPrompt) -> tuple:
        return (p.include, p.exclude)

    for tag, distinct in (("two_object", 12), ("position", 48), ("colors", 24), ("counting", 12)):
        per_key = Counter(key(p) for p in prompts if p.tag == tag)
        assert len(per_key) == distinct, tag
        assert max(per_key.values()) - min(per_key.values()) <= 1, tag
    relations = Counter(p.include[1].position[0] for p in prompts if p.tag == "position")
    assert set(relations) == set(PROMPT_RELATIONS) and min(relations.values()) >= 12


def test_per_tag():
    small = build_prompt_set(per_tag=5)
    assert Counter(p.tag for p in small) == {tag: 5 for tag in TAGS}
    assert len({p.prompt for p in small}) == len(small)
    large = build_prompt_set(per_tag=100)
    assert Counter(p.tag for p in large)["single_object"] == 12
    assert Counter(p.tag for p in large)["color_attr"] == 100
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="per_tag"):
            build_prompt_set(per_tag=bad)


def test_render_prompt_satisfies_every_prompt(prompts):
    rng = np.random.default_rng(0)
    sized = 0
    for p in prompts:
        scene = render_prompt(p, rng)
        assert scene is not None, p.prompt
        assert len(scene.objects) == sum(r.count for r in p.include)
        correct, reason = judge(p, oracle(scene))
        assert correct, (p.prompt, reason)
        for obj in scene.objects:  # sizes named in the text are honoured
            named = re.search(rf"\b({'|'.join(SIZES)}) (?:{'|'.join(COLOURS)} )?{obj.shape}s?\b", p.prompt)
            if named is not None:
                sized += 1
                assert obj.size == named.group(1), p.prompt
    assert sized > 100


def test_render_prompt_positions_are_unambiguous(prompts):
    rng = np.random.default_rng(3)
    for p in (q for q in prompts if q.tag == "position"):
        scene = render_prompt(p, rng)
        assert scene is not None
        reference, subject = scene.objects
        relation = p.include[1].position[0]
        assert relative_position(subject.bbox, reference.bbox, margin=0.0) == (relation,)
        assert relation in relative_position(subject.bbox, reference.bbox, margin=POSITION_MARGIN)


def test_render_prompt_is_deterministic(prompts):
    first = [render_prompt(p, np.random.default_rng(7)) for p in prompts[:40]]
    again = [render_prompt(p, np.random.default_rng(7)) for p in prompts[:40]]
    assert first == again


def test_render_prompt_of_counting_draws_exact_count():
    p = GenEvalPrompt(
        index=0,
        tag="counting",
        prompt="four large squares",
        include=(Requirement(cls="square", count=4),),
        exclude=(Requirement(cls="square", count=5),),
    )
    scene = render_prompt(p, np.random.default_rng(0))
    assert scene is not None
    assert [o.shape for o in scene.objects] == ["square"] * 4
    assert {o.size for o in scene.objects} == {"large"}


@pytest.mark.parametrize(
    "include, exclude",
    [
        ((Requirement(cls="dog", count=1),), ()),  # not a shape of the synthetic world
        ((Requirement(cls="circle", count=1, color="pink"),), ()),  # a GenEval colour outside the palette
        ((Requirement(cls="circle", count=2),), (Requirement(cls="circle", count=2),)),  # contradictory
        ((Requirement(cls="circle", count=1),), (Requirement(cls="cat", count=1),)),  # unknown class
    ],
)
def test_render_prompt_returns_none_when_impossible(include, exclude):
    p = GenEvalPrompt(index=0, tag="counting", prompt="a circle", include=include, exclude=exclude)
    assert render_prompt(p, np.random.default_rng(0)) is None


def test_render_prompt_rejects_non_prompts():
    with pytest.raises(TypeError):
        render_prompt("a circle", np.random.default_rng(0))  # type: ignore[arg-type]
