"""Pure LoRA maths over adapter states: A/B key pairing, products, rank-r re-factorisation.

A LoRA module adds ``(alpha / r) * B @ A`` to a frozen weight, with ``A`` of shape (r, in) and ``B`` of
shape (out, r). The scaling ``alpha / r`` is shared by every client, so averaging the products ``B @ A``
and averaging the weight updates are the same operation up to that constant.

The rank-r factorisation is the truncated SVD (Eckart and Young 1936: the best rank-r approximation in
Frobenius and spectral norm), split symmetrically: ``B' = U_r sqrt(S_r)``, ``A' = sqrt(S_r) V_r^T``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fedumm.errors import InvalidUpdate
from fedumm.fl.aggregate import normalize_weights

__all__ = [
    "LoraPair",
    "is_lora_a",
    "is_lora_b",
    "pair_lora_keys",
    "lora_product",
    "weighted_product_mean",
    "svd_sign_fix",
    "truncated_factors",
    "low_rank_mean_factors",
]

# peft's adapter-name-free keys: "...q_proj.lora_A.weight" (Linear) or "...lora_embedding_A" (Embedding)
_A_RE = re.compile(r"^(?P<prefix>.*)\.lora_(?P<kind>embedding_)?A(?P<suffix>\.weight)?$")
_B_RE = re.compile(r"^(?P<prefix>.*)\.lora_(?P<kind>embedding_)?B(?P<suffix>\.weight)?$")


@dataclass(frozen=True)
class LoraPair:
    """The A and B keys of one LoRA module."""

    module: str
    a_key: str
    b_key: str


def is_lora_a(key: str) -> bool:
    """True for a LoRA down-projection key (lora_A / lora_embedding_A)."""
    return _A_RE.match(key) is not None


def is_lora_b(key: str) -> bool:
    """True for a LoRA up-projection key (lora_B / lora_embedding_B)."""
    return _B_RE.match(key) is not None


def pair_lora_keys(keys: Iterable[str]) -> tuple[list[LoraPair], list[str]]:
    """Split keys into (A, B) pairs per module and the other keys, both sorted; a lone A or B is an error."""
    keys = sorted(keys)
    a_of: dict[tuple[str, str], str] = {}
    b_of: dict[tuple[str, str], str] = {}
    other: list[str] = []
    for key in keys:
        if m := _A_RE.match(key):
            a_of[(m["prefix"], m["kind"] or "")] = key
        elif m := _B_RE.match(key):
            b_of[(m["prefix"], m["kind"] or "")] = key
        else:
            other.append(key)
    unpaired = sorted(set(a_of) ^ set(b_of))
    if unpaired:
        lonely = [a_of.get(u) or b_of.get(u) for u in unpaired[:3]]
        raise InvalidUpdate(f"LoRA keys without their A/B partner: {lonely}")
    pairs = [LoraPair(module=p, a_key=a_of[(p, k)], b_key=b_of[(p, k)]) for p, k in sorted(a_of)]
    return pairs, other


def _check_factors(b: torch.Tensor, a: torch.Tensor) -> None:
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise InvalidUpdate(
            f"LoRA factors must be B (out, r) and A (r, in); got {tuple(b.shape)} and {tuple(a.shape)}"
        )


def lora_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B @ A in float64 (the unscaled LoRA update of one module)."""
    _check_factors(b, a)
    return b.detach().to("cpu", torch.float64) @ a.detach().to("cpu", torch.float64)


def weighted_product_mean(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """sum_k w_k B_k @ A_k with normalised weights, in float64 (dense: for small modules and tests)."""
    if not (len(bs) == len(as_) == len(weights)):
        raise InvalidUpdate(f"{len(bs)} B factors, {len(as_)} A factors, {len(weights)} weights")
    ws = normalize_weights(weights)
    out = None
    for b, a, w in zip(bs, as_, ws, strict=True):
        term = w * lora_product(b, a)
        out = term if out is None else out + term
    return out


def svd_sign_fix(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular pairs so each U column's largest-magnitude entry (first on ties) is positive."""
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vh * signs[:, None]


def _split(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(rank, s.shape[0])
    u, vh = svd_sign_fix(u[:, :k], vh[:k])
    root = s[:k].clamp_min(0).sqrt()
    b = u * root
    a = root[:, None] * vh
    if k < rank:  # fewer singular values than the rank: pad with zero components
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return b, a


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 factors B (out, rank), A (rank, in) with B @ A the best rank-``rank`` approximation."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if matrix.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    u, s, vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)
    return _split(u, s, vh, rank)


def low_rank_mean_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 rank-``rank`` factors of sum_k w_k B_k @ A_k, equal to truncated SVD of the dense product."""
    # sum_k w_k B_k A_k = [w_1 B_1 ... w_K B_K] @ [A_1; ...; A_K]; thin QR of both sides leaves a small
    # (K r, K r) core whose SVD gives the same singular triplets at cost O((out + in) (K r)^2).
    if not (len(bs) == len(as_) == len(weights)):
        raise InvalidUpdate(f"{len(bs)} B factors, {len(as_)} A factors, {len(weights)} weights")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for b, a in zip(bs, as_, strict=True):
        _check_factors(b, a)
    ws = normalize_weights(weights)
    b_cat = torch.cat([w * b.detach().to("cpu", torch.float64) for b, w in zip(bs, ws, strict=True)], dim=1)
    a_cat = torch.cat([a.detach().to("cpu", torch.float64) for a in as_], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)  # (out, m), (m, Kr) with m = min(out, Kr)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (in, n), (n, Kr)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return _split(q_b @ u_c, s, vh_c @ q_a.T, rank)
