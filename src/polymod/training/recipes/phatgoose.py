"""PHATGOOSE gate training: one sigmoid gate per site for a published module, host and module frozen.

Muqeeth et al. (ICML 2024): after a module is trained, its contributor trains
a gate vector gₛ per site on the module's own training data, with the module's
contribution scaled by σ(gₛᵀ x) (:class:`~polymod.routing.phatgoose.PhatgooseGate`).
Defaults from the paper: gates start at zero, 100 steps, learning rate 1e-3;
weight decay 0 (a decayed zero-initialised gate would be pulled back to σ = ½).
Only the gates are trained — the trainer's host guard checks that the host is
bit-identical afterwards, and the module is not among the trained parameters,
so it is too. The gates route the module among others with
:class:`~polymod.routing.phatgoose.Phatgoose`, and are published beside it as a
derived artifact (``phatgoose-gates``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from polymod.compose import Mix
from polymod.routing.phatgoose import PhatgooseGate
from polymod.training.config import TrainConfig
from polymod.training.trainer import Trainer, TrainResult

STEPS, LR = 100, 1e-3  # the paper's gate-training defaults


def train_gates(model: Any, name: str, data: Any, *, config: TrainConfig | None = None,
                **trainer_args: Any) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Train module ``name``'s PHATGOOSE gates on ``data`` (its own training data).

    Args:
        model: the modular model with module ``name`` attached.
        name: the module.
        data: training batches, as for :class:`~polymod.training.trainer.Trainer`.
        config: the trainer config; default 100 steps at lr 1e-3, no weight decay, no warm-up.
        trainer_args: passed to the trainer (``loss_fn``, ``eval_data``, ``metrics``, …).

    Returns:
        (``{site: gate (D_in,)}``, the training result). The model's composition is reset to none.
    """
    config = config or TrainConfig(steps=STEPS, lr=LR, weight_decay=0.0, warmup=0, progress=False)
    config = dataclasses.replace(config, weight_decay=0.0)
    gate = PhatgooseGate()
    model.use(Mix([name], router=gate))
    try:
        result = Trainer(model, {"gates": gate}, data, config=config, **trainer_args).fit()
    finally:
        model.use(None)
    return gate.gates(), result
