"""The upstream LLM: a byte-faithful OpenAI-compatible passthrough over one pooled httpx client."""

from __future__ import annotations

import httpx

from gateway.config import UpstreamConfig
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


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.base_url = str(config.base_url).rstrip("/")
        headers = dict(config.headers)
        if config.api_key is not None:
            # The gateway's own key: whatever the client sent as Authorization never goes upstream.
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self._http = PooledHTTP(timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
                                max_connections=config.max_connections, headers=headers)

    async def send(self, method: str, path: str, body: bytes | None = None, *, stream: bool = False) -> httpx.Response:
        """Send and return the response; with stream=True the body is left unread (caller closes it)."""
        headers = {"content-type": "application/json"} if body is not None else {}
        if stream:
            headers["accept"] = "text/event-stream"
        try:
            return await self._http.request(method, f"{self.base_url}{path}", content=body, headers=headers,
                                            stream=stream)
        except httpx.TimeoutException:
            raise UpstreamError(504, "The upstream model did not answer in time.", code="upstream_timeout") from None
        except httpx.HTTPError as e:
            raise UpstreamError(502, f"The upstream model could not be reached ({type(e).__name__}).",
                                code="upstream_unavailable") from None

    async def aclose(self) -> None:
        await self._http.aclose()
