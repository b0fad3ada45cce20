"""AdapterFusion: combine trained modules with a learned attention; the modules stay frozen.

Pfeiffer, Kamath, Rücklé, Cho and Gurevych (2021), *AdapterFusion:
Non-Destructive Task Composition for Transfer Learning*: in a first stage
modules are trained per task (any trainer run); in the second, knowledge
*composition* stage, they are frozen and a fusion layer per site learns to
attend over their outputs for the target task. The fusion layer is the
:class:`~polymod.routing.attention.AttentionFusion` router of a
``Mix(modules, router, aggregate="attention")``: query from the host state,
keys and values from the module outputs. Only the router (and any module named
in ``also_train``, e.g. a new head) trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from polymod.compose import Mix
from polymod.modular import Modular
from polymod.routing.attention import AttentionFusion
from polymod.training.trainer import Trainer, TrainResult


def train_fusion(model: Modular, modules: Sequence[str], data: Any, *, temperature: float = 1.0,
                 aggregate: str = "attention", also_train: Sequence[str] = (),
                 **trainer_args: Any) -> tuple[AttentionFusion, TrainResult]:
    """Fuse trained ``modules`` for a target task: train the fusion attention only.

    Args:
        model: the modular model with the modules attached.
        modules: the (already trained) modules to fuse; they are not updated.
        data: the target task's training data.
        temperature: the attention's softmax temperature.
        aggregate: ``attention`` (AdapterFusion's value-weighted sum) or ``sum`` (weights on the Δy).
        also_train: further modules trained with the fusion layer.
        trainer_args: passed to the trainer (``config``, ``eval_data``, ``metrics``, …).

    Returns:
        (the fusion router, the training result). The fusion composition stays active.
    """
    router = AttentionFusion(temperature=temperature)
    model.use(Mix(list(modules), router=router, aggregate=aggregate))
    train = {"fusion": router, **{name: model[name] for name in also_train}}
    return router, Trainer(model, train, data, **trainer_args).fit()
