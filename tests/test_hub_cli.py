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

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL

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
    assert "consistent" in run("check", "--hub", store)  # one name for the hub in every subcommand
    assert "consistent" in run("check", "--store", store)  # the older name still works


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
        port = url.rsplit(":", 1)[1]
        cached = env / "home" / "hubs" / f"http_127.0.0.1_{port}" / "packages" / "alice" / "m" / "1.0.0"
        assert (cached / "module.json").is_file(), "pulls are cached per hub"
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


def _main(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """Run the real entry point (``polymod.cli.main``, as the installed ``polymod`` script does)."""
    from polymod.cli import main

    monkeypatch.setattr(sys, "argv", ["polymod", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


def test_every_command_exit_code_follows_its_result(env, capsys, monkeypatch):
    store = str(env / "store")
    pkg = make_package(env / "pkg")
    cases = [  # (arguments, expected exit code, text expected in stdout+stderr)
        (["version"], 0, "."),
        (["kinds"], 0, "lora"),
        (["hub", "push", str(pkg), "alice/m@1.0.0", "--hub", store], 0, "published alice/m@1.0.0"),
        (["hub", "push", str(env / "nowhere"), "alice/m@1.0.1", "--hub", store], 1, "is not a directory"),
        (["hub", "pull", "alice/m@1.0.0", "--dest", str(env / "out"), "--hub", store], 0, str(env / "out")),
        (["hub", "pull", "alice/m@9.0.0", "--hub", store], 1, "is not in the hub"),
        (["hub", "pull", "alice/m@1.0.0", "--dest", str(env / "pkg" / "module.json"), "--hub", store], 1,
         "is not a directory"),
        (["hub", "search", "--hub", store], 0, "1 module(s)"),
        (["hub", "search", "--hub", "http://127.0.0.1:9"], 1, "cannot reach the hub"),
        (["hub", "show", "alice/m", "--hub", store], 0, "alice/m@1.0.0"),
        (["hub", "show", "alice/zz", "--hub", store], 1, "is not in the hub"),
        (["hub", "versions", "alice/m", "--hub", store], 0, "1.0.0"),
        (["hub", "versions", "alice/zz", "--hub", store], 1, "not in the hub"),
        (["hub", "lineage", "alice/m", "--hub", store], 0, "self"),
        (["hub", "lineage", "alice/zz", "--hub", store], 1, "not in the hub"),
        (["hub", "yank", "alice/m@1.0.0", "--hub", store], 0, "yanked"),
        (["hub", "yank", "alice/m@2.0.0", "--hub", store], 1, "not in the hub"),
        (["hub", "user", "add", "alice", "--store", store], 0, "pmh_"),
        (["hub", "user", "add", "Not Valid", "--store", store], 1, "error:"),
        (["hub", "user", "grant", "lab", "alice", "--store", store], 0, "alice may publish in lab"),
        (["hub", "user", "grant", "lab", "nobody", "--store", store], 1, "no user 'nobody'"),
        (["hub", "user", "revoke", "pmh_unknown", "--store", store], 1, "no such token"),
        (["hub", "login", "http://127.0.0.1:9", "--token", "pmh_x"], 1, "cannot reach the hub"),
        (["hub", "serve", "--store", str(pkg / "module.json")], 1, "error:"),
        (["hub", "check", "--store", store], 0, "consistent"),
        (["hub", "nosuchcommand"], 2, "No such command"),
    ]
    for args, expected, text in cases:
        code, out, err = _main(capsys, monkeypatch, *args)
        assert code == expected and text in out + err, (args, code, out, err)
        assert "Traceback" not in err, (args, err)
    token = _main(capsys, monkeypatch, "hub", "user", "add", "bob", "--store", store)[1].strip()
    assert _main(capsys, monkeypatch, "hub", "user", "revoke", token, "--store", store)[:2] == (0, "revoked\n")
    with hub_thread(hub.Store(store)) as url:
        assert _main(capsys, monkeypatch, "hub", "login", url, "--token", "pmh_bad")[0] == 1
        good = _main(capsys, monkeypatch, "hub", "user", "add", "carol", "--store", store)[1].strip()
        assert _main(capsys, monkeypatch, "hub", "login", url, "--token", good)[0] == 0


def test_check_with_a_corrupt_blob_exits_1(env, capsys, monkeypatch):
    store = hub.Store(env / "store")
    info = hub.push(make_package(env / "pkg"), "alice/m@1.0.0", hub=store)
    blob = store.blob_path(info.sha256)
    blob.write_bytes(b"\0" + blob.read_bytes()[1:])
    code, out, _ = _main(capsys, monkeypatch, "hub", "check", "--store", str(store.root))
    assert code == 1 and f"alice/m@1.0.0:weights.safetensors: blob {info.sha256} corrupt" in out
    assert "1 problem(s)" in out


def test_terminal_escapes_from_a_hub_are_shown_not_obeyed(env, capsys, monkeypatch):
    from polymod.hub.commands import terminal_safe

    assert terminal_safe("ok\x1b]0;pwned\x07\x1b[2J\rX\x9b") == "ok\\x1b]0;pwned\\x07\\x1b[2J\\x0dX\\x9b"
    store = str(env / "store")
    info = hub.push(make_package(env / "pkg"), "alice/m@1.0.0", hub=store)
    hostile = hub.VersionInfo(**{**info.to_dict(), "card": {**info.card, "description": "fine \x1b[31mred\x1b[0m"},
                                 "yank_reason": "\x1b]0;pwned\x07", "yanked": True})
    monkeypatch.setattr(hub, "show", lambda ref, hub=None: hostile)  # what a hostile hub could answer
    code, out, err = _main(capsys, monkeypatch, "hub", "show", "alice/m", "--hub", store)
    assert code == 0 and "\x1b" not in out + err and "\\x1b[31mred" in out and "\\x1b]0;pwned\\x07" in out


def test_gc_and_admin_revoke_by_user(env, capsys, monkeypatch):
    store = hub.Store(env / "store")
    hub.push(make_package(env / "pkg"), "alice/m@1.0.0", hub=store)
    orphan, _ = store.write_blob([b"left over by an abandoned push"])
    code, out, _ = _main(capsys, monkeypatch, "hub", "gc", "--store", str(store.root), "--older-than-hours", "0")
    assert code == 0 and "removed 1 unreferenced blob(s)" in out
    assert not store.has_blob(orphan) and store.verify_blob(store.get("alice", "m").sha256)
    from polymod.hub.auth import authenticate, create_token

    tokens = [create_token(store, "bob") for _ in range(2)]
    code, out, _ = _main(capsys, monkeypatch, "hub", "user", "revoke", "--user", "bob", "--store", str(store.root))
    assert code == 0 and "revoked 2 token(s) of bob" in out
    for t in tokens:
        with pytest.raises(hub.AuthError, match="not valid"):
            authenticate(store, t)
    assert _main(capsys, monkeypatch, "hub", "user", "revoke", "--user", "nobody", "--store", str(store.root))[0] == 1
    assert _main(capsys, monkeypatch, "hub", "user", "revoke", "--store", str(store.root))[0] == 2
