"""Tests of the GenEval metadata reader and the GenEval judge/summary (arXiv:2310.11513)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from fedumm.data.geneval import GenEvalPrompt, Requirement, dump_metadata, load_metadata
from fedumm.errors import DataError
from fedumm.eval.geneval import (
    Detection,
    JudgeConfig,
    evaluate,
    evaluate_files,
    judge,
    load_detections,
    relative_position,
    summarize,
)

REFERENCE_METADATA = Path(
    os.environ.get(
        "FEDUMM_GENEVAL_METADATA",
        str(Path(__file__).resolve().parents[1] / "fixtures" / "geneval" / "evaluation_metadata.jsonl"),
    )
)

SQUARE = (0.0, 0.0, 100.0, 100.0)


def req(
    cls: str, count: int = 1, color: str | None = None, position: tuple[str, int] | None = None
) -> Requirement:
    return Requirement(cls=cls, count=count, color=color, position=position)


def make_prompt(
    tag: str, include: list[Requirement], exclude: list[Requirement] | None = None
) -> GenEvalPrompt:
    return GenEvalPrompt(
        index=0, tag=tag, prompt="a photo", include=tuple(include), exclude=tuple(exclude or ())
    )


def det(
    cls: str, score: float = 0.95, box: tuple[float, float, float, float] = SQUARE, color: str | None = None
):
    return Detection(cls=cls, box=box, score=score, color=color)


def shifted(dx: float = 0.0, dy: float = 0.0, size: float = 100.0) -> tuple[float, float, float, float]:
    return (dx, dy, dx + size, dy + size)


# --- metadata -------------------------------------------------------------------------------------


def test_reference_metadata_parses_with_matching_tag_counts():
    prompts = load_metadata(REFERENCE_METADATA)
    lines = REFERENCE_METADATA.read_text(encoding="utf-8").splitlines()
    assert len(prompts) == len(lines) == 553
    assert [p.index for p in prompts] == list(range(553))
    assert Counter(p.tag for p in prompts) == Counter(json.loads(line)["tag"] for line in lines)
    assert Counter(p.tag for p in prompts) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    counting = [p for p in prompts if p.tag == "counting"]
    assert all(p.exclude == (req(p.include[0].cls, p.include[0].count + 1),) for p in counting)
    position = [p for p in prompts if p.tag == "position"]
    assert all(p.include[1].position is not None and p.include[1].position[1] == 0 for p in position)


def test_dump_reproduces_reference_file_byte_for_byte(tmp_path):
    out = tmp_path / "sub" / "meta.jsonl"
    dump_metadata(load_metadata(REFERENCE_METADATA), out)
    assert out.read_bytes() == REFERENCE_METADATA.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["meta.jsonl"]  # no temporary left behind


def test_dump_requires_line_numbered_indices(tmp_path):
    prompt = GenEvalPrompt(index=3, tag="single_object", prompt="a photo of a dog", include=(req("dog"),))
    with pytest.raises(DataError, match="index 3"):
        dump_metadata([prompt], tmp_path / "m.jsonl")


GOOD_LINE = (
    '{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}'
)


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("", "blank line"),
        ('{"tag": "single_object", "prompt": "p"}', "missing 'include'"),
        ('{"tag": "shapes", "include": [{"class": "dog", "count": 1}], "prompt": "p"}', "tag must be one of"),
        (
            '{"tag": "counting", "include": [{"class": "dog", "count": 0}], "prompt": "p"}',
            r"include\[0\]: count",
        ),
        (
            '{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}], "prompt": "p"}',
            "color",
        ),
        (
            '{"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["above", 0]}], '
            '"prompt": "p"}',
            "earlier entry",
        ),
        (
            '{"tag": "position", "include": [{"class": "a", "count": 1}, '
            '{"class": "b", "count": 1, "position": ["under", 0]}], "prompt": "p"}',
            "relation",
        ),
        (
            '{"tag": "single_object", "include": [{"class": "dog", "count": 1, "size": 2}], "prompt": "p"}',
            "unknown",
        ),
        ('{"tag": "single_object", "include": [], "prompt": "p"}', "at least one"),
    ],
)
def test_malformed_metadata_line_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join([GOOD_LINE, GOOD_LINE, bad_line, GOOD_LINE]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=problem) as info:
        load_metadata(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_missing_metadata_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        load_metadata(tmp_path / "absent.jsonl")


# --- thresholds and per-class limits --------------------------------------------------------------


def test_threshold_is_strictly_above_0_3():
    prompt = make_prompt("single_object", [req("dog")])
    assert judge(prompt, [det("dog", 0.3)]) == (False, "expected dog>=1, found 0")
    assert judge(prompt, [det("dog", 0.31)]) == (True, "")
    # float32(0.3) written out as a double still equals the threshold in single precision
    assert judge(prompt, [det("dog", 0.30000001192092896)])[0] is False


def test_counting_uses_0_9_threshold_for_every_class():
    prompt = make_prompt("counting", [req("clock", 2)], [req("clock", 3)])
    assert judge(prompt, [det("clock", 0.85), det("clock", 0.85)]) == (False, "expected clock>=2, found 0")
    assert judge(prompt, [det("clock", 0.95), det("clock", 0.9)]) == (False, "expected clock>=2, found 1")
    assert judge(prompt, [det("clock", 0.95), det("clock", 0.91)]) == (True, "")
    # a third clock below 0.9 is not counted, so the exclude clause does not fire
    assert judge(prompt, [det("clock", 0.95), det("clock", 0.91), det("clock", 0.8)]) == (True, "")
    # the same 0.8 detection does count for a non-counting tag
    two = make_prompt("two_object", [req("clock"), req("cat")])
    assert judge(two, [det("clock", 0.8), det("cat", 0.5)]) == (True, "")


def test_exclude_fails_at_count_or_more():
    prompt = make_prompt("counting", [req("clock", 2)], [req("clock", 3)])
    assert judge(prompt, [det("clock")] * 3) == (False, "expected clock<3, found 3")
    assert judge(prompt, [det("clock")] * 4) == (False, "expected clock<3, found 4")


def test_at_most_16_objects_per_class_are_kept():
    prompt = make_prompt("counting", [req("bird", 4)], [req("bird", 5)])
    assert judge(prompt, [det("bird")] * 20) == (False, "expected bird<5, found 16")
    # with the cap, 20 detections never reach an exclude threshold of 17
    capped = make_prompt("counting", [req("bird", 1)], [req("bird", 17)])
    assert judge(capped, [det("bird")] * 20) == (True, "")
    assert judge(capped, [det("bird")] * 20, config=JudgeConfig(max_objects=20)) == (
        False,
        "expected bird<17, found 20",
    )


def test_only_the_most_confident_objects_are_checked():
    prompt = make_prompt("colors", [req("car", color="red")])
    detections = [det("car", 0.5, color="red"), det("car", 0.9, color="blue")]
    assert judge(prompt, detections) == (False, "expected red car>=1, found 0 red; and 1 blue")
    # equal scores: the later detection counts as more confident (descending order of an ascending sort)
    tied = [det("car", 0.5, color="red"), det("car", 0.5, color="blue")]
    assert judge(prompt, tied)[0] is False
    assert judge(prompt, tied[::-1])[0] is True


def test_overlap_suppression_is_off_by_default_and_optional():
    prompt = make_prompt("counting", [req("cup", 2)], [req("cup", 3)])
    same_place = [det("cup", 0.99), det("cup", 0.98), det("cup", 0.97, box=shifted(500))]
    assert judge(prompt, same_place) == (False, "expected cup<3, found 3")
    assert judge(prompt, same_place, config=JudgeConfig(max_overlap=0.5)) == (True, "")


# --- colour ---------------------------------------------------------------------------------------


def test_wrong_colour_reason_lists_chosen_colours_in_geneval_order():
    prompt = make_prompt("colors", [req("car", 3, color="red")])
    detections = [det("car", 0.9, color="white"), det("car", 0.8, color="red"), det("car", 0.7, color="blue")]
    assert judge(prompt, detections) == (
        False,
        "expected red car>=3, found 1 red; and 1 red, 1 blue, 1 white",
    )


def test_missing_colour_never_matches():
    prompt = make_prompt("colors", [req("car", color="red")])
    assert judge(prompt, [det("car", color=None)]) == (False, "expected red car>=1, found 0 red; and ")
    assert judge(prompt, [det("car", color="red")]) == (True, "")


def test_color_attr_checks_each_object_separately():
    prompt = make_prompt("color_attr", [req("bus", color="green"), req("microwave", color="purple")])
    good = [det("bus", color="green"), det("microwave", color="purple")]
    assert judge(prompt, good) == (True, "")
    swapped = [det("bus", color="purple"), det("microwave", color="green")]
    assert judge(prompt, swapped) == (
        False,
        "expected green bus>=1, found 0 green; and 1 purple\n"
        "expected purple microwave>=1, found 0 purple; and 1 green",
    )


# --- position -------------------------------------------------------------------------------------


def position_prompt(relation: str) -> GenEvalPrompt:
    return make_prompt("position", [req("teddy bear"), req("dog", position=(relation, 0))])


@pytest.mark.parametrize(
    ("relation", "dx", "dy"),
    [("right of", 41, 0), ("left of", -41, 0), ("below", 0, 41), ("above", 0, -41)],
)
def test_each_relation_just_past_the_margin_holds(relation, dx, dy):
    detections = [det("teddy bear", box=SQUARE), det("dog", box=shifted(dx, dy))]
    assert judge(position_prompt(relation), detections) == (True, "")


@pytest.mark.parametrize(
    ("relation", "dx", "dy"),
    [("right of", 40, 0), ("left of", -40, 0), ("below", 0, 40), ("above", 0, -40), ("right of", 20, 0)],
)
def test_relation_at_the_margin_edge_fails(relation, dx, dy):
    # boxes of side 100: margin 0.1 * (100 + 100) = 20, and the shrunk offset must exceed half the offset
    detections = [det("teddy bear", box=SQUARE), det("dog", box=shifted(dx, dy))]
    assert judge(position_prompt(relation), detections) == (
        False,
        f"expected dog {relation} target, found  target",
    )


def test_position_margin_formula():
    assert relative_position(shifted(41), SQUARE) == ("right of",)
    assert relative_position(shifted(40), SQUARE) == ()
    # margin scales with both sizes: widths 50 and 150 also give 20
    assert relative_position((65.0, 25.0, 115.0, 75.0), (-25.0, -25.0, 125.0, 125.0)) == ()
    assert relative_position((66.0, 25.0, 116.0, 75.0), (-25.0, -25.0, 125.0, 125.0)) == ("right of",)
    # a diagonal offset gives two relations; a steep one only the dominant axis
    assert relative_position(shifted(300, 300, size=10), SQUARE) == ("right of", "below")
    assert relative_position(shifted(50, 300, size=10), SQUARE) == ("below",)
    assert relative_position(SQUARE, SQUARE) == ()
    assert relative_position(shifted(41), SQUARE, margin=0.0) == ("right of",)
    assert relative_position(shifted(1), SQUARE, margin=0.0) == ("right of",)


def test_wrong_position_reason_names_the_relations_found():
    detections = [det("teddy bear", box=SQUARE), det("dog", box=shifted(-60))]
    assert judge(position_prompt("right of"), detections) == (
        False,
        "expected dog right of target, found left of target",
    )
    diagonal = [det("teddy bear", box=SQUARE), det("dog", box=shifted(300, 300, size=10))]
    assert judge(position_prompt("above"), diagonal) == (
        False,
        "expected dog above target, found right of and below target",
    )


def test_position_uses_the_most_confident_target_only():
    left_bear = det("teddy bear", 0.9, box=SQUARE)
    right_bear = det("teddy bear", 0.5, box=shifted(400))
    dog = det("dog", box=shifted(200))
    assert judge(position_prompt("right of"), [left_bear, right_bear, dog]) == (True, "")
    demoted = det("teddy bear", 0.4, box=SQUARE)
    assert judge(position_prompt("right of"), [demoted, right_bear, dog]) == (
        False,
        "expected dog right of target, found left of target",
    )


def test_position_with_several_objects_needs_every_pair():
    prompt = make_prompt("position", [req("cup", 2), req("fork", 2, position=("below", 0))])
    cups = [det("cup", box=shifted(0, 0)), det("cup", box=shifted(300, 0))]
    below_both = [det("fork", box=shifted(0, 400)), det("fork", box=shifted(300, 400))]
    assert judge(prompt, cups + below_both) == (True, "")
    one_beside = [det("fork", box=shifted(0, 400)), det("fork", 0.5, box=shifted(300, 0))]
    assert judge(prompt, cups + one_beside)[0] is False


def test_missing_objects_in_position_prompts():
    bear_only = [det("teddy bear")]
    assert judge(position_prompt("right of"), bear_only) == (False, "expected dog>=1, found 0")
    dog_only = [det("dog")]
    assert judge(position_prompt("right of"), dog_only) == (
        False,
        "expected teddy bear>=1, found 0\nno target for dog to be right of",
    )


def test_position_is_skipped_when_colour_fails():
    prompt = make_prompt("position", [req("cup"), req("fork", color="red", position=("below", 0))])
    detections = [det("cup", box=SQUARE), det("fork", box=shifted(300), color="blue")]
    assert judge(prompt, detections) == (False, "expected red fork>=1, found 0 red; and 1 blue")


# --- single and two objects -----------------------------------------------------------------------


def test_single_and_two_object_prompts():
    single = make_prompt("single_object", [req("dog")])
    assert judge(single, []) == (False, "expected dog>=1, found 0")
    assert judge(single, [det("cat"), det("dog")]) == (True, "")
    two = make_prompt("two_object", [req("dog"), req("cat")])
    assert judge(two, [det("dog"), det("cat")]) == (True, "")
    assert judge(two, [det("dog")]) == (False, "expected cat>=1, found 0")
    assert judge(two, []) == (False, "expected dog>=1, found 0\nexpected cat>=1, found 0")


# --- summary --------------------------------------------------------------------------------------


def test_overall_is_unweighted_mean_of_tag_scores():
    images = [{"tag": "colors", "correct": True}] + [{"tag": "counting", "correct": False}] * 3
    summary = summarize(images)
    assert summary["tags"] == {"colors": 1.0, "counting": 0.0}
    assert summary["overall"] == pytest.approx(0.5)  # the image-weighted mean would be 0.25


def test_evaluate_scores_images_not_prompts():
    prompts = [
        GenEvalPrompt(index=0, tag="single_object", prompt="a photo of a dog", include=(req("dog"),)),
        GenEvalPrompt(index=1, tag="single_object", prompt="a photo of a cat", include=(req("cat"),)),
        GenEvalPrompt(
            index=2, tag="two_object", prompt="a photo of a dog and a cat", include=(req("dog"), req("cat"))
        ),
    ]
    result = evaluate(
        prompts, {1: [[det("cat")], [], [], []], 0: [[det("dog")]], 2: [[det("dog"), det("cat")]]}
    )
    assert set(result) == {"images", "tags", "overall"}
    assert [(im["index"], im["correct"]) for im in result["images"]] == [
        (0, True),
        (1, True),
        (1, False),
        (1, False),
        (1, False),
        (2, True),
    ]
    assert set(result["images"][0]) == {"index", "tag", "correct", "reason"}
    assert result["images"][2]["reason"] == "expected cat>=1, found 0"
    # single_object: 2 of 5 images (averaging prompts first would give 0.625)
    assert result["tags"] == {"single_object": pytest.approx(0.4), "two_object": 1.0}
    assert result["overall"] == pytest.approx(0.7)


def test_evaluate_rejects_unknown_index_and_flat_detection_lists():
    prompts = [GenEvalPrompt(index=0, tag="single_object", prompt="p", include=(req("dog"),))]
    with pytest.raises(DataError, match="index 5"):
        evaluate(prompts, {5: [[det("dog")]]})
    with pytest.raises(TypeError, match="list of images"):
        evaluate(prompts, {0: [det("dog")]})  # type: ignore[list-item]


# --- detection files ------------------------------------------------------------------------------


def detection_line(index: int, *dets: dict) -> str:
    return json.dumps({"index": index, "detections": list(dets)})


DOG = {"class": "dog", "box": [0, 0, 10, 10], "score": 0.9, "color": "brown"}


def test_load_detections_keeps_images_of_one_prompt_apart(tmp_path):
    path = tmp_path / "det.jsonl"
    lines = [
        detection_line(0, DOG),
        detection_line(2),
        detection_line(0, {"class": "cat", "box": [1, 2, 3, 4], "score": 0.5}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = load_detections(path)
    assert sorted(loaded) == [0, 2]
    assert len(loaded[0]) == 2 and loaded[2] == [[]]
    assert loaded[0][0] == [Detection(cls="dog", box=(0.0, 0.0, 10.0, 10.0), score=0.9, color="brown")]
    assert loaded[0][1][0].color is None


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"index": 0, "detections": [', "invalid JSON"),
        ('{"detections": []}', "missing 'index'"),
        ('{"index": -1, "detections": []}', "index must be"),
        ('{"index": 0, "detections": {}}', "must be a list"),
        (detection_line(0, {"class": "dog", "box": [0, 0, 10], "score": 0.9}), r"detections\[0\]: box"),
        (detection_line(0, {"class": "dog", "box": [10, 0, 0, 10], "score": 0.9}), "x1 <= x2"),
        (detection_line(0, {"class": "dog", "box": [0, 0, 1, 1]}), "missing 'score'"),
        (detection_line(0, {"class": "dog", "box": [0, 0, 1, 1], "score": 1.5}), "score"),
        (detection_line(0, {"class": "dog", "box": [0, 0, 1, 1], "score": 0.5, "color": "teal"}), "color"),
        (detection_line(0, {"class": "dog", "box": [0, 0, 1, 1], "score": 0.5, "colour": "red"}), "unknown"),
    ],
)
def test_malformed_detection_line_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "det.jsonl"
    path.write_text("\n".join([detection_line(0, DOG), bad_line]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=problem) as info:
        load_detections(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_evaluate_files_end_to_end(tmp_path):
    prompts = [
        GenEvalPrompt(index=0, tag="single_object", prompt="a photo of a dog", include=(req("dog"),)),
        GenEvalPrompt(
            index=1,
            tag="counting",
            prompt="a photo of two dogs",
            include=(req("dog", 2),),
            exclude=(req("dog", 3),),
        ),
    ]
    meta = tmp_path / "meta.jsonl"
    dump_metadata(prompts, meta)
    dets = tmp_path / "det.jsonl"
    dets.write_text(
        "\n".join([detection_line(0, DOG), detection_line(1, DOG, DOG, DOG)]) + "\n", encoding="utf-8"
    )
    result = evaluate_files(meta, dets)
    assert result["tags"] == {"single_object": 1.0, "counting": 0.0}
    assert result["images"][1]["reason"] == "expected dog>=2, found 0"  # 0.9 is not above 0.9
    assert result["overall"] == pytest.approx(0.5)
    dets.write_text(detection_line(0, DOG) + "\n" + detection_line(7, DOG) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        evaluate_files(meta, dets)
    assert str(info.value).startswith(f"{dets}:2: index 7 is out of range")
