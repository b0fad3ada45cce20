"""Merge recipes: the mergekit-compatible YAML subset behind ``polymod merge recipe.yaml``.

A recipe names checkpoints and a method, as mergekit's ``mergekit-yaml``
does::

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties,
                                  # breadcrumbs, breadcrumbs_ties
    base_model: ./llama-base      # required except for linear
    models:
      - model: ./llama-math
        parameters: {weight: 1.0, density: 0.2}
      - model: ./llama-code
        parameters: {weight: 0.5, density: 0.2}
    parameters: {normalize: true, lambda: 1.0}   # shared; weight/density here are defaults
    dtype: bfloat16                               # output dtype (default: the base's)

Semantics follow mergekit 0.1.5: the same per-method ``normalize`` defaults,
``linear`` merges the weights themselves (normalised by default), a model equal
to ``base_model`` is not an input of the task-vector methods, and DARE's
``rescale: true`` (the default) matches each task vector's L1 norm; polymod
also accepts ``rescale: inverse`` (×1/density, the DARE paper's). Two documented
differences: arithmetic runs in float32 whatever ``dtype`` says (mergekit
computes in ``dtype``), and DARE's random masks come from polymod's seeded
per-tensor generators, so they differ from mergekit's draws.

The whole recipe is validated before anything is read or written, and every
problem is reported in one :class:`~polymod.errors.ConfigError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from polymod.errors import ConfigError, FormatError
from polymod.merging.merge import recipe_of
from polymod.merging.methods import MergeSpec
from polymod.merging.shards import Checkpoint, checkpoint_files
from polymod.merging.streaming import layout_problems, merge_checkpoints

RECIPE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_TOP_KEYS = ("models", "base_model", "merge_method", "parameters", "dtype")
_MODEL_PARAMS = ("weight", "density", "gamma")
_SHARED_PARAMS = ("normalize", "lambda", "rescale", "int8_mask", "consensus", *_MODEL_PARAMS)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: what :func:`run_recipe` merges."""

    base: Path | None
    models: tuple[Path, ...]
    spec: MergeSpec
    dtype: torch.dtype | None


def load_recipe(path: str | os.PathLike, seed: int = 0) -> Recipe:
    """Read and validate a recipe file (one YAML document).

    Relative model paths resolve against the working directory, as ``mergekit-yaml``
    resolves them; a relative path that names a different checkpoint next to the
    recipe file is refused as ambiguous (see :func:`parse_recipe`).

    Raises:
        ConfigError: listing every problem of the recipe at once.
    """
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
    if len(docs) != 1:
        raise ConfigError(f"{path} holds {len(docs)} YAML documents; a recipe is exactly one document (mergekit "
                          "reads one too): put each merge in its own file" + (" (documents are separated by "
                          "'---')" if docs else ""))
    return parse_recipe(docs[0], root=Path.cwd(), seed=seed, source=str(path), recipe_dir=path.parent)


