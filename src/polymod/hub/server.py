"""The hub server: a thin FastAPI layer over a :class:`~polymod.hub.store.Store`.

Run it with ``polymod hub serve --store DIR`` (uvicorn). The OpenAPI schema
at ``/openapi.json`` (browsable at ``/docs``) is the API reference; the web
pages of :mod:`polymod.hub.web` are served from ``/``.

API (prefix ``/api/v1``; writes need ``Authorization: Bearer <token>``):

====== ============================================== ==========================================
GET    /health                                        liveness
GET    /whoami[?namespace=]                           the token's user (and its right to a namespace)
HEAD   /blobs/{sha256}                                is the blob here?
GET    /blobs/{sha256}                                the blob's bytes
PUT    /blobs/{sha256}                                upload a blob (verified, size-limited)
POST   /modules/{owner}/{name}/versions               publish a version from uploaded blobs
GET    /modules/{owner}/{name}/versions               a page of versions (``offset``, ``limit``; total in X-Total-Count)
GET    /modules/{owner}/{name}/versions/{version}     one version (``latest`` allowed)
GET    /modules/{owner}/{name}/versions/{v}/lineage   lineage graph
POST   /modules/{owner}/{name}/versions/{v}/yank      yank or un-yank (owner only)
GET    /search                                        full text + facets, a page (``limit``, ``offset``)
GET    /owners/{owner}                                an owner's modules
GET    /derived/{module_sha}[/{key}]                  router data derived from a module (:mod:`.derived_api`)
POST   /derived/{module_sha}                          register a derived artifact whose blob is uploaded
====== ============================================== ==========================================

``GET /blobs/{sha256}`` of a version's ``module.json`` counts one download of that version
(every pull fetches it once; ``HEAD`` does not count, nor does a body cut off before its end);
counts are written in batches (:class:`DownloadCounter`) and shown in ``downloads`` of a version,
search hits and the module page.

Errors are JSON ``{"error": <class name>, "detail": <message>}`` with the
class's HTTP status; the client raises the same class.
"""


import threading
import time
from collections import Counter
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from polymod.errors import BusyError, FormatError, HubError, PolymodError, TooLargeError
from polymod.hub import auth, db, latest, names
from polymod.hub.ancestry import lineage
from polymod.hub.derived_api import derived_routes
from polymod.hub.query import (
    FACETS,
    MAX_OFFSET,
    MAX_VERSIONS_PAGE,
    downloads_of,
    owner_modules,
    search,
    version_page,
)
from polymod.hub.store import BlobWriter, Store
from polymod.hub.web import add_routes

DEFAULT_MAX_UPLOAD = 2 << 30  # 2 GiB per file
DEFAULT_WRITE_TIMEOUT = 5.0  # seconds a publish waits for the index before 503 + Retry-After
UPLOAD_BATCH = 1 << 20  # bytes of an upload gathered before one write on a worker thread


class PublishRequest(BaseModel):
    """Publish a version from blobs already uploaded."""

    version: str = Field(description="semantic version, e.g. 1.0.0", max_length=64)
    files: dict[str, str] = Field(description="package file name -> sha256 of an uploaded blob", max_length=8)


class YankRequest(BaseModel):
    """Yank (or restore) a version."""

    reason: str = Field("", max_length=500)
    yanked: bool = True


class VersionOut(BaseModel):
    """A published version."""

    owner: str
    name: str
    version: str
    sha256: str = Field(description="content hash: sha256 of weights.safetensors (of module.json for compositions)")
    kind: str
    card: dict[str, Any]
    files: dict[str, dict[str, Any]] = Field(description="file name -> {sha256, size}")
    size: int
    created: float
    uploader: str | None
    yanked: bool
    yank_reason: str | None
    downloads: int = Field(0, description="pulls served by this hub (its module.json fetched in full)")


class SearchOut(BaseModel):
    """Search hits (latest version of each module), their total and facet counts."""

    hits: list[dict[str, Any]]
    total: int
    facets: dict[str, dict[str, int]] = Field(description="per facet, its most frequent values among all hits")
    offset: int = 0
    limit: int = 20
    next_offset: int | None = Field(None, description="the next page's offset; null on the last page")


