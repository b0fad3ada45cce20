"""Parameter aggregation methods on task vectors, one tensor at a time.

A *task vector* is the change a fine-tune (or a module) makes to one host
tensor, τ_i = θ_i − θ_0 (Ilharco et al., 2023, arXiv 2212.04089). Every method
here computes a merged change

    τ = λ · Σ_i w_i m_i ⊙ s_i(τ_i)  /  D          (D = 1 unless ``normalize``)

from three choices (the decomposition mergekit uses too):

* **sparsification** s_i, per input: none; ``magnitude`` (keep the top
  ``density`` fraction of |τ_i|; TIES, magnitude pruning); ``random`` (DARE,
  Yu et al. 2023, arXiv 2311.03099: keep each entry with probability
  ``density`` = 1 − p and rescale, by 1/(1 − p) as the paper and PEFT do, or
  by matching the L1 norm as mergekit 0.1.5 does); ``outliers`` (Model
  Breadcrumbs, Davari & Belilovsky 2023, arXiv 2312.06795: drop the ``gamma``
  largest entries as outliers, then the smallest, keeping ``density``);
  ``della`` (DELLA's MagPrune, Deep et al. 2024, arXiv 2406.11617: keep each
  entry with a probability that grows with its magnitude rank in its row,
  ``density`` ± ``epsilon``, then rescale);
* **sign election** m_i (TIES, Yadav et al. 2023, arXiv 2306.01708): the
  majority sign per entry is that of Σ_i w_i s_i(τ_i) (``consensus="sum"``) or
  of the count of signs (``"count"``); only agreeing entries are kept;
* **normalisation**: D = Σ_i w_i m_i (the disjoint mean of TIES, weighted as in
  mergekit; with unit weights it is the paper's mean over agreeing entries).

Defaults follow mergekit's per-method defaults so that a recipe means the same
thing in both tools: ``normalize`` is on for TIES only.

The work is split so that whole checkpoints can be merged in bounded memory:
:meth:`TensorMerge.observe` sees one input's full task vector at a time and
keeps only small statistics (magnitude trims, L1 norms), then
:meth:`TensorMerge.__call__` combines any flat range of all inputs elementwise.
Chunking never changes a bit of the result: the kernel is elementwise, sums
over inputs run in a fixed order, and DARE's masks (:mod:`.sparsify`) do not
depend on how the tensor is cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from polymod.errors import ConfigError
from polymod.merging.sparsify import SLICE, MaskStream, Trim, dare_mask, della_keep, della_rows, top_k_trim

MethodName = Literal[
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear",
]
Sparsify = Literal["magnitude", "random", "outliers", "della"]

# method -> (sparsification, sign election, default normalize); as mergekit 0.1.5's registry.
METHODS: dict[str, tuple[Sparsify | None, bool, bool]] = {
    "linear": (None, False, False),
    "task_arithmetic": (None, False, False),
    "ties": ("magnitude", True, True),
    "dare_linear": ("random", False, False),
    "dare_ties": ("random", True, False),
    "magnitude_prune": ("magnitude", False, False),
    "breadcrumbs": ("outliers", False, False),
    "breadcrumbs_ties": ("outliers", True, False),
    "della": ("della", True, True),
    "della_linear": ("della", False, False),
}


@dataclass(frozen=True)
class MergeSpec:
    """A fully resolved merge recipe for N inputs.

    Args:
        method: one of :data:`METHODS`.
        weights: w_i, one per input (negative weights subtract: task negation).
        density: fraction kept by sparsification, one per input, in (0, 1].
        gamma: Breadcrumbs' fraction of largest entries dropped, one per input, in [0, 1).
        epsilon: DELLA's spread of keep probabilities (density ± epsilon), one per input.
        lam: λ, scaling of the merged task vector (task arithmetic).
        normalize: divide by Σ w_i m_i (None: the method's default).
        trim: ``tensor`` — TIES/magnitude trimming per tensor (mergekit, PEFT); ``global`` —
            one threshold per input over all its tensors (the TIES paper's code). Global
            thresholds are computed by the caller and passed to :class:`TensorMerge`.
        rescale: DARE's and DELLA's rescaling: ``inverse`` (×1/keep probability, the papers' and
            PEFT's), ``l1`` (match the L1 norm of τ_i, mergekit 0.1.5's ``rescale: true``) or ``none``.
        consensus: TIES sign election by ``sum`` of values (paper) or ``count`` of signs.
        seed: seed of DARE's random masks.
    """

    method: str
    weights: tuple[float, ...]
    density: tuple[float, ...] = ()
    gamma: tuple[float, ...] = ()
    epsilon: tuple[float, ...] = ()
    lam: float = 1.0
    normalize: bool | None = None
    trim: Literal["tensor", "global"] = "tensor"
    rescale: Literal["inverse", "l1", "none"] = "inverse"
    consensus: Literal["sum", "count"] = "sum"
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.weights)
        if self.method not in METHODS:
            raise ConfigError(f"unknown merge method {self.method!r}; expected one of {', '.join(METHODS)}")
        if n == 0:
            raise ConfigError("a merge needs at least one input")
        try:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            object.__setattr__(self, "density", tuple(float(d) for d in self.density) or (1.0,) * n)
            object.__setattr__(self, "gamma", tuple(float(g) for g in self.gamma) or (0.01,) * n)
            object.__setattr__(self, "epsilon", tuple(float(e) for e in self.epsilon) or (0.15,) * n)
            object.__setattr__(self, "lam", float(self.lam))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.method}: weights, density, gamma and lambda must be numbers: {exc}") from exc
        if self.normalize is None:
            object.__setattr__(self, "normalize", METHODS[self.method][2])
        bad = []
        for name, values in (("density", self.density), ("gamma", self.gamma), ("epsilon", self.epsilon)):
            if len(values) != n:
                bad.append(f"{name} has {len(values)} values for {n} inputs")
        if any(not 0.0 < d <= 1.0 for d in self.density):
            bad.append(f"density must be in (0, 1], got {list(self.density)}")
        if any(not 0.0 <= g < 1.0 for g in self.gamma):
            bad.append(f"gamma must be in [0, 1), got {list(self.gamma)}")
        if self.sparsify == "della" and any(d < 1.0 and not (d - e > 0.0 and d + e < 1.0)
                                            for d, e in zip(self.density, self.epsilon)):
            bad.append(f"epsilon must keep density ± epsilon inside (0, 1), got density {list(self.density)} "
                       f"and epsilon {list(self.epsilon)}")
        if not all(math.isfinite(w) for w in self.weights) or not math.isfinite(self.lam):
            bad.append(f"weights and lambda must be finite, got {list(self.weights)} and {self.lam}")
        for name, value, allowed in (("trim", self.trim, ("tensor", "global")),
                                     ("rescale", self.rescale, ("inverse", "l1", "none")),
                                     ("consensus", self.consensus, ("sum", "count"))):
            if value not in allowed:
                bad.append(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if bad:
            raise ConfigError(f"invalid {self.method} merge: " + "; ".join(bad))

    @property
    def sparsify(self) -> Sparsify | None:
        return METHODS[self.method][0]

    @property
    def elect(self) -> bool:
        return METHODS[self.method][1]

    def with_weights(self, weights: tuple[float, ...], lam: float | None = None) -> MergeSpec:
        """The same recipe with other weights (and optionally another λ)."""
        return replace(self, weights=weights, lam=self.lam if lam is None else lam)


class TensorMerge:
    """Merges the task vectors of N inputs at one tensor, over flat ranges of it.

    Usage: when :attr:`needs_stats`, call :meth:`observe` once per input with its
    full task vector; then call the object on flat ranges (a list of N equally long
    flat slices and the range's start), in any order. The kernel works through
    each range in slices small enough that every operation runs in one thread in
    cache, and never builds a boolean mask: a TIES merge is a handful of fused
    elementwise passes per input (hardshrink, multiply, relu, sign, add).

    Args:
        spec: the resolved recipe.
        name: the tensor's name (seeds DARE's masks).
        numel: number of entries of the full tensor.
        trims: per-input magnitude trims decided elsewhere (the TIES paper's global trimming).
        shape: the tensor's shape (DELLA ranks within rows; default: flat).
    """

    needs_block_stats = False

    def __init__(self, spec: MergeSpec, name: str, numel: int, trims: list[Trim | None] | None = None,
                 shape: tuple[int, ...] | None = None):
        self.spec, self.name, self.numel = spec, name, numel
        try:
            self._della = della_rows(tuple(shape) if shape is not None else (numel,)) \
                if spec.sparsify == "della" else None
        except ValueError as exc:
            raise ConfigError(f"{spec.method} cannot merge {name}: {exc}") from exc
        n = len(spec.weights)
        self._trims: list[list[Trim | None] | None] = [None] * n  # magnitude: [keep]; outliers: [top, top+kept]
        self._scale: list[float | None] = [None] * n
        self._masks: list[MaskStream | None] = [None] * n
        self._given = trims is not None
        if trims is not None:
            self._trims = [[t] for t in trims]
        w = spec.weights
        self._equal_weights = all(x == w[0] for x in w)
        self._tiny = min((abs(x) for x in w if x), default=1.0) * 1e-3  # below any non-empty divisor

    @property
    def align(self) -> int:
        """Flat ranges passed to the merger must start at multiples of this (DELLA: whole row blocks)."""
        return self._della[1] * self._della[2] if self._della is not None else 1

    def observe_block(self, xs: list[torch.Tensor], offset: int) -> None:
        """Task-vector methods take their statistics one input at a time (:meth:`observe`)."""
        raise NotImplementedError("TensorMerge takes statistics through observe()")

    @property
    def needs_stats(self) -> bool:
        """Whether :meth:`observe` must see every input's full task vector first."""
        s, trimming = self.spec, any(d < 1.0 for d in self.spec.density)
        if s.sparsify == "magnitude":
            return trimming and not self._given
        if s.sparsify == "outliers":
            return trimming
        return s.sparsify in ("random", "della") and s.rescale == "l1" and trimming

    def _della_kept(self, index: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        """DELLA's sparsified flat range ``x`` (whole row blocks starting at ``offset``), before L1 rescaling."""
        s = self.spec
        _, cols, per_block = self._della
        first = offset // cols
        out = []
        for start in range(0, x.numel(), cols * per_block):
            rows = x[start:start + cols * per_block].view(-1, cols)  # (R, C)
            mask, probs = della_keep(s.seed, self.name, index, (first + start // cols) // per_block, rows,
                                     s.density[index], s.epsilon[index])
            kept = rows * mask
            out.append((kept / probs if s.rescale == "inverse" else kept).reshape(-1))
        return out[0] if len(out) == 1 else torch.cat(out)

    def observe(self, index: int, delta: torch.Tensor, inplace: bool = False) -> None:
        """Record the statistics of input ``index`` from its full task vector.

        Args:
            index: which input.
            delta: its full task vector at this tensor (any shape).
            inplace: ``delta`` may be overwritten (saves one copy of the tensor).
        """
        s, d = self.spec, self.spec.density[index]
        if d >= 1.0:
            return
        flat = delta.reshape(-1)
        if s.sparsify == "della":  # mergekit's L1 rescaling over the whole tensor
            before = flat.abs().sum()
            after = self._della_kept(index, flat, 0).abs().sum()
            self._scale[index] = None if before < 1e-7 or after < 1e-7 else float(before / after)
            return
        if s.sparsify == "random":  # mergekit's L1 rescaling: ‖τ‖₁ / ‖m ⊙ τ‖₁ over the whole tensor
            before = flat.abs().sum()
            after = (flat * dare_mask(s.seed, self.name, index, flat.numel(), d, flat.dtype)).abs().sum()
            self._scale[index] = None if before < 1e-7 or after < 1e-7 else float(before / after)
            return
        a = flat.abs_() if inplace else flat.abs()  # (n,)
        n = a.numel()
        if s.sparsify == "magnitude":
            self._trims[index] = [top_k_trim(a, max(1, int(d * n)))]
        else:  # outliers: keep ranks [n_top, n_top + kept) of the descending order
            kept = int(d * n)
            n_top = min(int(s.gamma[index] * n), n - kept)
            self._trims[index] = [top_k_trim(a, n_top), top_k_trim(a, n_top + kept)]

    def _della_input(self, index: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        if self.spec.density[index] >= 1.0:
            return x
        kept = self._della_kept(index, x, offset)
        scale = self._scale[index]
        return kept * scale if self.spec.rescale == "l1" and scale is not None else kept

    def _sparsified(self, index: int, x: torch.Tensor, offset: int) -> torch.Tensor:
        s, d = self.spec, self.spec.density[index]
        if s.sparsify is None or s.sparsify == "della" or d >= 1.0:  # DELLA: done per range in __call__
            return x
        if s.sparsify == "random":
            if self._masks[index] is None:
                self._masks[index] = MaskStream(s.seed, self.name, index, d, x.dtype)
            kept = x * self._masks[index].take(offset, x.numel())
            if s.rescale == "inverse":
                return kept / d
            scale = self._scale[index]
            return kept * scale if s.rescale == "l1" and scale is not None else kept
        trims = self._trims[index]
        if trims is None:
            raise RuntimeError(f"TensorMerge({self.name}): observe() was not called for input {index}")
        if s.sparsify == "magnitude":
            return x if trims[0] is None else trims[0].apply(x, offset)
        top, band = trims  # outliers: entries inside the top n_top + kept, minus the top n_top
        inside = x if band is None else band.apply(x, offset)
        return inside if top is None else inside - top.apply(x, offset)

    def __call__(self, deltas: list[torch.Tensor], offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """The merged task vector on flat entries ``[offset, offset + len)`` of the tensor.

        Args:
            deltas: the N inputs' task vectors on that range (any shape, equal sizes).
            offset: the range's first flat entry in the whole tensor.
            out: a flat buffer for the result (default: fresh memory).
        """
        flat = [d.reshape(-1) for d in deltas]
        out = torch.empty_like(flat[0]) if out is None else out
        if self._della is not None:  # rows are ranked whole: sparsify the range first, then combine
            if offset % self.align:
                raise ValueError(f"TensorMerge({self.name}): DELLA ranges start at multiples of {self.align}")
            flat = [self._della_input(i, x, offset) for i, x in enumerate(flat)]
        for start in range(0, out.numel(), SLICE):
            part = [x[start:start + SLICE] for x in flat]
            out[start:start + SLICE] = self._kernel(part, offset + start)
        return out.view(deltas[0].shape) if out.numel() == deltas[0].numel() else out

    def _kernel(self, xs: list[torch.Tensor], offset: int) -> torch.Tensor:
        s = self.spec
        terms = []
        for i, (x, w) in enumerate(zip(xs, s.weights)):
            t = self._sparsified(i, x, offset)
            terms.append(t * w if w != 1.0 else t)
        if not s.elect:
            mixed = terms[0].clone() if len(terms) == 1 else terms[0] + terms[1]
            for t in terms[2:]:
                mixed.add_(t)
            if s.normalize:
                total = torch.tensor(s.weights, dtype=mixed.dtype).sum()  # summed in the work dtype, as mergekit
                mixed.div_(total if total.abs() >= 1e-8 else 1.0)
        else:
            votes = terms[0] if s.consensus == "sum" else terms[0].sign()
            for t in terms[1:]:
                votes = votes + (t if s.consensus == "sum" else t.sign())
            elected = torch.ones_like(votes).copysign_(votes)  # ±1; +1 where the vote is +0
            # An input agrees where sign(t) = elected: t·1[agree] = elected · relu(elected · t), exactly.
            mixed = divisor = None
            for t, w in zip(terms, s.weights):
                kept = (t * elected).relu_()
                agree = kept.sign()  # 1 where it agrees, else 0
                divisor = (agree if w == 1.0 else agree * w) if divisor is None else divisor.add_(agree, alpha=w)
                mixed = kept if mixed is None else mixed.add_(kept)
            mixed.mul_(elected)
            if s.normalize:
                if self._equal_weights and s.weights[0] > 0:  # a divisor is 0 or ≥ w: clamping only the 0s
                    divisor.clamp_min_(self._tiny)
                else:
                    divisor.masked_fill_(divisor == 0, 1.0)
                mixed.div_(divisor)
        if s.lam != 1.0:
            mixed.mul_(s.lam)
        return mixed


def merge_tensor(spec: MergeSpec, name: str, deltas: list[torch.Tensor],
                 trims: list[Trim | None] | None = None) -> torch.Tensor:
    """Merge the full task vectors of N inputs at one tensor, in memory.

    Args:
        spec: the recipe.
        name: the tensor's name (seeds DARE's masks).
        deltas: τ_i, all of one shape.
        trims: per-input magnitude trims for global trimming (see
            :func:`~polymod.merging.sparsify.global_thresholds`).

    Returns:
        The merged task vector τ.
    """
    merger = TensorMerge(spec, name, deltas[0].numel(), trims, shape=tuple(deltas[0].shape))
    if merger.needs_stats:
        for i, d in enumerate(deltas):
            merger.observe(i, d)
    return merger(list(deltas))
