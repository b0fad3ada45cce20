"""LT-SFT as a recipe: phase 1 and the mask by :func:`polymod.training.lt_sft.lt_sft`, phase 2 by the trainer.

Lottery-Ticket Sparse Fine-Tuning (Ansell et al. 2022): fine-tune the selected
host weights fully for a few steps, keep the ``density`` share of entries that
moved most, reset the host, and train a sparse difference on those entries
only. Phase 1 and the selection are Engineer A1's procedure
(``training/lt_sft.py``); this recipe runs phase 2 with the general
:class:`~polymod.training.trainer.Trainer`, so the sparse module gets warm-up,
evaluation, early stopping, checkpoints, data parallelism and a metrics log like
any other module. The host ends bit-identical.
"""

from __future__ import annotations

from typing import Any, Literal

from polymod.training.data import EpochStream, as_dataset, fetch, host_inputs
from polymod.training.evaluate import host_loss
from polymod.training.lt_sft import lt_sft
from polymod.training.trainer import Trainer, TrainResult


def train_lt_sft(model: Any, name: str, data: Any, *, sites: str = "linear", density: float = 0.01,
                 scope: Literal["tensor", "global"] = "tensor", full_steps: int = 100, full_lr: float = 1e-4,
                 batch_size: int = 16, seed: int = 0, **trainer_args: Any) -> TrainResult:
    """Make a sparse fine-tuning module ``name`` on ``model`` by LT-SFT and train its kept entries.

    Args:
        model: the modular model; the new module is attached as ``name`` and made active.
        name: the module name.
        data: the training dataset (both phases read it, in the same seeded order).
        sites: where the difference may act.
        density: share of entries kept.
        scope: rank |Δ| per ``tensor`` or ``global``-ly over all sites.
        full_steps: steps of phase 1 (full fine-tuning of the sites' weights, then undone).
        full_lr: AdamW learning rate of phase 1.
        batch_size: phase 1's batch size.
        seed: phase 1's data order.
        trainer_args: phase 2's trainer arguments (``config``, ``eval_data``, ``metrics``, ``output_dir``, …).

    Returns:
        Phase 2's training result.
    """
    dataset = as_dataset(data)
    stream = EpochStream(len(dataset), seed=seed)
    device = next(model.host.parameters()).device
    batches = [{k: v.to(device) for k, v in fetch(dataset, stream.take(batch_size)).items()} for _ in range(full_steps)]
    before = model.active
    model.use(None)  # phase 1 measures the host alone
    try:
        module = lt_sft(model.host, lambda host, b: host_loss(host(**host_inputs(b)), b), batches, sites=sites,
                        density=density, scope=scope, full_steps=full_steps, sparse_steps=0, lr=full_lr)
    finally:
        model.use(before)
    model.add(name, module)
    model.use(name)
    return Trainer(model, [name], dataset, **trainer_args).fit()
