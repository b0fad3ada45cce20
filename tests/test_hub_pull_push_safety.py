"""Pull never deletes or overwrites the user's files; push never follows a link out of the package."""

from __future__ import annotations

import json
import os

import pytest

from polymod import hub
from polymod.errors import FormatError
from polymod.hub.package import PULL_RECORD, file_sha256
from polymod.hub.remote import RemoteHub
from tests.hub_helpers import hub_thread, make_package

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture
def store(tmp_path):
    s = hub.Store(tmp_path / "store")
    hub.push(make_package(tmp_path / "p1", seed=1), "alice/m@1.0.0", hub=s)
    hub.push(make_package(tmp_path / "p2", seed=2), "alice/m@1.1.0", hub=s)
    hub.push(make_package(tmp_path / "p3", seed=3), "alice/other@1.0.0", hub=s)
    return s


def _user_dir(path):
    (path / "data").mkdir(parents=True)
    (path / "train.py").write_text("print('mine')\n")
    (path / "data" / "rows.csv").write_text("a,b\n")
    return path


def _snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_pull_into_a_folder_of_user_files_refuses_and_touches_nothing(tmp_path, store):
    dest = _user_dir(tmp_path / "work")
    before = _snapshot(dest)
    with pytest.raises(hub.DestinationError, match=r"not empty \(data, train.py\).*--force"):
        hub.pull("alice/m@1.0.0", dest, hub=store)
    assert _snapshot(dest) == before and sorted(os.listdir(dest)) == ["data", "train.py"]


def test_force_writes_only_the_package_files_and_deletes_nothing(tmp_path, store):
    dest = _user_dir(tmp_path / "work")
    (dest / "module.json").write_text("{}")  # a same-named file is what force overwrites, nothing else
    out = hub.pull("alice/m@1.0.0", dest, hub=store, force=True)
    assert out == dest and (dest / "train.py").read_text() == "print('mine')\n"
    assert (dest / "data" / "rows.csv").read_text() == "a,b\n"
    assert file_sha256(dest / "weights.safetensors") == store.get("alice", "m", "1.0.0").sha256
    assert json.loads((dest / "module.json").read_text())["version"] == "1.0.0"
    assert not [p for p in os.listdir(dest) if p.startswith(".polymod-pull-")], "no temporary directory left"


def test_repull_of_the_same_module_replaces_only_what_polymod_wrote(tmp_path, store):
    dest = tmp_path / "pkg"
    hub.pull("alice/m@1.0.0", dest, hub=store)
    record = json.loads((dest / PULL_RECORD).read_text())
    assert record["module"] == "alice/m" and set(record["files"]) == {"module.json", "weights.safetensors"}
    (dest / "notes.txt").write_text("keep me")
    hub.pull("alice/m@1.1.0", dest, hub=store)  # an upgrade in place
    assert file_sha256(dest / "weights.safetensors") == store.get("alice", "m", "1.1.0").sha256
    assert (dest / "notes.txt").read_text() == "keep me"
    assert json.loads((dest / PULL_RECORD).read_text())["version"] == "1.1.0"
    with pytest.raises(hub.DestinationError, match="holds a pull of alice/m, not alice/other"):
        hub.pull("alice/other@1.0.0", dest, hub=store)


def test_an_edited_pulled_file_is_never_overwritten(tmp_path, store):
    dest = hub.pull("alice/m@1.0.0", tmp_path / "pkg", hub=store)
    (dest / "module.json").write_text('{"edited": true}')
    with pytest.raises(hub.DestinationError, match="module.json was changed since it was pulled"):
        hub.pull("alice/m@1.1.0", dest, hub=store)
    assert (dest / "module.json").read_text() == '{"edited": true}'


