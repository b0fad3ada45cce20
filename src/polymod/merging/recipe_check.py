"""Validation of recipe parts: model paths, parameter settings, model entries and slices.

Each function appends every problem it finds to a list (nothing raises), so that
:func:`~polymod.merging.recipe.parse_recipe` reports a whole recipe's problems at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from polymod.errors import FormatError
from polymod.merging.methods import METHODS
from polymod.merging.recipe_plan import BASE_USE, INPUTS, PARAMS, PER_INPUT, SHARED, Source
from polymod.merging.settings import check
from polymod.merging.shards import Checkpoint, checkpoint_files

Resolve = Callable[[Any, str], "Source | None"]  # a model path as written, its place -> the checkpoint's source


def check_count(method: str | None, n: int, where: str, problems: list[str]) -> None:
    """A method's number of inputs besides the base model, checked against its contract (``INPUTS``)."""
    lo, hi = INPUTS.get(method, (1, None))
    if n and (n < lo or (hi is not None and n > hi)):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        problems.append(f"{where}: {method} takes {want} model{'s' if lo > 1 else ''} besides the base model, "
                        f"got {n}")


def layout_diff(ref: Checkpoint, ck: Checkpoint, vocab: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """How checkpoint ``ck``'s tensor names and shapes differ from ``ref``'s (empty: they match).

    Tensors named in ``vocab`` (token-indexed, permuted to one vocabulary) may differ in their first dimension.
    """
    missing = [n for n in ref.infos if n not in ck.infos]
    extra = [n for n in ck.infos if n not in ref.infos]
    shapes = [f"{n} {list(ck.infos[n].shape)} vs {list(i.shape)}" for n, i in ref.infos.items()
              if n in ck.infos and ck.infos[n].shape[n in vocab:] != i.shape[n in vocab:]]
    out = []
    for what, items in (("lacks", missing), ("has extra tensors", extra), ("has other shapes", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            out.append(f"{what} relative to {ref.path}: {', '.join(items[:3])}{more}")
    return out


def check_params(params: Any, where: str, method: str | None, shared: bool,
                 problems: list[str]) -> dict[str, Any] | None:
    """Validate a parameters mapping: names the method reads, value shapes (scalar, gradient, filters), ranges."""
    if params is None:
        return None
    if not isinstance(params, dict):
        problems.append(f"{where} must be a mapping, got {params!r}")
        return None
    per_input, shared_names = PARAMS.get(method, (set(PER_INPUT), set(SHARED)))
    allowed = per_input | shared_names if shared else per_input
    for key, setting in params.items():
        if key not in allowed:
            problems.append(f"{where}: unknown parameter {key!r} for {method} (expected "
                            f"{', '.join(sorted(allowed)) or 'none'})")
            continue
        kind = (PER_INPUT.get(key) or SHARED[key])[0]
        leaves = check(setting, kind, f"{where}.{key}", problems)
        for v in leaves:
            bad = _range(key, v, method)
            if bad:
                problems.append(f"{where}.{key} {bad}, got {v!r}")
                break
    return params


def _range(key: str, v: Any, method: str | None) -> str | None:
    if key == "density" and not 0 < v <= 1:
        return "must be in (0, 1]"
    if key == "gamma" and not 0 <= v < 1:
        return "must be in [0, 1)"
    if key == "epsilon" and not 0 <= v < 0.5:
        return "must be in [0, 0.5)"
    if key == "consensus" and v not in ("sum", "count"):
        return "must be 'sum' or 'count'"
    if key == "rescale":
        if v not in (True, False, "inverse", "l1", "none"):
            return ("must be one of true or 'l1' (match the task vector's L1 norm, mergekit's), 'inverse' "
                    "(x 1/density, the DARE paper's), false or 'none' (no rescaling)")
        if v not in (False, "none") and method in METHODS and METHODS[method][0] not in ("random", "della"):
            return (f"rescales only random masks (dare_*, della*); {method} keeps its trimmed entries as they are "
                    "(mergekit would L1-rescale them: not supported)")
    return None


def check_entry(entry: Any, where: str, keys: tuple[str, ...], method: str | None, checkpoint: Resolve,
           problems: list[str]) -> Source | None:
    """Validate one ``models`` entry or slice source; returns its :class:`Source` (None when unusable).

    Args:
        entry: the entry as written.
        where: its place in the recipe, for messages.
        keys: the keys it may have.
        method: the recipe's method (which parameters it reads).
        checkpoint: resolves the model path to a checkpoint source.
        problems: where problems are appended.
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
        problems.append(f"{where} must be a mapping with a 'model' path, got {entry!r}")
        return None
    problems += [f"{where}: unknown key {k!r} (expected {', '.join(keys)})" for k in entry if k not in keys]
    params = check_params(entry.get("parameters"), f"{where}.parameters", method, shared=False, problems=problems)
    src = checkpoint(entry["model"], f"{where}.model")
    if src is None:
        return None
    layers = None
    if "layer_range" in keys:
        lr = entry.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in lr) and lr[0] < lr[1]):
            problems.append(f"{where}.layer_range must be [first, end) with first < end, got {lr!r}")
            return None
        layers = (lr[0], lr[1])
    return Source(src.ck, src.path, params, layers)


def check_slices(items: Any, method: str | None, base: Source | None, checkpoint: Resolve,
            problems: list[str]) -> list[tuple[list[Source], Source | None, Any]]:
    """Validate ``slices``: sources, equal lengths, the base among the sources, the method's input counts.

    Returns:
        Per slice: its sources, its base (the slice's ``base_model`` or the recipe's, when the method
        uses one) and its ``parameters``.
    """
    if not isinstance(items, list) or not items:
        problems.append(f"slices must be a non-empty list of {{sources: [{{model, layer_range}}]}}, got {items!r}")
        return []
    out = []
    for i, item in enumerate(items):
        where = f"slices[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
            problems.append(f"{where} must be a mapping with a non-empty sources list, got {item!r}")
            continue
        problems += [f"{where}: unknown key {k!r} (expected sources, base_model, parameters)" for k in item
                     if k not in ("sources", "base_model", "parameters")]
        scope = check_params(item.get("parameters"), f"{where}.parameters", method, shared=True, problems=problems)
        slice_base = checkpoint(item["base_model"], f"{where}.base_model") if item.get("base_model") else base
        srcs = [s for j, e in enumerate(item["sources"])
                if (s := check_entry(e, f"{where}.sources[{j}]", ("model", "layer_range", "parameters"), method,
                                checkpoint, problems)) is not None]
        if len(srcs) != len(item["sources"]):
            continue
        lengths = {s.layers[1] - s.layers[0] for s in srcs}
        if len(lengths) > 1:
            problems.append(f"{where}: every source of a slice spans the same number of layers, got "
                            f"{sorted(lengths)}")
        uses = BASE_USE.get(method, "ignored")
        in_slice = slice_base is not None and any(s.ck == slice_base.ck for s in srcs)
        if uses in ("task", "first") and not in_slice:
            problems.append(f"{where}: {method} needs the base model among the slice's sources "
                            f"({slice_base.path if slice_base else 'no base_model given'})")
        n = len(srcs) - (1 if in_slice and uses != "ignored" else 0)
        check_count(method, n, where, problems)
        out.append((srcs, slice_base if uses != "ignored" else None, scope))
    return out


def check_path(value: Any, where: str, root: Path, problems: list[str],
               recipe_dir: Path | None = None) -> Path | None:
    """Resolve a model path as mergekit does (against ``root``, the working directory) and check it.

    Returns:
        The checkpoint's path, or None (the problem appended): not a path, missing, no
        safetensors, or ambiguous (exists beside the recipe as another checkpoint).
    """
    if not isinstance(value, str) or not value:
        problems.append(f"{where} must be a path, got {value!r}")
        return None
    given = Path(value).expanduser()
    p = given if given.is_absolute() else root / given
    beside = None if given.is_absolute() or recipe_dir is None else recipe_dir / given
    if beside is not None and beside.exists() and (not p.exists() or beside.resolve() != p.resolve()):
        if p.exists():
            problems.append(f"{where}: {value!r} is ambiguous: relative to the working directory it is {p}, relative "
                            f"to the recipe's folder it is {beside}; polymod resolves relative paths against the "
                            "working directory, as mergekit does — write the path absolute to say which")
        else:
            problems.append(f"{where}: {p} does not exist; relative paths resolve against the working directory "
                            f"{root} (as in mergekit), and {value!r} exists only beside the recipe ({beside}): "
                            f"run from {recipe_dir} or write the path absolute")
        return None
    try:
        checkpoint_files(p)
    except FormatError as exc:
        problems.append(f"{where}: {exc} (polymod merges local safetensors checkpoints)")
        return None
    return p
