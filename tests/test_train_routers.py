"""Training routers: auxiliary losses added automatically, AdapterFusion, Polytropon with few-shot adaptation."""

from __future__ import annotations

import torch

import polymod as pm
from polymod.compose import Mix
from polymod.routing import TopK
from polymod.training.config import TrainConfig
from polymod.training.evaluate import accuracy
from polymod.training.multitask import Task, evaluate_tasks
from polymod.training.progress import read_log
from polymod.training.recipes import fusion
from polymod.training.recipes import skills as skill_recipes
from polymod.training.trainer import Trainer
from tests.hosts import assert_same_state, host_state, make_host
from tests.test_train_util import classification_data, one_thread  # noqa: F401

FAST = dict(warmup=0, progress=False)


def _experts(n: int, rank: int = 2, sites: str = "linear"):
    host = make_host("bert")
    model = pm.Modular(host)
    names = [f"e{i}" for i in range(n)]
    for name in names:
        model.add(name, pm.LoRA(rank=rank, sites=sites))
    return host, model, names


def test_router_aux_losses_are_added_and_logged(tmp_path):
    runs = {}
    for weight in (0.0, 1.0):
        _, model, names = _experts(4, sites="attn.q")
        router = TopK(k=1, level="token", balance_coef=1.0)
        model.use(Mix(names, router=router))
        cfg = TrainConfig(steps=4, batch_size=16, lr=1e-2, log_every=1, aux_loss_weight=weight, **FAST)
        Trainer(model, {**{n: model[n] for n in names}, "router": router}, classification_data(32), config=cfg,
                output_dir=tmp_path / str(weight)).fit()
        runs[weight] = torch.cat([p.detach().reshape(-1) for p in router.parameters()])
        log = [r for r in read_log(tmp_path / str(weight) / "metrics.jsonl") if r["kind"] == "train"]
        assert all(r["aux_loss"] > 0 for r in log), "the load-balancing loss is recorded"
    assert not torch.allclose(runs[0.0], runs[1.0]), "the auxiliary loss reaches the router's gradient"


def test_adapter_fusion_trains_only_the_fusion_layer():
    host, model, _ = _experts(0)
    state = host_state(host)
    for shift, name in enumerate(("a", "b")):  # stage 1: one module per task
        model.add(name, pm.LoRA(rank=4, sites="linear"))
        model.use(name)
        Trainer(model, [name], classification_data(96, seed=shift, shift=shift),
                config=TrainConfig(steps=40, batch_size=16, lr=2e-2, **FAST)).fit()
    trained = [p.detach().clone() for n in ("a", "b") for p in model[n].parameters()]
    target = classification_data(96, seed=5, shift=1)  # b's labelling: fusion should learn to attend to b
    model.use(Mix(["a", "b"], router=pm.routing.AttentionFusion(), aggregate="attention"))
    start = evaluate_tasks(model, {"t": Task(eval=target)}, metrics={"accuracy": accuracy})["t/accuracy"]
    router, result = fusion.train_fusion(model, ["a", "b"], target, eval_data=target, metrics=["accuracy"],
                                         config=TrainConfig(steps=40, batch_size=16, lr=1e-2, **FAST))
    assert result.metrics["accuracy"] > start + 0.15, (start, result.metrics)
    assert all(torch.equal(a, p.detach()) for a, p in zip(trained, (p for n in ("a", "b")
                                                                  for p in model[n].parameters())))
    assert sum(p.numel() for p in router.parameters()) > 0
    assert_same_state(host, state)


def test_polytropon_joint_training_and_few_shot_row():
    host, model, skills = _experts(4)
    tasks = {t: (classification_data(96, seed=s, shift=s),) * 2 for s, t in enumerate(("a", "b"))}
    router, ids, result = skill_recipes.train_polytropon(
        model, skills, tasks, spare_tasks=1, metrics=["accuracy"], temperature=1.0,
        config=TrainConfig(steps=120, batch_size=16, lr=3e-2, **FAST))
    assert ids == {"a": 0, "b": 1}
    assert result.metrics["a/accuracy"] > 0.5 and result.metrics["b/accuracy"] > 0.5, result.metrics
    tables = [p for n, p in router.named_parameters() if n.endswith("logits")]
    before_rows = [t.detach()[:2].clone() for t in tables]
    before_skills = [p.detach().clone() for s in skills for p in model[s].parameters()]
    new = classification_data(96, seed=7, shift=1)  # a new task labelled like b: reachable by reallocating skills
    probe = {"new": Task(eval=new, route=skill_recipes.task_route(model, 2))}
    start = evaluate_tasks(model, probe, metrics={"accuracy": accuracy})["new/accuracy"]
    adapted = skill_recipes.adapt_task(model, router, 2, new, eval_data=new, metrics=["accuracy"],
                                    config=TrainConfig(steps=40, batch_size=16, lr=0.2, **FAST))
    assert adapted.metrics["task2/accuracy"] > start + 0.1, (start, adapted.metrics)
    assert all(torch.equal(b, t.detach()[:2]) for b, t in zip(before_rows, tables)), "known tasks' rows unchanged"
    assert all(torch.equal(b, p.detach()) for b, p in zip(before_skills, (p for s in skills
                                                                          for p in model[s].parameters())))
