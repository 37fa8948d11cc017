"""Synthetic world: determinism, exact VQA v2 / COCO formats, ids, shift, vocabulary and rendering."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedumm.data import render, synth
from fedumm.data.render import COLOURS, Scene, SceneObject
from fedumm.data.vqa import canonical_answer, majority_answer
from fedumm.errors import DataError

SMALL = {"public": 20, "private": 20, "val": 10, "test": 10}
PUBLIC_QTYPES = {"what color is the", "what shape is the", "is there a", "how many"}
CONFIDENCES = {"yes", "maybe", "no"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> synth.WorldManifest:
    return synth.synthesize(tmp_path_factory.mktemp("world"), seed=0, images=SMALL)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> synth.WorldManifest:
    """Enough images for distribution statistics."""
    return synth.synthesize(tmp_path_factory.mktemp("big"), seed=3, images={"public": 200, "private": 200})


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def questions_by_id(files: synth.SplitFiles) -> dict[int, dict]:
    return {q["question_id"]: q for q in read(files.questions_path)["questions"]}


def annotations(files: synth.SplitFiles) -> list[dict]:
    return read(files.annotations_path)["annotations"]


# --------------------------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_files(world: synth.WorldManifest, tmp_path: Path) -> None:
    again = synth.synthesize(tmp_path / "again", seed=0, images=SMALL)
    first, second = tree_bytes(world.root), tree_bytes(again.root)
    assert len(first) == 4 * 4 + 1 + sum(SMALL.values())
    assert first == second


def test_other_seed_gives_other_world(tmp_path: Path) -> None:
    a = synth.synthesize(tmp_path / "a", seed=1, images={"public": 5})
    b = synth.synthesize(tmp_path / "b", seed=2, images={"public": 5})
    assert a.split("public").questions_path.read_bytes() != b.split("public").questions_path.read_bytes()


def test_split_size_does_not_change_other_splits(tmp_path: Path) -> None:
    a = synth.synthesize(tmp_path / "a", seed=7, images={"public": 4, "private": 3})
    b = synth.synthesize(tmp_path / "b", seed=7, images={"public": 4, "private": 6})
    for name in ("questions_path", "annotations_path", "captions_path", "scenes_path"):
        assert getattr(a.split("public"), name).read_bytes() == getattr(b.split("public"), name).read_bytes()
    qa, qb = read(a.split("private").questions_path), read(b.split("private").questions_path)
    assert qb["questions"][: len(qa["questions"])] == qa["questions"]


def test_progress_and_manifest(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    manifest = synth.synthesize(
        tmp_path, seed=0, images={"val": 3, "public": 2}, progress=lambda *args: calls.append(args)
    )
    assert manifest.split_names == ("public", "val")
    assert calls == [("public", 1, 2), ("public", 2, 2), ("val", 1, 3), ("val", 2, 3), ("val", 3, 3)]
    world = read(manifest.world_path)
    assert world["seed"] == 0 and world["format_version"] == synth.FORMAT_VERSION
    assert world["splits"] == {"public": {"images": 2, "questions": 6}, "val": {"images": 3, "questions": 9}}
    assert world["shapes"] == list(render.SHAPES)
    assert set(world["colours"]) == set(COLOURS) and set(world["sizes"]) == set(render.SIZES)
    assert world["held_out_combos"] == [list(c) for c in synth.HELD_OUT_COMBOS]
    assert world["captions_name_shapes"] == {"public": False, "val": True}
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "kwargs",
    [{"images": {"nope": 3}}, {"images": {"public": -1}}, {"seed": -1}, {"questions_per_image": 11}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        synth.synthesize(tmp_path, **kwargs)


def test_default_sizes() -> None:
    assert dict(synth.DEFAULT_IMAGES) == {"public": 3000, "private": 1000, "val": 250, "test": 250}


# --------------------------------------------------------------------------------------------
# formats and ids


def test_questions_format(world: synth.WorldManifest) -> None:
    for files in world.splits:
        doc = read(files.questions_path)
        assert files.questions_path.name == f"v2_OpenEnded_mscoco_{files.name}_questions.json"
        assert set(doc) == {"info", "task_type", "data_type", "license", "data_subtype", "questions"}
        assert doc["task_type"] == "Open-Ended" and doc["data_type"] == "mscoco"
        assert doc["data_subtype"] == files.name
        assert len(doc["questions"]) == files.num_questions == 3 * files.num_images
        for q in doc["questions"]:
            assert set(q) == {"image_id", "question", "question_id"}
            assert q["question"] == q["question"].lower() and q["question"].endswith("?")


def test_annotations_format(world: synth.WorldManifest) -> None:
    for files in world.splits:
        doc = read(files.annotations_path)
        assert files.annotations_path.name == f"v2_mscoco_{files.name}_annotations.json"
        assert set(doc) == {"info", "license", "data_subtype", "annotations"}
        questions = questions_by_id(files)
        assert [a["question_id"] for a in doc["annotations"]] == list(questions)
        for a in doc["annotations"]:
            assert set(a) == {
                "question_type",
                "multiple_choice_answer",
                "answers",
                "image_id",
                "answer_type",
                "question_id",
            }
            assert a["image_id"] == questions[a["question_id"]]["image_id"]
            assert a["answer_type"] in {"yes/no", "number", "other"}
            assert questions[a["question_id"]]["question"].startswith(a["question_type"])
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            for x in a["answers"]:
                assert set(x) == {"answer", "answer_confidence", "answer_id"}
                assert x["answer_confidence"] in CONFIDENCES


def test_captions_and_scenes_format(world: synth.WorldManifest) -> None:
    for files in world.splits:
        captions = read(files.captions_path)
        assert set(captions) == {"info", "licenses", "images", "annotations"}
        per_image = 1 if files.name == "public" else 2  # canonical + prompt-style outside public
        assert len(captions["images"]) == files.num_images
        assert len(captions["annotations"]) == per_image * files.num_images
        ids = [c["id"] for c in captions["annotations"]]
        assert len(set(ids)) == len(ids)
        by_image = {}
        for cap in captions["annotations"]:
            assert set(cap) == {"id", "image_id", "caption"}
            by_image.setdefault(cap["image_id"], []).append(cap["caption"])
        for image in captions["images"]:
            assert set(image) == {"id", "file_name", "width", "height"}
            assert image["file_name"] == f"COCO_{files.name}_{image['id']:012d}.jpg"
            assert (files.image_dir / image["file_name"]).is_file()
            texts = by_image[image["id"]]
            assert len(texts) == per_image and texts[0].endswith(".")
            if per_image == 2:
                assert not texts[1].endswith(".") and texts[1] != texts[0]
        scenes = render.load_scenes(files.scenes_path)
        assert sorted(scenes) == [i["id"] for i in captions["images"]]
        for image in captions["images"]:  # the canonical caption; public ones name no shape
            scene = scenes[image["id"]]
            canonical = by_image[image["id"]][0]
            assert canonical == render.caption_scene(scene, shapes=files.name != "public")
            named = set(synth.tokenize(canonical)) & set(render.SHAPES)
            assert named == (set() if files.name == "public" else {o.shape for o in scene.objects})
        for record in read(files.scenes_path)["scenes"]:
            for obj in record["objects"]:
                assert set(obj) == {"shape", "colour", "size", "cx", "cy", "bbox"}


def test_images_are_64px_jpeg(world: synth.WorldManifest) -> None:
    files = world.split("val")
    paths = sorted(files.image_dir.iterdir())
    assert files.image_dir == world.root / "images" / "val" and len(paths) == files.num_images
    with Image.open(paths[0]) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 64), "RGB")


def test_ids_unique_across_world(world: synth.WorldManifest) -> None:
    image_ids: list[int] = []
    question_ids: list[int] = []
    for files in world.splits:
        image_ids += [i["id"] for i in read(files.captions_path)["images"]]
        question_ids += list(questions_by_id(files))
        question_ids_raw = [q["question_id"] for q in read(files.questions_path)["questions"]]
        assert len(question_ids_raw) == len(set(question_ids_raw))
    assert len(image_ids) == len(set(image_ids)) == sum(SMALL.values())
    assert len(question_ids) == len(set(question_ids))


# --------------------------------------------------------------------------------------------
# answers and vocabulary


def test_multiple_choice_answer_is_canonical_majority(world: synth.WorldManifest) -> None:
    noisy = 0
    for files in world.splits:
        for a in annotations(files):
            raw = [x["answer"] for x in a["answers"]]
            canon = Counter(canonical_answer(r) for r in raw)
            assert a["multiple_choice_answer"] == majority_answer(raw) == canon.most_common(1)[0][0]
            assert canon[a["multiple_choice_answer"]] >= 6
            assert a["multiple_choice_answer"] == canonical_answer(a["multiple_choice_answer"])
            assert len(a["multiple_choice_answer"].split()) == 1
            noisy += sum(r != a["multiple_choice_answer"] for r in raw)
    assert noisy > 0


def test_noise_vanishes_under_official_normalisation(world: synth.WorldManifest) -> None:
    official = pytest.importorskip("fedumm.eval.vqa")
    for a in annotations(world.split("private")):
        for x in a["answers"]:
            assert official.normalize_answer(x["answer"]) == canonical_answer(x["answer"])


def test_everything_tokenises_into_vocabulary(world: synth.WorldManifest) -> None:
    vocab = set(synth.VOCABULARY)
    assert list(synth.VOCABULARY) == sorted(vocab)
    assert {"?", ".", ",", "0", "4", "four", "zero"} <= vocab
    texts: list[str] = []
    for files in world.splits:
        texts += [q["question"] for q in read(files.questions_path)["questions"]]
        texts += [a["multiple_choice_answer"] for a in annotations(files)]
        texts += [c["caption"] for c in read(files.captions_path)["annotations"]]
    tokens = {t for text in texts for t in synth.tokenize(text)}
    assert tokens <= vocab, tokens - vocab
    assert synth.tokenize("Is there a red circle?") == ["is", "there", "a", "red", "circle", "?"]


# --------------------------------------------------------------------------------------------
# distribution shift


def test_private_asks_question_types_public_never_does(world: synth.WorldManifest) -> None:
    public = {a["question_type"] for a in annotations(world.split("public"))}
    private = {a["question_type"] for a in annotations(world.split("private"))}
    assert public <= PUBLIC_QTYPES
    assert {"is the", "where is the"} <= private - public


def test_held_out_combos_absent_from_public(big: synth.WorldManifest) -> None:
    held = set(synth.HELD_OUT_COMBOS)
    public_scenes = render.load_scenes(big.split("public").scenes_path).values()
    assert all((o.colour, o.shape) not in held for s in public_scenes for o in s.objects)
    public_q = " ".join(q["question"] for q in questions_by_id(big.split("public")).values())
    assert all(f"{c} {s}" not in public_q for c, s in held)
    private_scenes = render.load_scenes(big.split("private").scenes_path).values()
    assert any((o.colour, o.shape) in held for s in private_scenes for o in s.objects)
    private_q = [q["question"] for q in questions_by_id(big.split("private")).values()]
    assert any(q.startswith("is there") and any(f"{c} {s}" in q for c, s in held) for q in private_q)


def test_split_statistics(big: synth.WorldManifest) -> None:
    for name, (lo, hi) in {"public": (1, 3), "private": (2, 4)}.items():
        counts = Counter(len(s.objects) for s in render.load_scenes(big.split(name).scenes_path).values())
        assert set(counts) == set(range(lo, hi + 1))
    priv = annotations(big.split("private"))
    questions = questions_by_id(big.split("private"))
    hard = [
        a
        for a in priv
        if a["question_type"] in {"is the", "where is the"}
        or (
            a["question_type"] == "how many"
            and questions[a["question_id"]]["question"] != "how many objects are there?"
        )
    ]
    assert 0.4 <= len(hard) / len(priv) <= 0.6
    numbers = {a["multiple_choice_answer"] for a in priv if a["answer_type"] == "number"}
    assert numbers == {"0", "1", "2", "3", "4"}
    where = {a["multiple_choice_answer"] for a in priv if a["question_type"] == "where is the"}
    assert where == set(render.RELATIONS)
    for split in ("public", "private"):
        yes_no = [
            a["multiple_choice_answer"] for a in annotations(big.split(split)) if a["answer_type"] == "yes/no"
        ]
        assert 0.35 <= yes_no.count("yes") / len(yes_no) <= 0.65


def test_spatial_answers_match_scene(big: synth.WorldManifest) -> None:
    files = big.split("private")
    scenes = render.load_scenes(files.scenes_path)
    questions = questions_by_id(files)
    for a in annotations(files):
        if a["question_type"] != "where is the":
            continue
        words = questions[a["question_id"]]["question"].rstrip("?").split()
        (first,) = [o for o in scenes[a["image_id"]].objects if (o.colour, o.shape) == (words[3], words[4])]
        (second,) = [o for o in scenes[a["image_id"]].objects if (o.colour, o.shape) == (words[8], words[9])]
        relation, offset = render.relation(first, second)
        assert relation == a["multiple_choice_answer"] and offset >= 8


# --------------------------------------------------------------------------------------------
# rendering


def test_render_puts_object_colour_at_centre() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = render.sample_scene(rng, n_objects=int(rng.integers(1, 5)))
        pixels = np.asarray(render.render_scene(scene))
        assert pixels.shape == (64, 64, 3)
        assert (pixels == np.array(render.BACKGROUND)).all(-1).sum() > 64 * 64 // 3
        for obj in scene.objects:
            assert tuple(pixels[obj.cy, obj.cx]) == obj.rgb


def test_jpeg_keeps_centre_colour(world: synth.WorldManifest) -> None:
    files = world.split("private")
    for image_id, scene in render.load_scenes(files.scenes_path).items():
        with Image.open(files.image_dir / synth.image_file_name("private", image_id)) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        for obj in scene.objects:
            assert np.abs(pixels[obj.cy, obj.cx] - np.array(obj.rgb)).max() <= 24


def test_render_is_deterministic_and_colours_are_distinct() -> None:
    scene = render.sample_scene(np.random.default_rng(5), n_objects=4)
    assert render.render_scene(scene).tobytes() == render.render_scene(scene).tobytes()
    rgbs = np.array(list(COLOURS.values()) + [render.BACKGROUND])
    distances = np.abs(rgbs[:, None, :] - rgbs[None, :, :]).sum(-1)
    assert distances[~np.eye(len(rgbs), dtype=bool)].min() >= 80


def test_sample_scene_separation_and_allowed() -> None:
    rng = np.random.default_rng(1)
    allowed = [("red", "circle"), ("blue", "square")]
    for _ in range(100):
        scene = render.sample_scene(rng, n_objects=4, allowed=allowed)
        assert {(o.colour, o.shape) for o in scene.objects} <= set(allowed)
        for i, a in enumerate(scene.objects):
            x1, y1, x2, y2 = a.bbox
            assert 0 <= x1 and 0 <= y1 and x2 < 64 and y2 < 64
            for b in scene.objects[i + 1 :]:
                gap_x = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2]) - 1
                gap_y = max(b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3]) - 1
                assert max(gap_x, gap_y) >= render.MIN_GAP
    scene = render.sample_scene(rng, n_objects=2, allowed=allowed, include=[("green", "circle")])
    assert ("green", "circle") in {(o.colour, o.shape) for o in scene.objects}


def test_sample_scene_impossible_or_invalid() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="cannot place 40"):
        render.sample_scene(rng, n_objects=40)
    with pytest.raises(ValueError):
        render.sample_scene(rng, n_objects=0)
    with pytest.raises(ValueError):
        render.sample_scene(rng, n_objects=1, allowed=[("pink", "circle")])


def test_scene_object_validation_and_bbox() -> None:
    obj = SceneObject(shape="circle", colour="red", size="large", cx=20, cy=30)
    assert obj.bbox == (9, 19, 31, 41) and obj.rgb == COLOURS["red"]
    assert SceneObject.from_dict(obj.as_dict()) == obj
    with pytest.raises(ValueError):
        SceneObject(shape="hexagon", colour="red", size="large", cx=20, cy=30)
    with pytest.raises(ValueError):
        edge = SceneObject(shape="square", colour="red", size="large", cx=3, cy=30)
        render.render_scene(Scene(objects=(edge,)))


def test_captions() -> None:
    red = SceneObject(shape="circle", colour="red", size="large", cx=15, cy=20)
    blue = SceneObject(shape="square", colour="blue", size="small", cx=45, cy=25)
    green = SceneObject(shape="triangle", colour="green", size="small", cx=30, cy=50)
    assert render.caption_scene(Scene(objects=(blue, red))) == (
        "a large red circle to the left of a small blue square."
    )
    assert render.caption_scene(Scene(objects=(red,))) == "a large red circle."
    assert render.caption_scene(Scene(objects=(green, blue, red))) == (
        "a large red circle, a small green triangle and a small blue square."
    )
    above = SceneObject(shape="diamond", colour="orange", size="small", cx=20, cy=50)
    assert render.caption_scene(Scene(objects=(above, red))) == (
        "a large red circle above a small orange diamond."
    )
    assert render.caption_scene(Scene(objects=(blue, red)), shapes=False) == (
        "a large red shape to the left of a small blue shape."
    )
    assert render.caption_scene(Scene(objects=(green, blue, red)), shapes=False) == (
        "a large red shape, a small green shape and a small blue shape."
    )


def test_load_scenes_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.json"):
        render.load_scenes(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"scenes": [{"image_id": 1, "objects": [{"shape": "blob"}]}]}')
    with pytest.raises(DataError, match="bad.json"):
        render.load_scenes(bad)


def test_prompt_captions_are_true_and_use_every_style() -> None:
    rng = np.random.default_rng(0)
    seen_styles = set()
    for i in range(300):
        scene = render.sample_scene(rng, n_objects=int(rng.integers(1, 5)), allowed=render.all_combos())
        text = render.prompt_caption(scene, np.random.default_rng(i))
        words = synth.tokenize(text)
        assert set(words) <= set(synth.VOCABULARY), text
        combos = {(o.colour, o.shape) for o in scene.objects}
        shapes = Counter(o.shape for o in scene.objects)
        for a, b in zip(words, words[1:], strict=False):
            if a in COLOURS:  # every "colour shape" pair is in the scene
                assert (a, b) in combos, (text, combos)
                seen_styles.add("colours")
        for n, word in enumerate(("two", "three", "four"), start=2):
            for j, w in enumerate(words[:-1]):
                if w == word:  # "two circles": exactly that many of that shape
                    assert shapes[words[j + 1].removesuffix("s")] == n, text
                    seen_styles.add("counts")
        if "left" in words or "right" in words or "above" in words or "below" in words:
            seen_styles.add("position")
            assert len(scene.objects) == 2
            first = min(scene.objects, key=lambda o: (o.cx, o.cy))
            second = max(scene.objects, key=lambda o: (o.cx, o.cy))
            rel, _ = render.relation(first, second)
            named = [w for w in words if w in render.SHAPES]
            assert named == [first.shape, second.shape] and rel in words, (text, rel)
        mentioned = [w.removesuffix("s") for w in words if w.removesuffix("s") in render.SHAPES]
        assert set(mentioned) == set(shapes), text  # every shape named, none invented
    assert seen_styles == {"colours", "counts", "position"}
