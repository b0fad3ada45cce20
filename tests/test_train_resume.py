"""Checkpoint and resume: an interrupted run, resumed, ends exactly where the uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.errors import ConfigError
from polymod.training import checkpoint
from polymod.training.config import TrainConfig
from polymod.training.multitask import Task
from polymod.training.progress import read_log
from polymod.training.trainer import Trainer
from tests.hosts import make_host
from tests.test_train_util import classification_data, one_thread  # noqa: F401

# dropout on, warm-up, accumulation, clipping, shuffling and evaluation: every state a resume must restore
CFG = dict(steps=8, batch_size=8, grad_accum=2, lr=5e-3, warmup=2, max_grad_norm=0.5, eval_every=4,
           checkpoint_every=3, progress=False, log_every=1, patience=5, restore_best=True, keep_checkpoints=2)


class Interrupted(Exception):
    pass


def _model():
    model = pm.Modular(make_host("bert"))  # BERT's dropout (0.1) is active while training
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=2, sites="attn.q|attn.v"))
    model.use("a")
    return model


def _data(multitask: bool):
    if not multitask:
        return classification_data(40, seed=0), classification_data(16, seed=1)
    return {"a": Task(train=classification_data(40, seed=0), eval=classification_data(16, seed=1), route="a"),
            "b": Task(train=classification_data(24, seed=2, shift=1), eval=classification_data(16, seed=3), route="b")
            }, None


def _trainer(tmp, multitask, resume=False):
    model = _model()
    train, dev = _data(multitask)
    names = ["a", "b"] if multitask else ["a"]
    return model, Trainer(model, names, train, eval_data=dev, metrics=["accuracy"], config=TrainConfig(**CFG),
                          output_dir=tmp, resume=resume, temperature=2.0)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for n in ("a", "b") for p in model[n].parameters()])


def _without_timing(records):
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in records]


@pytest.mark.parametrize("multitask", [False, True], ids=["single", "multitask"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, multitask):
    straight, trainer = _trainer(tmp_path / "straight", multitask)
    expected = trainer.fit()

    _, broken = _trainer(tmp_path / "resumed", multitask)
    calls = {"n": 0}
    step = Trainer._step

    def interrupt_at_7(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Interrupted
        return step(self, *args)

    monkeypatch.setattr(Trainer, "_step", interrupt_at_7)
    with pytest.raises(Interrupted):
        broken.fit()
    monkeypatch.setattr(Trainer, "_step", step)
    assert checkpoint.latest(tmp_path / "resumed").name == "step-000006"

    resumed, trainer = _trainer(tmp_path / "resumed", multitask, resume=True)
    assert not torch.equal(_flat(resumed), _flat(straight)), "a fresh model differs before resuming"
    result = trainer.fit()
    assert torch.equal(_flat(resumed), _flat(straight)), "resumed weights are bit-identical"
    assert result.history == expected.history and result.best == expected.best
    assert _without_timing(read_log(tmp_path / "resumed" / "metrics.jsonl")) == \
        _without_timing(read_log(tmp_path / "straight" / "metrics.jsonl"))


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _, trainer = _trainer(tmp_path, False)
    real = checkpoint.save_file

    def failing(tensors, path, *args, **kwargs):
        if "step-000006" in path and path.endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    assert checkpoint.latest(tmp_path).name == "step-000003"
    assert not (tmp_path / "checkpoints" / "step-000006").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    _, again = _trainer(tmp_path, False, resume=True)
    assert again.fit().step == 8
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-000003", "step-000006"], "keep_checkpoints=2 prunes older ones"


def test_resume_refuses_a_different_run(tmp_path):
    _, trainer = _trainer(tmp_path, False)
    trainer.fit()
    model = _model()
    train, dev = _data(False)
    other = Trainer(model, ["a"], train, eval_data=dev, config=TrainConfig(**{**CFG, "lr": 1e-2}),
                    output_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match=r"settings \['lr'\] differ from the checkpoint's"):
        other.fit()
    model.use("b")  # a module must be active to be trained
    wrong = Trainer(model, ["b"], train, eval_data=dev, config=TrainConfig(**CFG), output_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="do not fit this run"):
        wrong.fit()
