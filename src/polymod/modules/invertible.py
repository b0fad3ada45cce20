"""Invertible embedding adapter: MAD-X (Pfeiffer, Vulić, Gurevych, Ruder 2020, arXiv 2005.00052).

A NICE coupling block (Dinh et al. 2015) acts on the token embeddings, and its
exact inverse on the hidden states entering the output embeddings (the LM
head), so that a language's embedding space can be adapted while input and
output embeddings stay tied. With e = [e₁; e₂] split in two halves along D::

    forward (after the input embeddings)      inverse (before the output embeddings)
    o₁ = e₁ + F(e₂)                           e₂ = o₂ − G(o₁)
    o₂ = e₂ + G(o₁)                           e₁ = o₁ − F(e₂)

F and G are bottlenecks F(h) = W₂ σ(W₁ h + b₁) + b₂ of width ⌊D/2 / reduction⌋.
Defaults: reduction 2 and ReLU, as in MAD-X and AdapterHub's ``SeqBnInvConfig``.
Initialisation ``zero`` sets the last layers of F and G to zero, making the
module the exact identity at initialisation; ``bert`` is adapters' N(0, 0.02)
(not the identity).

Sites: the forward block at ``embed`` (the token embeddings; T5's encoder and
decoder embeddings both, sharing one block), and, when the host has output
embeddings, the inverse at the input of ``get_output_embeddings()`` (an input
site ``<head>.<input>``, see :mod:`polymod.inputs`). Every part shares the one
coupling block held by the first forward part (``link_parts``), so it is saved
once. AdapterHub applies the block to the whole embedding output (after position
embeddings and, for BERT, the embedding LayerNorm); ``sites="bert.embeddings"``
(BERT) reproduces that placement, which ``benchmarks/adapters_parity.py`` checks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from polymod.errors import ConfigError, IncompatibleHostError
from polymod.modules.adapter import ACTIVATIONS
from polymod.modules.contract import Borrowed, register
from polymod.sites import Site

INPUT = ".<input>"


@register
@dataclass(frozen=True)
class Invertible:
    """Configuration of an invertible (NICE) embedding adapter.

    Args:
        reduction: F and G have hidden width ⌊(D/2) / reduction⌋ (at least 1).
        activation: σ, one of ``relu``, ``gelu``, ``gelu_tanh``, ``silu``, ``tanh``.
        init: ``zero`` (the identity at initialisation) or ``bert`` (N(0, 0.02), as adapters).
        inverse: add the inverse before the output embeddings when the host has them.
        sites: where the forward block acts (default: the ``embed`` role).
    """

    kind: ClassVar[str] = "invertible"
    reduction: float = 2.0
    activation: str = "relu"
    init: Literal["zero", "bert"] = "zero"
    inverse: bool = True
    sites: str = "embed"

    def __post_init__(self) -> None:
        if not isinstance(self.reduction, (int, float)) or not self.reduction > 0:
            raise ConfigError(f"Invertible reduction must be a positive number, got {self.reduction!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"Invertible activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in ("zero", "bert"):
            raise ConfigError(f"Invertible init must be 'zero' or 'bert', got {self.init!r}")

    def sites_for(self, host: nn.Module) -> list[str]:
        """``sites``, plus the input of the host's output embeddings when ``inverse`` and it has them."""
        head = host.get_output_embeddings() if hasattr(host, "get_output_embeddings") else None
        names = [n for n, m in host.named_modules() if m is head and n] if head is not None else []
        return [self.sites] + ([names[0] + INPUT] if self.inverse and names else [])

    def check_site(self, site: Site) -> str | None:
        if site.kind == "input":
            return None  # the inverse: it has no parameters of its own
        if not site.out_features or site.out_features < 2:
            return f"a coupling block splits the hidden width in two halves; the width at {site.name} is unknown"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> nn.Module:
        if site.kind == "input":
            return InversePart()
        part = CouplingPart(site.out_features, self.reduction, self.activation)
        weight = next(layer.parameters(), None) if layer is not None else None
        if weight is not None:
            part.to(device=weight.device, dtype=weight.dtype)
        part.reset_parameters(self.init)
        return part

    def link_parts(self, parts: dict[str, nn.Module]) -> None:
        """Every part uses the coupling block of the first forward part (saved once, trained once)."""
        owners = [p for p in parts.values() if isinstance(p, CouplingPart) and p.owns]
        if not owners:
            raise IncompatibleHostError("an invertible adapter needs a forward site (e.g. 'embed'); it has only "
                                        f"input sites: {', '.join(parts)}")
        for part in parts.values():
            if part is not owners[0]:
                part.borrow(owners[0].block)


