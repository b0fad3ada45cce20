"""Soft learned routing: a softmax gate on the hidden state (survey §4.2.2).

At each site of the Mix, with input hidden state x::

    w = softmax((W_g h + b_g) / τ)      h = x (token level) or mean_t x_t (example level)

a mixture-of-experts gate without sparsity (Jacobs et al., 1991; the soft
"mixture of adapters/LoRAs" routers of e.g. Wang et al., 2022, AdaMix's
successors). Each site has its own gate (D → E), initialised to zero, so the
mixture starts uniform — the neutral start every soft-merging router uses.
Example-level pooling ignores padding when the host was called with an
``attention_mask``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from polymod.errors import ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs, pool, register_router
from polymod.sites import Site


@register_router
class SoftmaxGate(Router):
    """Softmax over a learned linear gate, per site (see the module docstring).

    Args:
        level: ``token`` (one weight vector per token) or ``example`` (pooled per row).
        temperature: τ > 0; lower is sharper.
    """

    name = "softmax"
    local = True
    reads_hidden = True

    def __init__(self, level: Literal["token", "example"] = "token", temperature: float = 1.0):
        if level not in ("token", "example"):
            raise ConfigError(f"SoftmaxGate level must be 'token' or 'example', got {level!r}")
        if not temperature > 0:
            raise ConfigError(f"SoftmaxGate temperature must be positive, got {temperature!r}")
        super().__init__(level)
        self.temperature = float(temperature)

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        gate = nn.Linear(site.in_features, num)
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
        if like is not None:
            gate.to(device=like.device, dtype=like.dtype)
        return gate

    def logits(self, inputs: RoutingInputs, site: str, x: torch.Tensor) -> torch.Tensor:
        """Gate logits: (B, E) at example level, ``x.shape[:-1] + (E,)`` at token level."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise StateError(f"{self} reads the hidden state at each site, but site {site!r} takes token ids; "
                             "keep embedding sites out of a Mix with a learned router")
        h = pool(x, inputs.attention_mask) if self.level == "example" else x  # (B, D) or (…, D)
        return self.site_params(site)(h)

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        w = torch.softmax(self.logits(inputs, site, x) / self.temperature, dim=-1)  # (…, E)
        self.stats.update(w)
        return w

    def config(self) -> dict[str, Any]:
        return {"level": self.level, "temperature": self.temperature}
