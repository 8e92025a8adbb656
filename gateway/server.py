"""The HTTP server: uvicorn with httptools, plus the limits a hostile client must meet before any of our
code runs. uvicorn offers the idle keep-alive timeout; header size and count limits (431), header and body
read timeouts (408) and a connection cap (503 `overloaded`) are added here, in its protocol class.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway import access
from gateway.config import GatewayConfig, ServerConfig
from gateway.errors import ClientError, GatewayError, Overloaded

log = logging.getLogger("guardgate.server")


def _raw_response(error: GatewayError) -> bytes:
    body = error.body()
    head = [f"HTTP/1.1 {error.status} {_REASONS[error.status]}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{k}: {v}" for k, v in error.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class LimitedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with per-connection limits (`limits` is set by `protocol_class`)."""

    limits: ServerConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_headers = True  # reading a request's head: its size and time are limited
        self._head_bytes = 0  # bytes received while reading the head (an upper bound of its size)
        self._head_count = 0
        self._closed_by_limit = False
        self._read_timer: asyncio.TimerHandle | None = None

    # ----- timers -----

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out, why)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self, why: str) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started
        if why == "idle" or started:
            self.transport.close()  # nothing was asked, or an answer is already under way: just hang up
            return
        log.info("client too slow", extra={"fields": {"event": "client_timeout", "reading": why}})
        self._refuse(ClientError(408, f"The request {why} did not arrive within the server's timeout.",
                                 code="request_timeout"))

    def _refuse(self, error: GatewayError) -> None:
        self._closed_by_limit = True
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(error))
            self.transport.close()

    # ----- the protocol -----

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection refused: at the connection limit", extra={"fields": {
                "event": "overloaded", "limit": "max_connections", "value": self.limits.max_connections}})
            self._refuse(Overloaded())
            return
        self._arm(self.limits.header_timeout_s, "idle")  # a first request must begin, and then finish its head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closed_by_limit:
            return
        if self._in_headers:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after each read, not once the head is complete: a head is never held whole past the limit.
        if self._in_headers and not self._closed_by_limit and self._head_bytes > self.limits.max_header_bytes:
            self._too_large()

    def _too_large(self) -> None:
        log.info("request head too large", extra={"fields": {"event": "client_refused", "status": 431}})
        self._refuse(ClientError(431, f"The request's headers exceed {self.limits.max_header_bytes} bytes or "
                                      f"{self.limits.max_headers} fields.", code="request_header_fields_too_large"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._head_count = 0
        self._arm(self.limits.header_timeout_s, "headers")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._closed_by_limit:
            return
        if self._head_count > self.limits.max_headers:
            self._too_large()
            return
        self._in_headers = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()
        if self.parser.get_method() not in (b"GET", b"HEAD"):
            self._arm(self.limits.body_timeout_s, "body")

    def on_body(self, body: bytes) -> None:
        if self._read_timer is not None:
            self._arm(self.limits.body_timeout_s, "body")  # the limit is on silence, not on the whole upload
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._in_headers = True
        self._head_bytes = 0
        super().on_response_complete()  # arms uvicorn's keep-alive timeout


class InFlightLimit:
    """ASGI middleware: at most `limit` requests to the API paths at once (a stream counts until it ends);
    past that, 503 `overloaded` with Retry-After. Health checks are never refused."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            ctx = access.current()
            if ctx is not None:
                ctx.outcome = "overloaded"
            log.warning("request refused: at the in-flight limit", extra={"fields": {
                "event": "overloaded", "limit": "max_in_flight", "value": self.limit}})
            await Overloaded().response()(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def protocol_class(limits: ServerConfig) -> type[LimitedHttpTools]:
    return type("GuardGateHttp", (LimitedHttpTools,), {"limits": limits})


def uvicorn_config(app: ASGIApp, config: GatewayConfig, *, host: str | None = None, port: int | None = None,
                   **overrides: Any) -> uvicorn.Config:
    s = config.server
    options: dict[str, Any] = {
        "host": host or s.host, "port": port or s.port, "http": protocol_class(s),
        "timeout_keep_alive": s.keep_alive_timeout_s, "log_config": None, "access_log": False,
        "server_header": False, "lifespan": "on", **overrides}  # our JSON logs: one decision line per request
    return uvicorn.Config(app, **options)
