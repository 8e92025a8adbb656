"""A do-nothing proxy on the gateway's own stack (uvicorn + Starlette + the gateway's pooled HTTP client).

The benchmarks measure it beside the gateway: what any proxy on this stack adds, so the gateway's figures
can be read as "the stack's hop" plus "GuardGate's own work".

    UPSTREAM=http://127.0.0.1:PORT uvicorn floor_proxy:app --app-dir bench
"""

import os

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.http import PooledHTTP

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000")
http = PooledHTTP(timeout=httpx.Timeout(600, connect=10), max_connections=256,
                  headers={"content-type": "application/json"})


async def chat(request: Request) -> Response:
    upstream = await http.request("POST", f"{UPSTREAM}/v1/chat/completions", content=await request.body())
    return Response(upstream.content, status_code=upstream.status_code, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b"ok")


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/healthz", healthz)])
