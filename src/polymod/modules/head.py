"""Head: a trainable copy of a host layer (PEFT's ``modules_to_save``).

A task head created by ``from_pretrained(..., num_labels=k)`` is randomly
initialised: it is not part of the pretrained host, it differs in every
process, and a LoRA on it would record those random weights as "the host".
A head module instead holds its own copy of the layer, φ = (W_h, b_h), started
from the host's weights, and replaces the layer's output::

    f'(x) = f_θ(x) + f_φ(x)   with   f_φ(x) = h(x) − f_θ(x),   h(x) = W_h x + b_h

so y' = h(x): the identity at initialisation, and after training the head's
function whatever the host layer holds. Because the host weights at the site
do not enter that function, the module's host fingerprint leaves them out: a
head saved in one process loads without a host-mismatch warning in another,
where ``from_pretrained`` drew other random weights, and modules trained on
the same pretrained checkpoint in separate processes merge.

Under a weighted composition (Mix, parameter aggregation) the head contributes
w·(h(x) − y) like any kind. As a parameter-composition part its weight delta is
W_h − W (read from the live host layer), so ``merge_into_host`` copies the head
into the layer and ``unmerge`` restores it. Offline merging (``pm.merge``)
averages heads' weights (``method="linear"``); task-vector methods are refused,
because a head's weights start from a random draw, not from a shared base.

Sites: leaf layers (``nn.Linear``, transformers' ``Conv1D``, ``nn.Embedding``);
for a head block such as RoBERTa's ``classifier`` select its layers
(``classifier.*``). The copy has exactly the layer's parameters: where the
host layer has no bias (GPT-2's and Llama's ``score``, most ``lm_head``
layers) the copy's ``bias`` is a zero buffer, saved but never trained. An
embedding copy keeps no ``padding_idx`` (it only masks that row's gradient in
the host). No hyper-parameters to justify: the head starts as the host's own
layer, as in PEFT.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import ConfigError, IncompatibleHostError, StateError
from polymod.modules.contract import register
from polymod.modules.delta import weight_layout
from polymod.sites import Site


@register
@dataclass(frozen=True)
class Head:
    """Configuration of a head module: a trainable copy of each selected layer.

    Args:
        sites: the layers to copy (names, globs, ``re:`` regexes or roles); usually the
            task head, e.g. ``"classifier"`` (BERT), ``"score"`` (GPT-2, Llama) or ``"lm_head"``.
    """

    kind: ClassVar[str] = "head"
    sites: str = "classifier"

    def __post_init__(self) -> None:
        if not isinstance(self.sites, str) or not self.sites.strip():
            raise ConfigError(f"Head sites must name the layers to copy (e.g. 'classifier'), got {self.sites!r}")

    def check_site(self, site: Site) -> str | None:
        if site.kind not in ("linear", "conv1d", "embedding"):
            return (f"a head copies leaf layers (Linear, Conv1D, Embedding), not a {site.kind}; select the "
                    f"block's layers instead, e.g. '{site.name}.*'")
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> HeadPart:
        part = HeadPart(site.kind, site.in_features, site.out_features)
        if layer is not None:
            part.to(device=layer.weight.device, dtype=layer.weight.dtype)
            part.copy_from(layer)
        return part

    def copies_layer(self) -> bool:
        """Heads compute their sites' whole output: the host weights there are not part of the fingerprint."""
        return True


class HeadPart(nn.Module):
    """A copy of one layer: ``weight`` in the host layer's layout and ``bias`` (D_out; not for embeddings).

    ``bias`` is a parameter where the host layer has a bias and a zero buffer where it has none
    (decided by :meth:`copy_from` on a fresh copy, :meth:`attach_layer` on a loaded one).
    """

    def __init__(self, site_kind: str, d_in: int | None, d_out: int | None):
        super().__init__()
        if d_in is None or d_out is None:
            raise ConfigError(f"a head needs the layer's geometry, got {d_in}->{d_out}")
        self.site_kind = site_kind
        self.weight = nn.Parameter(torch.zeros(weight_layout(Site("", site_kind, d_in, d_out))))  # type: ignore[arg-type]
        self.bias = nn.Parameter(torch.zeros(d_out)) if site_kind != "embedding" else None
        # A weak reference keeps the host layer out of this part's state dict, parameters and deep copies.
        self._layer: weakref.ref | None = None

    def copy_from(self, layer: nn.Module) -> None:
        """Start from the host layer's weight and bias."""
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            host_bias = getattr(layer, "bias", None)
            if isinstance(host_bias, torch.Tensor) and self.bias is not None:
                self.bias.copy_(host_bias)
        self._follow_bias(layer)

    def _follow_bias(self, layer: nn.Module) -> None:
        """Turn ``bias`` into a zero buffer when the host layer has none (the copy has the layer's parameters)."""
        if self.bias is None or isinstance(getattr(layer, "bias", None), torch.Tensor):
            return
        if not isinstance(self.bias, nn.Parameter):
            return
        if bool(self.bias.detach().any()):
            raise IncompatibleHostError("this head holds a bias, but the host layer it copies has none; load it "
                                        "onto the host it was made for")
        zero = self.bias.detach().clone()
        del self.bias
        self.register_buffer("bias", zero)

    def attach_layer(self, layer: nn.Module) -> None:
        """Remember the host layer (the weight delta W_h − W reads it) and follow its bias-or-not."""
        self._layer = weakref.ref(layer)
        self._follow_bias(layer)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """h(x): the copy's own output for the site input ``x``."""
        if self.site_kind == "embedding":
            return F.embedding(x, self.weight)  # (B, T, D)
        w = self.weight if self.site_kind == "linear" else self.weight.t()  # (D_out, D_in)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))  # (B, T, D_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = h(x) − y."""
        return self.head(x).to(y.dtype) - y

    def add_into(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """y + weight·(h(x) − y); exactly h(x) at weight 1."""
        h = self.head(x).to(y.dtype)
        return h if weight == 1.0 else torch.lerp(y, h, weight)

    def _host(self, layer: nn.Module | None) -> nn.Module:
        layer = layer if layer is not None else (self._layer() if self._layer is not None else None)
        if layer is None:
            raise StateError("this head part is not attached to a host layer; its weight delta W_h − W needs the "
                             "host's W: add the module to a Modular first (or pass host=... to pm.merge)")
        return layer

    def delta_weight(self, layer: nn.Module | None = None) -> torch.Tensor:
        """ΔW = W_h − W in the host layer's layout: merging copies the head into the layer."""
        w = self._host(layer).weight
        return self.weight.to(w.dtype) - w

    def delta_bias(self, layer: nn.Module | None = None) -> torch.Tensor | None:
        """Δb = b_h − b where the host layer has a bias; None otherwise."""
        host_bias = getattr(self._host(layer), "bias", None)
        if self.bias is None or not isinstance(host_bias, torch.Tensor):
            return None
        return self.bias.to(host_bias.dtype) - host_bias

    def extra_repr(self) -> str:
        return f"{self.site_kind}, weight={tuple(self.weight.shape)}, bias={isinstance(self.bias, nn.Parameter)}"


__all__ = ["Head", "HeadPart"]
