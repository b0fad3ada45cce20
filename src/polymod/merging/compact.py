"""Choosing how a merged weight delta is stored: dense, sparse, or low rank within an error bound.

A ΔW-wise merge (TIES, DARE, … of LoRAs or any deltas) produces an exact ΔW per
site. Its storage is a choice, made on purpose:

* **exact** representations: dense (D_out·D_in values) or sparse (the non-zero
  entries, a value and an int32 index each). TIES and DARE keep at most
  Σᵢ densityᵢ of the entries, so their merges are often sparse enough that the
  sparse form is smaller; ``result="auto"`` takes the smaller exact form;
* **low rank within a bound**: with ``max_rel_error=ε`` the merged ΔW of every
  site is factorised by truncated SVD at the smallest rank r for which
  ‖ΔW − BA‖_F / ‖ΔW‖_F ≤ ε at every site (r is one rank for the whole module:
  the largest any site needs). The LoRA is kept only when it is smaller than
  the exact form; otherwise the exact form is kept (error 0).

The relative error of a rank-r truncation is read off the singular values σ:
√(Σ_{i>r} σᵢ²) / √(Σ σᵢ²) (Eckart–Young), so one SVD per site gives every rank's error.
"""

from __future__ import annotations

import math

import torch

INDEX_BYTES = 4  # a sparse entry's int32 flat index


def dense_bytes(mixed: dict[str, torch.Tensor]) -> int:
    """Bytes of the dense weight deltas."""
    return sum(t.numel() * t.element_size() for t in mixed.values())


def sparse_bytes(mixed: dict[str, torch.Tensor]) -> int:
    """Bytes of the non-zero entries, stored as (value, int32 index) pairs."""
    return sum(int(torch.count_nonzero(t)) * (t.element_size() + INDEX_BYTES) for t in mixed.values())


def truncation_errors(delta: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error of the best rank-r approximation of ΔW (D_out, D_in), for r = 0 … q.

    Returns:
        (q + 1,) float64: entry r is √(Σ_{i>r} σᵢ²) / ‖ΔW‖_F (0 for a zero ΔW).
    """
    s = torch.linalg.svdvals(delta.detach().to(torch.float64))  # (q,)
    tail = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0])  # Σ_{i≥r} σᵢ², r = 0 … q−1
    tail = torch.cat([tail, tail.new_zeros(1)])
    total = float(tail[0])
    return (tail / total).sqrt() if total > 0 else torch.zeros_like(tail)


def smallest_rank(errors: torch.Tensor, bound: float) -> int:
    """The smallest rank whose truncation error is within ``bound`` (errors as :func:`truncation_errors`)."""
    ok = torch.nonzero(errors <= bound + 1e-12).view(-1)
    return int(ok[0]) if ok.numel() else errors.numel() - 1


def lora_bytes(shapes: list[tuple[int, int]], rank: int, itemsize: int) -> int:
    """Bytes of LoRA factors of one rank at sites of the given (D_out, D_in) shapes."""
    return sum(rank * (d_out + d_in) * itemsize for d_out, d_in in shapes)


def check_bound(bound: float) -> str | None:
    """Why ``bound`` is not a usable relative error bound (None when it is)."""
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
        return f"max_rel_error must be a number, got {bound!r}"
    if not 0.0 <= bound < 1.0:
        return f"max_rel_error must be in [0, 1) (a relative Frobenius error per site), got {bound!r}"
    return None
