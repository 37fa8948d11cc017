"""Aggregation maths against hand-computed values."""

import math

import pytest
import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.aggregate import normalize_weights, quality_factors, weighted_mean
from fedumm.fl.strategies import make_strategy
from fedumm.types import ClientUpdate


def upd(cid, a, n, **metrics):
    return ClientUpdate(
        client_id=cid,
        state={"a": torch.tensor(a), "b": torch.tensor([a[0] * 2])},
        num_examples=n,
        metrics=metrics,
    )


def test_weighted_mean_hand_computed():
    # Prepare: weights 1 and 3 -> 0.25 / 0.75
    s1 = {"w": torch.tensor([1.0, 2.0])}
    s2 = {"w": torch.tensor([5.0, -2.0])}
    # Execute
    out = weighted_mean([s1, s2], [1, 3])
    # Assert: 0.25*1 + 0.75*5 = 4.0 ; 0.25*2 + 0.75*(-2) = -1.0
    assert torch.equal(out["w"], torch.tensor([4.0, -1.0]))
    assert out["w"].data_ptr() not in (s1["w"].data_ptr(), s2["w"].data_ptr())


def test_weighted_mean_keeps_dtype_and_does_not_mutate():
    s1 = {"w": torch.tensor([1.0], dtype=torch.bfloat16)}
    s2 = {"w": torch.tensor([3.0], dtype=torch.bfloat16)}
    out = weighted_mean([s1, s2], [1, 1])
    assert out["w"].dtype == torch.bfloat16 and float(out["w"]) == 2.0
    assert float(s1["w"]) == 1.0


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], [1, math.nan], [math.inf, 1]])
def test_normalize_weights_rejects(weights):
    with pytest.raises(InvalidUpdate):
        normalize_weights(weights)


def test_quality_factors_median_and_cap():
    # median of (0.2, 0.4, 0.8) = 0.4 -> ratios 0.5, 1, 2 ; cap 2 keeps them
    assert quality_factors([0.2, 0.4, 0.8], cap=2) == pytest.approx([0.5, 1.0, 2.0])
    # an inflated claim (1.0 vs median 0.1) is capped at 2; a near-zero one floored at 1/2
    assert quality_factors([0.1, 0.1, 1.0, 0.0], cap=2) == pytest.approx([1.0, 1.0, 2.0, 0.5])
    assert quality_factors([0.0, 0.0, 0.5]) == [1.0, 1.0, 1.0]  # median 0: no information


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, True, "0.5"])
def test_quality_factors_reject_bad_scores(bad):
    with pytest.raises(InvalidUpdate):
        quality_factors([0.5, bad])


def test_fedavg_weights_by_examples():
    g = {"a": torch.zeros(2), "b": torch.zeros(1)}
    out = make_strategy("fedavg").aggregate(
        global_state=g, updates=[upd("x", [1.0, 0.0], 10), upd("y", [4.0, 8.0], 30)]
    )
    # a = (10*[1,0] + 30*[4,8]) / 40 = [3.25, 6.0]
    assert torch.allclose(out["a"], torch.tensor([3.25, 6.0]))
    assert torch.allclose(out["b"], torch.tensor([6.5]))


def test_quality_weighted_hand_computed():
    g = {"a": torch.zeros(2), "b": torch.zeros(1)}
    ups = [
        upd("x", [1.0, 0.0], 10, val_score=0.2),
        upd("y", [4.0, 8.0], 30, val_score=0.4),
        upd("z", [0.0, 0.0], 20, val_score=0.8),
    ]
    out = make_strategy("quality_weighted", cap=2.0).aggregate(global_state=g, updates=ups)
    # q = 0.5, 1, 2 -> w = 5, 30, 40 (sum 75) ; a = (5*[1,0] + 30*[4,8]) / 75
    assert torch.allclose(out["a"], torch.tensor([125 / 75, 240 / 75]))


def test_quality_weighted_bounds_an_inflated_client():
    g = {"a": torch.zeros(2), "b": torch.zeros(1)}
    honest = [upd(f"h{i}", [0.0, 0.0], 10, val_score=0.3) for i in range(3)]
    liar = upd("liar", [100.0, 100.0], 10, val_score=1.0)
    out = make_strategy("quality_weighted").aggregate(global_state=g, updates=honest + [liar])
    # liar weight 10*2 = 20 of 50 -> 40 at most
    assert torch.allclose(out["a"], torch.tensor([40.0, 40.0]))


