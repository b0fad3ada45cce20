"""``polymod serve`` from the command line: the README's commands, and clear failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from polymod.cli import app
from tests.hub_helpers import free_port
from tests.serve_helpers import char_tokenizer, publish, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_bad_engine_and_alias_fail_with_a_message(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["serve", str(tmp_path), "--engine", "tgi"])
    assert out.exit_code != 0 and "--engine takes native or vllm, got 'tgi'" in str(out.exception)
    out = runner.invoke(app, ["serve", str(tmp_path), "--alias", "no-equals-sign"])
    assert "NAME=owner/name" in str(out.exception)
    out = runner.invoke(app, ["serve", str(tmp_path / "missing")])
    assert "not a model directory" in str(out.exception)


@pytest.mark.slow
def test_polymod_serve_process_answers_completions(tmp_path):
    host_dir = tmp_path / "tiny-host"
    host = tiny_llama()
    host.save_pretrained(host_dir)
    char_tokenizer().save_pretrained(host_dir)
    ref = publish(host, tmp_path / "hub", "senti", "lora")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "polymod.cli", "serve", str(host_dir), "--hub",
                             str(tmp_path / "hub"), "--alias", f"senti={ref}", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "senti", "prompt": "The movie was", "max_tokens": 5,
                                                     "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids[:2] == ["tiny-host", "senti"]
    finally:
        proc.terminate()
        proc.wait(30)
