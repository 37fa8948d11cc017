"""Every registered model family keeps the contract of ``fedumm.models.base.ModelFamily``, on tiny
freshly initialised checkpoints: LoRA lands only on the named towers, the adapter state round-trips,
each task's gradients reach the towers the family says it trains, sampling is seeded, a one-round
federated run completes and its global adapter loads with peft's ``PeftModel.from_pretrained``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fedumm.errors import AdapterStateError
from fedumm.models import family_class, family_info, family_names
from fedumm.models.base import ALIGNMENT_GROUP, FamilyOptions, LoraSpec, ModelFamily
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_

FAMILIES = family_names()


def test_both_families_are_registered():
    assert FAMILIES == ["blip3o", "janus"]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    return {name: family_class(name).write_tiny(tmp_path_factory.mktemp(name), seed=0) for name in FAMILIES}


def _load(name: str, checkpoints: dict, alignment: int = 0) -> ModelFamily:
    options = FamilyOptions(alignment_tokens=alignment)
    return family_class(name).from_pretrained(checkpoints[name], options=options)


def _samples(tiny_world, n: int = 4):
    from fedumm.data.captions import load_captions
    from fedumm.data.vqa import load_split

    return load_split(tiny_world, "private")[:n], load_captions(tiny_world, "private")[:n]


@pytest.mark.parametrize("name", FAMILIES)
def test_info_and_class_agree(name):
    info = family_info(name)
    cls = family_class(name)
    assert cls.info is info and issubclass(cls, ModelFamily)
    assert set(info.task_towers) == {"understanding", "generation"}
    assert info.groups[-1] == ALIGNMENT_GROUP
    assert info.group_examples({"understanding": 3, "generation": 5})[ALIGNMENT_GROUP] == 8


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_lands_only_on_the_named_towers(name, tiny_checkpoints):
    towers = list(family_info(name).towers)
    for chosen in [(t,) for t in towers] + [tuple(towers)]:
        fam = _load(name, tiny_checkpoints, alignment=1)
        fam.attach_lora(LoraSpec(rank=2, alpha=4, groups=chosen), seed=0)
        trainable = [n for n, p in fam.model.named_parameters() if p.requires_grad]
        groups = {fam.group_of(n) for n in trainable}
        assert groups == {*chosen, ALIGNMENT_GROUP}, (chosen, groups)
        # only adapter weights train: every trainable parameter is a LoRA factor, a trained-whole
        # module's copy or the alignment-token delta
        assert all(("lora_" in n or "modules_to_save" in n or "trainable_tokens" in n) for n in trainable)
        state = get_adapter_state(fam.model)
        assert {fam.group_of(k) for k in state} == {*chosen, ALIGNMENT_GROUP}


@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_state_round_trips_and_is_checked(name, tiny_checkpoints):
    fam = _load(name, tiny_checkpoints)
    fam.attach_lora(LoraSpec(rank=2, alpha=4, groups=tuple(family_info(name).towers)), seed=0)
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(fam.model).items()}
    set_adapter_state_(fam.model, state)
    back = get_adapter_state(fam.model)
    assert list(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(AdapterStateError, match="unexpected"):
        set_adapter_state_(fam.model, state | {"bogus.lora_A.weight": torch.zeros(1)})
    key = next(iter(state))
    with pytest.raises(AdapterStateError, match="shape"):
        set_adapter_state_(fam.model, state | {key: torch.zeros(3, 3, 3)})
    # the same seed gives the same initial adapter on every participant
    a = _load(name, tiny_checkpoints)
    b = _load(name, tiny_checkpoints)
    spec = LoraSpec(rank=2, alpha=4, groups=tuple(family_info(name).towers))
    sa = get_adapter_state(a.attach_lora(spec, seed=7))
    sb = get_adapter_state(b.attach_lora(spec, seed=7))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("task", ["understanding", "generation"])
def test_each_task_trains_the_towers_the_family_names(name, task, tiny_checkpoints, tiny_world):
    info = family_info(name)
    fam = _load(name, tiny_checkpoints, alignment=1)
    fam.attach_lora(LoraSpec(rank=2, alpha=4, groups=tuple(info.towers)), seed=0)
    vqa, captions = _samples(tiny_world)
    if task == "understanding":
        loss = fam.vqa_loss(fam.vqa_batch(vqa, with_answers=True))
    else:
        loss = fam.caption_loss(fam.caption_batch(captions, generator=torch.Generator().manual_seed(0)))
    assert math.isfinite(float(loss))
    loss.backward()
    reached = {
        fam.group_of(n)
        for n, p in fam.model.named_parameters()
        if p.requires_grad and p.grad is not None and float(p.grad.abs().sum()) > 0
    }
    assert reached == {*info.task_towers[task], ALIGNMENT_GROUP}


@pytest.mark.parametrize("name", FAMILIES)
def test_task_hooks_are_seeded_and_shaped(name, tiny_checkpoints, tiny_world):
    fam = _load(name, tiny_checkpoints)
    vqa, captions = _samples(tiny_world)
    answers = fam.vqa_answer(vqa)
    assert len(answers) == len(vqa) and all(isinstance(a, str) for a in answers)
    one = fam.caption_batch(captions, generator=torch.Generator().manual_seed(3), cfg_drop_prob=0.5)
    two = fam.caption_batch(captions, generator=torch.Generator().manual_seed(3), cfg_drop_prob=0.5)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    a = fam.generate(["a red circle", "two squares"], images_per_prompt=2, seed=5)
    b = fam.generate(["a red circle", "two squares"], images_per_prompt=2, seed=5)
    c = fam.generate(["a red circle", "two squares"], images_per_prompt=2, seed=6)
    assert len(a) == 4 and all(isinstance(img, Image.Image) and img.size == (64, 64) for img in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_encodings_give_the_batches_a_fresh_family_builds(name, tiny_checkpoints, tiny_world):
    warm, fresh = _load(name, tiny_checkpoints), _load(name, tiny_checkpoints)
    vqa, _ = _samples(tiny_world, n=12)
    warm.vqa_batch(vqa[:8], with_answers=True)
    assert len(warm.encodings) > 0 and warm.encodings.nbytes > 0
    for with_answers in (True, False):  # overlapping, reordered: half cached, half not
        part = vqa[11:3:-1]
        a = warm.vqa_batch(part, with_answers=with_answers)
        b = fresh.vqa_batch(part, with_answers=with_answers)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    warm.encodings.clear()
    assert len(warm.encodings) == 0 and warm.encodings.nbytes == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_pretrained_prompts_drop_the_alignment_tokens(name, tiny_checkpoints):
    fam = _load(name, tiny_checkpoints, alignment=2)
    assert fam.num_alignment == 2 and len(fam.alignment_token_ids()) == 2
    with fam.pretrained_prompts():
        assert fam.num_alignment == 0 and fam.alignment_token_ids() == []
    assert fam.num_alignment == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_counts_for_the_ledger(name, tiny_checkpoints):
    fam = _load(name, tiny_checkpoints)
    counts = fam.parameter_counts()
    assert all(counts[t] > 0 for t in family_info(name).towers)
    assert counts["total"] >= sum(counts[t] for t in family_info(name).towers)
    assert fam.full_model_bytes() == 4 * counts["total"]  # fp32 checkpoints
    fam.attach_lora(LoraSpec(rank=2, alpha=4), seed=0)
    assert fam.full_model_bytes() == 4 * counts["total"]  # the adapter is not part of the model


@pytest.mark.integration
@pytest.mark.parametrize("name", FAMILIES)
def test_one_round_run_and_peft_loads_the_adapter(name, tiny_checkpoints, tiny_world, tmp_path):
    from peft import PeftModel

    from fedumm.config import load_config
    from fedumm.experiment import run_experiment
    from fedumm.io import read_safetensors

    tree = {
        "name": f"contract-{name}",
        "data": {"path": str(tiny_world), "max_val_questions": 8, "max_test_questions": 8},
        "model": {"family": name, "path": str(tiny_checkpoints[name])},
        "lora": {"rank": 2, "alpha": 4, "groups": list(family_info(name).towers), "alignment_tokens": 1},
        "train": {"batch_size": 8, "eval_batch_size": 16},
        "federation": {"clients": 2, "rounds": 1, "tasks": "both", "min_partition_size": 4},
        "baselines": {"zero_shot": False, "centralized": False},
        "geneval": {"enabled": True, "per_tag": 1, "images_per_prompt": 1, "grid_prompts": 0},
    }
    out = tmp_path / "run"
    summary = run_experiment(load_config(None, tree=tree), out)
    assert summary.status == "finished" and summary.family == name
    assert summary.generation_loss_name == family_info(name).generation_loss
    assert summary.federated.generation_loss is not None and summary.federated.geneval_overall is not None
    base = family_class(name).from_pretrained(tiny_checkpoints[name]).base
    loaded = PeftModel.from_pretrained(base, out / "global_adapter")
    got = get_adapter_state(loaded)
    want = read_safetensors(out / "checkpoint" / "round-0001.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert {family_info(name).group_of(k) for k in want} == {*family_info(name).towers, ALIGNMENT_GROUP}
