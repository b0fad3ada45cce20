"""Hugging Face's Trainer trains and saves polymod modules (issue 14, item 3): only module parameters
train, dataset columns are read from the host's forward, save_model writes the module, not the host."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import polymod as pm
from polymod.training.hf import ModularTrainer
from tests.hosts import assert_same_state, host_state, make_host
from tests.test_train_util import classification_data, one_thread  # noqa: F401


def _rows(n, seed):
    data = classification_data(n, seed=seed)
    # an extra column the host does not take: remove_unused_columns (on by default) must drop it
    return [{"input_ids": data["input_ids"][i], "attention_mask": data["attention_mask"][i],
             "labels": data["labels"][i], "row_id": i} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=24, per_device_train_batch_size=16, learning_rate=2e-2,
                lr_scheduler_type="constant", logging_steps=8, save_steps=12, report_to=[], use_cpu=True,
                dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _model():
    host = make_host("bert")
    model = pm.Modular(host)
    model.add("t", pm.LoRA(rank=4, sites="linear"))  # "linear" includes the classifier
    model.use("t")
    return host, model


def _accuracy(host, rows):
    with torch.no_grad():
        ids = torch.stack([r["input_ids"] for r in rows])
        return (host(input_ids=ids).logits.argmax(-1) == torch.stack([r["labels"] for r in rows])).float().mean()


def test_hf_trainer_trains_and_saves_only_the_module(tmp_path):
    host, model = _model()
    before_host = host_state(host)
    before = [p.detach().clone() for p in model["t"].parameters()]
    train, dev = _rows(128, 0), _rows(64, 1)
    trainer = ModularTrainer(model=model, args=_args(tmp_path), train_dataset=train)
    trainer.train()
    host.eval()  # HF's Trainer leaves the model in train mode (dropout on)
    assert_same_state(host, before_host)  # the host is untouched
    assert all(not torch.equal(a, b) for a, b in zip(before, model["t"].parameters()))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.9 * losses[0], losses
    assert _accuracy(host, dev) > 0.55  # chance is 1/3; on 64 rows 0.55 is 3.7 standard deviations above it
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(p.relative_to(tmp_path / "final").as_posix() for p in (tmp_path / "final").rglob("*")
                   if p.is_file())
    assert files == ["composition.json", "t/module.json", "t/weights.safetensors"]
    assert (tmp_path / "final" / "t" / "weights.safetensors").stat().st_size < 20_000  # the host is ~100 KB
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-12", "checkpoint-24"]

    fresh = make_host("bert")  # save -> load on a fresh copy of the same host -> same outputs
    loaded = pm.Modular(fresh)
    loaded.add("t", pm.load(tmp_path / "final" / "t", host=fresh))
    loaded.use("t")
    ids = torch.stack([r["input_ids"] for r in dev])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, host(input_ids=ids).logits)


@pytest.mark.slow  # ~7 s: three HF Trainers
def test_hf_trainer_resumes_from_a_module_checkpoint(tmp_path):
    train = _rows(64, 0)
    short = dict(max_steps=8, save_steps=4, logging_steps=4)
    _, full = _model()
    ModularTrainer(model=full, args=_args(tmp_path / "a", **short), train_dataset=train).train()
    _, cut = _model()
    ModularTrainer(model=cut, args=_args(tmp_path / "b", **{**short, "max_steps": 4}), train_dataset=train).train()
    _, resumed = _model()
    trainer = ModularTrainer(model=resumed, args=_args(tmp_path / "b", **short), train_dataset=train)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-4"))
    for a, b in zip(full["t"].parameters(), resumed["t"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_hf_trainer_walls_are_explained(tmp_path):
    host, model = _model()
    trainer = ModularTrainer(model=host, args=_args(tmp_path), train_dataset=_rows(16, 0))  # the host: its wrapper
    assert trainer.model is model
    with pytest.raises(pm.ConfigError, match=r"no pm.Modular wraps.*pm.Modular\(host\)"):
        ModularTrainer(model=make_host("bert"), args=_args(tmp_path))
    model.add("u", pm.LoRA(rank=2))
    with pytest.warns(pm.InactiveModuleWarning, match=r"\['u'\] are trained but not active.*model.use\('u'\)"):
        ModularTrainer(model=model, args=_args(tmp_path))
    model.use(None)
    with pytest.raises(pm.ConfigError, match=r"\['t', 'u'\] are attached but not active.*model.use\('t'\)"):
        ModularTrainer(model=model, args=_args(tmp_path))


def test_plain_hf_trainer_on_the_host_trains_nothing(tmp_path):
    """The wall ModularTrainer removes: transformers.Trainer(model=host) optimises only frozen host weights."""
    host, model = _model()
    before = [p.detach().clone() for p in model["t"].parameters()]
    Trainer(model=host, args=_args(tmp_path, max_steps=2, save_strategy="no"), train_dataset=_rows(32, 0)).train()
    assert all(torch.equal(a, b) for a, b in zip(before, model["t"].parameters()))
