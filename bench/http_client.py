"""The gateway's HTTP client engines compared on one stand-in upstream, interleaved, in one run.

    python bench/http_client.py [--requests 3000] [--rounds 3] [--concurrency 1,16,64]

Engines, each behind the same call (`request(method, url, content=…, stream=…)` → a response whose body
has been read):
  httpx          httpx's pooled transport (httpcore), as the gateway used it before
  httpx-aiohttp  the `httpx-aiohttp` package's AiohttpTransport under the same httpx calls
  aiohttp        aiohttp's ClientSession alone (no httpx objects at all): the engine's floor
  gateway        gateway.http.PooledHTTP: aiohttp's pool behind httpx.Response (what the gateway runs)

The client runs on uvloop, as the gateway does under uvicorn; the upstream is `tests.standins` in its own
process. Reported per engine: req/s and the client process's CPU per request (the engine's cost; the
upstream's own CPU is not counted), plain and streamed (an SSE answer of ~30 events). Read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import free_port, wait_ready  # noqa: E402

from gateway.http import PooledHTTP  # noqa: E402

BODY = b'{"model":"m","messages":[{"role":"user","content":"What is the capital of France?"}]}'
STREAM_BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"What is the capital of France, and why?"}]}'
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
TIMEOUT = httpx.Timeout(30.0, connect=5.0)

Send = Callable[[bytes, bool], Awaitable[int]]


class HttpxEngine:
    """What gateway/http.py was: httpx's pooled transport called directly."""

    def __init__(self, url: str, limit: int, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.transport = transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))

    async def send(self, body: bytes, stream: bool) -> int:
        request = httpx.Request("POST", self.url, content=body, headers=HEADERS,
                                extensions={"timeout": TIMEOUT.as_dict()})
        response = await self.transport.handle_async_request(request)
        response.request = request
        try:
            if stream:
                async for _ in response.aiter_bytes():
                    pass
            else:
                await response.aread()
        finally:
            await response.aclose()
        return response.status_code

    async def aclose(self) -> None:
        await self.transport.aclose()


class HttpxAiohttpEngine(HttpxEngine):
    def __init__(self, url: str, limit: int) -> None:
        from httpx_aiohttp import AiohttpTransport

        super().__init__(url, limit, AiohttpTransport(
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)))


class AiohttpEngine:
    def __init__(self, url: str, limit: int) -> None:
        self.url, self.limit = url, limit
        self.session: aiohttp.ClientSession | None = None

    async def send(self, body: bytes, stream: bool) -> int:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.limit),
                                                 cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
        async with self.session.post(self.url, data=body, headers=HEADERS, allow_redirects=False,
                                     timeout=aiohttp.ClientTimeout(sock_connect=5, sock_read=30)) as resp:
            if stream:
                async for _ in resp.content.iter_any():
                    pass
            else:
                await resp.read()
            return resp.status

    async def aclose(self) -> None:
        if self.session:
            await self.session.close()


class GatewayEngine:
    def __init__(self, url: str, limit: int) -> None:
        self.url = url
        self.http = PooledHTTP(timeout=TIMEOUT, max_connections=limit, headers=HEADERS)

    async def send(self, body: bytes, stream: bool) -> int:
        response = await self.http.request("POST", self.url, content=body, stream=stream)
        if stream:
            try:
                async for _ in response.aiter_bytes():
                    pass
            finally:
                await response.aclose()
        return response.status_code

    async def aclose(self) -> None:
        await self.http.aclose()


ENGINES = {"httpx": HttpxEngine, "httpx-aiohttp": HttpxAiohttpEngine, "aiohttp": AiohttpEngine,
           "gateway": GatewayEngine}


async def drive(engine_name: str, url: str, n: int, concurrency: int, stream: bool) -> tuple[float, float]:
    """(req/s, client CPU ms per request) for n requests kept `concurrency` in flight."""
    engine = ENGINES[engine_name](url, max(concurrency, 1))
    body = STREAM_BODY if stream else BODY
    try:
        for _ in range(min(50, n)):  # warm the pool
            await engine.send(body, stream)
        left = iter(range(n))

        async def worker() -> None:
            for _ in left:
                status = await engine.send(body, stream)
                assert status == 200, status

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return n / wall, cpu * 1000 / n
    finally:
        await engine.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    engines = args.engines.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.standins", "upstream", str(port)], env=env, cwd=REPO)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, httpx {httpx.__version__}, "
              f"aiohttp {aiohttp.__version__}; {args.requests} requests per cell, median of {args.rounds} rounds")
        for stream in (False, True):
            for c in levels:
                results: dict[str, list[tuple[float, float]]] = {e: [] for e in engines}
                for r in range(args.rounds):  # interleaved: every engine once per round, the order rotating
                    for e in engines[r % len(engines):] + engines[:r % len(engines)]:
                        results[e].append(uvloop.run(drive(e, url, args.requests, c, stream)))
                base_rps = statistics.median(x[0] for x in results[engines[0]])
                base_cpu = statistics.median(x[1] for x in results[engines[0]])
                print(f"\n{'streamed' if stream else 'plain'}, {c} in flight")
                for e in engines:
                    rps = statistics.median(x[0] for x in results[e])
                    cpu = statistics.median(x[1] for x in results[e])
                    print(f"  {e:14} {rps:8.0f} req/s ({rps / base_rps:4.2f}x)   client CPU {cpu:6.3f} ms/req "
                          f"({cpu / base_cpu:4.2f}x)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
