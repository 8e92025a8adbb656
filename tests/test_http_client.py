"""The pooled HTTP client (aiohttp underneath, httpx's API on top) against real loopback servers: what the
gateway relies on — streaming as it arrives, pooling within the limit, httpx's timeouts and errors,
cancellation that drops the connection, no cookies, and the upstream's 504 for an answer past its timeout."""

from __future__ import annotations

import asyncio
import gzip
import time

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.http import PooledHTTP
from tests.conftest import closed_port
from tests.standins import ServerThread

PEERS: set[tuple[str, int]] = set()
STREAM_CLOSED: list[float] = []


async def echo(request: Request) -> Response:
    PEERS.add((request.client.host, request.client.port))
    body = await request.body()
    return Response(body, headers={"x-cookie": request.headers.get("cookie", ""),
                                   "x-ua": request.headers.get("user-agent", ""),
                                   "set-cookie": "affinity=1; Path=/"})


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return Response(b"late")


async def ticks(request: Request) -> Response:
    async def gen():
        try:
            for i in range(int(request.query_params.get("n", "5"))):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(float(request.query_params.get("every", "0.2")))
        finally:
            STREAM_CLOSED.append(time.monotonic())
    return StreamingResponse(gen(), media_type="text/event-stream")


async def gzipped(request: Request) -> Response:
    return Response(gzip.compress(b'{"ok": true}'), headers={"content-encoding": "gzip"},
                    media_type="application/json")


@pytest.fixture(scope="module")
def server():
    s = ServerThread(Starlette(routes=[Route("/echo", echo, methods=["POST", "GET"]), Route("/slow", slow),
                                       Route("/ticks", ticks), Route("/gzip", gzipped)])).start()
    yield s
    s.stop()


def run(coro):
    return asyncio.run(coro)


def client(**kw) -> PooledHTTP:
    return PooledHTTP(timeout=kw.pop("timeout", httpx.Timeout(5.0)), max_connections=kw.pop("max_connections", 8),
                      **kw)


def test_a_plain_request_is_read_whole_with_the_headers_merged(server):
    async def go():
        http = client(headers={"authorization": "Bearer k"})
        try:
            r = await http.request("POST", f"{server.url}/echo", content=b"hello", headers={"x-a": "1"})
            return r.status_code, r.content, r.headers
        finally:
            await http.aclose()
    status, content, headers = run(go())
    assert status == 200 and content == b"hello"
    assert headers["set-cookie"] == "affinity=1; Path=/"  # passed up as a header; what the caller does with it is its own
    assert headers["x-ua"] == ""  # no client identity added


def test_no_cookie_jar_a_set_cookie_is_never_sent_back(server):
    async def go():
        http = client()
        try:
            await http.request("POST", f"{server.url}/echo", content=b"a")
            return (await http.request("POST", f"{server.url}/echo", content=b"b")).headers["x-cookie"]
        finally:
            await http.aclose()
    assert run(go()) == ""


def test_a_gzipped_body_is_decoded(server):
    async def go():
        http = client()
        try:
            return (await http.request("GET", f"{server.url}/gzip")).content
        finally:
            await http.aclose()
    assert run(go()) == b'{"ok": true}'


def test_connections_are_pooled_and_never_more_than_the_limit(server):
    PEERS.clear()

    async def go():
        http = client(max_connections=3)
        try:
            await asyncio.gather(*(http.request("POST", f"{server.url}/echo", content=b"x") for _ in range(60)))
        finally:
            await http.aclose()
    run(go())
    assert 1 <= len(PEERS) <= 3


def test_a_stream_arrives_event_by_event_not_at_the_end(server):
    async def go():
        http = client()
        try:
            r = await http.request("GET", f"{server.url}/ticks?n=4&every=0.2", stream=True)
            t0, arrivals = time.monotonic(), []
            async for chunk in r.aiter_bytes():
                arrivals.append((round(time.monotonic() - t0, 1), chunk))
            await r.aclose()
            return arrivals
        finally:
            await http.aclose()
    arrivals = run(go())
    assert b"".join(c for _, c in arrivals) == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert arrivals[0][0] < 0.15 and len(arrivals) >= 4  # the first event came before the last was made


def test_closing_a_stream_early_drops_the_connection_and_the_server_sees_it(server):
    STREAM_CLOSED.clear()

    async def go():
        http = client()
        try:
            r = await http.request("GET", f"{server.url}/ticks?n=100&every=0.05", stream=True)
            async for _ in r.aiter_bytes():
                break
            await r.aclose()
            closed_at = time.monotonic()
            for _ in range(40):
                if STREAM_CLOSED:
                    break
                await asyncio.sleep(0.05)
            return closed_at
        finally:
            await http.aclose()
    closed_at = run(go())
    assert STREAM_CLOSED and STREAM_CLOSED[0] - closed_at < 1.5


def test_cancelling_a_waiting_request_leaves_the_pool_usable(server):
    async def go():
        http = client(max_connections=1)
        try:
            task = asyncio.create_task(http.request("GET", f"{server.url}/slow?s=5"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The one connection slot is free again.
            return (await asyncio.wait_for(http.request("POST", f"{server.url}/echo", content=b"ok"), 3)).content
        finally:
            await http.aclose()
    assert run(go()) == b"ok"


def test_a_late_answer_is_httpx_read_timeout(server):
    async def go():
        http = client(timeout=httpx.Timeout(0.3))
        try:
            t0 = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await http.request("GET", f"{server.url}/slow?s=3")
            return time.monotonic() - t0
        finally:
            await http.aclose()
    assert run(go()) < 2


def test_a_silent_stream_times_out_per_read(server):
    async def go():
        http = client(timeout=httpx.Timeout(0.3))
        try:
            r = await http.request("GET", f"{server.url}/ticks?n=3&every=2", stream=True)
            with pytest.raises(httpx.ReadTimeout):
                async for _ in r.aiter_bytes():
                    pass
            await r.aclose()
        finally:
            await http.aclose()
    run(go())


def test_a_refused_connection_is_httpx_connect_error():
    async def go():
        http = client()
        try:
            with pytest.raises(httpx.ConnectError):
                await http.request("GET", f"http://127.0.0.1:{closed_port()}/x")
        finally:
            await http.aclose()
    run(go())


def test_an_upstream_past_its_timeout_is_a_504(make_gateway, guard, upstream):
    upstream.answer_delay_s = 3
    gw = make_gateway(upstream={"timeout_s": 0.3})
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 504 and e.value.code == "upstream_timeout"
    assert time.monotonic() - t0 < 2.5
