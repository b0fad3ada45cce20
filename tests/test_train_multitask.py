"""Multi-task training: temperature sampling, per-task routing, per-task evaluation."""

from __future__ import annotations

import collections

import pytest
import torch

import polymod as pm
from polymod.errors import ConfigError
from polymod.training.config import TrainConfig
from polymod.training.multitask import Task, TaskStream, temperature_probabilities
from polymod.training.trainer import Trainer
from tests.hosts import make_host
from tests.test_train_util import classification_data, one_thread  # noqa: F401


def test_task_draws_follow_the_temperature_distribution():
    tasks = {"big": Task(train=classification_data(400)), "small": Task(train=classification_data(25))}
    stream = TaskStream(tasks, temperature=2.0, seed=0)
    counts = collections.Counter(stream.next(1)[0] for _ in range(4000))
    want = temperature_probabilities({"big": 400, "small": 25}, 2.0)  # 0.8 / 0.2
    assert counts["small"] / 4000 == pytest.approx(want["small"], abs=0.02)
    assert want["small"] == pytest.approx(0.2)


def test_per_task_routing_and_evaluation(tmp_path):
    model = pm.Modular(make_host("bert"))
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=4, sites="linear"))
    model.use("a")
    # the tasks permute each other's labels: one shared module cannot fit both
    tasks = {"a": Task(train=classification_data(96, seed=0), eval=classification_data(96, seed=0), route="a"),
             "b": Task(train=classification_data(96, seed=1, shift=1), eval=classification_data(96, seed=1, shift=1),
                       route="b")}
    cfg = TrainConfig(steps=60, batch_size=16, lr=2e-2, warmup=0, progress=False)
    trainer = Trainer(model, ["a", "b"], tasks, metrics=["accuracy"], config=cfg, temperature=1.0,
                      output_dir=tmp_path)
    before = trainer.evaluate()
    result = trainer.fit()
    after = result.metrics
    assert set(after) == {"a/loss", "a/accuracy", "b/loss", "b/accuracy", "mean/loss", "mean/accuracy"}
    for t in ("a", "b"):
        assert after[f"{t}/accuracy"] > before[f"{t}/accuracy"] + 0.2, (before, after)
    assert after["mean/accuracy"] == pytest.approx((after["a/accuracy"] + after["b/accuracy"]) / 2)
    assert model.active == "a", "the composition active before training is restored"
    # each module learned its own task: swapping the routes hurts
    swapped = Trainer(model, ["a", "b"], {"a": Task(eval=tasks["a"].eval, route="b"), "b": Task(train=tasks["b"].train,
                      eval=tasks["b"].eval, route="a")}, metrics=["accuracy"], config=cfg).evaluate()
    assert swapped["a/accuracy"] < after["a/accuracy"] - 0.2 and swapped["b/accuracy"] < after["b/accuracy"] - 0.2
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == ["a", "b"]


def test_route_may_be_a_context_factory():
    model = pm.Modular(make_host("bert"))
    model.add("a", pm.LoRA(rank=2, sites="attn.q"))
    entered = []

    class Scope:
        def __enter__(self):
            entered.append(model.active)
            model.use("a")

        def __exit__(self, *exc):
            model.use(None)

    tasks = {"x": Task(train=classification_data(16), route=Scope)}
    Trainer(model, ["a"], tasks, config=TrainConfig(steps=2, batch_size=8, progress=False)).fit()
    assert entered == [None, None] and model.active is None
    assert model["a"].part(next(iter(model["a"].sites))).B.abs().sum() > 0, "trained inside the scope"


def test_multitask_errors():
    with pytest.raises(ConfigError, match="no task has training data"):
        TaskStream({"a": Task(eval=classification_data(8))})
    model = pm.Modular(make_host("bert"))
    model.add("a", pm.LoRA(rank=2, sites="attn.q"))
    with pytest.raises(ConfigError, match="give each Task its own eval data"):
        Trainer(model, ["a"], {"a": Task(train=classification_data(8))}, eval_data=classification_data(8))
    torch.manual_seed(0)
