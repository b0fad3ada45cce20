"""polymod's LoRA resolver as a vLLM plugin (imported only inside a vLLM process).

polymod declares it as a ``vllm.general_plugins`` entry point (``polymod =
polymod.serving.vllm_plugin:register``). vLLM calls :func:`register` in each of its
processes; when ``$POLYMOD_VLLM_CONFIG`` is set (``polymod serve --engine vllm``
sets it) the resolver is registered under the name ``polymod-hub``, otherwise
nothing happens, so installing polymod beside vLLM changes no other server.

The resolver runs :class:`~polymod.serving.vllm_resolver.HubLoraSource` in a worker
thread and turns its refusals into HTTP errors, which vLLM's exception handler
renders as OpenAI error bodies: a kind vLLM cannot run → 400 (the message names
``--engine native``), another host → 409, a package failing verification → 502,
no such module → vLLM's own 404.

vLLM ignores request fields it does not know (it only logs them), so a client
sending polymod's per-request extension (``extra_body={"polymod": ...}``) would
get the host's text and believe its composition ran. :class:`RefusePolymodExtension`,
an ASGI middleware ``polymod serve --engine vllm`` gives vLLM (``--middleware``),
answers such a request with a 400 that names the native engine instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import HTTPException

from polymod.errors import PolymodError
from polymod.serving.vllm_resolver import HubLoraSource, ResolverConfig, http_status

NAME = "polymod-hub"
log = logging.getLogger("vllm.polymod")  # under vLLM's logger: its handlers print these lines


def make_resolver(config: ResolverConfig, hub: Any = None) -> Any:
    """A ``vllm.lora.resolver.LoRAResolver`` over polymod's hub (imports vLLM).

    Args:
        config: the resolver settings.
        hub: a hub client (default: ``connect(config.hub)`` on first use).
    """
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class PolymodHubResolver(LoRAResolver):
        """Resolves a request's ``model`` (hub reference or alias) to a PEFT LoRA directory."""

        def __init__(self) -> None:
            self._source: HubLoraSource | None = None

        def source(self) -> HubLoraSource:
            if self._source is None:
                self._source = HubLoraSource(config, hub)
            return self._source

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            try:
                done = await asyncio.to_thread(lambda: self.source().resolve(lora_name))
            except PolymodError as exc:
                status, _ = http_status(exc)
                log.warning("polymod: %s refused: %s", lora_name, exc)
                raise HTTPException(status_code=int(status), detail=str(exc)) from exc
            if done is None:
                return None
            log.info("polymod: %s -> %s (rank %d, %s, max relative error %.3g)", lora_name, done.ref, done.rank,
                     done.how, done.max_error)
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(done.path))

    return PolymodHubResolver()


def register() -> None:
    """vLLM's plugin entry point: register the hub resolver when ``$POLYMOD_VLLM_CONFIG`` is set."""
    config = ResolverConfig.from_env()
    if config is None:
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    if NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(NAME, make_resolver(config))


EXTENSION_REFUSED = ("the request's polymod extension (a composition per request) is served by the native engine only "
                     "(polymod serve HOST --engine native); with --engine vllm, publish the composition as a package "
                     "(polymod.hub.composition.save_composition) and name it as the model")


class RefusePolymodExtension:
    """ASGI middleware: a POST to ``/v1/...`` whose JSON body has a top-level ``polymod`` key gets a 400.

    The body is read whole (vLLM reads it whole too) and handed on unchanged otherwise.

    Args:
        app: the ASGI app it wraps.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        if b'"polymod"' in body and _has_extension(body):
            error = {"error": {"message": EXTENSION_REFUSED, "type": "invalid_request_error", "param": "polymod",
                               "code": "polymod_extension_unsupported"}}
            raw = json.dumps(error).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": raw})
            return
        pending = list(messages)

        async def replay() -> dict:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


def _has_extension(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and "polymod" in data


__all__ = ["EXTENSION_REFUSED", "NAME", "RefusePolymodExtension", "make_resolver", "register"]
