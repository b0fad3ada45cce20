"""Whole checkpoints: streaming merges and task vectors as modules.

**Streaming merge** (mergekit-style). θ = θ_0 + M(θ_1 − θ_0, …, θ_N − θ_0) for
every tensor of sharded safetensors checkpoints, one tensor at a time and, within
a tensor, one flat block of entries at a time, writing sharded output as it goes. Peak
memory is a few copies of the largest tensor (the statistics pass of TIES and
of DARE's L1 rescaling holds the base and one task vector of one tensor),
independent of model size. ``linear`` merges the weights themselves,
θ = Σ w_i θ_i (/ Σ w_i), as mergekit's ``linear`` does. Arithmetic runs in
float32 (float64 for float64 inputs) and is cast to the output dtype at the
end; non-float tensors are copied from the base.

:func:`merge_state_dicts` is the same computation on tensors held in memory;
the streaming result equals it bit for bit (same elementwise kernel, same
masks, same statistics).

**Task vectors** (Ilharco et al. 2023): :func:`task_vector` turns θ_ft − θ_pre
of two checkpoints on disk into a delta module on the host's leaf layers,
dense, or sparsified per tensor by magnitude, or LT-SFT style (Ansell et al.
2022): the entries that moved most across the whole model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from polymod.card import Lineage, Parent
from polymod.errors import ConfigError
from polymod.format import fingerprint
from polymod.merging.jobs import Job, run_jobs, work_dtype
from polymod.merging.methods import MergeSpec, merge_tensor
from polymod.merging.shards import Checkpoint, staged_output
from polymod.merging.sparsify import kth_largest, top_k_trim
from polymod.modules.contract import Module
from polymod.modules.delta import Delta
from polymod.modules.sparse import SparseFT
from polymod.sites import Site, SiteSelector, named_layers, select, site_of

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def merge_state_dicts(base: Mapping[str, torch.Tensor] | None, models: list[Mapping[str, torch.Tensor]],
                      spec: MergeSpec, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Merge whole state dicts in memory (the reference for :func:`merge_checkpoints`).

    Args:
        base: θ_0 by name (None for ``linear``, which merges the weights themselves).
        models: θ_i by name.
        spec: the recipe.
        dtype: output dtype of floating tensors (default: the base's / first model's).

    Returns:
        The merged tensors, in the base's (or first model's) order.
    """
    ref = base if base is not None else models[0]
    out = {}
    for name, t in ref.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        work = work_dtype(t.dtype)
        b = t.to(work) if base is not None else None
        xs = [m[name].to(work) - b if b is not None else m[name].to(work) for m in models]
        mixed = merge_tensor(spec, name, xs)
        out[name] = (mixed if b is None else b + mixed).to(dtype or t.dtype)
    return out


def merge_checkpoints(base: str | os.PathLike | None, models: list[str | os.PathLike], spec: MergeSpec,
                      out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
                      shard_bytes: int = 2 * 1024**3, block: int = 1 << 20,
                      progress: Callable[[str, int], None] | None = None,
                      finish: Callable[[Path], None] | None = None) -> Path:
    """Merge sharded safetensors checkpoints tensor by tensor into ``out_dir``.

    The output is written into a staging directory beside ``out_dir`` that replaces
    ``out_dir`` whole when the merge completes (no stale shards of an earlier merge
    survive; a failed merge leaves ``out_dir`` untouched).

    Args:
        base: the base checkpoint θ_0 (None for ``linear``).
        models: the checkpoints θ_i, one per entry of ``spec.weights``.
        spec: the recipe.
        out_dir: output directory: shards, ``model.safetensors.index.json``, and the base's
            ``config.json``/tokenizer files when present.
        dtype: output dtype of floating tensors (default: the reference tensor's).
        shard_bytes: maximum bytes per output shard.
        block: entries of each tensor read, merged and written at a time (bounds memory).
        progress: called as ``progress(tensor_name, bytes_done)`` after each tensor.
        finish: called with the staging directory once every tensor is written, to add
            files (lineage, config edits) before the output is moved into place.

    Returns:
        The output directory.

    Raises:
        ConfigError: the checkpoints do not share tensor names and shapes (every mismatch listed).
        FormatError: ``out_dir`` is a file or a non-empty directory holding no checkpoint.
    """
    if spec.trim == "global" and spec.sparsify == "magnitude":
        raise ConfigError("a streaming merge trims each tensor (trim='tensor'); trim='global' needs every "
                          "tensor of a checkpoint at once — use pm.merge on task-vector modules for it")
    with staged_output(out_dir) as stage:
        _merge_into(base, models, spec, stage, dtype, shard_bytes, block, progress)
        if finish is not None:
            finish(stage)
    return Path(out_dir)


