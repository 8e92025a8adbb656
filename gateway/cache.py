"""Verdict cache: an in-process LRU in front of Redis, with request coalescing.

A verdict depends only on the guard and the exact texts it scored, never on a policy, so one cached verdict
serves every tenant. Keys are sha256 hashes; Redis holds only hashes and compact verdicts (b"85|VIO,ILG"),
never text. Redis is an optimisation: when it is down, slow or flushed, requests are scored by the guard.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from binascii import hexlify
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.guard.base import HARM_CATEGORIES, SAFE, Guard, GuardError, GuardInput, Verdict
from gateway.logs import redact_url
from gateway.redis_client import RedisConnection, connect

log = logging.getLogger("guardgate")

KEY_PREFIX = b"gg:v1:"
Source = Literal["local", "redis", "guard", "coalesced", "bypass"]

_KNOWN_CATEGORIES = frozenset(HARM_CATEGORIES) | {SAFE}
# Pool exhaustion is local pressure, not Redis being down (redis-py >= 6 tells them apart).
_POOL_EXHAUSTED: tuple[type[BaseException], ...] = tuple(
    e for e in [getattr(redis.exceptions, "MaxConnectionsError", None)] if e is not None)
_MAX_CONNECTIONS = 1024
_TIMEOUTS_FOR_DOWN = 2
_SETUP_TIMEOUT_S = 5.0  # mapping a Redis Cluster, in the background


@dataclass(frozen=True, slots=True)
class ScoredVerdict:
    verdict: Verdict
    source: Source


def _update_framed(h: hashlib._Hash, text: str) -> None:
    # Length-prefixed, so ("ab", "c") and ("a", "bc") never hash alike. surrogatepass: JSON may carry lone
    # surrogates, and they must hash, not raise.
    data = text.encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def _base_hash(identity: str, stage: str) -> hashlib._Hash:
    h = hashlib.sha256()
    _update_framed(h, identity)
    _update_framed(h, stage)
    return h


def verdict_key(identity: str, item: GuardInput, base: hashlib._Hash | None = None) -> bytes:
    """The 32-byte digest naming one verdict: guard identity, stage, and the texts that stage scores.

    The prompt stage scores only the user text, so `assistant` is not part of a prompt key; in the response
    stage a missing answer is scored as "" (as FlexGuard does), so None and "" share a key. A reasoning
    switch set on the input is part of the key (the identity holds the guard's own setting). `base`: the
    identity and stage already hashed (`_base_hash`), to be copied instead of hashed again.
    """
    h = base.copy() if base is not None else _base_hash(identity, item.stage)
    _update_framed(h, item.user)
    if item.stage == "response":
        _update_framed(h, item.assistant or "")
    if item.reasoning is not None:  # asked with reasoning switched away from the guard's own setting
        _update_framed(h, f"reasoning={'on' if item.reasoning else 'off'}")
    return h.digest()


def redis_key(digest: bytes) -> bytes:
    return KEY_PREFIX + hexlify(digest)


def encode_verdict(v: Verdict) -> bytes:
    return f"{v.risk}|{','.join(v.categories)}".encode()


def decode_verdict(raw: bytes) -> Verdict | None:
    """None for anything that is not a verdict we wrote (treated as a miss, never trusted)."""
    try:
        risk, _, cats = raw.decode("ascii").partition("|")
        categories = tuple(cats.split(","))
        if not risk.isdigit() or not _KNOWN_CATEGORIES.issuperset(categories):
            return None
        return Verdict(risk=int(risk), categories=categories)
    except (UnicodeDecodeError, ValueError):
        return None


def _consume_exception(fut: asyncio.Future) -> None:
    # A shared error whose waiters all went away must not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class VerdictCache:
    """`score` = local LRU → Redis (one MGET) → guard (one batch call for the misses), coalesced per key."""

    def __init__(self, redis_url: str | None, *, ttl_s: int = 86400, local_size: int = 10000,
                 local_ttl_s: float = 60.0, redis_timeout_s: float = 0.1, retry_after_s: float = 2.0) -> None:
        if ttl_s < 1 or redis_timeout_s <= 0 or retry_after_s < 0:
            raise ValueError("ttl_s must be >= 1, redis_timeout_s > 0 and retry_after_s >= 0")
        self.ttl_s, self.local_size, self.local_ttl_s = ttl_s, local_size, local_ttl_s
        self.redis_timeout_s, self.retry_after_s = redis_timeout_s, retry_after_s
        self._url = redact_url(redis_url) if redis_url else None
        self._redis: RedisConnection | None = None
        if redis_url:
            # One server, a Sentinel-watched master or a Cluster (gateway/redis_client.py). No client-side
            # retries beyond the one below: one short attempt, then the guard. Our own timeout bounds each call.
            self._redis = connect(
                redis_url, socket_timeout=redis_timeout_s, socket_connect_timeout=redis_timeout_s,
                # One retry, for a connection error only: after a Redis restart (or a Sentinel failover) the
                # first command on each pooled connection fails; redis-py drops that connection and the retry
                # opens a fresh one (to the master Sentinel names now).
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
                max_connections=_MAX_CONNECTIONS)
        self._local: OrderedDict[bytes, tuple[float, ScoredVerdict]] = OrderedDict()
        self._bases: dict[tuple[str, str], hashlib._Hash] = {}
        self._inflight: dict[bytes, asyncio.Future[ScoredVerdict]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._setup: asyncio.Task[None] | None = None
        self._redis_down = False
        self._timeouts = 0  # timeouts in a row, without a success in between
        self._retry_at = 0.0  # monotonic; while down, Redis is not tried before this
        self.local_hits = self.redis_hits = self.misses = self.guard_calls = 0
        self.coalesced = self.redis_errors = self.bypassed = 0

    # ----- public -----

    async def score(self, guard: Guard, inputs: Sequence[GuardInput], *, bypass: bool = False) -> list[ScoredVerdict]:
        """One ScoredVerdict per input, in order. Raises GuardError exactly when the guard does."""
        if bypass:
            verdicts = await guard.score(inputs)
            _check_count(verdicts, inputs)
            self.bypassed += len(inputs)
            return [ScoredVerdict(v, "bypass") for v in verdicts]
        identity = guard.identity
        now = time.monotonic()
        local = self._local
        results: list[ScoredVerdict | None] = []
        pending: list[tuple[int, bytes, GuardInput]] = []
        for i, item in enumerate(inputs):
            key = self._digest(identity, item)
            entry = local.get(key)
            if entry is not None:
                if entry[0] > now:
                    local.move_to_end(key)
                    results.append(entry[1])
                    continue
                del local[key]
            results.append(None)
            pending.append((i, key, item))
        self.local_hits += len(inputs) - len(pending)
        if pending:
            await self._resolve_misses(guard, results, pending)
        return results  # type: ignore[return-value]  # every None was filled

    def stats(self) -> dict[str, int]:
        """Counts per input: local_hits, redis_hits, misses (sent to the guard), coalesced (waited on another
        caller's call, or a duplicate in the same batch), bypassed; guard_calls per batch; redis_errors per
        failed Redis call; local_entries now."""
        return {"local_hits": self.local_hits, "redis_hits": self.redis_hits, "misses": self.misses,
                "guard_calls": self.guard_calls, "coalesced": self.coalesced, "redis_errors": self.redis_errors,
                "bypassed": self.bypassed, "local_entries": len(self._local)}

    def start(self) -> None:
        """What can be done before the first request, in the background: map a Redis Cluster."""
        self._redis_set_up()

    async def ready(self) -> tuple[bool, str]:
        """Always ready: without Redis the cache still serves, it only says so."""
        if self._redis is None:
            return True, "in-process only"
        was_down = self._redis_down
        if self._redis_due() and self._redis_set_up():
            try:
                async with asyncio.timeout(self.redis_timeout_s):
                    await self._redis.client.ping()
            except Exception as e:
                self._redis_failed(e, "ping")
            else:
                self._redis_ok(was_down)
        if self._redis_down:
            return True, "degraded: redis unreachable, scoring without it"
        if self._setup is not None and not self._setup.done():
            return True, "connecting: mapping the Redis Cluster, scoring without it meanwhile"
        return True, "ok"

    async def aclose(self) -> None:
        """Let scoring in flight finish (and its Redis writes), then close the pool."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()

    # ----- keys and the local LRU -----

    def _digest(self, identity: str, item: GuardInput) -> bytes:
        # verdict_key, with the identity and stage prefix hashed once per guard and stage.
        base = self._bases.get((identity, item.stage))
        if base is None:
            base = self._bases[(identity, item.stage)] = _base_hash(identity, item.stage)
        return verdict_key(identity, item, base)

    def _remember(self, key: bytes, verdict: Verdict, now: float) -> None:
        if self.local_size <= 0:
            return
        self._local[key] = (now + self.local_ttl_s, ScoredVerdict(verdict, "local"))
        self._local.move_to_end(key)
        if len(self._local) > self.local_size:
            self._local.popitem(last=False)

    # ----- misses: coalescing, then Redis, then the guard -----

    async def _resolve_misses(self, guard: Guard, results: list[ScoredVerdict | None],
                              pending: list[tuple[int, bytes, GuardInput]]) -> None:
        loop = asyncio.get_running_loop()
        waits: list[tuple[int, asyncio.Future[ScoredVerdict], bool]] = []
        owned: dict[bytes, tuple[GuardInput, asyncio.Future[ScoredVerdict]]] = {}
        for i, key, item in pending:
            fut = self._inflight.get(key)
            if fut is None:
                fut = self._inflight[key] = loop.create_future()
                fut.add_done_callback(_consume_exception)
                owned[key] = (item, fut)
                waits.append((i, fut, True))
            else:  # someone (maybe this very batch) is already scoring this text
                self.coalesced += 1
                waits.append((i, fut, False))
        if owned:
            # Its own task, so a caller that is cancelled doesn't cancel the call others wait on.
            task = loop.create_task(self._fill(guard, owned))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # asyncio.wait, unlike awaiting a future directly, leaves the futures alone if we are cancelled.
        await asyncio.wait([w[1] for w in waits])
        for i, fut, own in waits:
            sv = fut.result()  # the shared GuardError, if the call failed
            results[i] = sv if own else ScoredVerdict(sv.verdict, "coalesced")

    async def _fill(self, guard: Guard, owned: dict[bytes, tuple[GuardInput, asyncio.Future[ScoredVerdict]]]) -> None:
        """Resolve the futures of `owned` from Redis or the guard; errors go to every waiter, uncached."""
        try:
            found = await self._redis_get(list(owned))
            now = time.monotonic()
            for key, verdict in found.items():
                self._remember(key, verdict, now)
                self._settle(owned.pop(key), key, ScoredVerdict(verdict, "redis"))
            self.redis_hits += len(found)
            if not owned:
                return
            items = [item for item, _ in owned.values()]
            self.misses += len(items)
            self.guard_calls += 1
            verdicts = await guard.score(items)
            _check_count(verdicts, items)
            now = time.monotonic()
            fresh = list(zip(owned, verdicts))
            for key, verdict in fresh:
                self._remember(key, verdict, now)
                self._settle(owned.pop(key), key, ScoredVerdict(verdict, "guard"))
            # After the waiters are released: the write is for later requests, not this one.
            await self._redis_set(fresh)
        except asyncio.CancelledError:  # only at shutdown
            for key, entry in owned.items():
                self._inflight.pop(key, None)
                entry[1].cancel()
            raise
        except Exception as e:
            for key, entry in owned.items():
                self._settle(entry, key, e)

    def _settle(self, entry: tuple[GuardInput, asyncio.Future[ScoredVerdict]], key: bytes,
                outcome: ScoredVerdict | Exception) -> None:
        fut = entry[1]
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if fut.done():
            return
        if isinstance(outcome, Exception):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)

    # ----- Redis: short timeouts, one log line per incident, no retry before retry_after_s -----

    def _redis_due(self) -> bool:
        if self._redis is None:
            return False
        if not self._redis_down:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self.retry_after_s  # one probe per interval, not one per request
        return True

    def _redis_failed(self, e: BaseException, op: str) -> None:
        self.redis_errors += 1
        if isinstance(e, _POOL_EXHAUSTED):
            return  # too many of our own calls at once: skip Redis for this one, it isn't down
        if isinstance(e, (TimeoutError, redis.exceptions.TimeoutError)):
            # A timeout also counts the time our own event loop was busy, so one alone is not an outage:
            # that call goes without Redis; only _TIMEOUTS_FOR_DOWN in a row declare it down.
            self._timeouts += 1
            if self._timeouts < _TIMEOUTS_FOR_DOWN:
                return
        self._retry_at = time.monotonic() + self.retry_after_s
        if not self._redis_down:
            self._redis_down = True
            log.warning("verdict cache: redis unavailable, scoring without it", extra={"fields": {
                "event": "cache_redis_down", "redis": self._url, "op": op, "error": type(e).__name__,
                "detail": str(e)[:200] or f"no answer within {self.redis_timeout_s:g}s",
                "retry_after_s": self.retry_after_s}})

    def _redis_ok(self, probe: bool) -> None:
        # Only a call that started while Redis was down proves it is back: one that was already in flight
        # when the incident began must not end it (that would log down/up once per request).
        self._timeouts = 0
        if probe and self._redis_down:
            self._redis_down = False
            log.info("verdict cache: redis is back", extra={"fields": {
                "event": "cache_redis_recovered", "redis": self._url}})

    def _redis_set_up(self) -> bool:
        """Whether the client can take a call now. A Cluster client first maps the cluster, which takes longer
        than one call's timeout: that runs once in the background, with a budget of its own, and calls go
        without Redis meanwhile (misses, not errors)."""
        conn = self._redis
        if conn is None or conn.setup is None or not conn.needs_setup():
            return True
        if self._setup is None or self._setup.done():
            self._setup = task = asyncio.get_running_loop().create_task(self._set_up(conn.setup))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return False

    async def _set_up(self, setup: Callable[[], Awaitable[object]]) -> None:
        probe = self._redis_down
        try:
            async with asyncio.timeout(_SETUP_TIMEOUT_S):
                await setup()
        except Exception as e:
            self._redis_failed(e, "connect")
        else:
            self._redis_ok(probe)

    async def _redis_get(self, keys: list[bytes]) -> dict[bytes, Verdict]:
        probe = self._redis_down
        if not self._redis_due() or not self._redis_set_up():
            return {}
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                values = await self._redis.mget([redis_key(k) for k in keys])  # type: ignore[union-attr]
        except Exception as e:  # whatever Redis does, the request goes on without it
            self._redis_failed(e, "mget")
            return {}
        self._redis_ok(probe)
        found = {}
        for key, raw in zip(keys, values):
            if raw is not None and (verdict := decode_verdict(raw)) is not None:
                found[key] = verdict
        return found

    async def _redis_set(self, fresh: list[tuple[bytes, Verdict]]) -> None:
        probe = self._redis_down
        if not fresh or not self._redis_due() or not self._redis_set_up():
            return
        try:
            async with asyncio.timeout(self.redis_timeout_s):
                pipe = self._redis.client.pipeline(transaction=False)  # type: ignore[union-attr]
                for key, verdict in fresh:
                    pipe.set(redis_key(key), encode_verdict(verdict), ex=self.ttl_s)
                await pipe.execute()
        except Exception as e:
            self._redis_failed(e, "set")
            return
        self._redis_ok(probe)


def _check_count(verdicts: Sequence[Verdict], inputs: Sequence[GuardInput]) -> None:
    if len(verdicts) != len(inputs):
        raise GuardError("unparsable", f"guard returned {len(verdicts)} verdicts for {len(inputs)} inputs")
