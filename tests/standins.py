"""Real HTTP servers on loopback that stand in for a vLLM-served guard and an OpenAI-compatible upstream.

They answer in the shapes the real servers use, and record what they received so tests can check it.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class ServerThread:
    """Runs an ASGI app with uvicorn on a free loopback port in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


# ---------------------------------------------------------------- the guard ----

FRAMING = "Now classify the following content according to the guidelines above:\n"


@dataclass
class Rule:
    """If the classified text contains `trigger`, the stand-in guard answers with these."""

    trigger: str
    categories: str
    risk: int


@dataclass
class GuardBehaviour:
    model: str = "Tommy-DING/FlexGuard-Qwen3-8B"
    rules: list[Rule] = field(default_factory=list)
    safe_risk: int = 3
    failure: str | None = None  # None | "500" | "garbage" | "slow"
    slow_s: float = 5.0
    delay_s: float = 0.0  # added to every answer, e.g. to stand in for GPU time
    split_reasoning: bool = False  # answer as vLLM does with --reasoning-parser: think block in `reasoning`
    requests: list[dict] = field(default_factory=list)
    # (stage, received, answered) per call, on the monotonic clock the tests share with in-process servers
    timings: list[tuple[str, float, float]] = field(default_factory=list)
    answered: list[tuple[float, str]] = field(default_factory=list)  # (when, the classified text) per call

    def reset(self) -> None:
        self.timings.clear()
        self.answered.clear()
        self.rules.clear()
        self.failure = None
        self.delay_s = 0.0
        self.split_reasoning = False
        self.requests.clear()

    def classified_text(self, user_message: str) -> str:
        """What the guard is asked about: the user text (prompt mode) or the answer (response mode)."""
        body = user_message.removeprefix(FRAMING)
        if "\n[Assistant]: " in body:
            return body.split("\n[Assistant]: ", 1)[1]
        return body.removeprefix("[User]: ")

    def answer(self, user_message: str) -> str:
        text = self.classified_text(user_message)
        category, risk = "SAFE", self.safe_risk
        for rule in self.rules:
            if rule.trigger in text and rule.risk >= risk:
                category, risk = rule.categories, rule.risk
        think = "\n".join(f"step{i}..." for i in range(1, 9))
        return f"<think>\n{think}\n</think>\n{category}\n{risk}"


def vllm_server(b: Any, path: str, handler: Any) -> Starlette:
    """A vLLM-like server: `handler` on POST `path`, and GET /v1/models listing `b.model` (read per request,
    so a test can change it)."""
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": b.model, "object": "model", "owned_by": "vllm"}]})

    return Starlette(routes=[Route(path, handler, methods=["POST"]), Route("/v1/models", models, methods=["GET"])])


def vllm_chat_completion(model: str, completion_id: str, message: dict, logprobs: Any, usage: tuple[int, int]) -> Response:
    """vLLM's chat.completion body for one choice; `usage` is (prompt_tokens, completion_tokens)."""
    return JSONResponse({
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", **message, "tool_calls": []},
                     "logprobs": logprobs, "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": usage[0], "total_tokens": sum(usage), "completion_tokens": usage[1]},
    })


def guard_app(b: GuardBehaviour) -> Starlette:
    async def chat(request: Request) -> Response:
        received = time.monotonic()
        body = orjson.loads(await request.body())
        b.requests.append(body)
        try:
            return await answer(body)
        finally:
            framed = " ".join(str(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict))
            stage = "response" if "\n[Assistant]: " in framed else "prompt"
            b.timings.append((stage, received, time.monotonic()))
            messages = body.get("messages")
            if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[1], dict):
                b.answered.append((time.monotonic(), b.classified_text(str(messages[1].get("content")))))

    async def answer(body: dict) -> Response:
        if body.get("model") != b.model:
            # vLLM's answer for a model it does not serve.
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}}, 404)
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        if b.failure == "500":
            return JSONResponse({"error": {"message": "engine dead", "type": "InternalServerError", "code": 500}}, 500)
        if b.failure == "slow":
            await asyncio.sleep(b.slow_s)
        content = "I'm sorry, I can't help with that." if b.failure == "garbage" else b.answer(
            body["messages"][-1]["content"])
        reasoning = None
        if b.split_reasoning and content.startswith("<think>"):
            reasoning, content = content.split("</think>\n", 1)
            reasoning = reasoning.removeprefix("<think>\n")
        return vllm_chat_completion(b.model, "chatcmpl-guard", {"content": content, "reasoning": reasoning},
                                    None, (600, 100))

    return vllm_server(b, "/v1/chat/completions", chat)


