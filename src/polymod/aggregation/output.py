"""Output aggregation and parallel branches: whole host calls, batched into one pass.

* ``Parallel(a, b)`` — one output per branch. The batch is replicated once per
  branch (P·B rows), row block i runs branch i through the per-example engine
  (:meth:`polymod.Modular.route`), and the output is split back into P outputs.
  One host pass, whatever P is.
* ``Mix(candidates, router, aggregate="output")`` — the survey's output
  aggregation (§5.4): the same single pass over the candidates, then a weighted
  ensemble of the final logits, ``Σᵢ wᵢ logitsᵢ`` with weights from a task- or
  example-level router (default uniform: the plain ensemble average).

Both run through ``model(**batch)`` (:meth:`polymod.Modular.forward`); calling
the host directly while one is active raises an error that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polymod.compose import Composition, Mix, Parallel, Stack
from polymod.errors import ConfigError, StateError
from polymod.routing.groups import RowGroups


def branches(expr: Composition) -> list[Composition]:
    """The branches of a Parallel root (a root Stack's prefix is shared by every branch)."""
    if isinstance(expr, Parallel):
        return list(expr.children)
    if isinstance(expr, Stack) and isinstance(expr.children[-1], Parallel):
        return [Stack(*expr.children[:-1], b) for b in expr.children[-1].children]
    raise ConfigError(f"{expr} has no Parallel branches")


def _batch_size(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.shape[0]
    raise StateError("a Parallel or output-ensemble call needs input_ids or inputs_embeds to replicate")


def _repeat(value: Any, copies: int, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))  # (P·B, …)
    return value


def _take(value: Any, i: int, batch: int, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[i * batch : (i + 1) * batch] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, tuple):
        return tuple(_take(v, i, batch, total) for v in value)
    if isinstance(value, dict):
        return type(value)(**{k: _take(v, i, batch, total) for k, v in value.items()})
    return value


def parallel_forward(model: Any, parts: Sequence[Composition], args: Sequence[Any], kwargs: dict[str, Any]) -> tuple:
    """Run the host once over the batch replicated per branch; one output per branch.

    Raises:
        StateError: the call carries a key/value cache (branches cannot share one).
    """
    if kwargs.get("past_key_values") is not None:
        raise StateError("Parallel branches run as one replicated batch and cannot continue a key/value cache; "
                         "call without past_key_values")
    batch, copies = _batch_size(args, kwargs), len(parts)
    rows = [b for b in parts for _ in range(batch)]
    rep_args = [_repeat(a, copies, batch) for a in args]
    rep_kwargs = {k: _repeat(v, copies, batch) for k, v in kwargs.items()}
    state = model.routing
    state.in_root_pass = True
    try:
        with model.route(rows):
            out = model.host(*rep_args, **rep_kwargs)
    finally:
        state.in_root_pass = False
    return tuple(_take(out, i, batch, batch * copies) for i in range(copies))


def _logits(out: Any) -> torch.Tensor:
    value = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(value, torch.Tensor):
        raise StateError(f"output aggregation ensembles logits; the host returned {type(out).__name__} without them")
    return value


def combine(outputs: Sequence[Any], weights: torch.Tensor) -> Any:
    """Σᵢ wᵢ logitsᵢ for outputs of one call and weights (R, E); the first output's type, logits only."""
    stacked = torch.stack([_logits(o) for o in outputs])  # (E, B, …, V)
    w = weights.to(stacked.dtype)  # (R, E), R = 1 or B
    logits = sum(w[:, e].view(-1, *([1] * (stacked.dim() - 2))) * stacked[e] for e in range(stacked.shape[0]))
    first = outputs[0]
    return logits if isinstance(first, torch.Tensor) else type(first)(logits=logits)


def ensemble_forward(model: Any, mix: Mix, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``Mix(..., aggregate="output")``: one replicated pass, then the router-weighted ensemble of logits."""
    outputs = parallel_forward(model, mix.children, args, kwargs)
    reference = _logits(outputs[0])
    w = model.routing.routing(mix.router, None, None, reference[..., :0])
    if isinstance(w, RowGroups):
        w = w.weights(reference.dtype)  # (B, E)
    return combine(outputs, w)


def ensemble(model: Any, candidates: Sequence[Composition], *args: Any, weights: Sequence[float] | None = None,
             **kwargs: Any) -> Any:
    """A weighted ensemble of the logits of several compositions, in one host pass.

    Args:
        model: a :class:`~polymod.Modular`.
        candidates: module names or Stacks of names.
        *args: the host call's positional arguments.
        weights: one weight per candidate (default uniform 1/E).
        **kwargs: the host call's keyword arguments.

    Returns:
        The host output type with ``logits = Σᵢ wᵢ logitsᵢ`` (other fields dropped).
    """
    w = [1.0 / len(candidates)] * len(candidates) if weights is None else list(weights)
    if len(w) != len(candidates):
        raise ConfigError(f"ensemble got {len(w)} weights for {len(candidates)} candidates")
    outputs = parallel_forward(model, candidates, args, kwargs)
    return combine(outputs, torch.tensor([w]))


def run_root(model: Any, expr: Composition, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``Modular.forward`` for compositions acting on the whole call."""
    if isinstance(expr, Mix):
        return ensemble_forward(model, expr, args, kwargs)
    return parallel_forward(model, branches(expr), args, kwargs)
