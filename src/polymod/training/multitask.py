"""Multi-task training data: tasks with their own data, routing and evaluation.

Each micro-batch comes from one task, drawn with temperature-based sampling
(Arivazhagan et al. 2019, *Massively Multilingual Neural Machine Translation in
the Wild*, §4.2)::

    p_i ∝ n_i^{1/T}

T = 1 samples in proportion to dataset size, T → ∞ uniformly over tasks; the
default T = 5 is the value that paper settles on for its high/low-resource mix.

While a task's batch runs, the model routes it by the task's ``route``: a
composition (a module name, ``Stack``, …) made active with ``model.use``, or a
callable returning a context manager (e.g. a router's per-task scope). The
trainer restores the previously active composition afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polymod.compose import Composition
from polymod.errors import ConfigError
from polymod.modular import Modular
from polymod.training.data import EpochStream, as_dataset
from polymod.training.evaluate import Metric, evaluate

Route = Any  # a composition (str, Stack, Mix, ...) or a callable returning a context manager


@dataclass
class Task:
    """One task of a multi-task run.

    Args:
        train: the training dataset (None for an evaluation-only task).
        eval: the evaluation dataset (None: not evaluated).
        route: how the model routes this task's batches (see the module docstring); None leaves the
            active composition as it is.
        metrics: per-task metrics replacing the trainer's (None: the trainer's).
    """

    train: Any = None
    eval: Any = None
    route: Route = None
    metrics: Mapping[str, Metric] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.train is not None:
            self.train = as_dataset(self.train)
        if self.eval is not None:
            self.eval = as_dataset(self.eval)


def temperature_probabilities(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """p_i ∝ n_i^{1/T} over tasks (Arivazhagan et al. 2019).

    Raises:
        ConfigError: T ≤ 0 or a task without examples.
    """
    if not temperature > 0:
        raise ConfigError(f"sampling temperature must be positive, got {temperature!r}")
    bad = [name for name, n in sizes.items() if n <= 0]
    if bad:
        raise ConfigError(f"tasks {bad} have no training examples")
    weights = {name: float(n) ** (1.0 / temperature) for name, n in sizes.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def routing(model: Modular, route: Route) -> contextlib.AbstractContextManager:
    """A context in which ``model`` routes by ``route`` (restoring the active composition on exit)."""
    if route is None:
        return contextlib.nullcontext()
    if callable(route) and not isinstance(route, str):
        return route()
    return _using(model, route)


@contextlib.contextmanager
def _using(model: Modular, composition: Composition | None):
    before = model.active
    if before != composition:
        model.use(composition)
    try:
        yield
    finally:
        if model.active != before:
            model.use(before)


class TaskStream:
    """Seeded, resumable source of ``(task, indices)`` micro-batches over one or several tasks.

    Args:
        tasks: name → :class:`Task` (a single unnamed dataset is the task ``None``).
        temperature: T of the task sampling.
        seed: fixes task draws and every task's example order.
    """

    def __init__(self, tasks: Mapping[str | None, Task], temperature: float = 5.0, seed: int = 0):
        self.tasks = dict(tasks)
        trainable = {name: t for name, t in self.tasks.items() if t.train is not None}
        if not trainable:
            raise ConfigError("no task has training data")
        self.names = list(trainable)
        self.probabilities = temperature_probabilities({str(n): len(t.train) for n, t in trainable.items()},
                                                       temperature)
        self._p = np.array([self.probabilities[str(n)] for n in self.names])
        self._rng = np.random.default_rng([seed, 1])
        self.streams = {name: EpochStream(len(t.train), seed=seed + i) for i, (name, t) in enumerate(trainable.items())}

    def next(self, batch_size: int) -> tuple[str | None, list[int]]:
        """The next micro-batch: its task and its example indices."""
        name = self.names[0] if len(self.names) == 1 else self.names[int(self._rng.choice(len(self.names), p=self._p))]
        return name, self.streams[name].take(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Task-draw generator state and every task's position, JSON-ready."""
        return {"rng": self._rng.bit_generator.state,
                "streams": {str(n): s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self._rng.bit_generator.state = state["rng"]
        for name, stream in self.streams.items():
            stream.load_state_dict(state["streams"][str(name)])


def as_tasks(data: Any, eval_data: Any = None) -> dict[str | None, Task]:
    """Normalise the trainer's ``data`` argument: a dataset, a :class:`Task`, or a mapping name → Task."""
    if isinstance(data, Mapping) and data and all(isinstance(v, Task) for v in data.values()):
        if eval_data is not None:
            raise ConfigError("with several tasks, give each Task its own eval data instead of eval_data")
        return dict(data)
    if isinstance(data, Task):
        return {None: data}
    return {None: Task(train=data, eval=eval_data)}


def evaluate_tasks(model: Modular, tasks: Mapping[str | None, Task], *, metrics: Mapping[str, Metric] | None = None,
                   batch_size: int = 32, **evaluate_args: Any) -> dict[str, float]:
    """Evaluate every task that has evaluation data, each under its own routing.

    Args:
        model: the modular model.
        tasks: name → :class:`Task` (the name ``None`` for a single unnamed task).
        metrics: default metrics (a task's own ``metrics`` replace them).
        batch_size: examples per forward pass.
        evaluate_args: passed to :func:`~polymod.training.evaluate.evaluate` (``loss_fn``, ``device``, ``autocast``).

    Returns:
        ``{metric: value}`` for the unnamed task; ``{"<task>/<metric>": value}`` plus
        ``{"mean/<metric>": value}`` (the unweighted mean over tasks) when there are several.
    """
    out: dict[str, float] = {}
    per_task: dict[str, dict[str, float]] = {}
    for name, task in tasks.items():
        if task.eval is None:
            continue
        with routing(model, task.route):
            result = evaluate(model, task.eval, metrics=task.metrics or metrics, batch_size=batch_size,
                              **evaluate_args)
        if name is None:
            out.update(result)
        else:
            per_task[name] = result
            out.update({f"{name}/{k}": v for k, v in result.items()})
    if len(per_task) > 1:
        shared = set.intersection(*(set(r) for r in per_task.values()))
        out.update({f"mean/{k}": sum(r[k] for r in per_task.values()) / len(per_task) for k in sorted(shared)})
    return out
