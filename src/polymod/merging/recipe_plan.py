"""From a validated recipe to streaming jobs: the methods' parameters, and ``models:`` / ``slices:`` layouts.

Each recipe method has a table of the parameters it reads (per input or shared,
their type and default), exactly those of mergekit 0.1.5's method of that name.
:func:`plan_models` and :func:`plan_slices` turn the recipe into one
:class:`~polymod.merging.jobs.Job` per output tensor, resolving every parameter
at that tensor (its name for ``filter:``, its layer position t for gradients).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymod.errors import ConfigError
from polymod.merging.elementwise import ElementwiseSpec
from polymod.merging.interp import InterpSpec
from polymod.merging.jobs import Job
from polymod.merging.layers import is_post, layer_of, layer_tensors, position, stacks
from polymod.merging.methods import METHODS, MergeSpec
from polymod.merging.settings import resolve
from polymod.merging.shards import Checkpoint

NUM, BOOL = (int, float), bool
# name -> (kind, default); ``None`` default: required (weight, t) or absent (scale).
PER_INPUT: dict[str, tuple[Any, Any]] = {
    "weight": (NUM, None), "density": (NUM, 1.0), "gamma": (NUM, 0.01), "epsilon": (NUM, 0.15), "scale": (NUM, None)}
SHARED: dict[str, tuple[Any, Any]] = {
    "normalize": (BOOL, None), "lambda": (NUM, 1.0), "rescale": ((bool, str), None), "int8_mask": (BOOL, False),
    "consensus": (str, "sum"), "t": (NUM, None), "filter_wise": (BOOL, False),
    "nuslerp_row_wise": (BOOL, False), "nuslerp_flatten": (BOOL, True), "normalize_weights": (BOOL, True),
    "eps": (NUM, 1e-8)}
_TASK = ({"weight", "density"}, {"normalize", "lambda", "rescale", "int8_mask"})
# method -> (per-input parameters, shared parameters), as mergekit 0.1.5 declares them
# (``consensus`` is polymod's: TIES by sign counts).
PARAMS: dict[str, tuple[set[str], set[str]]] = {
    "linear": ({"weight"}, {"normalize"}),
    "task_arithmetic": _TASK, "dare_linear": _TASK, "magnitude_prune": _TASK,
    "ties": (_TASK[0], _TASK[1] | {"consensus"}), "dare_ties": (_TASK[0], _TASK[1] | {"consensus"}),
    "breadcrumbs": (_TASK[0] | {"gamma"}, _TASK[1]),
    "breadcrumbs_ties": (_TASK[0] | {"gamma"}, _TASK[1] | {"consensus"}),
    "della": (_TASK[0] | {"epsilon"}, _TASK[1] | {"consensus"}),
    "della_linear": (_TASK[0] | {"epsilon"}, _TASK[1]),
    "slerp": (set(), {"t"}),
    "nuslerp": ({"weight"}, {"nuslerp_row_wise", "nuslerp_flatten"}),
    "model_stock": (set(), {"filter_wise"}),
    "passthrough": ({"scale"}, set()),
    "nearswap": (set(), {"t"}),
    "multislerp": ({"weight"}, {"normalize_weights", "eps"}),
    "ram": (set(), {"epsilon"}),
}
RECIPE_METHODS = tuple(PARAMS)
# mergekit 0.1.5 methods that polymod refuses by name, with the reason.
REFUSED_METHODS = {
    "karcher": "the Karcher mean iterates (up to max_iter passes over each whole tensor, renormalising every time); "
               "not implemented in the streaming engine — use slerp (two models) or nuslerp",
    "sce": "SCE selects entries by a top-k over the variance of all task vectors, then weighs inputs by their mean "
           "square; not implemented yet — ties with density is the nearest streaming method",
    "arcee_fusion": "its threshold comes from quantiles of 1M entries sampled with torch's global RNG (so no two runs "
                    "agree), and a softmax over whole rows; not implemented",
    "ramplus_tl": "RAM+ rescales each input by counts over its whole tensor (a statistics pass); not implemented yet "
                  "— ram is",
}
# What each method needs of the base model: "task" (base required, inputs are task vectors),
# "first" (base required, an input itself), "optional" (task vectors if given), "ignored".
BASE_USE = {**{m: "task" for m in METHODS}, "linear": "ignored", "slerp": "first", "model_stock": "first",
            "nuslerp": "optional", "passthrough": "ignored", "nearswap": "first", "ram": "task",
            "multislerp": "optional"}
INPUTS = {"slerp": (1, 1), "nuslerp": (2, 2), "model_stock": (2, None), "passthrough": (1, 1),  # non-base (min, max)
          "nearswap": (1, 1)}


@dataclass(frozen=True)
class Source:
    """One input of a slice: a checkpoint (index into the recipe's list), its parameters, its layer range."""

    ck: int
    path: Path
    params: Mapping[str, Any] | None = None
    layers: tuple[int, int] | None = None


def _rescale(value: Any) -> str:
    return {True: "l1", False: "none"}.get(value, value)


def make_job(method: str, out: str, t: float, inputs: list[tuple[Source, str]], base: tuple[Source, str] | None,
             scopes: list[Mapping[str, Any] | None], seed: int) -> Job:
    """The job of one output tensor, every parameter resolved at it.

    Args:
        method: the recipe method.
        out: the output tensor's name (``filter:`` of shared parameters matches it).
        t: its layer position in its slice (gradients).
        inputs: the non-base sources and their tensor names (``filter:`` of their parameters matches these).
        base: the base source and tensor name, when the method uses one.
        scopes: the shared parameter scopes, most specific first (slice, then recipe).
        seed: seed of random masks.
    """
    per_input, shared = PARAMS[method]

    def value(name: str, src: Source | None, tensor: str) -> Any:
        found = resolve(name, ([src.params] if src is not None else []) + scopes, tensor, t)
        if found is None:
            found = (PER_INPUT.get(name) or SHARED[name])[1]
        return found

    vals = {p: [value(p, s, name) for s, name in inputs] for p in per_input}
    if any(w is None for w in vals.get("weight", [])):
        missing = next(str(s.path) for (s, _), w in zip(inputs, vals["weight"]) if w is None)
        raise ConfigError(f"{missing} has no weight for tensor {out} (give parameters.weight, per model or shared)")
    opts = {p: value(p, None, out) for p in shared}
    refs = tuple((s.ck, name) for s, name in inputs)
    base_ref = (base[0].ck, base[1]) if base is not None else None
    if method in ("slerp", "nearswap"):
        if opts["t"] is None:
            raise ConfigError(f"{method} needs parameters.t for tensor {out}")
        spec = InterpSpec("slerp", t=float(opts["t"])) if method == "slerp" else ElementwiseSpec(
            "nearswap", t=float(opts["t"]))
        return Job(out, (base_ref, *refs), None, spec)
    if method == "ram":  # mergekit's ram reads one shared epsilon, 1e-5 by default (DELLA's is per input)
        eps = resolve("epsilon", scopes, out, t)
        return Job(out, refs, base_ref, ElementwiseSpec("ram", epsilon=1e-5 if eps is None else float(eps)))
    if method == "nuslerp":
        grouping = "tensor" if opts["nuslerp_flatten"] else "columns" if opts["nuslerp_row_wise"] else "rows"
        spec = InterpSpec("nuslerp", weights=tuple(float(w) for w in vals["weight"]), grouping=grouping,
                          task_vectors=base is not None)
        return Job(out, refs, base_ref, spec)
    if method == "multislerp":  # one input: returned as it is (mergekit), so no task vector round trip
        single = len(refs) == 1
        spec = InterpSpec("multislerp", weights=tuple(float(w) for w in vals["weight"]), inputs=len(refs),
                          task_vectors=base is not None and not single, normalize=bool(opts["normalize_weights"]),
                          eps=float(opts["eps"]))
        return Job(out, refs, base_ref if not single else None, spec)
    if method == "model_stock":
        spec = InterpSpec("model_stock", grouping="rows" if opts["filter_wise"] else "tensor", inputs=len(refs) + 1)
        return Job(out, (base_ref, *refs), None, spec)
    if method == "passthrough":
        scale = vals["scale"][0]
        return Job(out, refs, None, MergeSpec("linear", (1.0 if scale is None else float(scale),), normalize=False))
    normalize = opts["normalize"]
    if normalize is None:
        normalize = True if method == "linear" else METHODS[method][2]
    kw: dict[str, Any] = {"normalize": normalize, "seed": seed}
    if "lambda" in opts:
        kw["lam"] = float(opts["lambda"])
    if opts.get("rescale") is not None:
        kw["rescale"] = _rescale(opts["rescale"])
    elif METHODS[method][0] in ("random", "della"):
        kw["rescale"] = "l1"  # mergekit's default for DARE and DELLA
    if "consensus" in opts:
        kw["consensus"] = opts["consensus"]
    for p in ("density", "gamma", "epsilon"):
        if p in vals:
            kw[p] = tuple(float(v) for v in vals[p])
    spec = MergeSpec(method, tuple(float(w) for w in vals["weight"]), **kw)
    return Job(out, refs, base_ref if BASE_USE[method] == "task" else None, spec)


def plan_models(method: str, sources: list[Source], base: Source | None, cks: list[Checkpoint],
                scopes: list[Mapping[str, Any] | None], seed: int) -> list[Job]:
    """Jobs of a ``models:`` recipe: every tensor of the reference checkpoint, names unchanged."""
    ref = cks[base.ck if base is not None else sources[0].ck]
    counts = stacks(ref.names)
    return [make_job(method, name, position(name, counts), [(s, name) for s in sources],
                     (base, name) if base is not None else None, scopes, seed) for name in ref.names]


def plan_slices(method: str, slices: list[tuple[list[Source], Source | None, Mapping[str, Any] | None]],
                cks: list[Checkpoint], global_scope: Mapping[str, Any] | None, seed: int,
                problems: list[str]) -> tuple[list[Job], int]:
    """Jobs of a ``slices:`` recipe: layers restacked in slice order; returns the jobs and the new layer count.

    Each slice takes the same relative layers from each of its sources (equal lengths);
    layer i of an n-layer slice sits at gradient position i / (n − 1) (1 for a one-layer
    slice), as in mergekit. The tensors before the layers come from the first slice's
    sources, those after from the last slice's.
    """
    stack_of: dict[int, str] = {}
    for srcs, _, _ in slices:
        for s in srcs:
            found = stacks(cks[s.ck].names)
            if len(found) != 1:
                problems.append(f"{s.path}: slices restack one stack of layers; found {sorted(found) or 'none'}")
                return [], 0
            stack_of[s.ck] = next(iter(found))
            lo, hi = s.layers
            if not 0 <= lo < hi <= found[stack_of[s.ck]]:
                problems.append(f"{s.path}: layer_range [{lo}, {hi}] is outside its {found[stack_of[s.ck]]} layers "
                                "(a range [a, b] takes layers a..b-1)")
    if problems:
        return [], 0
    jobs: list[Job] = []

    def split(srcs: list[Source], base: Source | None) -> tuple[list[Source], Source | None]:
        others = [s for s in srcs if base is None or s.path.resolve() != base.path.resolve()]
        return others, next((s for s in srcs if base is not None and s.path.resolve() == base.path.resolve()), None)

    def outside(srcs: list[Source], base: Source | None, scope: Mapping[str, Any] | None, post: bool) -> None:
        others, b = split(srcs, base)
        for name in cks[srcs[0].ck].names:
            if layer_of(name) is None and is_post(name) == post:
                jobs.append(make_job(method, name, 0.0, [(s, name) for s in others], (b, name) if b else None,
                                     [scope, global_scope], seed))

    outside(*slices[0], post=False)
    out_index = 0
    for srcs, base, scope in slices:
        others, b = split(srcs, base)
        n = srcs[0].layers[1] - srcs[0].layers[0]
        for offset in range(n):
            t = offset / (n - 1) if n > 1 else 1.0
            first = srcs[0]
            for tensor in layer_tensors(cks[first.ck].names).get(first.layers[0] + offset, []):
                jobs.append(make_job(method, tensor.at(out_index), t,
                                     [(s, f"{stack_of[s.ck]}.{s.layers[0] + offset}.{tensor.rest}") for s in others],
                                     (b, f"{stack_of[b.ck]}.{b.layers[0] + offset}.{tensor.rest}") if b else None,
                                     [scope, global_scope], seed))
            out_index += 1
    outside(*slices[-1], post=True)
    return jobs, out_index


def job_problems(jobs: list[Job], cks: list[Checkpoint], paths: list[Path]) -> list[str]:
    """Input tensors that do not exist, or whose shape differs from the job's reference tensor."""
    problems = []
    for job in jobs:
        refs = ([job.base] if job.base else []) + list(job.inputs)
        missing = [f"{paths[ck]} lacks {name}" for ck, name in refs if name not in cks[ck].infos]
        if missing:
            problems += missing
            continue
        shapes = {cks[ck].infos[name].shape for ck, name in refs}
        if len(shapes) > 1:
            problems.append(f"{job.name}: inputs have different shapes " + ", ".join(
                f"{paths[ck]}:{name} {list(cks[ck].infos[name].shape)}" for ck, name in refs))
    if len(problems) > 6:
        problems = problems[:6] + [f"... and {len(problems) - 6} more tensor problems"]
    return problems
