"""`polymod train` is reproducible: the seed is applied before the host and modules are built.

The host directory holds only the encoder (``BertModel``), so the classification head is freshly
initialised when the run loads it, as with a real pretrained checkpoint; LoRA's A matrices are random too.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from polymod.training.trainer import Trainer
from tests.hosts import make_host
from tests.test_train_cli import _cli, _write
from tests.test_train_util import one_thread  # noqa: F401


def _encoder_only_host(tmp_path):
    """A pretrained-like directory without a classifier: loading it for classification draws a fresh head."""
    from tests.test_train_cli import _host_dir

    path = _host_dir(tmp_path)
    make_host("bert").bert.save_pretrained(path)  # replaces the weights and config with the encoder alone
    return path


def _config(tmp_path, output_dir, **training):
    _encoder_only_host(tmp_path)
    cfg = _write(tmp_path, None)
    cfg["modules"]["t"]["sites"] = "attn.q|attn.v"
    cfg["output_dir"] = output_dir
    cfg["training"].update(training)
    path = tmp_path / f"{output_dir}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _trained(tmp_path, run):
    return load_file(str(tmp_path / run / "modules" / "t" / "weights.safetensors"))


def test_same_config_twice_gives_bit_identical_weights(tmp_path, monkeypatch, capsys):
    for run in ("run1", "run2"):
        path = _config(tmp_path, run, steps=6, eval_every=0, checkpoint_every=0)
        torch.manual_seed(1234 if run == "run1" else 99)  # whatever the process did before must not matter
        code, _, err = _cli(monkeypatch, capsys, "train", str(path))
        assert code == 0, err
    first, second = _trained(tmp_path, "run1"), _trained(tmp_path, "run2")
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_resume_from_the_cli_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    settings = dict(steps=8, eval_every=4, checkpoint_every=4, log_every=1)
    path = _config(tmp_path, "full", **settings)
    torch.manual_seed(6)
    code, _, err = _cli(monkeypatch, capsys, "train", str(path))
    assert code == 0, err

    class Crash(Exception):
        pass

    original = Trainer._checkpoint

    def crash_after_first_checkpoint(self, optimizer, scheduler, state):
        original(self, optimizer, scheduler, state)
        raise Crash

    path = _config(tmp_path, "cut", **settings)
    monkeypatch.setattr(Trainer, "_checkpoint", crash_after_first_checkpoint)
    torch.manual_seed(7)
    with pytest.raises(Crash):
        _cli(monkeypatch, capsys, "train", str(path))
    monkeypatch.setattr(Trainer, "_checkpoint", original)
    torch.manual_seed(8)  # a fresh process: the global RNG is wherever it happens to be
    code, _, err = _cli(monkeypatch, capsys, "train", str(path), "--resume")
    assert code == 0, err
    full, resumed = _trained(tmp_path, "full"), _trained(tmp_path, "cut")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
