"""Client-level DP: clipping, the accountant against independent implementations, the planning CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedumm.errors import ConfigError
from fedumm.fl.privacy import RDP_ORDERS, clip_delta, epsilon, gaussian_like, noise_for_epsilon


def test_clip_delta_scales_long_deltas_and_leaves_short_ones_untouched():
    d = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    same, norm, scale = clip_delta(d, math.inf)
    assert norm == 5.0 and scale == 1.0 and same["a"] is d["a"] and same["b"] is d["b"]  # identity
    clipped, norm, scale = clip_delta(d, 1.0)
    assert scale == pytest.approx(0.2)
    assert torch.allclose(clipped["a"], torch.tensor([0.6])) and torch.allclose(
        clipped["b"], torch.tensor([0.8])
    )
    assert torch.equal(d["a"], torch.tensor([3.0]))  # input untouched


def test_gaussian_noise_has_the_requested_std():
    gen = torch.Generator().manual_seed(0)
    x = gaussian_like(torch.zeros(200_000), 0.5, gen)
    assert float(x.std()) == pytest.approx(0.5, rel=0.01) and abs(float(x.mean())) < 0.01


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.0, 0.25, 100), (0.8, 0.05, 1000), (2.0, 1.0, 10)])
def test_poisson_epsilon_agrees_with_opacus(z, q, rounds):
    """dp-accounting's RDP accountant against opacus' RDP analysis (an independent implementation)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    ours = epsilon(noise_multiplier=z, sample_rate=q, rounds=rounds, delta=1e-5)
    orders = list(RDP_ORDERS)
    theirs, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders), delta=1e-5
    )
    # the two libraries convert RDP to (epsilon, delta) with slightly different bounds
    assert ours == pytest.approx(float(theirs), rel=0.02)


def test_rdp_is_an_upper_bound_of_the_pld_accountant():
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    z, q, rounds = 1.0, 0.1, 200
    rdp = epsilon(noise_multiplier=z, sample_rate=q, rounds=rounds, delta=1e-5)
    pld = PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    tight = pld.get_epsilon(1e-5)
    assert tight <= rdp <= 1.5 * tight


def test_fixed_size_sampling_is_accounted_as_replace_one():
    # full participation, replace-one: the Gaussian of multiplier z / 2 composed T times
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    ref = RdpAccountant(list(RDP_ORDERS), dp_accounting.NeighboringRelation.REPLACE_ONE)
    ref.compose(dp_accounting.GaussianDpEvent(0.5), 5)
    got = epsilon(noise_multiplier=1.0, sample_rate=1.0, rounds=5, delta=1e-5, sampling="fixed", clients=4)
    assert got == pytest.approx(ref.get_epsilon(1e-5))
    partial = epsilon(
        noise_multiplier=1.0, sample_rate=0.25, rounds=5, delta=1e-5, sampling="fixed", clients=16
    )
    assert partial < got  # sampling 4 of 16 amplifies privacy


def test_epsilon_edges_and_errors():
    assert epsilon(noise_multiplier=0.0, sample_rate=0.5, rounds=3, delta=1e-5) == math.inf
    assert epsilon(noise_multiplier=1.0, sample_rate=0.5, rounds=0, delta=1e-5) == 0.0
    more = [epsilon(noise_multiplier=1.0, sample_rate=0.5, rounds=t, delta=1e-5) for t in (1, 2, 4)]
    assert more == sorted(more) and more[0] < more[-1]
    with pytest.raises(ConfigError, match="sample rate"):
        epsilon(noise_multiplier=1.0, sample_rate=0.0, rounds=1, delta=1e-5)
    with pytest.raises(ConfigError, match="clients"):
        epsilon(noise_multiplier=1.0, sample_rate=0.5, rounds=1, delta=1e-5, sampling="fixed")


def test_noise_for_epsilon_meets_the_target_tightly():
    z = noise_for_epsilon(target_epsilon=4.0, sample_rate=0.25, rounds=50, delta=1e-5)
    assert epsilon(noise_multiplier=z, sample_rate=0.25, rounds=50, delta=1e-5) <= 4.0
    assert epsilon(noise_multiplier=0.99 * z, sample_rate=0.25, rounds=50, delta=1e-5) > 4.0


def test_privacy_cli_prints_epsilon_and_the_accountant():
    from typer.testing import CliRunner

    from fedumm.cli import app

    args = [
        "privacy",
        "--noise-multiplier",
        "1.1",
        "--sample-rate",
        "0.25",
        "--rounds",
        "50",
        "--delta",
        "1e-5",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["epsilon"] == pytest.approx(
        epsilon(noise_multiplier=1.1, sample_rate=0.25, rounds=50, delta=1e-5)
    )
    assert out["accountant"].startswith("dp_accounting.rdp.RdpAccountant")
    res = CliRunner().invoke(
        app, ["privacy", "--target-epsilon", "3", "--sample-rate", "0.25", "--rounds", "50"]
    )
    out = json.loads(res.stdout)
    assert out["epsilon"] <= 3.0 and out["noise_multiplier"] > 1.1
    res = CliRunner().invoke(app, ["privacy", "--sample-rate", "0.25", "--rounds", "5"])
    assert res.exit_code == 2 and "exactly one" in res.output
