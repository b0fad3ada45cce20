"""AdapterHub ``adapters`` interop against fixtures written by ``adapters`` 1.3.0 itself.

tests/fixtures/make_adapters_fixtures.py (run in the adapters venv) saved a tiny BERT,
four adapters with ``use_safetensors=True`` and the logits ``adapters`` computed with
each; polymod must load each directory and reproduce those logits on the same host.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import polymod as pm
from polymod.interop import detect, read_adapters

FIXTURES = Path(__file__).parent / "fixtures" / "adapters"


def _host() -> torch.nn.Module:
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=96, max_position_embeddings=64, num_labels=3)
    host = tf.BertForSequenceClassification(cfg).eval()
    state = load_file(str(FIXTURES / "host.safetensors"))
    missing, unexpected = host.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("position_ids")] and not unexpected
    return host


@pytest.mark.parametrize("name,kind", [("lora", "lora"), ("seq_bn", "adapter"), ("double_seq_bn", "adapter"),
                                       ("par_bn", "adapter")])
def test_adapters_dirs_reproduce_adapters_logits(name, kind):
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    batch = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    host = _host()
    with torch.no_grad():
        torch.testing.assert_close(host(**batch).logits, expected["logits.none"], rtol=0, atol=1e-5)
    assert detect(FIXTURES / name) == "adapters"
    module = pm.load(FIXTURES / name, host=host)
    assert module.kind == kind and module.card.lineage.recipe["format"] == "adapters"
    model = pm.Modular(host)
    model.add(name, module)
    model.use(name)
    with torch.no_grad():
        ours = host(**batch).logits
    assert (expected[f"logits.{name}"] - expected["logits.none"]).abs().max() > 1e-3, "the adapter must act"
    torch.testing.assert_close(ours, expected[f"logits.{name}"], rtol=0, atol=1e-5)


def test_pickle_adapters_dir_is_refused(tmp_path):
    d = tmp_path / "a"
    shutil.copytree(FIXTURES / "lora", d)
    (d / "adapter.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_adapter.bin")
    with pytest.raises(pm.FormatError, match="pickle.*use_safetensors=True"):
        pm.load(d)


def test_unsupported_adapters_options_are_named(tmp_path):
    d = tmp_path / "a"
    shutil.copytree(FIXTURES / "seq_bn", d)
    meta = json.loads((d / "adapter_config.json").read_text())
    meta["config"]["use_gating"] = True
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(pm.FormatError, match="use_gating"):
        read_adapters(d, host=_host())
    with pytest.raises(pm.ConfigError, match="needs the host"):
        read_adapters(FIXTURES / "seq_bn")
