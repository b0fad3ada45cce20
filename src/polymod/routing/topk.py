"""Hard learned routing: top-k experts with capacity and load balancing (survey §4.2.3).

At each site of the Mix, per token (or per pooled example)::

    p = softmax(W_g h + ε)            ε ~ N(0, noise²) in training only
    S = top-k(p);  wᵢ = pᵢ / Σ_{j∈S} pⱼ for i ∈ S (normalised), else 0

Defaults and their provenance:

* ``k=1``, load-balancing loss coefficient ``balance_coef=0.01`` and the loss
  E · Σᵢ fᵢ · Pᵢ (fᵢ: share of assignments to expert i, Pᵢ: mean router
  probability of i) — Switch Transformer (Fedus et al., 2022, §2.2);
* ``k=2`` with normalised top-2 weights — GShard (Lepikhin et al., 2021);
  ``normalize`` defaults to k > 1 since with k = 1 the normalised weight is
  always 1 and the gate would learn only from the auxiliary losses (Switch uses
  the raw probability);
* router z-loss mean(logsumexp(logits)²) with ``z_coef=0.001`` — ST-MoE (Zoph et
  al., 2022, §3);
* capacity C = ⌈capacity_factor · N · k / E⌉ assignments per expert per site,
  first choices served first, then in token order (Switch's first-come
  priority); ``capacity_factor=None`` (no limit) suits LoRA experts, which add
  no memory per token. ``overflow="drop"`` skips an overflowing assignment (the
  token keeps the host output and its other experts, Switch); ``"renormalize"``
  also rescales the token's kept weights to sum to one;
* the gate (D → E, no bias) starts at N(0, 0.02²), a small-scale start as in
  Switch's reduced-scale initialisation.

Auxiliary losses accumulate over the sites of a forward in ``aux_losses``
(already multiplied by their coefficients); dropped assignments are counted in
``stats``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import CompositionError, ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs, pool, register_router
from polymod.sites import Site


@register_router
class TopK(Router):
    """Top-k routing (see the module docstring).

    Args:
        k: experts per token (or example), 1 ≤ k ≤ E.
        level: ``token`` or ``example``.
        capacity_factor: None (no capacity) or a factor > 0.
        overflow: ``drop`` or ``renormalize`` (what happens to assignments over capacity).
        balance_coef: coefficient of the load-balancing loss (0 disables it).
        z_coef: coefficient of the router z-loss (0 disables it).
        noise: standard deviation of Gaussian noise added to the logits in training.
        normalize: renormalise the k selected probabilities (default: k > 1).
    """

    name = "topk"
    local = True
    reads_hidden = True

    def __init__(self, k: int = 1, level: Literal["token", "example"] = "token", capacity_factor: float | None = None,
                 overflow: Literal["drop", "renormalize"] = "drop", balance_coef: float = 0.01, z_coef: float = 0.001,
                 noise: float = 0.0, normalize: bool | None = None):
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"TopK k must be a positive integer, got {k!r}")
        if level not in ("token", "example"):
            raise ConfigError(f"TopK level must be 'token' or 'example', got {level!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ConfigError(f"TopK capacity_factor must be positive or None, got {capacity_factor!r}")
        if overflow not in ("drop", "renormalize"):
            raise ConfigError(f"TopK overflow must be 'drop' or 'renormalize', got {overflow!r}")
        if balance_coef < 0 or z_coef < 0 or noise < 0:
            raise ConfigError("TopK balance_coef, z_coef and noise must be non-negative")
        super().__init__(level)
        self.k, self.capacity_factor, self.overflow = k, capacity_factor, overflow
        self.balance_coef, self.z_coef, self.noise = float(balance_coef), float(z_coef), float(noise)
        self._normalize = normalize  # as given, for config(); None means k > 1
        self.normalize = k > 1 if normalize is None else bool(normalize)

    def check_candidates(self, candidates: list[str]) -> None:
        if self.k > len(candidates):
            raise CompositionError(f"TopK(k={self.k}) needs at least {self.k} candidates; the Mix has "
                                   f"{len(candidates)}")

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        gate = nn.Linear(site.in_features, num, bias=False)
        nn.init.normal_(gate.weight, std=0.02)
        if like is not None:
            gate.to(device=like.device, dtype=like.dtype)
        return gate

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise StateError(f"{self} reads the hidden state at each site, but site {site!r} takes token ids; "
                             "keep embedding sites out of a Mix with a learned router")
        h = pool(x, inputs.attention_mask) if self.level == "example" else x  # (B, D) or (…, D)
        logits = self.site_params(site)(h).float()  # (…, E)
        lead, num = logits.shape[:-1], logits.shape[-1]
        logits = logits.reshape(-1, num)  # (N, E)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.k, dim=-1)  # (N, k)
        if self.normalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        aux = torch.is_grad_enabled() and (self.balance_coef > 0 or self.z_coef > 0)
        chosen = F.one_hot(top_i, num).to(probs.dtype) if aux or self.capacity_factor is not None else None  # (N, k, E)
        dropped: Any = 0
        if self.capacity_factor is not None:
            kept, dropped = self._capacity(chosen)  # (N, k)
            top_p = top_p * kept
            if self.overflow == "renormalize":
                top_p = top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-9)
        w = torch.zeros_like(probs).scatter(-1, top_i, top_p)  # (N, E): the kept top-k weights, zero elsewhere
        if aux:
            self._aux(logits, probs, chosen)
        self.stats.update(w, dropped, assigned=w.shape[0] * self.k)
        return w.reshape(*lead, num).to(y.dtype)  # (…, E)

    def _capacity(self, chosen: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Which of the (N, k) assignments fit each expert's capacity; and how many were dropped."""
        n, k, num = chosen.shape
        capacity = math.ceil(self.capacity_factor * n * k / num)
        order = chosen.transpose(0, 1).reshape(k * n, num)  # (k·N, E): all first choices, then second, …
        slot = (torch.cumsum(order, dim=0) - 1) * order  # (k·N, E) position in the expert's buffer
        fits = ((slot < capacity) * order).sum(-1)  # (k·N,)
        kept = fits.reshape(k, n).transpose(0, 1)  # (N, k)
        return kept, (kept.numel() - kept.sum()).detach()

    def _aux(self, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        num = probs.shape[-1]
        if self.balance_coef > 0:
            share = chosen.sum(1).mean(0) / self.k  # (E,) f_i: share of assignments
            mean_p = probs.mean(0)  # (E,) P_i
            self.add_aux("load_balance", self.balance_coef * num * (share * mean_p).sum())
        if self.z_coef > 0:
            self.add_aux("z_loss", self.z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean())

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "level": self.level, "capacity_factor": self.capacity_factor, "overflow": self.overflow,
                "balance_coef": self.balance_coef, "z_coef": self.z_coef, "noise": self.noise,
                "normalize": self._normalize}
