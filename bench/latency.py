"""What a slow guard costs the user: time to first token, stalls and total time, per policy.

    python bench/latency.py [--requests 8] [--concurrency 4] [--rate 50] [--ttft-ms 300,800]
                            [--answer-tokens 250] [--only NAME,...] [--seed 1]

Loopback stand-ins of realistic shape, in this process, each on its own uvicorn server thread, with the
real gateway app between them (`create_app`, the same app `guardgate serve` runs):

- an upstream that waits a time to first token (uniform in --ttft-ms) and then streams --answer-tokens
  tokens of ~4 characters at --rate tokens/s, one SSE chunk each (a plain request gets the whole answer
  after the same time);
- a FlexGuard stand-in whose answer takes prefill + decode time: the user text at PREFILL_S_PER_TOKEN
  (the card's system prompt is the same on every call, so vLLM's prefix cache serves it), then, with
  reasoning on, a `<think>` block of lognormal length (REASONING_TOKENS p50/p95) before the verdict, or
  with reasoning off (`enable_thinking: false` or an empty think prefill) the verdict alone, at
  DECODE_TOKENS_PER_S, times a lognormal load factor (LOAD_P95).

Where the numbers come from (no GPU was measured for this benchmark):
- DECODE_TOKENS_PER_S = 75: vLLM decoding Llama-3.1-8B (BF16) one request at a time on one A100-40GB
  runs at about 75 tokens/s and stays near that up to ~8 concurrent requests
  (https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on); FlexGuard-Qwen3-8B is the same size.
- PREFILL_S_PER_TOKEN = 0.1 ms: an 8B model costs ~16 GFLOP per token; an A100 at ~50% of its 312 TFLOP/s
  prefills ~10k tokens/s. An estimate, not a measurement.
- REASONING_TOKENS p50 250 / p95 500: the card's output format is a `<think>` block walking its 8-step
  reasoning procedure (step1 … step8), then the CATEGORY and RISK_SCORE lines (max_tokens 2048); 250–500
  tokens is an assumption of ~30–60 tokens a step. VERDICT_TOKENS = 6: "VIO, ILG" and "85".
- the upstream's 300–800 ms to first token and 50 tokens/s: the issue's ranges for hosted models.

Each request's prompt carries a tag, so the stand-ins can tell which request a chunk or a guard call
belongs to: "guard calls" are the guard calls of one request; "held back" is the most characters the
upstream had sent that the client did not have yet. The baseline is the same upstream asked directly, in
the same run; figures are deltas against it (medians over the requests; stall is the longest gap between
two pieces of text reaching the client, after the first).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gateway.app import create_app  # noqa: E402
from gateway.config import load_config  # noqa: E402
from tests.standins import ServerThread, vllm_chat_completion  # noqa: E402

DECODE_TOKENS_PER_S = 75.0
PREFILL_S_PER_TOKEN = 0.0001
REASONING_TOKENS = (250, 500)  # p50, p95
VERDICT_TOKENS = 6
LOAD_P95 = 1.3  # p95 of the multiplicative load factor (p50 1.0)
CHARS_PER_TOKEN = 4
WORDS = ("the river carries fine silt from the hills and lays it down where the water slows, "
         "building wide flat plains that farmers have worked for thousands of years. ")


def lognormal(rng: random.Random, p50: float, p95: float) -> float:
    return p50 * math.exp(rng.gauss(0, math.log(p95 / p50) / 1.645))


# ---------------------------------------------------------------- stand-ins ----

@dataclass
class GuardModel:
    rng: random.Random
    calls: dict[str, list[tuple[float, float, bool]]] = field(default_factory=dict)  # tag → (start, s, reasoning)

    def latency(self, text: str, reasoning: bool) -> float:
        decode = VERDICT_TOKENS + (lognormal(self.rng, *REASONING_TOKENS) if reasoning else 0)
        return (len(text) / CHARS_PER_TOKEN * PREFILL_S_PER_TOKEN + decode / DECODE_TOKENS_PER_S) \
            * lognormal(self.rng, 1.0, LOAD_P95)


def guard_app(model: GuardModel) -> Starlette:
    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        user = body["messages"][1]["content"]
        kwargs = body.get("chat_template_kwargs") or {}
        reasoning = kwargs.get("enable_thinking") is not False and not body.get("continue_final_message")
        delay = model.latency(user, reasoning)
        tag = user.split("[req-", 1)[1].split("]", 1)[0] if "[req-" in user else "?"
        model.calls.setdefault(tag, []).append((time.monotonic(), delay, reasoning))
        await asyncio.sleep(delay)
        think = "<think>\n" + "\n".join(f"step{i}..." for i in range(1, 9)) + "\n</think>\n" if reasoning else ""
        return vllm_chat_completion(body["model"], "chatcmpl-guard", {"content": f"{think}SAFE\n3"}, None,
                                    (len(user) // CHARS_PER_TOKEN, VERDICT_TOKENS))

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@dataclass
class UpstreamModel:
    rng: random.Random
    ttft_s: tuple[float, float]
    rate: float
    tokens: int
    sent: dict[str, list[tuple[float, int]]] = field(default_factory=dict)  # tag → (when, chars sent so far)
    closed_early: set[str] = field(default_factory=set)

    def answer(self) -> list[str]:
        text = (WORDS * (self.tokens * CHARS_PER_TOKEN // len(WORDS) + 1))[:self.tokens * CHARS_PER_TOKEN]
        return [text[i:i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]


def upstream_app(model: UpstreamModel) -> Starlette:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return b"data: " + orjson.dumps({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 0,
                                         "model": "m", "choices": [{"index": 0, "delta": delta,
                                                                    "finish_reason": finish}]}) + b"\n\n"

    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        prompt = body["messages"][-1]["content"]
        tag = prompt.split("[req-", 1)[1].split("]", 1)[0]
        ttft = model.rng.uniform(*model.ttft_s)
        tokens = model.answer()
        log = model.sent.setdefault(tag, [])
        if not body.get("stream"):
            await asyncio.sleep(ttft + len(tokens) / model.rate)
            text = "".join(tokens)
            log.append((time.monotonic(), len(text)))
            return JSONResponse({"id": "chatcmpl-up", "object": "chat.completion", "created": 0, "model": "m",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})

        async def events():  # type: ignore[no-untyped-def]
            done = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                await asyncio.sleep(ttft)
                start, sent = time.monotonic(), 0
                for i, token in enumerate(tokens):
                    # Paced against the clock, so that a slow loop turn does not slow the model down.
                    await asyncio.sleep(max(0.0, start + i / model.rate - time.monotonic()))
                    sent += len(token)
                    log.append((time.monotonic(), sent))
                    yield chunk({"content": token})
                yield chunk({}, "stop")
                yield b"data: [DONE]\n\n"
                done = True
            finally:
                if not done:
                    model.closed_early.add(tag)

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


# ------------------------------------------------------------------ policies ----

@dataclass(frozen=True)
class Case:
    name: str
    policy: str  # YAML of the tenant's policy ("" for the direct baseline)
    stream: bool = True
    note: str = ""


def _policy(timing: str = "before", mode: str = "windowed", prompt_r: str = "default", window_r: str = "default",
            final_r: str = "default", window: int = 400, first_window: int = 64) -> str:
    return (f"prompt: {{timing: {timing}, reasoning: {prompt_r}}}\n"
            f"response: {{stream: {mode}, window: {window}, first_window: {first_window}, "
            f"window_reasoning: {window_r}, reasoning: {final_r}}}\n")


LOW_LATENCY = _policy("parallel", prompt_r="off", window_r="off", final_r="on", window=96, first_window=32)
CASES = [
    Case("direct", "", note="the upstream asked directly (baseline)"),
    Case("direct-plain", "", stream=False, note="the same, not streamed"),
    Case("default", _policy(), note="before; reasoning on everywhere; window 400, first 64"),
    Case("old-cadence", _policy(first_window=400), note="as default, first window 400 (the cadence before)"),
    Case("parallel", _policy("parallel"), note="parallel; reasoning on everywhere"),
    Case("parallel-win-off", _policy("parallel", window_r="off", window=96, first_window=32),
         note="parallel; windows without reasoning, prompt and final check with; window 96, first 32"),
    Case("low-latency", LOW_LATENCY, note="parallel; reasoning only in the final check; window 96, first 32"),
    Case("all-off", _policy("parallel", prompt_r="off", window_r="off", final_r="off", window=96,
                            first_window=32), note="parallel; no reasoning anywhere; window 96, first 32"),
    Case("buffered", _policy(mode="buffered"), note="before; buffered stream"),
    Case("buffered-parallel", _policy("parallel", mode="buffered"), note="parallel; buffered stream"),
    Case("plain", _policy(), stream=False, note="before; not streamed"),
    Case("plain-parallel", _policy("parallel"), stream=False, note="parallel; not streamed"),
    Case("audit-parallel", _policy("parallel", mode="audit"), note="parallel; audit (answer never held)"),
]


# ------------------------------------------------------------------- running ----

@dataclass
class Sample:
    ttft: float
    stall: float
    total: float
    chars: int
    arrivals: list[tuple[float, int]]  # (when, chars received so far)
    tag: str


async def one_request(client: httpx.AsyncClient, url: str, key: str, tag: str, stream: bool) -> Sample:
    body = {"model": "m", "stream": stream,
            "messages": [{"role": "user", "content": f"[req-{tag}] How do rivers shape the land around them?"}]}
    headers = {"authorization": f"Bearer {key}"}
    started = time.monotonic()
    arrivals: list[tuple[float, int]] = []
    got = 0
    if not stream:
        r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        now = time.monotonic()
        got = len(r.json()["choices"][0]["message"]["content"] or "")
        return Sample(now - started, 0.0, now - started, got, [(now, got)], tag)
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in orjson.loads(line[6:]).get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    got += len(piece)
                    arrivals.append((time.monotonic(), got))
    end = time.monotonic()
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    return Sample(arrivals[0][0] - started if arrivals else math.nan, max(gaps, default=0.0), end - started, got,
                  arrivals, tag)


def held_back_peak(sent: list[tuple[float, int]], arrivals: list[tuple[float, int]]) -> int:
    """Most characters the upstream had sent that the client did not have yet."""
    peak, j, received = 0, 0, 0
    for when, total in sent:
        while j < len(arrivals) and arrivals[j][0] <= when:
            received = arrivals[j][1]
            j += 1
        peak = max(peak, total - received)
    return peak


async def run_case(case: Case, url: str, key: str, requests: int, concurrency: int) -> list[Sample]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def go(i: int) -> Sample:
            async with limit:
                return await one_request(client, url, key, f"{case.name}-{i}", case.stream)
        return list(await asyncio.gather(*(go(i) for i in range(requests))))


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per case")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=50.0, help="upstream tokens per second")
    parser.add_argument("--ttft-ms", default="300,800", help="upstream time to first token, uniform in [lo,hi]")
    parser.add_argument("--answer-tokens", type=int, default=250)
    parser.add_argument("--only", default="", help="comma-separated case names (direct is always run)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    lo, hi = (float(x) / 1000 for x in args.ttft_ms.split(","))
    rng = random.Random(args.seed)
    guard, upstream = GuardModel(rng), UpstreamModel(rng, (lo, hi), args.rate, args.answer_tokens)
    wanted = {n for n in args.only.split(",") if n}
    cases = [c for c in CASES if not wanted or c.name in wanted or not c.policy]

    guard_server = ServerThread(guard_app(guard)).start()
    upstream_server = ServerThread(upstream_app(upstream)).start()
    tmp = Path(tempfile.mkdtemp(prefix="guardgate-latency-"))
    (tmp / "policies").mkdir()
    (tmp / "policies" / "default.yaml").write_text("strictness: moderate\n")
    for i, case in enumerate(cases):
        if case.policy:
            (tmp / "policies" / f"{case.name}.yaml").write_text(
                f"tenant: {case.name}\napi_keys: [bench-key-{i:04d}]\n" + case.policy)
    config = {"upstream": {"base_url": f"{upstream_server.url}/v1", "api_key": "sk-bench"},
              "guard": {"base_url": f"{guard_server.url}/v1", "timeout_s": 60},
              "policies_dir": "policies", "policies_reload_s": 0, "server": {"log_level": "warning"}}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway_server = ServerThread(create_app(load_config(tmp / "gateway.yaml"))).start()

    print(f"upstream: TTFT {lo * 1000:.0f}-{hi * 1000:.0f} ms, {args.rate:g} tokens/s, {args.answer_tokens} tokens "
          f"(~{args.answer_tokens * CHARS_PER_TOKEN} chars); guard stand-in: {DECODE_TOKENS_PER_S:g} tokens/s decode, "
          f"reasoning {REASONING_TOKENS[0]}/{REASONING_TOKENS[1]} tokens p50/p95; "
          f"{args.requests} requests per case, {args.concurrency} at a time. No GPU was measured.\n")
    results: dict[str, list[Sample]] = {}
    try:
        for i, case in enumerate(cases):
            url = gateway_server.url if case.policy else upstream_server.url
            results[case.name] = asyncio.run(run_case(case, url, f"bench-key-{i:04d}", args.requests,
                                                      args.concurrency))
    finally:
        gateway_server.stop()
        guard_server.stop()
        upstream_server.stop()

    base = {True: results["direct"], False: results["direct-plain"]}
    print("| case | + time to first token | longest stall | + total | guard calls | held back at peak | policy |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        samples = results[case.name]
        b = base[case.stream]
        calls = [len(guard.calls.get(s.tag, [])) for s in samples]
        held = [held_back_peak(upstream.sent.get(s.tag, []), s.arrivals) for s in samples]
        if not case.policy:
            print(f"| {case.name} | {med([s.ttft for s in samples]):.2f} s (itself) | "
                  f"{med([s.stall for s in samples]):.2f} s | {med([s.total for s in samples]):.2f} s (itself) | "
                  f"0 | {med([float(h) for h in held]):.0f} | {case.note} |")
            continue
        print(f"| {case.name} | +{med([s.ttft for s in samples]) - med([s.ttft for s in b]):.2f} s | "
              f"{med([s.stall for s in samples]):.2f} s (max {max(s.stall for s in samples):.2f}) | "
              f"+{med([s.total for s in samples]) - med([s.total for s in b]):.2f} s | "
              f"{med([float(c) for c in calls]):.0f} | {med([float(h) for h in held]):.0f} chars | {case.note} |")
    on = [d for c in guard.calls.values() for _, d, r in c if r]
    off = [d for c in guard.calls.values() for _, d, r in c if not r]
    for name, values in (("on", on), ("off", off)):
        if values:
            ordered = sorted(values)
            print(f"\nguard calls with reasoning {name}: {len(values)}, p50 {med(values):.2f} s, "
                  f"p95 {ordered[int(0.95 * (len(ordered) - 1))]:.2f} s", end="")
    print()
    incomplete = [c.name for c in cases if any(s.chars != args.answer_tokens * CHARS_PER_TOKEN
                                               for s in results[c.name])]
    if incomplete:
        print(f"\nincomplete answers in: {', '.join(incomplete)}")


if __name__ == "__main__":
    main()
