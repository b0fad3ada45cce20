"""Parameter aggregation at forward time: mix the modules' parameters, then apply once.

For delta-bearing (parameter-composition) modules the survey's parameter
aggregation (§5.1) combines parameters rather than outputs. With weights wᵢ from
a task- or example-level router, at a site with input x::

    delta:    ΔW = Σᵢ wᵢ ΔWᵢ,  Δb = Σᵢ wᵢ Δbᵢ          y' = y + x ΔWᵀ + Δb
    factors:  A = Σᵢ wᵢ Aᵢ,   B = Σᵢ wᵢ sᵢ Bᵢ          y' = y + B A x     (LoRA only)

``delta`` works for every kind with ``delta_weight`` (LoRA, IA³, sparse) and
equals the representation sum for kinds linear in x; ``factors`` is
Polytropon's mixing of LoRA skills (Ponti et al., 2023), which is *not* the
same function as Σᵢ wᵢ sᵢBᵢAᵢ (the product of mixed factors has cross terms).
With multi-head routing (MHR, Caccia et al., 2023) the weights are (R, H, E):
A is split into H blocks along its input dimension and B along its output
dimension, block h mixed with the weights of head h.

Weights per task give one matrix for the batch (R = 1); weights per example
give one per row (R = B, batched einsum / bmm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from polymod.aggregation.base import Env, SiteOp, head_routing_refusal, leaf_names, like_tensor, site_objects
from polymod.compose import Mix
from polymod.errors import CompositionError
from polymod.modules.contract import BiasDelta, Module
from polymod.modules.lora import is_plain
from polymod.routing.groups import RowGroups


class Parameter:
    """``delta`` or ``factors`` (see the module docstring)."""

    whole_call: ClassVar[bool] = False

    def __init__(self, name: str):
        self.name = name

    def check(self, mix: Mix, modules: Sequence[Module], root: bool) -> str | None:
        """Refuse composed candidates, token-level routers, kinds without ΔW, and LoRAs that differ in shape."""
        names = leaf_names(mix)
        if names is None:
            return (f"aggregate={self.name!r} sums module parameters, so its candidates must be module names "
                    "(not compositions)")
        router = mix.router
        if router.level == "token" or router.needs_outputs:
            return (f"aggregate={self.name!r} builds one weight matrix per task or example; token-level routing "
                    f"({router}) would need one per token — use aggregate='sum' instead")
        refusal = head_routing_refusal(mix, allowed=self.name == "factors")
        if refusal:
            return refusal
        if self.name == "delta":
            bad = [n for n, m in zip(names, modules) if not m.mergeable]
            if bad:
                return (f"aggregate='delta' needs modules with a weight delta (LoRA, IA³, sparse); "
                        f"{', '.join(bad)} has none — use aggregate='sum'")
            return None
        kinds = {m.kind for m in modules}
        if kinds != {"lora"}:
            return f"aggregate='factors' mixes LoRA's A and B matrices, got kinds {sorted(kinds)}"
        if not all(is_plain(m) for m in modules):
            return ("aggregate='factors' mixes LoRA's A and B matrices, which misses DoRA's magnitude and trained "
                    "biases; use aggregate='delta'")
        ranks = {p.rank for m in modules for p in m.parts.values()}
        if len(ranks) > 1:
            return f"aggregate='factors' needs LoRA modules of one rank, got ranks {sorted(ranks)}"
        if [m.sites.keys() for m in modules].count(modules[0].sites.keys()) != len(modules):
            return "aggregate='factors' needs LoRA modules acting at the same sites"
        return None

    def compile(self, mix: Mix, env: Env) -> dict[str, SiteOp]:
        """One :class:`ParameterMixOp` per site of the candidates.

        Raises:
            CompositionError: multi-head routing whose head count does not divide a site's widths.
        """
        names = list(mix.children)
        modules = [env.library[n] for n in names]
        sites = site_objects(names, env)
        env.routing.register(mix.router, names, list(sites.values()), like_tensor(list(sites), env))
        heads = mix.router.heads
        ops: dict[str, SiteOp] = {}
        for site, info in sites.items():
            if heads > 1 and any(d % heads for d in (info.in_features or 0, info.out_features or 0)):
                raise CompositionError(f"{mix}: multi-head routing with {heads} heads splits site {site!r} "
                                       f"({info.in_features}→{info.out_features}) into equal blocks; choose heads "
                                       "dividing both widths")
            present = tuple(i for i, m in enumerate(modules) if site in m.sites)
            parts = [modules[i].part(site) for i in present]
            ops[site] = ParameterMixOp(site, info.kind, present, len(names), parts, env.layers.get(site), mix,
                                       self.name, env)
        return ops


class ParameterMixOp:
    """Σᵢ wᵢ ΔWᵢ (or LoRA factors) applied at one site."""

    def __init__(self, site: str, kind: str, present: tuple[int, ...], num: int, parts: list[nn.Module],
                 layer: nn.Module | None, mix: Mix, aggregate: str, env: Env):
        self.site, self.kind, self.present, self.parts, self.layer = site, kind, present, parts, layer
        self.full = present == tuple(range(num))
        self.index = torch.tensor(present, dtype=torch.long)
        self.router, self.aggregate = mix.router, aggregate
        self.routing, self.cache = env.routing, env.cache
        self.key = (site, tuple(id(p) for p in parts), aggregate)
        self.bias_parts = [p if isinstance(p, BiasDelta) else None for p in parts]  # kinds whose ΔW has a Δb

    def _weights(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.routing.routing(self.router, self.site, x, y)
        if isinstance(w, RowGroups):
            w.check_rows(y.shape[0], f"site {self.site!r}")
            w = w.weights(y.dtype)  # (B, E)
        return w if self.full else w.index_select(-1, self.index.to(w.device))  # (R, [H,] E')

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self._weights(x, y)
        if self.aggregate == "factors":
            return self._factors(x, y, w)
        host = [self.layer.weight] if isinstance(getattr(self.layer, "weight", None), torch.Tensor) else []
        tensors = lambda: [t for p in self.parts for t in p.parameters()] + host  # noqa: E731  (IA³'s ΔW reads W)
        deltas = self.cache.get(self.key, tensors, lambda: torch.stack(
            [p.delta_weight(self.layer) for p in self.parts]), y)  # (E, *W.shape)
        dw = torch.einsum("ne,e...->n...", w.to(deltas.dtype), deltas)  # (R, *W.shape)
        out = y + _apply_weight(self.kind, x, dw, y.shape)
        biases = [p.delta_bias(self.layer) if p is not None else None for p in self.bias_parts]
        if any(b is not None for b in biases):
            stacked = torch.stack([b if b is not None else y.new_zeros(y.shape[-1]) for b in biases])  # (E, D_out)
            out = out + _rows_view(w.to(stacked.dtype) @ stacked, y)  # (R, D_out) → broadcast
        return out

    def _factors(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        a = torch.stack([p.A for p in self.parts])  # (E, r, D_in)
        b = torch.stack([p.B * p.scaling for p in self.parts])  # (E, D_out, r)
        if w.dim() == 3:  # MHR: (R, H, E), block h of A's input and B's output mixed by head h
            heads = w.shape[1]
            e, r, d_in = a.shape
            a = torch.einsum("nhe,eihd->nihd", w, a.view(e, r, heads, d_in // heads))  # (R, r, H, D_in/H)
            a = a.reshape(-1, r, d_in)  # (R, r, D_in)
            d_out = b.shape[1]
            b = torch.einsum("nhe,ehor->nhor", w, b.view(e, heads, d_out // heads, r))  # (R, H, D_out/H, r)
            b = b.reshape(-1, d_out, r)  # (R, D_out, r)
        else:
            a = torch.einsum("ne,eid->nid", w, a)  # (R, r, D_in)
            b = torch.einsum("ne,eor->nor", w, b)  # (R, D_out, r)
        if self.kind == "embedding":
            h = _embed_rows(x, a.transpose(1, 2))  # (B, T, r)
        else:
            h = _rows_matmul(x, a.transpose(1, 2))  # (…, r)
        return y + _rows_matmul(h, b.transpose(1, 2))  # (…, D_out)


def _rows_view(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R, D) → (R, 1, …, D) broadcastable against ``y``."""
    return v.view(v.shape[0], *([1] * (y.dim() - 2)), v.shape[-1]) if y.dim() > 2 else v


