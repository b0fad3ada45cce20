"""The module cache's tiers: single-flight loads, LRU eviction that spares pinned and in-use modules, hits per tier."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

import polymod as pm
from polymod.serving.cache import CacheFullError, ModuleCache, content_key
from tests.serve_helpers import publish, tiny_llama


class CountingHub:
    """A local hub that counts pulls and can be slowed down."""

    def __init__(self, path, delay: float = 0.0):
        self.inner, self.delay, self.pulls = pm.hub.connect(str(path)), delay, Counter()
        self.lock = threading.Lock()

    def show(self, ref):
        return self.inner.show(ref)

    def pull(self, ref, dest=None, progress=False):
        time.sleep(self.delay)
        with self.lock:
            self.pulls[ref] += 1
        return self.inner.pull(ref, dest)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    host = tiny_llama()
    return root, [publish(host, root / "hub", f"m{i}", "lora", seed=i) for i in range(4)]


def _cache(root, tmp_path, delay=0.0, **kw):
    events: Counter = Counter()
    cache = ModuleCache(pm.Modular(tiny_llama()), CountingHub(root / "hub", delay), tmp_path / "disk",
                        threading.RLock(), count=lambda e, t: events.update([(e, t)]), **kw)
    return cache, events


def test_concurrent_requests_for_a_loading_module_wait_for_one_load(refs, tmp_path):
    root, names = refs
    cache, events = _cache(root, tmp_path, delay=0.3)
    info = cache.resolve(names[0])

    async def many():
        return await asyncio.gather(*(cache.acquire(info) for _ in range(6)))

    got = asyncio.run(many())
    assert len(set(got)) == 1 and cache.hub.pulls[info.ref] == 1
    assert events[("miss", "resident")] == 1 and cache.users[content_key(info)] == 6
    assert cache.model.names() == got[:1]


def test_lru_eviction_spares_pinned_and_in_use_modules(refs, tmp_path):
    root, names = refs
    cache, events = _cache(root, tmp_path, max_resident=2)
    infos = [cache.resolve(n) for n in names]
    acquire = lambda i: asyncio.run(cache.acquire(infos[i]))  # noqa: E731
    a, b = acquire(0), acquire(1)
    with pytest.raises(CacheFullError, match="all 2 resident module slots are pinned or in use"):
        acquire(2)  # both in use
    assert sorted(cache.model.names()) == sorted([a, b])
    cache.release([a])
    c = acquire(2)  # evicts a, the only one not in use
    assert sorted(cache.model.names()) == sorted([b, c]) and events[("eviction", "resident")] == 1
    cache.release([b, c])
    cache.pin(infos[2])
    acquire(0)  # b is least recently used and not pinned: b goes, c (pinned) stays
    assert c in cache.model.names() and b not in cache.model.names()
    cache.release([cache.resident[content_key(infos[0])]])
    assert cache.unload(infos[0]) and cache.model.names() == [c]


def test_memory_and_disk_tiers_are_hit_before_the_hub(refs, tmp_path):
    root, names = refs
    cache, events = _cache(root, tmp_path, max_resident=1, max_cpu=2)
    infos = [cache.resolve(n) for n in names[:3]]
    for info in infos:
        cache.release([asyncio.run(cache.acquire(info))])
    assert events[("miss", "disk")] == 3 and len(cache.memory) == 2  # LRU kept the last two in memory
    cache.release([asyncio.run(cache.acquire(infos[1]))])
    assert events[("hit", "memory")] == 1
    cache.release([asyncio.run(cache.acquire(infos[0]))])  # dropped from memory, still on disk
    assert events[("hit", "disk")] == 1 and cache.hub.pulls[infos[0].ref] == 1
    fresh, fresh_events = _cache(root, tmp_path, max_resident=1)  # a restart finds the verified packages
    fresh.release([asyncio.run(fresh.acquire(fresh.resolve(names[2])))])
    assert fresh_events[("hit", "disk")] == 1 and fresh.hub.pulls[names[2]] == 0
    assert cache.stats()["disk"] == 3


def test_latest_and_the_exact_version_share_one_entry(refs, tmp_path):
    root, names = refs
    cache, _ = _cache(root, tmp_path)
    first = asyncio.run(cache.acquire(cache.resolve(names[0])))
    again = asyncio.run(cache.acquire(cache.resolve(names[0].split("@")[0])))  # latest is 1.0.0
    assert again == first and len(cache.model.names()) == 1 and cache.hub.pulls[names[0]] == 1
