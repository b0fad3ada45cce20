"""Merge recipes: the mergekit-compatible YAML behind ``polymod merge recipe.yaml``.

A recipe names checkpoints and a method, as mergekit's ``mergekit-yaml``
does::

    merge_method: ties            # see RECIPE_METHODS
    base_model: ./llama-base      # required by the task-vector methods, slerp and model_stock
    models:
      - model: ./llama-math
        parameters: {weight: 1.0, density: [0.1, 0.5]}     # a per-layer gradient
      - model: ./llama-code
        parameters: {weight: 0.5, density: 0.2}
    parameters:                   # shared; per-input parameters here are defaults
      normalize: true
      weight: [{filter: mlp, value: 0.8}, {value: 1.0}]  # a filter override
    dtype: bfloat16               # output dtype (default: the base's), also written to config.json
    tokenizer_source: union       # optional: base, union or a model path (see polymod.merging.vocab)

or, instead of ``models``, ``slices:`` of layer ranges (``sources: [{model,
layer_range: [a, b]}]``, each slice with its own ``parameters`` and optional
``base_model``), e.g. a ``passthrough`` frankenmerge that stacks layers of
several models. Methods, parameters, gradients, filters and slices follow
mergekit 0.1.5 (:mod:`.recipe_plan`, :mod:`.settings`); arithmetic runs in
float32 whatever ``dtype`` says (mergekit computes in ``dtype``), and random
masks (DARE, DELLA) come from polymod's seeded per-tensor generators.

The whole recipe is validated, and planned tensor by tensor against the
checkpoints' headers, before anything is written; every problem is reported in
one :class:`~polymod.errors.ConfigError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from polymod.errors import ConfigError
from polymod.merging.interp import InterpSpec
from polymod.merging.jobs import Job, run_jobs
from polymod.merging.layers import NUM_LAYER_KEYS, is_post
from polymod.merging.merge import recipe_of
from polymod.merging.methods import MergeSpec
from polymod.merging.recipe_check import (
    check_count,
    check_entry,
    check_params,
    check_path,
    check_slices,
    layout_diff,
)
from polymod.merging.recipe_plan import (
    BASE_USE,
    PARAMS,
    RECIPE_METHODS,
    REFUSED_METHODS,
    Source,
    job_problems,
    plan_models,
    plan_slices,
)
from polymod.merging.shards import Checkpoint, staged_output
from polymod.merging.streaming import copy_files
from polymod.merging.vocab import SOURCES, VocabPlan, VocabView, permute_jobs, plan_vocabulary

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")
_REFUSED = {
    "modules": "per-module recipes (several layer stacks, e.g. vision + text) are not supported; use models or slices",
    "tokenizer": "the tokenizer block (per-token embedding sources, pad_to_multiple_of) is not supported; use "
                 "tokenizer_source: base, union or a model path (default rows as mergekit chooses them)",
    "chat_template": "chat templates are not set by polymod merge; edit tokenizer_config.json of the output",
}


@dataclass(frozen=True)
class Recipe:
    """A validated, planned recipe: what :func:`run_recipe` streams.

    Attributes:
        method: the merge method.
        base: the base model, when the method uses one.
        models: the other inputs (lineage).
        checkpoints: every distinct checkpoint, indexed by the jobs.
        jobs: one per output tensor, parameters resolved.
        dtype: output dtype of floating tensors (None: each reference tensor's).
        config_from: the checkpoint whose config and tokenizer files are copied.
        layers: the output's number of layers when ``slices`` restack them (written to config.json).
        data: the recipe as parsed (kept in the output's lineage).
        vocab: with ``tokenizer_source``, the output vocabulary; jobs of token-indexed tensors read
            checkpoint index ``len(checkpoints)``, the :class:`~polymod.merging.vocab.VocabView`.
    """

    method: str
    base: Path | None
    models: tuple[Path, ...]
    checkpoints: tuple[Path, ...]
    jobs: tuple[Job, ...]
    dtype: torch.dtype | None
    config_from: Path
    layers: int | None = None
    data: Any = None
    vocab: VocabPlan | None = None

    @property
    def spec(self) -> MergeSpec | InterpSpec | None:
        """The one resolved method of every tensor, or None when parameters vary per tensor."""
        specs = {job.spec for job in self.jobs if job.inputs}
        return next(iter(specs)) if len(specs) == 1 else None


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
    """Validate a recipe given as parsed YAML and plan it against the checkpoints (see :func:`load_recipe`).

    Args:
        data: the parsed YAML document.
        root: the directory relative model paths resolve against (default: the working
            directory, as in mergekit).
        seed: seed of random masks (DARE, DELLA).
        source: the recipe's name in messages.
        recipe_dir: the recipe file's folder; a relative path that exists there but names
            another checkpoint than under ``root`` is refused as ambiguous.

    Raises:
        ConfigError: listing every problem of the recipe at once.
    """
    root = Path.cwd() if root is None else root
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping with {', '.join(_TOP_KEYS)}; got {type(data).__name__}")
    problems: list[str] = []
    for key in data:
        if key in _REFUSED:
            problems.append(f"{key}: {_REFUSED[key]}")
        elif key not in _TOP_KEYS:
            problems.append(f"unknown key {key!r} (polymod reads {', '.join(_TOP_KEYS)})")
    method = data.get("merge_method")
    if method in REFUSED_METHODS:
        problems.append(f"merge_method {method} is not supported: {REFUSED_METHODS[method]}")
        method = None
    elif method not in RECIPE_METHODS:
        problems.append(f"merge_method is {method!r}; expected one of {', '.join(RECIPE_METHODS)}")
        method = None
    paths: list[Path] = []

    def checkpoint(value: Any, where: str) -> Source | None:
        p = check_path(value, where, root, problems, recipe_dir)
        if p is None:
            return None
        for i, q in enumerate(paths):
            if q.resolve() == p.resolve():
                return Source(i, q)
        paths.append(p)
        return Source(len(paths) - 1, p)

    base = checkpoint(data["base_model"], "base_model") if data.get("base_model") is not None else None
    uses_base = BASE_USE.get(method, "ignored")
    if data.get("base_model") is None and uses_base in ("task", "first"):
        problems.append(f"base_model is required by {method} ("
                        + ("task vectors are taken against it)" if uses_base == "task" else "it is the first input)"))
    global_scope = check_params(data.get("parameters"), "parameters", method, shared=True, problems=problems)
    has_models, has_slices = data.get("models") is not None, data.get("slices") is not None
    if has_models == has_slices:
        problems.append("give exactly one of models (a list of {model, parameters}) or slices (a list of "
                        "{sources: [{model, layer_range}]}), as mergekit")
    slices: list[tuple[list[Source], Source | None, Any]] = []
    sources: list[Source] = []
    listed: list[int] = []  # checkpoints of the models entries as listed, base included (mergekit's order)
    if has_models:
        entries = data["models"]
        if not isinstance(entries, list) or not entries:
            problems.append(f"models must be a non-empty list of {{model: path, parameters: {{...}}}}, got {entries!r}")
            entries = []
        for i, entry in enumerate(entries):
            src = check_entry(entry, f"models[{i}]", ("model", "parameters"), method, checkpoint, problems)
            if src is None:
                continue
            listed.append(src.ck)
            if base is not None and src.ck == base.ck and uses_base != "ignored":
                continue  # mergekit lists the base among the models; it is no task vector
            if uses_base in ("task", "ignored") and method in PARAMS and "weight" in PARAMS[method][0] \
                    and not _has(src.params, "weight") and not _has(global_scope, "weight"):
                problems.append(f"models[{i}] ({entry['model']}) has no parameters.weight and parameters sets "
                                "no default")
            sources.append(src)
        if entries and not sources and not problems:
            problems.append("models lists only the base model; nothing to merge")
        check_count(method, len(sources), "models", problems)
    elif has_slices:
        slices = check_slices(data["slices"], method, base, checkpoint, problems)
    tok_source = _tokenizer_source(data.get("tokenizer_source"), root, problems)
    out_dtype = data.get("out_dtype", data.get("dtype"))
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            problems.append(f"{key} is {data[key]!r}; expected one of {', '.join(DTYPES)}")
    if problems:
        raise _error(source, problems)
    cks = [Checkpoint(p) for p in paths]
    vocab, vocab_names = None, set()
    try:
        base_used = base if uses_base != "ignored" else None
        if tok_source is not None:
            vocab = plan_vocabulary(tok_source, paths, base.ck if base is not None else None)
            vocab_names = {n for i, ck in enumerate(cks) for n in vocab.vocab_tensors(ck, i)}
        if has_models:
            ref = cks[(base_used or sources[0]).ck]
            problems += [f"{paths[i]} {what}" for i, ck in enumerate(cks) if ck is not ref
                         for what in layout_diff(ref, ck, vocab_names)]
            jobs = [] if problems else plan_models(method, sources, base_used, cks, [global_scope], seed)
            layers = None
        else:
            jobs, layers = plan_slices(method, slices, cks, global_scope, seed, problems)
        if vocab is not None and not problems:
            order = tuple(listed + [base.ck] if base is not None and base.ck not in listed else listed)
            jobs = permute_jobs(jobs, vocab, vocab_names, len(cks), lambda job: _group(
                job, order if has_models else None, slices, base))
            cks.append(VocabView(vocab, cks))  # type: ignore[arg-type]
        problems += job_problems(jobs, cks, [*paths, Path("<permuted vocabulary>")]) if not problems else []
    except ConfigError as exc:
        problems.append(str(exc))
    finally:
        for ck in cks:
            ck.close()
    if problems:
        raise _error(source, problems)
    config_from = (base or (sources[0] if sources else slices[0][0][0])).path
    models = tuple(s.path for s in sources) if has_models else tuple(dict.fromkeys(
        s.path for srcs, _, _ in slices for s in srcs))
    return Recipe(method, base.path if base_used else None, models, tuple(paths), tuple(jobs),
                  DTYPES.get(out_dtype), config_from, layers, data, vocab)


def _tokenizer_source(value: Any, root: Path, problems: list[str]) -> str | Path | None:
    """``tokenizer_source`` as written: ``base``, ``union`` or a checkpoint path (resolved as model paths are)."""
    if value is None or value in SOURCES:
        return value
    if not isinstance(value, str) or not value:
        problems.append(f"tokenizer_source is {value!r}; expected base, union or a model path")
        return None
    given = Path(value).expanduser()
    path = given if given.is_absolute() else root / given
    if not path.is_dir():
        problems.append(f"tokenizer_source: {path} is not a directory (expected base, union or a model path, "
                        "relative to the working directory as model paths are)")
        return None
    return path


def _group(job: Job, order: tuple[int, ...] | None, slices: list[tuple[list[Source], Source | None, Any]],
           base: Source | None) -> tuple[tuple[int, ...], int | None]:
    """The models a token-indexed job is merged from, in mergekit's order, and the base among them."""
    if order is None:  # slices: embeddings from the first slice's sources, the head from the last slice's
        srcs, slice_base, _ = slices[0] if not is_post(job.name) else slices[-1]
        order = tuple(s.ck for s in srcs)
        base = slice_base or base
    return order, base.ck if base is not None and base.ck in order else None


def _error(source: str, problems: list[str]) -> ConfigError:
    lines = "\n  - ".join(problems)
    return ConfigError(f"{source} has {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n  - {lines}")


def _has(scope: dict[str, Any] | None, name: str) -> bool:
    return bool(scope) and name in scope


def run_recipe(recipe: Recipe, out_dir: str | os.PathLike, *, shard_bytes: int = 2 * 1024**3,
               progress: bool = True) -> Path:
    """Run a planned recipe, streaming tensor by tensor, with a progress bar on stderr.

    The output is staged beside ``out_dir`` and replaces it whole when complete. Besides
    the shards and the index it holds the config and tokenizer files of the base model
    (or the first model) with the output dtype and, after ``slices``, the new number of
    layers, and ``merge_recipe.json``: the inputs, the recipe and every resolved
    parameter (the lineage of the merged checkpoint).

    Returns:
        The output directory.
    """

    cks: list[Any] = [Checkpoint(p) for p in recipe.checkpoints]
    if recipe.vocab is not None:
        cks.append(VocabView(recipe.vocab, cks))
    try:
        total = sum(cks[ck].infos[n].end - cks[ck].infos[n].start for ck, n in
                    (job.base or job.inputs[0] for job in recipe.jobs))
        columns = (TextColumn("merging {task.fields[tensor]:<48.48}"), BarColumn(), DownloadColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, transient=True, console=Console(stderr=True), disable=not progress) as bar, \
                staged_output(out_dir) as stage:
            task = bar.add_task("merge", total=total, tensor="")
            run_jobs(cks, list(recipe.jobs), stage, dtype=recipe.dtype, shard_bytes=shard_bytes, block=1 << 20,
                     progress=lambda name, n: bar.update(task, advance=n, tensor=name))
            copy_files(recipe.config_from, stage, tokenizer=recipe.vocab is None)
            if recipe.vocab is not None:
                recipe.vocab.tokenizer.save_pretrained(str(stage))
            _finish(recipe, stage)
    finally:
        for ck in cks:
            ck.close()
    return Path(out_dir)


def _finish(recipe: Recipe, out: Path) -> None:
    """Lineage beside the weights; the output dtype and layer count in ``config.json`` (as mergekit writes them)."""
    dtype = str(recipe.dtype).removeprefix("torch.") if recipe.dtype else None
    spec = recipe.spec
    resolved = None if spec is None else recipe_of(spec) if isinstance(spec, MergeSpec) else asdict(spec)
    lineage = {"method": recipe.method, "base_model": str(recipe.base) if recipe.base else None,
               "models": [str(m) for m in recipe.models], "recipe": resolved, "dtype": dtype,
               "layers": recipe.layers, "vocab_size": recipe.vocab.size if recipe.vocab else None,
               "source": recipe.data}
    (out / "merge_recipe.json").write_text(json.dumps(lineage, indent=2, default=str) + "\n")
    config = out / "config.json"
    if config.is_file() and (dtype is not None or recipe.layers is not None or recipe.vocab is not None):
        data = json.loads(config.read_text())
        if dtype is not None:
            for key in ("dtype", "torch_dtype"):  # transformers >= 4.56 writes "dtype"; older ones "torch_dtype"
                if key == "dtype" or key in data:
                    data[key] = dtype
        if recipe.vocab is not None:
            data["vocab_size"] = recipe.vocab.size
        if recipe.layers is not None:
            for key in NUM_LAYER_KEYS:
                if key in data:
                    data[key] = recipe.layers
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