class LineageOut(BaseModel):
    """A lineage graph: nodes (role self/ancestor/descendant) and parent→child edges."""

    root: str
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    children: dict[str, int] = Field(description="the centre's direct descendants: total, offset and page limit")


class DownloadCounter:
    """Download counts gathered in memory and added to the index in one short transaction per batch.

    A write per download would queue every download behind publishes for the index's write lock;
    instead :meth:`add` counts in memory and, at most every ``interval`` seconds, :meth:`flush` tries
    the lock briefly (``0.1`` s): when a publish holds it, the counts wait for the next flush.
    """

    def __init__(self, store: Store, interval: float = 1.0):
        self.store, self.interval = store, interval
        self.pending: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.last = time.monotonic()

    def add(self, sha256: str) -> None:
        """Count one complete download of blob ``sha256`` (only ``module.json`` blobs end up counted)."""
        with self.lock:
            self.pending[sha256] += 1
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self) -> bool:
        """Write the pending counts; returns False when the index stayed busy (they are kept for later)."""
        with self.lock:
            batch, self.pending = self.pending, Counter()
            self.last = time.monotonic()
        if not batch:
            return True
        conn = self.store.db.connect(busy_timeout=0.1)
        try:
            with db.transaction(conn):
                latest.add_downloads(conn, dict(batch))
            return True
        except BusyError:
            with self.lock:
                self.pending.update(batch)
            return False
        finally:
            conn.close()


