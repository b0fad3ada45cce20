"""The trainer: learning on every host family, frozen host, named modules only, outputs and errors."""

from __future__ import annotations

import json

import pytest
import torch

import polymod as pm
from polymod.errors import ConfigError, StateError
from polymod.training.config import TrainConfig
from polymod.training.evaluate import accuracy, evaluate
from polymod.training.progress import read_log
from polymod.training.trainer import Trainer
from tests.hosts import assert_same_state, host_state, make_host
from tests.test_train_util import classification_data, lm_data, no_dropout, one_thread, seq2seq_data  # noqa: F401

FAST = dict(warmup=0, progress=False, log_every=5)


def _bert_model(sites: str = "linear"):
    host = make_host("bert")
    model = pm.Modular(host)
    model.add("t", pm.LoRA(rank=4, sites=sites))
    model.use("t")
    return host, model


def test_classification_learns_host_untouched_and_only_named_module_trains(tmp_path):
    host, model = _bert_model()
    model.add("other", pm.LoRA(rank=2, sites="attn.q"))
    other = {k: v.clone() for k, v in model["other"].state_dict().items()}
    data = classification_data(96)
    state = host_state(host)
    before = evaluate(model, data, metrics={"accuracy": accuracy})
    cfg = TrainConfig(steps=40, batch_size=16, lr=2e-2, eval_every=20, **FAST)
    result = Trainer(model, ["t"], data, eval_data=data, metrics=["accuracy"], config=cfg, output_dir=tmp_path).fit()
    assert result.step == 40 and [h["step"] for h in result.history] == [20, 40]
    assert result.metrics["loss"] < before["loss"] - 0.2
    assert result.metrics["accuracy"] > before["accuracy"] + 0.25
    assert_same_state(host, state)
    assert all(torch.equal(v, other[k]) for k, v in model["other"].state_dict().items()), "unnamed module trained"
    assert not any(p.requires_grad for p in host.parameters())
    assert all(p.requires_grad for p in model["other"].parameters()), "flags restored after the run"
    # outputs: a loadable module whose card records the run, a JSONL log, the result
    saved = pm.load(tmp_path / "modules" / "t")
    assert saved.card.metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert saved.card.lineage.recipe["steps"] == 40
    assert torch.equal(saved.part(next(iter(saved.sites))).B, model["t"].part(next(iter(saved.sites))).B)
    log = read_log(tmp_path / "metrics.jsonl")
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(r["examples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert [r["step"] for r in log if r["kind"] == "eval"] == [20, 40]
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 40


@pytest.mark.parametrize("family,make,steps", [("gpt2", lm_data, 25), ("llama", lm_data, 25),
                                                ("t5", seq2seq_data, 60)])
def test_lm_and_seq2seq_hosts_learn(family, make, steps):
    host = make_host(family)
    state = host_state(host)
    model = pm.Modular(host)
    model.add("t", pm.LoRA(rank=4, sites="linear"))
    model.use("t")
    data = make(48)
    before = evaluate(model, data, metrics={"accuracy": accuracy})
    cfg = TrainConfig(steps=steps, batch_size=16, lr=2e-2, **FAST)
    result = Trainer(model, "t", data, eval_data=data, metrics=["accuracy"], config=cfg).fit()
    assert result.metrics["loss"] < 0.95 * before["loss"], (before, result.metrics)
    assert result.metrics["accuracy"] > before["accuracy"] + 0.1
    assert_same_state(host, state)


def test_grad_accumulation_equals_the_large_batch():
    data = classification_data(64)
    runs = []
    for batch, accum in [(16, 1), (8, 2)]:
        # float64: in float32 the two summation orders differ by ~1e-6 after Adam's normalisation on some CPUs
        host = make_host("bert").double()
        no_dropout(host)  # dropout masks depend on the micro-batch shape
        model = pm.Modular(host)
        model.add("t", pm.LoRA(rank=4, sites="attn.q|attn.v"))
        model.use("t")
        cfg = TrainConfig(steps=4, batch_size=batch, grad_accum=accum, lr=1e-2, max_grad_norm=0.5, **FAST)
        Trainer(model, ["t"], data, config=cfg).fit()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model["t"].parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_early_stopping_and_restore_best():
    data = classification_data(64)
    # monitor loss with mode max: the falling loss never "improves", so patience 2 stops at the third evaluation
    _, model = _bert_model()
    cfg = TrainConfig(steps=50, batch_size=16, lr=1e-2, eval_every=3, monitor="loss", mode="max", patience=2,
                      schedule="constant",
                      restore_best=True, **FAST)
    result = Trainer(model, ["t"], data, eval_data=data, config=cfg).fit()
    assert result.stopped_early and result.step == 9 and result.best["step"] == 3
    restored = torch.cat([p.detach().reshape(-1) for p in model["t"].parameters()])
    _, again = _bert_model()
    Trainer(again, ["t"], data, config=TrainConfig(steps=3, batch_size=16, lr=1e-2, schedule="constant", **FAST)).fit()
    three = torch.cat([p.detach().reshape(-1) for p in again["t"].parameters()])
    assert torch.equal(restored, three), "restore_best puts back the step-3 weights"


def test_lr_scale_gives_a_trained_name_its_own_rate(tmp_path):
    _, model = _bert_model("attn.q")
    model.add("u", pm.LoRA(rank=2, sites="attn.v"))
    model.use(pm.Stack("t", "u"))
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, lr_scale={"u": 10.0}, **FAST)
    trainer = Trainer(model, ["t", "u"], classification_data(16), config=cfg)
    groups = trainer._param_groups()
    assert sorted(g["lr"] for g in groups) == pytest.approx([1e-3, 1e-2])
    assert {id(p) for g in groups if g["lr"] > 5e-3 for p in g["params"]} == {id(p) for p in model["u"].parameters()}
    trainer.fit()


def test_bf16_autocast_on_cpu_trains():
    _, model = _bert_model("attn.q|attn.v")
    data = classification_data(32)
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-2, precision="bf16", **FAST)
    result = Trainer(model, ["t"], data, eval_data=data, config=cfg).fit()
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    assert model["t"].part(next(iter(model["t"].sites))).B.dtype == torch.float32, "weights stay fp32"
    assert model["t"].part(next(iter(model["t"].sites))).B.abs().sum() > 0