# ------------------------------------------------------------- the upstream ----

@dataclass
class UpstreamBehaviour:
    answers: list[str] | None = None  # one per choice; default: echo the last user message
    tool_call: dict | None = None  # {"name": ..., "arguments": ...}: answer with a tool call instead of text
    as_refusal: bool = False  # answer in `refusal` (as OpenAI does when a model declines) instead of `content`
    status: int = 200
    error_body: dict | None = None
    chunk_chars: int = 4
    chunk_delay_s: float = 0.0  # between content chunks, as a model generating tokens
    first_chunk_delay_s: float = 0.0  # a stream's time to first token (its headers go out at once)
    break_after_chunks: int | None = None  # drop the connection mid-stream
    answer_delay_s: float = 0.0  # a plain (not streamed) answer takes this long
    hung_up: list[float] = field(default_factory=list)  # when the gateway hung up on a plain answer
    message: dict | None = None  # answer with this whole assistant message (not streamed)
    deltas: list[Any] | None = None  # stream these deltas for choice 0, one chunk each, then a stop finish
    raw_body: Any = None  # answer with this JSON body (or these bytes) as it is (not streamed)
    raw_chunks: list[Any] | None = None  # stream these chunk objects as they are, then [DONE]
    raw_stream: list[bytes] | None = None  # answer a stream request with exactly these bytes, chunk by chunk
    ok_status: int = 200  # the status of a successful answer (plain or streamed)
    content_type: str | None = None  # of a successful answer, instead of the usual one
    headers: dict[str, str] = field(default_factory=dict)  # added to a successful answer
    models: list[str] = field(default_factory=lambda: ["stand-in-model"])  # what GET /v1/models lists
    requests: list[dict] = field(default_factory=list)  # {"body": bytes, "headers": dict}
    streams: list[dict] = field(default_factory=list)  # per stream: {"chunks": sent, "completed": bool}

    def reset(self) -> None:
        self.answers = None
        self.tool_call = None
        self.as_refusal = False
        self.status = 200
        self.error_body = None
        self.chunk_chars = 4
        self.chunk_delay_s = 0.0
        self.first_chunk_delay_s = 0.0
        self.break_after_chunks = None
        self.message = self.deltas = self.raw_body = self.raw_chunks = self.raw_stream = None
        self.ok_status, self.content_type = 200, None
        self.headers = {}
        self.models = ["stand-in-model"]
        self.answer_delay_s = 0.0
        self.hung_up.clear()
        self.requests.clear()
        self.streams.clear()

    def texts(self, body: dict) -> list[str]:
        n = body.get("n") or 1
        if self.answers is not None:
            return [self.answers[i % len(self.answers)] for i in range(n)]
        last = body["messages"][-1]["content"]
        if isinstance(last, list):
            last = " ".join(p.get("text", "") for p in last)
        return [f"You said: {last}"] * n


