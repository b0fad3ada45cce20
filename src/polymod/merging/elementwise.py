"""Entry-by-entry merges of whole checkpoints: NearSwap and RAM (one pass, no statistics).

* **NearSwap** (mergekit's ``nearswap``, after alchemonaut's QuartetAnemoi merges):
  between the base weights a and one model's b, each entry moves towards b by
  w = clamp(t / max(|a − b|, 10⁻⁶), 0, 1): θ = w·b + (1 − w)·a. Entries where the
  two models nearly agree (|a − b| ≤ t) take b; entries far apart stay close to a.
* **RAM**, Reinforced Agent Merging (arXiv 2601.13572; mergekit's ``ram``): with
  task vectors τᵢ = θᵢ − θ₀ and an entry counted as changed by input i when
  |τᵢ| > ε, an entry changed by exactly one input keeps that input's change, an
  entry changed by several takes their mean change: θ = θ₀ + Σᵢ [|τᵢ| > ε] τᵢ / cᵢ
  with c the number of inputs that changed it (entries no input changed stay θ₀).

The arithmetic follows mergekit 0.1.5's kernels operation by operation, so
float32 merges are bit-identical to ``mergekit-yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from polymod.errors import ConfigError

ElementwiseMethod = Literal["nearswap", "ram"]


@dataclass(frozen=True)
class ElementwiseSpec:
    """A resolved entry-by-entry merge of one tensor.

    Args:
        method: ``nearswap`` (inputs: the base, then the other model) or ``ram`` (inputs: task vectors).
        t: NearSwap's distance scale (> 0 moves entries; 0 keeps the base).
        epsilon: RAM's threshold on |τᵢ| for an entry to count as changed.
    """

    method: ElementwiseMethod
    t: float = 0.0
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.method not in ("nearswap", "ram"):
            raise ConfigError(f"unknown entry-wise merge {self.method!r}; expected nearswap or ram")
        if not (math.isfinite(self.t) and self.t >= 0):
            raise ConfigError(f"nearswap: t must be a finite number >= 0, got {self.t}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ConfigError(f"ram: epsilon must be a finite number >= 0, got {self.epsilon}")


class ElementwiseMerge:
    """The one-pass merger of an :class:`ElementwiseSpec` (the engine's merger protocol)."""

    needs_stats = False
    needs_block_stats = False
    align = 1

    def __init__(self, spec: ElementwiseSpec, name: str, shape: tuple[int, ...]):
        self.spec, self.name, self.shape = spec, name, tuple(shape)

    def observe(self, index: int, delta: torch.Tensor, inplace: bool = False) -> None:
        """No statistics: entries are merged independently."""

    def observe_block(self, xs: list[torch.Tensor], offset: int) -> None:
        """No statistics: entries are merged independently."""

    def __call__(self, xs: list[torch.Tensor], offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged entries of a flat range (``xs``: the inputs' slices of it)."""
        flat = [x.reshape(-1) for x in xs]  # (n,) each
        if self.spec.method == "nearswap":
            a, b = flat
            weight = (self.spec.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
            mixed = weight * b + (1 - weight) * a
        else:
            tv = torch.stack(flat)  # (inputs, n)
            changed = tv.abs() > self.spec.epsilon
            counts = changed.sum(dim=0, keepdim=True)  # (1, n)
            kept = tv * changed
            mixed = (kept * (counts == 1) + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
        if out is None:
            return mixed.view(xs[0].shape)
        out.copy_(mixed)
        return out


def elementwise_tensor(spec: ElementwiseSpec, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Merge whole tensors in memory (NearSwap: base and model weights; RAM: task vectors)."""
    return ElementwiseMerge(spec, name, tuple(tensors[0].shape))(tensors)
