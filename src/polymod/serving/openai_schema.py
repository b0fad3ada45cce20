"""The OpenAI-compatible request bodies, response objects and error bodies that ``polymod serve`` speaks.

Requests are validated by pydantic (FastAPI turns a failure into a 400 with
an OpenAI-style error body naming the field). Fields OpenAI defines that the
native engine does not implement are refused by name unless they are at their
neutral value; anything else unknown is refused too, so a client never
believes a setting took effect when it did not.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# OpenAI fields accepted only at the value that changes nothing.
NEUTRAL: dict[str, Any] = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "best_of": 1,
                           "echo": False, "logit_bias": None, "suffix": None, "top_logprobs": None,
                           "parallel_tool_calls": None, "tools": None, "tool_choice": None, "response_format": None}
IGNORED = {"user", "metadata", "store", "service_tier"}  # bookkeeping fields with no effect on generation


class Polymod(BaseModel):
    """polymod's request extension (``extra_body={"polymod": {...}}`` in the openai SDK).

    ``compose`` is a composition in polymod's JSON (``{"stack": ["a", "b"]}`` or
    ``{"mix": ["a", "b"], "router": {"type": "static", "weights": [0.3, 0.7]}}``)
    whose leaves are keys of ``modules``, each a hub reference or an alias.
    """

    model_config = ConfigDict(extra="forbid")
    compose: Any
    modules: dict[str, str] = Field(default_factory=dict, max_length=16)


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage counts."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=512)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    polymod: Polymod | None = None

    @model_validator(mode="after")
    def _known_fields(self) -> _Sampling:
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key not in NEUTRAL:
                raise ValueError(f"unknown field {key!r}; polymod serve accepts the OpenAI fields "
                                 "model, prompt/messages, max_tokens, temperature, top_p, n, stream, stop, seed")
            if value != NEUTRAL[key]:
                raise ValueError(f"{key}={value!r} is not supported by polymod serve (only {NEUTRAL[key]!r})")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise ValueError("stop takes at most 4 strings of at most 256 characters")
        return self

    @property
    def stops(self) -> list[str]:
        """``stop`` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt (text, or token ids) to continue."""

    prompt: str | list[int] | list[str] = Field(min_length=0)
    max_tokens: int | None = Field(16, ge=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("prompt: polymod serve takes one prompt per request (send a list of one)")
        return self


class Message(BaseModel):
    """A chat message; ``content`` is text or a list of text parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError(f"message content parts must be {{'type': 'text', 'text': ...}}, got {p!r:.80}")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's body): ``lora_name`` becomes an alias of ``lora_path``.

    ``lora_path`` is a hub reference ``owner/name[@version]`` of any module kind.
    """

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str | None = Field(None, max_length=512)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    """A response id such as ``cmpl-…`` or ``chatcmpl-…``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_object(rid: str, model: str, choices: list[dict[str, Any]], chat: bool,
                      use: dict[str, int] | None = None, chunk: bool = False) -> dict[str, Any]:
    """A completion (or streamed chunk) object around ``choices``."""
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    out: dict[str, Any] = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
                           "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def choice(index: int, text: str, finish: str | None, chat: bool, delta: bool = False,
           first: bool = False) -> dict[str, Any]:
    """One choice: ``text`` for completions, ``message`` (or ``delta`` when streaming) for chat."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        body: dict[str, Any] = {"content": text} if text or not finish else {}
        if first:
            body["role"] = "assistant"
        return {"index": index, "delta": body, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}
