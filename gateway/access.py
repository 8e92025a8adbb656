"""One request as the operator sees it: its id, the headers it may send upstream, its access line and its
request metrics.

`AccessLog` (ASGI middleware, outermost) opens a `RequestContext` for each request; code further in
reaches it through `current()` (a context variable, so no signature has to carry it): the moderation
report attaches itself, the upstream client adds the forwarded headers and its timing. When the answer
has been sent (a stream's last byte), the middleware writes one access line and counts the request.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics

if TYPE_CHECKING:
    from gateway.moderation import Report

log = logging.getLogger("guardgate.access")

# A client's X-Request-ID is kept when it is this: bounded, and nothing a log line or header could trip on.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Routes whose access lines are debug-level: probes and scrapes every few seconds would drown the rest.
_QUIET_ROUTES = frozenset({"healthz", "readyz", "metrics"})


def request_id_from(value: str | None) -> str:
    """The client's X-Request-ID when it is safe to reuse, else a new id."""
    if value and _CLIENT_REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


@dataclass
class RequestContext:
    request_id: str
    route: str
    forward_headers: dict[str, str] = field(default_factory=dict)  # sent upstream with every call
    tenant: str | None = None
    model: str | None = None
    report: Report | None = None
    upstream_ms: float = 0.0
    upstream_status: int | None = None
    outcome: str | None = None  # set where the outcome is known and not derivable (overloaded)


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("guardgate_request", default=None)


def current() -> RequestContext | None:
    """The request being served by this task, if any (None in the CLI and in code run outside a request)."""
    return _current.get()


def outcome_of(ctx: RequestContext, status: int) -> str:
    """What became of a request, for the access line and `guardgate_requests_total{outcome}`."""
    if ctx.outcome:
        return ctx.outcome
    if status == 499:
        return "disconnected"
    if status == 401:
        return "unauthorized"
    if status >= 500 and status not in (502, 503, 504):
        return "internal_error"
    report = ctx.report
    if report is not None:
        decisions = [d for record in report.stages.values() for d in record.decisions]
        prompt = report.stages.get("prompt")
        blocking = prompt is not None and any(d.outcome == "block" for d in prompt.decisions)
        if blocking and ctx.route == "chat_completions":  # a moderation answer that flags is no block
            return "blocked_prompt"
        if report.guard_errors:
            return "guard_error"
        if report.blocked_choices:
            return "answer_withheld"
        if report.upstream_error or (ctx.upstream_status or 0) >= 400:
            return "upstream_error"
        if status >= 400:
            return "client_error"
        if ctx.route == "chat_completions":
            return "flagged" if any(d.outcome == "flag" for d in decisions) else "allowed"
        return "served"
    if status in (502, 504) or (ctx.upstream_status or 0) >= 400:
        return "upstream_error"
    return "client_error" if status >= 400 else "served"


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class AccessLog:
    """ASGI middleware: request ids, forwarded headers, one access line and the request metrics per request."""

    def __init__(self, app: ASGIApp, forward_headers: Iterable[str] = ()) -> None:
        self.app = app
        self.forward = tuple(h.lower().encode("latin-1") for h in forward_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = scope["headers"]
        ctx = RequestContext(request_id_from(_header(headers, b"x-request-id")), metrics.route_of(scope["path"]))
        for name in self.forward:
            value = ctx.request_id if name == b"x-request-id" else _header(headers, name)
            if value is not None:
                ctx.forward_headers[name.decode("latin-1")] = value
        token = _current.set(ctx)
        status = 500  # unless the app answers
        stream_mode: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, stream_mode
            if message["type"] == "http.response.start":
                status = message["status"]
                out = []
                for k, v in message.get("headers", []):
                    if k.lower() == b"x-request-id":
                        if v.decode("latin-1") == ctx.request_id:
                            continue
                        k = b"x-upstream-request-id"  # the upstream's own id for this call, kept under its name
                    elif k.lower() == b"content-type" and v.startswith(b"text/event-stream"):
                        stream_mode = _header(message.get("headers", []), b"x-guard-stream-mode") or "unknown"
                    out.append((k, v))
                out.append((b"x-request-id", ctx.request_id.encode("latin-1")))
                message = {**message, "headers": out}
                if stream_mode is not None:
                    metrics.stream_started(stream_mode)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if stream_mode is not None:
                metrics.stream_ended(stream_mode)
            _current.reset(token)
            self._finish(ctx, scope["method"], status, time.perf_counter() - started)

    def _finish(self, ctx: RequestContext, method: str, status: int, seconds: float) -> None:
        report = ctx.report
        tenant = report.tenant if report is not None else ctx.tenant
        outcome = outcome_of(ctx, status)
        metrics.observe_request(tenant or "none", ctx.route, status, outcome, seconds)
        level = logging.DEBUG if ctx.route in _QUIET_ROUTES else logging.INFO
        if not log.isEnabledFor(level):
            return
        model = report.model if report is not None and report.model else ctx.model
        log.log(level, "access", extra={"fields": {
            "event": "access", "request_id": ctx.request_id, "method": method, "route": ctx.route,
            "tenant": tenant, "model": model[:200] if model else None, "status": status, "outcome": outcome,
            "total_ms": round(seconds * 1000, 1),
            "guard_ms": round(report.guard_ms, 1) if report is not None else 0.0,
            "upstream_ms": round(ctx.upstream_ms, 1)}})
