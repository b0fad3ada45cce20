"""Sparsifying task vectors: exact magnitude trims and DARE's reproducible random masks.

**Magnitude trims** keep exactly the k entries largest in |τ| (TIES, magnitude
pruning; two of them make Breadcrumbs' band). The k-th largest value is found
by selection, not sorting: quantiles of a fixed sample bracket it, one linear
pass keeps the entries above the bracket's lower end, and only those are
ranked. The result is exact whatever the sample. Entries equal to the
threshold are kept by increasing flat index until k are kept, so a trim is
deterministic even with ties (mergekit's argsort leaves that order unspecified).

**DARE masks** are Bernoulli(density) draws from a ``torch.Generator`` seeded
per (seed, tensor name, input, block of 2²⁰ entries). A mask therefore does
not depend on merge order, on the chunks a streaming merge reads, or on the
number of tensors; and the same seed reproduces it bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASK_BLOCK = 1 << 20  # entries per independently seeded block of a DARE mask
SLICE = 32704  # entries per elementwise step: below PyTorch's parallel grain (32768), so ops stay in cache


def mask_seed(seed: int, name: str, index: int, block: int) -> int:
    """The seed of DARE's mask for input ``index`` at tensor ``name``, block ``block``."""
    digest = hashlib.blake2b(f"{seed}:{name}:{index}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class MaskStream:
    """DARE's keep-mask of one input at one tensor, produced for any flat range.

    Consecutive ranges continue the block's generator; any other range re-seeds its
    block and skips ahead, so the values never depend on how the tensor is chunked.
    """

    def __init__(self, seed: int, name: str, index: int, density: float, dtype: torch.dtype = torch.float32):
        self.seed, self.name, self.index, self.density, self.dtype = seed, name, index, density, dtype
        self._state: tuple[int, int, torch.Generator] | None = None  # (block, next flat position, generator)

    def take(self, start: int, length: int) -> torch.Tensor:
        """The mask (0/1 in ``dtype``) for flat entries ``[start, start + length)``."""
        pieces, pos, end = [], start, start + length
        while pos < end:
            block = pos // MASK_BLOCK
            stop = min(end, (block + 1) * MASK_BLOCK)
            if self._state is not None and self._state[:2] == (block, pos):
                gen = self._state[2]
            else:
                gen = torch.Generator().manual_seed(mask_seed(self.seed, self.name, self.index, block))
                if pos > block * MASK_BLOCK:  # skip ahead within the block
                    torch.bernoulli(torch.full((pos - block * MASK_BLOCK,), self.density, dtype=self.dtype),
                                    generator=gen)
            pieces.append(torch.bernoulli(torch.full((stop - pos,), self.density, dtype=self.dtype), generator=gen))
            self._state = (block, stop, gen)
            pos = stop
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def dare_mask(seed: int, name: str, index: int, numel: int, density: float,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat Bernoulli(density) keep-mask DARE draws for input ``index`` at tensor ``name``."""
    return MaskStream(seed, name, index, density, dtype).take(0, numel)


@dataclass(frozen=True)
class Trim:
    """A magnitude trim: keep entries with |x| > ``threshold``, plus the tied entries at ``ties`` (flat indices)."""

    threshold: float
    ties: torch.Tensor | None = None

    def apply(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """The trimmed flat slice ``x`` (entries ``[offset, offset + len(x))`` of the tensor)."""
        out = F.hardshrink(x, self.threshold)  # x where |x| > threshold, else 0
        if self.ties is not None:
            hit = self.ties[(self.ties >= offset) & (self.ties < offset + x.numel())] - offset
            out[hit] = x[hit]
        return out


def kth_largest(a: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The k-th largest value t of flat non-negative ``a``, with #(a > t) and #(a == t), exactly."""
    n = a.numel()
    if n > 1 << 16 and k >= 1024:
        sample = a[torch.randint(n, (1 << 16,), generator=torch.Generator().manual_seed(0))]
        q = 1.0 - k / n
        margin = 4.0 * math.sqrt(max(q * (1 - q), 1e-6) / sample.numel()) + 2.0 / sample.numel()
        m = sample.numel()
        lo = float(sample.kthvalue(max(1, int((q - margin) * m))).values)  # lower end of the bracket
        hi = float(sample.kthvalue(min(m, int((q + margin) * m) + 1)).values)
        above_lo = torch.cat([s[s > lo] for s in a.split(SLICE)])  # (≈ k + margin·n,)
        above_hi = int((above_lo > hi).sum())
        band = above_lo[above_lo <= hi]
        if above_hi < k <= above_hi + band.numel():
            t = band.topk(k - above_hi, sorted=False).values.min()
            return float(t), above_hi + int((band > t).sum()), int((band == t).sum())
    t = a.topk(k, sorted=False).values.min()  # small tensors, or the sample missed
    return float(t), int((a > t).sum()), int((a == t).sum())


def top_k_trim(a: torch.Tensor, k: int) -> Trim | None:
    """The trim keeping exactly the k largest entries of flat non-negative ``a`` (None: keep all)."""
    if k >= a.numel():
        return None
    if k <= 0:
        return Trim(math.inf)
    t, above, tied = kth_largest(a, k)
    if t == 0.0:  # zeros add nothing and carry no sign: dropping them all is the same merge
        return Trim(0.0)
    if k - above == tied:  # keep every tie: a strict threshold just below t
        below = torch.nextafter(torch.tensor(t, dtype=a.dtype), torch.tensor(0.0, dtype=a.dtype))
        return Trim(float(below))
    return Trim(t, torch.nonzero(a == t).view(-1)[: k - above])


def global_thresholds(density: tuple[float, ...], deltas: list[list[torch.Tensor]]) -> list[Trim | None]:
    """Per-input trims over *all* tensors of each input (the TIES paper's trimming).

    Args:
        density: fraction kept per input.
        deltas: for each input, its task vectors at every tensor.

    Returns:
        For each input, a trim keeping |τ| ≥ t where t is its k-th largest magnitude over
        the whole module (ties at t are all kept, as in the paper's code), or None (density 1).
    """
    out: list[Trim | None] = []
    for tensors, d in zip(deltas, density):
        if d >= 1.0:
            out.append(None)
            continue
        a = torch.cat([t.detach().abs().reshape(-1) for t in tensors])  # (n_total,)
        t, _, _ = kth_largest(a, max(1, int(d * a.numel())))
        below = torch.nextafter(torch.tensor(t, dtype=a.dtype), torch.tensor(0.0, dtype=a.dtype))
        out.append(Trim(float(below)) if t > 0 else Trim(0.0))
    return out


def della_rows(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """DELLA's view of a tensor: (rows, row length, rows per mask block).

    DELLA ranks the magnitudes within each row (a 1-D tensor is one row); its masks are
    drawn per block of whole rows (about 2²⁰ entries), each block from its own seeded
    generator, so a streaming merge reads whole row blocks.
    """
    if len(shape) > 2:
        raise ValueError(f"DELLA ranks entries within rows of 1-D or 2-D tensors; got shape {list(shape)}")
    rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[1])
    return rows, cols, max(1, MASK_BLOCK // max(cols, 1))


def della_keep(seed: int, name: str, index: int, block: int, rows: torch.Tensor, density: float,
               epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DELLA's MagPrune keep-mask for one block of rows (Deep et al. 2024, arXiv 2406.11617).

    Within each row the entry of rank r (1 = smallest |τ|) of C is kept with probability
    p = density − ε + 2ε (r − 1)/(C − 1): large entries are kept more often, and the
    mean keep probability is ``density``. Ranks break ties by position (a stable sort).

    Args:
        seed: the merge's seed, as for DARE's masks.
        name: the tensor's name, as for DARE's masks.
        index: the input's index, as for DARE's masks.
        block: numbers the row block.
        rows: the block's task-vector rows, (R, C).
        density: the mean keep probability.
        epsilon: the spread of keep probabilities around ``density``.

    Returns:
        (mask, probabilities), both (R, C) in ``rows``' dtype.
    """
    magnitudes = rows.abs()
    order = torch.argsort(magnitudes, dim=1, stable=True)  # (R, C)
    ranks = torch.empty_like(magnitudes).scatter_(
        1, order, torch.arange(1, rows.shape[1] + 1, dtype=rows.dtype).expand_as(order).contiguous())
    low, high = 1.0, float(rows.shape[1])
    spread = ((ranks - low) / (high - low)).clamp(0, 1) if high > low else torch.zeros_like(ranks)
    probs = (density - epsilon) + spread * 2 * epsilon
    gen = torch.Generator().manual_seed(mask_seed(seed, name, index, block))
    return torch.bernoulli(probs, generator=gen), probs
