"""The upstream LLM: a byte-faithful OpenAI-compatible passthrough over one pooled httpx client, or (with
`models:` in the config) providers through LiteLLM (`upstream_litellm`)."""

from __future__ import annotations

import time
from typing import Protocol

import httpx

from gateway import access, metrics
from gateway.config import GatewayConfig, UpstreamConfig
from gateway.errors import UpstreamError
from gateway.http import PooledHTTP

# Headers that describe one hop or one encoding of the body, not the answer itself.
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "date", "server", "set-cookie", "proxy-authenticate", "trailer", "upgrade",
})


def response_headers(resp: httpx.Response) -> dict[str, str]:
    """The upstream's headers worth passing to the client."""
    # x-guard-* are ours alone: an upstream's own would pass for verdicts the gateway never gave.
    return {k: v for k, v in resp.headers.items()
            if k.lower() not in _NOT_FORWARDED and not k.lower().startswith("x-guard-")}


class UpstreamAPI(Protocol):
    """What the pipeline asks of an upstream: OpenAI's chat completions and model list, as HTTP responses."""

    def check_model(self, model: str | None) -> None: ...

    async def send(self, method: str, path: str, body: bytes | None = None, *,
                   stream: bool = False) -> httpx.Response: ...

    async def aclose(self) -> None: ...


def build_upstream(config: GatewayConfig) -> UpstreamAPI:
    if config.models:
        from gateway.upstream_litellm import LiteLLMUpstream  # imports litellm: only when models are configured
        return LiteLLMUpstream(config.models, config.router)
    assert config.upstream is not None  # the config requires one of the two
    return Upstream(config.upstream)


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.base_url = str(config.base_url).rstrip("/")
        headers = dict(config.headers)
        self._static = {k.lower() for k in headers} | {"authorization"}  # never replaced by a client's
        if config.api_key is not None:
            # The gateway's own key: whatever the client sent as Authorization never goes upstream.
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._http = PooledHTTP(timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
                                max_connections=config.max_connections, headers=headers)

    def check_model(self, model: str | None) -> None:
        """Any model: the upstream itself says which it serves."""

    async def send(self, method: str, path: str, body: bytes | None = None, *, stream: bool = False) -> httpx.Response:
        """Send and return the response; with stream=True the body is left unread (caller closes it).
        The request's allowed client headers (`upstream.forward_headers`, X-Request-ID) go along."""
        ctx = access.current()
        headers = {k: v for k, v in ctx.forward_headers.items() if k not in self._static} if ctx else {}
        if body is not None:
            headers["content-type"] = "application/json"
        if stream:
            headers["accept"] = "text/event-stream"
        started = time.perf_counter()
        status: int | None = None
        try:
            resp = await self._http.request(method, f"{self.base_url}{path}", content=body, headers=headers,
                                            stream=stream)
            status = resp.status_code
            return resp
        except httpx.TimeoutException:
            metrics.observe_upstream_error("upstream_timeout")
            raise UpstreamError(504, "The upstream model did not answer in time.", code="upstream_timeout") from None
        except httpx.HTTPError as e:
            metrics.observe_upstream_error("upstream_unavailable")
            raise UpstreamError(502, f"The upstream model could not be reached ({type(e).__name__}).",
                                code="upstream_unavailable") from None
        finally:
            seconds = time.perf_counter() - started
            metrics.observe_upstream(path, seconds, status)
            if ctx is not None:
                ctx.upstream_ms += seconds * 1000
                ctx.upstream_status = status

    async def aclose(self) -> None:
        await self._http.aclose()