def _merge_into(base: str | os.PathLike | None, models: list[str | os.PathLike], spec: MergeSpec, out_dir: Path,
                dtype: torch.dtype | None, shard_bytes: int, block: int,
                progress: Callable[[str, int], None] | None) -> None:
    ckpts = [Checkpoint(p) for p in models]
    ref_ck = Checkpoint(base) if base is not None else ckpts[0]
    try:
        problems = layout_problems(ref_ck, ckpts)
        if problems:
            raise ConfigError("the checkpoints do not match:\n  - " + "\n  - ".join(problems))
        n = len(ckpts)
        jobs = [Job(name, tuple((i, name) for i in range(n)), (n, name) if base is not None else None, spec)
                for name in ref_ck.infos]
        run_jobs([*ckpts, ref_ck], jobs, out_dir, dtype=dtype, shard_bytes=shard_bytes, block=block,
                 progress=progress)
    finally:
        for ck in {id(c): c for c in [*ckpts, ref_ck]}.values():
            ck.close()
    copy_files(Path(base if base is not None else models[0]), out_dir)


def copy_files(src: Path, out_dir: Path, tokenizer: bool = True) -> None:
    """Copy the config and (unless ``tokenizer`` is False) tokenizer files of checkpoint ``src`` to ``out_dir``."""
    for f in COPIED_FILES if tokenizer else COPIED_FILES[:2]:
        if src.is_dir() and (src / f).is_file():
            shutil.copyfile(src / f, Path(out_dir) / f)


