"""IA³: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022, arXiv 2205.05638).

IA³ learns one vector per site that rescales an activation element-wise: the
attention keys and values, and the feed-forward network's intermediate
activation::

    k' = l_k ⊙ k        v' = l_v ⊙ v        FFN(x) = W_out (l_ff ⊙ γ(W_in x))

Every vector starts at 1, so the module is the identity at initialisation.
A site is scaled on one of its two sides:

* **output** (keys, values): y' = l ⊙ (W x + b), so Δy = (l − 1) ⊙ y,
  ΔW = diag(l − 1) W and Δb = (l − 1) ⊙ b;
* **input** (the ``feedforward`` sites): the FFN's intermediate activation is
  the input of its output projection (``ffn.out``: Llama's ``down_proj``,
  GPT-2's ``mlp.c_proj``, T5's ``wo``, BERT's ``layer.N.output.dense``), so
  y' = W (l ⊙ x) + b, Δy = W ((l − 1) ⊙ x), ΔW = W diag(l − 1) and the bias is
  unchanged.

This is the same split as PEFT's ``feedforward_modules``. ``nn.Linear`` stores
W as (D_out, D_in) and transformers' ``Conv1D`` as (D_in, D_out), so "rows"
and "columns" swap between them; :meth:`IA3Part.delta_weight` returns ΔW in the
host's own layout, and merging is exact (the original weights are restored on
unmerge).

Defaults: keys, values and the FFN intermediate activation (the FFN output
projection's input; on gated FFNs the up projection's output, see below), as
in Liu et al. (T-Few) and PEFT's per-architecture table. Notes: GPT-2's fused
``c_attn`` makes the key/value vector also scale the queries (as in PEFT);
PEFT's BERT entry ``output.dense`` also catches the attention output
projection, polymod's ``ffn.out`` role does not.

Gated FFNs (Llama family; T5 gated-GELU) compute down(act(gate x) ⊙ up x):
their intermediate activation is act(gate x) ⊙ up x, so scaling the output of
``up_proj`` (``wi_1``) is the same function, with the same vector, as scaling
the input of ``down_proj`` (``wo``). With ``gated_ffn="up"`` (the default)
IA³ takes that placement there; ``gated_ffn="down"`` keeps PEFT's.

Cost: an output site costs one element-wise product, as in PEFT. An input site
costs one extra matrix product per call, because polymod's engine sees a
site's input and output after the host layer has run (a forward hook), where
PEFT rescales the input before it — hence the up placement on gated FFNs.
Merging removes every overhead. Stacking two IA³ modules on one input site
adds their effects (W((l_a + l_b − 1) ⊙ x)); merging both multiplies them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from polymod.errors import ConfigError, StateError
from polymod.modules.contract import register
from polymod.sites import Site, SiteSelector, name_matches, named_layers, select

# Gated FFN layouts: output projection -> (gate, up) siblings; FFN(x) = out(act(gate x) ⊙ up x).
_GATED = {"down_proj": ("gate_proj", "up_proj"), "wo": ("wi_0", "wi_1")}


@register
@dataclass(frozen=True)
class IA3:
    """Configuration of an IA³ module.

    Args:
        sites: site selection (roles, globs, ``re:`` regexes); see :mod:`polymod.sites`.
        feedforward: the selected sites whose *input* is scaled (the FFN intermediate
            activation); every other site has its output scaled. Roles, globs or ``re:``
            items decidable from a site name (so that loading re-derives it); ``""`` for none.
        gated_ffn: on a gated FFN, scale the intermediate activation at the ``up`` projection's
            output (the same function, no extra matrix product) or at the ``down`` (output)
            projection's input, as PEFT does.
    """

    kind: ClassVar[str] = "ia3"
    sites: str = "attn.k|attn.v|ffn.out"
    feedforward: str = "ffn.out"
    gated_ffn: Literal["up", "down"] = "up"

    def __post_init__(self) -> None:
        if not isinstance(self.feedforward, str):
            raise ConfigError(f"IA3 feedforward must be a selection string, got {type(self.feedforward).__name__}")
        if self.feedforward.strip():
            name_matches("probe", self.feedforward)  # raises ConfigError on a malformed/undecidable selection
        if self.gated_ffn not in ("up", "down"):
            raise ConfigError(f"IA3 gated_ffn must be 'up' or 'down', got {self.gated_ffn!r}")

    def sites_for(self, host: nn.Module) -> str | list[str]:
        """The sites on ``host``: ``sites``, each gated FFN's feedforward site moved to its up projection.

        Only with ``gated_ffn="up"``, and only where the output projection has gate and up
        siblings (``gate_proj``/``up_proj``, T5's ``wi_0``/``wi_1``) that are not selected already.
        """
        if self.gated_ffn == "down" or not self.feedforward.strip():
            return self.sites
        chosen = [s.name for s in select(host, self.sites)]
        layers = named_layers(host)
        moved = []
        for name in chosen:
            up = _gated_up(name, layers) if self.scales_input(name) else None
            keep = up is None or up in chosen or self.scales_input(up)
            moved.append(name if keep else up)
        return moved if moved != chosen else self.sites

    def scales_input(self, site: str) -> bool:
        """Whether the module scales ``site``'s input (a feedforward site) rather than its output."""
        return bool(self.feedforward.strip()) and name_matches(site, SiteSelector.parse(self.feedforward))

    def check_site(self, site: Site) -> str | None:
        if site.kind not in ("linear", "conv1d"):
            return f"IA3 scales linear layers (Linear, Conv1D), not a {site.kind}"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> IA3Part:
        scales_input = self.scales_input(site.name)
        part = IA3Part(site.kind, site.in_features if scales_input else site.out_features, scales_input)
        if layer is not None:
            part.to(device=layer.weight.device, dtype=layer.weight.dtype)
            part.attach_layer(layer)
        return part


def _gated_up(name: str, layers: dict[str, nn.Module]) -> str | None:
    """The up projection feeding ``name`` when ``name`` is a gated FFN's output projection, else None."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in _GATED:
        return None
    gate, up = (f"{parent}.{n}" if parent else n for n in _GATED[leaf])
    return up if all(isinstance(layers.get(n), nn.Linear) for n in (gate, up)) else None


class IA3Part(nn.Module):
    """IA³'s vector l at one site: of size D_out (output scaling) or D_in (input scaling)."""

    def __init__(self, site_kind: str, size: int, scales_input: bool):
        super().__init__()
        self.site_kind = site_kind
        self.scales_input = scales_input
        self.scale = nn.Parameter(torch.ones(size))
        # A weak reference keeps the host layer out of this part's state dict, parameters and deep copies.
        self._layer: weakref.ref | None = None

    def attach_layer(self, layer: nn.Module) -> None:
        """Remember the host layer (input scaling needs its weight to compute Δy)."""
        self._layer = weakref.ref(layer)

    def _host_layer(self, layer: nn.Module | None) -> nn.Module | None:
        return layer if layer is not None else (self._layer() if self._layer is not None else None)

    def _weight(self, layer: nn.Module | None) -> torch.Tensor:
        layer = self._host_layer(layer)
        if layer is None:
            raise StateError("this IA3 part is not attached to a host layer; add its module to a Modular first")
        return layer.weight

    def _scaled_input_product(self, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """(s ⊙ x) W (+ y), for the host layer's weight layout."""
        w = self._weight(None)
        xs = (x * s).reshape(-1, x.shape[-1])  # (B·T, D_in)
        wt = (w.t() if self.site_kind == "linear" else w).to(xs.dtype)  # (D_in, D_out), in the module's dtype
        out = torch.mm(xs, wt) if y is None else torch.addmm(y.reshape(-1, y.shape[-1]), xs, wt)
        return out.view(*x.shape[:-1], out.shape[-1])  # (B, T, D_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = (l − 1) ⊙ y at an output site, W((l − 1) ⊙ x) at an input site."""
        if self.scales_input:
            return self._scaled_input_product(x, self.scale - 1, None)
        return y * (self.scale - 1)  # (B, T, D_out)

    def add_into(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """y + weight·Δy with one product on y (output) or one fused GEMM (input)."""
        s = self.scale - 1 if weight == 1.0 else (self.scale - 1) * weight
        if self.scales_input:
            return self._scaled_input_product(x, s, y)
        return y * self.scale if weight == 1.0 else y * (1 + s)  # (B, T, D_out)

    def delta_weight(self, layer: nn.Module | None = None) -> torch.Tensor:
        """ΔW in the host layer's layout: diag(l − 1) W (output) or W diag(l − 1) (input)."""
        w = self._weight(layer)
        s = self.scale.to(w.dtype) - 1
        # Linear W is (D_out, D_in), Conv1D W is (D_in, D_out): pick the axis l runs along.
        along_rows = self.scales_input != (self.site_kind == "linear")
        return w * (s[:, None] if along_rows else s[None, :])

    def delta_bias(self, layer: nn.Module | None = None) -> torch.Tensor | None:
        """Δb = (l − 1) ⊙ b at an output site with a bias; None otherwise."""
        bias = getattr(self._host_layer(layer), "bias", None)
        if self.scales_input or not isinstance(bias, torch.Tensor):
            return None
        return bias * (self.scale.to(bias.dtype) - 1)

    def extra_repr(self) -> str:
        return f"scales={'input' if self.scales_input else 'output'}, size={self.scale.numel()}"


__all__ = ["IA3", "IA3Part"]
