"""Output aggregation: a weighted ensemble of the host's final outputs.

``Mix(candidates, router, aggregate="output")`` is the survey's output
aggregation (§5.4): every candidate runs on the batch — in one host pass, the
batch replicated once per candidate and each copy routed to its candidate (see
:mod:`polymod.rows`) — and the final logits are combined as ``Σᵢ wᵢ logitsᵢ``
with weights from a task- or example-level router (default uniform: the plain
ensemble average). It acts on the whole host call, so it must be the root of
the composition and runs through ``model(**batch)``; calling the host directly
while it is active raises an error that says so.

``Parallel(a, b)`` (one output per branch) runs through the same replicated
pass; it is a composition node, not an aggregator: :func:`branches` lists what
it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from polymod.aggregation.base import Env, SiteOp, head_routing_refusal, labels
from polymod.compose import Composition, Mix, Parallel, Stack
from polymod.errors import ConfigError, StateError
from polymod.modules.contract import Module


class Output:
    """``output``: an ensemble of whole-call outputs (see the module docstring)."""

    name: ClassVar[str] = "output"
    whole_call: ClassVar[bool] = True

    def check(self, mix: Mix, modules: Sequence[Module], root: bool) -> str | None:
        """Refuse a Mix that is not the root, routers that read hidden states, and nested Mixes."""
        if not root:
            return ("aggregate='output' ensembles the host's final outputs, so the Mix must be the root of the "
                    "composition")
        router = mix.router
        if router.reads_hidden or router.local or router.level == "token":
            return (f"aggregate='output' weighs whole host outputs, so it needs a task- or example-level router "
                    f"that reads no hidden state (Static, TaskRouter, ExampleRouter); got {router}")
        if any(isinstance(c, Mix) for c in mix.children):
            return "aggregate='output' candidates must be module names or Stacks of names"
        return head_routing_refusal(mix, allowed=False)

    def compile(self, mix: Mix, env: Env) -> dict[str, SiteOp]:
        """No site op: the router is registered to weigh whole outputs."""
        env.routing.register(mix.router, labels(mix), [], None)
        return {}


def branches(expr: Composition) -> list[Composition]:
    """The branches of a Parallel root (a root Stack's prefix is shared by every branch).

    Raises:
        ConfigError: ``expr`` has no Parallel branches.
    """
    if isinstance(expr, Parallel):
        return list(expr.children)
    if isinstance(expr, Stack) and isinstance(expr.children[-1], Parallel):
        return [Stack(*expr.children[:-1], b) for b in expr.children[-1].children]
    raise ConfigError(f"{expr} has no Parallel branches")


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a host output (a tensor, or an output object with ``logits``).

    Raises:
        StateError: the output carries no logits.
    """
    value = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(value, torch.Tensor):
        raise StateError(f"output aggregation ensembles logits; the host returned {type(out).__name__} without them")
    return value


def combine(outputs: Sequence[Any], weights: torch.Tensor) -> Any:
    """Σᵢ wᵢ logitsᵢ for outputs of one call and weights (R, E); the first output's type, logits only."""
    stacked = torch.stack([logits_of(o) for o in outputs])  # (E, B, …, V)
    w = weights.to(stacked.dtype)  # (R, E), R = 1 or B
    logits = sum(w[:, e].view(-1, *([1] * (stacked.dim() - 2))) * stacked[e] for e in range(stacked.shape[0]))
    first = outputs[0]
    return logits if isinstance(first, torch.Tensor) else type(first)(logits=logits)