def upstream_app(b: UpstreamBehaviour) -> Starlette:
    async def chat(request: Request) -> Response:
        raw = await request.body()
        b.requests.append({"body": raw, "headers": dict(request.headers)})
        if b.status != 200:
            return JSONResponse(b.error_body or {"error": {"message": "rate limited", "type": "rate_limit_error",
                                                           "param": None, "code": "rate_limit_exceeded"}},
                                b.status, headers={"x-upstream-marker": "yes"})
        body = orjson.loads(raw)
        texts = b.texts(body)
        created, model = int(time.time()), body.get("model", "stand-in")
        if b.answer_delay_s and not body.get("stream"):
            deadline = time.monotonic() + b.answer_delay_s
            while time.monotonic() < deadline:
                if await request.is_disconnected():
                    b.hung_up.append(time.monotonic())
                    return Response(status_code=499)
                await asyncio.sleep(0.02)
        extra = {"status_code": b.ok_status, "headers": b.headers}
        if b.content_type:
            extra["media_type"] = b.content_type
        if b.raw_stream is not None and body.get("stream"):
            async def raw_events():
                for piece in b.raw_stream:
                    yield piece
            return StreamingResponse(raw_events(), **{"media_type": "text/event-stream", **extra})
        if b.raw_body is not None and not body.get("stream"):
            content = b.raw_body if isinstance(b.raw_body, bytes) else orjson.dumps(b.raw_body)
            return Response(content, **{"media_type": "application/json", **extra})
        if b.message is not None and not body.get("stream"):
            return Response(orjson.dumps({"id": "chatcmpl-up", "object": "chat.completion", "created": created,
                                          "model": model, "choices": [{"index": 0, "message": b.message,
                                                                       "logprobs": None, "finish_reason": "stop"}]}),
                            **{"media_type": "application/json", **extra})
        if not body.get("stream"):
            choices = []
            for i, text in enumerate(texts):
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if b.as_refusal:
                    message["content"], message["refusal"] = None, text
                if b.tool_call:
                    message["content"] = None
                    message["tool_calls"] = [{"id": "call_1", "type": "function", "function": b.tool_call}]
                choice: dict[str, Any] = {"index": i, "message": message,
                                          "finish_reason": "tool_calls" if b.tool_call else "stop"}
                choice["logprobs"] = {"content": [{"token": text[:3], "logprob": -0.1, "bytes": None,
                                                   "top_logprobs": []}]} if body.get("logprobs") else None
                choices.append(choice)
            return JSONResponse({"id": "chatcmpl-up", "object": "chat.completion", "created": created,
                                 "model": model, "choices": choices, "system_fingerprint": "fp_standin",
                                 "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
                                headers={"x-upstream-marker": "yes",
                                         # as a load balancer in front of a provider might
                                         "set-cookie": "upstream-affinity=replica-7; Path=/"})

        record = {"chunks": 0, "completed": False}
        b.streams.append(record)

        async def events():
            try:
                if b.first_chunk_delay_s:
                    await asyncio.sleep(b.first_chunk_delay_s)
                async for data in _events():
                    if b.break_after_chunks is not None and record["chunks"] >= b.break_after_chunks:
                        raise ConnectionAbortedError("stand-in upstream drops the stream")
                    record["chunks"] += 1
                    yield data
                record["completed"] = True
            finally:
                record["closed_at"] = time.monotonic()

        async def _events():
            def chunk(choices: list, **extra: Any) -> bytes:
                return b"data: " + orjson.dumps({"id": "chatcmpl-up", "object": "chat.completion.chunk",
                                                 "created": created, "model": model,
                                                 "system_fingerprint": "fp_standin", "choices": choices,
                                                 **extra}) + b"\n\n"
            if b.raw_chunks is not None:
                for raw_chunk in b.raw_chunks:
                    yield b"data: " + orjson.dumps(raw_chunk) + b"\n\n"
                    await asyncio.sleep(b.chunk_delay_s)
                yield b"data: [DONE]\n\n"
                return
            for i in range(len(texts)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            yield b": keep-alive\n\n"
            if b.deltas is not None:
                for delta in b.deltas:
                    yield chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
                    await asyncio.sleep(b.chunk_delay_s)
                yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk([], usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
                yield b"data: [DONE]\n\n"
                return
            longest = max(len(t) for t in texts)
            for start in range(0, longest, b.chunk_chars):
                for i, text in enumerate(texts):
                    piece = text[start:start + b.chunk_chars]
                    if b.tool_call and start == 0:
                        yield chunk([{"index": i, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": b.tool_call["name"], "arguments": b.tool_call["arguments"]}}]},
                                      "logprobs": None, "finish_reason": None}])
                    elif piece and not b.tool_call:
                        logprobs = {"content": [{"token": piece, "logprob": -0.25, "bytes": list(piece.encode()),
                                                 "top_logprobs": []}]} if body.get("logprobs") else None
                        field_name = "refusal" if b.as_refusal else "content"
                        yield chunk([{"index": i, "delta": {field_name: piece}, "logprobs": logprobs,
                                      "finish_reason": None}])
                await asyncio.sleep(b.chunk_delay_s)
            for i in range(len(texts)):
                yield chunk([{"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": "tool_calls" if b.tool_call else "stop"}])
            if (body.get("stream_options") or {}).get("include_usage"):
                yield chunk([], usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"x-upstream-marker": "yes"},
                                 status_code=b.ok_status)

    async def models(request: Request) -> Response:
        if b.status != 200:
            return JSONResponse(b.error_body or {"error": {"message": "down", "type": "server_error"}},
                                status_code=b.status)
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                         "owned_by": "standin"} for m in b.models]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])])


