"""Every registered strategy: identical clients are a fixed point, inputs untouched, order-free.

A strategy may declare, as class attributes, how the contract applies to it:
``fixed_point`` = "factors" (default: identical clients are returned as they are), "product" (their
LoRA products B·A are reproduced, the factors may change gauge) or "global" (a server optimizer:
identical clients equal to the global state leave it unchanged, and identical clients elsewhere move
every coordinate towards them); ``frozen_suffixes`` = key endings clients never train (copied from the
global state into the clients' states here).
"""

from __future__ import annotations

import pytest
import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.strategies import STRATEGIES, make_strategy
from fedumm.types import ClientUpdate


def updates(states, ns, scores):
    return [
        ClientUpdate(client_id=f"c{i}", state=s, num_examples=n, metrics={"val_score": sc})
        for i, (s, n, sc) in enumerate(zip(states, ns, scores, strict=True))
    ]


def rand_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": torch.randn(4, 8, generator=g),
        "m.lora_B.weight": torch.randn(8, 4, generator=g),
    }


def client_state(name, seed, global_state):
    """A random client state whose keys the strategy freezes on clients equal the global ones."""
    frozen = tuple(STRATEGIES.get(name).frozen_suffixes)
    return {k: global_state[k].clone() if k.endswith(frozen) else v for k, v in rand_state(seed).items()}


def product(s):
    return s["m.lora_B.weight"] @ s["m.lora_A.weight"]


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_identical_clients_are_a_fixed_point(name):
    kind = STRATEGIES.get(name).fixed_point
    g = rand_state(1)
    s = {k: v.clone() for k, v in g.items()} if kind == "global" else client_state(name, 0, g)
    out = make_strategy(name).aggregate(
        global_state=g, updates=updates([s, s, s], [3, 5, 7], [0.2, 0.5, 0.9])
    )
    if kind == "product":
        assert torch.allclose(product(out), product(s), atol=1e-5)
    else:
        assert all(torch.allclose(out[k], s[k], atol=1e-6) for k in s)


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if STRATEGIES.get(n).fixed_point == "global"])
def test_server_optimizers_move_towards_identical_clients(name):
    g = rand_state(1)
    s = rand_state(0)
    out = make_strategy(name).aggregate(global_state=g, updates=updates([s, s], [1, 2], [0.5, 0.5]))
    assert all(torch.equal(torch.sign(out[k] - g[k]), torch.sign(s[k] - g[k])) for k in s)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_does_not_mutate_inputs_and_returns_fresh_tensors(name):
    g = rand_state(9)
    states = [client_state(name, i, g) for i in range(3)]
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    g_copy = {k: v.clone() for k, v in g.items()}
    out = make_strategy(name).aggregate(global_state=g, updates=updates(states, [1, 2, 3], [0.3, 0.4, 0.5]))
    assert all(torch.equal(s[k], c[k]) for s, c in zip(states, copies, strict=True) for k in s)
    assert all(torch.equal(g[k], g_copy[k]) for k in g)
    ptrs = {t.data_ptr() for s in states for t in s.values()} | {t.data_ptr() for t in g.values()}
    assert not any(t.data_ptr() in ptrs for t in out.values())
    assert list(out) == sorted(out)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_order_of_updates_does_not_matter(name):
    g = rand_state(9)
    states = [client_state(name, i, g) for i in range(4)]
    ups = updates(states, [1, 2, 3, 4], [0.1, 0.4, 0.6, 0.9])
    a = make_strategy(name).aggregate(global_state=g, updates=ups)
    b = make_strategy(name).aggregate(global_state=g, updates=list(reversed(ups)))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_no_updates_is_an_error(name):
    with pytest.raises(InvalidUpdate):
        make_strategy(name).aggregate(global_state=rand_state(0), updates=[])
