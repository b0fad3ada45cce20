"""The vLLM engine's logic without vLLM: hub names → verified modules → PEFT LoRA directories, refusals, launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import polymod as pm
from polymod.errors import ConfigError, IncompatibleHostError, IntegrityError
from polymod.hub.composition import save_composition
from polymod.merging.lora import svd_factor
from polymod.serving.engine import ServeOptions
from polymod.serving.vllm_engine import stop_tree, vllm_command
from polymod.serving.vllm_peft import NotServableError
from polymod.serving.vllm_plugin import RefusePolymodExtension, register
from polymod.serving.vllm_resolver import ENV, HubLoraSource, ResolverConfig, http_status
from tests.hosts import randomize
from tests.serve_helpers import char_tokenizer, publish, tiny_llama

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    host = tiny_llama()
    host.save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    hub = root / "hub"
    refs = {kind: publish(host, hub, kind, kind, seed=i + 1) for i, kind in enumerate(("lora", "ia3", "adapter"))}
    refs["lora2"] = publish(host, hub, "lora2", "lora", seed=7)
    return {"root": root, "host": host, "hub": hub, "refs": refs}


def _source(world, name="src", **kw) -> HubLoraSource:
    config = ResolverConfig(model_dir=str(world["root"] / "tiny"), served_name="tiny", hub=str(world["hub"]),
                            cache_dir=str(world["root"] / name), **kw)
    return HubLoraSource(config)


def _logits(host, composition=None, modules=None):
    model = pm.Modular(host)
    try:
        for name, module in (modules or {}).items():
            model.add(name, module)
        model.use(composition)
        with torch.no_grad():
            return host(IDS).logits
    finally:
        model.detach()


def test_a_lora_becomes_the_peft_directory_vllm_loads(world):
    source = _source(world, aliases={"senti": world["refs"]["lora"]})
    done = source.resolve("senti")
    assert done.exact and done.how == "peft" and done.rank == 4 and done.max_error == 0.0
    config = json.loads((done.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny" and config["bias"] == "none"
    assert json.loads((done.path / "polymod.json").read_text())["ref"] == world["refs"]["lora"]
    host = world["host"]
    original = pm.hub.get(world["refs"]["lora"], host=host, hub=str(world["hub"]))
    want = _logits(host, "m", {"m": original})
    got = _logits(host, "m", {"m": pm.read_peft(done.path, host=host)})
    assert not torch.allclose(want, _logits(host))  # the module changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the same content under its reference: no second pull, the same directory
    pulls = []
    source.hub.pull = lambda *a, **k: pulls.append(a)
    assert source.resolve(world["refs"]["lora"]).path == done.path and pulls == []


def test_names_that_are_not_hub_modules_are_left_to_vllm(world):
    source = _source(world)
    assert source.resolve("gpt-4") is None  # not a reference: vLLM answers its own 404
    assert source.resolve("me/nothing@1.0.0") is None


@pytest.mark.parametrize("kind", ["ia3", "adapter"])
def test_kinds_vllm_cannot_run_are_refused_naming_the_native_engine(world, kind):
    source = _source(world, name=f"refuse-{kind}")
    with pytest.raises(NotServableError, match=rf"is a {kind} module and vLLM runs LoRA only.*--engine native") as e:
        source.resolve(world["refs"][kind])
    assert http_status(e.value)[0] == 400
    assert not source.dir.exists()  # refused before anything was pulled or written


def test_a_module_made_for_other_weights_is_refused_unless_allowed(world):
    other = tiny_llama(seed=5)  # same geometry, other weights
    ref = publish(other, world["hub"], "other-weights", "lora", seed=3)
    with pytest.raises(IncompatibleHostError, match=r"another host than the served 'tiny'.*weights differ at 6 of "
                                                    r"6 sites.*--allow-host-mismatch") as e:
        _source(world).resolve(ref)
    assert http_status(e.value)[0] == 409
    assert _source(world, name="lenient", allow_host_mismatch=True).resolve(ref).exact


def test_a_module_for_another_geometry_is_refused(world):
    import transformers as tf

    torch.manual_seed(0)
    wide = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=48, vocab_size=98))
    ref = publish(wide, world["hub"], "wide", "lora", seed=3)
    with pytest.raises(IncompatibleHostError, match=r"site model\.layers\.0\.self_attn\.q_proj: module expects a "
                                                    r"linear 64->64, the served checkpoint's .* is \[32, 32\]"):
        _source(world, allow_host_mismatch=True).resolve(ref)


def test_a_tampered_package_is_never_handed_to_vllm(world):
    ref = publish(world["host"], world["hub"], "tampered", "lora", seed=9)
    store = pm.hub.Store(world["hub"])
    info = store.get("me", "tampered", "1.0.0")
    blob = store.blob_path(info.files["weights.safetensors"]["sha256"])
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    source = _source(world, name="tamper")
    with pytest.raises(IntegrityError) as e:
        source.resolve(ref)
    assert http_status(e.value)[0] == 502
    assert not (source.dir / "adapters").exists() or not any((source.dir / "adapters").iterdir())
    assert source.resolve(world["refs"]["lora"]).exact  # the others still resolve


def _publish(world, name: str, spec) -> Path:
    model = pm.Modular(world["host"])
    try:
        model.add(name, spec)
        torch.manual_seed(4)
        randomize(model[name], std=0.5)
        path = pm.save(model[name], world["root"] / "packages" / name)
    finally:
        model.detach()
    pm.hub.push(path, f"me/{name}@1.0.0", hub=str(world["hub"]))
    return path


@pytest.mark.parametrize("name, spec, why", [
    ("dora", pm.LoRA(rank=4, sites="attn.q", dora=True), r"a DoRA LoRA \(LoRA\(dora=True\)\)"),
    ("embed", pm.LoRA(rank=4, sites="model.embed_tokens"), r"site model\.embed_tokens is of kind embedding"),
])
def test_loras_vllm_cannot_run_are_refused_with_the_reason(world, name, spec, why):
    _publish(world, name, spec)
    with pytest.raises(NotServableError, match=why + r".*--engine native"):
        _source(world, name=f"refuse-{name}").resolve(f"me/{name}@1.0.0")


def test_a_lora_above_the_served_rank_is_truncated_with_its_error_reported(world):
    host = world["host"]
    path = _publish(world, "big", pm.LoRA(rank=16, sites="attn.q|ffn.out"))
    module = pm.load(path)
    want = {name: svd_factor(part.delta_weight(), 8)[2] for name, part in module.items()}
    with pytest.raises(NotServableError, match=r"as a LoRA of rank 8 \(--max-lora-rank\) it would be off by .* above "
                                               r"the allowed 0\.05; raise --max-lora-rank"):
        _source(world, name="r8", max_rank=8).resolve("me/big@1.0.0")
    done = _source(world, name="r8", max_rank=8, max_error=0.99).resolve("me/big@1.0.0")
    assert done.how == "svd" and done.rank == 8 and not done.exact
    assert done.errors == pytest.approx(want, rel=1e-6) and 0.05 < done.max_error < 0.99
    back = pm.read_peft(done.path, host=host)
    for name, part in back.items():  # the written factors are the best rank-8 approximation
        u, s, vh = torch.linalg.svd(module.part(name).delta_weight().double())
        best = (u[:, :8] * s[:8]) @ vh[:8]
        torch.testing.assert_close(part.delta_weight().double(), best, rtol=0, atol=1e-5)
    exact = _source(world, name="r16", max_rank=16).resolve("me/big@1.0.0")
    assert exact.exact and exact.how == "peft"


def test_a_composition_of_loras_is_materialised_exactly(world):
    host, refs = world["host"], world["refs"]
    expr = pm.Stack("a", pm.Mix(["b", "c"], router=pm.Static([0.3, 0.7])))
    leaves = {"a": refs["lora"], "b": refs["lora2"], "c": refs["lora"]}
    path = save_composition(expr, leaves, world["root"] / "packages" / "combo", hub=str(world["hub"]))
    pm.hub.push(path, "me/combo@1.0.0", hub=str(world["hub"]))
    done = _source(world, name="combo").resolve("me/combo@1.0.0")
    assert done.exact and done.how == "factors" and done.rank == 12  # 4 + 4 + 4 concatenated (≤ 16)
    modules = {leaf: pm.hub.get(ref, host=host, hub=str(world["hub"])) for leaf, ref in leaves.items()}
    want = _logits(host, expr, modules)
    got = _logits(host, "m", {"m": pm.read_peft(done.path, host=host)})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    routed = save_composition(pm.Mix(["a", "b"], router=pm.Static([0.5, 0.5]), aggregate="mean"),
                              {"a": refs["lora"], "b": refs["lora2"]}, world["root"] / "packages" / "avg",
                              hub=str(world["hub"]))
    pm.hub.push(routed, "me/avg@1.0.0", hub=str(world["hub"]))
    with pytest.raises(NotServableError, match=r"is not a sum of weight changes.*--engine native"):
        _source(world, name="avg").resolve("me/avg@1.0.0")


def test_the_vllm_command_maps_the_serve_options(world, tmp_path):
    options = ServeOptions(max_batch=6, max_resident=4, max_cpu_modules=32, aliases={"s": "me/lora@1.0.0"},
                           cors_origins=["http://localhost:3000"], cache_dir=str(tmp_path / "c"))
    argv, env = vllm_command(str(world["root"] / "tiny"), str(world["hub"]), options, name="tiny", port=8123,
                             max_rank=32, python="/x/python")
    assert argv[:3] == ["/x/python", "-m", "vllm.entrypoints.openai.api_server"]
    rest = argv[3:]
    flags = {a: (rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else "on")
             for i, a in enumerate(rest) if a.startswith("--")}
    assert flags["--enable-lora"] == "on" and flags["--model"] == str((world["root"] / "tiny").resolve())
    assert flags["--max-loras"] == "4" and flags["--max-cpu-loras"] == "32" and flags["--max-num-seqs"] == "6"
    assert flags["--max-lora-rank"] == "32" and flags["--dtype"] == "float32" and flags["--port"] == "8123"
    assert json.loads(flags["--allowed-origins"]) == ["http://localhost:3000"]
    assert flags["--middleware"] == "polymod.serving.vllm_plugin.RefusePolymodExtension"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    config = ResolverConfig.from_env(env)
    assert config.aliases == {"s": "me/lora@1.0.0"} and config.max_rank == 32 and config.served_name == "tiny"
    with pytest.raises(ConfigError, match="only the native engine"):
        vllm_command(str(world["root"] / "tiny"), None, ServeOptions(api_keys=True), python="/x/python")
    with pytest.raises(NotServableError, match=r"--max-lora-rank takes one of \[1, 8, 16"):
        vllm_command(str(world["root"] / "tiny"), None, options, max_rank=12, python="/x/python")
    with pytest.raises(ConfigError, match="no config.json|readable config.json"):
        vllm_command(str(tmp_path), None, options, python="/x/python")


def test_the_plugin_does_nothing_without_polymods_configuration(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    register()  # must not import vLLM (not installed in this venv) nor fail
    assert "vllm" not in sys.modules
    monkeypatch.setenv(ENV, "not json")
    with pytest.raises(ConfigError, match="must hold the JSON"):
        register()


def test_the_polymod_extension_is_refused_not_silently_ignored():
    inner = FastAPI()

    @inner.post("/v1/completions")
    async def echo(request: Request):
        return await request.json()

    client = TestClient(RefusePolymodExtension(inner))
    body = {"model": "me/a@1.0.0", "prompt": "hi", "polymod": {"compose": {"stack": ["a", "b"]}}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "polymod"
    assert "--engine native" in r.json()["error"]["message"] and "save_composition" in r.json()["error"]["message"]
    plain = {"model": "me/a@1.0.0", "prompt": 'a "polymod" in the text is fine'}
    assert client.post("/v1/completions", json=plain).json() == plain  # the body reaches vLLM unchanged


def test_stop_tree_ends_the_grandchildren_too(tmp_path):
    pidfile = tmp_path / "pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 20
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.time() < deadline, "the child did not start"
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    stop_tree(proc, timeout=5)
    assert proc.poll() is not None
    deadline = time.time() + 5
    while os.path.exists(f"/proc/{grandchild}") and "zombie" not in open(f"/proc/{grandchild}/status").read().lower():
        assert time.time() < deadline, "the grandchild outlived stop_tree"
        time.sleep(0.05)
