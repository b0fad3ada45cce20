"""PHATGOOSE: routing among modules by gates each contributor trained (Muqeeth et al., ICML 2024, arXiv 2402.05859).

*Post-Hoc Adaptive Tokenwise Gating Over an Ocean of Specialized Experts.*
After training a module, its contributor trains one extra vector per site, a
*gate* gₛ ∈ R^{D_in}, with host and module frozen: the module's contribution
is scaled per token by σ(⟨gₛ, x⟩),

    y' = y + σ(gₛᵀ x) · Δy                                  (:class:`PhatgooseGate`)

starting from gₛ = 0 (σ = ½), for 100 steps at learning rate 1e-3 on the
module's own training data (the paper's defaults;
:func:`polymod.training.recipes.phatgoose.train_gates`). The gates are
published with the module (a derived artifact in the hub).

At inference (:class:`Phatgoose`) the gates of every module at a site form a
router: token x and every gate are *standardised* (zero mean, unit variance
over the D_in features), scored by their dot product scaled by τ = √D_in, and
each token takes the top-2 modules with softmax weights over those two::

    sᵢ = ⟨std(x), std(gᵢ)⟩ / √D_in;   S = top-k(s);   wᵢ = softmax(s_S)ᵢ

A module without a gate at a site does not compete there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from polymod.errors import CompositionError, ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs, register_router
from polymod.sites import Site


def standardise(v: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the last dimension."""
    return (v - v.mean(-1, keepdim=True)) / v.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6)


def _hidden(router: Router, site: str | None, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise StateError(f"{router} reads the hidden state at each site, but site {site!r} takes token ids")
    return x


@register_router
class PhatgooseGate(Router):
    """The gate of one module during gate training: weight σ(gᵀx) per token, g zero-initialised.

    Use with a one-candidate Mix, ``Mix([name], router=PhatgooseGate())``; train only the router.
    """

    name = "phatgoose-gate"
    local = True
    reads_hidden = True

    def __init__(self, level: str = "token"):
        if level != "token":
            raise ConfigError(f"PhatgooseGate gates each token; level must be 'token', got {level!r}")
        super().__init__(level)

    def check_candidates(self, candidates: list[str]) -> None:
        if len(candidates) != 1:
            raise CompositionError(f"{self} gates one module; train each module's gate with a one-candidate Mix, "
                                   f"got {len(candidates)} candidates")

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        gate = nn.Linear(site.in_features, 1, bias=False)
        nn.init.zeros_(gate.weight)  # σ(0) = ½: the paper's start
        if like is not None:
            gate.to(device=like.device, dtype=like.dtype)
        return gate

    def gates(self) -> dict[str, torch.Tensor]:
        """The trained gate vector of every site, ``{site: (D_in,)}`` (detached copies)."""
        return {key.replace("/", "."): g.weight.detach().reshape(-1).clone() for key, g in self.per_site.items()}

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        w = torch.sigmoid(self.site_params(site)(_hidden(self, site, x)))  # (…, 1)
        self.stats.update(w)
        return w


class _SiteGates(nn.Module):
    """Standardised gates of the candidates present at one site (E', D_in) and their candidate indices."""

    def __init__(self, vectors: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.register_buffer("vectors", vectors, persistent=False)
        self.register_buffer("index", index, persistent=False)


@register_router
class Phatgoose(Router):
    """PHATGOOSE routing over modules with trained gates (see the module docstring).

    Args:
        top_k: modules per token (the paper's 2).

    Raises:
        ConfigError: k not a positive integer.
    """

    name = "phatgoose"
    local = True
    reads_hidden = True

    def __init__(self, top_k: int = 2, level: str = "token"):
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ConfigError(f"Phatgoose top_k must be a positive integer, got {top_k!r}")
        if level != "token":
            raise ConfigError(f"Phatgoose routes each token; level must be 'token', got {level!r}")
        super().__init__(level)
        self.top_k = top_k
        self._gates: dict[str, dict[str, torch.Tensor]] = {}

    def provide(self, name: str, gates: Mapping[str, torch.Tensor]) -> None:
        """Set candidate ``name``'s gates, ``{site: (D_in,)}`` (from ``train_gates`` or the hub)."""
        self._gates[name] = {site: g.detach().float().reshape(-1) for site, g in gates.items()}

    def check_candidates(self, candidates: list[str]) -> None:
        missing = [c for c in candidates if c not in self._gates]
        if missing:
            raise CompositionError(f"{self} has no gates for {', '.join(missing)}; train them with "
                                   "polymod.training.recipes.phatgoose.train_gates and give them with "
                                   "router.provide(name, gates)")

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        index = [i for i, c in enumerate(self.candidates) if site.name in self._gates[c]]
        if not index:
            raise CompositionError(f"{self}: no candidate has a gate at {site.name!r}")
        vectors = standardise(torch.stack([self._gates[self.candidates[i]][site.name] for i in index]))  # (E', D)
        if like is not None:
            vectors = vectors.to(device=like.device, dtype=like.dtype)
        return _SiteGates(vectors, torch.tensor(index, dtype=torch.long, device=vectors.device))

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        gates = self.site_params(site)
        h = standardise(_hidden(self, site, x))  # (…, D)
        scores = (h @ gates.vectors.to(h.dtype).t()).float() / math.sqrt(h.shape[-1])  # (…, E')
        top_v, top_i = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)  # (…, k)
        w = scores.new_zeros(*scores.shape[:-1], self.num)  # (…, E)
        w.scatter_(-1, gates.index[top_i], torch.softmax(top_v, dim=-1))
        self.stats.update(w)
        return w.to(y.dtype)

    def config(self) -> dict[str, Any]:
        return {"top_k": self.top_k}
