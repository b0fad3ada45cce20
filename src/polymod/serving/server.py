"""``polymod serve``'s HTTP layer: OpenAI-compatible routes over an :class:`~polymod.serving.engine.Engine`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions`` (streaming as Server-Sent Events ending ``data:
[DONE]``), ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``
(vLLM's names, any module kind), ``POST /v1/pin`` / ``/v1/unpin``, ``GET
/health``, ``GET /metrics``. Errors are OpenAI's error object with the status
of :data:`STATUS`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from polymod.errors import (
    AuthError,
    CompositionError,
    ConfigError,
    IncompatibleHostError,
    IntegrityError,
    PolymodError,
    StateError,
)
from polymod.format import architecture
from polymod.serving import openai_schema as oa
from polymod.serving.batching import Event, QueueFullError
from polymod.serving.batching import Request as Job
from polymod.serving.cache import CacheFullError
from polymod.serving.engine import Engine, ModelNotFoundError
from polymod.serving.sampling import Sampling
from polymod.serving.security import BodyLimit, Keys

# error class -> (HTTP status, OpenAI error type, code); the first match in this order wins
STATUS: list[tuple[type[BaseException], int, str, str | None]] = [
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (IncompatibleHostError, 409, "invalid_request_error", "host_mismatch"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (CacheFullError, 503, "server_error", "module_slots_full"),
    (IntegrityError, 502, "server_error", "module_verification_failed"),
    (AuthError, 401, "authentication_error", "invalid_api_key"),
    (CompositionError, 400, "invalid_request_error", "bad_composition"),
    (ConfigError, 400, "invalid_request_error", None),
    (StateError, 409, "invalid_request_error", None),
    (PolymodError, 400, "invalid_request_error", None),
]
RETRY_AFTER_S = 1


def error_response(exc: BaseException) -> JSONResponse:
    """The OpenAI-style error response for a polymod error."""
    for cls, status, kind, code in STATUS:
        if isinstance(exc, cls):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
            return JSONResponse(oa.error_body(str(exc), kind, code=code), status_code=status, headers=headers)
    raise exc


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine`` (started and stopped with the app's lifespan)."""
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="polymod serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions over a host and the modules of a polymod hub")
    keys = Keys(engine.hub, enabled=engine.options.api_keys)
    app.add_middleware(BodyLimit, max_bytes=engine.options.max_body_bytes)
    if engine.options.cors_origins:  # CORS is off unless origins are given
        app.add_middleware(CORSMiddleware, allow_origins=engine.options.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(PolymodError)
    async def _polymod_error(_request: Request, exc: PolymodError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}"
        return JSONResponse(oa.error_body(message, param=where), status_code=400)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")  # the matched route's path: unknown paths share one label
        engine.metrics.request(getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and the scheduler's load."""
        return {"status": "ok", "batch_size": engine.scheduler.batch_size,
                "waiting": len(engine.scheduler.waiting), "modules": engine.cache.stats()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        """Prometheus text: requests, tokens/s, queue depth, batch size, cache tiers, time to first token."""
        return engine.metrics.render(engine.cache.stats())

    @app.get("/v1/models", dependencies=[Depends(keys)])
    async def models() -> dict[str, Any]:
        """The host and every servable module (aliases, and the hub's modules for this host's architecture)."""
        return {"object": "list", "data": await asyncio.to_thread(list_models, engine)}

    @app.post("/v1/completions", dependencies=[Depends(keys)])
    async def completions(body: oa.CompletionRequest, request: Request):
        """OpenAI completions: continue ``prompt``."""
        prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and isinstance(
            body.prompt[0], str) else body.prompt
        ids = prompt if isinstance(prompt, list) else engine.tokenizer(prompt).input_ids
        return await generate(engine, body, ids, body.max_tokens, chat=False, http=request)

    @app.post("/v1/chat/completions", dependencies=[Depends(keys)])
    async def chat_completions(body: oa.ChatRequest, request: Request):
        """OpenAI chat completions: the messages through the tokenizer's chat template."""
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ConfigError("this host's tokenizer has no chat template; use /v1/completions")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        return await generate(engine, body, ids, body.max_completion_tokens or body.max_tokens, chat=True,
                              http=request)

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(keys)])
    async def load_adapter(body: oa.AdapterRequest) -> dict[str, Any]:
        """Make a module resident now; ``lora_name`` becomes an alias of ``lora_path`` (a hub reference)."""
        ref = body.lora_path or body.lora_name
        info = await asyncio.to_thread(engine.info, ref)
        name = await engine.cache.acquire(info)
        engine.cache.release([name])
        if body.lora_path:
            engine.aliases[body.lora_name] = info.ref
        return {"status": "loaded", "model": body.lora_name, "reference": info.ref}

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(keys)])
    async def unload_adapter(body: oa.AdapterRequest) -> dict[str, Any]:
        """Detach a module (not while a request uses it) and forget its alias."""
        info = await asyncio.to_thread(engine.info, body.lora_name)
        was = await asyncio.to_thread(engine.cache.unload, info)
        engine.aliases.pop(body.lora_name, None)
        return {"status": "unloaded" if was else "not_resident", "model": body.lora_name, "reference": info.ref}

    @app.post("/v1/pin", dependencies=[Depends(keys)])
    async def pin(body: oa.AdapterRequest) -> dict[str, Any]:
        """Load a module if needed and keep it resident whatever the LRU order."""
        info = await asyncio.to_thread(engine.info, body.lora_name)
        name = await engine.cache.acquire(info)
        engine.cache.release([name])
        engine.cache.pin(info)
        return {"status": "pinned", "model": body.lora_name, "reference": info.ref}

    @app.post("/v1/unpin", dependencies=[Depends(keys)])
    async def unpin(body: oa.AdapterRequest) -> dict[str, Any]:
        """Let a pinned module be evicted again."""
        info = await asyncio.to_thread(engine.info, body.lora_name)
        engine.cache.pin(info, pinned=False)
        return {"status": "unpinned", "model": body.lora_name, "reference": info.ref}

    return app


