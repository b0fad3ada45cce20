"""Validation of compositions: every error names the node and says why.

``Modular.use`` calls :func:`check_tree` before compiling. The checks are the
combinations that cannot work — a router that needs hidden states over
embedding sites, parameter aggregation of modules without a weight delta,
token-level weights for a per-input weight matrix, several outputs inside a
mixture — each with the reason and a fix.
"""

from __future__ import annotations

from collections.abc import Mapping

from polymod.compose import Composition, Mix, Parallel, Stack, describe, leaves, unknown
from polymod.errors import CompositionError
from polymod.modules.contract import Module


def check_tree(expr: Composition, library: Mapping[str, Module]) -> None:
    """Validate ``expr`` against ``library`` (see :func:`polymod.compose.validate`)."""
    for name in leaves(expr):
        if name not in library:
            raise unknown(name, expr, library)
    parallels = _count(expr, Parallel)
    if parallels > 1:
        raise CompositionError(f"{describe(expr)} has {parallels} Parallel nodes; a composition may have only one")
    _walk(expr, "root", library, root=True)


def _count(node: Composition, cls: type) -> int:
    if isinstance(node, str):
        return 0
    return int(isinstance(node, cls)) + sum(_count(c, cls) for c in node.children)


def _fail(node: Composition, path: str, why: str) -> CompositionError:
    return CompositionError(f"invalid {type(node).__name__} at {path}, {describe(node)}: {why}")


def _walk(node: Composition, path: str, library: Mapping[str, Module], root: bool) -> None:
    if isinstance(node, str):
        return
    for i, child in enumerate(node.children):
        here = f"{path} > {type(node).__name__}[{i}]"
        if isinstance(child, Parallel):
            last_of_root_stack = root and isinstance(node, Stack) and i == len(node.children) - 1
            if not last_of_root_stack:
                raise _fail(child, here, "Parallel gives one output per branch, so it must be the root of the "
                            "composition or the last child of a root Stack (e.g. Stack('en', Parallel('a', 'b')))")
        _walk(child, here, library, root=False)
    if isinstance(node, Mix):
        _check_mix(node, path, library, root)


def _check_mix(mix: Mix, path: str, library: Mapping[str, Module], root: bool) -> None:
    router, agg = mix.router, mix.aggregate
    names = [c if isinstance(c, str) else describe(c) for c in mix.children]
    leaf = all(isinstance(c, str) for c in mix.children)
    modules = [library[n] for n in leaves(mix)]
    if router.candidates and router.candidates != names:
        raise _fail(mix, path, f"its router {router} already serves another Mix over {router.candidates}; "
                    "create a new router instance for this Mix")
    router.check_candidates(names)
    if agg == "output":
        if not root:
            raise _fail(mix, path, "aggregate='output' ensembles the host's final outputs, so the Mix must be the "
                        "root of the composition")
        if router.reads_hidden or router.local or router.level == "token":
            raise _fail(mix, path, f"aggregate='output' weighs whole host outputs, so it needs a task- or "
                        f"example-level router that reads no hidden state (Static, TaskRouter, ExampleRouter); "
                        f"got {router}")
        if any(isinstance(c, Mix) for c in mix.children):
            raise _fail(mix, path, "aggregate='output' candidates must be module names or Stacks of names")
        return
    if agg in ("delta", "factors"):
        if not leaf:
            raise _fail(mix, path, f"aggregate={agg!r} sums module parameters, so its candidates must be module "
                        "names (not compositions)")
        if router.level == "token" or router.needs_outputs:
            raise _fail(mix, path, f"aggregate={agg!r} builds one weight matrix per task or example; token-level "
                        f"routing ({router}) would need one per token — use aggregate='sum' instead")
        if agg == "delta" and not all(m.mergeable for m in modules):
            bad = [n for n, m in zip(names, modules) if not m.mergeable]
            raise _fail(mix, path, f"aggregate='delta' needs modules with a weight delta (LoRA, IA³, sparse); "
                        f"{', '.join(bad)} has none — use aggregate='sum'")
        if agg == "factors":
            kinds = {m.kind for m in modules}
            if kinds != {"lora"}:
                raise _fail(mix, path, f"aggregate='factors' mixes LoRA's A and B matrices, got kinds {sorted(kinds)}")
            ranks = {p.rank for m in modules for p in m.parts.values()}
            if len(ranks) > 1:
                raise _fail(mix, path, f"aggregate='factors' needs LoRA modules of one rank, got ranks {sorted(ranks)}")
            if [m.sites.keys() for m in modules].count(modules[0].sites.keys()) != len(modules):
                raise _fail(mix, path, "aggregate='factors' needs LoRA modules acting at the same sites")
    elif getattr(router, "heads", 1) > 1:
        raise _fail(mix, path, f"multi-head routing ({router}) splits LoRA's A and B into blocks, so it needs "
                    "aggregate='factors'")
    if agg == "attention" and not router.needs_outputs:
        raise _fail(mix, path, f"aggregate='attention' fuses module outputs with AttentionFusion's value map; "
                    f"use router=AttentionFusion(), got {router}")
    if router.needs_outputs and agg not in ("sum", "attention"):
        raise _fail(mix, path, f"{router} weighs the candidates' outputs; use aggregate='attention' or 'sum'")
    if router.reads_hidden:
        embed = sorted({s.name for m in modules for s in m.sites.values() if s.kind == "embedding"})
        if embed:
            raise _fail(mix, path, f"{router} reads the hidden state at each site, but {embed[0]!r} is an "
                        "embedding site that takes token ids; attach those modules elsewhere or use a router "
                        "that reads no hidden state (fixed, hash, Polytropon)")
    if agg == "input":
        from polymod.aggregation.input import check_input_mix

        why = check_input_mix(mix, modules)
        if why:
            raise _fail(mix, path, why)
