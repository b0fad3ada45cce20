"""The hub server's derived-artifact endpoints: router data stored beside the module it was computed from.

Mounted by :func:`polymod.hub.server.create_app` (prefix ``/api/v1``)::

    GET  /derived/{module_sha}          every artifact derived from the module with this content hash
    GET  /derived/{module_sha}/{key}    one artifact's record (404 when never registered)
    POST /derived/{module_sha}          register an artifact whose blob was uploaded (token needed)

An artifact's tensors travel as an ordinary content-addressed blob
(``PUT /blobs/{sha256}``, then ``GET /blobs/{sha256}``); the record keys it by
(module content hash, transform, canonical config) as in
:mod:`polymod.hub.derived`. Registering checks that the lineage is real — the
``parent`` reference is a published version whose content hash *is*
``module_sha`` — and that the blob is a safetensors file whose metadata names
the same transform and module. The first record of a key stands: registering
another blob under it is a conflict (409); registering the same one again is
a no-op, and a record whose blob was lost is replaced.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field
from safetensors import safe_open

from polymod.errors import ConflictError, IntegrityError, NotFoundError
from polymod.hub import names
from polymod.hub.derived import DerivedInfo, DerivedStore, canonical
from polymod.hub.store import Store

MAX_CONFIG = 4096  # bytes of canonical JSON a transform config may take
Sha = Annotated[str, Path(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")]  # (no __future__ annotations:
# FastAPI resolves these at route definition)


class DerivedIn(BaseModel):
    """An artifact to register: its transform, config, uploaded blob and the module version it came from."""

    transform: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    config: dict[str, Any]
    sha256: str = Field(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")
    parent: str = Field(max_length=280, description="owner/name@version of the module it was derived from")


class DerivedOut(BaseModel):
    """A stored artifact's record."""

    key: str
    module_sha: str
    transform: str
    config: dict[str, Any]
    sha256: str
    size: int
    parent: str | None
    created: float


def blob_metadata(store: Store, sha256: str) -> dict[str, str]:
    """The safetensors metadata of a stored blob.

    Raises:
        NotFoundError: the blob was not uploaded.
        IntegrityError: it is not a safetensors file.
    """
    path = store.blob_path(sha256)
    if not path.is_file():
        raise NotFoundError(f"blob {sha256} is not on this hub; upload the artifact's tensors with "
                            f"PUT /api/v1/blobs/{sha256} first")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise IntegrityError(f"blob {sha256} is not a safetensors file ({exc}); a derived artifact's tensors "
                             "are uploaded as safetensors") from None


def register(store: Store, module_sha: str, body: DerivedIn) -> DerivedInfo:
    """Validate and record an artifact (see the module docstring); returns the record that stands."""
    derived = DerivedStore(store)
    ref = names.Ref.parse(body.parent)
    version = store.get(ref.owner, ref.name, ref.version)
    if version.sha256 != module_sha:
        raise ConflictError(f"{version.ref} has content hash {version.sha256}, not {module_sha}: an artifact's "
                            "parent must be the module version it was computed from")
    size = len(canonical(body.config))
    if size > MAX_CONFIG:
        raise IntegrityError(f"a transform config takes at most {MAX_CONFIG} bytes of JSON, got {size}")
    meta = blob_metadata(store, body.sha256)
    if meta.get("transform") != body.transform or meta.get("module_sha256") != module_sha:
        raise IntegrityError(f"blob {body.sha256} was written for transform {meta.get('transform')!r} of module "
                             f"{meta.get('module_sha256')!r}, not {body.transform!r} of {module_sha}")
    existing = derived.find(module_sha, body.transform, body.config)
    if existing is not None and store.has_blob(existing.sha256):
        if existing.sha256 != body.sha256:
            raise ConflictError(f"artifact {existing.key} ({body.transform} of {module_sha[:12]}) is already stored "
                                f"with blob {existing.sha256}; pull that one instead")
        return existing
    size = store.blob_path(body.sha256).stat().st_size
    return derived.record(module_sha, body.transform, body.config, body.sha256, size, version.ref)


def derived_routes(store: Store, user: Any) -> APIRouter:
    """The derived-artifact endpoints over ``store``; ``user`` is the app's token dependency."""
    router = APIRouter(prefix="/api/v1/derived", tags=["derived artifacts"])
    derived = DerivedStore(store)

    @router.get("/{module_sha}", response_model=list[DerivedOut])
    def of_module(module_sha: Sha) -> Any:
        """Every artifact derived from the module with this content hash, oldest first."""
        return [i.to_dict() for i in derived.of_module(module_sha)]

    @router.get("/{module_sha}/{key}", response_model=DerivedOut)
    def one(module_sha: Sha, key: Sha) -> Any:
        """The artifact with this key (sha256 of module hash, transform and canonical config)."""
        info = derived.by_key(key)
        if info is None or info.module_sha != module_sha:
            raise NotFoundError(f"no derived artifact {key} of module {module_sha} on this hub")
        return info.to_dict()

    @router.post("/{module_sha}", status_code=201, response_model=DerivedOut)
    def put(module_sha: Sha, body: DerivedIn, who: Annotated[str, Depends(user)]) -> Any:
        """Register an artifact whose blob is uploaded; any user with a token may contribute one."""
        del who  # authenticated; the record is checked against the module and the blob, not the uploader
        return register(store, module_sha, body).to_dict()

    return router
