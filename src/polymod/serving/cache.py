"""The module cache: three tiers keyed by content hash, feeding the running batch.

* **disk** — the hub's content-addressed store; a module is pulled on first use
  into ``cache_dir/<key>`` by the hub client's ``pull``, which verifies every
  file's sha256 and the weights' structure and only then renames the package
  into place (a package that fails is never loaded);
* **memory** — loaded modules (CPU tensors), least recently used dropped beyond
  ``max_cpu``;
* **resident** — attached to the host (:meth:`polymod.Modular.add`) and usable
  by the batch, least recently used detached beyond ``max_resident``. A pinned
  module and a module that a running request uses are never detached.

Requests that need a module that is still loading wait for that one load. The
key of a published version is the sha256 over its files' hashes, so two
references to the same bytes share one entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polymod import format
from polymod.errors import IncompatibleHostError, StateError
from polymod.hub.store import VersionInfo
from polymod.modules.contract import Module
from polymod.sites import is_input_site


class CacheFullError(StateError):
    """Every resident slot holds a pinned module or one in use; retry when a request finishes."""


def content_key(info: VersionInfo) -> str:
    """The cache key of a published version: sha256 over its files' (path, sha256) pairs."""
    h = hashlib.sha256()
    for path in sorted(info.files):
        h.update(f"{path}={info.files[path]['sha256']};".encode())
    return h.hexdigest()


