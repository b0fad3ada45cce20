"""The vLLM engine's model names resolved through polymod's hub (the plugin's logic, no vLLM import).

A request to vLLM names its ``model``; when that is neither the served model nor
an adapter vLLM already holds, vLLM asks its LoRA resolvers (vLLM's
``LoRAResolver`` plugin API, with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``).
:class:`HubLoraSource` answers for polymod's hub:

1. the name is an alias or a hub reference ``owner/name[@version]`` (anything else is
   not ours: vLLM answers 404);
2. the published version is looked up, its kind checked (vLLM runs LoRA only:
   :class:`~polymod.serving.vllm_peft.NotServableError` names the native engine);
3. the package is pulled into the cache once, by content hash, and verified (sha256
   of every file, the weights' structure) before anything reads it;
4. its host fingerprint is checked against the served checkpoint's files
   (:class:`~polymod.serving.checkpoint_host.CheckpointHost`);
5. a PEFT LoRA directory is written (:func:`~polymod.serving.vllm_peft.materialise`)
   and its path handed to vLLM.

The settings travel to the vLLM process as JSON in ``$POLYMOD_VLLM_CONFIG``
(:meth:`ResolverConfig.to_env`).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from polymod import format
from polymod.errors import (
    ConfigError,
    IncompatibleHostError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
)
from polymod.hub import names
from polymod.hub.client import connect
from polymod.hub.composition import KIND as COMPOSITION
from polymod.hub.composition import load_composition
from polymod.hub.store import VersionInfo
from polymod.serving.cache import content_key
from polymod.serving.checkpoint_host import CheckpointHost
from polymod.serving.vllm_peft import NATIVE, Materialised, NotServableError, check_rank, materialise, read_materialised

ENV = "POLYMOD_VLLM_CONFIG"
SERVABLE_KINDS = ("lora", "delta", "sparse", COMPOSITION)


@dataclass
class ResolverConfig:
    """What the resolver in the vLLM process needs.

    Attributes:
        model_dir: the checkpoint directory vLLM serves (fingerprints are checked against it).
        served_name: the model name vLLM serves it as (``base_model_name_or_path`` of the adapters).
        hub: the hub URL or store directory (None: polymod's default hub).
        cache_dir: pulled packages and written adapters.
        max_rank: vLLM's ``--max-lora-rank``.
        max_error: the largest relative error a truncation to ``max_rank`` may cost at a site.
        aliases: model name → hub reference.
        allow_host_mismatch: serve modules made on other weights of the same geometry.
    """

    model_dir: str
    served_name: str
    hub: str | None = None
    cache_dir: str = ""
    max_rank: int = 16
    max_error: float = 0.05
    aliases: dict[str, str] = field(default_factory=dict)
    allow_host_mismatch: bool = False

    def __post_init__(self) -> None:
        check_rank(self.max_rank)
        if not 0.0 <= self.max_error < 1.0:
            raise ConfigError(f"max_error is a relative error in [0, 1), got {self.max_error!r}")

    def to_env(self) -> dict[str, str]:
        """The environment entry that carries this configuration to the vLLM process."""
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ResolverConfig | None:
        """The configuration in ``$POLYMOD_VLLM_CONFIG``, or None when it is not set.

        Raises:
            ConfigError: the variable holds something else than this configuration's JSON.
        """
        raw = (os.environ if environ is None else environ).get(ENV)
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"${ENV} must hold the JSON polymod serve --engine vllm writes ({exc})") from exc


def http_status(exc: BaseException) -> tuple[HTTPStatus, str]:
    """The HTTP status and OpenAI error type a resolver failure answers with (as the native engine does)."""
    if isinstance(exc, NotServableError | InvalidNameError):
        return HTTPStatus.BAD_REQUEST, "invalid_request_error"
    if isinstance(exc, IncompatibleHostError):
        return HTTPStatus.CONFLICT, "invalid_request_error"
    if isinstance(exc, IntegrityError):
        return HTTPStatus.BAD_GATEWAY, "server_error"
    if isinstance(exc, NotFoundError):
        return HTTPStatus.NOT_FOUND, "invalid_request_error"
    return HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"


class HubLoraSource:
    """Resolves vLLM model names to PEFT LoRA directories through polymod's hub (blocking calls).

    Args:
        config: the settings.
        hub: a hub client (default: ``connect(config.hub)``), mainly for tests.
    """

    def __init__(self, config: ResolverConfig, hub: Any = None):
        self.config = config
        self.hub = hub if hub is not None else connect(config.hub)
        self.host = CheckpointHost(config.model_dir)
        self.dir = Path(config.cache_dir or Path(config.model_dir) / ".polymod-vllm")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def reference(self, name: str) -> str | None:
        """The hub reference ``name`` stands for (aliases first), or None when it is not a reference."""
        ref = self.config.aliases.get(name, name)
        try:
            names.Ref.parse(ref)
        except InvalidNameError:
            return None
        return ref

    def resolve(self, name: str) -> Materialised | None:
        """The adapter directory for ``name``, written on first use; None when the hub has no such module.

        Raises:
            NotServableError: a kind or composition vLLM cannot run (400, names ``--engine native``).
            IncompatibleHostError: made for another host than the served checkpoint (409).
            IntegrityError: a pulled file failed verification; nothing was written (502).
        """
        ref = self.reference(name)
        if ref is None:
            return None
        try:
            info = self.hub.show(ref)
        except NotFoundError:
            return None
        if info.yanked:
            return None
        if info.kind not in SERVABLE_KINDS:
            raise NotServableError(f"{info.ref} cannot be served by vLLM: it is a {info.kind} module and vLLM runs "
                                   f"LoRA only; {NATIVE}")
        key = content_key(info)
        out = self.dir / "adapters" / f"{key[:32]}-r{self.config.max_rank}"
        with self._lock(key):
            done = read_materialised(out)
            if done is not None:
                return done
            out.parent.mkdir(parents=True, exist_ok=True)
            if info.kind == COMPOSITION:
                package = load_composition(self._pulled(info))
                recorded = {p.name: p.sha256 for p in package.card.lineage.parents}
                leaves = {leaf: self._module(self._show_leaf(info, leaf, ref, recorded)) for leaf, ref in
                          package.modules.items()}
                return materialise(None, out, info.ref, base_model=self.config.served_name,
                                   max_rank=self.config.max_rank, max_error=self.config.max_error,
                                   expr=package.expr, leaves=leaves)
            return materialise(self._module(info), out, info.ref, base_model=self.config.served_name,
                               max_rank=self.config.max_rank, max_error=self.config.max_error)

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _pulled(self, info: VersionInfo) -> Path:
        """The verified package of ``info`` in the cache (pulled on first use)."""
        path = self.dir / "modules" / content_key(info)
        if not (path / format.CARD_FILE).is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            self.hub.pull(info.ref, path)  # verified before it appears at `path`
        return path

    def _show_leaf(self, info: VersionInfo, leaf: str, ref: names.Ref, recorded: dict[str, str]) -> VersionInfo:
        """A composition leaf's published version, refused when it is not the one the composition recorded."""
        leaf_info = self.hub.show(str(ref))
        want = recorded.get(ref.module)
        if want and leaf_info.sha256 != want:
            raise IntegrityError(f"composition {info.ref}: leaf {leaf!r} expects {ref} with sha256 {want}, the hub "
                                 f"has {leaf_info.sha256}")
        return leaf_info

    def _module(self, info: VersionInfo):
        """The verified module of ``info``, checked against the served checkpoint."""
        if info.kind not in ("lora", "delta", "sparse"):
            raise NotServableError(f"{info.ref} cannot be served by vLLM: it is a {info.kind} module and vLLM runs "
                                   f"LoRA only; {NATIVE}")
        module = format.load(self._pulled(info))
        fit = self.host.check(module.card, dict(module.sites))
        problems = fit.errors + ([] if self.config.allow_host_mismatch else fit.warnings)
        if problems:
            raise IncompatibleHostError(
                f"{info.ref} was made for another host than the served {self.config.served_name!r}: "
                + "; ".join(problems[:4]) + ". Serve it with the host it was made for"
                + ("" if fit.errors else " (or start the server with --allow-host-mismatch)"))
        return module


__all__ = ["ENV", "HubLoraSource", "ResolverConfig", "http_status"]
