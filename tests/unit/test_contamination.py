"""GenEval prompts against training captions: parsing, verbatim and composition overlap, held-out set."""

from __future__ import annotations

import pytest

from fedumm.config import load_config
from fedumm.data.contamination import CaptionIndex, contamination, held_out_prompt_set, parse_composition
from fedumm.data.geneval import GenEvalPrompt, Requirement
from fedumm.errors import ConfigError

CAPTIONS = [
    "two circles",
    "a small red circle to the left of a large square.",
    "a large orange diamond, a small blue triangle and a circle",
    "an orange square and a green circle",
]


def test_captions_and_prompts_parse_into_objects_and_relations():
    comp = parse_composition("a small red circle to the left of a large square.")
    assert comp.objects == ((1, "small", "red", "circle"), (1, "large", None, "square"))
    assert comp.relation == "left of"
    comp = parse_composition("a large orange diamond, a small blue triangle and three circles")
    assert comp.relation is None and comp.objects[2] == (3, None, None, "circle")
    with pytest.raises(ValueError, match="a photo of a bench"):
        parse_composition("a photo of a bench")


@pytest.mark.parametrize(
    ("prompt", "verbatim", "occurs"),
    [
        ("two circles", True, True),
        ("three circles", False, False),  # a count never captioned
        ("a circle", False, True),  # any caption's circle
        ("a red circle", False, True),  # the small red circle has at least these attributes
        ("a large red circle", False, False),
        ("a circle to the left of a square", False, True),
        ("a square to the right of a circle", False, False),  # the caption's relation, not its converse
        ("a circle above a square", False, False),
        ("a triangle and a large diamond", False, True),  # two distinct phrases of one caption
        ("a diamond and a square", False, False),  # never in one caption together
        ("an orange square and a green circle", True, True),  # "an" as captions write "a"
        ("a green circle and an orange square", False, True),  # "and" is unordered
    ],
)
def test_verbatim_and_composition_overlap_by_hand(prompt, verbatim, occurs):
    index = CaptionIndex(CAPTIONS)
    assert index.verbatim(prompt) is verbatim
    assert index.occurs(prompt) is occurs


def test_contamination_counts_and_reads_real_geneval_prompts_verbatim_only():
    prompts = [
        GenEvalPrompt(index=i, tag="single_object", prompt=t, include=(Requirement(cls="circle", count=1),))
        for i, t in enumerate(["two circles", "three circles", "a circle", "a photo of a bench"])
    ]
    got = contamination(prompts, CaptionIndex(CAPTIONS))
    assert got == {"prompts": 4, "verbatim": 1, "composition": 2, "unread": 1}


def test_held_out_set_holds_no_trained_composition_and_is_seeded():
    index = CaptionIndex(CAPTIONS)
    held = held_out_prompt_set(index, seed=0, per_tag=8)
    assert held and not any(index.occurs(p.prompt) for p in held)
    assert [p.index for p in held] == list(range(len(held)))
    assert {p.tag for p in held} >= {"counting", "position", "color_attr"}
    assert "a circle" not in {p.prompt for p in held}
    assert [p.prompt for p in held_out_prompt_set(index, seed=0, per_tag=8)] == [p.prompt for p in held]


def test_held_out_needs_the_builtin_prompts(tmp_path):
    geneval = {"held_out": True, "metadata": str(tmp_path / "m.jsonl")}
    tree = {"data": {"path": str(tmp_path)}, "geneval": geneval}
    with pytest.raises(ConfigError, match="held_out"):
        load_config(None, tree=tree)