def test_quality_weighted_requires_score():
    g = {"a": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(InvalidUpdate, match="val_score"):
        make_strategy("quality_weighted").aggregate(global_state=g, updates=[upd("x", [1.0, 0.0], 1)])


def test_per_group_weights_skip_clients_without_the_group():
    g = {"vis.a": torch.tensor([9.0]), "lang.a": torch.tensor([9.0])}
    u1 = ClientUpdate(
        client_id="u1",
        state={"vis.a": torch.tensor([2.0]), "lang.a": torch.tensor([2.0])},
        num_examples=10,
        group_examples={"vis": 10, "lang": 10},
    )
    u2 = ClientUpdate(
        client_id="u2",
        state={"vis.a": torch.tensor([100.0]), "lang.a": torch.tensor([4.0])},
        num_examples=30,
        group_examples={"vis": 0, "lang": 30},
    )
    out = make_strategy("fedavg").aggregate(
        global_state=g, updates=[u1, u2], group_of=lambda k: k.split(".")[0]
    )
    assert float(out["vis.a"]) == 2.0  # only u1 trained vision
    assert float(out["lang.a"]) == pytest.approx((10 * 2 + 30 * 4) / 40)


def test_group_nobody_trained_keeps_global():
    g = {"vis.a": torch.tensor([9.0]), "lang.a": torch.tensor([9.0])}
    u = ClientUpdate(
        client_id="u",
        state={"vis.a": torch.tensor([1.0]), "lang.a": torch.tensor([1.0])},
        num_examples=5,
        group_examples={"vis": 0, "lang": 5},
    )
    out = make_strategy("fedavg").aggregate(global_state=g, updates=[u], group_of=lambda k: k.split(".")[0])
    assert float(out["vis.a"]) == 9.0 and float(out["lang.a"]) == 1.0


def _two_groups(score_u1: dict, score_u2: dict):
    u1 = ClientUpdate(
        client_id="u1",
        state={"vision.a": torch.tensor([2.0]), "generation.a": torch.tensor([0.0])},
        num_examples=10,
        group_examples={"vision": 10, "generation": 0},
        metrics=score_u1,
    )
    u2 = ClientUpdate(
        client_id="u2",
        state={"vision.a": torch.tensor([4.0]), "generation.a": torch.tensor([6.0])},
        num_examples=10,
        group_examples={"vision": 10, "generation": 10},
        metrics=score_u2,
    )
    g = {"vision.a": torch.tensor([0.0]), "generation.a": torch.tensor([1.0])}
    return g, [u1, u2]


def test_quality_weighted_uses_each_groups_own_score():
    g, updates = _two_groups(
        {"val_score": 0.2, "val_score_vision": 0.2},
        {"val_score": 0.8, "val_score_vision": 0.8, "val_score_generation": 0.1},
    )
    out = make_strategy("quality_weighted", cap=2.0).aggregate(
        global_state=g, updates=updates, group_of=lambda k: k.split(".")[0]
    )
    # vision: scores 0.2, 0.8, median 0.5 -> q = 0.5 (clamped), 1.6 -> (0.5*2 + 1.6*4) / 2.1
    assert float(out["vision.a"]) == pytest.approx((0.5 * 2 + 1.6 * 4) / 2.1)
    # generation: only u2 trained it; its low generation score cannot be compared with anyone
    assert float(out["generation.a"]) == 6.0


def test_group_strategies_aggregate_each_group_with_its_own_rule():
    g, updates = _two_groups({"val_score": 0.2}, {"val_score": 0.8})
    strategy = make_strategy("fedavg", group_strategies={"generation": "fedadam"})
    out = strategy.aggregate(global_state=g, updates=updates, group_of=lambda k: k.split(".")[0])
    assert float(out["vision.a"]) == 3.0  # FedAvg
    assert float(out["generation.a"]) != 6.0  # FedAdam takes a server-optimizer step, not the mean
    plain = make_strategy("fedadam").aggregate(
        global_state={"generation.a": g["generation.a"]},
        updates=[
            type(u)(**{**u.__dict__, "state": {"generation.a": u.state["generation.a"]}}) for u in updates
        ],
        group_of=lambda k: k.split(".")[0],
    )
    assert torch.equal(out["generation.a"], plain["generation.a"])
    assert set(strategy.state_dict()) and all(k.startswith("generation/") for k in strategy.state_dict())
    fresh = make_strategy("fedavg", group_strategies={"generation": "fedadam"})
    fresh.load_state_dict(strategy.state_dict())
    assert fresh.state_dict().keys() == strategy.state_dict().keys()


def test_group_strategies_must_agree_on_client_hooks():
    from fedumm.errors import ConfigError

    with pytest.raises(ConfigError, match="group_strategies.generation"):
        make_strategy("fedavg", group_strategies={"generation": "ffa_lora"})
