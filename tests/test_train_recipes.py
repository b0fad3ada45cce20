"""Recipes end to end on tiny hosts: MAD-X, continual learning, LT-SFT, hypernetworks."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.compose import Stack
from polymod.modules.adapter import Adapter
from polymod.modules.hyperlora import HyperLoRA, add_task, hypernetwork
from polymod.modules.invertible import Invertible
from polymod.training.config import TrainConfig
from polymod.training.evaluate import accuracy, evaluate
from polymod.training.lt_sft import train_lt_sft
from polymod.training.multitask import Task, evaluate_tasks
from polymod.training.recipes import continual, madx
from polymod.training.recipes import hypernetwork as hyper
from tests.hosts import assert_same_state, host_state, make_host
from tests.test_train_util import classification_data, one_thread  # noqa: F401

FAST = dict(warmup=0, progress=False)


def _snapshot(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _same(before, *modules):
    return all(torch.equal(a, b.detach()) for a, b in zip(before, (p for m in modules for p in m.parameters())))


def _language_text(low: int, n: int = 64, length: int = 8, seed: int = 0):
    """Unlabelled 'text' of a language whose words are ids low … low+45: runs counting up by one."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 46, (n, 1), generator=g)
    ids = low + (start + torch.arange(length)) % 46  # (N, T)
    return ids, torch.ones_like(ids)


def test_madx_language_modules_task_stacking_and_zero_shot_swap():
    import transformers as tf

    task_host = make_host("bert")
    with torch.no_grad():  # pretrained-like token embeddings (norm ~1, not the random init's ~0.1), which an
        task_host.bert.embeddings.word_embeddings.weight.mul_(10.0)  # invertible adapter's biases would swamp
    lm_host = tf.BertForMaskedLM(task_host.config).eval()  # the same pretrained body with its LM head
    lm_host.bert.load_state_dict(task_host.bert.state_dict(), strict=False)
    states = host_state(task_host), host_state(lm_host)
    lm, task_model = pm.Modular(lm_host), pm.Modular(task_host)
    cfg = TrainConfig(steps=30, batch_size=16, lr=2e-2, **FAST)
    for language, low in (("en", 3), ("xx", 50)):
        names = madx.add_language(lm, language, Adapter(reduction=2), Invertible())
        assert names == [f"{language}-inv", language]
        ids, mask = _language_text(low)
        data = madx.masked_lm_data(ids, mask, mask_token_id=2, vocab_size=96, probability=0.3, seed=1)
        lm.use(Stack(*names))
        before = evaluate(lm, data)["loss"]
        after = madx.train_language(lm, language, data, eval_data=data, config=cfg).metrics["loss"]
        assert after < before - 0.2, (language, before, after)
        assert madx.attach_language(task_model, lm, language) == names
    assert any(s.endswith("<input>") for s in lm["en-inv"].sites), "the LM host has the inverse at its head"
    assert not any(s.endswith("<input>") for s in task_model["en-inv"].sites), "the task host has no LM head"
    frozen = _snapshot(*(task_model[n] for n in ("en-inv", "en", "xx-inv", "xx")))

    task_model.add("task", Adapter(reduction=2))
    en = classification_data(96, seed=0)  # tokens 3 … 95 would span both languages: keep English ids
    en["input_ids"] = 3 + en["input_ids"] % 47
    en["labels"] = en["input_ids"][:, 0] % 3
    madx.use_language(task_model, "task", "en")
    start = evaluate(task_model, en, metrics={"accuracy": accuracy})["accuracy"]
    result = madx.train_task(task_model, "task", "en", en, eval_data=en, metrics=["accuracy"],
                             config=TrainConfig(steps=40, batch_size=16, lr=5e-2, **FAST))
    assert result.metrics["accuracy"] > start + 0.25
    assert task_model.active == Stack("en-inv", "en", "task")
    assert _same(frozen, *(task_model[n] for n in ("en-inv", "en", "xx-inv", "xx"))), "language modules frozen"
    # zero-shot transfer: same task module on the target language's modules
    source = task_model(**{k: v for k, v in en.items() if k != "labels"}).logits
    madx.use_language(task_model, "task", "xx")
    assert task_model.active == Stack("xx-inv", "xx", "task")
    target = task_model(**{k: v for k, v in en.items() if k != "labels"}).logits
    assert not torch.allclose(source, target), "swapping the language modules changes the computation"
    assert_same_state(task_host, states[0])
    assert_same_state(lm_host, states[1])


