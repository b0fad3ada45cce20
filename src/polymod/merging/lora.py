"""LoRA-aware merging: three semantics, each explicit.

N LoRA modules at one site give N updates ΔW_i = s_i B_i A_i (A_i (r_i, D_in),
B_i (D_out, r_i)). Merging them can mean three different things:

* ``delta`` — **ΔW-wise.** Merge the updates themselves, ΔW = M(ΔW_1, …, ΔW_N)
  for any method M (linear, TIES, DARE, …). Exact in ΔW. The result is a
  delta module, or, given a ``rank``, a LoRA re-factorised by truncated SVD,
  ΔW ≈ (U_r Σ_r) V_rᵀ, with the relative reconstruction error
  ‖ΔW − B A‖_F / ‖ΔW‖_F reported per site (Eckart–Young: √(Σ_{j>r} σ_j²/Σ_j σ_j²)).
  PEFT's ``add_weighted_adapter(combination_type="svd" / "ties_svd" / …)``.
* ``cat`` — **concatenation.** A = [c_1 s_1 A_1; …; c_N s_N A_N],
  B = [B_1 … B_N], so B A = Σ c_i s_i B_i A_i exactly, at rank Σ r_i. Only for
  methods linear in ΔW (linear, task arithmetic, negation). PEFT's ``cat``.
* ``ab`` — **A/B-wise averaging.** A = M(A_1, …, A_N), B = M(s_1 B_1, …, s_N B_N)
  with the same weights on both factors, the semantics of LoraHub (Huang et al.
  2023, arXiv 2307.13269) and Polytropon's skill averaging (Ponti et al. 2023).
  It is **not linear in ΔW**: with weights w, B A = Σ_i Σ_j w_i w_j s_j B_j A_i
  contains cross terms, and one module with weight w becomes w² ΔW. Needs equal
  ranks. λ scales B only (so that it scales ΔW once). PEFT's ``linear``/``ties``
  on LoRA are this semantics with weights √(w_i s_i).

Every result LoRA has scaling 1 (α = rank): the input scalings are folded into
the factors.
"""

from __future__ import annotations

import math

import torch

from polymod.errors import ConfigError
from polymod.merging.methods import MergeSpec, TensorMerge
from polymod.modules.lora import LoRAPart


def linear_coefficients(spec: MergeSpec) -> list[float]:
    """c_i = λ w_i (/ Σ w when normalising): the coefficients of a method that is linear in ΔW.

    Raises:
        ConfigError: the method sparsifies or elects signs (not linear in ΔW).
    """
    if spec.sparsify is not None or spec.elect:
        raise ConfigError(
            f"lora='cat' is exact only for methods linear in ΔW (linear, task_arithmetic); {spec.method} is not. "
            "Use lora='delta' (optionally with rank=...) or lora='ab'."
        )
    total = sum(spec.weights)
    div = total if spec.normalize and abs(total) >= 1e-8 else 1.0
    return [spec.lam * w / div for w in spec.weights]


def cat(parts: list[LoRAPart], spec: MergeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate LoRA factors: returns (A (Σr, D_in), B (D_out, Σr)) with B A = Σ c_i s_i B_i A_i."""
    coeffs = linear_coefficients(spec)
    a = torch.cat([p.A.detach() * (c * p.scaling) for p, c in zip(parts, coeffs)], dim=0)  # (Σr, D_in)
    b = torch.cat([p.B.detach() for p in parts], dim=1)  # (D_out, Σr)
    return a, b


def ab(parts: list[LoRAPart], spec: MergeSpec, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A/B-wise merge with method ``spec`` applied to the A's and to the (scaled) B's separately.

    Raises:
        ConfigError: the ranks differ.
    """
    ranks = [p.rank for p in parts]
    if len(set(ranks)) > 1:
        raise ConfigError(f"lora='ab' averages A and B factor by factor and needs equal ranks, got {ranks} "
                          f"at {site}; use lora='cat' or lora='delta'")
    a_spec = spec.with_weights(spec.weights, lam=1.0)
    a = _merge(a_spec, f"{site}.lora_A", [p.A.detach() for p in parts])  # (r, D_in)
    b = _merge(spec, f"{site}.lora_B", [p.B.detach() * p.scaling for p in parts])  # (D_out, r)
    return a, b


def _merge(spec: MergeSpec, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    merger = TensorMerge(spec, name, tensors[0].numel())
    if merger.needs_stats:
        for i, t in enumerate(tensors):
            merger.observe(i, t)
    return merger(tensors)


def svd_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors of ΔW (D_out, D_in) by truncated SVD.

    Args:
        delta: ΔW in (D_out, D_in) layout.
        rank: r; when it exceeds min(D_out, D_in) the factors are zero-padded to r.

    Returns:
        (A (r, D_in), B (D_out, r), relative Frobenius error of B A), computed in float64.
    """
    m = delta.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (D_out, q), (q,), (q, D_in)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]  # (D_out, r)
    a = vh[:r]  # (r, D_in)
    total = float((s * s).sum())
    err = math.sqrt(float((s[r:] * s[r:]).sum()) / total) if total > 0 else 0.0
    if r < rank:
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    return a.to(delta.dtype), b.to(delta.dtype), err


def to_out_in(delta: torch.Tensor, site_kind: str) -> torch.Tensor:
    """ΔW from the host layout to (D_out, D_in): Conv1D and Embedding store it transposed."""
    return delta if site_kind == "linear" else delta.t()


def svd_error_metric(errors: dict[str, float], rank: int) -> dict[str, float | int | str]:
    """The card metric of an SVD re-factorisation: the worst site's relative error as its ``value``.

    A hub card metric is a number or an object with a numeric ``value`` and short fields, so
    the per-site errors are summarised (worst, mean, the worst site's name) rather than listed.

    Args:
        errors: ‖ΔW − B A‖_F / ‖ΔW‖_F per site.
        rank: the rank of the re-factorised LoRA.
    """
    worst_site = max(errors, key=errors.__getitem__, default="")
    worst = errors.get(worst_site, 0.0)
    mean = sum(errors.values()) / len(errors) if errors else 0.0
    return {"value": worst, "max": worst, "mean": mean, "rank": rank, "worst_site": worst_site[:200]}
