"""Several servers for one guard backend: round robin over the healthy ones, failover, cooldown.

Every remote guard backend asks its servers through one `Endpoints`. A server that fails (connection
error, timeout, HTTP 5xx) is taken out for `cooldown_s`; once that has passed it takes its turn again and
stays in if it answers. A request that hit a failing server is retried once on another healthy one.
When no server is healthy, each request still tries the one that went down first (so a lone server that
had one bad moment is not locked out for the cooldown), and fails if that fails too.

A 4xx or an unreadable body is not the server's health: it is raised at once, without a retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
import orjson

from gateway import metrics
from gateway.guard.base import GuardError
from gateway.http import PooledHTTP
from gateway.logs import redact_url

log = logging.getLogger("guardgate.guard")

DEFAULT_COOLDOWN_S = 10.0
READY_TIMEOUT_S = 2.0


# What sending on a connection the server already closed looks like.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class _Failed(Exception):
    """The server failed (its health, not the request's fault): worth trying another."""

    def __init__(self, error: GuardError) -> None:
        self.error = error


def served_model_check(model: str) -> Callable[[Any], str | None]:
    """A `ready()` check for vLLM's `GET …/v1/models`: None if `model` is served, else why not."""

    def check(data: Any) -> str | None:
        try:
            served = {m.get("id") for m in data.get("data", [])}
        except (AttributeError, TypeError):
            return "guard /models is not a model list"
        return None if model in served else f"guard does not serve model {model}"

    return check


class Endpoints:
    """The base URLs of one guard backend, their health, and one pooled HTTP client for all of them."""

    def __init__(self, base_urls: Sequence[str], *, timeout_s: float, max_concurrency: int,
                 api_key: str | None = None, cooldown_s: float = DEFAULT_COOLDOWN_S,
                 clock: Callable[[], float] = time.monotonic, backend: str = "remote") -> None:
        if not base_urls:
            raise ValueError("a guard needs at least one base URL")
        self.urls = [str(u).rstrip("/") for u in base_urls]
        self.backend = backend  # metric labels: backend, and each endpoint's URL without credentials
        self._labels = [redact_url(u) for u in self.urls]
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._down_until = [0.0] * len(self.urls)  # 0.0: healthy
        self._next = 0
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        # One pool for all servers: the transport keeps connections per host, and the limit is the
        # gateway's total of guard calls in flight, whichever server they go to.
        self._http = PooledHTTP(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
                                max_connections=max_concurrency, headers=headers)
        self._slots = asyncio.Semaphore(max_concurrency)

    # ------------------------------------------------------------------ health ----

    def healthy(self) -> list[bool]:
        now = self._clock()
        return [until <= now for until in self._down_until]

    def _mark_down(self, i: int, why: str) -> None:
        if self._down_until[i] <= self._clock():
            log.warning("guard endpoint down", extra={"fields": {
                "event": "guard_endpoint_down", "endpoint": redact_url(self.urls[i]), "reason": why,
                "retry_in_s": self.cooldown_s}})
        self._down_until[i] = self._clock() + self.cooldown_s

    def _mark_up(self, i: int) -> None:
        if self._down_until[i]:
            log.info("guard endpoint up", extra={"fields": {"event": "guard_endpoint_up",
                                                            "endpoint": redact_url(self.urls[i])}})
            self._down_until[i] = 0.0

    def _pick(self, exclude: int | None = None, *, healthy_only: bool = False) -> int | None:
        """The next healthy server in round-robin order; with none healthy, the one down longest."""
        now, n = self._clock(), len(self.urls)
        for k in range(n):
            i = (self._next + k) % n
            if i != exclude and self._down_until[i] <= now:
                self._next = (i + 1) % n
                return i
        others = [i for i in range(n) if i != exclude]
        if healthy_only or not others:
            return None
        return min(others, key=lambda i: self._down_until[i])

    # ---------------------------------------------------------------- requests ----

    async def post_json(self, path: str, body: Mapping[str, Any]) -> Any:
        """POST `body` as JSON to `{base_url}{path}` on a healthy server and return the parsed answer.

        Raises GuardError: timeout / unreachable / bad_status (after one retry elsewhere for a server
        failure), or unparsable when the answer is not JSON."""
        payload = orjson.dumps(body)
        async with self._slots:
            first = self._pick()
            if first is None:  # unreachable: with no healthy server _pick returns the one down longest
                raise GuardError("unreachable", "no guard endpoint")
            try:
                return await self._attempt(first, path, payload)
            except _Failed as failed:
                error = failed.error
            retry = self._pick(exclude=first, healthy_only=True)
            if retry is None:
                raise error
            try:
                return await self._attempt(retry, path, payload)
            except _Failed as failed:
                raise failed.error from None

    async def _attempt(self, i: int, path: str, payload: bytes) -> Any:
        started = time.perf_counter()
        result = "ok"
        try:
            return await self._attempt_once(i, path, payload)
        except _Failed as failed:
            result = failed.error.kind
            raise
        except GuardError as e:
            result = e.kind
            raise
        finally:
            metrics.observe_guard_call(self.backend, self._labels[i], time.perf_counter() - started, result)

    async def _attempt_once(self, i: int, path: str, payload: bytes) -> Any:
        try:
            try:
                resp = await self._http.request("POST", f"{self.urls[i]}{path}", content=payload)
            except _STALE:
                # A pooled connection the server had closed (a restart, an idle timeout): the pool has
                # dropped it, so one more try goes out on a fresh connection to the same server.
                resp = await self._http.request("POST", f"{self.urls[i]}{path}", content=payload)
        except httpx.TimeoutException:
            self._mark_down(i, "timeout")
            raise _Failed(GuardError("timeout", f"no answer within {self.timeout_s:g}s")) from None
        except httpx.HTTPError as e:
            self._mark_down(i, type(e).__name__)
            raise _Failed(GuardError("unreachable", type(e).__name__)) from None
        if resp.status_code >= 500:
            self._mark_down(i, f"HTTP {resp.status_code}")
            raise _Failed(GuardError("bad_status", f"guard answered HTTP {resp.status_code}"))
        self._mark_up(i)  # it answered: whatever it said, the server is alive
        if resp.status_code != 200:
            raise GuardError("bad_status", f"guard answered HTTP {resp.status_code}")
        try:
            return orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise GuardError("unparsable", "guard response is not JSON") from None

    # ------------------------------------------------------------------- ready ----

    async def ready(self, path: str = "/models", check: Callable[[Any], str | None] | None = None) -> tuple[bool, str]:
        """Ask every server `GET {base_url}{path}` at once; ready when at least one answers and passes
        `check`. Doubles as an active health check: each answer marks its server up or down."""
        reasons = await asyncio.gather(*(self._probe(i, path, check) for i in range(len(self.urls))))
        ok = sum(r is None for r in reasons)
        if len(self.urls) == 1:
            return ok == 1, reasons[0] or "ok"
        failing = "; ".join(f"endpoint {i + 1}: {r}" for i, r in enumerate(reasons) if r)
        if ok == len(self.urls):
            return True, "ok"
        if ok:
            return True, f"ok ({ok}/{len(self.urls)} endpoints; {failing})"
        return False, f"no guard endpoint ready ({failing})"

    async def _probe(self, i: int, path: str, check: Callable[[Any], str | None] | None) -> str | None:
        reason: str | None
        try:
            resp = await self._http.request("GET", f"{self.urls[i]}{path}", timeout=httpx.Timeout(READY_TIMEOUT_S))
        except httpx.HTTPError as e:
            reason = f"guard unreachable ({type(e).__name__})"
        else:
            if resp.status_code != 200:
                reason = f"guard {path} answered HTTP {resp.status_code}"
            elif check is None:
                reason = None
            else:
                try:
                    data = orjson.loads(resp.content)
                except orjson.JSONDecodeError:
                    data = None
                reason = check(data)
        if reason is None:
            self._mark_up(i)
        else:
            self._mark_down(i, reason)
        return reason

    async def aclose(self) -> None:
        await self._http.aclose()


class RemoteGuard:
    """What every server-backed guard shares: its servers, its identity, readiness and closing.

    Subclasses say how to ask their model (`score`); `models_path` is where a server lists its models.
    """

    models_path = "/models"

    def __init__(self, identity: str, model: str, base_urls: Sequence[str], *, timeout_s: float,
                 max_concurrency: int, api_key: str | None, cooldown_s: float) -> None:
        self.model = model
        self._endpoints = Endpoints(base_urls, timeout_s=timeout_s, max_concurrency=max_concurrency,
                                    api_key=api_key, cooldown_s=cooldown_s, backend=identity.split("|", 1)[0])
        self.base_url = ", ".join(self._endpoints.urls)  # for messages only (`guardgate calibrate`)
        # Not the URLs: every server runs the same model, so they share cached verdicts.
        self._identity = identity

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def endpoints(self) -> Endpoints:
        return self._endpoints

    async def ready(self) -> tuple[bool, str]:
        return await self._endpoints.ready(self.models_path, served_model_check(self.model))

    async def aclose(self) -> None:
        await self._endpoints.aclose()
