"""LoRA: low-rank adaptation (Hu et al., 2022, arXiv 2106.09685).

At a linear site with frozen weight W the module adds a rank-r update::

    y = W x + s · B A x          A ∈ R^{r×D_in}, B ∈ R^{D_out×r}
    s = α / r                    (rsLoRA, Kalajdzievski 2023: s = α / √r)

so ΔW = s·B A. B starts at zero, making the module the identity at
initialisation; A starts Kaiming-uniform (the reference implementation's
``nn.init.kaiming_uniform_(a=√5)``) or, with ``init="gaussian"``, N(0, 1/r).
Defaults: r = 8 and α = r (s = 1) follow the common practice of fixing α to the
first rank tried (Hu et al., §4.1); dropout 0.

Sites: ``nn.Linear``, transformers' ``Conv1D`` (which stores W transposed) and
``nn.Embedding`` (where A x is a row lookup of Aᵀ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import ConfigError
from polymod.modules.contract import register
from polymod.sites import Site


@register
@dataclass(frozen=True)
class LoRA:
    """Configuration of a LoRA module.

    Args:
        rank: r, the rank of the update (≥ 1).
        alpha: α; the update is scaled by α/r (or α/√r with ``rslora``). None means α = r.
        dropout: dropout probability on the site input before A (training only).
        rslora: use rank-stabilised scaling α/√r.
        init: ``kaiming`` (uniform, as the reference code) or ``gaussian`` for A; B is zero.
        sites: site selection (roles, globs, ``re:`` regexes); see :mod:`polymod.sites`.
    """

    kind: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    sites: str = "attn.q|attn.v"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive or None, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")

    @property
    def scaling(self) -> float:
        """s = α/r, or α/√r with rsLoRA."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check_site(self, site: Site) -> str | None:
        if site.kind == "block":
            return "LoRA acts on leaf layers (Linear, Conv1D, Embedding), not on whole blocks"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> LoRAPart:
        part = LoRAPart(site.kind, site.in_features, site.out_features, self.rank, self.scaling, self.dropout)
        if layer is not None:
            part.to(device=layer.weight.device, dtype=layer.weight.dtype)
        part.reset_parameters(self.init)
        return part


class LoRAPart(nn.Module):
    """LoRA's parameters at one site: A (r, D_in) and B (D_out, r)."""

    def __init__(self, site_kind: str, d_in: int, d_out: int, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.site_kind = site_kind
        self.rank = rank
        self.scaling = scaling
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset_parameters(self, init: str = "kaiming") -> None:
        """A random (Kaiming-uniform or N(0, 1/r)), B zero: the identity at initialisation."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.A, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        if self.site_kind == "embedding":
            return F.embedding(x, self.A.t())  # (B, T, r): row lookup of Aᵀ
        return F.linear(self.dropout(x), self.A)  # (B, T, r)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = s · B A x, shaped like ``y``."""
        return F.linear(self._down(x), self.B) * self.scaling  # (B, T, D_out)

    def add_into(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """y + weight · s · B A x, with the addition fused into the up-projection GEMM (beta = 1).

        Out of place on purpose: the engine may hand the same ``y`` to several
        candidates (a Mix of compositions), and ``torch.addmm`` follows autocast.
        """
        h = self._down(x)  # (B, T, r)
        out = torch.addmm(
            y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), self.B.t(), alpha=self.scaling * weight
        )  # (B·T, D_out)
        return out.view(y.shape)

    def add_into_(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """:meth:`add_into` accumulated into ``y`` itself (GEMM with beta = 1), no second output buffer.

        The engine uses it only where it owns ``y`` — the fresh output of a Linear,
        Conv1D or Embedding, whose backward never reads its own output — and
        falls back to :meth:`add_into` when dtypes differ (autocast).
        """
        if self.B.dtype != y.dtype or not y.is_contiguous() or torch.is_autocast_enabled(y.device.type):
            return self.add_into(x, y, weight)
        h = self._down(x)  # (B, T, r)
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, self.rank), self.B.t(), alpha=self.scaling * weight)
        return y

    def delta_weight(self, layer: nn.Module | None = None) -> torch.Tensor:
        """ΔW = s·B A in the host layer's weight layout.

        ``nn.Linear`` stores W as (D_out, D_in); ``Conv1D`` as (D_in, D_out);
        ``nn.Embedding`` as (vocab, D), i.e. also transposed.
        """
        delta = (self.B @ self.A) * self.scaling  # (D_out, D_in)
        return delta if self.site_kind == "linear" else delta.t()

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s·B, A): ΔW = (s·B) A as a map of the site input, (D_out, r) and (r, D_in)."""
        return self.B * self.scaling, self.A

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"