def list_models(engine: Engine) -> list[dict[str, Any]]:
    """``/v1/models`` entries: the host, then aliases and hub modules made for this host's architecture."""
    created = int(engine.metrics.started)
    out = [{"id": engine.host_id, "object": "model", "created": created, "owned_by": "polymod",
            "root": engine.host_id, "parent": None}]
    seen: set[str] = set()

    def entry(model_id: str, info: Any) -> dict[str, Any]:
        lineage = (info.card or {}).get("lineage") or {}
        return {"id": model_id, "object": "model", "created": int(info.created), "owned_by": info.owner,
                "root": info.ref, "parent": engine.host_id,
                "polymod": {"kind": info.kind, "reference": info.ref, "parents": lineage.get("parents", []),
                            "recipe": lineage.get("recipe", {}), "description": info.card.get("description", "")}}

    for alias in sorted(engine.aliases):
        try:
            info = engine.info(alias)
        except PolymodError:
            continue
        out.append(entry(alias, info))
        seen.add(info.ref)
    offset, arch = 0, architecture(engine.model.host)
    while offset < 1000:
        page = engine.hub.search("", limit=100, offset=offset, architecture=arch)
        for hit in page.hits:
            ref = f"{hit['owner']}/{hit['name']}@{hit['version']}"
            if ref not in seen:
                seen.add(ref)
                out.append(entry(ref, engine.hub.show(ref)))
        offset += 100
        if offset >= page.total:
            break
    return out


async def generate(engine: Engine, body: Any, prompt: list[int], max_tokens: int | None, chat: bool,
                   http: Request) -> Any:
    """Validate limits, acquire the route, queue the rows and answer (a JSON object or an SSE stream)."""
    if not prompt:
        raise ConfigError("the prompt is empty; send at least one token")
    room = engine.context - len(prompt)
    if max_tokens is None:
        max_tokens = max(room, 0)
    if len(prompt) + max_tokens > engine.context or max_tokens < 1:
        raise ConfigError(f"this model's maximum context length is {engine.context} tokens; the request asks for "
                          f"{len(prompt) + max_tokens} ({len(prompt)} in the prompt, {max_tokens} to generate). "
                          "Shorten the prompt or lower max_tokens")
    if body.n > engine.options.max_n:
        raise ConfigError(f"n={body.n} is more than this server allows ({engine.options.max_n})")
    ext = body.polymod
    route = await engine.route(body.model, ext.compose if ext else None, ext.modules if ext else None)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def done(job: Job) -> None:
        engine.cache.release(route.held)
        if job.first_token is not None:
            engine.metrics.first_token(job.first_token - job.arrived, len(job.prompt))

    sampling = [Sampling.make(body.temperature, body.top_p, None if body.seed is None else body.seed + i)
                for i in range(body.n)]
    job = Job(list(prompt), route.composition, body.n, max_tokens, sampling, body.stops,
              sink=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), on_done=done)
    try:
        engine.scheduler.submit(job)
    except QueueFullError:
        engine.cache.release(route.held)
        raise
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, job, queue, rid, body.model, chat, include_usage),
                                 media_type="text/event-stream")
    texts, finish = [""] * body.n, [None] * body.n
    try:
        while any(f is None for f in finish):
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            texts[ev.index] += ev.text
            finish[ev.index] = ev.finish or finish[ev.index]
    finally:
        if any(f is None for f in finish):
            job.cancel()
            engine.scheduler.poke()
    choices = [oa.choice(i, texts[i], finish[i], chat) for i in range(body.n)]
    return oa.completion_object(rid, body.model, choices, chat, oa.usage(len(prompt), job.completion_tokens))


async def _stream(engine: Engine, job: Job, queue: asyncio.Queue, rid: str, model: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    open_, started = job.n, set()
    try:
        while open_:
            ev = await queue.get()
            open_ -= ev.finish is not None
            if not ev.text and ev.finish is None:
                continue
            first = ev.index not in started
            started.add(ev.index)
            piece = oa.choice(ev.index, ev.text, ev.finish, chat, delta=True, first=first)
            yield _sse(oa.completion_object(rid, model, [piece], chat, chunk=True))
        if include_usage:
            yield _sse(oa.completion_object(rid, model, [], chat, oa.usage(len(job.prompt), job.completion_tokens),
                                            chunk=True))
        yield "data: [DONE]\n\n"
    finally:
        if open_:  # the client went away mid-stream: free the batch slots now
            job.cancel()
            engine.scheduler.poke()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


__all__ = ["STATUS", "create_app", "error_response", "list_models"]


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the server under uvicorn until interrupted."""
    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
