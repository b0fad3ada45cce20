"""Resumable training checkpoints in safe formats, written atomically.

A checkpoint is a directory ``<output>/checkpoints/step-000120/`` holding

* ``weights.safetensors`` — the trained parameters (``<name>.<parameter>``),
* ``optimizer.safetensors`` + the optimiser's non-tensor state in ``state.json``,
* ``rng-rank<r>.safetensors`` + ``rng-rank<r>.json`` — torch (CPU and CUDA),
  NumPy and Python random states of every rank,
* ``best.safetensors`` — the weights of the best evaluation so far, when kept,
* ``state.json`` — step, data position, scheduler, loss scaler, early-stopping
  state and the config that made the run.

Tensors go to safetensors and everything else to JSON: nothing is unpickled on
resume. Each checkpoint is written into a hidden temporary sibling and renamed
into place; ``latest`` names the newest one and is itself replaced atomically,
so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from polymod.errors import FormatError

FORMAT_VERSION = 1
LATEST = "latest"


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not a readable checkpoint file: {exc}") from exc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type and OSError
        raise FormatError(f"{path} is not a readable safetensors file: {exc}") from exc


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    return value


# -- optimiser ----------------------------------------------------------------------------------


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = _jsonable(value)
    return tensors, {"scalars": scalars, "param_groups": _jsonable(state["param_groups"])}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [dict(g) for g in rest["param_groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# -- random number generators -------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch, CUDA, NumPy and Python RNG states (tensors, JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    rest = {"python": [version, list(internal), gauss], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, _jsonable(rest)


def restore_rng(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- directories --------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The hidden directory a checkpoint is assembled in before its rename (shared by all ranks)."""
    path = Path(output_dir) / "checkpoints" / f".staging-step-{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_rng(directory: Path, rank: int) -> None:
    """Write this rank's RNG states into a staging directory."""
    tensors, rest = capture_rng()
    save_file(tensors, str(directory / f"rng-rank{rank}.safetensors"))
    _write_json(directory / f"rng-rank{rank}.json", rest)


def commit(directory: Path, output_dir: str | os.PathLike, step: int, *, weights: dict[str, torch.Tensor],
           optimizer: dict[str, Any], state: dict[str, Any], best: dict[str, torch.Tensor] | None,
           keep: int) -> Path:
    """Write the rank-0 files into ``directory``, rename it into place, update ``latest``, prune old ones.

    Returns:
        The final checkpoint directory.
    """
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(cpu, str(directory / "weights.safetensors"))
    opt_tensors, opt_rest = split_optimizer_state(optimizer)
    save_file(opt_tensors, str(directory / "optimizer.safetensors"))
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, str(directory / "best.safetensors"))
    _write_json(directory / "state.json", {**state, "format_version": FORMAT_VERSION, "optimizer": opt_rest})
    final = checkpoint_dir(output_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(directory, final)
    root = final.parent
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".latest-")
    with os.fdopen(fd, "w") as f:
        f.write(final.name + "\n")
    os.replace(tmp, root / LATEST)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    root = Path(output_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def read(path: str | os.PathLike, rank: int) -> dict[str, Any]:
    """Read a checkpoint for ``rank``: weights, optimiser state, RNG, best weights and state.

    Raises:
        FormatError: missing or unreadable files, or a newer format.
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FormatError(f"{path} is not a polymod training checkpoint (state.json is missing)")
    state = _read_json(path / "state.json")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise FormatError(f"{path} was written by a newer polymod (checkpoint format {state['format_version']})")
    rng_file = path / f"rng-rank{rank}.safetensors"
    if not rng_file.is_file():
        raise FormatError(f"{path} has no RNG state for rank {rank}; resume with the world size that wrote it")
    best = path / "best.safetensors"
    return {
        "state": state,
        "weights": _read_tensors(path / "weights.safetensors"),
        "optimizer": join_optimizer_state(_read_tensors(path / "optimizer.safetensors"), state["optimizer"]),
        "rng": (_read_tensors(rng_file), _read_json(path / f"rng-rank{rank}.json")),
        "best": _read_tensors(best) if best.is_file() else None,
    }