# ------------------------------------------------------- BingoGuard on vLLM ----

BINGO_SEVERITY_OPENING = "In this task, I would like you to classify the severity level"


@dataclass
class BingoRule:
    """If the classified text contains `trigger`, the stand-in BingoGuard answers unsafe with these."""

    trigger: str
    category: str = "S1"  # the answer's second line
    p_unsafe: float = 0.98
    level: int = 3  # the severity answer


@dataclass
class BingoBehaviour:
    model: str = "fanyin3639/bingoguard-llama-8b"
    rules: list[BingoRule] = field(default_factory=list)
    safe_p_unsafe: float = 0.02
    answer: str | None = None  # answer this instead (e.g. garbage)
    severity_answer: str | None = None
    no_logprobs: bool = False  # answer without logprobs even when asked
    failure: str | None = None  # None | "500"
    requests: list[dict] = field(default_factory=list)

    def classified(self, content: str) -> str:
        """The text BingoGuard is asked about: the user's (prompt task), the agent's or the response's."""
        if content.startswith(BINGO_SEVERITY_OPENING):
            return content.split("\n[Response]: ", 1)[1]
        if "\n\n[Agent]: " in content:
            return content.split("\n\n[Agent]: ", 1)[1].split("\n\n<END CONVERSATION>", 1)[0]
        return content.split("[User]: ", 1)[1].split("\n\n<END CONVERSATION>", 1)[0]

    def rule_for(self, content: str) -> BingoRule | None:
        text = self.classified(content)
        return next((r for r in self.rules if r.trigger in text), None)


def _logprob_entry(token: str, p: float, top: list[tuple[str, float]]) -> dict:
    def one(t: str, q: float) -> dict:
        return {"token": t, "logprob": max(math.log(q), -9999.0) if q > 0 else -9999.0,
                "bytes": list(t.encode())}
    return {**one(token, p), "top_logprobs": [one(t, q) for t, q in top]}


def bingoguard_app(b: BingoBehaviour) -> Starlette:
    """vLLM's chat completions as BingoGuard answers them, with `logprobs.content[i].top_logprobs`."""

    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        b.requests.append(body)
        if body.get("model") != b.model:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}}, 404)
        if b.failure == "500":
            return JSONResponse({"error": {"message": "engine dead", "type": "InternalServerError", "code": 500}}, 500)
        content = body["messages"][-1]["content"]
        rule = b.rule_for(content)
        logprobs = None
        if content.startswith(BINGO_SEVERITY_OPENING):
            text = b.severity_answer or f"#level: {rule.level if rule else 0}"
        else:
            p = rule.p_unsafe if rule else b.safe_p_unsafe
            label = "unsafe" if p >= 0.5 else "safe"
            text = b.answer or ("unsafe\n" + rule.category if rule and label == "unsafe" else label)
            if body.get("logprobs") and not b.no_logprobs:
                n = body.get("top_logprobs") or 1
                first = sorted([("unsafe", p), ("safe", 1 - p), ("Unsafe", 1e-6)], key=lambda x: -x[1])[:n]
                rest = [_logprob_entry(t, 1.0, [(t, 1.0)]) for t in (["\n", rule.category] if label == "unsafe" and rule else [])]
                logprobs = {"content": [_logprob_entry(label, dict(first).get(label, 1e-6), first), *rest]}
        return vllm_chat_completion(b.model, "chatcmpl-bingo", {"content": text, "reasoning_content": None},
                                    logprobs, (400, 4))

    return vllm_server(b, "/v1/chat/completions", chat)