class ModuleCache:
    """Resident / memory / disk tiers over one :class:`~polymod.Modular` host.

    Args:
        model: the host's ``Modular`` (resident modules are attached to it).
        hub: a hub client (:func:`polymod.hub.connect`).
        cache_dir: the disk tier's directory.
        lock: the scheduler's lock; held while the library changes.
        max_resident: modules attached at most.
        max_cpu: loaded modules kept in memory at most (resident ones included).
        allow_host_mismatch: serve modules made on other weights of the same geometry.
        count: called with (event, tier) for hits, misses and evictions.
    """

    def __init__(self, model: Any, hub: Any, cache_dir: str | Path, lock: threading.RLock, max_resident: int = 8,
                 max_cpu: int = 64, allow_host_mismatch: bool = False,
                 count: Callable[[str, str], None] | None = None):
        self.model, self.hub, self.lock = model, hub, lock
        self.dir = Path(cache_dir)
        self.max_resident, self.max_cpu = max_resident, max_cpu
        self.allow_host_mismatch = allow_host_mismatch
        self.count = count or (lambda event, tier: None)
        self.resident: OrderedDict[str, str] = OrderedDict()  # key -> library name
        self.memory: OrderedDict[str, Module] = OrderedDict()
        self.users: Counter[str] = Counter()
        self.pinned: set[str] = set()
        self.refs: dict[str, str] = {}  # key -> the reference it was first loaded as
        self._state = threading.Lock()
        self._loading: dict[str, asyncio.Future] = {}

    # -- resolving and acquiring -----------------------------------------------------------

    def resolve(self, ref: str) -> VersionInfo:
        """The published version ``ref`` names (blocking: call it in a worker thread)."""
        return self.hub.show(ref)

    async def acquire(self, info: VersionInfo) -> str:
        """Make the module resident and count one user; returns its library name.

        Raises:
            IntegrityError: the pulled files fail verification (nothing is attached).
            IncompatibleHostError: the module does not fit the served host.
            CacheFullError: every resident slot is pinned or in use.
        """
        key = content_key(info)
        return await self._acquire(key, self._load, info)

    async def _acquire(self, key: str, load: Callable[..., None], arg: Any) -> str:
        waited = False
        while True:
            with self._state:
                if key in self.resident:
                    self.users[key] += 1
                    self.resident.move_to_end(key)
                    if not waited:
                        self.count("hit", "resident")
                    return self.resident[key]
            pending = self._loading.get(key)
            if pending is None:
                loop = asyncio.get_running_loop()
                pending = self._loading[key] = loop.run_in_executor(None, load, key, arg)
                pending.add_done_callback(lambda _f, k=key: self._loading.pop(k, None))
            waited = True
            await asyncio.shield(pending)  # a cancelled waiter must not cancel the shared load

    async def acquire_merged(self, key: str, build: Callable[[], Module]) -> str:
        """Like :meth:`acquire` for a module built in memory (a weighted Mix materialised), keyed by ``key``."""
        return await self._acquire(key, self._attach_built, build)

    def release(self, names: list[str]) -> None:
        """One user fewer for each library name (a request finished)."""
        with self._state:
            by_name = {v: k for k, v in self.resident.items()}
            for name in names:
                key = by_name.get(name)
                if key is not None and self.users[key] > 0:
                    self.users[key] -= 1

    def loaded(self, info: VersionInfo) -> Module:
        """The module of ``info`` from memory or disk (pulled and verified on first use), without attaching it."""
        key = content_key(info)
        with self._state:
            module = self.memory.get(key)
            if module is not None:
                self.memory.move_to_end(key)
        if module is not None:
            self.count("hit", "memory")
            return module
        self.count("miss", "memory")
        path = self.dir / key
        if (path / format.CARD_FILE).is_file():
            self.count("hit", "disk")
        else:
            self.count("miss", "disk")
            self.hub.pull(info.ref, path)  # verified (sha256, safetensors) before it appears at `path`
        module = format.load(path)
        self._check(module, info.ref)
        with self._state:
            self.memory[key] = module
            self.refs.setdefault(key, info.ref)
            self._trim_memory()
        return module

    def _check(self, module: Module, ref: str) -> None:
        if any(is_input_site(s) for s in module.sites):
            raise IncompatibleHostError(f"{ref} is a {module.kind} module acting on the host's inputs; the batched "
                                        "engine serves modules acting at layers (LoRA, IA³, adapters, sparse, delta)")
        fit = format.check_fits(module.card, self.model.host, module.sites)
        problems = fit.errors + ([] if self.allow_host_mismatch else fit.warnings)
        if problems:
            raise IncompatibleHostError(f"{ref} was made for another host: " + "; ".join(problems[:4])
                                        + ". Serve it with the host it was made for"
                                        + ("" if fit.errors else " (or start the server with --allow-host-mismatch)"))

    def _load(self, key: str, info: VersionInfo) -> None:
        self.count("miss", "resident")
        self._attach(key, self.loaded(info))

    def _attach_built(self, key: str, build: Callable[[], Module]) -> None:
        self.count("miss", "resident")
        with self._state:
            module = self.memory.get(key)
        if module is None:
            module = build()
            with self._state:
                self.memory[key] = module
                self._trim_memory()
        self._attach(key, module)

    def _attach(self, key: str, module: Module) -> None:
        name = "m" + key[:20]
        with self._state:
            victims = self._victims(extra=1)
            for vkey, _ in victims:  # gone from the table first: no request can pick them up any more
                self.resident.pop(vkey)
        with self.lock:  # between two steps of the batch
            for _, vname in victims:
                self.model.remove(vname)
                self.count("eviction", "resident")
            if name not in self.model:
                self.model.add(name, module)
        with self._state:
            self.resident[key] = name

    def _victims(self, extra: int) -> list[tuple[str, str]]:
        """Resident modules to detach so that ``extra`` more fit (LRU first, never pinned or in use)."""
        over = len(self.resident) + extra - self.max_resident
        free = [(k, n) for k, n in self.resident.items() if k not in self.pinned and self.users[k] == 0]
        if over > len(free):
            raise CacheFullError(f"all {self.max_resident} resident module slots are pinned or in use; retry when a "
                                 "request finishes, or start the server with a larger --max-resident")
        return free[:max(over, 0)]

    def _trim_memory(self) -> None:
        while len(self.memory) > self.max_cpu:
            key = next((k for k in self.memory if k not in self.resident), None)
            if key is None:
                return
            del self.memory[key]
            self.count("eviction", "memory")

    # -- pin, unpin, unload ----------------------------------------------------------------

    def pin(self, info: VersionInfo, pinned: bool = True) -> None:
        """Keep (or stop keeping) a module resident whatever the LRU order (it must be resident to pin)."""
        key = content_key(info)
        with self._state:
            if pinned and key not in self.resident:
                raise StateError(f"{info.ref} is not resident; load it first (POST /v1/load_lora_adapter)")
            (self.pinned.add if pinned else self.pinned.discard)(key)

    def unload(self, info: VersionInfo) -> bool:
        """Detach a resident module now; returns whether it was resident.

        Raises:
            StateError: a running request uses it.
        """
        key = content_key(info)
        with self._state:
            if key not in self.resident:
                return False
            if self.users[key] > 0:
                raise StateError(f"{info.ref} is used by {self.users[key]} running request(s); unload it when "
                                 "they finish")
            name = self.resident.pop(key)
            self.pinned.discard(key)
        with self.lock:
            self.model.remove(name)
        return True

    def stats(self) -> dict[str, int]:
        """Modules per tier now."""
        with self._state:
            disk = sum(1 for p in self.dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if self.dir.is_dir() else 0
            return {"resident": len(self.resident), "memory": len(self.memory), "disk": disk,
                    "pinned": len(self.pinned), "in_use": sum(1 for v in self.users.values() if v)}


__all__ = ["CacheFullError", "ModuleCache", "content_key"]
