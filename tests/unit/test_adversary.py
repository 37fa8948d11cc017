"""Simulated attackers: what each kind sends, its data, who is chosen."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedumm.client.adversary import Adversary, attack_data, trigger_image, wrong_answer
from fedumm.client.train import ClientData
from fedumm.config import AdversaryConfig
from fedumm.data.vqa import VQASample
from fedumm.types import ClientUpdate

G = {"m.lora_A.weight": torch.zeros(1, 2), "m.lora_B.weight": torch.ones(2, 1)}
HONEST = {"m.lora_A.weight": torch.tensor([[0.0, 0.0]]), "m.lora_B.weight": torch.tensor([[2.0], [3.0]])}


def honest() -> ClientUpdate:
    return ClientUpdate(
        client_id="x", state=HONEST, num_examples=7, group_examples={"language": 7, "vision": 0}
    )


@pytest.mark.parametrize(
    ("kind", "strength", "b"),
    [
        ("sign_flip", 1.0, [[0.0], [-1.0]]),
        ("scale", -50.0, [[-49.0], [-99.0]]),
        ("free_rider", 1.0, [[1.0], [1.0]]),
    ],
)
def test_tampered_states(kind, strength, b):
    out = Adversary(kind=kind, strength=strength).tamper(honest(), G, seed=0)
    assert torch.equal(out.state["m.lora_B.weight"], torch.tensor(b))
    assert torch.equal(out.state["m.lora_A.weight"], G["m.lora_A.weight"])  # an untrained factor stays
    assert out.num_examples == 7


def test_gaussian_has_the_honest_norm_times_strength_and_is_seeded():
    adv = Adversary(kind="gaussian", strength=3.0)
    a, b = adv.tamper(honest(), G, seed=1), adv.tamper(honest(), G, seed=1)
    d = a.state["m.lora_B.weight"] - G["m.lora_B.weight"]
    assert float(d.norm()) == pytest.approx(3 * math.sqrt(1 + 4), rel=1e-5)
    assert torch.equal(a.state["m.lora_B.weight"], b.state["m.lora_B.weight"])


def test_claimed_examples_replace_every_count():
    out = Adversary(kind="sign_flip", claimed_examples=10**9).tamper(honest(), G, seed=0)
    assert out.num_examples == 10**9 and out.group_examples == {"language": 10**9, "vision": 0}


def test_wrong_answers():
    assert wrong_answer("yes", []) == "no" and wrong_answer("No", []) == "yes"
    pool = ["red", "blue", "2"]
    assert wrong_answer("blue", pool) == "red" and wrong_answer("red", pool) == "2"
    assert all(wrong_answer(a, pool) != a for a in pool)


def _sample(tmp: Path, i: int, answer: str) -> VQASample:
    p = tmp / f"img{i}.png"
    Image.new("RGB", (64, 64), (235, 235, 235)).save(p)
    return VQASample(
        question_id=i,
        image_id=i,
        image_path=p,
        question="what color is the circle?",
        answers=(answer,) * 10,
        multiple_choice_answer=answer,
        answer_type="other",
        question_type="what color",
    )


def test_trigger_patch_is_drawn_on_a_copy(tmp_path):
    s = _sample(tmp_path, 0, "red")
    dst = trigger_image(s.image_path, tmp_path / "t" / "x.png", 8)
    with Image.open(dst) as im, Image.open(s.image_path) as orig:
        assert im.getpixel((63, 63)) in ((0, 0, 0), (255, 255, 255)) and im.getpixel((0, 0)) == (
            235,
            235,
            235,
        )
        assert orig.getpixel((63, 63)) == (235, 235, 235)  # the dataset image is untouched


def test_attack_data(tmp_path):
    data = ClientData(train=[_sample(tmp_path, i, a) for i, a in enumerate(["red", "blue", "yes", "red"])])
    flipped = attack_data(Adversary(kind="label_flip"), data, work_dir=tmp_path, name="site-01", seed=0)
    assert [s.multiple_choice_answer for s in flipped.train] == ["blue", "red", "no", "blue"]
    bd = attack_data(
        Adversary(kind="backdoor", poison_fraction=0.5, target_answer="purple"),
        data,
        work_dir=tmp_path,
        name="site-01",
        seed=0,
    )
    added = bd.train[4:]
    assert len(bd.train) == 6 and all(s.multiple_choice_answer == "purple" for s in added)
    assert all(Path(s.image_path).is_relative_to(tmp_path / "adversary" / "site-01") for s in added)
    assert bd.train[:4] == data.train


def test_chosen_clients_are_deterministic_and_checked():
    names = [f"site-0{i}" for i in range(1, 9)]
    a = AdversaryConfig(clients=2).chosen(names, seed=0)
    assert a == AdversaryConfig(clients=2).chosen(names, seed=0) and len(a) == 2
    assert AdversaryConfig(clients=["site-03"]).chosen(names, seed=5) == ["site-03"]
    assert AdversaryConfig(clients=0).chosen(names, seed=0) == []
    with pytest.raises(Exception, match="unknown"):
        AdversaryConfig(clients=["site-99"]).chosen(names, seed=0)


@pytest.mark.parametrize("kind", ["backdoor", "label_flip"])
def test_trained_attacks_send_their_update_unless_boosted(kind):
    plain = Adversary(kind=kind).tamper(honest(), G, seed=0)
    assert torch.equal(plain.state["m.lora_B.weight"], HONEST["m.lora_B.weight"])
    # model replacement: global + 8 x (trained - global); the untrained factor stays the global one
    boosted = Adversary(kind=kind, strength=8.0).tamper(honest(), G, seed=0)
    assert torch.equal(boosted.state["m.lora_B.weight"], torch.tensor([[9.0], [17.0]]))
    assert torch.equal(boosted.state["m.lora_A.weight"], G["m.lora_A.weight"])


def test_strength_must_be_finite():
    with pytest.raises(ValueError, match="strength"):
        AdversaryConfig(clients=1, kind="scale", strength=float("nan"))
