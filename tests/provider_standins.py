"""Loopback stand-ins for two non-OpenAI provider APIs, as LiteLLM calls them: Anthropic's Messages API
(`POST /v1/messages`, a JSON message or its SSE event stream) and Ollama's chat API (`POST /api/chat`, one
JSON object or NDJSON lines).

They answer in the shapes the real servers use and record every call, so tests can see whether the
provider was asked at all.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class ProviderBehaviour:
    answer: str | None = None  # default: echo the last user message
    tool_call: dict | None = None  # {"name": ..., "input": {...}}: answer with a tool call instead of text
    status: int = 200  # answer every call with this error status
    chunk_chars: int = 4
    chunk_delay_s: float = 0.0
    delay_s: float = 0.0  # before answering at all
    requests: list[dict] = field(default_factory=list)  # {"body": dict, "headers": dict}
    streams: list[dict] = field(default_factory=list)  # per stream: {"chunks": sent, "completed", "closed_at"}

    def reset(self) -> None:
        self.answer, self.tool_call, self.status = None, None, 200
        self.chunk_chars, self.chunk_delay_s, self.delay_s = 4, 0.0, 0.0
        self.requests.clear()
        self.streams.clear()

    async def recorded(self, pieces: Any) -> Any:
        """Stream `pieces`, recording how far the stream got and when it was closed."""
        record: dict[str, Any] = {"chunks": 0, "completed": False}
        self.streams.append(record)
        try:
            async for piece in pieces:
                record["chunks"] += 1
                yield piece
            record["completed"] = True
        finally:
            record["closed_at"] = time.monotonic()

    def text(self, body: dict) -> str:
        if self.answer is not None:
            return self.answer
        users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        content = users[-1]["content"] if users else ""
        if isinstance(content, list):  # content blocks
            content = " ".join(b.get("text", "") for b in content if isinstance(b, dict))
        return f"You said: {content}"

    def pieces(self, text: str) -> list[str]:
        return [text[i:i + self.chunk_chars] for i in range(0, len(text), self.chunk_chars)]

    async def record(self, request: Request) -> dict:
        body = orjson.loads(await request.body())
        self.requests.append({"body": body, "headers": dict(request.headers)})
        await asyncio.sleep(self.delay_s)
        return body


# ----------------------------------------------------------- Anthropic ----

def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"


def anthropic_app(b: ProviderBehaviour) -> Starlette:
    """Anthropic's `POST /v1/messages`: a `message` object, or with `stream: true` its event stream
    (message_start, content_block_start/delta/stop, ping, message_delta, message_stop)."""

    async def messages(request: Request) -> Response:
        body = await b.record(request)
        if b.status != 200:
            kind = "overloaded_error" if b.status == 529 else "api_error"
            return JSONResponse({"type": "error", "error": {"type": kind, "message": "Internal server error"}},
                                b.status, headers={"request-id": "req_standin"})
        model, text = body.get("model", "claude-stand-in"), b.text(body)
        usage = {"input_tokens": 12, "output_tokens": max(1, len(text) // 4)}
        stop = "tool_use" if b.tool_call else "end_turn"
        if not body.get("stream"):
            content: list[dict] = [{"type": "text", "text": text}]
            if b.tool_call:
                content = [{"type": "tool_use", "id": "toolu_standin", "name": b.tool_call["name"],
                            "input": b.tool_call["input"]}]
            return JSONResponse({"id": "msg_standin", "type": "message", "role": "assistant", "model": model,
                                 "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage})

        async def events():
            yield _sse("message_start", {"type": "message_start", "message": {
                "id": "msg_standin", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}})
            if b.tool_call:
                block = {"type": "tool_use", "id": "toolu_standin", "name": b.tool_call["name"], "input": {}}
                pieces = b.pieces(orjson.dumps(b.tool_call["input"]).decode())
                delta = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
            else:
                block = {"type": "text", "text": ""}
                delta = [{"type": "text_delta", "text": p} for p in b.pieces(text)]
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
            yield _sse("ping", {"type": "ping"})
            for d in delta:
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
                await asyncio.sleep(b.chunk_delay_s)
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": usage["output_tokens"]}})
            yield _sse("message_stop", {"type": "message_stop"})

        return StreamingResponse(b.recorded(events()), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])


# -------------------------------------------------------------- Ollama ----

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def ollama_app(b: ProviderBehaviour) -> Starlette:
    """Ollama's `POST /api/chat`: one JSON object, or with `stream: true` (its default) NDJSON lines ending
    with `done: true`; and `POST /api/show`, which LiteLLM asks about a model's template."""

    async def chat(request: Request) -> Response:
        body = await b.record(request)
        if b.status != 200:
            return JSONResponse({"error": "model runner has unexpectedly stopped"}, b.status)
        model, text = body.get("model", "llama3.1"), b.text(body)
        stats = {"total_duration": 5_000_000, "load_duration": 1_000_000, "prompt_eval_count": 12,
                 "prompt_eval_duration": 1_000_000, "eval_count": max(1, len(text) // 4), "eval_duration": 3_000_000}
        calls = [{"function": {"name": b.tool_call["name"], "arguments": b.tool_call["input"]}}] if b.tool_call else None
        if body.get("stream") is False:
            message: dict[str, Any] = {"role": "assistant", "content": "" if calls else text}
            if calls:
                message["tool_calls"] = calls
            return JSONResponse({"model": model, "created_at": _now(), "message": message, "done": True,
                                 "done_reason": "stop", **stats})

        async def lines():
            if calls:
                yield orjson.dumps({"model": model, "created_at": _now(), "done": False,
                                    "message": {"role": "assistant", "content": "", "tool_calls": calls}}) + b"\n"
            else:
                for piece in b.pieces(text):
                    yield orjson.dumps({"model": model, "created_at": _now(), "done": False,
                                        "message": {"role": "assistant", "content": piece}}) + b"\n"
                    await asyncio.sleep(b.chunk_delay_s)
            yield orjson.dumps({"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                                "done": True, "done_reason": "stop", **stats}) + b"\n"

        return StreamingResponse(b.recorded(lines()), media_type="application/x-ndjson")

    async def show(request: Request) -> Response:
        return JSONResponse({"template": "{{ if .Tools }}tools{{ end }}{{ .Prompt }}",
                             "model_info": {"llama.context_length": 131072}, "details": {"family": "llama"}})

    return Starlette(routes=[Route("/api/chat", chat, methods=["POST"]), Route("/api/show", show, methods=["POST"])])
