"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell et al., 2022, arXiv 2110.07560).

Two phases make a sparse fine-tuning module (:class:`~polymod.modules.sparse.SparseFT`):

1. fine-tune the selected host weights fully for a few steps, θ₀ → θ₁;
2. keep the K entries with the largest |θ₁ − θ₀| — per tensor (each site keeps
   its ``density`` share) or globally (one ranking over every site) — reset the
   host to θ₀, and train a sparse diff on those entries only.

The host ends exactly as it started (phase 1 is undone bit for bit, phase 2
trains through hooks that are removed afterwards); the result is a module to
``add``, ``merge_into_host``, ``save`` or aggregate like any other.

:func:`lt_sft` runs both phases as a short self-contained loop (AdamW, fixed
steps, cycling over the given batches) so the procedure reads in one place.
:func:`train_lt_sft` runs phase 1 and the selection the same way and phase 2
with the general :class:`~polymod.training.trainer.Trainer`, so the sparse
module gets warm-up, evaluation, early stopping, checkpoints, data parallelism
and a metrics log like any other module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from polymod.card import Lineage
from polymod.errors import ConfigError, IncompatibleHostError
from polymod.format import fingerprint
from polymod.modular import Modular
from polymod.modules.contract import Module
from polymod.modules.sparse import SparseFT, SparsePart, weight_shape
from polymod.sites import named_layers, select
from polymod.training.data import EpochStream, as_dataset, fetch, host_inputs
from polymod.training.evaluate import host_loss
from polymod.training.trainer import Trainer, TrainResult

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def lt_sft(
    host: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    sites: str = "linear",
    density: float = 0.01,
    scope: Literal["tensor", "global"] = "tensor",
    full_steps: int = 100,
    sparse_steps: int = 100,
    lr: float = 1e-4,
    sparse_lr: float | None = None,
) -> Module:
    """Make a sparse fine-tuning module with the two-phase LT-SFT procedure.

    Args:
        host: the pretrained network; left bit-identical (weights and ``requires_grad``).
        loss_fn: ``loss_fn(host, batch) -> scalar loss``; called on the host itself.
        batches: training batches, cycled over for as many steps as needed.
        sites: where the diff may act (roles, globs, ``re:``); see :mod:`polymod.sites`.
        density: share of the sites' entries kept, in (0, 1].
        scope: ``tensor`` keeps the top ``density`` share of each site's |Δ|;
            ``global`` ranks |Δ| across all sites together.
        full_steps: optimiser steps of phase 1 (full fine-tuning of the sites' weights).
        sparse_steps: optimiser steps of phase 2 (only the kept entries).
        lr: AdamW learning rate of phase 1.
        sparse_lr: AdamW learning rate of phase 2 (default: ``lr``).

    Returns:
        A :class:`~polymod.modules.contract.Module` of kind ``sparse`` (mask ``lt-sft``),
        not attached; its card's lineage records the recipe.

    Raises:
        ConfigError: bad scope, density or step counts, or no batches.
        SiteNotFoundError: ``sites`` matches nothing.
        IncompatibleHostError: a selected site is not a leaf layer with a weight.
    """
    if scope not in ("tensor", "global"):
        raise ConfigError(f"lt_sft scope must be 'tensor' or 'global', got {scope!r}")
    if full_steps < 1 or sparse_steps < 0:
        raise ConfigError(f"lt_sft needs full_steps >= 1 and sparse_steps >= 0, got {full_steps}, {sparse_steps}")
    probe = SparseFT(density=density, mask="lt-sft", sites=sites)  # validates density
    chosen = select(host, sites)
    refusals = [f"{s.name}: {why}" for s in chosen if (why := probe.check_site(s))]
    if refusals:
        raise IncompatibleHostError(f"lt_sft cannot act at {len(refusals)} sites ({'; '.join(refusals[:3])})")
    layers = named_layers(host)
    stream = _cycle(batches)

    diffs = _full_finetune_diffs(host, [layers[s.name] for s in chosen], loss_fn, stream, full_steps, lr)
    kept = _top_entries({s.name: d for s, d in zip(chosen, diffs)}, density, scope)

    kept_sites = [s for s in chosen if kept[s.name].numel() > 0]
    spec = SparseFT(density=density, mask="lt-sft", sites=sites,
                    counts=tuple((s.name, kept[s.name].numel()) for s in kept_sites))
    parts = []
    for s in kept_sites:
        weight = layers[s.name].weight
        part = SparsePart(s.kind, weight_shape(s), kept[s.name].to(torch.int32))
        parts.append(part.to(device=weight.device, dtype=weight.dtype))
    module = Module(spec, kept_sites, parts)
    module.card.host = fingerprint(host, module.sites)
    module.card.lineage = Lineage(recipe={"method": "lt-sft", "scope": scope, "density": density,
                                          "full_steps": full_steps, "sparse_steps": sparse_steps,
                                          "lr": lr, "sparse_lr": sparse_lr if sparse_lr is not None else lr})
    if sparse_steps:
        _train_sparse(host, module, loss_fn, stream, sparse_steps, sparse_lr if sparse_lr is not None else lr)
    return module


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ConfigError("lt_sft got no batches (an empty or already consumed iterable); pass a list")