class NICEBlock(nn.Module):
    """The coupling block: F (D₂ → D₁) and G (D₁ → D₂) bottlenecks over the two halves of D."""

    def __init__(self, width: int, reduction: float, activation: str):
        super().__init__()
        self.d1, self.d2 = width // 2, width - width // 2
        self.activation = activation
        self.F = nn.Sequential(nn.Linear(self.d2, max(1, int(self.d2 // reduction))),
                               nn.Linear(max(1, int(self.d2 // reduction)), self.d1))
        self.G = nn.Sequential(nn.Linear(self.d1, max(1, int(self.d1 // reduction))),
                               nn.Linear(max(1, int(self.d1 // reduction)), self.d2))

    def _net(self, net: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        return net[1](ACTIVATIONS[self.activation](net[0](h)))  # (B, T, D/2) -> (B, T, h) -> (B, T, D/2)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """o = [e₁ + F(e₂); e₂ + G(o₁)]."""
        e1, e2 = e[..., : self.d1], e[..., self.d1 :]  # (B, T, D₁), (B, T, D₂)
        o1 = e1 + self._net(self.F, e2)
        return torch.cat([o1, e2 + self._net(self.G, o1)], dim=-1)  # (B, T, D)

    def inverse(self, o: torch.Tensor) -> torch.Tensor:
        """e = [o₁ − F(e₂); o₂ − G(o₁)], the exact inverse of :meth:`forward`."""
        o1, o2 = o[..., : self.d1], o[..., self.d1 :]
        e2 = o2 - self._net(self.G, o1)
        return torch.cat([o1 - self._net(self.F, e2), e2], dim=-1)  # (B, T, D)


class _Shared(nn.Module):
    """A part that may use another part's coupling block: its own (a submodule) or a borrowed one."""

    def __init__(self) -> None:
        super().__init__()
        self.borrowed: Borrowed | None = None

    def borrow(self, block: NICEBlock) -> None:
        """Use ``block`` (another part's, saved there) instead of one of its own."""
        if "block" in self._modules:
            del self._modules["block"]
        self.borrowed = Borrowed(block)

    @property
    def owns(self) -> bool:
        """Whether the coupling block is this part's own (saved with it)."""
        return self.borrowed is None and "block" in self._modules

    def _block(self) -> NICEBlock:
        return self.borrowed.module if self.borrowed is not None else self._modules["block"]


class CouplingPart(_Shared):
    """The forward coupling at an embedding site: y' = NICE(y)."""

    def __init__(self, width: int, reduction: float, activation: str):
        super().__init__()
        self.block = NICEBlock(width, reduction, activation)

    def reset_parameters(self, init: str = "zero") -> None:
        """``zero``: first layers N(0, 0.02), last layers 0 (the identity); ``bert``: every layer N(0, 0.02)."""
        with torch.no_grad():
            for net in (self._block().F, self._block().G):
                for i, linear in enumerate(net):
                    nn.init.normal_(linear.weight, std=0.02)
                    linear.bias.zero_()
                    if init == "zero" and i == len(net) - 1:
                        linear.weight.zero_()

    def forward(self, x: Any, y: torch.Tensor) -> torch.Tensor:
        """Δy = NICE(y) − y."""
        return self._block()(y) - y

    def add_into(self, x: Any, y: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """NICE(y) exactly at weight 1; y + weight·(NICE(y) − y) otherwise."""
        out = self._block()(y)
        return out if weight == 1.0 else y + weight * (out - y)


class InversePart(_Shared):
    """The inverse coupling at the output embeddings' input (an input site); no parameters of its own."""

    def forward(self, x: Any, y: dict[str, Any]) -> dict[str, Any]:
        return self.add_into(x, y)

    def add_into(self, x: Any, y: dict[str, Any], weight: float = 1.0) -> dict[str, Any]:
        """The call with its hidden states h replaced by NICE⁻¹(h) (h + weight·(NICE⁻¹(h) − h) at weight ≠ 1)."""
        if self.borrowed is None:
            raise IncompatibleHostError("the inverse of an invertible adapter needs its forward part; build the "
                                        "module with its forward site")
        names = [n for n in inspect.signature(x.forward).parameters if isinstance(y.get(n), torch.Tensor)]
        key = names[0] if names else None  # the head's first tensor argument: the hidden states
        if key is None:
            raise IncompatibleHostError(f"{type(x).__name__} was called without hidden states to invert")
        h = y[key]
        out = self._block().inverse(h)
        call = dict(y)
        call[key] = out if weight == 1.0 else h + weight * (out - h)
        return call
