"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353), as a LoRA strategy.

DoRA splits the adapted weight into a magnitude and a direction and trains
both: the direction is the LoRA-updated weight W + s·B A, normalised per
output feature; the magnitude m is a learned vector (one entry per output)::

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖        (row norms of the (D_out, D_in) map)

m starts at ‖W‖, so with B = 0 the module is the identity. Writing
g = m / ‖W + s·B A‖ (a vector over outputs) the site's change is::

    Δy = (g − 1) ⊙ (W x) + g ⊙ (s·B A x)

As in the paper (§4.3) and PEFT, the norm is treated as a constant in the
backward pass (detached): gradients flow to m, A and B through g's numerator
and the low-rank branch only. With dropout in training, W x and B A x both see
the same dropped input, as in PEFT; in evaluation W x is the host output less
its bias, so no second product with W is needed.

:class:`DoRAPart` holds a LoRA part (the direction's low-rank update, with its
dropout) and the magnitude; it is what ``LoRA(dora=True)`` builds — a strategy
a LoRA module holds, not a subclass. It reads the host weight (the norm), so it
is attached to the host layer like IA³ (:class:`~polymod.modules.contract.ReadsHostLayer`).
Its weight delta is ΔW = g ⊙ (W + s·B A) − W, so ``merge_into_host`` and
parameter aggregation treat it like any mergeable part. Sites: ``nn.Linear``
and transformers' ``Conv1D`` (PEFT's DoRA on embeddings is refused).
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from polymod.errors import StateError


class LowRankUpdate(Protocol):
    """What DoRA needs of its LoRA part: the factors, their scaling and the input dropout."""

    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    dropout: nn.Module
    site_kind: str


class DoRAPart(nn.Module):
    """LoRA's update with DoRA's magnitude: ``lora`` (A, B) and ``magnitude`` (D_out)."""

    def __init__(self, lora: nn.Module, d_out: int):
        super().__init__()
        self.lora = lora
        self.site_kind = lora.site_kind
        self.magnitude = nn.Parameter(torch.ones(d_out))
        # A weak reference keeps the host layer out of this part's state dict, parameters and deep copies.
        self._layer: weakref.ref | None = None

    @property
    def rank(self) -> int:
        """The rank r of the low-rank update."""
        return self.lora.rank

    def attach_layer(self, layer: nn.Module) -> None:
        """Remember the host layer (the norm ‖W + s·B A‖ reads W)."""
        self._layer = weakref.ref(layer)

    def init_magnitude(self, layer: nn.Module) -> None:
        """m = ‖W + s·B A‖ per output: the identity for the current A, B (B = 0 at initialisation)."""
        self.attach_layer(layer)
        with torch.no_grad():
            self.magnitude.copy_(self._norm(self._weight(layer)))

    def _weight(self, layer: nn.Module | None) -> torch.Tensor:
        layer = layer if layer is not None else (self._layer() if self._layer is not None else None)
        if layer is None:
            raise StateError("this DoRA part is not attached to a host layer; its norm ‖W + s·B A‖ reads the host "
                             "weight: add the module to a Modular first (or pass host=... to pm.merge)")
        w = layer.weight
        return w if self.site_kind == "linear" else w.t()  # (D_out, D_in)

    def _norm(self, w: torch.Tensor) -> torch.Tensor:
        """‖W + s·B A‖ over each output's row, without gradient (DoRA §4.3)."""
        with torch.no_grad():
            lora = self.lora
            full = w.float() + (lora.B.float() @ lora.A.float()) * lora.scaling  # (D_out, D_in)
            return torch.linalg.vector_norm(full, dim=1).to(self.magnitude.dtype)  # (D_out,)

    def _gain(self) -> torch.Tensor:
        """g = m / ‖W + s·B A‖ (D_out)."""
        return self.magnitude / self._norm(self._weight(None))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy = (g − 1) ⊙ W x + g ⊙ s·B A x (W x: the host output less its bias, or W applied to the dropped input)."""
        lora = self.lora
        dropping = isinstance(lora.dropout, nn.Dropout) and lora.dropout.training
        xd = lora.dropout(x) if dropping else x
        g = self._gain().to(y.dtype)
        if not dropping:
            bias = getattr(self._layer() if self._layer is not None else None, "bias", None)
            base = y - bias if isinstance(bias, torch.Tensor) else y  # (B, T, D_out): W x
        else:
            base = F.linear(xd, self._weight(None).to(xd.dtype))  # (B, T, D_out): W applied to the dropped input
        update = F.linear(F.linear(xd, lora.A), lora.B) * lora.scaling  # (B, T, D_out)
        out = (g - 1) * base + g * update.to(y.dtype)
        return out if lora.bias is None else out + lora.bias  # a trained bias change is outside the rescaling

    def add_into(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """y + weight·Δy."""
        delta = self(x, y)
        return y + delta if weight == 1.0 else y + weight * delta

    def delta_weight(self, layer: nn.Module | None = None) -> torch.Tensor:
        """ΔW = g ⊙ (W + s·B A) − W in the host layer's layout."""
        w = self._weight(layer)  # (D_out, D_in)
        lora = self.lora
        full = w + (lora.B @ lora.A).to(w.dtype) * lora.scaling
        delta = (self.magnitude.to(w.dtype) / self._norm(w).to(w.dtype))[:, None] * full - w  # (D_out, D_in)
        return delta if self.site_kind == "linear" else delta.t()

    def delta_bias(self, layer: nn.Module | None = None) -> torch.Tensor | None:
        """The LoRA part's Δb (``bias=True``), else None: DoRA rescales W only."""
        return self.lora.bias

    def extra_repr(self) -> str:
        return f"magnitude={tuple(self.magnitude.shape)}"


__all__ = ["DoRAPart", "LowRankUpdate"]
