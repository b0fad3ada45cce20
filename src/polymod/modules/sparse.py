"""Sparse fine-tuning: a sparse diff on chosen host weights (composable sparse fine-tuning).

At a site with frozen weight W the module adds a diff that is non-zero on a
fixed set S of entries only::

    W' = W + ΔW,   ΔW[i] = v_i for i ∈ S, 0 elsewhere,   so Δy = ΔW x

The diff is stored sparse: the flat positions S (``indices``, int32) and the
values v (``values``), both in the part's state dict, so ``pm.save``/``pm.load``
keep them. ``delta_weight`` returns the dense ΔW in the host's layout, which
makes the module mergeable and lets parameter aggregation treat it like LoRA.
Values start at zero: the module is the identity at initialisation.

How S is chosen (``mask``):

* ``random``: a uniformly random ``density`` fraction of each weight (seeded
  per site from ``seed`` and the site name);
* ``magnitude``: the ``density`` fraction of host entries largest in |W|;
* ``lt-sft``: the Lottery-Ticket Sparse Fine-Tuning of Ansell et al. (2022,
  "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", arXiv 2110.07560):
  a short full fine-tune, then the entries that moved most, per tensor or
  across all tensors. Built by :func:`polymod.training.lt_sft.lt_sft`, which
  records the per-site entry counts in ``counts``.

Defaults: every linear layer but the output head (``linear``), random mask,
density 1%. The density is polymod's choice, not the paper's: Ansell et al.
choose the number of tuned entries K per experiment, as a parameter budget
comparable to the adapters they compare with; pass ``density`` to set one.

Cost: unmerged, Δy = ΔW x is one dense extra matrix product per site (the diff
is scattered into a dense ΔW, which is exact and simple; sparse kernels win
only at very low density). Merged, there is no overhead.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import ConfigError
from polymod.modules.contract import register
from polymod.sites import Site

MASKS = ("random", "magnitude", "lt-sft")


def weight_shape(site: Site) -> tuple[int, int]:
    """The host weight's shape at ``site``: Linear (D_out, D_in); Conv1D (D_in, D_out); Embedding (vocab, D)."""
    if site.kind == "linear":
        return site.out_features, site.in_features
    return site.in_features, site.out_features


@register
@dataclass(frozen=True)
class SparseFT:
    """Configuration of a sparse fine-tuning module.

    Args:
        density: fraction of each site's weight entries that are tuned, in (0, 1].
        mask: how the entries are chosen: ``random``, ``magnitude`` (largest |W|) or
            ``lt-sft`` (chosen by :func:`polymod.training.lt_sft.lt_sft`).
        seed: seed of the random mask (combined with each site's name).
        counts: per-site entry counts ``((site, n), ...)``, set by mask procedures that
            choose entries across tensors (LT-SFT); sites not listed use ``density``.
        sites: site selection (roles, globs, ``re:`` regexes); see :mod:`polymod.sites`.
    """

    kind: ClassVar[str] = "sparse"
    density: float = 0.01
    mask: Literal["random", "magnitude", "lt-sft"] = "random"
    seed: int = 0
    counts: tuple[tuple[str, int], ...] = ()
    sites: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
            raise ConfigError(f"SparseFT density must be in (0, 1], got {self.density!r}")
        if self.mask not in MASKS:
            raise ConfigError(f"SparseFT mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        try:
            counts = tuple((str(s), int(n)) for s, n in self.counts)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"SparseFT counts must be (site, count) pairs, got {self.counts!r}") from exc
        if any(n < 0 for _, n in counts):
            raise ConfigError(f"SparseFT counts must be non-negative, got {self.counts!r}")
        object.__setattr__(self, "counts", counts)

    def count(self, site: Site) -> int:
        """Number of tuned entries at ``site``: from ``counts`` if listed, else round(density · numel), at least 1."""
        listed = dict(self.counts)
        if site.name in listed:
            return listed[site.name]
        rows, cols = weight_shape(site)
        return max(1, round(self.density * rows * cols))

    def check_site(self, site: Site) -> str | None:
        if site.kind == "block":
            return "SparseFT acts on leaf layers (Linear, Conv1D, Embedding), not on whole blocks"
        rows, cols = weight_shape(site)
        if rows * cols >= 2**31:
            return f"the weight has {rows * cols:,} entries; int32 indices address at most 2**31"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> SparsePart:
        shape, k = weight_shape(site), self.count(site)
        if layer is None:  # loading: indices and values come from the state dict
            return SparsePart(site.kind, shape, torch.zeros(k, dtype=torch.int32))
        if self.mask == "lt-sft":
            raise ConfigError(
                "SparseFT(mask='lt-sft') entries come from a short full fine-tune; "
                "build the module with polymod.training.lt_sft.lt_sft(host, loss_fn, batches, ...)"
            )
        weight = layer.weight.detach()
        if self.mask == "magnitude":
            indices = weight.abs().flatten().topk(k).indices  # (k,)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(site.name.encode()))
            indices = torch.randperm(weight.numel(), generator=g)[:k]  # (k,)
        part = SparsePart(site.kind, shape, indices.sort().values.to(torch.int32))
        return part.to(device=weight.device, dtype=weight.dtype)


class SparsePart(nn.Module):
    """A sparse diff at one site: flat ``indices`` (buffer, int32) and ``values`` (parameter)."""

    def __init__(self, site_kind: str, shape: tuple[int, int], indices: torch.Tensor):
        super().__init__()
        self.site_kind = site_kind
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.to(torch.int32))
        self.values = nn.Parameter(torch.zeros(indices.numel()))

    def dense(self) -> torch.Tensor:
        """ΔW in the host weight's layout, scattered from (indices, values); differentiable in the values."""
        flat = self.values.new_zeros(self.shape[0] * self.shape[1])
        return flat.index_put((self.indices.long(),), self.values).view(self.shape)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = ΔW x, shaped like ``y``."""
        delta = self.dense()
        if self.site_kind == "embedding":
            return F.embedding(x, delta)  # (B, T, D)
        if self.site_kind == "conv1d":
            return x @ delta  # (B, T, D_out)
        return F.linear(x, delta)  # (B, T, D_out)

    def add_into(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """y + weight · ΔW x, the addition fused into the GEMM for linear layers."""
        if self.site_kind == "embedding":
            return y + weight * self(x, y)
        delta = self.dense()
        wt = delta.t() if self.site_kind == "linear" else delta  # (D_in, D_out)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), wt, alpha=weight)  # (B·T, D_out)
        return out.view(y.shape)

    def delta_weight(self, layer: nn.Module | None = None) -> torch.Tensor:
        """The dense ΔW in the host weight's layout (zero outside the stored entries)."""
        return self.dense()

    def extra_repr(self) -> str:
        numel = self.shape[0] * self.shape[1]
        return f"shape={self.shape}, entries={self.indices.numel()} ({100 * self.indices.numel() / numel:.2f}%)"


__all__ = ["SparseFT", "SparsePart", "weight_shape"]
