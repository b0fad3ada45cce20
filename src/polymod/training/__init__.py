"""Training modules and routers on a frozen host (the survey's fourth dimension; see docs/training.md).

:class:`Trainer` trains exactly the named modules and routers; :class:`TrainConfig`
holds its hyper-parameters; :class:`Task` describes one task of a multi-task run;
:mod:`polymod.training.recipes` holds MAD-X, continual learning, AdapterFusion,
Polytropon, hypernetwork and LT-SFT recipes; :mod:`polymod.training.distributed`
the data-parallel pieces.
"""

from polymod.training.config import TrainConfig
from polymod.training.data import causal_lm_labels
from polymod.training.evaluate import accuracy, evaluate
from polymod.training.multitask import Task, evaluate_tasks, temperature_probabilities
from polymod.training.outputs import TrainResult
from polymod.training.trainer import Trainer

__all__ = ["Task", "TrainConfig", "TrainResult", "Trainer", "accuracy", "causal_lm_labels", "evaluate",
           "evaluate_tasks", "temperature_probabilities"]
