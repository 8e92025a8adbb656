"""Several guard servers for one backend: round robin, failover, cooldown, readiness."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest
import uvicorn

from gateway.config import GuardConfig
from gateway.guard.base import GuardError, GuardInput
from gateway.guard.endpoints import Endpoints, served_model_check
from gateway.guard.flexguard import FlexGuard
from tests.conftest import closed_port
from tests.standins import GuardBehaviour, ServerThread, guard_app

MODEL = GuardBehaviour().model
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Now classify the following content according "
                                                                 "to the guidelines above:\n[User]: hi"}]}


class Clock:
    """A monotonic clock the test moves by hand, so cooldowns take no real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ServerOnPort(ServerThread):
    """A ServerThread on a given port: a guard server that comes back where it was."""

    def __init__(self, app: Any, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)


@pytest.fixture
def two_guards():
    behaviours = [GuardBehaviour(), GuardBehaviour()]
    servers = [ServerThread(guard_app(b)).start() for b in behaviours]
    yield behaviours, servers
    for s in servers:
        if s.thread.is_alive():
            s.stop()


def endpoints(servers_or_urls: list, clock: Clock | None = None, **kw: Any) -> Endpoints:
    urls = [s if isinstance(s, str) else f"{s.url}/v1" for s in servers_or_urls]
    return Endpoints(urls, timeout_s=kw.pop("timeout_s", 2.0), max_concurrency=8, cooldown_s=10.0,
                     clock=clock or Clock(), **kw)


def test_requests_are_spread_round_robin(two_guards):
    (a, b), servers = two_guards

    async def run():
        eps = endpoints(servers)
        try:
            for _ in range(6):
                data = await eps.post_json("/chat/completions", CHAT)
                assert data["object"] == "chat.completion"
        finally:
            await eps.aclose()

    asyncio.run(run())
    assert len(a.requests) == 3 and len(b.requests) == 3


def test_a_killed_server_is_taken_out_and_tried_again_after_the_cooldown(two_guards):
    (a, b), servers = two_guards
    clock = Clock()
    port = servers[0].port

    async def run():
        eps = endpoints(servers, clock)
        try:
            await eps.post_json("/chat/completions", CHAT)  # a: opens a keep-alive connection
            servers[0].stop()
            for _ in range(4):  # the one that hits the dead server is retried on b
                await eps.post_json("/chat/completions", CHAT)
            assert eps.healthy() == [False, True]
            assert len(b.requests) == 4

            clock.now += 10.1  # cooldown over: a takes its turn again, fails, the request goes to b
            await eps.post_json("/chat/completions", CHAT)
            assert eps.healthy() == [False, True] and len(b.requests) == 5

            again = GuardBehaviour()
            revived = ServerOnPort(guard_app(again), port).start()
            try:
                clock.now += 10.1
                for _ in range(4):
                    await eps.post_json("/chat/completions", CHAT)
                assert eps.healthy() == [True, True]
                assert len(again.requests) == 2 and len(b.requests) == 7
            finally:
                revived.stop()
        finally:
            await eps.aclose()

    asyncio.run(run())


def test_a_5xx_server_is_retried_elsewhere_then_comes_back_when_healthy(two_guards):
    (a, b), servers = two_guards
    clock = Clock()
    a.failure = "500"

    async def run():
        eps = endpoints(servers, clock)
        try:
            for _ in range(3):
                await eps.post_json("/chat/completions", CHAT)
            assert len(a.requests) == 1 and len(b.requests) == 3  # a once, then out
            a.failure = None
            await eps.post_json("/chat/completions", CHAT)
            assert len(a.requests) == 1  # still cooling down
            clock.now += 10.1
            await eps.post_json("/chat/completions", CHAT)
            await eps.post_json("/chat/completions", CHAT)
            assert len(a.requests) == 2 and eps.healthy() == [True, True]
        finally:
            await eps.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("failure,kind", [("down", "unreachable"), ("500", "bad_status"), ("slow", "timeout")])
def test_all_servers_failing_is_a_guard_error_of_the_right_kind(two_guards, failure, kind):
    behaviours, servers = two_guards
    urls = [f"http://127.0.0.1:{closed_port()}/v1"] * 2 if failure == "down" else servers
    for b in behaviours:
        b.failure, b.slow_s = (failure, 0.8) if failure != "down" else (None, 0)

    async def run():
        eps = endpoints(urls, timeout_s=0.3)
        try:
            with pytest.raises(GuardError) as e:
                await eps.post_json("/chat/completions", CHAT)
            assert e.value.kind == kind
            assert eps.healthy() == [False, False]
            with pytest.raises(GuardError) as e:  # all down: still tried, still failing
                await eps.post_json("/chat/completions", CHAT)
            assert e.value.kind == kind
        finally:
            await eps.aclose()

    asyncio.run(run())


def test_a_lone_server_that_failed_once_is_not_locked_out(two_guards):
    (a, _), servers = two_guards
    a.failure = "500"

    async def run():
        eps = endpoints(servers[:1])
        try:
            with pytest.raises(GuardError):
                await eps.post_json("/chat/completions", CHAT)
            a.failure = None
            assert (await eps.post_json("/chat/completions", CHAT))["object"] == "chat.completion"
            assert eps.healthy() == [True]
        finally:
            await eps.aclose()

    asyncio.run(run())


