"""Client-level differential privacy (DP-FedAvg) and its accountant. Pure maths; no modules or files.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
arXiv:1710.06963): each client's delta is clipped to L2 norm C, the server adds Gaussian noise of
standard deviation z·C (z, the noise multiplier) to the *sum* of the clipped deltas and divides by
the expected number of clients, so the aggregate's noise std is z·C / E[m].

Accounting is never done here by hand: :func:`epsilon` and :func:`noise_for_epsilon` ask Google's
``dp-accounting`` library (its Rényi-DP accountant, Mironov 2017, and its mechanism calibration).

Two client samplings, each with the adjacency its analysis needs:

- ``poisson``: every client joins a round independently with probability q; neighbouring
  federations differ by adding or removing one client (``ADD_OR_REMOVE_ONE``). The aggregate is
  sum / (q K) with uniform client weights: the estimator the Poisson-subsampled Gaussian bound is
  about.
- ``fixed``: exactly m = round(q K) clients without replacement (the default sampler); the number of
  clients is public and neighbours replace one client's data (``REPLACE_ONE``, Wang, Balle and
  Kasiviswanathan 2019). Replacing one clipped delta moves the weighted sum by up to 2·w·C, so the
  accountant is given the noise multiplier z / 2 relative to that sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedumm.errors import ConfigError

__all__ = [
    "ACCOUNTANT",
    "SAMPLINGS",
    "clip_delta",
    "gaussian_like",
    "epsilon",
    "noise_for_epsilon",
    "accountant_name",
]

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANT = "dp_accounting.rdp.RdpAccountant"
# Rényi orders: integers, for which the subsampled Gaussian's RDP has an exact finite sum
# (dp-accounting's fractional orders need a series that fails to converge at the sample rates and
# noise levels of federated rounds, and are then skipped with a warning on every call)
RDP_ORDERS = tuple(float(a) for a in range(2, 65)) + (80.0, 96.0, 128.0, 256.0, 512.0, 1024.0)


def clip_delta(
    delta: Mapping[str, torch.Tensor], clip_norm: float, keys: Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Scale ``delta`` over ``keys`` to L2 norm at most ``clip_norm``; return (delta, norm, scale).

    A delta within the bound comes back as the same tensors (scale 1.0): clipping with C = inf is the
    identity, bit for bit.
    """
    if not clip_norm > 0:
        raise ConfigError(f"clip norm must be > 0, got {clip_norm!r}")
    keys = sorted(delta) if keys is None else list(keys)
    norm = math.sqrt(math.fsum(float(delta[k].detach().double().pow(2).sum()) for k in keys))
    if norm <= clip_norm:
        return dict(delta), norm, 1.0
    scale = clip_norm / norm
    out = dict(delta)
    for k in keys:
        out[k] = (delta[k].detach().double() * scale).to(delta[k].dtype)
    return out, norm, scale


def gaussian_like(t: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of ``std`` with ``t``'s shape, drawn in float64 from ``generator``."""
    return torch.randn(t.shape, generator=generator, dtype=torch.float64) * std


def _check(sample_rate: float, rounds: int, delta: float, sampling: str, clients: int | None) -> None:
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if not (0 < sample_rate <= 1) or not math.isfinite(sample_rate):
        raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be an int >= 0, got {rounds!r}")
    if not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    if sampling == "fixed" and (clients is None or clients < 1):
        raise ConfigError("fixed-size sampling needs the number of clients K (--clients)")


def _event(noise_multiplier: float, sample_rate: float, rounds: int, sampling: str, clients: int | None):
    import dp_accounting

    if sampling == "poisson":
        step = dp_accounting.GaussianDpEvent(noise_multiplier)
        if sample_rate < 1:
            step = dp_accounting.PoissonSampledDpEvent(sample_rate, step)
    else:
        # replace-one: the sum of clipped deltas moves by up to 2 C when one client's data changes
        step = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
        size = max(1, round(sample_rate * clients))
        if size < clients:
            step = dp_accounting.SampledWithoutReplacementDpEvent(clients, size, step)
    return dp_accounting.SelfComposedDpEvent(step, rounds)


def _accountant(sampling: str):
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    relation = (
        NeighboringRelation.ADD_OR_REMOVE_ONE if sampling == "poisson" else NeighboringRelation.REPLACE_ONE
    )
    return RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=relation)


def accountant_name(sampling: str) -> str:
    """The accountant and the event it composes, for reports (``fedumm privacy`` prints it)."""
    if sampling == "poisson":
        return f"{ACCOUNTANT} (Poisson-subsampled Gaussian, add-or-remove-one client)"
    return f"{ACCOUNTANT} (Gaussian sampled without replacement, replace-one client)"


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    sampling: str = "poisson",
    clients: int | None = None,
) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds of DP-FedAvg (inf without noise, 0 after no round)."""
    _check(sample_rate, rounds, delta, sampling, clients)
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ConfigError(f"noise multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _accountant(sampling)
    acc.compose(_event(noise_multiplier, sample_rate, rounds, sampling, clients))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(
    *,
    target_epsilon: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    sampling: str = "poisson",
    clients: int | None = None,
) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon``."""
    import dp_accounting

    _check(sample_rate, rounds, delta, sampling, clients)
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ConfigError(f"target epsilon must be finite and > 0, got {target_epsilon!r}")
    if rounds < 1:
        raise ConfigError("choosing a noise multiplier needs rounds >= 1")
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(sampling),
        lambda z: _event(z, sample_rate, rounds, sampling, clients),
        target_epsilon,
        delta,
        dp_accounting.ExplicitBracketInterval(1e-3, 1e4),
        tol=1e-6,
    )
    z = float(z)
    # Brent's method stops within tol of the boundary; step up until the budget truly holds
    while (
        epsilon(
            noise_multiplier=z,
            sample_rate=sample_rate,
            rounds=rounds,
            delta=delta,
            sampling=sampling,
            clients=clients,
        )
        > target_epsilon
    ):
        z *= 1 + 1e-6
    return z
