"""What a finished run leaves in its output directory.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from polymod.format import save

if TYPE_CHECKING:  # the trainer writes its outputs through this file: importing it back would be a cycle
    from polymod.training.trainer import Trainer, TrainResult


def recipe(trainer: Trainer) -> dict[str, Any]:
    """The lineage recipe recorded on trained modules' cards."""
    cfg = trainer.config
    return {"method": "polymod.training.Trainer", "steps": cfg.steps, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "lr": cfg.lr, "schedule": cfg.schedule, "warmup": cfg.warmup,
            "seed": cfg.seed, "trained_with": sorted(trainer.trainables),
            "tasks": [t for t in trainer.tasks if t is not None]}


def write_outputs(trainer: Trainer, result: TrainResult) -> None:
    """Write ``trained.safetensors``, ``modules/`` and ``result.json`` under ``trainer.output_dir``."""

    out: Path = trainer.output_dir
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".trained.safetensors.tmp"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in trainer.weights().items()}, str(tmp))
    os.replace(tmp, out / "trained.safetensors")
    library = getattr(trainer.model, "library", {})
    for name in trainer.trainables:
        if name in library:
            module = library[name]
            module.card.metrics = dict(result.metrics)
            module.card.lineage.recipe = recipe(trainer)
            save(module, out / "modules" / name, base_model=getattr(trainer.model, "host", None))
    summary = {"step": result.step, "stopped_early": result.stopped_early, "best": result.best,
               "metrics": result.metrics}
    (out / "result.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