def test_a_loss_that_writes_the_host_is_caught():
    host, model = _bert_model("attn.q")
    weight = host.bert.encoder.layer[0].attention.self.key.weight

    def sneaky(outputs, batch):
        with torch.no_grad():
            weight.add_(1e-3)
        return outputs.loss

    with pytest.raises(StateError, match="host changed during training"):
        Trainer(model, ["t"], classification_data(16), loss_fn=sneaky,
                config=TrainConfig(steps=1, batch_size=8, **FAST)).fit()


def test_errors_name_the_problem(tmp_path):
    _, model = _bert_model("attn.q")
    data = classification_data(16)
    with pytest.raises(ConfigError, match="neither an attached module nor a router; known: t"):
        Trainer(model, ["nope"], data)
    with pytest.raises(ConfigError, match="train= is empty"):
        Trainer(model, [], data)
    model["t"].requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        Trainer(model, ["t"], data)
    model["t"].requires_grad_(True)
    with pytest.raises(ConfigError, match="monitor 'f1' is not an evaluation result; results are: accuracy, loss"):
        Trainer(model, ["t"], data, eval_data=data, metrics=["accuracy"],
                config=TrainConfig(steps=2, batch_size=8, eval_every=1, monitor="f1", **FAST)).fit()
    with pytest.raises(ConfigError, match="unknown metrics"):
        Trainer(model, ["t"], data, metrics=["bleu"])
    with pytest.raises(ConfigError, match="checkpoint_every needs an output_dir"):
        Trainer(model, ["t"], data, config=TrainConfig(checkpoint_every=5))
    with pytest.raises(ConfigError, match=r"lr_scale names \['router'\], which are not trained; trained: t"):
        Trainer(model, ["t"], data, config=TrainConfig(steps=1, batch_size=8, lr_scale={"router": 10.0}, **FAST)).fit()
    with pytest.raises(ConfigError, match="returned no loss"):
        Trainer(model, ["t"], {k: v for k, v in data.items() if k != "labels"},
                config=TrainConfig(steps=1, batch_size=8, **FAST)).fit()


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"steps": 0, "lr": -1, "schedule": "step", "epochs": 3, "patience": 2})
    message = str(info.value)
    for needle in ["unknown training setting 'epochs'", "steps = 0", "lr = -1", "schedule = 'step'",
                   "patience/restore_best need periodic evaluation"]:
        assert needle in message
    assert TrainConfig.from_dict({"betas": [0.9, 0.95]}).betas == (0.9, 0.95)
    assert TrainConfig(steps=100, warmup=0.1).warmup_steps == 10 and TrainConfig(warmup=7).warmup_steps == 7
