"""Polytropon and multi-head routing: a learned task × skill allocation.

Polytropon (Ponti et al., 2023, "Combining Parameter-Efficient Modules for
Task-Level Generalisation") keeps an inventory of E skill modules and learns,
per task t, a soft binary allocation over them::

    ẑ_t = RelaxedBernoulli(τ, logits Z_t)   in training   (Gumbel-sigmoid)
    ẑ_t = sigmoid(Z_t)                      at evaluation (deterministic)
    w_t = ẑ_t / Σᵢ ẑ_t,ᵢ                    normalised over the skills

Multi-head routing, MHR (Caccia et al., 2023), splits each skill's parameters
into H blocks and learns one allocation per block: Z ∈ R^{T×H×E}. The weights
are then (R, H, E); they combine LoRA skills through ``Mix(...,
aggregate="factors")`` (A and B mixed separately, block by block).

Defaults follow the reference implementations (microsoft/mttl's Polytropon
selector, as also used by PEFT's ``poly`` tuner): one allocation matrix per
site, logits initialised uniformly in [−10⁻³, 10⁻³], τ = 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli

from polymod.errors import ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs, register_router
from polymod.sites import Site


class _Allocation(nn.Module):
    def __init__(self, tasks: int, heads: int, num: int, like: torch.Tensor | None):
        super().__init__()
        self.logits = nn.Parameter(torch.empty(tasks, heads, num).uniform_(-1e-3, 1e-3))  # (T, H, E)
        if like is not None:
            self.to(device=like.device)


@register_router
class Polytropon(Router):
    """Task × skill allocation with Gumbel-sigmoid relaxation (see the module docstring).

    Args:
        n_tasks: T, the number of task ids.
        heads: H ≥ 1 (MHR when > 1).
        per_site: one allocation matrix per site (default) or one shared by all sites.
        temperature: τ of the relaxed Bernoulli in training.
    """

    name = "polytropon"

    def __init__(self, n_tasks: int, heads: int = 1, per_site: bool = True, temperature: float = 1.0):
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ConfigError(f"Polytropon n_tasks must be a positive integer, got {n_tasks!r}")
        if not isinstance(heads, int) or heads < 1:
            raise ConfigError(f"Polytropon heads must be a positive integer, got {heads!r}")
        if not temperature > 0:
            raise ConfigError(f"Polytropon temperature must be positive, got {temperature!r}")
        super().__init__("task")
        self.n_tasks, self.heads, self.temperature = n_tasks, heads, float(temperature)
        self.local = bool(per_site)  # per-site allocation matrices are computed at each site
        self.shared: _Allocation | None = None

    def bind(self, candidates: Any, sites: Any, like: torch.Tensor | None) -> None:
        super().bind(candidates, sites, like)
        if not self.local and self.shared is None:
            self.shared = _Allocation(self.n_tasks, self.heads, len(self.candidates), like)

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        return _Allocation(self.n_tasks, self.heads, num, like)

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        if inputs.task is None:
            raise StateError("Polytropon routes by task: run the host inside `with model.route(task=ids):`")
        if int(inputs.task.max()) >= self.n_tasks or int(inputs.task.min()) < 0:
            raise StateError(f"task ids {inputs.task.tolist()} outside Polytropon's {self.n_tasks} tasks")
        table = self.site_params(site) if self.local else self.shared
        logits = table.logits[inputs.task]  # (R, H, E)
        if self.training:
            z = RelaxedBernoulli(torch.tensor(self.temperature, device=logits.device), logits=logits).rsample()
        else:
            z = torch.sigmoid(logits)
        w = z / (z.sum(-1, keepdim=True) + 1e-12)  # (R, H, E)
        self.stats.update(w)
        w = w.to(y.dtype)
        return w[:, 0] if self.heads == 1 else w  # (R, E) or (R, H, E)

    def cache_key(self, inputs: RoutingInputs, y: torch.Tensor) -> Any:
        return None

    def config(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "heads": self.heads, "per_site": self.local, "temperature": self.temperature}
