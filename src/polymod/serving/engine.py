"""The native serving engine: a host, its module cache and the continuous-batching scheduler.

:class:`Engine` turns an API request's ``model`` field (the host, an alias or
a hub reference ``owner/name[@version]``) or its ``polymod.compose``
extension into the composition that the request's rows use, acquires the
modules it names from the cache (they stay attached while the request runs)
and hands the rows to the scheduler.

A per-request ``Stack`` runs as a per-row Stack (each module in turn on that
row). A per-request weighted ``Mix`` (a static router) of modules with a
weight delta is served as its parameter aggregation, Σᵢ wᵢ Δᵢ
(:func:`polymod.merge`, ``linear``; exact for LoRA, where it is PEFT's
``cat``), materialised once per distinct (modules, weights) and cached like
any other module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polymod.compose import Composition, Mix, Stack, describe, from_json, leaves
from polymod.errors import CompositionError, ConfigError, InvalidNameError, NotFoundError, UnknownModuleError
from polymod.hub import names
from polymod.hub.client import connect
from polymod.merging.merge import merge
from polymod.modular import Modular
from polymod.routing.fixed import Static
from polymod.serving.batching import Scheduler
from polymod.serving.cache import ModuleCache, content_key
from polymod.serving.metrics import Metrics


class ModelNotFoundError(UnknownModuleError):
    """The request's ``model`` is neither the host, an alias nor a published module."""


@dataclass
class ServeOptions:
    """Limits and settings of one server (the ``polymod serve`` options)."""

    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 64
    max_resident: int = 8
    max_cpu_modules: int = 64
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    allow_host_mismatch: bool = False
    api_keys: bool = False
    cache_dir: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    cors_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("max_batch", "max_queue", "max_resident", "max_cpu_modules", "max_n", "max_body_bytes"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk must be a whole number of tokens (0: whole prompts at once), got "
                              f"{self.prefill_chunk!r}")


@dataclass
class Route:
    """What a request's rows use: the composition over library names and the names to release after."""

    composition: Composition | None
    held: list[str]