def _rows_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x @ m with m (R, D_in, D_out): one matrix for the batch (R = 1) or one per row."""
    if m.shape[0] == 1:
        return x @ m[0]  # (…, D_out)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, D_in)
    return torch.bmm(flat, m).view(*x.shape[:-1], m.shape[-1])  # (B, …, D_out)


def _embed_rows(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Row lookup in one table (R = 1) or one table per row: table (R, V, D)."""
    if table.shape[0] == 1:
        return F.embedding(ids, table[0])  # (B, T, D)
    vocab = table.shape[1]
    offset = torch.arange(ids.shape[0], device=ids.device).view(-1, *([1] * (ids.dim() - 1))) * vocab
    return F.embedding(ids + offset, table.reshape(-1, table.shape[-1]))  # (B, T, D)


def _apply_weight(kind: str, x: torch.Tensor, dw: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """x ΔWᵀ in the host layout of ``kind`` for ΔW (R, …)."""
    if kind == "linear":
        return _rows_matmul(x, dw.transpose(1, 2))  # ΔW (R, D_out, D_in)
    if kind == "conv1d":
        return _rows_matmul(x, dw)  # ΔW (R, D_in, D_out)
    if kind == "embedding":
        return _embed_rows(x, dw)  # ΔW (R, V, D)
    raise CompositionError(f"parameter aggregation acts on linear, Conv1D and embedding sites, not {kind!r}")