def _full_finetune_diffs(host: nn.Module, layers: list[nn.Module], loss_fn: LossFn, stream: Iterator[Any],
                         steps: int, lr: float) -> list[torch.Tensor]:
    """Phase 1: train the layers' weights fully, return θ₁ − θ₀ per layer, and restore θ₀ and all flags."""
    weights = list({id(layer.weight): layer.weight for layer in layers}.values())  # tied weights once
    originals = [w.detach().clone() for w in weights]
    flags = {n: p.requires_grad for n, p in host.named_parameters()}
    was_training = host.training
    try:
        host.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        host.train()
        opt = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(host, next(stream)).backward()
            opt.step()
        moved = {id(w): (w.detach() - w0) for w, w0 in zip(weights, originals)}
        return [moved[id(layer.weight)] for layer in layers]
    finally:
        with torch.no_grad():
            for w, w0 in zip(weights, originals):
                w.copy_(w0)
                w.grad = None
        for n, p in host.named_parameters():
            p.requires_grad_(flags[n])
        host.train(was_training)


def _top_entries(diffs: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Flat indices (sorted, int64) of the entries kept at each site."""
    if scope == "tensor":
        return {name: d.abs().flatten().topk(max(1, round(density * d.numel()))).indices.sort().values
                for name, d in diffs.items()}
    flat = torch.cat([d.abs().flatten() for d in diffs.values()])  # (Σ numel,)
    top = flat.topk(max(1, round(density * flat.numel()))).indices
    out, start = {}, 0
    for name, d in diffs.items():
        mine = top[(top >= start) & (top < start + d.numel())] - start
        out[name] = mine.sort().values
        start += d.numel()
    return out


def _train_sparse(host: nn.Module, module: Module, loss_fn: LossFn, stream: Iterator[Any],
                  steps: int, lr: float) -> None:
    """Phase 2: train only the kept entries (the module's values) through polymod's hooks."""
    model = Modular(host)
    was_training = host.training
    try:
        model.add("lt-sft", module)
        model.use("lt-sft")
        host.train()
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(host, next(stream)).backward()
            opt.step()
    finally:
        model.detach()
        host.train(was_training)


def train_lt_sft(model: Modular, name: str, data: Any, *, sites: str = "linear", density: float = 0.01,
                 scope: Literal["tensor", "global"] = "tensor", full_steps: int = 100, full_lr: float = 1e-4,
                 batch_size: int = 16, seed: int = 0, **trainer_args: Any) -> TrainResult:
    """Make a sparse fine-tuning module ``name`` on ``model`` by LT-SFT and train its kept entries.

    Args:
        model: the modular model; the new module is attached as ``name`` and made active.
        name: the module name.
        data: the training dataset (both phases read it, in the same seeded order).
        sites: where the difference may act.
        density: share of entries kept.
        scope: rank |Δ| per ``tensor`` or ``global``-ly over all sites.
        full_steps: steps of phase 1 (full fine-tuning of the sites' weights, then undone).
        full_lr: AdamW learning rate of phase 1.
        batch_size: phase 1's batch size.
        seed: phase 1's data order.
        trainer_args: phase 2's trainer arguments (``config``, ``eval_data``, ``metrics``, ``output_dir``, …).

    Returns:
        Phase 2's training result.
    """
    dataset = as_dataset(data)
    stream = EpochStream(len(dataset), seed=seed)
    device = next(model.host.parameters()).device
    batches = [{k: v.to(device) for k, v in fetch(dataset, stream.take(batch_size)).items()} for _ in range(full_steps)]
    before = model.active
    model.use(None)  # phase 1 measures the host alone
    try:
        module = lt_sft(model.host, lambda host, b: host_loss(host(**host_inputs(b)), b), batches, sites=sites,
                        density=density, scope=scope, full_steps=full_steps, sparse_steps=0, lr=full_lr)
    finally:
        model.use(before)
    model.add(name, module)
    model.use(name)
    return Trainer(model, [name], dataset, **trainer_args).fit()


__all__ = ["lt_sft", "train_lt_sft"]
