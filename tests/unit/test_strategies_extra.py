"""FedProx, FedAdam, FedYogi, FFA-LoRA and product-space aggregation against hand-computed values."""

import math

import pytest
import torch
from safetensors.torch import load, save

from fedumm.errors import InvalidUpdate
from fedumm.fl.lora_math import (
    low_rank_mean_factors,
    pair_lora_keys,
    truncated_factors,
    weighted_product_mean,
)
from fedumm.fl.strategies import make_strategy
from fedumm.types import ClientUpdate

A = "m.q_proj.lora_A.weight"
B = "m.q_proj.lora_B.weight"


def upd(cid, state, n):
    return ClientUpdate(client_id=cid, state=state, num_examples=n)


def t64(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- FedProx


def test_fedprox_server_is_fedavg_and_exposes_mu():
    g = {"w": torch.zeros(2)}
    ups = [upd("x", {"w": torch.tensor([1.0, 0.0])}, 10), upd("y", {"w": torch.tensor([4.0, 8.0])}, 30)]
    prox, avg = make_strategy("fedprox", mu=0.5), make_strategy("fedavg")
    assert prox.client_weights(ups, "all") == avg.client_weights(ups, "all") == [10.0, 30.0]
    out = prox.aggregate(global_state=g, updates=ups)
    assert torch.equal(out["w"], avg.aggregate(global_state=g, updates=ups)["w"])
    assert prox.proximal_mu == 0.5 and make_strategy("fedprox").proximal_mu == 0.01


@pytest.mark.parametrize("mu", [-0.1, math.nan, math.inf, True, "0.1"])
def test_fedprox_rejects_bad_mu(mu):
    with pytest.raises(InvalidUpdate):
        make_strategy("fedprox", mu=mu)


# ---------------------------------------------------------------- FedAdam / FedYogi

# eta = 1, beta1 = 0.5, beta2 = 0.75, tau = 0.5 -> v_{-1} = tau^2 = 0.25: square roots stay exact.
HP = {"eta": 1.0, "beta1": 0.5, "beta2": 0.75, "tau": 0.5}


def test_fedadam_two_steps_hand_computed():
    s = make_strategy("fedadam", **HP)
    g0 = {"w": t64(0.0, 0.0)}
    # weighted mean (1 * [-1, 1] + 3 * [1, -1]) / 4 = [0.5, -0.5] -> D1 = [0.5, -0.5]
    ups = [upd("a", {"w": t64(-1.0, 1.0)}, 1), upd("b", {"w": t64(1.0, -1.0)}, 3)]
    g1 = s.aggregate(global_state=g0, updates=ups)
    # m1 = 0.5 * 0.5 = 0.25 ; v1 = 0.75 * 0.25 + 0.25 * 0.25 = 0.25 ; x1 = 0.25 / (0.5 + 0.5) = 0.25
    assert torch.allclose(g1["w"], t64(0.25, -0.25), atol=1e-7)
    assert torch.allclose(s.state_dict()["m/w"], torch.tensor([0.25, -0.25]))
    assert torch.allclose(s.state_dict()["v/w"], torch.tensor([0.25, 0.25]))
    # round 2: clients at [0.75, -0.75] -> D2 = [0.5, -0.5]
    g2 = s.aggregate(global_state=g1, updates=[upd("a", {"w": t64(0.75, -0.75)}, 2)])
    # m2 = 0.5 * 0.25 + 0.5 * 0.5 = 0.375 ; v2 = 0.75 * 0.25 + 0.25 * 0.25 = 0.25 ; x2 = 0.25 + 0.375 / 1
    assert torch.allclose(g2["w"], t64(0.625, -0.625), atol=1e-7)
    assert s.step == 2 and int(s.state_dict()["step"]) == 2


def test_fedyogi_two_steps_hand_computed():
    s = make_strategy("fedyogi", **HP)
    g0 = {"w": t64(0.0)}
    # D1 = 0.75 ; v1 = 0.25 - 0.25 * 0.5625 * sign(0.25 - 0.5625) = 0.390625 = 0.625^2 ; m1 = 0.375
    g1 = s.aggregate(global_state=g0, updates=[upd("a", {"w": t64(0.75)}, 1)])
    assert torch.allclose(g1["w"], t64(0.375 / (0.625 + 0.5)), atol=1e-7)  # = 1/3
    # D2 = 0.35 ; v2 = 0.390625 - 0.25 * 0.1225 * sign(0.390625 - 0.1225) = 0.36 = 0.6^2 ; m2 = 0.3625
    g2 = s.aggregate(global_state=g1, updates=[upd("a", {"w": g1["w"] + 0.35}, 1)])
    assert torch.allclose(g2["w"], t64(1 / 3 + 0.3625 / (0.6 + 0.5)), atol=1e-6)
    assert torch.allclose(s.state_dict()["v/w"], torch.tensor([0.36]))


def test_fedadam_and_fedyogi_second_moments_differ():
    # Adam: v1 = 0.75 * 0.25 + 0.25 * 0.5625 = 0.328125 ; Yogi: 0.390625 (same D1 = 0.75)
    ups = [upd("a", {"w": t64(0.75)}, 1)]
    adam, yogi = make_strategy("fedadam", **HP), make_strategy("fedyogi", **HP)
    adam.aggregate(global_state={"w": t64(0.0)}, updates=ups)
    yogi.aggregate(global_state={"w": t64(0.0)}, updates=ups)
    assert float(adam.state_dict()["v/w"]) == pytest.approx(0.328125)
    assert float(yogi.state_dict()["v/w"]) == pytest.approx(0.390625)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_paper_defaults_one_step(name):
    s = make_strategy(name)
    assert (s.eta, s.beta1, s.beta2, s.tau) == (1e-2, 0.9, 0.99, 1e-3)
    g1 = s.aggregate(global_state={"w": t64(0.0)}, updates=[upd("a", {"w": t64(0.02)}, 5)])
    # m1 = 0.1 * 0.02 = 0.002 ; Adam: v1 = 0.99e-6 + 0.01 * 4e-4 = 4.99e-6 ; Yogi: 1e-6 + 0.01 * 4e-4 = 5e-6
    v1 = 4.99e-6 if name == "fedadam" else 5e-6
    assert float(g1["w"]) == pytest.approx(1e-2 * 0.002 / (math.sqrt(v1) + 1e-3), rel=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_state_dict_round_trip_continues_identically(name):
    gen = torch.Generator().manual_seed(0)
    g0 = {A: torch.randn(2, 3, generator=gen), B: torch.randn(3, 2, generator=gen)}

    def round_updates(r):
        return [upd(f"c{i}", {k: v + 0.1 * (i + r) for k, v in g0.items()}, i + 1) for i in range(3)]

    first = make_strategy(name)
    g1 = first.aggregate(global_state=g0, updates=round_updates(1))
    saved = load(save(first.state_dict()))  # through safetensors, as the checkpoint does
    g2 = first.aggregate(global_state=g1, updates=round_updates(2))

    resumed = make_strategy(name)
    resumed.load_state_dict(saved)
    assert resumed.step == 1
    g2b = resumed.aggregate(global_state=g1, updates=round_updates(2))
    assert all(torch.equal(g2[k], g2b[k]) for k in g2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


def test_adaptive_state_is_untouched_by_a_failed_round_and_rejects_bad_state():
    s = make_strategy("fedadam")
    s.aggregate(global_state={"w": t64(0.0)}, updates=[upd("a", {"w": t64(1.0)}, 1)])
    before = s.state_dict()
    with pytest.raises(KeyError):
        s.aggregate(global_state={"w": t64(0.0), "z": t64(0.0)}, updates=[upd("a", {"w": t64(1.0)}, 1)])
    assert all(torch.equal(before[k], s.state_dict()[k]) for k in before)
    with pytest.raises(ValueError):
        s.load_state_dict({"m/w": torch.zeros(1)})  # no second moment
    with pytest.raises(ValueError):
        s.load_state_dict({"bogus": torch.zeros(1)})
    s.load_state_dict({})
    assert s.step == 0 and list(s.state_dict()) == ["step"]


@pytest.mark.parametrize(
    "bad", [{"eta": 0.0}, {"beta1": 1.0}, {"beta2": -0.1}, {"tau": 0.0}, {"eta": math.nan}]
)
def test_adaptive_rejects_bad_hyperparameters(bad):
    with pytest.raises(InvalidUpdate):
        make_strategy("fedadam", **bad)


def test_adaptive_fixed_point_when_clients_equal_global():
    g = {"w": t64(0.3, -0.2)}
    out = make_strategy("fedyogi").aggregate(
        global_state=g, updates=[upd("a", dict(g), 1), upd("b", dict(g), 2)]
    )
    assert torch.equal(out["w"], g["w"])


# ---------------------------------------------------------------- FedAvgM


def test_fedavgm_two_steps_hand_computed():
    s = make_strategy("fedavgm", eta=0.5, beta=0.5)
    g0 = {"w": t64(0.0, 0.0)}
    # D1 = (1 * [-1, 1] + 3 * [1, -1]) / 4 = [0.5, -0.5] ; u1 = D1 ; x1 = 0.5 * u1 = [0.25, -0.25]
    ups = [upd("a", {"w": t64(-1.0, 1.0)}, 1), upd("b", {"w": t64(1.0, -1.0)}, 3)]
    g1 = s.aggregate(global_state=g0, updates=ups)
    assert torch.equal(g1["w"], t64(0.25, -0.25))
    assert torch.equal(s.state_dict()["momentum/w"], torch.tensor([0.5, -0.5]))
    # round 2: the client stays at x1, D2 = 0 ; u2 = 0.5 * u1 = [0.25, -0.25] ; x2 = x1 + 0.5 * u2
    g2 = s.aggregate(global_state=g1, updates=[upd("a", {"w": t64(0.25, -0.25)}, 2)])
    assert torch.equal(g2["w"], t64(0.375, -0.375))  # momentum carries the server past the clients
    assert s.step == 2 and int(s.state_dict()["step"]) == 2


def test_fedavgm_without_momentum_at_unit_rate_is_fedavg():
    gen = torch.Generator().manual_seed(0)
    g = {A: torch.randn(64, 32, generator=gen), B: torch.randn(32, 64, generator=gen)}
    ups = [
        upd(f"c{i}", {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in g.items()}, i + 3)
        for i in range(5)
    ]
    ref = make_strategy("fedavg").aggregate(global_state=g, updates=ups)
    got = make_strategy("fedavgm", eta=1.0, beta=0.0).aggregate(global_state=g, updates=ups)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_fedavgm_defaults_keep_fedavgs_step_once_momentum_builds():
    s = make_strategy("fedavgm")
    assert (s.eta, s.beta) == (0.1, 0.9)
    x = t64(0.0)
    steps = []
    for _ in range(60):  # every client one unit ahead of the global model, every round
        new = s.aggregate(global_state={"w": x}, updates=[upd("a", {"w": x + 1.0}, 1)])["w"]
        steps.append(float(new - x))
        x = new
    assert steps[0] == pytest.approx(0.1) and steps[1] == pytest.approx(0.19)
    assert steps[-1] == pytest.approx(1.0, abs=1e-2)  # eta / (1 - beta)


@pytest.mark.parametrize("bad", [{"eta": 0.0}, {"eta": -1.0}, {"beta": 1.0}, {"beta": -0.1}, {"eta": True}])
def test_fedavgm_rejects_bad_hyperparameters(bad):
    with pytest.raises(InvalidUpdate):
        make_strategy("fedavgm", **bad)


def test_fedavgm_rejects_foreign_server_state():
    s = make_strategy("fedavgm")
    with pytest.raises(ValueError, match="unexpected server state key 'm/w'"):
        s.load_state_dict({"m/w": torch.zeros(1)})  # FedAdam's state


# ---------------------------------------------------------------- FFA-LoRA


def test_ffa_lora_averages_b_keeps_a_and_is_exact_for_the_product():
    a = t64([1.0, 2.0])  # A (r=1, in=2), frozen
    g = {A: a.clone(), B: t64([0.0], [0.0])}
    ups = [
        upd("x", {A: a.clone(), B: t64([1.0], [2.0])}, 1),
        upd("y", {A: a.clone(), B: t64([5.0], [-2.0])}, 3),
    ]
    out = make_strategy("ffa_lora").aggregate(global_state=g, updates=ups)
    # B = (1 * [1, 2] + 3 * [5, -2]) / 4 = [4, -1]
    assert torch.equal(out[B], t64([4.0], [-1.0]))
    assert torch.equal(out[A], a) and out[A].data_ptr() != g[A].data_ptr()
    mean_product = weighted_product_mean([u.state[B] for u in ups], [u.state[A] for u in ups], [1, 3])
    assert torch.allclose(out[B] @ out[A], mean_product)


@pytest.mark.parametrize("change", [1e-3, "nextafter"])
def test_ffa_lora_rejects_a_changed_a_and_names_the_client(change):
    a = torch.tensor([[1.0, 2.0]])
    g = {A: a.clone(), B: torch.zeros(2, 1)}
    moved = a.clone()
    moved[0, 1] = (
        torch.nextafter(moved[0, 1], torch.tensor(3.0)) if change == "nextafter" else moved[0, 1] + change
    )
    ups = [
        upd("good", {A: a.clone(), B: torch.ones(2, 1)}, 1),
        upd("bad-client", {A: moved, B: torch.ones(2, 1)}, 1),
    ]
    with pytest.raises(InvalidUpdate, match="bad-client"):
        make_strategy("ffa_lora").aggregate(global_state=g, updates=ups)


def test_ffa_lora_declares_what_clients_freeze():
    s = make_strategy("ffa_lora")
    assert s.is_frozen(A) and not s.is_frozen(B) and s.is_frozen("emb.lora_embedding_A")


# ---------------------------------------------------------------- product space


def test_product_space_hand_computed_exact_when_rank_allows():
    # r = 2; client products e1 e1^T and 2 e2 e2^T (rank 1 each), equal weights -> diag(0.5, 1) in 3x4
    e = torch.eye(4, dtype=torch.float64)
    b1, a1 = t64([1.0, 0.0], [0.0, 0.0], [0.0, 0.0]), torch.stack([e[0], torch.zeros(4, dtype=torch.float64)])
    b2, a2 = t64([0.0, 0.0], [2.0, 0.0], [0.0, 0.0]), torch.stack([e[1], torch.zeros(4, dtype=torch.float64)])
    g = {A: torch.zeros(2, 4, dtype=torch.float64), B: torch.zeros(3, 2, dtype=torch.float64)}
    out = make_strategy("product_space").aggregate(
        global_state=g, updates=[upd("x", {A: a1, B: b1}, 5), upd("y", {A: a2, B: b2}, 5)]
    )
    # SVD: sigma = 1 (u = e2, v = e2), 0.5 (u = e1, v = e1): B' = [e2, sqrt(.5) e1], A' = [e2; sqrt(.5) e1]
    h = math.sqrt(0.5)
    assert torch.allclose(out[B], t64([0.0, h], [1.0, 0.0], [0.0, 0.0]), atol=1e-12)
    assert torch.allclose(out[A], t64([0.0, 1.0, 0.0, 0.0], [h, 0.0, 0.0, 0.0]), atol=1e-12)
    assert torch.allclose(out[B] @ out[A], 0.5 * (b1 @ a1) + 0.5 * (b2 @ a2), atol=1e-12)


def test_product_space_hand_computed_truncation_rank_one():
    # r = 1; products e1 e1^T (weight 3), e2 e2^T (weight 1): mean diag(0.75, 0.25), best rank 1 diag(0.75, 0)
    g = {A: torch.zeros(1, 2, dtype=torch.float64), B: torch.zeros(2, 1, dtype=torch.float64)}
    ups = [
        upd("x", {A: t64([1.0, 0.0]), B: t64([1.0], [0.0])}, 3),
        upd("y", {A: t64([0.0, 1.0]), B: t64([0.0], [1.0])}, 1),
    ]
    out = make_strategy("product_space").aggregate(global_state=g, updates=ups)
    r = math.sqrt(0.75)
    assert torch.allclose(out[B], t64([r], [0.0]), atol=1e-12)
    assert torch.allclose(out[A], t64([r, 0.0]), atol=1e-12)


def test_product_space_is_the_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(3)
    r, out_dim, in_dim = 2, 6, 5
    states = [
        {A: torch.randn(r, in_dim, generator=gen), B: torch.randn(out_dim, r, generator=gen)}
        for _ in range(3)
    ]
    ns = [1, 2, 4]
    g = {A: torch.zeros(r, in_dim), B: torch.zeros(out_dim, r)}
    out = make_strategy("product_space").aggregate(
        global_state=g, updates=[upd(f"c{i}", s, n) for i, (s, n) in enumerate(zip(states, ns, strict=True))]
    )
    assert out[A].dtype == torch.float32 and out[A].shape == (r, in_dim) and out[B].shape == (out_dim, r)
    mean = weighted_product_mean([s[B] for s in states], [s[A] for s in states], ns)
    u, sv, vh = torch.linalg.svd(mean)
    assert sv[r] > 1e-3  # the average really has rank > r: the truncation is lossy
    best = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
    got = out[B].double() @ out[A].double()
    assert torch.allclose(got, best, atol=1e-5)
    # the Frobenius error is exactly the discarded spectrum (Eckart-Young)
    assert float(torch.linalg.norm(mean - got)) == pytest.approx(float(sv[r:].norm()), rel=1e-5)


def test_low_rank_mean_factors_match_the_dense_truncated_svd():
    gen = torch.Generator().manual_seed(7)
    bs = [torch.randn(9, 3, generator=gen) for _ in range(4)]
    as_ = [torch.randn(3, 7, generator=gen) for _ in range(4)]
    ws = [1.0, 2.0, 0.5, 3.0]
    b, a = low_rank_mean_factors(bs, as_, ws, 3)
    bd, ad = truncated_factors(weighted_product_mean(bs, as_, ws), 3)
    assert torch.allclose(b, bd, atol=1e-10) and torch.allclose(a, ad, atol=1e-10)
    # balanced split: B'^T B' = A' A'^T = diag(S_r)
    assert torch.allclose(b.T @ b, a @ a.T, atol=1e-10)


def test_product_space_averages_other_keys_and_rejects_unpaired_factors():
    g = {A: torch.zeros(1, 2), B: torch.zeros(2, 1), "m.bias": torch.zeros(2)}
    ups = [
        upd("x", {A: torch.ones(1, 2), B: torch.ones(2, 1), "m.bias": torch.tensor([1.0, 0.0])}, 1),
        upd("y", {A: torch.ones(1, 2), B: torch.ones(2, 1), "m.bias": torch.tensor([4.0, 8.0])}, 3),
    ]
    out = make_strategy("product_space").aggregate(global_state=g, updates=ups)
    assert torch.allclose(out["m.bias"], torch.tensor([3.25, 6.0]))
    with pytest.raises(InvalidUpdate, match="partner"):
        pair_lora_keys([A, "other.lora_B.weight"])


def test_product_space_fixed_point_on_products():
    gen = torch.Generator().manual_seed(0)
    s = {A: torch.randn(4, 8, generator=gen), B: torch.randn(8, 4, generator=gen)}
    out = make_strategy("product_space").aggregate(
        global_state={k: torch.zeros_like(v) for k, v in s.items()}, updates=[upd("x", s, 2), upd("y", s, 5)]
    )
    assert torch.allclose(out[B] @ out[A], s[B] @ s[A], atol=1e-5)