def parse_recipe(data: Any, root: Path | None = None, seed: int = 0, source: str = "recipe",
                 recipe_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as parsed YAML (see :func:`load_recipe`).

    Args:
        data: the parsed YAML document.
        root: the directory relative model paths resolve against (default: the working
            directory, as in mergekit).
        seed: seed of random masks (DARE).
        source: the recipe's name in messages.
        recipe_dir: the recipe file's folder; a relative path that exists there but names
            another checkpoint than under ``root`` is refused as ambiguous.

    Raises:
        ConfigError: listing every problem of the recipe at once.
    """
    root = Path.cwd() if root is None else root
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping with {', '.join(_TOP_KEYS)}; got {type(data).__name__}")
    problems += [f"unknown key {k!r} (polymod reads the subset {', '.join(_TOP_KEYS)})" for k in data
                 if k not in _TOP_KEYS]
    method = data.get("merge_method")
    if method not in RECIPE_METHODS:
        problems.append(f"merge_method is {method!r}; expected one of {', '.join(RECIPE_METHODS)}")
    shared = data.get("parameters") or {}
    if not isinstance(shared, dict):
        problems.append(f"parameters must be a mapping, got {shared!r}")
        shared = {}
    problems += [f"parameters: unknown parameter {k!r} (expected {', '.join(_SHARED_PARAMS)})" for k in shared
                 if k not in _SHARED_PARAMS]
    base_given = data.get("base_model") is not None
    base = _path(data.get("base_model"), "base_model", root, problems, recipe_dir) if base_given else None
    if not base_given and method in RECIPE_METHODS and method != "linear":
        problems.append(f"base_model is required by {method} (task vectors are taken against it)")
    models, weights, density, gamma = [], [], [], []
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        problems.append(f"models must be a non-empty list of {{model: path, parameters: {{...}}}}, got {entries!r}")
        entries = []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            problems.append(f"{where} must be a mapping with a 'model' path, got {entry!r}")
            continue
        problems += [f"{where}: unknown key {k!r} (expected model, parameters)" for k in entry
                     if k not in ("model", "parameters")]
        p = _path(entry["model"], f"{where}.model", root, problems, recipe_dir)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append(f"{where}.parameters must be a mapping, got {params!r}")
            params = {}
        problems += [f"{where}.parameters: unknown parameter {k!r} (expected {', '.join(_MODEL_PARAMS)})"
                     for k in params if k not in _MODEL_PARAMS]
        if base is not None and p is not None and p.resolve() == base.resolve() and method != "linear":
            continue  # mergekit lists the base among the models; it is no task vector
        values = {k: params.get(k, shared.get(k)) for k in _MODEL_PARAMS}
        if values["weight"] is None:
            problems.append(f"{where} ({entry['model']}) has no parameters.weight and parameters sets no default")
        for key, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                problems.append(f"{where}.parameters.{key} must be a number, got {value!r} "
                                "(per-layer gradients and filters are not supported)")
                values[key] = None
        if values["density"] is not None and not 0 < values["density"] <= 1:
            problems.append(f"{where}.parameters.density must be in (0, 1], got {values['density']}")
        if values["gamma"] is not None and not 0 <= values["gamma"] < 1:
            problems.append(f"{where}.parameters.gamma must be in [0, 1), got {values['gamma']}")
        models.append(p)
        weights.append(values["weight"] if values["weight"] is not None else 1.0)
        density.append(values["density"] if values["density"] is not None else 1.0)
        gamma.append(values["gamma"] if values["gamma"] is not None else 0.01)
    if entries and not models:
        problems.append("models lists only the base model; nothing to merge")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        problems.append(f"dtype is {dtype!r}; expected one of {', '.join(DTYPES)}")
    kwargs = _shared(shared, problems)
    if not problems and None not in models:
        problems += _checkpoint_problems(base, models)
    if problems:
        lines = "\n  - ".join(problems)
        raise ConfigError(f"{source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n  - {lines}")
    if method == "linear" and "normalize" not in kwargs:
        kwargs["normalize"] = True  # mergekit's linear normalises by default
    spec = MergeSpec(method, tuple(weights), tuple(density), tuple(gamma), seed=seed, **kwargs)
    return Recipe(base if method != "linear" else None, tuple(models), spec, DTYPES.get(dtype))


def _path(value: Any, where: str, root: Path, problems: list[str], recipe_dir: Path | None = None) -> Path | None:
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


def _shared(shared: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("normalize", "int8_mask"):
        if key in shared and not isinstance(shared[key], bool):
            problems.append(f"parameters.{key} must be true or false, got {shared[key]!r}")
    if "normalize" in shared and isinstance(shared["normalize"], bool):
        out["normalize"] = shared["normalize"]
    lam = shared.get("lambda")
    if lam is not None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            problems.append(f"parameters.lambda must be a number, got {lam!r}")
        else:
            out["lam"] = float(lam)
    rescale = shared.get("rescale", True)
    if rescale not in (True, False, "inverse", "l1", "none"):
        problems.append(f"parameters.rescale must be one of true or 'l1' (match the task vector's L1 norm, "
                        "mergekit's), 'inverse' (x 1/density, the DARE paper's), false or 'none' (no rescaling); "
                        f"got {rescale!r}")
    else:
        out["rescale"] = {True: "l1", False: "none"}.get(rescale, rescale)
    consensus = shared.get("consensus", "sum")
    if consensus not in ("sum", "count"):
        problems.append(f"parameters.consensus must be 'sum' or 'count', got {consensus!r}")
    else:
        out["consensus"] = consensus
    return out


def _checkpoint_problems(base: Path | None, models: list[Path]) -> list[str]:
    cks = [Checkpoint(p) for p in models]
    ref = Checkpoint(base) if base is not None else cks[0]
    try:
        return layout_problems(ref, cks)
    finally:
        for ck in {id(c): c for c in [*cks, ref]}.values():
            ck.close()


def run_recipe(recipe: Recipe, out_dir: str | os.PathLike, *, shard_bytes: int = 2 * 1024**3,
               progress: bool = True) -> Path:
    """Run a validated recipe, streaming tensor by tensor, with a progress bar on stderr.

    Besides the shards and the index, the output holds ``merge_recipe.json``: the inputs
    and every resolved parameter (the lineage of the merged checkpoint).

    Returns:
        The output directory.
    """

    with Checkpoint(recipe.base or recipe.models[0]) as ref:
        total = sum(i.end - i.start for i in ref.infos.values())
    columns = (TextColumn("merging {task.fields[tensor]:<48.48}"), BarColumn(), DownloadColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("merge", total=total, tensor="")
        return merge_checkpoints(recipe.base, list(recipe.models), recipe.spec, out_dir, dtype=recipe.dtype,
                                 shard_bytes=shard_bytes, finish=lambda stage: _finish(recipe, stage),
                                 progress=lambda name, n: bar.update(task, advance=n, tensor=name))


def _finish(recipe: Recipe, out: Path) -> None:
    """Lineage beside the weights, and the output dtype in ``config.json`` (as mergekit writes it)."""
    dtype = str(recipe.dtype).removeprefix("torch.") if recipe.dtype else None
    lineage = {"base_model": str(recipe.base) if recipe.base else None, "models": [str(m) for m in recipe.models],
               "recipe": recipe_of(recipe.spec), "dtype": dtype}
    (out / "merge_recipe.json").write_text(json.dumps(lineage, indent=2) + "\n")
    config = out / "config.json"
    if dtype is not None and config.is_file():
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):  # transformers >= 4.56 writes "dtype"; older ones "torch_dtype"
            if key == "dtype" or key in data:
                data[key] = dtype
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def parse_size(text: str) -> int:
    """Bytes in a size such as ``500MB``, ``2GB`` or ``1048576``.

    Raises:
        ConfigError: the size does not parse or is not positive.
    """
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    s = str(text).strip().upper()
    number = s.rstrip("KMGIB")
    try:
        value = float(number) * units[s[len(number):]]
    except (ValueError, KeyError):
        value = -1
    if value <= 0:
        raise ConfigError(f"shard size {text!r} is not a size; use e.g. 500MB or 2GB")
    return int(value)


def merge_command(recipe: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0, shard_size: str = "2GB",
                  progress: bool = True) -> Path:
    """What ``polymod merge`` does: validate the recipe whole, then stream the merge into ``out``."""
    return run_recipe(load_recipe(recipe, seed=seed), out, shard_bytes=parse_size(shard_size), progress=progress)
