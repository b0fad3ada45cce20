"""LoraHub: gradient-free search for the weights that combine N modules on a few examples.

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic
LoRA Composition" (arXiv 2307.13269). Given N upstream LoRA modules and a
handful of labelled examples of a new task, find weights w ∈ [lo, hi]^N
minimising

    L(m(w)) + α · Σ_i |w_i|,      m(w) = A/B-wise merge: (Σ w_i A_i, Σ w_i B_i)

with CMA-ES (Hansen's ``cma`` package), a derivative-free evolution strategy:
only forward passes are needed, no gradients. Defaults follow the paper's
code: weights start at 0, bounds [−1.5, 1.5], α = 0.05, 40 evaluations.
(The paper's code calls nevergrad's default optimiser; the paper describes
CMA-ES, which is what runs here.)

The loss is any callable of a candidate merged module, so it can attach the
module, run a few batches and return the loss; :func:`few_shot_loss` builds
that for a :class:`~polymod.modular.Modular` and batches with labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from polymod.errors import ConfigError
from polymod.merging.merge import merge
from polymod.modular import Modular
from polymod.modules.contract import Module
from polymod.modules.lora import is_plain


def lorahub(modules: Sequence[Module] | Mapping[str, Module], loss: Callable[[Module], float], *,
            budget: int = 40, l1: float = 0.05, bounds: tuple[float, float] = (-1.5, 1.5),
            sigma0: float | None = None, seed: int = 0, lora: str = "ab", name: str | None = None) -> Module:
    """Search combination weights with CMA-ES and return the merged module.

    Args:
        modules: the upstream modules (at least 2), a list or ``{name: module}``.
        loss: maps a candidate merged module to its loss on the few examples (lower is better).
        budget: the maximum number of loss evaluations.
        l1: α, the L1 penalty on the weights.
        bounds: the box the weights are searched in.
        sigma0: CMA-ES's initial step size (default a quarter of the box width).
        seed: seed of the search (CMA-ES's sampling).
        lora: LoRA merge semantics of the candidates (``ab`` as in the paper, ``cat`` or ``delta``).
        name: the merged module's card name.

    Returns:
        The module merged with the best weights found; its lineage records those weights, the
        best objective and loss, the evaluations used, the budget, bounds, α and seed.

    Raises:
        ConfigError: fewer than 2 modules, a budget below 1, or empty bounds.
    """
    import cma  # a maintained CMA-ES implementation (Hansen et al.)

    n = len(modules)
    lo, hi = (float(b) for b in bounds)
    if n < 2:
        raise ConfigError(f"lorahub searches weights over at least 2 modules, got {n}")
    if not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"lorahub budget must be a positive number of evaluations, got {budget!r}")
    if not lo < hi:
        raise ConfigError(f"lorahub bounds must be (low, high) with low < high, got {bounds!r}")

    def build(w: Sequence[float]) -> Module:
        return merge(modules, "linear", [float(x) for x in w], lora=lora if _all_lora(modules) else None,
                     name=name)

    trace: list[tuple[float, float, list[float]]] = []  # (objective, loss, weights)

    def objective(w: np.ndarray) -> float:
        value = float(loss(build(w)))
        trace.append((value + l1 * float(np.abs(w).sum()), value, [float(x) for x in w]))
        return trace[-1][0]

    options = {"bounds": [lo, hi], "seed": seed + 1, "verbose": -9}  # cma reads seed 0 as "from the clock"
    x0 = np.clip(np.zeros(n), lo, hi)
    es = cma.CMAEvolutionStrategy(x0, sigma0 if sigma0 is not None else (hi - lo) / 4, options)
    while len(trace) < budget and not es.stop():
        candidates = es.ask()
        values = [objective(np.asarray(x)) for x in candidates[: budget - len(trace)]]
        if len(values) < len(candidates):  # budget spent mid-generation
            break
        es.tell(candidates, values)
    best_objective, best_loss, best = min(trace, key=lambda t: t[0])
    module = build(best)
    module.card.lineage.recipe.update({
        "search": "lorahub", "optimizer": f"cma-es (cma {cma.__version__})", "budget": budget,
        "evaluations": len(trace), "l1": l1, "bounds": [lo, hi], "search_seed": seed,
        "objective": best_objective, "loss": best_loss,
    })
    module.card.description = module.card.lineage.describe()
    return module


def _all_lora(modules: Sequence[Module] | Mapping[str, Module]) -> bool:
    values = modules.values() if isinstance(modules, Mapping) else modules
    return all(isinstance(m, Module) and is_plain(m) for m in values)


def few_shot_loss(model: Modular, batches: Iterable[dict[str, torch.Tensor]],
                  loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None
                  ) -> Callable[[Module], float]:
    """A LoraHub loss: attach the candidate to ``model``, average the loss over ``batches``, detach it.

    Args:
        model: a :class:`~polymod.modular.Modular` whose host the modules were made for.
        batches: the few labelled examples, as keyword batches of the host's forward.
        loss_fn: ``loss_fn(outputs, batch)``; default the host's own ``outputs.loss`` (batches
            carry ``labels``).

    Returns:
        A callable for :func:`lorahub`'s ``loss``; the model's active composition is restored
        after each call.
    """
    batches = list(batches)

    def evaluate(candidate: Module) -> float:
        previous, tmp = model.active, "lorahub-candidate"
        model.add(tmp, candidate)
        try:
            model.use(tmp)
            total = 0.0
            with torch.no_grad():
                for batch in batches:
                    out = model.host(**batch)
                    total += float(loss_fn(out, batch) if loss_fn is not None else out.loss)
            return total / max(len(batches), 1)
        finally:
            model.use(previous)
            model.remove(tmp)

    return evaluate
