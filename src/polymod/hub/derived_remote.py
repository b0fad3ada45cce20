"""Derived artifacts of a remote hub: pulled with the modules, computed and pushed on first use.

:class:`RemoteDerivedStore` is the :class:`~polymod.hub.derived.DerivedStore`
that :func:`polymod.hub.library` uses for a hub URL. Its local side is the
hub's pull cache (:attr:`RemoteHub.cache <polymod.hub.remote.RemoteHub.cache>`),
so an artifact is downloaded at most once. Looking one up:

1. the local cache, when it holds the record and its blob;
2. else the hub (``GET /api/v1/derived/{module_sha}/{key}``): the blob is
   downloaded, verified against its sha256 and the record's size, checked to be
   safetensors written for that transform and module, and recorded locally;
3. else it is computed here, cached locally, and — when the client has a token
   for that hub — uploaded (``PUT /blobs``) and registered beside the module
   (``POST /api/v1/derived/{module_sha}``), so the next user pulls it. Without a
   token, or when the hub refuses it, the artifact stays in the local cache and
   :attr:`RemoteDerivedStore.not_pushed` says why.
"""

from __future__ import annotations

import warnings
from typing import Any

from safetensors import safe_open

from polymod.errors import AuthError, ConflictError, IntegrityError, NotFoundError
from polymod.hub.derived import DerivedInfo, DerivedStore, Tensors, artifact_key


class RemoteDerivedStore(DerivedStore):
    """Derived artifacts of the hub behind ``client`` (a :class:`~polymod.hub.remote.RemoteHub`).

    Attributes:
        pushed: keys of the artifacts this store registered on the hub.
        not_pushed: ``{key: reason}`` for artifacts computed here but kept only in the local cache.
    """

    def __init__(self, client: Any):
        super().__init__(client.cache)
        self.client = client
        self.pushed: list[str] = []
        self.not_pushed: dict[str, str] = {}

    def _remote(self, module_sha: str, key: str) -> DerivedInfo | None:
        try:
            data = self.client._request("GET", f"/derived/{module_sha}/{key}").json()
        except NotFoundError:
            return None
        return DerivedInfo(**data)

    def find(self, module_sha: str, transform: str, config: dict[str, Any]) -> DerivedInfo | None:
        """The record in the local cache when its blob is there, else the hub's record (None when neither has it)."""
        local = super().find(module_sha, transform, config)
        if local is not None and self.store.has_blob(local.sha256):
            return local
        return self._remote(module_sha, artifact_key(module_sha, transform, config)) or local

    def of_module(self, module_sha: str) -> list[DerivedInfo]:
        """The hub's artifacts of the module with this content hash, plus those only cached here, oldest first."""
        remote = [DerivedInfo(**d) for d in self.client._request("GET", f"/derived/{module_sha}").json()]
        keys = {i.key for i in remote}
        return sorted(remote + [i for i in super().of_module(module_sha) if i.key not in keys],
                      key=lambda i: i.created)

    def load(self, info: DerivedInfo) -> Tensors | None:
        """The artifact's tensors, downloaded (and verified) when only the hub has them; None when nobody does.

        Raises:
            IntegrityError: the bytes do not match the record, or are not safetensors written for this
                transform and module.
        """
        if not self.store.has_blob(info.sha256):
            try:
                self.store.write_blob(self.client._download(info.sha256), expected=info.sha256, max_bytes=info.size)
            except NotFoundError:
                return None
            self._check_metadata(info)
            super().record(info.module_sha, info.transform, info.config, info.sha256, info.size, info.parent)
        return super().load(info)

    def _check_metadata(self, info: DerivedInfo) -> None:
        path = self.store.blob_path(info.sha256)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as exc:  # safetensors' own error types for a bad header
            path.unlink(missing_ok=True)
            raise IntegrityError(f"derived artifact {info.key} from {self.client.url} is not safetensors: "
                                 f"{exc}") from None
        if meta.get("transform") != info.transform or meta.get("module_sha256") != info.module_sha:
            path.unlink(missing_ok=True)
            raise IntegrityError(f"derived artifact {info.key} from {self.client.url} was written for transform "
                                 f"{meta.get('transform')!r} of module {meta.get('module_sha256')!r}, not "
                                 f"{info.transform!r} of {info.module_sha}")

    def put(self, module_sha: str, transform: str, config: dict[str, Any], tensors: Tensors,
            parent: str | None = None) -> DerivedInfo:
        """Cache the artifact locally and, with a token, register it on the hub; returns the local record."""
        info = super().put(module_sha, transform, config, tensors, parent)
        reason = self._push(info)
        if reason is not None:
            self.not_pushed[info.key] = reason
        return info

    def _push(self, info: DerivedInfo) -> str | None:
        if not self.client.token:
            return f"no token for {self.client.url}: kept in the local cache only"
        if info.parent is None:
            return "no module version to record as its parent: kept in the local cache only"
        try:
            head = self.client.http.head(f"/api/v1/blobs/{info.sha256}", headers=self.client._headers())
            if head.status_code != 200:
                data = self.store.blob_path(info.sha256).read_bytes()
                self.client._request("PUT", f"/blobs/{info.sha256}", content=data,
                                     headers={"Content-Type": "application/octet-stream"})
            body = {"transform": info.transform, "config": info.config, "sha256": info.sha256, "parent": info.parent}
            self.client._request("POST", f"/derived/{info.module_sha}", json=body)
        except ConflictError as exc:  # another client registered the key first: theirs stands on the hub
            return f"the hub already holds another blob for this key: {exc}"
        except AuthError as exc:
            warnings.warn(f"derived artifact {info.transform} of {info.parent} was computed but not published: {exc}",
                          stacklevel=3)
            return str(exc)
        self.pushed.append(info.key)
        return None