def test_a_4xx_is_the_requests_fault_not_retried_and_the_server_stays_in(two_guards):
    (a, b), servers = two_guards

    async def run():
        eps = endpoints(servers)
        try:
            with pytest.raises(GuardError) as e:
                await eps.post_json("/chat/completions", {**CHAT, "model": "not-served"})
            assert e.value.kind == "bad_status"
            assert eps.healthy() == [True, True]
        finally:
            await eps.aclose()

    asyncio.run(run())
    assert len(a.requests) + len(b.requests) == 1


def test_ready_counts_healthy_servers_and_marks_them(two_guards):
    (a, b), servers = two_guards
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    clock = Clock()

    async def run():
        check = served_model_check(MODEL)
        eps = endpoints([dead, servers[1]], clock)
        try:
            assert await eps.ready("/models", check) == (
                True, "ok (1/2 endpoints; endpoint 1: guard unreachable (ConnectError))")
            assert eps.healthy() == [False, True]
        finally:
            await eps.aclose()
        both = endpoints(servers, clock)
        try:
            assert await both.ready("/models", check) == (True, "ok")
            a.failure = "500"
            await both.post_json("/chat/completions", CHAT)  # a fails, b answers
            assert both.healthy() == [False, True]
            a.failure = None
            assert await both.ready("/models", check) == (True, "ok")
            assert both.healthy() == [True, True]  # ready() brought it back before the cooldown
        finally:
            await both.aclose()
        none = endpoints([dead, dead])
        try:
            ok, detail = await none.ready("/models", check)
            assert not ok and detail.startswith("no guard endpoint ready (endpoint 1: guard unreachable")
        finally:
            await none.aclose()
        wrong = endpoints(servers[:1])
        try:
            assert await wrong.ready("/models", served_model_check("other")) == (
                False, "guard does not serve model other")
        finally:
            await wrong.aclose()

    asyncio.run(run())


def test_flexguard_with_two_base_urls_spreads_its_calls_over_both(two_guards):
    (a, b), servers = two_guards
    config = GuardConfig(base_url="http://127.0.0.1:1/v1", model=MODEL)

    async def run():
        guard = FlexGuard(config, base_urls=[f"{s.url}/v1" for s in servers])
        try:
            verdicts = await guard.score([GuardInput("prompt", f"question {i}") for i in range(8)])
            assert all(v.categories == ("SAFE",) for v in verdicts)
            assert await guard.ready() == (True, "ok")
        finally:
            await guard.aclose()

    asyncio.run(run())
    assert len(a.requests) == 4 and len(b.requests) == 4


def test_flexguard_keeps_scoring_when_one_of_its_servers_is_down(two_guards):
    (_, b), servers = two_guards
    config = GuardConfig(base_url="http://127.0.0.1:1/v1", model=MODEL)
    dead = f"http://127.0.0.1:{closed_port()}/v1"

    async def run():
        guard = FlexGuard(config, base_urls=[dead, f"{servers[1].url}/v1"])
        try:
            for i in range(3):
                assert (await guard.score([GuardInput("prompt", f"q{i}")]))[0].risk == 3
            assert guard.endpoints.healthy() == [False, True]
        finally:
            await guard.aclose()

    asyncio.run(run())
    assert len(b.requests) == 3


def test_flexguard_without_base_urls_uses_the_config_url():
    guard = FlexGuard(GuardConfig(base_url="http://127.0.0.1:1/v1/"))
    assert guard.endpoints.urls == ["http://127.0.0.1:1/v1"] and guard.base_url == "http://127.0.0.1:1/v1"
    two = FlexGuard(GuardConfig(base_url="http://127.0.0.1:1/v1"), base_urls=["http://a/v1", "http://b/v1"])
    assert two.identity == guard.identity  # the servers share cached verdicts


def test_endpoint_logs_never_show_credentials_in_a_url(caplog):
    import logging

    from gateway.guard.endpoints import Endpoints
    from tests.conftest import closed_port

    caplog.set_level(logging.INFO)
    port = closed_port()
    endpoints = Endpoints([f"http://user:s3cret-pw@127.0.0.1:{port}/v1"], timeout_s=1, max_concurrency=2)
    with pytest.raises(GuardError):
        asyncio.run(endpoints.post_json("/chat/completions", {"x": 1}))
    asyncio.run(endpoints.aclose())
    down = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "guard_endpoint_down"]
    assert down and down[0]["endpoint"] == f"http://***@127.0.0.1:{port}/v1"
    assert "s3cret-pw" not in caplog.text


class FirstConnectionDropped:
    """A raw HTTP/1.1 server on loopback: the first connection reads one request and closes without an
    answer (a stale pooled connection); every later one answers 200 with `answer`, keeping the socket."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn, self.connections), daemon=True).start()

    def _handle(self, conn: socket.socket, n: int) -> None:
        with conn:
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(65536)
                if n == 1:
                    return  # dropped without an answer
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(self.answer)).encode() + b"\r\n\r\n" + self.answer)

    def close(self) -> None:
        self.sock.close()


def test_a_lone_server_dropping_a_stale_connection_is_retried_once_on_a_fresh_one():
    server = FirstConnectionDropped(b'{"object": "chat.completion"}')

    async def run():
        eps = endpoints([server.url])
        try:
            assert (await eps.post_json("/chat/completions", CHAT))["object"] == "chat.completion"
            assert eps.healthy() == [True]  # not marked down for a stale connection
        finally:
            await eps.aclose()

    try:
        asyncio.run(run())
    finally:
        server.close()
    assert server.connections == 2
