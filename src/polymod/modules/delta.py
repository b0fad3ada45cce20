"""Dense delta: a full change of chosen host weights (and optionally biases).

At a site with frozen weight W and bias b the module adds a dense change::

    W' = W + ΔW,   b' = b + Δb,   so   Δy = ΔW x + Δb

ΔW is stored in the host weight's own layout (``nn.Linear`` (D_out, D_in),
transformers' ``Conv1D`` (D_in, D_out), ``nn.Embedding`` (vocab, D)), so it is
exactly what :meth:`~polymod.modular.Modular.merge_into_host` adds.

This is the survey's parameter composition in its plainest form: a *task
vector* θ_ft − θ_pre restricted to some sites (Ilharco et al. 2023, "Editing
Models with Task Arithmetic", arXiv 2212.04089). polymod produces it when
merging modules whose result is not low-rank (TIES or DARE on LoRA deltas,
mixed kinds such as LoRA + IA³) and when a task vector is taken from two
checkpoints (:func:`polymod.merging.streaming.task_vector`). Both tensors
start at zero, so a freshly built module is the identity; it can be trained
like any parameter (a full fine-tune of its sites). No hyper-parameters, hence
no defaults to justify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import ConfigError, IncompatibleHostError
from polymod.modules.contract import register
from polymod.sites import Site


def weight_layout(site: Site) -> tuple[int, int]:
    """The host weight's shape at ``site`` (see the module docstring)."""
    if site.kind == "linear":
        return site.out_features, site.in_features
    return site.in_features, site.out_features


@register
@dataclass(frozen=True)
class Delta:
    """Configuration of a dense delta module.

    Args:
        bias: also hold a bias change Δb at linear and Conv1D sites (an embedding has no bias);
            attaching it to a layer without a bias is refused. Merged modules built without a
            host hold a zero Δb where no input changed the bias.
        sites: site selection (roles, globs, ``re:`` regexes); see :mod:`polymod.sites`.
    """

    kind: ClassVar[str] = "delta"
    bias: bool = False
    sites: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.bias, bool):
            raise ConfigError(f"Delta bias must be True or False, got {self.bias!r}")

    def check_site(self, site: Site) -> str | None:
        if site.kind == "block":
            return "a delta module changes leaf layers' weights (Linear, Conv1D, Embedding), not whole blocks"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> DeltaPart:
        bias = self.bias and site.kind != "embedding"
        if bias and layer is not None and not isinstance(getattr(layer, "bias", None), torch.Tensor):
            raise IncompatibleHostError(f"Delta(bias=True) changes biases, but {site.name} has no bias; "
                                        "use Delta(bias=False) or select layers with a bias")
        part = DeltaPart(site.kind, weight_layout(site), bias)
        if layer is not None:
            part.to(device=layer.weight.device, dtype=layer.weight.dtype)
        return part


class DeltaPart(nn.Module):
    """ΔW (host layout) and optionally Δb (D_out,) at one site; zero at construction."""

    def __init__(self, site_kind: str, shape: tuple[int, int], bias: bool = False):
        super().__init__()
        self.site_kind = site_kind
        self.weight = nn.Parameter(torch.zeros(shape))
        out = shape[0] if site_kind == "linear" else shape[1]
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = ΔW x (+ Δb), shaped like ``y``."""
        if self.site_kind == "embedding":
            return F.embedding(x, self.weight)  # (B, T, D)
        if self.site_kind == "conv1d":
            out = x @ self.weight  # (B, T, D_out)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)  # (B, T, D_out)

    def add_into(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """y + weight · Δy, with the addition fused into the GEMM for linear and Conv1D sites."""
        if self.site_kind == "embedding":
            return y + weight * self(x, y)
        wt = self.weight.t() if self.site_kind == "linear" else self.weight  # (D_in, D_out)
        y2 = y.reshape(-1, y.shape[-1])  # (B·T, D_out)
        if self.bias is not None:
            y2 = y2 + weight * self.bias
        out = torch.addmm(y2, x.reshape(-1, x.shape[-1]), wt, alpha=weight)  # (B·T, D_out)
        return out.view(y.shape)

    def delta_weight(self, layer: nn.Module | None = None) -> torch.Tensor:
        """ΔW in the host weight's layout."""
        return self.weight

    def delta_bias(self, layer: nn.Module | None = None) -> torch.Tensor | None:
        """Δb, or None when the module holds no bias change."""
        return self.bias

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, bias={self.bias is not None}"


__all__ = ["Delta", "DeltaPart", "weight_layout"]
