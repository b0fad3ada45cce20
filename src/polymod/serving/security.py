"""API keys checked against the hub's hashed tokens, and a request body size limit."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from polymod.errors import AuthError
from polymod.hub.auth import authenticate, token_hash
from polymod.hub.remote import RemoteHub

REMOTE_TTL_S = 60.0


class Keys:
    """A FastAPI dependency: with keys enabled, ``Authorization: Bearer <token>`` must be a valid hub token.

    A local hub checks the token against its store (only sha256 hashes are
    stored); a remote hub is asked ``whoami`` and the answer is kept for a minute.
    """

    def __init__(self, hub: Any, enabled: bool):
        self.hub, self.enabled = hub, enabled
        self._remote: dict[str, tuple[str, float]] = {}

    async def __call__(self, authorization: str | None = Header(None)) -> str | None:
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("this server needs an API key: send 'Authorization: Bearer <hub token>' "
                            "(the openai SDK's api_key=)")
        return await asyncio.to_thread(self.user, token.strip())

    def user(self, token: str) -> str:
        """The hub user a token belongs to.

        Raises:
            AuthError: unknown, revoked or expired.
        """
        store = getattr(self.hub, "store", None)
        if store is not None:
            return authenticate(store, token)
        key = token_hash(token)
        hit = self._remote.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        user = RemoteHub(self.hub.url, token).whoami()
        self._remote[key] = (user, time.monotonic() + REMOTE_TTL_S)
        return user


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before it is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        if length is not None:  # the server stops reading at the declared length
            await self.app(scope, receive, send)
            return
        # chunked: read the body here, counting, and replay it to the app
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"error": {"message": f"the request body is larger than this server's limit of {limit} bytes",
                                 "type": "invalid_request_error", "param": None, "code": "body_too_large"}}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
