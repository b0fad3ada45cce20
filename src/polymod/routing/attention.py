"""Attention fusion: route by attending from the host state to the modules' outputs.

AdapterFusion (Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning") combines N trained modules per layer with
an attention whose query is the host's hidden state and whose keys and values
are the modules' outputs. At a site with host output y and module outputs
oᵢ = y + Δyᵢ::

    sᵢ = softmax_i( (Q y) · (K oᵢ) / T )         the router's weights (per token)
    y' = Σᵢ sᵢ V oᵢ                               with Mix(..., aggregate="attention")
    y' = y + Σᵢ sᵢ Δyᵢ                            with aggregate="sum" (V unused)

Q, K, V are per-site D × D maps. Q and K start at N(0, 0.02²) (BERT-style
initialisation, as AdapterFusion's reference code), so attention starts close
to uniform; V starts as the identity, so with ``aggregate="attention"`` the
fusion starts as the attention-weighted sum of the module outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polymod.errors import ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs, register_router
from polymod.sites import Site


class _Fusion(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.query.weight, std=0.02)
        nn.init.normal_(self.key.weight, std=0.02)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(width))


@register_router
class AttentionFusion(Router):
    """AdapterFusion's attention over module outputs (see the module docstring).

    Args:
        temperature: T > 0 of the softmax (AdapterFusion anneals it; a constant here).
    """

    name = "attention"
    local = True
    needs_outputs = True
    reads_hidden = True

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ConfigError(f"AttentionFusion temperature must be positive, got {temperature!r}")
        super().__init__("token")
        self.temperature = float(temperature)

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        if not site.out_features:
            raise ConfigError(f"AttentionFusion needs the output width of site {site.name!r}")
        fusion = _Fusion(site.out_features)
        if like is not None:
            fusion.to(device=like.device, dtype=like.dtype)
        return fusion

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        if outputs is None:
            raise StateError("AttentionFusion needs the candidates' outputs (it only works inside a Mix)")
        fusion = self.site_params(site)
        q = fusion.query(y)  # (…, D)
        k = fusion.key(outputs)  # (E, …, D)
        scores = torch.einsum("...d,e...d->...e", q, k) / self.temperature  # (…, E)
        w = torch.softmax(scores.float(), dim=-1).to(y.dtype)  # (…, E)
        self.stats.update(w)
        return w

    def fuse(self, site: str, outputs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """y' = Σᵢ sᵢ V oᵢ for module outputs (E, …, D) and weights (…, E)."""
        v = self.site_params(site).value(outputs)  # (E, …, D)
        return torch.einsum("e...d,...e->...d", v, w)  # (…, D)

    def config(self) -> dict[str, Any]:
        return {"temperature": self.temperature}