# ---------------------------------------------------- DuoGuard on vLLM /classify ----

@dataclass
class DuoRule:
    """If the classified text contains `trigger`, these DuoGuard outputs (index → logit) are raised."""

    trigger: str
    logits: dict[int, float]


@dataclass
class DuoBehaviour:
    model: str = "DuoGuard/DuoGuard-0.5B"
    rules: list[DuoRule] = field(default_factory=list)
    safe_logit: float = -6.0
    raw_logits_param: str = "use_activation"  # the one this "vLLM version" understands
    failure: str | None = None  # None | "500" | "short" (11 outputs)
    requests: list[dict] = field(default_factory=list)

    def logits(self, text: str) -> list[float]:
        out = [self.safe_logit] * 12
        for rule in self.rules:
            if rule.trigger in text:
                for i, v in rule.logits.items():
                    out[i] = v
        return out


def duoguard_app(b: DuoBehaviour) -> Starlette:
    """vLLM's `POST /classify` (at the server root) for a 12-output sequence classifier."""

    async def classify(request: Request) -> Response:
        body = orjson.loads(await request.body())
        b.requests.append(body)
        if body.get("model") != b.model:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}}, 404)
        if b.failure == "500":
            return JSONResponse({"error": {"message": "engine dead", "type": "InternalServerError", "code": 500}}, 500)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        raw = body.get(b.raw_logits_param) is False
        data = []
        for i, text in enumerate(texts):
            vec = b.logits(text)
            if not raw:  # vLLM's default activation for a multi-output head: softmax
                exps = [math.exp(v - max(vec)) for v in vec]
                vec = [e / sum(exps) for e in exps]
            if b.failure == "short":
                vec = vec[:11]
            data.append({"index": i, "label": f"LABEL_{vec.index(max(vec))}", "probs": vec, "num_classes": len(vec)})
        tokens = sum(len(t.split()) for t in texts)
        return JSONResponse({"id": "classify-standin", "object": "list", "created": int(time.time()), "model": b.model,
                             "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                     "completion_tokens": 0, "prompt_tokens_details": None}})

    return vllm_server(b, "/classify", classify)


class _Unrecorded(list):
    """A request log that keeps nothing: a stand-in serving a benchmark's millions of requests."""

    def append(self, item: Any) -> None:
        pass


def main() -> None:
    """`python -m tests.standins guard|upstream PORT [--delay-ms N]`: serve a stand-in in its own process."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["guard", "upstream"])
    parser.add_argument("port", type=int)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="guard: time each answer takes")
    parser.add_argument("--failure", choices=["500", "garbage"], help="guard: answer every call this way")
    parser.add_argument("--rule", action="append", default=[], metavar="TRIGGER=CATEGORIES:RISK",
                        help="guard: answer CATEGORIES and RISK for texts containing TRIGGER")
    parser.add_argument("--answer", help="upstream: answer this text (default: echo the prompt)")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="upstream: pause between stream chunks")
    args = parser.parse_args()
    if args.kind == "guard":
        rules = []
        for spec in args.rule:
            trigger, _, verdict = spec.rpartition("=")
            categories, _, risk = verdict.partition(":")
            rules.append(Rule(trigger, categories, int(risk)))
        guard = GuardBehaviour(delay_s=args.delay_ms / 1000, rules=rules, failure=args.failure)
        guard.requests, guard.timings = _Unrecorded(), _Unrecorded()
        app = guard_app(guard)
    else:
        upstream = UpstreamBehaviour(answers=[args.answer] if args.answer else None,
                                     chunk_delay_s=args.chunk_delay_ms / 1000)
        upstream.requests, upstream.streams = _Unrecorded(), _Unrecorded()
        app = upstream_app(upstream)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
