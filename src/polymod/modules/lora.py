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

Options read from PEFT configs as well: ``dora=True`` (DoRA's magnitude
rescaling, :mod:`polymod.modules.dora`; PEFT ``use_dora``), ``bias=True`` (a
trained change Δb of each site's bias; PEFT ``bias="lora_only"``), and per-site
ranks and alphas, ``rank_pattern`` / ``alpha_pattern`` (PEFT's keys and
matching: a key matches a site whose qualified name ends with it, as a regular
expression on whole name components; the first matching key wins).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import ConfigError, IncompatibleHostError
from polymod.modules.contract import Module, register
from polymod.modules.dora import DoRAPart
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
        dora: DoRA (Liu et al., 2024): also train a magnitude per output (linear and Conv1D sites).
        bias: also train a change Δb of each site's bias (sites whose layer has a bias).
        rank_pattern: ``{key: rank}`` overriding ``rank`` at the sites a key matches (PEFT's keys).
        alpha_pattern: ``{key: alpha}`` overriding ``alpha`` likewise.
    """

    kind: ClassVar[str] = "lora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    sites: str = "attn.q|attn.v"
    dora: bool = False
    bias: bool = False
    rank_pattern: Mapping[str, int] | tuple = ()
    alpha_pattern: Mapping[str, float] | tuple = ()

    def __post_init__(self) -> None:
        for name in ("rank_pattern", "alpha_pattern"):  # stored as ((key, value), ...): frozen and JSON-ready
            value = getattr(self, name)
            pairs = tuple(value.items()) if isinstance(value, Mapping) else tuple(tuple(p) for p in value or ())
            if any(len(p) != 2 or not isinstance(p[0], str) for p in pairs):
                raise ConfigError(f"LoRA {name} must map site-name keys to numbers, got {value!r}")
            object.__setattr__(self, name, pairs)
        if any(not isinstance(r, int) or r < 1 for _, r in self.rank_pattern):
            raise ConfigError(f"LoRA rank_pattern ranks must be positive integers, got {dict(self.rank_pattern)}")
        if any(not a > 0 for _, a in self.alpha_pattern):
            raise ConfigError(f"LoRA alpha_pattern alphas must be positive, got {dict(self.alpha_pattern)}")
        for flag in ("dora", "bias", "rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"LoRA {flag} must be True or False, got {getattr(self, flag)!r}")
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
        """s = α/r, or α/√r with rsLoRA (at sites no pattern matches)."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def rank_at(self, site: str) -> int:
        """r at ``site``: the first matching ``rank_pattern`` key's rank, else ``rank``."""
        return int(_pattern_value(self.rank_pattern, site, self.rank))

    def scaling_at(self, site: str) -> float:
        """s at ``site``: α/r (α/√r with rsLoRA) with that site's rank and alpha (α = r when alpha is None)."""
        rank = self.rank_at(site)
        alpha = float(_pattern_value(self.alpha_pattern, site, rank if self.alpha is None else self.alpha))
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def check_site(self, site: Site) -> str | None:
        if site.kind == "block":
            return "LoRA acts on leaf layers (Linear, Conv1D, Embedding), not on whole blocks"
        if self.dora and site.kind not in ("linear", "conv1d"):
            return f"DoRA rescales linear layers (Linear, Conv1D), not a {site.kind}"
        if self.bias and site.kind == "embedding":
            return "bias=True trains a layer's bias; an embedding has none"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> nn.Module:
        if self.bias and layer is not None and not isinstance(getattr(layer, "bias", None), torch.Tensor):
            raise IncompatibleHostError(f"LoRA(bias=True) trains the bias of {site.name}, which has none; select "
                                        "sites with a bias or use bias=False")
        part = LoRAPart(site.kind, site.in_features, site.out_features, self.rank_at(site.name),
                        self.scaling_at(site.name), self.dropout, bias=self.bias)
        if layer is not None:
            part.to(device=layer.weight.device, dtype=layer.weight.dtype)
        part.reset_parameters(self.init)
        if not self.dora:
            return part
        dora = DoRAPart(part, site.out_features)
        if layer is not None:
            dora.to(device=layer.weight.device, dtype=layer.weight.dtype)
            dora.init_magnitude(layer)
        return dora


def _pattern_value(pairs: tuple, site: str, default: float) -> float:
    """The value of the first key matching ``site`` as PEFT matches them: the name ends with the key (a regex)."""
    for key, value in pairs:
        if re.match(rf"(?:.*\.)?(?:{key})$", site):
            return value
    return default


def is_plain(module: Module) -> bool:
    """Whether ``module`` is a LoRA whose parts are A, B only (no DoRA magnitude, no bias change).

    Operations on LoRA factors (concatenation and A/B-wise merges, factor mixing, batched
    gathers) apply to plain LoRA only; other LoRA modules go through their weight delta.
    """
    return module.kind == "lora" and not module.spec.dora and not module.spec.bias


class LoRAPart(nn.Module):
    """LoRA's parameters at one site: A (r, D_in) and B (D_out, r)."""

    def __init__(self, site_kind: str, d_in: int, d_out: int, rank: int, scaling: float, dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        self.site_kind = site_kind
        self.rank = rank
        self.scaling = scaling
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None  # Δb of the host layer's bias
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset_parameters(self, init: str = "kaiming") -> None:
        """A random (Kaiming-uniform or N(0, 1/r)), B zero: the identity at initialisation."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.A, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B.zero_()
            if self.bias is not None:
                self.bias.zero_()

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        if self.site_kind == "embedding":
            return F.embedding(x, self.A.t())  # (B, T, r): row lookup of Aᵀ
        return F.linear(self.dropout(x), self.A)  # (B, T, r)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = s · B A x (+ Δb), shaped like ``y``."""
        out = F.linear(self._down(x), self.B) * self.scaling  # (B, T, D_out)
        return out if self.bias is None else out + self.bias

    def add_into(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """y + weight · s · B A x, with the addition fused into the up-projection GEMM (beta = 1).

        Out of place on purpose: the engine may hand the same ``y`` to several
        candidates (a Mix of compositions), and ``torch.addmm`` follows autocast.
        """
        h = self._down(x)  # (B, T, r)
        out = torch.addmm(
            y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), self.B.t(), alpha=self.scaling * weight
        )  # (B·T, D_out)
        out = out.view(y.shape)
        return out if self.bias is None else out + self.bias * weight

    def add_into_(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """:meth:`add_into` accumulated into ``y`` itself (GEMM with beta = 1), no second output buffer.

        The engine uses it only where it owns ``y`` — the fresh output of a Linear,
        Conv1D or Embedding, whose backward never reads its own output — and
        falls back to :meth:`add_into` when dtypes differ (autocast).
        """
        if (self.B.dtype != y.dtype or not y.is_contiguous() or torch.is_autocast_enabled(y.device.type)
                or self.bias is not None):
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

    def delta_bias(self, layer: nn.Module | None = None) -> torch.Tensor | None:
        """Δb with ``bias=True`` (PEFT's ``bias="lora_only"``), else None."""
        return self.bias

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s·B, A): ΔW = (s·B) A as a map of the site input, (D_out, r) and (r, D_in)."""
        return self.B * self.scaling, self.A

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"
