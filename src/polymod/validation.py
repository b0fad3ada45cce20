"""Validation of compositions: every error names the node and says why.

``Modular.use`` calls :func:`check_tree` before compiling. The structural
checks are here (every leaf attached, at most one Parallel and only at the
root); what a Mix can combine is asked of its router (``check_candidates``) and
of routers that read the candidates' weights (``check_modules``, Arrow) and
of its registered aggregator (``check``: parameter aggregation of modules
without a weight delta, token-level weights for a per-input weight matrix,
several outputs inside a mixture, ...). Each refusal gives the reason and a fix.
"""

from __future__ import annotations

from collections.abc import Mapping

from polymod.aggregation import aggregator
from polymod.compose import Composition, Mix, Parallel, Stack, describe, leaves, unknown
from polymod.errors import CompositionError
from polymod.modules.contract import Module
from polymod.routing.base import ReadsModules


def check_tree(expr: Composition, library: Mapping[str, Module]) -> None:
    """Check a composition against the attached modules, naming the invalid node.

    Raises:
        UnknownModuleError: a leaf is not in the library.
        CompositionError: a node is malformed or its router/aggregator cannot act on
            its candidates (the message names the node and says why).
    """
    if not isinstance(expr, (str, Stack, Mix, Parallel)):
        raise CompositionError(f"use() takes a module name or a composition, got {type(expr).__name__}")
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
    router = mix.router
    names = [c if isinstance(c, str) else describe(c) for c in mix.children]
    modules = [library[n] for n in leaves(mix)]
    if router.candidates and router.candidates != names:
        raise _fail(mix, path, f"its router {router} already serves another Mix over {router.candidates}; "
                    "create a new router instance for this Mix")
    router.check_candidates(names)
    if isinstance(router, ReadsModules):
        if any(not isinstance(c, str) for c in mix.children):
            raise _fail(mix, path, f"{router} derives its routing from each candidate's weights, so its candidates "
                        "must be module names (not compositions)")
        why = router.check_modules(names, modules)
        if why:
            raise _fail(mix, path, why)
    try:
        why = aggregator(mix.aggregate).check(mix, modules, root)
    except CompositionError as exc:  # an unknown aggregate: name the node
        raise _fail(mix, path, str(exc)) from exc
    if why:
        raise _fail(mix, path, why)
    if router.reads_hidden:
        embed = sorted({s.name for m in modules for s in m.sites.values() if s.kind == "embedding"})
        if embed:
            raise _fail(mix, path, f"{router} reads the hidden state at each site, but {embed[0]!r} is an "
                        "embedding site that takes token ids; attach those modules elsewhere or use a router "
                        "that reads no hidden state (fixed, hash, Polytropon)")
