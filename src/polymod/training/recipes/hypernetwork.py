"""Hypernetwork training: one generator trained across tasks; a new task is a new embedding.

HyperFormer (Mahabadi et al. 2021) and Hyper-X (Üstün et al. 2022) train one
network that generates every task's module weights from a task (and language)
embedding. :func:`train_tasks` trains it multi-task: each batch comes from one
task (temperature sampling) and is routed to it (``model.route(task=name)``), as
every kind is. :func:`learn_new_task` adds a task as one
new embedding row and trains only that row — the generator, its heads and the
other tasks' rows stay bit-identical, so the known tasks are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

from polymod.modular import Modular
from polymod.modules.hyperlora import add_task, hypernetwork
from polymod.training.multitask import Task, routing
from polymod.training.recipes.common import only_rows, without_decay
from polymod.training.trainer import Trainer, TrainResult


def task_route(model: Modular, name: str, task: str) -> Any:
    """A route for :class:`~polymod.training.multitask.Task`: module ``name`` active, routed to ``task``."""

    def scope() -> Any:
        stack = ExitStack()
        stack.enter_context(routing(model, name))
        stack.enter_context(model.route(task=task))
        return stack

    return scope


def train_tasks(model: Modular, name: str, tasks: Mapping[str, Task | tuple[Any, Any]],
                **trainer_args: Any) -> TrainResult:
    """Train hypernetwork module ``name`` on several tasks at once.

    Args:
        model: the modular model with a ``hyper-lora`` module ``name`` whose spec lists the tasks.
        name: the hypernetwork module.
        tasks: task name → :class:`Task` or ``(train, eval)``; each task's batches are routed to it.
        trainer_args: passed to the trainer (``config``, ``metrics``, ``temperature``, …).
    """
    run = {}
    for task, spec in tasks.items():
        train, dev = (spec.train, spec.eval) if isinstance(spec, Task) else spec
        run[task] = Task(train=train, eval=dev, route=task_route(model, name, task))
    return Trainer(model, [name], run, **trainer_args).fit()


def learn_new_task(model: Modular, name: str, task: str, data: Any, *, eval_data: Any = None,
                   **trainer_args: Any) -> TrainResult:
    """Add ``task`` to hypernetwork ``name`` (unless added already) and train only its embedding row.

    Weight decay is turned off for this run: it would move the other rows too.
    """
    net = hypernetwork(model[name])
    if task not in net.tasks:
        add_task(model[name], task)
    table = net.task_embeddings  # (tasks, e)
    row = net.tasks.index(task)
    trainer_args["config"] = without_decay(trainer_args.get("config"))
    run = {task: Task(train=data, eval=eval_data, route=task_route(model, name, task))}
    with only_rows([table], [row]):
        return Trainer(model, {f"{name}.task_embeddings": table}, run, **trainer_args).fit()
