"""Robust-aggregation maths on tiny hand-computed inputs."""

from __future__ import annotations

import math

import pytest
import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl import robust


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_count_bound_is_cap_times_median_of_reports():
    # median of (10, 20, 30, 1e9) is 25: a billion-example claim moves the bound only to 2 * 25
    assert robust.count_bound([10, 20, 30, 10**9], cap=2.0) == 50
    assert robust.bound_counts([10, 20, 30, 10**9], cap=2.0) == [10, 20, 30, 50]
    assert robust.bound_counts([0, 4, 6], cap=1.0) == [0, 4, 5]  # zeros ignored, floor(1 * 5)
    with pytest.raises(InvalidUpdate, match="cap"):
        robust.count_bound([1, 2], cap=0.5)


def test_norms_and_clip_scale():
    assert robust.state_norm({"a": t(3.0), "b": t(4.0)}) == 5.0
    assert robust.state_norm({"a": t(3.0), "b": t(4.0)}, keys=["a"]) == 3.0
    assert robust.adaptive_norm_bound([1.0, 2.0, 100.0], multiple=2.0) == 4.0
    assert robust.clip_scale(5.0, 10.0) == 1.0
    assert robust.clip_scale(10.0, 4.0) == 0.4
    assert robust.clip_scale(0.0, 0.0) == 1.0


def test_coordinate_median_odd_and_even():
    assert torch.equal(
        robust.coordinate_median([t(1, 9), t(5, 2), t(100, 3)]), torch.tensor([5.0, 3.0]).double()
    )
    assert torch.equal(robust.coordinate_median([t(1), t(2), t(4), t(100)]), torch.tensor([3.0]).double())


def test_trimmed_mean_and_shares():
    xs = [t(1, 10), t(2, 20), t(3, 30), t(4, 40), t(1000, -1000)]
    # fraction 0.2 of 5 -> drop 1 per end: first coordinate keeps 2, 3, 4; second keeps 10, 20, 30
    assert torch.allclose(robust.trimmed_mean(xs, 0.2), torch.tensor([3.0, 20.0]).double())
    shares = robust.trimmed_share(xs, 0.2)
    # the outlier is trimmed at both coordinates, client 0 at the first (min), client 3 at the second (max)
    assert shares == [0.5, 0.0, 0.0, 0.5, 1.0]
    assert robust.trimmed_share(xs, 0.1) == [0.0] * 5  # floor(0.5) = 0: nothing is trimmed
    with pytest.raises(InvalidUpdate):
        robust.trim_count(4, 0.5)


def test_krum_scores_and_selection():
    # points on a line: 0, 1, 2 and an outlier at 10; f = 1 -> each sums its n - f - 2 = 1 nearest
    vs = [t(0.0), t(1.0), t(2.0), t(10.0)]
    sq = robust.pairwise_sq_distances(vs)
    assert sq[0, 3] == 100.0 and sq[1, 2] == 1.0
    assert robust.krum_scores(sq, f=1) == [1.0, 1.0, 1.0, 64.0]
    assert robust.multi_krum_select(sq, f=1) == [0, 1, 2]  # m = n - f
    assert robust.multi_krum_select(sq, f=1, m=1) == [0]  # ties go to the earlier client
    with pytest.raises(InvalidUpdate, match="n - f - 2"):
        robust.krum_scores(sq, f=2)


def test_inputs_are_not_mutated():
    xs = [t(3.0, 1.0), t(1.0, 2.0), t(2.0, 3.0)]
    before = [x.clone() for x in xs]
    robust.coordinate_median(xs)
    robust.trimmed_mean(xs, 0.34)
    assert all(torch.equal(a, b) for a, b in zip(xs, before, strict=True))
    assert math.isfinite(robust.state_norm({"x": xs[0]}))
