"""Local training hooks: seeded determinism, FedProx pull, FFA-LoRA frozen A, gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from fedumm.client.train import ClientData, TrainSpec, num_steps, run_client_round, train_local
from fedumm.data.vqa import load_split
from fedumm.models.base import LoraSpec
from fedumm.models.janus.family import JanusFamily
from fedumm.models.lora_state import get_adapter_state, set_adapter_state_


@pytest.fixture(scope="module")
def fam_and_data(tiny_world, tiny_checkpoint):
    fam = JanusFamily.from_pretrained(tiny_checkpoint)
    fam.attach_lora(LoraSpec(rank=4, alpha=8), seed=0)
    return fam, load_split(tiny_world, "private")[:24]


def delta_norm(a, b):
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


def test_same_seed_same_result(fam_and_data):
    fam, data = fam_and_data
    spec = TrainSpec(batch_size=8, lr=0.01)
    start = get_adapter_state(fam.model)
    train_local(fam, data, spec=spec, seed=5)
    a = get_adapter_state(fam.model)
    set_adapter_state_(fam.model, start)
    train_local(fam, data, spec=spec, seed=5)
    b = get_adapter_state(fam.model)
    set_adapter_state_(fam.model, start)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert delta_norm(a, start) > 0


def test_scoring_after_an_epoch_leaves_the_later_epochs_unchanged(fam_and_data, tiny_checkpoint):
    """on_epoch (the centralized baseline's test_at_rounds) sees the model after n epochs exactly as a
    run of n epochs ends, and the epochs after it are those of a run without the call."""
    from fedumm.eval.tasks import evaluate_vqa

    _, data = fam_and_data
    fam = JanusFamily.from_pretrained(tiny_checkpoint)
    fam.attach_lora(LoraSpec(rank=4, alpha=8, dropout=0.2), seed=0)  # dropout draws from the global RNG
    spec = TrainSpec(batch_size=8, lr=0.01, epochs=3)
    start = get_adapter_state(fam.model)
    seen: dict[int, dict] = {}

    def score(n: int) -> None:
        seen[n] = get_adapter_state(fam.model)
        evaluate_vqa(fam, data[:8], batch_size=8)  # puts the model in eval mode
        torch.rand(100)  # and draws from the global generator, which training's dropout uses

    train_local(fam, data, spec=spec, seed=5, on_epoch=score)
    scored = get_adapter_state(fam.model)
    set_adapter_state_(fam.model, start)
    train_local(fam, data, spec=TrainSpec(batch_size=8, lr=0.01, epochs=2), seed=5)
    two = get_adapter_state(fam.model)
    set_adapter_state_(fam.model, start)
    train_local(fam, data, spec=spec, seed=5)
    plain = get_adapter_state(fam.model)
    set_adapter_state_(fam.model, start)
    assert sorted(seen) == [1, 2, 3]
    assert all(torch.equal(seen[2][k], two[k]) for k in two)
    assert all(torch.equal(scored[k], plain[k]) for k in plain)
    assert delta_norm(seen[3], seen[2]) > 0


def test_fedprox_term_keeps_weights_closer(fam_and_data):
    fam, data = fam_and_data
    spec = TrainSpec(batch_size=8, lr=0.01, epochs=2)
    start = get_adapter_state(fam.model)
    train_local(fam, data, spec=spec, seed=1)
    free = delta_norm(get_adapter_state(fam.model), start)
    set_adapter_state_(fam.model, start)
    train_local(fam, data, spec=spec, seed=1, proximal_mu=1000.0)
    pulled = delta_norm(get_adapter_state(fam.model), start)
    set_adapter_state_(fam.model, start)
    assert pulled < free


def test_ffa_lora_keeps_a_frozen_and_restores_trainability(fam_and_data):
    fam, data = fam_and_data
    start = get_adapter_state(fam.model)
    upd = run_client_round(
        fam,
        client_id="site-01",
        global_state=start,
        data=ClientData(train=data, val=data[:4]),
        spec=TrainSpec(batch_size=8, lr=0.01),
        base_seed=0,
        rnd=1,
        frozen_suffixes=("lora_A.weight",),
    )
    assert all(torch.equal(upd.state[k], start[k]) for k in start if k.endswith("lora_A.weight"))
    assert any(not torch.equal(upd.state[k], start[k]) for k in start if k.endswith("lora_B.weight"))
    assert all(p.requires_grad for n, p in fam.model.named_parameters() if "lora_A" in n)
    assert 0 <= upd.metrics["val_score"] <= 1 and upd.num_examples == len(data)
    set_adapter_state_(fam.model, start)


def test_num_steps_counts_accumulated_steps():
    assert num_steps(100, TrainSpec(batch_size=16, grad_accum=1, epochs=2)) == 14  # 7 batches x 2
    assert num_steps(100, TrainSpec(batch_size=16, grad_accum=3, epochs=1)) == 3  # 7 batches -> 3, 3, 1
    assert num_steps(100, TrainSpec(batch_size=16), 40) == 10  # 7 VQA + 3 caption batches