def test_continual_learning_keeps_earlier_tasks_exactly():
    model = pm.Modular(make_host("bert"))
    learner = continual.Continual(model, pm.LoRA(rank=4, sites="linear"), metrics=["accuracy"])
    cfg = TrainConfig(steps=50, batch_size=16, lr=2e-2, **FAST)
    seen: dict[str, float] = {}
    for shift, task in enumerate(("a", "b", "c")):
        data = classification_data(96, seed=shift, shift=shift)
        result = learner.learn(task, data, eval_data=data, config=cfg)
        assert result.metrics[f"{task}/accuracy"] > 0.55, result.metrics  # chance: 1/3
        now = learner.evaluate()
        for earlier, value in seen.items():
            assert now[f"{earlier}/accuracy"] == value, f"learning {task} changed {earlier}"
            assert not any(p.requires_grad for p in model[earlier].parameters())
        seen[task] = now[f"{task}/accuracy"]
    assert learner.table == {"a": "a", "b": "b", "c": "c"}
    # the tasks conflict (permuted labels): a single module could not serve them all
    cross = evaluate_tasks(model, {"c": Task(eval=classification_data(96, seed=0), route="c")},
                           metrics={"accuracy": accuracy})
    assert cross["c/accuracy"] < seen["a"] - 0.3
    with pytest.raises(pm.ConfigError, match="learned already"):
        learner.learn("a", classification_data(8))


def test_lt_sft_recipe_trains_a_sparse_module_with_the_trainer():
    host = make_host("bert")
    state = host_state(host)
    model = pm.Modular(host)
    data = classification_data(96)
    start = evaluate(model, data, metrics={"accuracy": accuracy})["accuracy"]
    result = train_lt_sft(model, "sft", data, sites="linear", density=0.05, full_steps=15, full_lr=1e-2,
                                 eval_data=data, metrics=["accuracy"],
                                 config=TrainConfig(steps=40, batch_size=16, lr=1e-2, **FAST))
    assert model["sft"].kind == "sparse" and model.active == "sft"
    assert result.metrics["accuracy"] > start + 0.2
    assert_same_state(host, state)


def test_hypernetwork_across_tasks_and_a_new_task_as_a_new_embedding():
    model = pm.Modular(make_host("bert"))
    model.add("hyper", HyperLoRA(tasks=("a", "b"), rank=4, embedding_dim=8, hidden=16, sites="linear"))
    tasks = {t: (classification_data(96, seed=s, shift=s),) * 2 for s, t in enumerate(("a", "b"))}
    cfg = TrainConfig(steps=120, batch_size=16, lr=5e-3, **FAST)  # hypernetworks want a lower rate than LoRA
    first = hyper.train_tasks(model, "hyper", tasks, metrics=["accuracy"], config=cfg, temperature=1.0).metrics
    assert first["a/accuracy"] > 0.5 and first["b/accuracy"] > 0.5, first  # chance: 1/3
    known = hypernetwork(model["hyper"]).task_embeddings.detach().clone()
    others = [p.detach().clone() for n, p in model["hyper"].named_parameters() if not n.endswith("task_embeddings")]
    # a new task related to the known ones (a's labelling, new examples): only its embedding is learned
    new = classification_data(96, seed=2)
    probe = Task(eval=new, route=hyper.task_route(model, "hyper", "c"))
    add_task(model["hyper"], "c")  # starts at the mean of the known embeddings
    start = evaluate_tasks(model, {"c": probe}, metrics={"accuracy": accuracy})["c/accuracy"]
    result = hyper.learn_new_task(model, "hyper", "c", new, eval_data=probe.eval, metrics=["accuracy"],
                                  config=TrainConfig(steps=60, batch_size=16, lr=5e-2, **FAST))
    table = hypernetwork(model["hyper"]).task_embeddings
    assert table.shape[0] == 3 and torch.equal(table[:2].detach(), known), "known tasks' rows unchanged"
    assert all(torch.equal(a, p.detach()) for a, p in zip(
        others, (p for n, p in model["hyper"].named_parameters() if not n.endswith("task_embeddings"))))
    assert result.metrics["c/accuracy"] > start + 0.1, (start, result.metrics)
    again = evaluate_tasks(model, {t: Task(eval=dev, route=hyper.task_route(model, "hyper", t))
                                   for t, (_, dev) in tasks.items()}, metrics={"accuracy": accuracy})
    assert again["a/accuracy"] == first["a/accuracy"] and again["b/accuracy"] == first["b/accuracy"]
