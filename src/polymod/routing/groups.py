"""Row groups: a one-hot per-example assignment, grouped once per forward.

When every row of a batch uses (at most) one candidate, the engine does not
need dense weights: it needs, once, which candidate each row uses and which
rows each candidate serves. :class:`RowGroups` holds exactly that and every
site of the forward reuses it — the batched mixers gather per-row weights with
``index`` (gather + batched matmul), the generic mixer runs each active
candidate once on its rows (a loop over candidates, never over rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from polymod.errors import StateError


@dataclass
class RowGroups:
    """Which candidate each row uses (``-1``: none, the host alone).

    Attributes:
        index: (B,) candidate per row, on the host's device.
        active: candidates used by at least one row, ascending.
        rows: for each active candidate, its rows (LongTensor on the device).
        none_rows: rows that use no candidate (empty tensor when all rows have one).
        num: E, the number of candidates.
    """

    index: torch.Tensor
    active: list[int]
    rows: list[torch.Tensor]
    none_rows: torch.Tensor
    num: int
    _derived: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_list(cls, assignment: Sequence[int], num: int, device: torch.device | str | None = None) -> RowGroups:
        """Build from a Python list of candidate indices (``-1`` for none) without device syncs."""
        by: dict[int, list[int]] = {}
        for row, c in enumerate(assignment):
            by.setdefault(int(c), []).append(row)
        active = sorted(c for c in by if c >= 0)
        index = torch.tensor(list(assignment), dtype=torch.long, device=device)
        rows = [torch.tensor(by[c], dtype=torch.long, device=device) for c in active]
        none = torch.tensor(by.get(-1, []), dtype=torch.long, device=device)
        return cls(index, active, rows, none, num)

    @classmethod
    def from_index(cls, index: torch.Tensor, num: int) -> RowGroups:
        """Build from a (B,) index tensor (one host synchronisation to list the active candidates)."""
        return cls.from_list(index.tolist(), num, index.device)

    @property
    def size(self) -> int:
        """B, the number of rows."""
        return self.index.numel()

    @property
    def single(self) -> int | None:
        """The candidate every row uses, when there is exactly one and no row is host-only."""
        if len(self.active) == 1 and self.none_rows.numel() == 0:
            return self.active[0]
        return None

    def weights(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense one-hot weights (B, E) (zero rows for host-only rows)."""
        key = ("w", dtype)
        if key not in self._derived:
            w = torch.zeros(self.size, self.num, dtype=dtype, device=self.index.device)  # (B, E)
            on = self.index >= 0
            w[on, self.index[on]] = 1.0
            self._derived[key] = w
        return self._derived[key]

    def padded_index(self) -> torch.Tensor:
        """``index`` with host-only rows pointing at an extra zero slot E (for gathers)."""
        if "pad" not in self._derived:
            self._derived["pad"] = torch.where(self.index >= 0, self.index, torch.full_like(self.index, self.num))
        return self._derived["pad"]

    def grouped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
        """The rows laid out per active candidate, for grouped batched matmuls (cached).

        Returns:
            ``slots`` (A·m,): the row in each of m slots of the A active candidates
            (B: an appended zero row pads short groups and serves host-only rows);
            ``where`` (B,): each row's slot; ``active`` (A,) as a tensor; m; and
            whether any slot is padding.
        """
        if "grouped" not in self._derived:
            assignment = self.index.tolist()
            members: dict[int, list[int]] = {c: [] for c in self.active}
            for row, c in enumerate(assignment):
                if c >= 0:
                    members[c].append(row)
            rows = len(assignment)
            width = max((len(m) for m in members.values()), default=0) + (1 if self.none_rows.numel() else 0)
            slots, where, spare = [], [0] * rows, None
            for i, c in enumerate(self.active):
                for j, row in enumerate(members[c]):
                    where[row] = i * width + j
                if spare is None and len(members[c]) < width:
                    spare = i * width + len(members[c])  # a padded slot computes a zero row
                slots += members[c] + [rows] * (width - len(members[c]))
            for row, c in enumerate(assignment):
                if c < 0:
                    where[row] = spare
            device = self.index.device
            self._derived["grouped"] = (torch.tensor(slots, dtype=torch.long, device=device),
                                        torch.tensor(where, dtype=torch.long, device=device),
                                        torch.tensor(self.active, dtype=torch.long, device=device),
                                        width, rows in slots)
        return self._derived["grouped"]

    def restrict(self, present: tuple[int, ...]) -> RowGroups:
        """The same assignment over a subset of candidates (others become host-only), cached."""
        if present == tuple(range(self.num)):
            return self
        key = ("restrict", present)
        if key not in self._derived:
            remap = {c: i for i, c in enumerate(present)}
            self._derived[key] = RowGroups.from_list(
                [remap.get(c, -1) for c in self.index.tolist()], len(present), self.index.device
            )
        return self._derived[key]

    def check_rows(self, rows: int, where: str) -> None:
        """Raise a clear error when the forward's batch does not match the routed rows."""
        if rows != self.size:
            raise StateError(
                f"per-example routing was given {self.size} rows but {where} runs on a batch of {rows}; "
                "give one entry per row of the batch (with beam search or sampling several sequences, "
                "repeat each row's entry accordingly)"
            )