def layout_problems(ref: Checkpoint, ckpts: list[Checkpoint]) -> list[str]:
    """Every way the checkpoints' tensor names and shapes differ from the reference's."""
    problems = []
    for ck in ckpts:
        if ck is ref:
            continue
        missing = [n for n in ref.infos if n not in ck.infos]
        extra = [n for n in ck.infos if n not in ref.infos]
        shapes = [f"{n} {list(ck.infos[n].shape)} vs {list(i.shape)}" for n, i in ref.infos.items()
                  if n in ck.infos and ck.infos[n].shape != i.shape]
        for what, items in (("lacks", missing), ("has extra tensors", extra), ("has other shapes", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                problems.append(f"{ck.path} {what} relative to {ref.path}: {', '.join(items[:3])}{more}")
    return problems


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint's safetensors files, concatenated in shard order."""
    h = hashlib.sha256()
    with Checkpoint(path) as ck:
        for file in ck.files:
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def task_vector(pretrained: str | os.PathLike, finetuned: str | os.PathLike, host: nn.Module, *,
                sites: str | None = None, sparsify: str | None = None, density: float | None = None,
                name: str | None = None) -> Module:
    """θ_ft − θ_pre of two safetensors checkpoints as a delta module on ``host``'s leaf layers.

    Tensor names are the host's ``state_dict`` names. Every leaf layer (Linear, Conv1D,
    Embedding; restricted by ``sites``) whose weight changed becomes a site; its bias
    change is kept too by the dense result. Changed tensors a module cannot hold (norms,
    or biases of a sparse result) are listed in ``card.metrics["uncaptured"]``.

    Args:
        pretrained: the base checkpoint (file or directory).
        finetuned: the fine-tuned checkpoint.
        host: a model of the checkpoints' architecture (its weights are not read; only layers).
        sites: a site selection to restrict to (roles, globs, ``re:``); default all leaf layers.
        sparsify: None (dense), ``magnitude`` (top ``density`` of each tensor) or ``lt-sft``
            (top ``density`` of all selected entries together, as LT-SFT selects).
        density: fraction kept when sparsifying, in (0, 1].
        name: the module's card name.

    Returns:
        A ``delta`` module (dense) or a ``sparse`` module, with the lineage of both checkpoints.

    Raises:
        ConfigError: bad ``sparsify``/``density``, mismatched checkpoints, or no changed weight.
    """
    if sparsify not in (None, "magnitude", "lt-sft"):
        raise ConfigError(f"sparsify must be None, 'magnitude' or 'lt-sft', got {sparsify!r}")
    if sparsify is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ConfigError(f"sparsify={sparsify!r} needs density in (0, 1], got {density!r}")
    host = getattr(host, "host", host)
    layers = named_layers(host)
    chosen = {s.name for s in select(host, SiteSelector.parse(sites))} if sites else None
    with Checkpoint(pretrained) as pre, Checkpoint(finetuned) as ft:
        problems = layout_problems(pre, [ft])
        if problems:
            raise ConfigError("the checkpoints do not match:\n  - " + "\n  - ".join(problems))
        weights, biases, uncaptured, found = {}, {}, [], []
        for tname in pre.names:
            a, b = pre.read(tname), ft.read(tname)
            if torch.equal(a, b):
                continue
            layer_name, _, attr = tname.rpartition(".")
            layer = layers.get(layer_name)
            site = site_of(layer_name, layer) if layer is not None else None
            ok = site is not None and site.kind != "block" and (chosen is None or layer_name in chosen)
            if ok and attr == "weight":
                weights[layer_name] = (site, b.to(work_dtype(a.dtype)) - a.to(work_dtype(a.dtype)))
                found.append(layer_name)
            elif ok and attr == "bias" and sparsify is None:
                biases[layer_name] = b.to(work_dtype(a.dtype)) - a.to(work_dtype(a.dtype))
            else:
                uncaptured.append(tname)
    if not weights:
        raise ConfigError(f"no leaf-layer weight differs between {pretrained} and {finetuned}"
                          + (f" within sites {sites!r}" if sites else ""))
    module = _vector_module(weights, biases, sparsify, density)
    module.card.name = name
    module.card.host = fingerprint(host, module.sites)
    module.card.metrics["uncaptured"] = uncaptured
    module.card.lineage = Lineage(
        parents=[Parent(str(pretrained), sha256=checkpoint_sha256(pretrained), weight=-1.0),
                 Parent(str(finetuned), sha256=checkpoint_sha256(finetuned), weight=1.0)],
        recipe={"method": "task_vector", "sparsify": sparsify, "density": density, "sites": sites},
    )
    module.card.description = module.card.lineage.describe()
    return module


def _vector_module(weights: dict[str, tuple[Site, torch.Tensor]], biases: dict[str, torch.Tensor],
                   sparsify: str | None, density: float | None) -> Module:
    sites = [s for s, _ in weights.values()]
    if sparsify is None:
        spec = Delta(bias=bool(biases), sites="|".join(weights))
        parts = [spec.build_part(s, None) for s in sites]
        with torch.no_grad():
            for s, p in zip(sites, parts):
                delta = weights[s.name][1]
                p.to(delta.dtype)
                p.weight.copy_(delta)
                if p.bias is not None and s.name in biases:
                    p.bias.copy_(biases[s.name])
        return Module(spec, sites, parts)
    if sparsify == "lt-sft":
        flat = torch.cat([d.abs().reshape(-1) for _, d in weights.values()])  # (Σ numel,)
        t, _, _ = kth_largest(flat, max(1, int(density * flat.numel())))
        kept = {n: d.reshape(-1) * (d.abs() >= t).reshape(-1) for n, (_, d) in weights.items()}
    else:
        trims = {n: top_k_trim(d.abs().reshape(-1), max(1, int(density * d.numel()))) for n, (_, d) in weights.items()}
        kept = {n: d.reshape(-1) if trims[n] is None else trims[n].apply(d.reshape(-1), 0)
                for n, (_, d) in weights.items()}
    support = {n: torch.nonzero(k).view(-1) for n, k in kept.items()}
    counts = tuple((n, int(i.numel())) for n, i in support.items())
    spec = SparseFT(density=float(density), mask="lt-sft", counts=counts, sites="|".join(weights))
    parts = [spec.build_part(s, None) for s in sites]
    with torch.no_grad():
        for s, p in zip(sites, parts):
            delta = weights[s.name][1].reshape(-1)
            p.to(delta.dtype)
            p.indices.copy_(support[s.name].to(torch.int32))
            p.values.copy_(delta[support[s.name]])
    return Module(spec, sites, parts)
