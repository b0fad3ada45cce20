"""Geometric merges of whole tensors: SLERP, NuSLERP and Model Stock, streamed tensor by tensor.

Unlike the task-vector methods of :mod:`.methods`, these mix inputs with
coefficients that depend on the *angle* between them, so each tensor takes two
passes: a statistics pass over flat blocks of all inputs (squared norms and dot
products per group of entries, accumulated in float64), then the elementwise
pass with per-group coefficients. A group is the whole tensor (the default),
one row, or one column. Memory stays at a block per input.

* **SLERP** (Shoemake 1985; mergekit's ``slerp``): between the base weights v₀
  and one model's v₁, with Ω the angle between them,
  v = sin((1−t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁, falling back to
  (1−t)v₀ + tv₁ where |cos Ω| > 0.9995 (nearly collinear). t = 0 is the base.
* **NuSLERP** (mergekit's ``nuslerp``): the same interpolation between two
  models with t = w₂/(w₁+w₂) from their weights; with a base model it
  interpolates the task vectors τᵢ = θᵢ − θ₀ and adds θ₀ back. Groups: the
  whole tensor (``nuslerp_flatten``, default), rows (flatten off) or columns
  (``nuslerp_row_wise``, mergekit's naming).
* **Multi-SLERP** (mergekit's ``multislerp``): N models (task vectors with a
  base) on the unit sphere, uᵢ = xᵢ/(‖xᵢ‖ + ε), their weighted mean direction
  m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖ (weights normalised to sum 1 by default), scaled by the
  weighted mean norm Σ wᵢ‖xᵢ‖. mergekit also maps the tangent-space mean back
  with the exponential map; that mean Σ wᵢ(uᵢ − (uᵢ·m)m) is zero by
  construction, so the map is the identity up to rounding and is skipped. Two
  inputs whose weighted directions cancel interpolate linearly.
* **Model Stock** (Jang et al. 2024, arXiv 2403.19522): with N fine-tunes θᵢ of
  θ₀ and cos φ the mean pairwise cosine of their task vectors,
  t = N cos φ / (1 + (N−1) cos φ) and θ = t · mean(θᵢ) + (1−t) θ₀ (t = 0 where
  the denominator vanishes); ``filter_wise`` takes one angle per row.

The closed forms and their guards (clamps, ε, the collinear fallbacks) follow
mergekit 0.1.5 so that a recipe means the same thing in both tools; the
statistics are summed in float64, so coefficients can differ from mergekit's
float32 sums in the last bits (the parity benchmark reports the size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from polymod.errors import ConfigError

InterpMethod = Literal["slerp", "nuslerp", "model_stock", "multislerp"]
_CHUNK = 1 << 15  # dot-product chunks at fixed flat positions: sums do not depend on how a tensor is read
Grouping = Literal["tensor", "rows", "columns"]


@dataclass(frozen=True)
class InterpSpec:
    """A resolved geometric merge of one tensor.

    Args:
        method: ``slerp``, ``nuslerp`` or ``model_stock``.
        t: SLERP's interpolation factor (0: the first input, the base).
        weights: NuSLERP's two weights (t = w₂ / (w₁ + w₂)).
        grouping: entries sharing one angle: the whole ``tensor``, each row, or each column.
        task_vectors: NuSLERP/Multi-SLERP with a base model (inputs are θᵢ − θ₀; the engine adds θ₀ back).
        inputs: the number of inputs.
        normalize: Multi-SLERP: normalise the weights to sum 1 (mergekit's ``normalize_weights``).
        eps: Multi-SLERP's ε in uᵢ = xᵢ/(‖xᵢ‖ + ε).
    """

    method: InterpMethod
    t: float = 0.5
    weights: tuple[float, ...] = ()
    grouping: Grouping = "tensor"
    task_vectors: bool = False
    inputs: int = field(default=2)
    normalize: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.method not in ("slerp", "nuslerp", "model_stock", "multislerp"):
            raise ConfigError(f"unknown geometric merge {self.method!r}; expected slerp, nuslerp, model_stock or "
                              "multislerp")
        if self.method == "multislerp" and len(self.weights) != self.inputs:
            raise ConfigError(f"multislerp needs one weight per input, got {len(self.weights)} for {self.inputs}")
        if self.method in ("slerp", "nuslerp") and self.inputs != 2:
            raise ConfigError(f"{self.method} interpolates exactly two tensors, got {self.inputs}")
        if self.method == "model_stock" and self.inputs < 3:
            raise ConfigError(f"model_stock needs the base and at least two fine-tunes, got {self.inputs} inputs")
        if not math.isfinite(self.t):
            raise ConfigError(f"{self.method}: t must be finite, got {self.t}")

    @property
    def factor(self) -> float:
        """The interpolation factor t actually used."""
        if self.method == "nuslerp":
            total = sum(self.weights)
            return 0.5 if abs(total) < 1e-6 else self.weights[1] / total
        return self.t


class GroupedMerge:
    """The two-pass merger of one tensor for an :class:`InterpSpec` (same protocol as ``TensorMerge``).

    Call :meth:`observe_block` on every flat block of all inputs, then the object on
    any flat range (a list of the inputs' slices and the range's start).
    """

    needs_stats = False
    needs_block_stats = True

    def __init__(self, spec: InterpSpec, name: str, shape: tuple[int, ...]):
        self.spec, self.name, self.shape = spec, name, tuple(shape)
        numel = math.prod(shape)
        last = shape[-1] if shape else 1
        if spec.grouping == "tensor" or len(shape) < 2:
            self._groups, self._div, self._mod = 1, numel or 1, 0
        elif spec.grouping == "rows":
            self._groups, self._div, self._mod = numel // last, last, 0
        else:  # columns: entries with equal index modulo the trailing size
            inner = numel // shape[0]
            self._groups, self._div, self._mod = inner, 1, inner
        n = spec.inputs
        self._sq = torch.zeros(n, self._groups, dtype=torch.float64)  # Σ x² per input and group
        self._dot = torch.zeros(n, n, self._groups, dtype=torch.float64)  # Σ xᵢxⱼ, i < j
        self._coef: list[torch.Tensor] | None = None
        # blocks start on a row (rows: a trailing-dimension row; columns: a row of the leading dimension)
        self.align = 1 if self._groups == 1 else (self._mod or self._div)

    def _group_ids(self, offset: int, length: int) -> torch.Tensor | None:
        if self._groups == 1:
            return None
        idx = torch.arange(offset, offset + length)
        return idx % self._mod if self._mod else idx // self._div

    def _inner(self, x: torch.Tensor, y: torch.Tensor, offset: int) -> torch.Tensor:
        """Σ x·y per group over flat entries [offset, offset + len), as float64."""
        if self._groups == 1:  # float32 dot products over fixed 2¹⁵-entry chunks, summed in float64
            cuts = [offset, *range((offset // _CHUNK + 1) * _CHUNK, offset + x.numel(), _CHUNK), offset + x.numel()]
            return torch.tensor([sum(float(torch.dot(x[a - offset:b - offset], y[a - offset:b - offset]))
                                     for a, b in zip(cuts, cuts[1:]))], dtype=torch.float64)
        width = self._mod or self._div
        if offset % width or x.numel() % width:  # a range not made of whole rows: entry by entry
            ids = self._group_ids(offset, x.numel())
            return torch.zeros(self._groups, dtype=torch.float64).index_add_(0, ids, (x * y).to(torch.float64))
        prod = (x * y).view(-1, width)  # (rows of this range, width)
        if self._mod:  # columns: each row adds one entry to every group
            return prod.sum(dim=0, dtype=torch.float64)
        first = offset // width
        out = torch.zeros(self._groups, dtype=torch.float64)
        out[first:first + prod.shape[0]] = prod.sum(dim=1, dtype=torch.float64)
        return out

    def observe_block(self, xs: list[torch.Tensor], offset: int) -> None:
        """Accumulate the statistics of flat entries ``[offset, offset + len)`` of every input."""
        flat = [x.reshape(-1) for x in xs]
        if self.spec.method == "model_stock":  # angles between task vectors θᵢ − θ₀ (inputs: θ₀, θ₁, …)
            flat = [flat[0], *[x - flat[0] for x in flat[1:]]]
        first = 1 if self.spec.method == "model_stock" else 0
        for i in range(first, len(flat)):
            self._sq[i] += self._inner(flat[i], flat[i], offset)
            for j in range(i + 1, len(flat)):
                self._dot[i, j] += self._inner(flat[i], flat[j], offset)

    def _coefficients(self, dtype: torch.dtype) -> list[torch.Tensor]:
        if self._coef is not None:
            return self._coef
        s = self.spec
        norms = self._sq.sqrt()
        if s.method == "slerp":
            na = torch.where(norms[0] > 1e-8, norms[0], 1.0)
            nb = torch.where(norms[1] > 1e-8, norms[1], 1.0)
            dot = (self._dot[0, 1] / (na * nb)).to(dtype).clamp(-1, 1)
            t = torch.tensor(s.t, dtype=dtype)
            linear = dot.abs() > 0.9995
            theta = torch.acos(torch.where(linear, 0, dot))
            sin = torch.sin(theta)
            a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin)
            b = torch.where(linear, t, torch.sin(t * theta) / sin)
            self._coef = [a, b]
        elif s.method == "nuslerp":
            t = s.factor
            dot = (self._dot[0, 1] / (norms[0].clamp(min=1e-7) * norms[1].clamp(min=1e-7))).to(dtype).clamp(-1, 1)
            colinear = (1 - dot.square()) <= 1e-16
            theta = torch.acos(torch.where(colinear, 0, dot))
            sin = torch.sin(theta)
            # [v0 coefficient, v1 coefficient, divisor]; collinear groups interpolate linearly
            self._coef = [torch.where(colinear, 1 - t, torch.sin((1 - t) * theta)),
                          torch.where(colinear, t, torch.sin(t * theta)),
                          torch.where(colinear, 1.0, sin)]
        elif s.method == "multislerp":
            self._coef = self._multislerp(norms, dtype)
        else:
            n = s.inputs - 1
            cos = [(self._dot[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).to(dtype).clamp(-1, 1)
                   for i in range(1, n + 1) for j in range(i + 1, n + 1)]
            mean = torch.stack(cos).mean(dim=0)
            den = 1 + (n - 1) * mean
            singular = den.abs() < 1e-6
            t = torch.where(singular, 0.0, (n * mean) / torch.where(singular, 1.0, den))
            self._coef = [t, 1 - t]
        return self._coef

    def _multislerp(self, norms: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per-input coefficients cᵢ of Σ cᵢxᵢ (see the module docstring); ``norms``: (inputs, groups)."""
        w = torch.tensor(self.spec.weights, dtype=torch.float64)[:, None]  # (inputs, 1)
        if self.spec.normalize:
            w = w / w.sum()
        if len(self.spec.weights) == 1:
            return [torch.ones(self._groups, dtype=dtype)]
        c = w / (norms + self.spec.eps)  # (inputs, groups): weight of each raw input in Σ wᵢuᵢ
        gram = self._dot + self._dot.transpose(0, 1) + torch.diag_embed(self._sq.T).permute(1, 2, 0)
        mean_sq = torch.einsum("ig,ijg,jg->g", c, gram, c).clamp(min=0)  # ‖Σ wᵢuᵢ‖² per group
        mean_norm = mean_sq.sqrt()
        if bool((mean_norm < self.spec.eps).any()) and len(self.spec.weights) > 2:
            raise ConfigError(f"multislerp: the weighted directions of {self.name} cancel out (antipodal inputs "
                              "with balancing weights); change the weights")
        linear = mean_norm < self.spec.eps  # two cancelling inputs: linear interpolation, as mergekit
        scale = (w * norms).sum(0) / torch.where(linear, 1.0, mean_norm)
        return [torch.where(linear, w[i, 0], c[i] * scale).to(dtype) for i in range(len(self.spec.weights))]

    def __call__(self, xs: list[torch.Tensor], offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged tensor on flat entries ``[offset, offset + len)`` (of the inputs as given)."""
        flat = [x.reshape(-1) for x in xs]
        coef = self._coefficients(flat[0].dtype)
        ids = self._group_ids(offset, flat[0].numel())

        def per_entry(c: torch.Tensor) -> torch.Tensor:
            return c[0] if ids is None else c[ids]

        if self.spec.method == "slerp":  # a·v₀ + b·v₁, the first product written straight into the output
            dst = torch.mul(per_entry(coef[0]), flat[0], out=out.reshape(-1) if out is not None else None)
            dst.add_(per_entry(coef[1]) * flat[1])
            return out if out is not None else dst.view(xs[0].shape)
        elif self.spec.method == "nuslerp":
            mixed = (per_entry(coef[0]) * flat[0] + per_entry(coef[1]) * flat[1]) / per_entry(coef[2])
        elif self.spec.method == "multislerp":
            mixed = per_entry(coef[0]) * flat[0]
            for c, x in zip(coef[1:], flat[1:]):
                mixed = mixed + per_entry(c) * x
        else:
            total = flat[1] + flat[2]
            for x in flat[3:]:
                total = total + x
            mixed = per_entry(coef[0]) * (total / (len(flat) - 1)) + per_entry(coef[1]) * flat[0]
        if out is None:
            return mixed.view(xs[0].shape) if mixed.numel() == xs[0].numel() else mixed
        out.copy_(mixed)
        return out


def interp_tensor(spec: InterpSpec, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Merge whole tensors in memory (the reference the streaming merge equals)."""
    merger = GroupedMerge(spec, name, tuple(tensors[0].shape))
    merger.observe_block(tensors, 0)
    return merger(tensors, 0)
