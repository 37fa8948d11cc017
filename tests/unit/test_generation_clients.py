"""Generation on clients: caption data, mixed-task local training, per-group counts, alignment tokens."""

from __future__ import annotations

import pytest
import torch

from fedumm.client.train import ClientData, TrainSpec, run_client_round, train_local
from fedumm.data.captions import caption_class, captions_by_image, load_captions
from fedumm.data.vqa import load_split
from fedumm.errors import ConfigError, DataError
from fedumm.eval.tasks import evaluate_captions
from fedumm.models.base import FamilyOptions, LoraSpec
from fedumm.models.janus.family import JanusFamily
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_

GROUPS = ("vision", "language", "generation")


@pytest.fixture(scope="module")
def family(tiny_checkpoint):
    fam = JanusFamily.from_pretrained(tiny_checkpoint, options=FamilyOptions(alignment_tokens=2))
    fam.attach_lora(LoraSpec(rank=4, alpha=8, groups=GROUPS), seed=0)
    return fam


@pytest.fixture(scope="module")
def data(tiny_world):
    return load_split(tiny_world, "private")[:16], load_captions(tiny_world, "private")[:16]


def changed_groups(family, before, after):
    return {family.group_of(k) for k in before if not torch.equal(before[k], after[k])}


def test_load_captions_reads_both_captions_per_image(tiny_world):
    caps = load_captions(tiny_world, "private")
    grouped = captions_by_image(caps)
    assert all(len(v) == 2 for v in grouped.values())
    assert all(c.image_path.is_file() for c in caps[:10])
    assert caption_class("two circles and a square") == "circle"
    assert caption_class("a large red diamond above a small square.") == "diamond"
    assert caption_class("nothing here") == "other"


def test_load_captions_errors_name_the_record(tmp_path):
    (tmp_path / "captions_x.json").write_text(
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": '
        '[{"id": 1, "image_id": 2, "caption": "a circle"}]}'
    )
    with pytest.raises(DataError, match=r"annotations\[0\]: image_id 2"):
        load_captions(tmp_path, "x")
    (tmp_path / "captions_y.json").write_text(
        '{"images": [{"id": 1, "file_name": "../a.jpg"}], "annotations": []}'
    )
    with pytest.raises(DataError, match="plain file name"):
        load_captions(tmp_path, "y")
    with pytest.raises(DataError, match="not found"):
        load_captions(tmp_path, "missing")


def test_generation_only_training_leaves_the_vision_adapter_alone(family, data):
    _, caps = data
    start = get_adapter_state(family.model)
    res = train_local(family, [], spec=TrainSpec(batch_size=8, lr=0.01), seed=0, gen_samples=caps)
    after = get_adapter_state(family.model)
    set_adapter_state_(family.model, start)
    assert res.caption_loss is not None and res.steps == 2
    # generation touches the language model, the generation head/aligner and the alignment tokens
    assert changed_groups(family, start, after) == {"language", "generation", "alignment"}


def test_understanding_only_training_leaves_the_generation_adapter_alone(family, data):
    vqa, _ = data
    start = get_adapter_state(family.model)
    train_local(family, vqa, spec=TrainSpec(batch_size=8, lr=0.01), seed=0)
    after = get_adapter_state(family.model)
    set_adapter_state_(family.model, start)
    assert changed_groups(family, start, after) == {"vision", "language", "alignment"}


def test_mixed_round_is_seeded_and_reports_group_counts(family, data):
    vqa, caps = data
    start = get_adapter_state(family.model)
    client = ClientData(train=vqa[:12], val=vqa[12:], gen_train=caps[:10], gen_val=caps[10:])
    runs = []
    for _ in range(2):
        upd = run_client_round(
            family,
            client_id="c",
            global_state=start,
            data=client,
            spec=TrainSpec(batch_size=4, lr=0.01),
            base_seed=0,
            rnd=1,
        )
        runs.append(upd)
    a, b = runs
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.num_examples == 22
    assert a.group_examples == {"vision": 12, "generation": 10, "language": 22, "alignment": 22, "other": 22}
    assert a.metrics["val_score"] == a.metrics["val_score_vision"]
    assert 0 < a.metrics["val_score_generation"] <= 1 and a.metrics["val_caption_loss"] > 0
    assert a.metrics["steps"] == 6  # 3 VQA + 3 caption batches
    set_adapter_state_(family.model, start)


def test_caption_loss_falls_when_training_on_the_same_captions(family, data):
    _, caps = data
    start = get_adapter_state(family.model)
    before = evaluate_captions(family, caps)
    train_local(family, [], spec=TrainSpec(batch_size=8, lr=0.02, epochs=4), seed=0, gen_samples=caps)
    after = evaluate_captions(family, caps)
    set_adapter_state_(family.model, start)
    assert after < before


def test_alignment_tokens_sit_between_image_and_text(family):
    assert family.prompt_template.startswith("<image_placeholder><align_0><align_1> ")
    assert family.generation_prompt("a red circle") == "a red circle <align_0><align_1>"
    keys = [k for k in get_adapter_state(family.model) if family.group_of(k) == "alignment"]
    assert keys and all("trainable_tokens" in k for k in keys)
    state = get_adapter_state(family.model)
    assert tuple(state[keys[0]].shape) == (2, family.base.config.text_config.hidden_size)


def test_pretrained_prompts_drop_the_alignment_tokens_for_the_block_only(family):
    template = family.prompt_template
    with family.pretrained_prompts():
        assert "<align_" not in family.prompt_template
        assert family.generation_prompt("a red circle") == "a red circle"
        assert family.alignment == ()
    assert family.prompt_template == template
    assert family.generation_prompt("a red circle") == "a red circle <align_0><align_1>"


def test_alignment_tokens_beyond_the_reserved_ones_are_a_config_error(tiny_checkpoint):
    with pytest.raises(ConfigError, match="alignment_tokens=9"):
        JanusFamily.from_pretrained(tiny_checkpoint, options=FamilyOptions(alignment_tokens=9))


def test_generate_is_seeded(family):
    a = family.generate(["a red circle"], images_per_prompt=2, seed=3)
    b = family.generate(["a red circle"], images_per_prompt=2, seed=3)
    assert len(a) == 2 and a[0].size == (64, 64)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
