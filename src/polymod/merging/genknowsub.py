"""GenKnowSub: subtract general knowledge from task modules before routing them (Bagherifard et al., ACL 2025).

A library of task modules shares much of what every module learned (the
format of the data, the language); that shared part makes their Arrow
prototypes alike. General-knowledge subtraction removes it by task arithmetic's
"forgetting via negation" (Ilharco et al., 2023): with "general" modules
g₁…g_m trained on generic text, each task module i becomes

* ``mode="factors"`` (PEFT's ``use_gks``, LoRAs of one rank at the same sites)::

      Aᵢ' = Aᵢ − mean_j A_gj        Bᵢ' = Bᵢ − mean_j B_gj        (sᵢ unchanged)

* ``mode="delta"`` (any kinds with a weight change ΔW, any ranks)::

      ΔWᵢ' = ΔWᵢ − mean_j ΔW_gj

  exactly; LoRA inputs give a LoRA of concatenated rank rᵢ + Σⱼ r_gj
  (:func:`polymod.merge` with ``method="task_arithmetic"``, ``lora="cat"``),
  other kinds a dense ``Delta`` module.

The result is new modules (the inputs are left untouched) whose cards record
the lineage ``gen_know_sub(mode=...) of task, g1, g2``; route them with
:class:`polymod.Arrow` or any other router.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from polymod.card import Lineage, Parent
from polymod.errors import ConfigError
from polymod.format import content_hash
from polymod.merging.merge import merge
from polymod.modules.contract import Module
from polymod.modules.lora import is_plain


def gen_know_sub(tasks: Mapping[str, Module], general: Mapping[str, Module] | Sequence[Module],
                 mode: Literal["factors", "delta"] = "factors", host: nn.Module | None = None) -> dict[str, Module]:
    """Task modules with the mean of the general modules subtracted (see the module docstring).

    Args:
        tasks: ``{name: module}``, the task modules to purify.
        general: the general modules (a list or a ``{name: module}`` mapping), at least one.
        mode: ``factors`` (PEFT's A/B-wise subtraction, LoRA of one rank and site set) or
            ``delta`` (exact ΔW-wise subtraction, any kinds with a weight change).
        host: the host, for kinds whose ΔW reads the host weight (IA³) when not attached.

    Returns:
        ``{name: new module}`` in the order of ``tasks``.

    Raises:
        ConfigError: no general modules, an unknown mode, or (``factors``) modules that are not
            LoRAs of one rank at the same sites.
    """
    general_named = dict(general) if isinstance(general, Mapping) else {
        m.card.name or f"general{i}": m for i, m in enumerate(general)}
    if not general_named:
        raise ConfigError("gen_know_sub needs at least one general module to subtract")
    if mode not in ("factors", "delta"):
        raise ConfigError(f"gen_know_sub mode must be 'factors' or 'delta', got {mode!r}")
    out = {}
    for name, task in tasks.items():
        if mode == "factors":
            out[name] = _factors(name, task, general_named)
        else:
            weights = [1.0] + [-1.0 / len(general_named)] * len(general_named)
            lora = "cat" if all(is_plain(m) for m in [task, *general_named.values()]) else None
            merged = merge({name: task, **general_named}, method="task_arithmetic", weights=weights, lora=lora,
                           host=host, name=name)
            merged.card.lineage.recipe = {"method": "gen_know_sub", "mode": "delta", "general": list(general_named)}
            merged.card.description = merged.card.lineage.describe()
            out[name] = merged
    return out


def _factors(name: str, task: Module, general: dict[str, Module]) -> Module:
    """PEFT's A/B-wise subtraction for LoRAs of one rank at the same sites."""
    mods = {name: task, **general}
    bad = [n for n, m in mods.items() if not is_plain(m)]
    if bad:
        what = "LoRA with DoRA or a bias change" if mods[bad[0]].kind == "lora" else mods[bad[0]].kind
        raise ConfigError(f"gen_know_sub(mode='factors') subtracts LoRA's A and B matrices; {bad[0]!r} is a "
                          f"{what} module — use mode='delta'")
    for n, m in general.items():
        if set(m.sites) != set(task.sites):
            raise ConfigError(f"gen_know_sub(mode='factors') needs the general and task LoRAs at the same sites; "
                              f"{n!r} and {name!r} differ — use mode='delta'")
        ranks = {m.part(s).rank for s in m.sites} | {task.part(s).rank for s in task.sites}
        if len(ranks) > 1:
            raise ConfigError(f"gen_know_sub(mode='factors') needs LoRAs of one rank; {n!r} and {name!r} have "
                              f"ranks {sorted(ranks)} — use mode='delta'")
    out = copy.deepcopy(task)
    with torch.no_grad():
        for site, part in out.items():
            part.A.sub_(torch.stack([g.part(site).A for g in general.values()]).mean(0))  # (r, D_in)
            part.B.sub_(torch.stack([g.part(site).B for g in general.values()]).mean(0))  # (D_out, r)
    weight = -1.0 / len(general)
    out.card.lineage = Lineage(
        parents=[Parent(name, task.card.version, content_hash(task), 1.0)]
        + [Parent(n, g.card.version, content_hash(g), weight) for n, g in general.items()],
        recipe={"method": "gen_know_sub", "mode": "factors", "general": list(general)},
    )
    out.card.name = name
    out.card.description = out.card.lineage.describe()
    return out
