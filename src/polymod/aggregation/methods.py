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
* **sign election** m_i (TIES, Yadav et al. 2023, arXiv 2306.01708): the
  majority sign per entry is that of Σ_i w_i s_i(τ_i) (``consensus="sum"``) or
  of the count of signs (``"count"``); only agreeing entries are kept;
* **normalisation**: D = Σ_i w_i m_i (the disjoint mean of TIES, weighted as in
  mergekit; with unit weights it is the paper's mean over agreeing entries).

Defaults follow mergekit's per-method defaults so that a recipe means the same
thing in both tools: ``normalize`` is on for TIES only.

The work is split so that whole checkpoints can be merged in bounded memory:
:meth:`TensorMerge.observe` sees one input's full task vector at a time and
keeps only small statistics (magnitude thresholds, L1 norms), then
:meth:`TensorMerge.__call__` combines consecutive *chunks* (row blocks) of all
inputs elementwise. Chunking never changes a bit of the result: the kernel is
elementwise, sums run in a fixed order, and the random masks come from a
generator per (seed, tensor name, input) whose draws do not depend on chunk
sizes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from polymod.errors import ConfigError

MethodName = Literal[
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs",
    "breadcrumbs_ties",
]
Sparsify = Literal["magnitude", "random", "outliers"]

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
}


@dataclass(frozen=True)
class MergeSpec:
    """A fully resolved merge recipe for N inputs.

    Args:
        method: one of :data:`METHODS`.
        weights: w_i, one per input (negative weights subtract: task negation).
        density: fraction kept by sparsification, one per input, in (0, 1].
        gamma: Breadcrumbs' fraction of largest entries dropped, one per input, in [0, 1).
        lam: λ, scaling of the merged task vector (task arithmetic).
        normalize: divide by Σ w_i m_i (None: the method's default).
        trim: ``tensor`` — TIES/magnitude trimming per tensor (mergekit, PEFT); ``global`` —
            one threshold per input over all its tensors (the TIES paper's code). Global
            thresholds are computed by the caller and passed to :class:`TensorMerge`.
        rescale: DARE's rescaling: ``inverse`` (×1/density, paper and PEFT), ``l1`` (match the
            L1 norm of τ_i, mergekit 0.1.5's ``rescale: true``) or ``none``.
        consensus: TIES sign election by ``sum`` of values (paper) or ``count`` of signs.
        seed: seed of DARE's random masks.
    """

    method: str
    weights: tuple[float, ...]
    density: tuple[float, ...] = ()
    gamma: tuple[float, ...] = ()
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
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        object.__setattr__(self, "density", tuple(float(d) for d in self.density) or (1.0,) * n)
        object.__setattr__(self, "gamma", tuple(float(g) for g in self.gamma) or (0.01,) * n)
        if self.normalize is None:
            object.__setattr__(self, "normalize", METHODS[self.method][2])
        bad = []
        for name, values in (("density", self.density), ("gamma", self.gamma)):
            if len(values) != n:
                bad.append(f"{name} has {len(values)} values for {n} inputs")
        if any(not 0.0 < d <= 1.0 for d in self.density):
            bad.append(f"density must be in (0, 1], got {list(self.density)}")
        if any(not 0.0 <= g < 1.0 for g in self.gamma):
            bad.append(f"gamma must be in [0, 1), got {list(self.gamma)}")
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


