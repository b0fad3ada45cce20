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
"""

from __future__ import annotations

import asyncio
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


__all__ = ["NAME", "make_resolver", "register"]
