"""Lineage is what publishers declare and the hub verifies; descendants are bounded and paginated."""

from __future__ import annotations

import httpx
import pytest

from polymod import hub
from polymod.card import Lineage, Parent
from polymod.errors import FormatError
from polymod.hub.ancestry import MAX_CHILDREN
from polymod.hub.package import WEIGHTS_FILE
from tests.hub_helpers import hub_thread, make_package

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture
def store(tmp_path):
    return hub.Store(tmp_path / "store")


def test_a_copy_published_first_does_not_capture_later_lineage(tmp_path, store):
    original = make_package(tmp_path / "orig", seed=1)
    thief = hub.push(original, "mallory/copy@1.0.0", hub=store)  # the same weights, published first
    real = hub.push(original, "alice/senti@1.0.0", hub=store)
    assert thief.sha256 == real.sha256
    child = make_package(tmp_path / "child", seed=2,
                         lineage=Lineage([Parent("alice/senti", "1.0.0", real.sha256)], {"method": "finetune"}))
    hub.push(child, "bob/child@1.0.0", hub=store)
    graph = hub.lineage("bob/child@1.0.0", hub=store)
    assert {n["id"] for n in graph["nodes"] if n["role"] == "ancestor"} == {"alice/senti@1.0.0"}
    assert "bob/child@1.0.0" not in {n["id"] for n in hub.lineage("mallory/copy@1.0.0", hub=store)["nodes"]}
    # a parent known only by its hash is not guessed when several modules hold that content
    orphan = make_package(tmp_path / "orphan", seed=3,
                          lineage=Lineage([Parent("gone/renamed", "1.0.0", real.sha256)], {}))
    hub.push(orphan, "bob/orphan@1.0.0", hub=store)
    nodes = {n["id"]: n for n in hub.lineage("bob/orphan@1.0.0", hub=store)["nodes"]}
    assert nodes["gone/renamed@1.0.0"]["in_hub"] is False


def test_a_declared_parent_must_have_the_declared_hash(tmp_path, store):
    real = hub.push(make_package(tmp_path / "a", seed=1), "alice/a@1.0.0", hub=store)
    wrong = make_package(tmp_path / "w", seed=2, lineage=Lineage([Parent("alice/a", "1.0.0", "f" * 64)], {}))
    with pytest.raises(FormatError, match=f"lineage parent alice/a@1.0.0 has content hash {real.sha256}"):
        hub.push(wrong, "bob/w@1.0.0", hub=store)
    with pytest.raises(hub.NotFoundError):
        store.get("bob", "w", "1.0.0")


def test_descendants_are_bounded_and_paginated(tmp_path, store):
    parent = hub.push(make_package(tmp_path / "p", seed=1), "alice/base@1.0.0", hub=store)
    pkg = make_package(tmp_path / "c", seed=2, lineage=Lineage([Parent("alice/base", "1.0.0", parent.sha256)], {}))
    weights = (pkg / WEIGHTS_FILE).read_bytes()
    count = 3 * MAX_CHILDREN + 2
    for i in range(count):  # many "descendants" attached to someone else's module
        hub.push(pkg, f"spam/c{i}@1.0.0", hub=store)
    assert (pkg / WEIGHTS_FILE).read_bytes() == weights
    pages, offset = [], 0
    while True:
        graph = hub.lineage("alice/base@1.0.0", hub=store, offset=offset)
        assert graph["children"]["total"] == count
        kids = [n["id"] for n in graph["nodes"] if n["role"] == "descendant"]
        assert len(kids) <= MAX_CHILDREN
        pages.append(kids)
        offset += MAX_CHILDREN
        if offset >= count:
            break
    assert len({k for page in pages for k in page}) == count, "every descendant reachable, each once"
    with hub_thread(store) as url:
        html = httpx.get(f"{url}/m/alice/base").text
        width = int(html.split('class="lineage" width="', 1)[1].split('"', 1)[0])
        assert width < 3000 and f"of {count}" in html and "?descendants=12" in html
        api = httpx.get(f"{url}/api/v1/modules/alice/base/versions/1.0.0/lineage", params={"offset": 12}).json()
        assert api["children"] == {"total": count, "offset": 12, "limit": MAX_CHILDREN}


def test_names_differing_only_by_case_are_refused(tmp_path, store):
    hub.push(make_package(tmp_path / "a", seed=1), "alice/senti@1.0.0", hub=store)
    with pytest.raises(hub.ConflictError, match="alice/senti exists; alice/Senti differs from it only by case"):
        hub.push(make_package(tmp_path / "b", seed=2), "alice/Senti@1.0.0", hub=store)
    hub.push(make_package(tmp_path / "c", seed=3), "alice/senti@1.1.0", hub=store)  # the same name is fine
    hub.push(make_package(tmp_path / "d", seed=4), "bob/Senti@1.0.0", hub=store)  # another owner's namespace
