"""The ``adapters`` reader's allow-list: every key of the saved configs classified; refused keys named when set.

The fixtures (tests/fixtures/adapters, written by adapters 1.3.0) hold every key of ``LoRAConfig`` and
``BnConfig`` as adapters saves them. Each key must be in polymod's table; each key refused at a non-default
value must be named in the error; each key without effect must load with the adapters logits unchanged.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import polymod as pm
from polymod.interop import adapters_options as options
from tests.test_interop_adapters import FIXTURES, _host

TABLES = {"lora": options.LORA, "seq_bn": options.BOTTLENECK, "double_seq_bn": options.BOTTLENECK,
          "par_bn": options.BOTTLENECK}


def _non_default(default):
    if isinstance(default, bool):
        return not default
    if default is None:
        return {"x": 1}
    if isinstance(default, (int, float)):
        return default + 0.5
    if isinstance(default, str):
        return default + "_other"
    return ["x"]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_saved_key_is_classified(name):
    meta = json.loads((FIXTURES / name / "adapter_config.json").read_text())
    assert set(meta) - set(options.META) == set()
    assert set(meta["config"]) - set(TABLES[name]) == set(), "adapters keys polymod does not classify"


CASES = [(n, k) for n in sorted(TABLES) for k, o in TABLES[n].items() if o.status != "exact"]


@pytest.mark.parametrize("name,key", CASES)
def test_non_default_key_is_refused_by_name_or_has_no_effect(name, key, tmp_path):
    option = TABLES[name][key]
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    meta = json.loads((d / "adapter_config.json").read_text())
    meta["config"][key] = _non_default(option.default)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    host = _host()
    if option.status == "refused":
        with pytest.raises(pm.FormatError, match=rf"\b{key}="):
            pm.load(d, host=host)
        return
    expected = load_file(str(FIXTURES / "expected.safetensors"))
    model = pm.Modular(host)
    model.add("a", pm.load(d, host=host))
    model.use("a")
    with torch.no_grad():
        ours = host(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    torch.testing.assert_close(ours, expected[f"logits.{name}"], rtol=0, atol=1e-5)


def test_unknown_key_is_refused_by_name(tmp_path):
    d = tmp_path / "lora"
    shutil.copytree(FIXTURES / "lora", d)
    meta = json.loads((d / "adapter_config.json").read_text())
    meta["config"]["brand_new"] = 2
    (d / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(pm.FormatError, match="brand_new=2 is an option polymod does not know"):
        pm.load(d, host=_host())