def mask_seed(seed: int, name: str, index: int) -> int:
    """The seed of DARE's mask for input ``index`` at tensor ``name``: independent of merge order."""
    digest = hashlib.blake2b(f"{seed}:{name}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_mask(seed: int, name: str, index: int, shape: tuple[int, ...], density: float,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Bernoulli(density) keep-mask DARE draws for input ``index`` at tensor ``name``."""
    gen = torch.Generator().manual_seed(mask_seed(seed, name, index))
    return torch.bernoulli(torch.full(shape, density, dtype=dtype), generator=gen)


def kth_largest(a: torch.Tensor, k: int) -> float:
    """The k-th largest value of a flat non-negative tensor, exactly.

    Large tensors are bracketed with quantiles of a fixed sample and only the
    entries inside the bracket are ranked (a few linear passes instead of a
    full top-k); the sample only affects speed, never the value.
    """
    n = a.numel()
    if n <= 1 << 20 or k < 1024:
        return float(torch.topk(a, k, sorted=False).values.min())
    sample = a[torch.randint(n, (1 << 16,), generator=torch.Generator().manual_seed(0))]
    q = 1.0 - k / n
    margin = 4.0 * math.sqrt(max(q * (1 - q), 1e-6) / sample.numel()) + 2.0 / sample.numel()
    lo, hi = torch.quantile(sample, torch.tensor([max(q - margin, 0.0), min(q + margin, 1.0)], dtype=a.dtype)).tolist()
    above_hi = int((a > hi).sum())
    inside = (a > lo) & (a <= hi)
    n_inside = int(inside.sum())
    if not above_hi < k <= above_hi + n_inside:  # the sample missed: rank everything
        return float(torch.topk(a, k, sorted=False).values.min())
    band = a[inside]  # (n_inside,)
    return float(torch.topk(band, k - above_hi, sorted=False).values.min())


@dataclass
class _Keep:
    """Which entries of one input a magnitude trim keeps: |τ| > t, plus tied entries by index."""

    threshold: float
    ties: torch.Tensor | None = None  # flat indices of entries equal to the threshold that are kept
    inclusive: bool = False  # keep every entry equal to the threshold

    def mask(self, a: torch.Tensor, offset: int) -> torch.Tensor:
        keep = a >= self.threshold if self.inclusive else a > self.threshold
        if self.ties is not None and self.ties.numel():
            n = a.numel()
            local = self.ties[(self.ties >= offset) & (self.ties < offset + n)] - offset
            keep.view(-1)[local] = True
        return keep


def top_k_keep(a: torch.Tensor, k: int) -> _Keep:
    """Keep exactly the k largest entries of flat non-negative ``a`` (ties broken by index)."""
    if k <= 0:
        return _Keep(math.inf)
    if k >= a.numel():
        return _Keep(-1.0)
    t = kth_largest(a, k)
    if t == 0.0:  # keeping zeros changes nothing: they add 0 and carry no sign
        return _Keep(0.0)
    quota = k - int((a > t).sum())
    tied = int((a == t).sum())
    if quota == tied:
        return _Keep(t, inclusive=True)
    return _Keep(t, ties=torch.nonzero(a == t).view(-1)[:quota])


class TensorMerge:
    """Merges the task vectors of N inputs at one tensor, in chunks.

    Usage: call :meth:`observe` once per input with its full task vector when
    :attr:`needs_stats` is true, then call the object on consecutive row chunks
    (each a list of N chunks of the task vectors), in order.

    Args:
        spec: the resolved recipe.
        name: the tensor's name (seeds DARE's masks).
        numel: number of entries of the full tensor.
        thresholds: per-input magnitude thresholds for ``trim="global"`` (entries ≥ threshold kept).
    """

    def __init__(self, spec: MergeSpec, name: str, numel: int, thresholds: list[float] | None = None):
        self.spec, self.name, self.numel = spec, name, numel
        n = len(spec.weights)
        self._keep: list[list[_Keep] | None] = [None] * n  # magnitude: [keep]; outliers: [top, top+kept]
        self._scale: list[float | None] = [None] * n
        self._gens: list[torch.Generator | None] = [None] * n
        self._offset = 0
        if thresholds is not None:
            self._keep = [[_Keep(t, inclusive=True)] for t in thresholds]

    @property
    def needs_stats(self) -> bool:
        """Whether :meth:`observe` must see every input's full task vector first."""
        s = self.spec
        if s.sparsify == "magnitude":
            return self._keep[0] is None and any(d < 1.0 for d in s.density)
        if s.sparsify == "outliers":
            return any(d < 1.0 for d in s.density)
        return s.sparsify == "random" and s.rescale == "l1" and any(d < 1.0 for d in s.density)

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
        if s.sparsify == "random":  # mergekit's L1 rescaling: ‖τ‖₁ / ‖m ⊙ τ‖₁ over the whole tensor
            before = delta.abs().sum()
            after = (delta * dare_mask(s.seed, self.name, index, tuple(delta.shape), d, delta.dtype)).abs().sum()
            self._scale[index] = None if before < 1e-7 or after < 1e-7 else float(before / after)
            return
        a = (delta.abs_() if inplace else delta.abs()).view(-1)  # (n,)
        n = a.numel()
        if s.sparsify == "magnitude":
            self._keep[index] = [top_k_keep(a, max(1, int(d * n)))]
        else:  # outliers: keep ranks [n_top, n_top + kept) of the descending order
            kept = int(d * n)
            n_top = min(int(s.gamma[index] * n), n - kept)
            self._keep[index] = [top_k_keep(a, n_top), top_k_keep(a, n_top + kept)]

    def _sparsified(self, index: int, delta: torch.Tensor) -> torch.Tensor:
        s, d = self.spec, self.spec.density[index]
        if s.sparsify is None or d >= 1.0:
            return delta
        if s.sparsify == "random":
            if self._gens[index] is None:
                self._gens[index] = torch.Generator().manual_seed(mask_seed(s.seed, self.name, index))
            mask = torch.bernoulli(torch.full_like(delta, d), generator=self._gens[index])
            kept = delta * mask
            if s.rescale == "inverse":
                return kept / d
            scale = self._scale[index]
            return kept * scale if s.rescale == "l1" and scale is not None else kept
        keep = self._keep[index]
        if keep is None:
            raise RuntimeError(f"TensorMerge({self.name}): observe() was not called for input {index}")
        a = delta.abs()
        mask = keep[0].mask(a, self._offset)
        if s.sparsify == "outliers":
            mask = keep[1].mask(a, self._offset) & ~mask
        return delta * mask

    def __call__(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The merged task vector on one chunk (same shape as each input chunk)."""
        s = self.spec
        terms = [self._sparsified(i, d) * w for i, (d, w) in enumerate(zip(deltas, s.weights))]
        self._offset += deltas[0].numel()
        if s.elect:
            votes = terms[0] if s.consensus == "sum" else terms[0].sign()
            for t in terms[1:]:
                votes = votes + (t if s.consensus == "sum" else t.sign())
            positive = votes >= 0
            mixed = divisor = None
            for t, w in zip(terms, s.weights):
                agree = torch.where(positive, t > 0, t < 0)  # sign(t) equals the elected sign
                mixed = t * agree if mixed is None else mixed + t * agree
                divisor = w * agree if divisor is None else divisor + w * agree
            divisor[divisor == 0] = 1
        else:
            mixed = terms[0]
            for t in terms[1:]:
                mixed = mixed + t
            divisor = torch.tensor(s.weights, dtype=mixed.dtype).sum()  # summed in the work dtype, as mergekit
            if divisor.abs() < 1e-8:
                divisor = torch.ones((), dtype=mixed.dtype)
        if s.normalize:
            mixed = mixed / divisor
        if s.lam != 1.0:
            mixed = mixed * s.lam
        return mixed


def merge_tensor(spec: MergeSpec, name: str, deltas: list[torch.Tensor],
                 thresholds: list[float] | None = None) -> torch.Tensor:
    """Merge the full task vectors of N inputs at one tensor (in memory, one chunk).

    Args:
        spec: the recipe.
        name: the tensor's name (seeds DARE's masks).
        deltas: τ_i, all of one shape.
        thresholds: per-input magnitude thresholds for global trimming.

    Returns:
        The merged task vector τ.
    """
    merger = TensorMerge(spec, name, deltas[0].numel(), thresholds)
    if merger.needs_stats:
        for i, d in enumerate(deltas):
            merger.observe(i, d)
    return merger(list(deltas))


def global_thresholds(spec: MergeSpec, deltas: list[list[torch.Tensor]]) -> list[float]:
    """Per-input magnitude thresholds over *all* tensors of each input (the TIES paper's trimming).

    Args:
        spec: the recipe (its ``density`` per input).
        deltas: for each input, its task vectors at every tensor.

    Returns:
        For each input, the value t such that keeping |τ| ≥ t keeps its top ``density``
        fraction over the whole module (ties at t are kept, as in the paper's code).
    """
    out = []
    for tensors, d in zip(deltas, spec.density):
        a = torch.cat([t.detach().abs().reshape(-1) for t in tensors])  # (n_total,)
        out.append(kth_largest(a, max(1, int(d * a.numel()))) if d < 1.0 else -1.0)
    return out
