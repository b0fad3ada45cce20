"""``polymod hub …``: every command, against a local store and a server; errors exit 1 without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from polymod import hub
from polymod.cli import app
from tests.hub_helpers import hub_thread, make_package

runner = CliRunner()


def run(*args: str, ok: bool = True):
    result = runner.invoke(app, ["hub", *args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMOD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("POLYMOD_HUB", raising=False)
    monkeypatch.delenv("POLYMOD_TOKEN", raising=False)
    return tmp_path


def test_local_store_commands(env):
    pkg = make_package(env / "pkg", description="movie sentiment", task="sentiment", tags=["movies"])
    store = str(env / "store")
    assert "published alice/senti@1.0.0 sha256:" in run("push", str(pkg), "alice/senti@1.0.0", "--hub", store)
    run("push", str(pkg), "alice/senti", "--version", "1.1.0", "--hub", store)
    assert "alice/senti@1.1.0" in run("search", "movie", "--hub", store)
    hits = json.loads(run("search", "--task", "sentiment", "--json", "--hub", store))
    assert hits["total"] == 1 and hits["facets"]["tag"] == {"movies": 1}
    assert "task: sentiment" in run("show", "alice/senti@1.0.0", "--hub", store)
    assert run("versions", "alice/senti", "--hub", store).split() == ["1.1.0", "1.0.0"]
    out = run("pull", "alice/senti@1.0.0", "--dest", str(env / "out"), "--hub", store)
    assert (env / "out" / "weights.safetensors").is_file() and str(env / "out") in out
    assert "self       alice/senti@1.1.0" in run("lineage", "alice/senti", "--hub", store)
    assert "yanked" in run("yank", "alice/senti@1.1.0", "--reason", "bad", "--hub", store)
    assert run("versions", "alice/senti", "--hub", store).split() == ["1.1.0", "yanked", "1.0.0"]
    assert "consistent" in run("check", "--store", store)


def test_server_login_push_pull(env):
    store = hub.Store(env / "server")
    token = run("user", "add", "alice", "--store", str(store.root)).strip()
    assert token.startswith("pmh_")
    pkg = make_package(env / "pkg")
    with hub_thread(store) as url:
        assert "logged in to" in run("login", url, "--token", token)
        saved = env / "home" / "credentials.json"
        assert json.loads(saved.read_text())[url] == token and (saved.stat().st_mode & 0o777) == 0o600
        run("push", str(pkg), "alice/m@1.0.0", "--hub", url)  # uses the saved token
        run("pull", "alice/m", "--hub", url)
        assert (env / "home" / "hub" / "packages" / "alice" / "m" / "1.0.0" / "module.json").is_file()
        assert "revoked" in run("user", "revoke", token, "--store", str(store.root))
        with pytest.raises(hub.AuthError, match="not valid"):
            runner.invoke(app, ["hub", "push", str(pkg), "alice/m@1.0.1", "--hub", url], catch_exceptions=False)


def test_errors_exit_1_with_a_message_not_a_traceback(env):
    cmd = [sys.executable, "-c", "from polymod.cli import main; main()", "hub", "show", "alice/../x",
           "--hub", str(env / "store")]
    env_vars = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_vars, timeout=120)
    assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "module reference" in proc.stderr
