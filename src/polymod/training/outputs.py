"""What a finished run leaves: its :class:`TrainResult`, and the files in its output directory.

* ``trained.safetensors`` — every trained parameter, ``<name>.<parameter>``;
* ``modules/<name>/`` — each trained library module in polymod's module format
  (:func:`polymod.save`), its card carrying the final evaluation in
  ``metrics``, the training recipe in ``lineage.recipe`` and the checkpoint
  it was trained on in ``host.base_model`` (path plus config and weight hashes);
* ``result.json`` — steps, early stopping, best and final evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from polymod.format import save
from polymod.modules.contract import Module
from polymod.training.config import TrainConfig


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        step: optimiser steps completed.
        stopped_early: whether early stopping ended the run.
        metrics: the last evaluation (empty without evaluation data).
        best: ``{"step", "value"}`` of the best evaluation of ``monitor`` (None without evaluation).
        history: every evaluation record, in order.
        output_dir: where logs, checkpoints and trained modules were written (None: nowhere).
        train_loss: the mean training loss of the last logged window (None if this call logged none).
    """

    step: int
    stopped_early: bool
    metrics: dict[str, float]
    best: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None
    train_loss: float | None = None


def recipe(config: TrainConfig, trainables: Iterable[str], tasks: Iterable[str | None]) -> dict[str, Any]:
    """The lineage recipe recorded on trained modules' cards."""
    return {"method": "polymod.training.Trainer", "steps": config.steps, "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "lr": config.lr, "schedule": config.schedule, "warmup": config.warmup,
            "seed": config.seed, "trained_with": sorted(trainables), "tasks": [t for t in tasks if t is not None]}


def write_outputs(out: Path, weights: Mapping[str, torch.Tensor], result: TrainResult, *,
                  modules: Mapping[str, Module], recipe: dict[str, Any], host: nn.Module | None) -> None:
    """Write ``trained.safetensors``, ``modules/`` and ``result.json`` under ``out``.

    Args:
        out: the run's output directory (created if missing).
        weights: every trained parameter, ``<name>.<parameter>``.
        result: what the run did; its final evaluation goes on each module's card.
        modules: the trained library modules, by name, saved in polymod's format.
        recipe: the lineage recipe for their cards (:func:`recipe`).
        host: the host they were trained on, recorded as the card's base model (None: not recorded).
    """
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".trained.safetensors.tmp"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp))
    os.replace(tmp, out / "trained.safetensors")
    for name, module in modules.items():
        module.card.metrics = dict(result.metrics)
        module.card.lineage.recipe = recipe
        save(module, out / "modules" / name, base_model=host)
    summary = {"step": result.step, "stopped_early": result.stopped_early, "best": result.best,
               "metrics": result.metrics}
    (out / "result.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
