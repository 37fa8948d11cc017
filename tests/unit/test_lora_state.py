"""Canonical adapter state: round trip, strict checks, no shared storage, peft layout."""

import pytest
import torch
from peft import PeftModel

from fedumm.errors import AdapterStateError, ConfigError
from fedumm.models.base import LoraSpec
from fedumm.models.janus.family import JanusFamily
from fedumm.models.janus.tiny import build_processor, build_tiny_janus, build_tokenizer
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_

WORDS = ["what", "color", "is", "the", "circle", "?", "red", "question", ":", "answer"]


def family(groups=("language",), seed=0):
    tok = build_tokenizer(WORDS)
    torch.manual_seed(0)
    fam = JanusFamily(model=build_tiny_janus(tok, codebook_size=64), processor=build_processor(tok))
    fam.attach_lora(LoraSpec(rank=4, alpha=8, groups=groups), seed=seed)
    return fam


def test_keys_are_canonical_sorted_cpu_copies():
    fam = family()
    state = get_adapter_state(fam.model)
    assert list(state) == sorted(state)
    assert all(".default" not in k and ("lora_A" in k or "lora_B" in k) for k in state)
    assert all("language_model" in k for k in state)
    # 4 layers x 4 projections x (A, B)
    assert len(state) == 32
    live = {p.data_ptr() for p in fam.model.parameters()}
    assert not any(t.data_ptr() in live for t in state.values())
    # fresh LoRA: B is zero, so the adapter does not change the model
    assert all(float(v.abs().sum()) == 0 for k, v in state.items() if "lora_B" in k)


def test_round_trip_and_mutation_isolation():
    fam = family()
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(fam.model).items()}
    set_adapter_state_(fam.model, state)
    back = get_adapter_state(fam.model)
    assert all(torch.equal(back[k], state[k]) for k in state)
    state[next(iter(state))].add_(1.0)  # mutating the input afterwards must not touch the model
    again = get_adapter_state(fam.model)
    assert all(torch.equal(again[k], back[k]) for k in back)


def test_strict_key_and_shape_checks():
    fam = family()
    state = get_adapter_state(fam.model)
    missing = dict(list(state.items())[1:])
    with pytest.raises(AdapterStateError, match="missing"):
        set_adapter_state_(fam.model, missing)
    wrong = dict(state)
    k = next(iter(wrong))
    wrong[k] = torch.zeros(wrong[k].shape[0] + 1, wrong[k].shape[1])
    with pytest.raises(AdapterStateError, match="shape"):
        set_adapter_state_(fam.model, wrong)
    extra = dict(state) | {"bogus.lora_A.weight": torch.zeros(1)}
    with pytest.raises(AdapterStateError, match="unexpected"):
        set_adapter_state_(fam.model, extra)


def test_same_seed_same_initial_adapter_and_towers():
    a = get_adapter_state(family(seed=3).model)
    b = get_adapter_state(family(seed=3).model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    both = get_adapter_state(family(groups=("vision", "language", "generation")).model)
    groups = {JanusFamily.info.group_of(k) for k in both}
    assert groups == {"vision", "language", "generation"}


def test_unknown_tower_is_config_error():
    with pytest.raises(ConfigError, match="family 'janus' has no tower 'audio'; its towers: vision"):
        family(groups=("audio",))


def test_peft_layout_loads_with_from_pretrained(tmp_path):
    fam = family()
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(fam.model).items()}
    set_adapter_state_(fam.model, state)
    fam.model.save_pretrained(tmp_path / "adapter")
    tok = build_tokenizer(WORDS)
    torch.manual_seed(0)
    base = build_tiny_janus(tok, codebook_size=64)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    got = get_adapter_state(loaded)
    assert all(torch.equal(got[k], state[k]) for k in state)
