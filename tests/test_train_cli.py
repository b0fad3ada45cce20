"""`polymod train config.yaml`: whole-file validation, a run end to end, resume."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

import polymod as pm
from polymod.cli import main
from tests.hosts import VOCAB, make_host
from tests.test_train_util import classification_data, one_thread  # noqa: F401

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def _host_dir(tmp_path):
    """A tiny BERT classifier saved like a downloaded model, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "host"
    make_host("bert").save_pretrained(path)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    return path


def _write(tmp_path, host):
    train = classification_data(192, seed=0)
    dev = classification_data(96, seed=1)
    with open(tmp_path / "train.jsonl", "w") as f:  # text, tokenized by the host's tokenizer
        for ids, label in zip(train["input_ids"].tolist(), train["labels"].tolist()):
            f.write(json.dumps({"text": " ".join(WORDS[i - 3] for i in ids), "label": label}) + "\n")
    with open(tmp_path / "dev.jsonl", "w") as f:  # already tokenized
        for ids, label in zip(dev["input_ids"].tolist(), dev["labels"].tolist()):
            f.write(json.dumps({"input_ids": ids, "labels": label}) + "\n")
    cfg = {"host": {"path": "host", "task": "classification", "num_labels": 3},
           "modules": {"t": {"kind": "lora", "rank": 4, "sites": "linear"}},
           "train": ["t"], "data": {"train": "train.jsonl", "eval": "dev.jsonl"}, "metrics": ["accuracy"],
           "training": {"steps": 30, "batch_size": 16, "lr": 0.02, "warmup": 0, "eval_every": 15,
                        "checkpoint_every": 15, "progress": False},
           "output_dir": "run"}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["polymod", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_command_runs_and_resumes(tmp_path, monkeypatch, capsys):
    _write(tmp_path, _host_dir(tmp_path))
    code, out, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "train.yaml"))
    assert code == 0, err
    summary = json.loads(out)
    # chance is 1/3; on 96 dev rows 0.5 is 3.5 standard deviations above it
    assert summary["step"] == 30 and summary["metrics"]["accuracy"] > 0.5
    module = pm.load(tmp_path / "run" / "modules" / "t")
    assert module.card.lineage.recipe["steps"] == 30
    code, out, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "train.yaml"), "--resume")
    assert code == 0 and json.loads(out)["metrics"] == summary["metrics"], "resuming a finished run changes nothing"


def test_config_problems_are_all_reported_before_building(tmp_path, monkeypatch, capsys):
    cfg = {"host": {"path": "missing", "task": "regression"},
           "modules": {"t": {"kind": "lora", "rank": 0}, "u": {"kind": "nope"}, "v": {"load": "nowhere"}},
           "use": {"stack": ["t", "w"]}, "train": ["t", "x"], "data": {"train": "none.jsonl", "shuffle": True},
           "metrics": ["bleu"], "training": {"steps": -1, "lrate": 1}, "epochs": 3}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "bad.yaml"))
    assert code == 1 and "Traceback" not in err
    message = " ".join(err.split())
    for needle in ["unknown top-level key 'epochs'", "host.path", "host.task = 'regression'", "rank must be a positive",
                   "unknown module kind 'nope'", "modules.v.load", "use names module 'w'", "train names 'x'",
                   "data: unknown key 'shuffle'", "data.train", "metrics = ['bleu']", "steps = -1",
                   "unknown training setting 'lrate'", "output_dir must be"]:
        assert needle in message, needle


def test_check_validates_a_multitask_config(tmp_path, monkeypatch, capsys):
    _host_dir(tmp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps({"input_ids": [5, 6], "labels": 1}) + "\n")
    cfg = {"host": {"path": "host"}, "modules": {"a": {"kind": "lora"}, "b": {"kind": "lora"}}, "train": ["a", "b"],
           "tasks": {"a": {"train": "a.jsonl", "route": "a"},
                     "b": {"train": "a.jsonl", "route": {"stack": ["a", "b"]}}},
           "output_dir": "run"}
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = _cli(monkeypatch, capsys, "train", str(tmp_path / "mt.yaml"), "--check")
    assert code == 0 and json.loads(out) == {"valid": True, "sites": {"a": 4, "b": 4}}
    cfg["tasks"]["b"]["route"] = {"stack": ["a", "zz"]}
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "mt.yaml"), "--check")
    assert code == 1 and "tasks.b.route names module 'zz'" in " ".join(err.split())


@pytest.mark.parametrize("text", ["host: [1, 2", "- just a list"])
def test_unreadable_config(tmp_path, monkeypatch, capsys, text):
    (tmp_path / "x.yaml").write_text(text)
    code, _, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "x.yaml"))
    assert code == 1 and ("cannot read" in err or "must be a YAML mapping" in err)


@pytest.mark.parametrize(("args", "message"), [
    (["train"], "Missing argument 'config'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_usage_errors_exit_with_a_message_not_a_traceback(monkeypatch, capsys, args, message):
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 2
    assert message in err and "polymod --help" in err
    assert "Traceback" not in err + out
