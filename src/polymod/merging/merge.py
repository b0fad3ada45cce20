"""Parameter aggregation: ``pm.merge`` turns N modules into one new module with a lineage.

The survey's parameter aggregation, θ' = θ_0 + Σ_i w_i φ_i and its robust
variants, as one reproducible operation::

    merged = pm.merge([a, b], method="ties", density=0.2)
    merged.card.lineage.describe()   # 'ties(weights=[1.0, 1.0], density=[0.2, 0.2], …) of a@1.0.0, b'

Every input must expose a weight delta (``Module.delta()``: LoRA, IA³, sparse,
delta modules). The methods are those of :mod:`polymod.merging.methods`
(linear, task arithmetic, TIES, DARE, DARE-TIES, magnitude pruning,
Breadcrumbs); negation is a negative weight. What comes out:

* all inputs LoRA: a LoRA by one of three explicit semantics (``lora=``, see
  :mod:`polymod.merging.lora`); by default ``cat`` for the methods
  linear in ΔW (exact) and ``delta`` otherwise;
* otherwise (or ``lora="delta"`` without ``rank``) a delta module in the
  smaller exact form (:mod:`.compact`): sparse (``SparseFT``, only the non-zero
  entries; TIES/DARE merges often are) or dense (``Delta``); ``result=`` forces
  either; ``max_rel_error=ε`` instead factorises ΔW into the lowest-rank LoRA
  within relative error ε at every site, when that is smaller.

Head modules (copies of a task head's layers) merge only with heads, by a
weighted average (:mod:`polymod.merging.heads`). Inputs must share host, sites
and shapes; otherwise an
:class:`~polymod.errors.IncompatibleHostError` names the modules and sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from polymod.card import Lineage, Parent
from polymod.errors import ConfigError, IncompatibleHostError, StateError
from polymod.format import content_hash
from polymod.merging import compact
from polymod.merging import lora as lora_merge
from polymod.merging.heads import merge_heads
from polymod.merging.methods import METHODS, MergeSpec, MethodName, TensorMerge
from polymod.merging.sparsify import global_thresholds
from polymod.modules.contract import BiasDelta, Module
from polymod.modules.delta import Delta
from polymod.modules.lora import LoRA, is_plain
from polymod.modules.sparse import SparseFT
from polymod.sites import Site, named_layers

LoraSemantics = Literal["delta", "cat", "ab"]


def merge(modules: Sequence[Module] | Mapping[str, Module], method: MethodName = "linear",
          weights: Sequence[float] | None = None, *, lora: LoraSemantics | None = None, rank: int | None = None,
          result: Literal["auto", "dense", "sparse"] = "auto", max_rel_error: float | None = None,
          host: nn.Module | None = None, name: str | None = None, seed: int = 0, **params: Any) -> Module:
    """Merge modules into a new module whose card records its lineage.

    Args:
        modules: the inputs, as a list or a ``{name: module}`` mapping (names go to the lineage;
            a list uses each card's name, else ``module<i>``).
        method: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune``, ``breadcrumbs`` or ``breadcrumbs_ties``.
        weights: w_i per input (default 1/N for ``linear``, 1 otherwise); negative weights negate.
        lora: for LoRA inputs, ``delta`` (ΔW-wise), ``cat`` (concatenation) or ``ab`` (A/B-wise).
        rank: with ``lora="delta"``, re-factorise the merged ΔW into a LoRA of this rank by SVD;
            the worst site's relative error is ``card.metrics["svd_relative_error"]["value"]``
            (with the mean, the rank and the worst site's name).
        result: ``dense`` or ``sparse`` delta module, or ``auto``: the smaller exact form (sparse
            when all inputs are sparse or the merged ΔW has few enough non-zeros, else dense).
        max_rel_error: store ΔW as the lowest-rank LoRA whose relative Frobenius error is at most
            this at every site, when that is smaller than the exact form (else the exact form, error
            0). The rank, error and sizes go to ``card.metrics["representation"]``.
        host: the host (or ``Modular``) the inputs act on; needed only for kinds whose delta
            reads the host weight (IA³) when they are not attached to a ``Modular``.
        name: the merged module's card name.
        seed: seed of DARE's random masks.
        **params: method parameters: ``density`` and ``gamma`` (a number or one per input),
            ``lam`` (λ), ``normalize``, ``trim`` (``tensor``/``global``), ``rescale``
            (``inverse``/``l1``/``none``), ``consensus`` (``sum``/``count``).

    Returns:
        The merged :class:`~polymod.modules.contract.Module` (not attached to any host).

    Raises:
        ConfigError: unknown method or parameter, bad values, a semantics that does not apply.
        IncompatibleHostError: the inputs differ in host, sites or shapes.
        StateError: an input has no weight delta.
    """
    if result not in ("auto", "dense", "sparse"):
        raise ConfigError(f"result must be 'auto', 'dense' or 'sparse', got {result!r}")
    names, mods = _named(modules)
    check_compatible(names, mods)
    spec = _spec(method, weights, len(mods), seed, params)
    all_lora = all(is_plain(m) for m in mods)
    if lora is not None and not all_lora:
        if all(m.kind == "lora" for m in mods):
            if lora != "delta":
                raise ConfigError(f"lora={lora!r} combines LoRA factors, which misses DoRA's magnitude and trained "
                                  "biases (LoRA(dora=True) or bias=True inputs); use lora='delta' or leave it unset")
        else:
            raise ConfigError(f"lora={lora!r} applies to LoRA inputs only; got kinds {sorted({m.kind for m in mods})}")
    if all_lora and lora is None:
        lora = "cat" if spec.sparsify is None and not spec.elect else "delta"
    if lora not in (None, "delta", "cat", "ab"):
        raise ConfigError(f"lora must be 'delta', 'cat' or 'ab', got {lora!r}")
    if rank is not None and (lora != "delta" or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank (SVD re-factorisation) needs lora='delta' and a positive integer, "
                          f"got rank={rank!r} with lora={lora!r}")
    if max_rel_error is not None:
        bad = compact.check_bound(max_rel_error)
        if bad is None and (rank is not None or lora in ("cat", "ab") or result != "auto"):
            bad = (f"max_rel_error chooses the representation itself; it cannot be combined with rank, "
                   f"lora={lora!r} or result={result!r} (for LoRA inputs it needs lora='delta', the default "
                   "for non-linear methods)")
        if bad:
            raise ConfigError(bad)
    recipe = recipe_of(spec)
    metrics: dict[str, Any] = {}
    if any(m.kind == "head" for m in mods):  # heads hold weights, not deltas: averaged, or refused with the reason
        out = merge_heads(names, mods, spec)
    elif lora in ("cat", "ab"):
        out = _lora_factors(mods, spec, lora)
        recipe["lora"] = lora
    else:
        deltas, biases = _deltas(names, mods, host)
        mixed_w, mixed_b = _merge_deltas(spec, deltas, biases)
        if rank is not None:
            out, errors = _svd_module(mods[0], mixed_w, rank)
            metrics["svd_relative_error"] = lora_merge.svd_error_metric(errors, rank)
        elif max_rel_error is not None:
            out, info = _within_bound(mods, mixed_w, mixed_b, float(max_rel_error))
            metrics["representation"] = info
            if out.kind == "lora":
                worst = info["measured_rel_error"]
                metrics["svd_relative_error"] = {"value": worst, "max": worst, "rank": info["rank"]}
        else:
            out = _delta_module(mods, mixed_w, mixed_b, result)
            metrics["representation"] = {"value": _exact_bytes(mixed_w)[out.kind], "unit": "bytes", "kind": out.kind,
                                         "dense_bytes": compact.dense_bytes(mixed_w)}
        recipe.update({"lora": lora} if lora else {})
        recipe.update({"rank": rank} if rank else {})
        recipe.update({"max_rel_error": max_rel_error} if max_rel_error is not None else {})
    recipe["result"] = out.kind
    out.card.name = name
    out.card.host = _restricted_host(mods[0], list(out.sites))
    out.card.metrics.update(metrics)
    out.card.lineage = Lineage(
        parents=[Parent(n, m.card.version, content_hash(m), w) for n, m, w in zip(names, mods, spec.weights)],
        recipe=recipe,
    )
    out.card.description = out.card.lineage.describe()
    return out


def recipe_of(spec: MergeSpec) -> dict[str, Any]:
    """The lineage recipe of a merge: the method and every parameter that affects its result, and the seed."""
    recipe: dict[str, Any] = {"method": spec.method, "weights": list(spec.weights), "lambda": spec.lam,
                              "normalize": spec.normalize}
    if spec.sparsify:
        recipe["density"] = list(spec.density)
    if spec.sparsify == "outliers":
        recipe["gamma"] = list(spec.gamma)
    if spec.sparsify == "magnitude":
        recipe["trim"] = spec.trim
    if spec.sparsify == "della":
        recipe["epsilon"] = list(spec.epsilon)
    if spec.sparsify in ("random", "della"):
        recipe["rescale"] = spec.rescale
    if spec.elect:
        recipe["consensus"] = spec.consensus
    recipe["seed"] = spec.seed
    return recipe


def check_compatible(names: list[str], modules: list[Module]) -> None:
    """Check that modules can be merged: same host, same sites, same shapes.

    Raises:
        IncompatibleHostError: naming the first pair of modules that differ, and how.
    """
    first, ref = names[0], modules[0]
    ref_host = ref.card.host or {}
    for other, mod in zip(names[1:], modules[1:]):
        host = mod.card.host or {}
        for key in ("architecture", "model_type"):
            if ref_host.get(key) and host.get(key) and ref_host[key] != host[key]:
                raise IncompatibleHostError(f"cannot merge {first!r} and {other!r}: they were made for different hosts "
                                            f"({key} {ref_host[key]!r} vs {host[key]!r})")
        only_ref, only_other = sorted(set(ref.sites) - set(mod.sites)), sorted(set(mod.sites) - set(ref.sites))
        if only_ref or only_other:
            parts = [f"only {n!r} acts at {s[0]}" + (f" (+{len(s) - 1} more)" if len(s) > 1 else "")
                     for n, s in ((first, only_ref), (other, only_other)) if s]
            raise IncompatibleHostError(f"cannot merge {first!r} and {other!r}: they act at different sites; "
                                        f"{'; '.join(parts)}. Merge modules built with the same sites selection.")
        for site, geo in ref.sites.items():
            g = mod.sites[site]
            if (g.kind, g.in_features, g.out_features) != (geo.kind, geo.in_features, geo.out_features):
                raise IncompatibleHostError(
                    f"cannot merge {first!r} and {other!r}: site {site!r} is a {geo.kind} "
                    f"{geo.in_features}->{geo.out_features} in {first!r} but a {g.kind} "
                    f"{g.in_features}->{g.out_features} in {other!r}")
        ref_sites, sites = ref_host.get("sites", {}), host.get("sites", {})
        differ = [s for s in ref.sites if _weight_hash(ref_sites, s) and _weight_hash(sites, s)
                  and _weight_hash(ref_sites, s) != _weight_hash(sites, s)]
        if differ:
            raise IncompatibleHostError(
                f"cannot merge {first!r} and {other!r}: they were made on different host weights at {len(differ)} "
                f"sites (first: {differ[0]}); task vectors of different base models do not add up. If those are "
                "the sites of a task head that from_pretrained(..., num_labels=k) initialised at random (a "
                "classifier or score layer), train the head as its own module, pm.Head(sites='classifier'), and "
                "keep it out of the LoRA's sites: the host weights then stay the pretrained ones and the modules "
                "merge. Otherwise merge modules made on the same checkpoint")


def _weight_hash(sites: dict[str, Any], site: str) -> str | None:
    return (sites.get(site) or {}).get("weight", {}).get("sha256")


def _named(modules: Sequence[Module] | Mapping[str, Module]) -> tuple[list[str], list[Module]]:
    if isinstance(modules, Mapping):
        names, mods = [str(k) for k in modules], list(modules.values())
    elif isinstance(modules, Sequence) and not isinstance(modules, str):
        mods = list(modules)
        names = [m.card.name if isinstance(m, Module) and m.card.name else f"module{i}" for i, m in enumerate(mods)]
    else:
        raise ConfigError(f"merge() takes a list or a {{name: module}} mapping, got {type(modules).__name__}")
    if not mods:
        raise ConfigError("merge() needs at least one module")
    for n, m in zip(names, mods):
        if not isinstance(m, Module):
            raise ConfigError(f"merge() input {n!r} is a {type(m).__name__}, not a polymod Module; "
                              "pass model['name'] or pm.load(path)")
        if not m.mergeable:
            raise StateError(f"cannot merge {n!r}: a {m.kind} module has no weight delta; parameter aggregation "
                             "needs parameter-composition modules (lora, ia3, sparse, delta)")
    if len(set(names)) != len(names):
        raise ConfigError(f"merge() inputs need distinct names, got {names}; pass a {{name: module}} mapping")
    return names, mods


def _spec(method: str, weights: Sequence[float] | None, n: int, seed: int, params: dict[str, Any]) -> MergeSpec:
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    sparsify, elect, _ = METHODS[method]
    allowed = ["lam", "normalize"] + (["density"] if sparsify else []) + (["gamma"] if sparsify == "outliers" else [])
    allowed += (["trim"] if sparsify == "magnitude" else []) + (["rescale"] if sparsify in ("random", "della") else [])
    allowed += ["epsilon"] if sparsify == "della" else []
    allowed += ["consensus"] if elect else []
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ConfigError(f"{method} does not take {', '.join(bad)}; it takes weights, seed and {', '.join(allowed)}")
    if weights is None:
        weights = [1.0 / n if method == "linear" else 1.0] * n
    if isinstance(weights, (int, float)) or len(weights) != n:
        raise ConfigError(f"weights must be a list with one number per module ({n}), got {weights!r}")
    per_input = {k: tuple(v) if isinstance(v, Sequence) else (v,) * n
                 for k, v in params.items() if k in ("density", "gamma", "epsilon")}
    return MergeSpec(method, tuple(weights), seed=seed, **per_input,
                     **{k: v for k, v in params.items() if k not in per_input})


def _deltas(names: list[str], mods: list[Module], host: nn.Module | None):
    layers = named_layers(getattr(host, "host", host)) if host is not None else None
    deltas, biases = [], []
    for n, m in zip(names, mods):
        try:
            deltas.append({s: d.detach() for s, d in m.delta(layers).items()})
        except StateError as exc:
            raise StateError(f"cannot take the weight delta of {n!r}: {exc}; pass host=... to merge()") from exc
        biases.append({s: b.detach() for s, p in m.items() if isinstance(p, BiasDelta)
                       and (b := p.delta_bias(layers.get(s) if layers else None)) is not None})
    return deltas, biases


def _merge_deltas(spec: MergeSpec, deltas: list[dict], biases: list[dict]):
    """Merge ΔW (and Δb where any input has one) per site; names ``<site>.weight``/``<site>.bias``."""
    sites = list(deltas[0])
    bias_sites = [s for s in sites if any(s in b for b in biases)]

    def inputs(site, bias):
        if not bias:
            return [d[site] for d in deltas]
        ref = next(b[site] for b in biases if site in b)
        return [b.get(site, torch.zeros_like(ref)) for b in biases]

    tensors = [(s, False) for s in sites] + [(s, True) for s in bias_sites]
    trims = None
    if spec.trim == "global" and spec.sparsify == "magnitude":
        per_input = [[inputs(s, b)[i] for s, b in tensors] for i in range(len(deltas))]
        trims = global_thresholds(spec.density, per_input)
    mixed_w, mixed_b = {}, {}
    for site, bias in tensors:
        xs = inputs(site, bias)
        work = [x.to(torch.float64 if x.dtype == torch.float64 else torch.float32) for x in xs]
        merger = TensorMerge(spec, f"{site}.{'bias' if bias else 'weight'}", work[0].numel(), trims)
        if merger.needs_stats:
            for i, x in enumerate(work):
                merger.observe(i, x)
        (mixed_b if bias else mixed_w)[site] = merger(work).to(xs[0].dtype)
    return mixed_w, mixed_b


def _sites(module: Module) -> list[Site]:
    return list(module.sites.values())


def _lora_factors(mods: list[Module], spec: MergeSpec, semantics: str) -> Module:
    factors = {}
    for site in mods[0].sites:
        parts = [m.part(site) for m in mods]
        factors[site] = lora_merge.cat(parts, spec) if semantics == "cat" else lora_merge.ab(parts, spec, site)
    return _lora_module(mods[0], factors)


def _lora_module(ref: Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Module:
    rank = next(iter(factors.values()))[0].shape[0]
    spec = LoRA(rank=rank, alpha=float(rank), sites="|".join(factors))
    sites = _sites(ref)
    parts = [spec.build_part(s, None) for s in sites]
    with torch.no_grad():
        for s, p in zip(sites, parts):
            a, b = factors[s.name]
            p.to(a.dtype)
            p.A.copy_(a)
            p.B.copy_(b)
    return Module(spec, sites, parts)


def _svd_module(ref: Module, mixed: dict[str, torch.Tensor], rank: int) -> tuple[Module, dict[str, float]]:
    factors, errors = {}, {}
    for site, delta in mixed.items():
        a, b, err = lora_merge.svd_factor(lora_merge.to_out_in(delta, ref.sites[site].kind), rank)
        factors[site], errors[site] = (a, b), err
    return _lora_module(ref, factors), errors


def _exact_bytes(mixed_w: dict[str, torch.Tensor]) -> dict[str, int]:
    return {"delta": compact.dense_bytes(mixed_w), "sparse": compact.sparse_bytes(mixed_w)}


def _within_bound(mods: list[Module], mixed_w: dict[str, torch.Tensor], mixed_b: dict[str, torch.Tensor],
                  bound: float) -> tuple[Module, dict[str, Any]]:
    """The lowest-rank LoRA within ``bound`` at every site, or the exact form when that is not smaller."""
    if any(bool(b.any()) for b in mixed_b.values()):
        raise ConfigError("max_rel_error factorises weight deltas; the merged modules also change biases, which "
                          "a LoRA cannot hold: leave max_rel_error out (the result keeps the exact deltas)")
    ref = mods[0]
    oriented = {s: lora_merge.to_out_in(d, ref.sites[s].kind) for s, d in mixed_w.items()}  # (D_out, D_in)
    curves = {s: compact.truncation_errors(d) for s, d in oriented.items()}
    rank = max(max((compact.smallest_rank(c, bound) for c in curves.values()), default=1), 1)
    exact = _delta_module(mods, mixed_w, mixed_b, "auto")
    sizes = _exact_bytes(mixed_w)
    itemsize = next(iter(mixed_w.values())).element_size()
    low = compact.lora_bytes([tuple(d.shape) for d in oriented.values()], rank, itemsize)
    # a card metric: a numeric "value" (the bytes stored) and short fields
    info: dict[str, Any] = {"unit": "bytes", "max_rel_error": bound, "rank_needed": rank, "lora_bytes": low,
                            "dense_bytes": sizes["delta"], "sparse_bytes": sizes["sparse"]}
    if low >= sizes[exact.kind]:
        info.update(value=sizes[exact.kind], kind=exact.kind, measured_rel_error=0.0,
                    note=f"rank {rank} is not smaller than the exact {exact.kind} form: kept exact")
        return exact, info
    out, errors = _svd_module(ref, mixed_w, rank)
    info.update(value=low, kind="lora", rank=rank, measured_rel_error=max(errors.values(), default=0.0))
    return out, info


def _delta_module(mods: list[Module], mixed_w: dict[str, torch.Tensor], mixed_b: dict[str, torch.Tensor],
                  result: str) -> Module:
    smaller = (not any(bool(b.any()) for b in mixed_b.values())
               and compact.sparse_bytes(mixed_w) < compact.dense_bytes(mixed_w))
    sparse = result == "sparse" or (result == "auto" and (all(m.kind == "sparse" for m in mods) or smaller))
    sites = _sites(mods[0])
    if sparse:
        if any(bool(b.any()) for b in mixed_b.values()):
            raise ConfigError("the merged modules change biases, which a sparse module cannot hold; use result='dense'")
        flat = {s: mixed_w[s].reshape(-1) for s in mixed_w}
        support = {s: torch.nonzero(v).view(-1) for s, v in flat.items()}
        total = sum(v.numel() for v in flat.values())
        spec = SparseFT(density=max(sum(i.numel() for i in support.values()) / total, 1e-12), mask="lt-sft",
                        counts=tuple((s, int(i.numel())) for s, i in support.items()), sites="|".join(mixed_w))
        parts = [spec.build_part(s, None) for s in sites]
        with torch.no_grad():
            for s, p in zip(sites, parts):
                p.to(mixed_w[s.name].dtype)
                p.indices.copy_(support[s.name].to(torch.int32))
                p.values.copy_(flat[s.name][support[s.name]])
        return Module(spec, sites, parts)
    spec = Delta(bias=bool(mixed_b), sites="|".join(mixed_w))
    parts = [spec.build_part(s, None) for s in sites]
    with torch.no_grad():
        for s, p in zip(sites, parts):
            p.to(mixed_w[s.name].dtype)
            p.weight.copy_(mixed_w[s.name])
            if p.bias is not None and s.name in mixed_b:
                p.bias.copy_(mixed_b[s.name])
    return Module(spec, sites, parts)


def _restricted_host(ref: Module, sites: list[str]) -> dict[str, Any]:
    host = dict(ref.card.host or {})
    if "sites" in host:
        host["sites"] = {s: host["sites"][s] for s in sites if s in host["sites"]}
    return host
