"""Continual learning with modules: one new module per task, earlier ones frozen.

The survey's (§6.3) answer to catastrophic forgetting: the host is frozen and
every task gets its own module, so learning task t cannot change what tasks
1 … t−1 compute. Routing is a table task → module that grows by one entry per
task (fixed task routing; ``model.route(rows=[...])`` mixes tasks in one batch).
The guarantee is exact, and tested: earlier tasks' evaluation numbers are
bit-identical after later tasks are learned.

::

    learner = Continual(model, pm.LoRA(rank=8), metrics=["accuracy"])
    learner.learn("sst2", train, eval_data=dev, config=TrainConfig(steps=500))
    learner.learn("mnli", ...)
    learner.evaluate()          # every task so far, each under its own module
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from polymod.errors import ConfigError
from polymod.modular import Modular
from polymod.modules.contract import ModuleSpec
from polymod.training.evaluate import Metric
from polymod.training.multitask import Task, evaluate_tasks
from polymod.training.trainer import Trainer, TrainResult, _resolve_metrics


class Continual:
    """Learn tasks in sequence on one modular model.

    Args:
        model: the modular model (host frozen).
        spec: the module spec each new task gets (overridable per task).
        metrics: evaluation metrics (names or callables).
    """

    def __init__(self, model: Modular, spec: ModuleSpec, metrics: Mapping[str, Metric] | Sequence[str] | None = None):
        self.model, self.spec = model, spec
        self.metrics = _resolve_metrics(metrics)
        self.tasks: dict[str, Task] = {}

    @property
    def table(self) -> dict[str, str]:
        """The routing table: task → module name (one module per task, named after it)."""
        return {task: task for task in self.tasks}

    def learn(self, task: str, data: Any, *, eval_data: Any = None, spec: ModuleSpec = None,
              **trainer_args: Any) -> TrainResult:
        """Freeze every earlier module, attach a new one for ``task`` and train only it.

        Args:
            task: the task name (also the new module's name).
            data: its training data.
            eval_data: its evaluation data (kept for :meth:`evaluate`).
            spec: the module spec for this task (default: the learner's).
            trainer_args: passed to :class:`~polymod.training.trainer.Trainer` (``config``, ``output_dir``, …).

        Raises:
            ConfigError: the task was learned already.
        """
        if task in self.tasks:
            raise ConfigError(f"task {task!r} was learned already; continual learning adds new tasks only")
        for name in self.tasks:
            self.model[name].requires_grad_(False)  # earlier modules: frozen for good
        self.model.add(task, spec if spec is not None else self.spec)
        self.tasks[task] = Task(eval=eval_data, route=task)
        run = {task: Task(train=data, eval=eval_data, route=task)}
        return Trainer(self.model, [task], run, metrics=self.metrics, **trainer_args).fit()

    def evaluate(self, batch_size: int = 32) -> dict[str, float]:
        """Every learned task's evaluation (``<task>/<metric>`` and ``mean/<metric>``), each under its module."""
        return evaluate_tasks(self.model, {t: v for t, v in self.tasks.items()}, metrics=self.metrics,
                              batch_size=batch_size)
