"""Fixed routing: the decision is given, not learned (survey §4.2.1).

* :class:`Static` — the same weights for every input (default of ``Mix``:
  uniform 1/E, i.e. representation averaging);
* :class:`TaskRouter` — one candidate per task id (multi-task learning with
  task-specific modules; MAD-X's language/task selection);
* :class:`ExampleRouter` — explicit candidate names per example;
* :class:`SpanRouter` — candidates per token span (e.g. code-switched text, a
  prompt and a response handled by different modules).

All are global: computed once per host forward from what ``model.route(...)``
supplies, and reused by every site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from polymod.errors import CompositionError, ConfigError, StateError
from polymod.routing.base import Router, RoutingInputs, register_router
from polymod.routing.groups import RowGroups


@register_router
class Static(Router):
    """Constant weights over the candidates: w = ``weights`` (default uniform 1/E).

    Args:
        weights: one non-negative weight per candidate, or None for 1/E each.
    """

    name = "static"

    def __init__(self, weights: Sequence[float] | None = None):
        super().__init__("task")
        if weights is not None and (not weights or any(not float(v) >= 0 for v in weights)):
            raise ConfigError(f"Static weights must be non-negative numbers, got {weights!r}")
        self.fixed = None if weights is None else [float(v) for v in weights]

    def check_candidates(self, candidates: list[str]) -> None:
        if self.fixed is not None and len(self.fixed) != len(candidates):
            raise CompositionError(
                f"Static has {len(self.fixed)} weights but the Mix has {len(candidates)} candidates {candidates}"
            )

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        w = self.fixed if self.fixed is not None else [1.0 / self.num] * self.num
        out = torch.tensor([w], dtype=y.dtype, device=y.device)  # (1, E)
        self.stats.update(out)
        return out

    def config(self) -> dict[str, Any]:
        return {"weights": self.fixed}


@register_router
class TaskRouter(Router):
    """One candidate per task id, from ``model.route(task=...)``.

    Args:
        table: candidate name (or None for the host alone) per task id, as a list
            indexed by task id or a mapping ``{task_id: name}``.
    """

    name = "task"

    def __init__(self, table: Sequence[str | None] | Mapping[int, str | None]):
        super().__init__("task")
        if isinstance(table, Mapping):
            table = {int(k): v for k, v in table.items()}
            table = [table.get(i) for i in range(max(table) + 1)] if table else []
        if isinstance(table, str) or not table:
            raise ConfigError(f"TaskRouter takes a non-empty list (or dict) of candidate names, got {table!r}")
        self.table = list(table)

    def check_candidates(self, candidates: list[str]) -> None:
        missing = [n for n in self.table if n is not None and n not in candidates]
        if missing:
            raise CompositionError(f"TaskRouter maps tasks to {missing}, which are not candidates of the Mix "
                                   f"{candidates}")

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> RowGroups:
        if inputs.task is None:
            raise StateError("TaskRouter needs task ids: run the host inside `with model.route(task=ids):`")
        ids = inputs.task.tolist()
        if any(not 0 <= t < len(self.table) for t in ids):
            raise StateError(f"task ids {ids} outside the TaskRouter table of {len(self.table)} tasks")
        pos = {n: i for i, n in enumerate(self.candidates)}
        choice = [pos[self.table[t]] if self.table[t] is not None else -1 for t in ids]
        if len(choice) == 1:
            choice = choice * y.shape[0]
        groups = RowGroups.from_list(choice, self.num, y.device)
        self.stats.update(groups.weights(y.dtype))
        return groups

    def cache_key(self, inputs: RoutingInputs, y: torch.Tensor) -> Any:
        return y.shape[0]

    def config(self) -> dict[str, Any]:
        return {"table": self.table}


@register_router
class ExampleRouter(Router):
    """Explicit candidate names per example, from ``model.route(names=[...])`` (None: host only)."""

    name = "example"

    def __init__(self) -> None:
        super().__init__("example")

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> RowGroups:
        if inputs.names is None:
            raise StateError("ExampleRouter needs names per example: run the host inside "
                             "`with model.route(names=[...]):`")
        pos = {n: i for i, n in enumerate(self.candidates)}
        bad = [n for n in inputs.names if n is not None and n not in pos]
        if bad:
            raise StateError(f"route(names=...) names {bad}, which are not candidates of the Mix {self.candidates}")
        groups = RowGroups.from_list([pos[n] if n is not None else -1 for n in inputs.names], self.num, y.device)
        self.stats.update(groups.weights(y.dtype))
        return groups

    def config(self) -> dict[str, Any]:
        return {}


@register_router
class SpanRouter(Router):
    """Candidates per token span, from ``model.route(spans=...)``.

    ``spans`` holds, per row, a list of ``(start, end, name)`` over token
    positions ``start ≤ t < end`` of the sequence each site sees; tokens outside
    every span use ``default`` (None: the host alone). Spans address positions of
    a full forward; in cached decoding each step sees one position.

    Args:
        default: candidate for tokens outside every span, or None.
    """

    name = "span"

    def __init__(self, default: str | None = None):
        super().__init__("token")
        self.default = default

    def check_candidates(self, candidates: list[str]) -> None:
        if self.default is not None and self.default not in candidates:
            raise CompositionError(f"SpanRouter default {self.default!r} is not a candidate of the Mix {candidates}")

    def weights(self, inputs: RoutingInputs, site: str | None, x: Any, y: torch.Tensor,
                outputs: Any = None) -> torch.Tensor:
        if inputs.spans is None:
            raise StateError("SpanRouter needs token spans: run the host inside `with model.route(spans=[...]):`")
        if y.dim() < 3 or len(inputs.spans) != y.shape[0]:
            raise StateError(f"route(spans=...) has {len(inputs.spans)} rows; the site output has shape "
                             f"{tuple(y.shape)}")
        rows, length = y.shape[0], y.shape[1]
        pos = {n: i for i, n in enumerate(self.candidates)}
        choice = torch.full((rows, length), pos.get(self.default, -1), dtype=torch.long)  # (B, T)
        for b, row in enumerate(inputs.spans):
            for start, end, name in row:
                if name is not None and name not in pos:
                    raise StateError(f"span {(start, end, name)} names a module that is not a candidate "
                                     f"{self.candidates}")
                choice[b, start:end] = pos[name] if name is not None else -1
        w = torch.zeros(rows, length, self.num + 1, dtype=y.dtype)  # (B, T, E+1); slot E: host only
        w.scatter_(-1, torch.where(choice < 0, self.num, choice).unsqueeze(-1), 1.0)
        w = w[..., : self.num].to(y.device)  # (B, T, E)
        self.stats.update(w)
        return w

    def config(self) -> dict[str, Any]:
        return {"default": self.default}
