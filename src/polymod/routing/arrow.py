"""Arrow: zero-shot token routing over a library of modules (Ostapenko et al., ICML 2024, arXiv 2405.11157).

Arrow routes among modules that were trained separately, with no routing data.
At each site every candidate i gets a *prototype* vᵢ: the top right singular
vector of its weight change ΔWᵢ (the input direction ΔWᵢ amplifies most). Per
token with hidden state x at that site::

    sᵢ = |⟨x, vᵢ⟩|                          (sign-invariant: ±vᵢ are both singular vectors)
    S  = top-k of s
    wᵢ = softmax(s_S / τ)ᵢ for i ∈ S, else 0
    y' = y + Σᵢ wᵢ Δyᵢ                       (the Mix's ``sum`` aggregation)

Prototypes come from the weights alone. For a low-rank part
(:class:`~polymod.modules.contract.LowRankDelta`, ΔW = U V) the vector is
found without forming ΔW: with Vᵀ = Q R (thin QR, Q (D_in, r)), ΔW = (U Rᵀ) Qᵀ,
so the SVD of the small (D_out, r) matrix U Rᵀ gives v = Q v'. Any other
part with a weight change (IA³, sparse fine-tuning, Delta: a linear effect at
the site) uses the SVD of its dense ΔW. Kinds with no ΔW (adapters, prompts,
prefixes, hypernetworks) are refused: their effect is not a linear map of x,
so they have no singular vectors.

Beyond PEFT's ``ArrowConfig`` (one rank, one target set, LoRA only): modules
of different ranks and kinds mix freely, and a module absent at a site does
not compete there (top-k runs over the candidates present; with fewer than k
present, all of them are kept).

Defaults ``top_k=3`` and ``temperature=1.0`` are PEFT's (``ArrowConfig``),
which follow the paper's top-k routing. PEFT finds vᵢ by 15 steps of power
iteration from a random start; polymod solves the small eigenproblem exactly,
so the two agree whenever power iteration has converged (a clear gap between
the top two singular values).

Prototypes are derived when the composition is put to use (``model.use``);
after changing a module's weights, call ``use`` again. Precomputed prototypes
(a hub's derived artifacts, :func:`arrow_prototypes`) are given with
:meth:`Arrow.provide`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polymod.errors import CompositionError, ConfigError, StateError
from polymod.modules.contract import LowRankDelta, Module, WeightDelta
from polymod.routing.base import Router, RoutingInputs, register_router
from polymod.sites import Site

LINEAR_SITES = ("linear", "conv1d")


def prototype(part: nn.Module, layer: nn.Module | None, site_kind: str) -> torch.Tensor:
    """The top right singular vector of a part's ΔW, in float32 (D_in,).

    Args:
        part: a part with a weight change (low-rank factors or a dense ΔW).
        layer: the host layer at the site (IA³'s ΔW reads the host weight).
        site_kind: ``linear`` or ``conv1d`` (Conv1D stores W as (D_in, D_out)).

    Raises:
        CompositionError: the part has no weight change, or the site is not a linear layer.
    """
    if site_kind not in LINEAR_SITES:
        raise CompositionError(f"Arrow routes at linear sites (nn.Linear, Conv1D), not at a {site_kind!r} site")
    with torch.no_grad():
        if isinstance(part, LowRankDelta):
            u, v = (t.detach().float() for t in part.delta_factors())  # (D_out, r), (r, D_in)
            q, r = torch.linalg.qr(v.t())  # (D_in, r), (r, r): Vᵀ = Q R
            _, _, vh = torch.linalg.svd(u @ r.t(), full_matrices=False)  # U Rᵀ (D_out, r) = U' S V'ᵀ
            return q @ vh[0]  # (D_in,)
        if isinstance(part, WeightDelta):
            dw = part.delta_weight(layer).detach().float()
            dw = dw.t() if site_kind == "conv1d" else dw  # (D_out, D_in)
            return torch.linalg.svd(dw, full_matrices=False)[2][0]  # (D_in,)
    raise CompositionError(f"{type(part).__name__} has no weight change ΔW, so it has no Arrow prototype")


def refusal(name: str, module: Module) -> str | None:
    """Why ``module`` cannot take part in Arrow routing (or None)."""
    for site, part in module.items():
        if not isinstance(part, (LowRankDelta, WeightDelta)):
            return (f"Arrow routes by the top singular vector of each module's weight change ΔW; {name!r} is a "
                    f"{module.kind} module, whose effect at {site!r} is not a linear map of the site input, so it "
                    "has none — route it with a learned router (TopK, SoftmaxGate) or by retrieval")
        kind = module.sites[site].kind
        if kind not in LINEAR_SITES:
            return (f"Arrow reads the hidden state entering each site, but {name!r} acts at {site!r}, a {kind} "
                    "site; Arrow needs linear sites (nn.Linear, Conv1D)")
    return None


def arrow_prototypes(module: Module, layers: Mapping[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Every site's prototype of ``module``: {site: top right singular vector of ΔW (D_in,)}, float32.

    This is the derived artifact a hub stores beside the module.

    Args:
        module: a module whose parts have a weight change.
        layers: host layers by site name (needed by IA³, whose ΔW reads W).

    Raises:
        CompositionError: the module's kind or sites do not allow Arrow routing.
    """
    why = refusal(module.card.name or module.kind, module)
    if why:
        raise CompositionError(why)
    layers = layers or {}
    return {site: prototype(part, layers.get(site), module.sites[site].kind) for site, part in module.items()}


class _SitePrototypes(nn.Module):
    """The prototypes of the candidates present at one site: (E', D_in) and their candidate indices (E',)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("vectors", torch.empty(0), persistent=False)
        self.register_buffer("index", torch.empty(0, dtype=torch.long), persistent=False)

    def set(self, vectors: torch.Tensor, index: torch.Tensor) -> None:
        self.vectors, self.index = vectors, index


@register_router
class Arrow(Router):
    """Arrow routing (see the module docstring).

    Args:
        top_k: modules per token, k ≥ 1 (PEFT's default 3).
        temperature: τ > 0 of the softmax over the top-k scores (default 1.0).

    Raises:
        ConfigError: k not a positive integer, τ not positive.
    """

    name = "arrow"
    local = True
    reads_hidden = True

    def __init__(self, top_k: int = 3, temperature: float = 1.0, level: str = "token"):
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ConfigError(f"Arrow top_k must be a positive integer, got {top_k!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"Arrow temperature must be positive, got {temperature!r}")
        if level != "token":
            raise ConfigError(f"Arrow routes each token by its hidden state; level must be 'token', got {level!r}")
        super().__init__(level)
        self.top_k, self.temperature = top_k, float(temperature)
        self._provided: dict[str, dict[str, torch.Tensor]] = {}

    def provide(self, name: str, prototypes: Mapping[str, torch.Tensor]) -> None:
        """Use precomputed prototypes ({site: (D_in,)}) for candidate ``name`` instead of deriving them."""
        self._provided[name] = dict(prototypes)

    # -- the ReadsModules protocol --------------------------------------------------------

    def check_modules(self, names: Sequence[str], modules: Sequence[Module]) -> str | None:
        """Refuse kinds without a weight change and non-linear sites."""
        for name, module in zip(names, modules):
            why = refusal(name, module)
            if why:
                return why
        return None

    def bind_modules(self, site: Site, names: Sequence[str], parts: Sequence[nn.Module | None],
                     layer: nn.Module | None) -> None:
        """Derive (or take the provided) prototypes of the candidates acting at ``site``."""
        index = [i for i, p in enumerate(parts) if p is not None]
        vectors = []
        for i in index:
            given = self._provided.get(names[i], {}).get(site.name)
            vectors.append(given.float() if given is not None else prototype(parts[i], layer, site.kind))
        like = next(iter(layer.parameters()), None) if layer is not None else None
        stacked = torch.stack(vectors)  # (E', D_in)
        if like is not None:
            stacked = stacked.to(device=like.device, dtype=like.dtype)
        self.site_params(site.name).set(stacked, torch.tensor(index, dtype=torch.long, device=stacked.device))

    # -- routing ------------------------------------------------------------------------

    def check_candidates(self, candidates: list[str]) -> None:
        if self.top_k > len(candidates):
            raise CompositionError(f"Arrow(top_k={self.top_k}) needs at least {self.top_k} candidates; the Mix has "
                                   f"{len(candidates)}")

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        return _SitePrototypes()

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        protos = self.site_params(site)
        if protos.vectors.numel() == 0:
            raise StateError(f"{self} has no prototypes at {site!r}; put the composition to use with model.use(...)")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise StateError(f"{self} reads the hidden state at each site, but site {site!r} takes token ids")
        p = protos.vectors if protos.vectors.dtype == x.dtype else protos.vectors.to(x.dtype)
        scores = (x @ p.t()).abs()  # (…, E'): |⟨x, vᵢ⟩|
        top_v, top_i = scores.topk(min(self.top_k, p.shape[0]), dim=-1)  # (…, k)
        coeff = torch.softmax(top_v.float() / self.temperature, dim=-1)  # (…, k)
        w = scores.new_zeros(*scores.shape[:-1], self.num, dtype=torch.float32)  # (…, E)
        w.scatter_(-1, protos.index[top_i], coeff)  # candidate index of each kept prototype
        self.stats.update(w)
        return w.to(y.dtype)

    def config(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature}
