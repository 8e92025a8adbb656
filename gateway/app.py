"""The Starlette app: routes, lifespan (pooled clients, policies), and OpenAI-shaped errors for everything."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import access, metrics
from gateway.access import AccessLog
from gateway.cache import VerdictCache
from gateway.config import GatewayConfig
from gateway.errors import error_response
from gateway.guard import build_guard
from gateway.logs import logs_off_the_loop
from gateway.moderation_api import moderations
from gateway.pipeline import Gateway, bearer_token
from gateway.policy.store import PolicyStore
from gateway.server import InFlightLimit
from gateway.upstream import build_upstream

log = logging.getLogger("guardgate")

SERVED = "GuardGate serves POST /v1/chat/completions, POST /v1/moderations, GET /v1/models, GET /v1/models/{id}, GET /healthz and GET /readyz."


def build_gateway(config: GatewayConfig) -> Gateway:
    c = config.cache
    cache = VerdictCache(c.redis_url.get_secret_value() if c.redis_url else None, ttl_s=c.ttl_s,
                         local_size=c.local_size, local_ttl_s=c.local_ttl_s, redis_timeout_s=c.redis_timeout_s,
                         retry_after_s=c.retry_after_s)
    return Gateway(
        guard=build_guard(config.guard),
        cache=cache,
        upstream=build_upstream(config),
        policies=PolicyStore(config.policies_dir, config.policies_reload_s, allow_open=config.server.allow_open),
        max_body_bytes=config.server.max_body_bytes,
    )


def create_app(config: GatewayConfig) -> Starlette:
    # Policies are read now, so that a bad policy fails the start rather than the first request.
    gateway = build_gateway(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        watcher = asyncio.create_task(gateway.policies.watch()) if config.policies_reload_s else None
        gateway.cache.start()
        try:
            with logs_off_the_loop():
                yield
        finally:
            if watcher:
                watcher.cancel()
            await gateway.cache.aclose()
            await gateway.guard.aclose()
            await gateway.upstream.aclose()

    async def chat_completions(request: Request) -> Response:
        return await gateway.chat_completions(request)

    async def moderate(request: Request) -> Response:
        return await moderations(gateway, request)

    async def models(request: Request) -> Response:
        return await gateway.models(request)

    async def model(request: Request) -> Response:
        ctx = access.current()
        if ctx is not None:
            ctx.model = request.path_params["model_id"]
        return await gateway.model(request, request.path_params["model_id"])

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        # For load balancers and strangers alike: ready or not, nothing else.
        ready, _ = await gateway.readiness()
        return Response(b'{"status":"ready"}' if ready else b'{"status":"not ready"}',
                        status_code=200 if ready else 503, media_type="application/json")

    admin_key = config.server.admin_key.get_secret_value().encode() if config.server.admin_key else None

    def refused_admin(request: Request, what: str) -> Response | None:
        """None for a request carrying the admin key; else the 404 (no admin key set) or 401 to answer."""
        if admin_key is None:
            return error_response(404, f"{what} is off: set server.admin_key in the gateway config.",
                                  code="unknown_url")
        token = (bearer_token(request) or "").encode()
        if not hmac.compare_digest(hashlib.sha256(token).digest(), hashlib.sha256(admin_key).digest()):
            return error_response(401, "Send the gateway's server.admin_key as 'Authorization: Bearer <key>'.",
                                  code="invalid_api_key")
        return None

    async def admin_readiness(request: Request) -> Response:
        refused = refused_admin(request, "The admin view")
        if refused is not None:
            return refused
        ready, checks = await gateway.readiness()
        # pid: which worker process answered (with server.workers > 1, each keeps its own counters).
        body = {"status": "ready" if ready else "not ready", "pid": os.getpid(), "checks": checks}
        return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")

    async def prometheus(request: Request) -> Response:
        refused = refused_admin(request, "GET /metrics")
        if refused is not None:
            return refused
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # Starlette routes only HTTPException here
            return await internal_error(request, exc)
        if exc.status_code == 404:
            return error_response(404, f"Unknown request URL: {request.method} {request.url.path}. {SERVED}",
                                  code="unknown_url")
        if exc.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed on {request.url.path}. {SERVED}",
                                  code="method_not_allowed", headers=exc.headers)
        return error_response(exc.status_code, str(exc.detail))

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Our fault, not the client's: log it whole, answer without internals.
        log.error("unhandled error", exc_info=exc, extra={"fields": {"event": "internal_error",
                                                                     "path": request.url.path}})
        return error_response(500, "Internal gateway error.", type="server_error", code="internal_error")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/moderations", moderate, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            # :path, because model ids may hold slashes (meta-llama/Llama-3.1-8B-Instruct).
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/admin/readiness", admin_readiness, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        # AccessLog outermost: a request refused at the in-flight limit still gets its id, line and count.
        middleware=[Middleware(AccessLog, forward_headers=config.upstream.forward_headers if config.upstream else ()),
                    Middleware(InFlightLimit, limit=config.server.max_in_flight)],
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
