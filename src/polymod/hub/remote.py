"""A client for a remote hub (the HTTP API of :mod:`polymod.hub.server`), with :class:`LocalHub`'s methods.

Push uploads each file as a content-addressed blob (skipped when the hub has
it already), then publishes the version in one request; the hub makes it
visible atomically. Pull downloads blobs into a local cache store — each
verified against its sha256 before it is kept — records the version in the
cache's index (so it can be found offline), and writes the package
atomically. Errors from the hub are raised as the same exception classes as
local ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from polymod.errors import HUB_ERRORS, ConflictError, HubError
from polymod.hub import names
from polymod.hub.package import CARD_FILE, file_sha256, open_regular, package_files
from polymod.hub.query import SearchResult
from polymod.hub.store import CHUNK, Store, VersionInfo, home
from polymod.hub.transfer import materialize, package_dir, prepare_push, progress_bar
from polymod.hub.unpack import check_destination

API = "/api/v1"


def credentials_file() -> Path:
    """Where ``polymod hub login`` keeps tokens: ``$POLYMOD_HOME/credentials.json`` (mode 0600)."""
    return home() / "credentials.json"


def hub_key(url: str) -> str:
    """A hub's identity: its base URL normalised (scheme and host lowercase, explicit port, no trailing slash).

    Tokens and cached versions are bound to this key: ``http://HUB:80/`` and ``http://hub`` are one hub,
    ``http://hub:8001`` and ``https://hub`` are others.

    Raises:
        HubError: ``url`` is not an ``http(s)://host`` URL.
    """
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port == -1:
        raise HubError(f"hub URL {url!r:.200} is not of the form http(s)://host[:port][/path]")
    scheme = parts.scheme.lower()
    port = port or (443 if scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def saved_token(url: str) -> str | None:
    """The token saved by ``login`` for the hub at ``url`` (matched by :func:`hub_key`), if any."""
    try:
        data = json.loads(credentials_file().read_text())
        key = hub_key(url)
        return next((t for u, t in data.items() if isinstance(t, str) and _same_hub(u, key)), None)
    except (OSError, ValueError, AttributeError, HubError):
        return None


def _same_hub(url: str, key: str) -> bool:
    try:
        return hub_key(url) == key
    except HubError:
        return False


def env_token(url: str) -> str | None:
    """``$POLYMOD_TOKEN``, but only for the hub named by ``$POLYMOD_HUB`` (a token is never sent elsewhere)."""
    token, home_hub = os.environ.get("POLYMOD_TOKEN"), os.environ.get("POLYMOD_HUB", "")
    if not token or not home_hub.startswith(("http://", "https://")):
        return None
    return token if _same_hub(home_hub, hub_key(url)) else None


def cache_dir(url: str) -> Path:
    """The local store that caches pulls from the hub at ``url``: ``$POLYMOD_HOME/hubs/<scheme>_<host>_<port>[_path]``.

    One cache per hub, so a version pulled from one hub never stands in for the same name on another.
    """
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", hub_key(url).replace("://", "_").replace(":", "_")).strip("_")
    return home() / "hubs" / slug[:200]


def save_token(url: str, token: str) -> Path:
    """Save ``token`` for ``url`` in the credentials file (readable by the user only)."""
    path = credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[url.rstrip("/")] = token
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


class RemoteHub:
    """The hub API over HTTP.

    Args:
        url: the hub's base URL, e.g. ``http://127.0.0.1:8000``.
        token: a token for writes. Default: ``$POLYMOD_TOKEN`` when ``$POLYMOD_HUB`` names this hub, else
            the one ``login`` saved for this hub; a token is never sent to another hub.
        cache: the local store pulls are cached in (default one per hub, :func:`cache_dir`).
        timeout: seconds per request.
    """

    def __init__(self, url: str, token: str | None = None, cache: Store | str | os.PathLike | None = None,
                 timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.key = hub_key(self.url)
        self.token = token or env_token(self.url) or saved_token(self.url)
        self._cache = cache if cache is not None else cache_dir(self.url)
        self.http = httpx.Client(base_url=self.url, timeout=timeout, follow_redirects=False)

    def __repr__(self) -> str:
        return f"RemoteHub({self.url!r})"

    @property
    def cache(self) -> Store:
        """The local store pulls are cached in."""
        if not isinstance(self._cache, Store):
            self._cache = Store(self._cache, db="sqlite")  # a client's cache: never $POLYMOD_HUB_DB's server db
        return self._cache

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            headers = {**self._headers(), **kw.pop("headers", {})}
            response = self.http.request(method, API + path, headers=headers, **kw)
        except httpx.HTTPError as exc:
            raise HubError(f"cannot reach the hub at {self.url}: {exc}") from None
        self._raise_for(response)
        return response

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json()
            cls, detail = HUB_ERRORS.get(body.get("error"), HubError), body.get("detail", response.text)
        except ValueError:
            cls, detail = HubError, response.text[:300]
        raise cls(f"{detail} (hub answered HTTP {response.status_code})")

    def whoami(self) -> str:
        """The user the token belongs to."""
        return self._request("GET", "/whoami").json()["user"]

    def push(self, path: str | os.PathLike, ref: str, version: str | None = None,
             progress: bool = False) -> VersionInfo:
        """Upload the package at ``path`` and publish it as ``ref``; see :func:`polymod.hub.push`."""

        target, card = prepare_push(path, ref, version)
        self._request("GET", "/whoami", params={"namespace": target.owner})  # refuse before uploading anything
        blobs: dict[str, tuple[str, int, Any]] = {CARD_FILE: (hashlib.sha256(card).hexdigest(), len(card), card)}
        for name, extra in package_files(path).items():
            if name != CARD_FILE:
                with open_regular(extra) as f:
                    size = os.fstat(f.fileno()).st_size
                blobs[name] = (file_sha256(extra), size, extra)
        missing = [(n, s, z, src) for n, (s, z, src) in blobs.items()
                   if self.http.head(f"{API}/blobs/{s}", headers=self._headers()).status_code != 200]
        with progress_bar(progress, sum(z for _, _, z, _ in missing), f"push {target}") as advance:
            for _, sha, size, src in missing:
                self._request("PUT", f"/blobs/{sha}", content=_chunks(src, advance),
                              headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        body = {"version": target.version, "files": {n: s for n, (s, _, _) in blobs.items()}}
        data = self._request("POST", f"/modules/{target.owner}/{target.name}/versions", json=body).json()
        return VersionInfo.from_dict(data)

    def show(self, ref: str) -> VersionInfo:
        """The version ``ref`` points to."""
        r = names.Ref.parse(ref)
        return VersionInfo.from_dict(self._request("GET", f"/modules/{r.owner}/{r.name}/versions/{r.version}").json())

    def versions(self, ref: str) -> list[VersionInfo]:
        """Every version of ``owner/name``, newest first."""
        r = names.Ref.parse(ref)
        out: list[VersionInfo] = []
        while True:  # the hub answers in pages; X-Total-Count says how many there are
            response = self._request("GET", f"/modules/{r.owner}/{r.name}/versions", params={"offset": len(out)})
            page = [VersionInfo.from_dict(v) for v in response.json()]
            out += page
            if not page or len(out) >= int(response.headers.get("X-Total-Count", len(out))):
                return out

    def _download(self, sha: str) -> Iterator[bytes]:
        with self.http.stream("GET", f"{API}/blobs/{sha}", headers=self._headers()) as response:
            if response.status_code >= 400:
                response.read()
                self._raise_for(response)
            yield from response.iter_bytes(CHUNK)

    def pull(self, ref: str, dest: str | os.PathLike | None = None, progress: bool = False,
             force: bool = False) -> Path:
        """Download ``ref`` into the cache (sha256-verified) and write the package to ``dest``; see :func:`pull`."""
        info = self.show(ref)
        cache = self.cache
        if dest is None:
            dest, force = package_dir(cache, info), True
        check_destination(Path(os.path.abspath(dest)), f"{info.owner}/{info.name}", force)  # before downloading
        with progress_bar(progress, info.size, f"download {info.ref}") as advance:
            for meta in info.files.values():
                sha = meta["sha256"]
                if cache.has_blob(sha) and not cache.verify_blob(sha, meta["size"]):
                    cache.blob_path(sha).unlink(missing_ok=True)  # corrupted in the cache: evicted, fetched again
                if not cache.has_blob(sha):  # never more than the manifest's size (a hostile hub is cut off)
                    cache.write_blob(self._download(sha), expected=sha, max_bytes=meta["size"], on_chunk=advance)
                else:
                    advance(meta["size"])
        out = materialize(info, cache.iter_blob, dest, force=force)
        try:
            cache.publish(info.owner, info.name, info.version, {p: m["sha256"] for p, m in info.files.items()},
                          uploader=f"pulled from {self.url}")
        except ConflictError as exc:
            warnings.warn(f"pulled {info.ref}, but the local index keeps its own different copy: {exc}", stacklevel=2)
        return out

    def search(self, query: str = "", limit: int = 20, offset: int = 0, owner: str | None = None,
               **facets: str | None) -> SearchResult:
        """Full-text search with facets on the hub."""
        params = {"q": query, "limit": limit, "offset": offset, "owner": owner, **facets}
        params = {k: v for k, v in params.items() if v not in (None, "")}
        return SearchResult.from_dict(self._request("GET", "/search", params=params).json())

    def lineage(self, ref: str, depth: int = 8, offset: int = 0) -> dict[str, Any]:
        """The lineage graph of ``ref``."""
        r = names.Ref.parse(ref)
        return self._request("GET", f"/modules/{r.owner}/{r.name}/versions/{r.version}/lineage",
                             params={"depth": depth, "offset": offset}).json()

    def yank(self, ref: str, reason: str = "", undo: bool = False) -> VersionInfo:
        """Yank ``ref`` (or restore it with ``undo``); needs the owner's token."""
        r = names.Ref.parse(ref)
        body = {"reason": reason, "yanked": not undo}
        data = self._request("POST", f"/modules/{r.owner}/{r.name}/versions/{r.version}/yank", json=body).json()
        return VersionInfo.from_dict(data)


def _chunks(src: bytes | Path, advance) -> Iterator[bytes]:
    if isinstance(src, bytes):
        advance(len(src))
        yield src
        return
    with open_regular(src) as f:
        while chunk := f.read(CHUNK):
            advance(len(chunk))
            yield chunk