def test_pull_into_the_current_directory(tmp_path, store, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert hub.pull("alice/m@1.0.0", ".", hub=store) == empty
    assert sorted(os.listdir(empty)) == [PULL_RECORD, "module.json", "weights.safetensors"]
    busy = _user_dir(tmp_path / "busy")
    monkeypatch.chdir(busy)
    with pytest.raises(hub.DestinationError, match="not empty"):
        hub.pull("alice/m@1.0.0", ".", hub=store)
    assert sorted(os.listdir(busy)) == ["data", "train.py"]


def test_pull_onto_a_file_is_refused(tmp_path, store):
    (tmp_path / "f").write_text("x")
    with pytest.raises(hub.DestinationError, match="is not a directory"):
        hub.pull("alice/m@1.0.0", tmp_path / "f", hub=store)
    assert (tmp_path / "f").read_text() == "x"


def test_remote_pull_refuses_before_downloading(tmp_path, store):
    dest = _user_dir(tmp_path / "work")
    with hub_thread(store) as url:
        client = RemoteHub(url, cache=tmp_path / "cache")
        with pytest.raises(hub.DestinationError, match="not empty"):
            client.pull("alice/m@1.0.0", dest)
        assert not list((tmp_path / "cache" / "blobs").rglob("*/*")), "nothing downloaded"
        assert client.pull("alice/m@1.0.0", tmp_path / "fresh") == tmp_path / "fresh"
    assert sorted(os.listdir(dest)) == ["data", "train.py"]


def test_pushed_pull_round_trips(tmp_path, store):
    """The pull record is not part of the package: a pulled directory can be pushed again."""
    dest = hub.pull("alice/m@1.0.0", tmp_path / "pkg", hub=store)
    info = hub.push(dest, "alice/copy@1.0.0", hub=store)
    assert set(info.files) == {"module.json", "weights.safetensors"}


@pytest.mark.parametrize("victim", ["README.md", "weights.safetensors", "module.json"])
def test_push_refuses_symlinks_and_publishes_nothing(tmp_path, victim):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----\n")
    pkg = make_package(tmp_path / "pkg")
    if (pkg / victim).exists():
        os.replace(pkg / victim, tmp_path / "moved")
    os.symlink(secret, pkg / victim)
    local = hub.Store(tmp_path / "local")
    with pytest.raises(FormatError, match=f"{victim} is a symbolic link; polymod never follows links"):
        hub.push(pkg, "alice/m@1.0.0", hub=local)
    assert not list(local.blobs.rglob("*/*")), "nothing stored"
    server = hub.Store(tmp_path / "server")
    from polymod.hub.auth import create_token

    token = create_token(server, "alice")
    with hub_thread(server) as url:
        with pytest.raises(FormatError, match="symbolic link"):
            hub.push(pkg, "alice/m@1.0.0", hub=RemoteHub(url, token, cache=tmp_path / "c"))
    assert not list(server.blobs.rglob("*/*")), "nothing uploaded"
    for s in (local, server):
        assert not [b for b in s.blobs.rglob("*/*") if b.read_bytes().startswith(b"-----BEGIN")]


def test_push_refuses_non_regular_files(tmp_path):
    pkg = make_package(tmp_path / "pkg")
    os.mkfifo(pkg / "README.md")  # reading it would hang: it is refused without being opened
    with pytest.raises(FormatError, match="README.md is not a regular file"):
        hub.push(pkg, "alice/m@1.0.0", hub=tmp_path / "local")
    os.unlink(pkg / "README.md")
    (pkg / "README.md").mkdir()
    with pytest.raises(FormatError, match="README.md is not a regular file"):
        hub.push(pkg, "alice/m@1.0.0", hub=tmp_path / "local")


def test_open_regular_does_not_follow_a_link_swapped_in_after_the_check(tmp_path):
    from polymod.hub.package import open_regular

    (tmp_path / "secret").write_text("k")
    os.symlink(tmp_path / "secret", tmp_path / "link")
    with pytest.raises(FormatError, match="symbolic link"):
        open_regular(tmp_path / "link")