class Engine:
    """A served host: ``Modular`` + module cache + scheduler + metrics.

    Args:
        host: a causal LM (``transformers`` ``*ForCausalLM``), in eval mode.
        tokenizer: its tokenizer (a chat template for ``/v1/chat/completions``).
        hub: a hub client (:func:`polymod.hub.connect`).
        host_id: the name clients use for the bare host.
        options: limits and settings.
    """

    def __init__(self, host: Any, tokenizer: Any, hub: Any, host_id: str, options: ServeOptions | None = None):
        self.options = options or ServeOptions()
        self.host_id, self.tokenizer, self.hub = host_id, tokenizer, hub
        self.model = Modular(host.eval())
        self.metrics = Metrics()
        self.aliases: dict[str, str] = dict(self.options.aliases)
        self.context = int(getattr(host.config, "max_position_embeddings", 0) or 1 << 30)
        eos = getattr(host.generation_config, "eos_token_id", None) if hasattr(host, "generation_config") else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.scheduler = Scheduler(self.model, tokenizer, self.eos, self.options.max_batch, self.options.max_queue,
                                   observe=self.metrics.step, prefill_chunk=self.options.prefill_chunk)
        cache_dir = self.options.cache_dir or tempfile.mkdtemp(prefix="polymod-serve-")
        self.cache = ModuleCache(self.model, hub, Path(cache_dir), self.scheduler.lock,
                                 self.options.max_resident, self.options.max_cpu_modules,
                                 self.options.allow_host_mismatch, count=self.metrics.cache_event)

    def start(self) -> None:
        """Start the scheduler thread."""
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler (running requests end with finish reason ``abort``)."""
        self.scheduler.stop()

    # -- names ---------------------------------------------------------------------------

    def reference(self, name: str) -> str:
        """The hub reference a ``model`` name stands for (aliases resolved).

        Raises:
            ModelNotFoundError: not an alias and not an ``owner/name[@version]`` reference.
        """
        ref = self.aliases.get(name, name)
        try:
            names.Ref.parse(ref)
        except InvalidNameError as exc:
            raise ModelNotFoundError(f"the model {name!r} does not exist: it is not the host {self.host_id!r}, an "
                                     f"alias ({', '.join(sorted(self.aliases)) or 'none'}) or a hub reference "
                                     f"owner/name[@version] ({exc})") from exc
        return ref

    def info(self, name: str):
        """The published version ``name`` resolves to (blocking).

        Raises:
            ModelNotFoundError: unknown alias, bad reference, or not published on the hub.
        """
        ref = self.reference(name)
        try:
            return self.cache.resolve(ref)
        except NotFoundError as exc:
            raise ModelNotFoundError(f"the model {name!r} does not exist on the hub {self.hub!r}: {exc}") from exc

    # -- routes --------------------------------------------------------------------------

    async def route(self, model: str, compose: Any = None, modules: dict[str, str] | None = None) -> Route:
        """Acquire what a request needs; the caller releases ``Route.held`` when it ends.

        Raises:
            ModelNotFoundError: an unknown model or module (404).
            IncompatibleHostError: a module made for another host (409).
            CompositionError: a composition the engine cannot serve (400).
            IntegrityError: a pulled file failed verification (502).
            CacheFullError: no resident slot is free (503).
        """
        if compose is None:
            if model == self.host_id:
                return Route(None, [])
            info = await asyncio.to_thread(self.info, model)
            name = await self.cache.acquire(info)
            return Route(name, [name])
        expr = from_json(compose)
        modules = modules or {}
        missing = [leaf for leaf in leaves(expr) if leaf not in modules]
        if missing:
            raise CompositionError(f"the composition names {missing} but polymod.modules maps only "
                                   f"{sorted(modules)}; give each leaf a hub reference or alias")
        held: list[str] = []
        try:
            if isinstance(expr, Mix):
                name = await self._mix(expr, modules)
                held.append(name)
                return Route(name, held)
            if isinstance(expr, str) or _stack_of_names(expr):
                renamed: dict[str, str] = {}
                for leaf in leaves(expr):
                    info = await asyncio.to_thread(self.info, modules[leaf])
                    renamed[leaf] = await self.cache.acquire(info)
                    held.append(renamed[leaf])
                return Route(_rename(expr, renamed), held)
        except BaseException:
            self.cache.release(held)
            raise
        raise CompositionError(f"polymod serve runs a module, a Stack of modules or a weighted Mix (static router) "
                               f"of modules per request, got {describe(expr)}")

    async def _mix(self, expr: Mix, modules: dict[str, str]) -> str:
        if not all(isinstance(c, str) for c in expr.children) or expr.aggregate != "sum":
            raise CompositionError(f"a per-request Mix takes module names and aggregate='sum', got {describe(expr)}")
        if not isinstance(expr.router, Static):
            raise CompositionError(f"a per-request Mix takes a static router (fixed weights), got {expr.router}; "
                                   "learned routers are served by attaching them to the host")
        weights = expr.router.fixed or [1.0 / len(expr.children)] * len(expr.children)
        infos = [await asyncio.to_thread(self.info, modules[c]) for c in expr.children]
        key = hashlib.sha256(json.dumps([[content_key(i), w] for i, w in zip(infos, weights)]).encode()).hexdigest()

        def build():
            parts = {c: self.cache.loaded(i) for c, i in zip(expr.children, infos)}
            return merge(parts, method="linear", weights=weights, host=self.model.host,
                         name="mix(" + ",".join(f"{w:g}*{i.ref}" for i, w in zip(infos, weights)) + ")")

        return await self.cache.acquire_merged(key, build)


def _stack_of_names(expr: Composition) -> bool:
    return isinstance(expr, Stack) and all(isinstance(c, str) or _stack_of_names(c) for c in expr.children)


def _rename(expr: Composition, renamed: dict[str, str]) -> Composition:
    if isinstance(expr, str):
        return renamed[expr]
    return Stack(*(_rename(c, renamed) for c in expr.children))


def load_engine(host_model: str, hub: Any, options: ServeOptions | None = None, name: str | None = None,
                dtype: str = "float32") -> Engine:
    """Load a causal LM and its tokenizer from a local directory and wrap them in an :class:`Engine`.

    Args:
        host_model: a directory holding a transformers checkpoint and tokenizer.
        hub: a hub URL or directory (or a client).
        options: limits and settings.
        name: the id clients use for the bare host (default: the directory's name).
        dtype: the host's dtype (``float32``, ``bfloat16`` or ``float16``).

    Raises:
        ConfigError: not a directory with a checkpoint, or an unknown dtype.
    """
    path = Path(host_model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{host_model!r} is not a model directory (no config.json); give the directory a "
                          "transformers checkpoint was saved to (save_pretrained)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    host = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Engine(host, tokenizer, connect(hub), name or path.name, options)
