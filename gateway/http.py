"""One pooled HTTP/1.1 client per remote: aiohttp's connection pool behind httpx's response API.

The code above this module speaks httpx (`httpx.Response`, `httpx.Timeout`, `httpx.HTTPError` and its
subclasses); underneath, aiohttp does the work. httpx's own pool (httpcore) checks every pooled connection
on every request and writes head and body as two sends; under load that cost more CPU than the whole
gateway's own logic (see README, Performance). No cookie jar (an upstream's Set-Cookie on one client's
request must not ride along on other tenants' requests), no redirects, no auth flow, no added headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
import httpx

# Idle pooled connections are dropped before servers drop theirs (uvicorn's default is 5 s), so that a
# request rarely goes out on a connection the server is closing.
KEEPALIVE_S = 4.0
# Response head lines up to 64 KiB, as httpx allowed (aiohttp's own default is 8 KiB).
MAX_HEAD_LINE = 65536


def _mapped(e: BaseException) -> httpx.HTTPError:
    """aiohttp's error as the httpx error the callers handle."""
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(str(e) or "connect timeout")
    if isinstance(e, TimeoutError):  # aiohttp's SocketTimeoutError, or a plain asyncio timeout
        return httpx.ReadTimeout(str(e) or "read timeout")
    if isinstance(e, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(e))
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(str(e) or type(e).__name__)
    if isinstance(e, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(str(e))
    return httpx.ReadError(str(e) or type(e).__name__)  # payload cut short, reset, any other OS error


_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class _Body(httpx.AsyncByteStream):
    """An aiohttp response body as httpx reads it: chunks as they arrive (SSE events are not held back)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except _ERRORS as e:
            raise _mapped(e) from e

    async def aclose(self) -> None:
        if self._resp.content.at_eof():
            self._resp.release()  # read to the end: the connection goes back to the pool
        else:
            self._resp.close()  # cut short: the connection is dropped, never reused mid-body


class PooledHTTP:
    def __init__(self, *, timeout: httpx.Timeout, max_connections: int, headers: Mapping[str, str] | None = None) -> None:
        self._timeout = self._aiohttp_timeout(timeout)
        self._headers = dict(headers or {})
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None  # made on first use, inside the serving loop

    @staticmethod
    def _aiohttp_timeout(t: httpx.Timeout) -> aiohttp.ClientTimeout:
        # httpx's read timeout is per read, like aiohttp's sock_read; aiohttp's `connect` also covers the
        # wait for a pooled connection, httpx's `pool`. aiohttp has no write timeout (a body is one send).
        return aiohttp.ClientTimeout(total=None, connect=t.pool, sock_connect=t.connect, sock_read=t.read)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0,
                                             keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                max_line_size=MAX_HEAD_LINE, max_field_size=MAX_HEAD_LINE)
        return self._session

    async def request(self, method: str, url: str, *, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None, stream: bool = False,
                      timeout: httpx.Timeout | None = None) -> httpx.Response:
        """Send a request. With stream=False the body is read (and the connection released) before returning;
        with stream=True the caller reads it and must `aclose()` the response. Raises httpx.HTTPError."""
        try:
            resp = await self._client().request(
                method, url, data=content, headers={**self._headers, **(headers or {})}, allow_redirects=False,
                timeout=self._aiohttp_timeout(timeout) if timeout else self._timeout)
        except _ERRORS as e:
            raise _mapped(e) from e
        # httpx decodes any content-encoding, as it did when it was the engine (auto_decompress is off).
        response = httpx.Response(resp.status, headers=resp.raw_headers, stream=_Body(resp))
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            # Let the transports finish closing (aiohttp's advice), so no connection outlives the app.
            await asyncio.sleep(0)
