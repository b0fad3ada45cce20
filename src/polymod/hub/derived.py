"""Derived artifacts: router data computed from a module, stored beside it in the hub.

Library routers need data computed from each module — Arrow's prototypes,
retrieval centroids, PHATGOOSE gates. Computing it is deterministic given the
module's weights, so the store keeps it once, keyed by

    (module content hash, transform name, transform config)

where the content hash is the sha256 of the module's ``weights.safetensors``
(:func:`polymod.format.content_hash`) and the config is canonical JSON
(sorted keys). The tensors are a safetensors blob in the store's
content-addressed blob directory; a row of the ``derived`` table records the
key, the blob, and the lineage: the module reference it was derived from
(``owner/name@version`` when known). :meth:`DerivedStore.get_or_compute` is the
one entry point the library code uses: a stored artifact is read back (and its
sha256 verified); a missing one — never computed, or its blob gone — is
computed and stored. ``Store.gc`` keeps derived blobs.

This class works on a local store (a hub directory, or the hub server's own
store). For a hub URL, :class:`~polymod.hub.derived_remote.RemoteDerivedStore`
pulls artifacts from the server (:mod:`polymod.hub.derived_api`) and pushes the
ones it computes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from polymod.errors import ConfigError, IntegrityError
from polymod.hub import db
from polymod.hub.package import file_sha256
from polymod.hub.store import Store

Tensors = dict[str, torch.Tensor]


@dataclass
class DerivedInfo:
    """One stored artifact: what it was derived from, by which transform, and where its tensors are."""

    key: str
    module_sha: str
    transform: str
    config: dict[str, Any]
    sha256: str
    size: int
    parent: str | None
    created: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def canonical(config: dict[str, Any]) -> str:
    """The config as canonical JSON (sorted keys, no spaces), the form that is hashed.

    Raises:
        ConfigError: the config is not JSON-serialisable.
    """
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise ConfigError(f"a transform config must be JSON (numbers, strings, lists, dicts), got {config!r}: "
                          f"{exc}") from exc


def artifact_key(module_sha: str, transform: str, config: dict[str, Any]) -> str:
    """sha256 of (module content hash, transform, canonical config): the artifact's identity."""
    return hashlib.sha256(f"{module_sha}\0{transform}\0{canonical(config)}".encode()).hexdigest()


class DerivedStore:
    """Derived artifacts in a local :class:`~polymod.hub.store.Store` (see the module docstring).

    Args:
        store: the store, or its directory (default ``$POLYMOD_HOME/hub``).
    """

    def __init__(self, store: Store | str | None = None):
        self.store = store if isinstance(store, Store) else Store(store)

    def find(self, module_sha: str, transform: str, config: dict[str, Any]) -> DerivedInfo | None:
        """The stored artifact for this key (None when never computed)."""
        conn = self.store.connect()
        try:
            row = conn.execute("SELECT * FROM derived WHERE key = ?",
                               (artifact_key(module_sha, transform, config),)).fetchone()
        finally:
            conn.close()
        return _info(row) if row is not None else None

    def by_key(self, key: str) -> DerivedInfo | None:
        """The stored artifact with this key (:func:`artifact_key`), or None."""
        conn = self.store.connect()
        try:
            row = conn.execute("SELECT * FROM derived WHERE key = ?", (key,)).fetchone()
        finally:
            conn.close()
        return _info(row) if row is not None else None

    def of_module(self, module_sha: str) -> list[DerivedInfo]:
        """Every artifact derived from the module with this content hash (its lineage, downwards)."""
        conn = self.store.connect()
        try:
            rows = conn.execute("SELECT * FROM derived WHERE module_sha = ? ORDER BY created",
                                (module_sha,)).fetchall()
        finally:
            conn.close()
        return [_info(r) for r in rows]

    def load(self, info: DerivedInfo) -> Tensors | None:
        """The artifact's tensors, or None when its blob is missing.

        Raises:
            IntegrityError: the blob's bytes do not match the recorded sha256.
        """
        path = self.store.blob_path(info.sha256)
        if not path.is_file():
            return None
        if file_sha256(path) != info.sha256:
            raise IntegrityError(f"derived artifact {info.transform} of {info.module_sha[:12]}: blob {info.sha256} "
                                 f"is corrupt; delete {path} and it will be recomputed")
        return load_safetensors(path.read_bytes())

    def put(self, module_sha: str, transform: str, config: dict[str, Any], tensors: Tensors,
            parent: str | None = None) -> DerivedInfo:
        """Store an artifact (replacing a row whose blob went missing); returns its record."""
        data = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                                metadata={"transform": transform, "module_sha256": module_sha})
        sha, size = self.store.write_blob([data])
        return self.record(module_sha, transform, config, sha, size, parent)

    def record(self, module_sha: str, transform: str, config: dict[str, Any], sha256: str, size: int,
               parent: str | None = None) -> DerivedInfo:
        """Record an artifact whose tensors are already the store's blob ``sha256`` (replacing its key's row)."""
        info = DerivedInfo(artifact_key(module_sha, transform, config), module_sha, transform, config, sha256, size,
                           parent, time.time())
        conn = self.store.connect()
        try:
            with db.transaction(conn):
                conn.execute("INSERT INTO derived VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                             "module_sha = excluded.module_sha, transform = excluded.transform, "
                             "config = excluded.config, sha256 = excluded.sha256, size = excluded.size, "
                             "parent = excluded.parent, created = excluded.created",
                             (info.key, module_sha, transform, canonical(config), sha256, size, parent,
                              info.created))
        finally:
            conn.close()
        return info

    def get_or_compute(self, module_sha: str, transform: str, config: dict[str, Any],
                       compute: Callable[[], Tensors], parent: str | None = None) -> tuple[Tensors, DerivedInfo, bool]:
        """The stored tensors, or ``compute()``'s result stored first.

        Returns:
            (tensors, record, computed): ``computed`` is True when ``compute`` ran.
        """
        info = self.find(module_sha, transform, config)
        if info is not None:
            tensors = self.load(info)
            if tensors is not None:
                return tensors, info, False
        tensors = compute()
        return tensors, self.put(module_sha, transform, config, tensors, parent), True


def _info(row: Any) -> DerivedInfo:
    return DerivedInfo(row["key"], row["module_sha"], row["transform"], json.loads(row["config"]), row["sha256"],
                       row["size"], row["parent"], row["created"])
