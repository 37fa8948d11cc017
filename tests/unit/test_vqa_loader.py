"""VQA v2 loader: the synthetic world, real VQA v2 naming, and one DataError per malformed input."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fedumm.data import synth, vqa
from fedumm.data.vqa import VQASample, load_image, load_split, load_vqa
from fedumm.errors import DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> synth.WorldManifest:
    return synth.synthesize(tmp_path_factory.mktemp("world"), seed=11, images={"public": 6, "private": 4})


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# loading


def test_load_split_matches_files(world: synth.WorldManifest) -> None:
    files = world.split("public")
    samples = load_split(world.root, "public")
    questions = read(files.questions_path)["questions"]
    annotations = {a["question_id"]: a for a in read(files.annotations_path)["annotations"]}
    assert [s.question_id for s in samples] == [q["question_id"] for q in questions]
    for sample, q in zip(samples, questions, strict=True):
        ann = annotations[q["question_id"]]
        assert isinstance(sample, VQASample)
        assert (sample.image_id, sample.question) == (q["image_id"], q["question"])
        assert sample.answers == tuple(a["answer"] for a in ann["answers"]) and len(sample.answers) == 10
        assert sample.multiple_choice_answer == ann["multiple_choice_answer"]
        assert (sample.answer_type, sample.question_type) == (ann["answer_type"], ann["question_type"])
        assert sample.image_path == files.image_dir / f"COCO_public_{q['image_id']:012d}.jpg"
        assert sample.image_path.is_file()


def test_load_image_is_rgb(world: synth.WorldManifest) -> None:
    sample = load_split(world.root, "private")[0]
    image = load_image(sample.image_path)
    assert image.mode == "RGB" and image.size == (64, 64)


def test_real_vqa_layout_and_custom_pattern(world: synth.WorldManifest, tmp_path: Path) -> None:
    """Real VQA v2 naming: data_subtype 'train2014' and images under '{split}/'."""
    files = world.split("private")
    questions, annotations = read(files.questions_path), read(files.annotations_path)
    questions["data_subtype"] = annotations["data_subtype"] = "train2014"
    write(tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json", questions)
    write(tmp_path / "v2_mscoco_train2014_annotations.json", annotations)
    (tmp_path / "train2014").mkdir()
    for image in files.image_dir.iterdir():
        shutil.copy(image, tmp_path / "train2014" / image.name.replace("private", "train2014"))
    samples = load_split(tmp_path, "train2014")
    assert len(samples) == files.num_questions
    assert all(s.image_path.parent == tmp_path / "train2014" for s in samples)
    custom = load_vqa(
        files.questions_path,
        files.annotations_path,
        files.image_dir,
        image_name_pattern="COCO_{data_subtype}_{image_id:012d}.jpg",
    )
    assert [s.image_path for s in custom] == [s.image_path for s in load_split(world.root, "private")]
    with pytest.raises(ValueError, match="image_name_pattern"):
        load_vqa(
            files.questions_path, files.annotations_path, files.image_dir, image_name_pattern="{split}.jpg"
        )


def test_check_images_false_skips_image_checks(world: synth.WorldManifest, tmp_path: Path) -> None:
    files = world.split("public")
    samples = load_vqa(files.questions_path, files.annotations_path, tmp_path / "nowhere", check_images=False)
    assert len(samples) == files.num_questions


def test_split_paths(tmp_path: Path) -> None:
    q, a, images = vqa.split_paths(tmp_path, "val2014")
    assert q.name == "v2_OpenEnded_mscoco_val2014_questions.json"
    assert a.name == "v2_mscoco_val2014_annotations.json"
    assert images == tmp_path / "images" / "val2014"
    (tmp_path / "val2014").mkdir()
    assert vqa.split_paths(tmp_path, "val2014")[2] == tmp_path / "val2014"


# --------------------------------------------------------------------------------------------
# errors


Mutation = Callable[[dict, dict], None]


def _drop_question_key(q: dict, a: dict) -> None:
    del q["questions"][3]["question"]


def _wrong_type(q: dict, a: dict) -> None:
    q["questions"][2]["image_id"] = "12"


def _bool_id(q: dict, a: dict) -> None:
    q["questions"][1]["question_id"] = True


def _not_an_object(q: dict, a: dict) -> None:
    q["questions"][4] = ["image_id", 1]


def _no_annotation(q: dict, a: dict) -> None:
    del a["annotations"][5]


def _unknown_question(q: dict, a: dict) -> None:
    a["annotations"][0]["question_id"] = 987654321


def _duplicate_question(q: dict, a: dict) -> None:
    q["questions"].append(copy.deepcopy(q["questions"][0]))


def _duplicate_annotation(q: dict, a: dict) -> None:
    a["annotations"].append(copy.deepcopy(a["annotations"][1]))


def _empty_answers(q: dict, a: dict) -> None:
    a["annotations"][6]["answers"] = []


def _bad_answer(q: dict, a: dict) -> None:
    a["annotations"][6]["answers"][2] = {"answer": 3}


def _annotation_missing_key(q: dict, a: dict) -> None:
    del a["annotations"][7]["multiple_choice_answer"]


def _image_mismatch(q: dict, a: dict) -> None:
    a["annotations"][8]["image_id"] += 1


def _no_questions_key(q: dict, a: dict) -> None:
    del q["questions"]


def _no_subtype(q: dict, a: dict) -> None:
    del q["data_subtype"]


def _no_annotations_key(q: dict, a: dict) -> None:
    del a["annotations"]


def _questions_not_list(q: dict, a: dict) -> None:
    q["questions"] = {"a": 1}


CASES: list[tuple[Mutation, str, list[str]]] = [
    # (mutation, file at fault, message fragments; {qI}: "question_id=<id of questions[I]>", {idI}: the id)
    (_drop_question_key, "questions", ["questions[3]", "{q3}", "missing key 'question'"]),
    (_wrong_type, "questions", ["questions[2]", "{q2}", "'image_id' must be int, got str"]),
    (_bool_id, "questions", ["questions[1]", "'question_id' must be int, got bool"]),
    (_not_an_object, "questions", ["questions[4]", "must be a JSON object"]),
    (_no_annotation, "questions", ["question_id {id5} has no annotation in", "annotations.json"]),
    (_unknown_question, "annotations", ["annotations[0]", "question_id 987654321", "absent from"]),
    (_duplicate_question, "questions", ["duplicate question_id {id0}", "first at questions[0]"]),
    (_duplicate_annotation, "annotations", ["duplicate annotation", "{q1}"]),
    (_empty_answers, "annotations", ["annotations[6]", "{q6}", "empty answers list"]),
    (_bad_answer, "annotations", ["annotations[6]", "answers[2]"]),
    (_annotation_missing_key, "annotations", ["annotations[7]", "missing key 'multiple_choice_answer'"]),
    (_image_mismatch, "annotations", ["annotations[8]", "image_id"]),
    (_no_questions_key, "questions", ["missing top-level key 'questions'"]),
    (_no_subtype, "questions", ["missing top-level key 'data_subtype'"]),
    (_no_annotations_key, "annotations", ["missing top-level key 'annotations'"]),
    (_questions_not_list, "questions", ["top-level key 'questions' must be list, got dict"]),
]


@pytest.mark.parametrize(
    ("mutate", "culprit", "fragments"), CASES, ids=[c[0].__name__.strip("_") for c in CASES]
)
def test_malformed_records_raise_one_data_error(
    world: synth.WorldManifest, tmp_path: Path, mutate: Mutation, culprit: str, fragments: list[str]
) -> None:
    files = world.split("public")
    questions, annotations = read(files.questions_path), read(files.annotations_path)
    qids = [q["question_id"] for q in questions["questions"]]
    mutate(questions, annotations)
    q_path = write(tmp_path / "questions.json", questions)
    a_path = write(tmp_path / "annotations.json", annotations)
    with pytest.raises(DataError) as info:
        load_vqa(q_path, a_path, files.image_dir)
    message = str(info.value)
    assert message.startswith(str(q_path if culprit == "questions" else a_path))
    names = {f"q{i}": f"question_id={qid}" for i, qid in enumerate(qids[:10])}
    names |= {f"id{i}": str(qid) for i, qid in enumerate(qids[:10])}
    for fragment in fragments:
        assert fragment.format_map(names) in message, (fragment, message)


def test_missing_files(world: synth.WorldManifest, tmp_path: Path) -> None:
    files = world.split("public")
    with pytest.raises(DataError, match=r"nope_questions\.json: file not found"):
        load_vqa(tmp_path / "nope_questions.json", files.annotations_path, files.image_dir)
    with pytest.raises(DataError, match=r"nope_annotations\.json: file not found"):
        load_vqa(files.questions_path, tmp_path / "nope_annotations.json", files.image_dir)
    with pytest.raises(DataError, match="v2_OpenEnded_mscoco_absent_questions.json: file not found"):
        load_split(world.root, "absent")


def test_malformed_json_names_line_and_column(world: synth.WorldManifest, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"questions": [\n  {"image_id": 1,, "question": "x"}\n]}\n')
    files = world.split("public")
    with pytest.raises(DataError) as info:
        load_vqa(files.questions_path, broken, files.image_dir)
    assert str(info.value).startswith(f"{broken}: malformed JSON at line 2, column 18")
    write(broken, [1, 2])
    with pytest.raises(DataError, match="top level must be a JSON object, got list"):
        load_vqa(broken, files.annotations_path, files.image_dir)


def test_missing_image_names_path_and_question(world: synth.WorldManifest, tmp_path: Path) -> None:
    files = world.split("private")
    images = tmp_path / "images"
    shutil.copytree(files.image_dir, images)
    samples = load_vqa(files.questions_path, files.annotations_path, images)
    victim = samples[4]
    victim_path = images / victim.image_path.name
    victim_path.unlink()
    first_user = next(s for s in samples if s.image_id == victim.image_id)
    with pytest.raises(DataError) as info:
        load_vqa(files.questions_path, files.annotations_path, images)
    message = str(info.value)
    assert str(victim_path) in message and f"question_id {first_user.question_id}" in message
    assert str(files.questions_path) in message


def test_image_files_are_not_decoded_by_the_loader(world: synth.WorldManifest, tmp_path: Path) -> None:
    files = world.split("private")
    images = tmp_path / "images"
    shutil.copytree(files.image_dir, images)
    corrupt = sorted(images.iterdir())[0]
    corrupt.write_bytes(b"not a jpeg")
    samples = load_vqa(files.questions_path, files.annotations_path, images)
    sample = next(s for s in samples if s.image_path == corrupt)
    with pytest.raises(DataError, match=f"{corrupt}: cannot decode image"):
        load_image(sample.image_path)
    with pytest.raises(DataError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
