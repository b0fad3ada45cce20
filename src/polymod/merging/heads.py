"""Merging head modules: a weighted average of their weights, never task vectors.

A head (:mod:`polymod.modules.head`) holds a layer's weights, not a change of
the host's: W_h, b_h. Heads of one task family trained from the same
pretrained body can be averaged like any model soup::

    W = λ · Σ_i w_i W_i,    b = λ · Σ_i w_i b_i      (``method="linear"``, w_i = 1/N by default)

Task-vector methods (task arithmetic, TIES, DARE, magnitude pruning,
Breadcrumbs) need every input to be a change from one shared base, θ_i − θ_0.
A task head has no such base: ``from_pretrained(..., num_labels=k)`` draws it
at random in every process, so W_i − W_0 would subtract one process's random
draw from another's. Those methods are refused for heads, with that reason;
merge the heads with ``linear`` and the other modules (LoRA, IA³, ...) with
any method, separately.
"""

from __future__ import annotations

import torch

from polymod.errors import ConfigError
from polymod.merging.methods import MergeSpec, TensorMerge
from polymod.modules.contract import Module
from polymod.modules.head import Head


def merge_heads(names: list[str], mods: list[Module], spec: MergeSpec) -> Module:
    """The weighted average of head modules' weights (see the module docstring).

    Raises:
        ConfigError: an input is not a head, or the method is not ``linear``.
    """
    others = sorted({f"{n} ({m.kind})" for n, m in zip(names, mods) if m.kind != "head"})
    if others:
        raise ConfigError(f"cannot merge head modules with {', '.join(others)}: a head holds a layer's weights, the "
                          "others hold changes of the host's. Merge the heads together (method='linear') and the "
                          "other modules together, then use both, e.g. pm.Stack('body', 'head')")
    if spec.method != "linear":
        raise ConfigError(f"method {spec.method!r} merges task vectors (θ_i − θ_0), which heads do not have: a task "
                          "head starts from a random draw in every process (from_pretrained(..., num_labels=k)), "
                          "not from a shared base. Merge heads with method='linear' (a weighted average of their "
                          "weights)")
    sites = list(mods[0].sites.values())
    out_spec = Head(sites="|".join(mods[0].sites))
    parts = [out_spec.build_part(s, None) for s in sites]
    with torch.no_grad():
        for site, part in zip(sites, parts):
            inputs = [m.part(site.name) for m in mods]
            for attr in ("weight", "bias"):
                xs = [getattr(p, attr) for p in inputs]
                if xs[0] is None:
                    continue
                work = [x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32) for x in xs]
                merged = TensorMerge(spec, f"{site.name}.{attr}", work[0].numel())(work)
                part.to(xs[0].dtype)
                target = getattr(part, attr)
                target.copy_(merged.reshape(target.shape).to(xs[0].dtype))
    return Module(out_spec, sites, parts)


__all__ = ["merge_heads"]