def create_app(store: Store | str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD, web: bool = True,
               write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> FastAPI:
    """The hub application over ``store``; it holds the store's one-server lock (``app.state.lock``).

    Args:
        store: the store (or its directory).
        max_upload_bytes: the largest file accepted (HTTP 413 above it).
        web: also serve the web pages.
        write_timeout: seconds a write waits for the index's lock before answering 503 with ``Retry-After``.

    Raises:
        HubError: another server already serves this store.
    """
    store = store if isinstance(store, Store) else Store(store)
    store.busy_timeout = write_timeout
    app = FastAPI(title="polymod hub", version="1", description="Publish, find, version and pull polymod modules. "
                  "Writes need `Authorization: Bearer <token>`.")
    app.state.lock = store.lock_for_server()  # before the sweep: never delete another server's uploads
    store.sweep_tmp(0)  # uploads cut off by a previous crash are never resumed
    app.state.store = store
    app.state.downloads = downloads = DownloadCounter(store)

    @app.exception_handler(PolymodError)
    async def polymod_error(request: Request, exc: PolymodError) -> JSONResponse:
        status = exc.status if isinstance(exc, HubError) else 422 if isinstance(exc, (FormatError, ValueError)) else 400
        headers = {"Retry-After": "1"} if isinstance(exc, BusyError) else None
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers)

    def user(authorization: Annotated[str | None, Header()] = None) -> str:
        token = authorization.removeprefix("Bearer ").strip() if authorization else None
        return auth.authenticate(store, token)

    Owner = Annotated[str, Path(max_length=64)]
    Name = Annotated[str, Path(max_length=128)]
    Version = Annotated[str, Path(max_length=80)]
    Sha = Annotated[str, Path(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")]

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:  # on the event loop: never queued behind busy worker threads
        return {"status": "ok"}

    @app.get("/api/v1/whoami")
    def whoami(who: Annotated[str, Depends(user)], namespace: str | None = None) -> dict[str, str]:
        """The token's user; with ``namespace``, 403 unless the user may publish there."""
        if namespace is not None:
            names.check_owner(namespace)
            auth.authorize(store, who, namespace)
        return {"user": who}

    @app.head("/api/v1/blobs/{sha256}")
    def has_blob(sha256: Sha) -> Response:
        return Response(status_code=200 if store.has_blob(sha256) else 404)

    @app.get("/api/v1/blobs/{sha256}", response_class=StreamingResponse)
    def get_blob(sha256: Sha) -> StreamingResponse:
        size = store.blob_path(sha256).stat().st_size if store.has_blob(sha256) else None
        chunks = store.iter_blob(sha256)
        first = next(chunks, b"")  # raises NotFoundError before the response starts
        def body():
            yield first
            yield from chunks
            downloads.add(sha256)  # only a body sent to its end counts
        headers = {"Content-Length": str(size)} if size is not None else {}
        return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)

    @app.put("/api/v1/blobs/{sha256}", status_code=201)
    async def put_blob(sha256: Sha, request: Request, who: Annotated[str, Depends(user)]) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise TooLargeError(f"file of {int(declared):,} bytes exceeds this hub's limit of {max_upload_bytes:,}")
        writer = await run_in_threadpool(BlobWriter, store, sha256, max_upload_bytes)
        try:  # the limit is checked as bytes arrive (413 before the rest is read); disk writes run on worker threads
            batch, received = [], 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_upload_bytes:
                    raise TooLargeError(f"upload exceeds this hub's limit of {max_upload_bytes:,} bytes")
                batch.append(chunk)
                if sum(map(len, batch)) >= UPLOAD_BATCH:
                    await run_in_threadpool(writer.write, b"".join(batch))
                    batch = []
            if batch:
                await run_in_threadpool(writer.write, b"".join(batch))
            sha, size = await run_in_threadpool(writer.commit)
        finally:
            await run_in_threadpool(writer.__exit__, None, None, None)
        return {"sha256": sha, "size": size}

    @app.post("/api/v1/modules/{owner}/{name}/versions", status_code=201, response_model=VersionOut)
    def publish(owner: Owner, name: Name, body: PublishRequest, who: Annotated[str, Depends(user)]) -> Any:
        names.check_owner(owner), names.check_name(name), names.check_version(body.version)
        auth.authorize(store, who, owner)
        return store.publish(owner, name, body.version, body.files, uploader=who).to_dict()

    @app.get("/api/v1/modules/{owner}/{name}/versions", response_model=list[VersionOut])
    def list_versions(owner: Owner, name: Name, response: Response, offset: Annotated[int, Query(ge=0)] = 0,
                      limit: Annotated[int, Query(ge=1, le=MAX_VERSIONS_PAGE)] = MAX_VERSIONS_PAGE) -> Any:
        """A page of versions, newest first; the header ``X-Total-Count`` gives how many there are."""
        downloads.flush()
        page, total = version_page(store, owner, name, offset, limit)
        response.headers["X-Total-Count"] = str(total)
        return [v.to_dict() for v in page]

    @app.get("/api/v1/modules/{owner}/{name}/versions/{version}", response_model=VersionOut)
    def show(owner: Owner, name: Name, version: Version) -> Any:
        downloads.flush()
        info = store.get(owner, name, version)
        info.downloads = downloads_of(store, info)
        return info.to_dict()

    @app.get("/api/v1/modules/{owner}/{name}/versions/{version}/lineage", response_model=LineageOut)
    def graph(owner: Owner, name: Name, version: Version, depth: Annotated[int, Query(ge=1, le=32)] = 8,
              offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> Any:
        return lineage(store, owner, name, version, depth, offset)

    @app.post("/api/v1/modules/{owner}/{name}/versions/{version}/yank", response_model=VersionOut)
    def yank(owner: Owner, name: Name, version: Version, body: YankRequest,
             who: Annotated[str, Depends(user)]) -> Any:
        names.check_owner(owner)
        auth.authorize(store, who, owner)
        return store.yank(owner, name, version, body.reason, yanked=body.yanked).to_dict()

    @app.get("/api/v1/search", response_model=SearchOut)
    def find(q: Annotated[str, Query(max_length=256)] = "", limit: Annotated[int, Query(ge=1, le=100)] = 20,
             offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0, owner: str | None = None, kind: str | None = None,
             architecture: str | None = None, task: str | None = None, language: str | None = None,
             tag: str | None = None) -> Any:
        facets = dict(zip(FACETS, (kind, architecture, task, language, tag)))
        return search(store, q, limit=limit, offset=offset, owner=owner, **facets).to_dict()

    @app.get("/api/v1/owners/{owner}")
    def owner_page(owner: Owner) -> list[dict[str, Any]]:
        return owner_modules(store, owner)

    app.include_router(derived_routes(store, user))
    if web:
        add_routes(app, store, api_error=polymod_error, downloads=downloads)
    return app


def serve(store: Store | str, host: str = "127.0.0.1", port: int = 8000,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD) -> None:
    """Run the hub with uvicorn until interrupted (binds to ``host``, by default loopback only)."""

    uvicorn.run(create_app(store, max_upload_bytes), host=host, port=port, log_level="warning")
