"""The verdict cache against a real Redis: hits, sharing across instances, coalescing, errors, outages.

The only stand-in is FakeGuard, for the remote guard model. Tests are sync and drive asyncio.run themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from gateway.cache import (
    KEY_PREFIX,
    ScoredVerdict,
    VerdictCache,
    decode_verdict,
    encode_verdict,
    redis_key,
    verdict_key,
)
from gateway.guard.base import GuardError, GuardInput, Verdict
from gateway.logs import redact_url
from tests.redis_server import PASSWORD, RedisServer

# ----- the stand-in guard -----

IDENTITY = "fake|test-model|v1"


def fake_verdict(item: GuardInput) -> Verdict:
    risk = (len(item.user) * 7 + len(item.assistant or "") * 3) % 101
    return Verdict(risk, ("VIO", "ILG") if risk >= 40 else ("SAFE",))


class FakeGuard:
    """Implements the Guard protocol; counts calls, can be slow, can fail."""

    def __init__(self, identity: str = IDENTITY, *, delay: float = 0.0, error: GuardError | None = None) -> None:
        self.identity = identity
        self.delay, self.error = delay, error
        self.calls: list[list[GuardInput]] = []

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        self.calls.append(list(inputs))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [fake_verdict(i) for i in inputs]

    async def ready(self) -> tuple[bool, str]:
        return True, "ok"

    async def aclose(self) -> None:
        pass


def P(text: str) -> GuardInput:
    return GuardInput("prompt", text)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait (without blocking the loop) until a check against Redis holds; the cache writes after it answers."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def cache_events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == event]


# ----- keys and values -----


def test_keys_differ_by_identity_stage_and_text_split():
    base = verdict_key("g1", GuardInput("response", "ab", "c"))
    assert len(base) == 32
    others = [
        verdict_key("g2", GuardInput("response", "ab", "c")),  # another guard
        verdict_key("g1", GuardInput("response", "a", "bc")),  # same concatenation, other split
        verdict_key("g1", GuardInput("response", "abc", "")),
        verdict_key("g1", GuardInput("prompt", "ab")),  # another stage
        verdict_key("g1\x00", GuardInput("response", "ab", "c")),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert verdict_key("g1", P("x")) == verdict_key("g1", P("x"))
    # What the stage does not score is not part of the key.
    assert verdict_key("g1", GuardInput("prompt", "x", "ignored")) == verdict_key("g1", P("x"))
    assert verdict_key("g1", GuardInput("response", "x", None)) == verdict_key("g1", GuardInput("response", "x", ""))
    # Lone surrogates (valid in JSON strings) hash instead of raising.
    assert verdict_key("g1", P("\ud800")) != verdict_key("g1", P("\ud801"))
    assert redis_key(base).startswith(KEY_PREFIX) and len(redis_key(base)) == len(KEY_PREFIX) + 64


def test_a_reasoning_switch_on_the_input_is_part_of_its_key():
    keys = {verdict_key(IDENTITY, GuardInput("response", "q", "a", reasoning=r)) for r in (None, True, False)}
    assert len(keys) == 3
    assert verdict_key(IDENTITY, GuardInput("prompt", "q", reasoning=False)) != verdict_key(
        IDENTITY, GuardInput("prompt", "q"))


def test_verdicts_are_stored_compactly_and_garbage_is_a_miss():
    assert encode_verdict(Verdict(85, ("VIO", "ILG"))) == b"85|VIO,ILG"
    assert decode_verdict(b"85|VIO,ILG") == Verdict(85, ("VIO", "ILG"))
    assert decode_verdict(b"0|SAFE") == Verdict(0, ("SAFE",))
    for garbage in (b"", b"85", b"101|VIO", b"-1|VIO", b"x|VIO", b"85|NOPE", b"85|", b"\xff|VIO"):
        assert decode_verdict(garbage) is None, garbage


def test_redis_url_is_redacted_for_logs():
    assert redact_url("redis://:s3cret@db.internal:6379/2") == "redis://***@db.internal:6379/2"
    assert redact_url("rediss://user:s3cret@[::1]:6380/0") == "rediss://***@[::1]:6380/0"
    assert "s3cret" not in redact_url("redis://db:6379/0?password=s3cret")


# ----- in-process only -----


def test_repeated_input_calls_the_guard_once_in_process():
    async def main() -> None:
        guard, cache = FakeGuard(), VerdictCache(None)
        first = await cache.score(guard, [P("hello")])
        second = await cache.score(guard, [P("hello")])
        assert [s.source for s in first + second] == ["guard", "local"]
        assert first[0].verdict == second[0].verdict == fake_verdict(P("hello"))
        assert len(guard.calls) == 1
        assert cache.stats() == {"local_hits": 1, "redis_hits": 0, "misses": 1, "guard_calls": 1,
                                      "coalesced": 0, "redis_errors": 0, "bypassed": 0, "local_entries": 1}
        assert await cache.ready() == (True, "in-process only")
        await cache.aclose()
    run(main)


def test_local_lru_evicts_the_oldest_and_expires_after_its_ttl():
    async def main() -> None:
        guard, cache = FakeGuard(), VerdictCache(None, local_size=2, local_ttl_s=0.2)
        await cache.score(guard, [P("a"), P("b")])
        await cache.score(guard, [P("a")])  # a is now the most recent
        await cache.score(guard, [P("c")])  # evicts b
        assert [s.source for s in await cache.score(guard, [P("a"), P("c")])] == ["local", "local"]
        assert [s.source for s in await cache.score(guard, [P("b")])] == ["guard"]
        await asyncio.sleep(0.25)
        assert [s.source for s in await cache.score(guard, [P("a")])] == ["guard"]
    run(main)


def test_batch_sends_only_the_misses_in_one_guard_call_and_keeps_order():
    async def main() -> None:
        guard, cache = FakeGuard(), VerdictCache(None)
        await cache.score(guard, [P("a")])
        items = [P("a"), P("bb"), P("a"), P("ccc"), P("bb")]
        out = await cache.score(guard, items)
        assert [s.verdict for s in out] == [fake_verdict(i) for i in items]
        assert [s.source for s in out] == ["local", "guard", "local", "guard", "coalesced"]
        assert guard.calls[1] == [P("bb"), P("ccc")]  # duplicates and hits are not sent
    run(main)


def test_local_hit_costs_microseconds():
    async def main() -> None:
        guard, cache = FakeGuard(), VerdictCache(None)
        item = GuardInput("response", "What is the capital of France? " * 20, "Paris. " * 100)
        await cache.score(guard, [item])
        n = 5000
        started = time.perf_counter()
        for _ in range(n):
            await cache.score(guard, [item])
        per_hit_us = (time.perf_counter() - started) / n * 1e6
        assert per_hit_us < 50, f"{per_hit_us:.1f} µs per local hit"
    run(main)


# ----- coalescing and guard errors -----


def test_concurrent_identical_calls_share_one_guard_call():
    async def main() -> None:
        guard, cache = FakeGuard(delay=0.05), VerdictCache(None)
        out = await asyncio.gather(*(cache.score(guard, [P("same")]) for _ in range(20)))
        assert len(guard.calls) == 1
        sources = sorted(r[0].source for r in out)
        assert sources == ["coalesced"] * 19 + ["guard"]
        assert {r[0].verdict for r in out} == {fake_verdict(P("same"))}
        assert cache.stats()["coalesced"] == 19
    run(main)


def test_guard_error_reaches_every_waiter_and_is_not_cached(redis_server: RedisServer):
    async def main() -> None:
        error = GuardError("timeout", "no answer within 30s")
        guard, cache = FakeGuard(delay=0.05, error=error), VerdictCache(redis_server.url)
        out = await asyncio.gather(*(cache.score(guard, [P("boom")]) for _ in range(5)), return_exceptions=True)
        assert all(e is error for e in out)  # the same GuardError, from one call
        assert len(guard.calls) == 1
        guard.error = None
        assert [s.source for s in await cache.score(guard, [P("boom")])] == ["guard"]
        assert len(guard.calls) == 2
        await cache.aclose()
        with redis_server.client() as c:
            assert c.dbsize() == 1  # only the successful verdict
    run(main)


def test_cancelled_caller_does_not_cancel_the_shared_call():
    async def main() -> None:
        guard, cache = FakeGuard(delay=0.1), VerdictCache(None)
        first = asyncio.create_task(cache.score(guard, [P("x")]))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(cache.score(guard, [P("x")]))
        await asyncio.sleep(0.01)
        first.cancel()
        assert [s.source for s in await second] == ["coalesced"]
        assert len(guard.calls) == 1
    run(main)


# ----- Redis -----


def test_second_instance_reuses_the_verdict_through_redis(redis_server: RedisServer):
    async def main() -> None:
        g1, g2 = FakeGuard(), FakeGuard()
        one, two = VerdictCache(redis_server.url), VerdictCache(redis_server.url)
        item = GuardInput("response", "question", "answer")
        assert [s.source for s in await one.score(g1, [item])] == ["guard"]
        with redis_server.client() as c:
            await until(lambda: c.exists(redis_key(verdict_key(IDENTITY, item))) == 1)
        out = await two.score(g2, [item])
        assert out == [ScoredVerdict(fake_verdict(item), "redis")]
        assert [s.source for s in await two.score(g2, [item])] == ["local"]
        assert g2.calls == [] and two.stats()["redis_hits"] == 1
        # Another guard identity does not see it.
        assert [s.source for s in await two.score(FakeGuard("other|model"), [item])] == ["guard"]
        assert await two.ready() == (True, "ok")
        await one.aclose()
        await two.aclose()
    run(main)


def test_redis_holds_no_raw_text_and_every_key_has_a_ttl(redis_server: RedisServer):
    secret_user, secret_answer = "MY-PRIVATE-PROMPT-zebra", "MY-PRIVATE-ANSWER-okapi"

    async def main() -> None:
        cache = VerdictCache(redis_server.url, ttl_s=3600)
        await cache.score(FakeGuard(), [P(secret_user), GuardInput("response", secret_user, secret_answer)])
        await cache.aclose()  # waits for the writes

    run(main)
    with redis_server.client() as c:
        keys = list(c.scan_iter("*"))
        assert len(keys) == 2
        for key in keys:
            value = c.get(key)
            blob = key + b" " + value
            for text in (secret_user, secret_answer, "zebra", "okapi", IDENTITY):
                assert text.encode() not in blob
            assert key.startswith(KEY_PREFIX)
            assert decode_verdict(value) is not None
            assert 3500 < c.ttl(key) <= 3600


def test_bypass_neither_reads_nor_writes(redis_server: RedisServer):
    async def main() -> None:
        guard, cache = FakeGuard(), VerdictCache(redis_server.url)
        await cache.score(guard, [P("cached")])
        await cache.aclose()
        cache = VerdictCache(redis_server.url)
        out = await cache.score(guard, [P("cached"), P("fresh")], bypass=True)
        assert [s.source for s in out] == ["bypass", "bypass"]
        assert len(guard.calls) == 2
        with redis_server.client() as c:
            assert c.dbsize() == 1
        assert [s.source for s in await cache.score(guard, [P("fresh")])] == ["guard"]  # not cached locally
        assert cache.stats()["bypassed"] == 2
        await cache.aclose()
    run(main)


def test_flushall_just_causes_misses(redis_server: RedisServer, caplog: pytest.LogCaptureFixture):
    async def main() -> None:
        guard = FakeGuard()
        cache = VerdictCache(redis_server.url, local_size=0)  # every lookup goes to Redis
        await cache.score(guard, [P("x")])
        with redis_server.client() as c:
            await until(lambda: c.dbsize() == 1)
            assert [s.source for s in await cache.score(guard, [P("x")])] == ["redis"]
            c.flushall() if redis_server.restartable else c.flushdb()
        assert [s.source for s in await cache.score(guard, [P("x")])] == ["guard"]
        assert len(guard.calls) == 2 and cache.stats()["redis_errors"] == 0
        await cache.aclose()
    run(main)
    assert not cache_events(caplog, "cache_redis_down")


def test_redis_outage_loses_no_call_logs_once_and_recovers(restartable_redis: RedisServer,
                                                          caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="guardgate")
    server = restartable_redis

    async def main() -> None:
        guard = FakeGuard(delay=0.2)
        cache = VerdictCache(server.url, retry_after_s=0.3)
        # Redis goes away while the guard is scoring: the answers still come, the write-back fails quietly.
        calls = asyncio.gather(*(cache.score(guard, [P(f"during-{i}")]) for i in range(3)))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(server.stop)
        assert [r[0].source for r in await calls] == ["guard"] * 3
        guard.delay = 0
        for i in range(5):
            assert [s.source for s in await cache.score(guard, [P(f"down-{i}")])] == ["guard"]
        await asyncio.sleep(0.35)  # past the retry interval: one more failed probe, no new log line
        assert [s.source for s in await cache.score(guard, [P("down-after-retry")])] == ["guard"]
        assert await cache.ready() == (True, "degraded: redis unreachable, scoring without it")
        assert len(cache_events(caplog, "cache_redis_down")) == 1
        errors = cache.stats()["redis_errors"]
        assert errors >= 2

        await asyncio.to_thread(server.start)
        await asyncio.sleep(0.35)
        assert [s.source for s in await cache.score(guard, [P("back")])] == ["guard"]
        with server.client() as c:
            await until(lambda: c.exists(redis_key(verdict_key(IDENTITY, P("back")))) == 1)
        assert await cache.ready() == (True, "ok")
        assert len(cache_events(caplog, "cache_redis_recovered")) == 1
        other = VerdictCache(server.url)
        assert [s.source for s in await other.score(FakeGuard(), [P("back")])] == ["redis"]
        await other.aclose()
        await cache.aclose()

    run(main)
    down = cache_events(caplog, "cache_redis_down")[0]
    assert down.levelno == logging.WARNING and down.fields["redis"].startswith("redis://***@127.0.0.1:")
    for record in caplog.records:
        assert PASSWORD not in record.getMessage() + repr(getattr(record, "fields", {}))
        assert "during-" not in repr(getattr(record, "fields", {}))


def test_unreachable_redis_is_degraded_not_unready(caplog: pytest.LogCaptureFixture):
    from tests.redis_server import free_port

    async def main() -> None:
        cache = VerdictCache(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")
        assert [s.source for s in await cache.score(FakeGuard(), [P("x")])] == ["guard"]
        assert await cache.ready() == (True, "degraded: redis unreachable, scoring without it")
        await cache.aclose()
    run(main)
    assert len(cache_events(caplog, "cache_redis_down")) == 1
    assert PASSWORD not in repr([getattr(r, "fields", {}) for r in caplog.records])


def test_hanging_redis_does_not_stall_scoring(restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="guardgate")

    async def main() -> None:
        guard = FakeGuard()
        cache = VerdictCache(restartable_redis.url, redis_timeout_s=0.1, retry_after_s=0.3)
        await cache.score(guard, [P("warm")])  # the pool has a connection
        with restartable_redis.client() as c:
            c.execute_command("CLIENT", "PAUSE", "600", "ALL")
            started = time.perf_counter()
            out = await cache.score(guard, [P("while-paused")])
            elapsed = time.perf_counter() - started
            assert [s.source for s in out] == ["guard"]
            assert elapsed < 0.35, f"score took {elapsed:.3f}s with a 0.1s redis timeout"
            assert (await cache.ready())[1].startswith("degraded")
            await asyncio.to_thread(c.execute_command, "CLIENT", "UNPAUSE")
        await asyncio.sleep(0.35)
        assert [s.source for s in await cache.score(guard, [P("after-pause")])] == ["guard"]
        assert await cache.ready() == (True, "ok")
        assert len(cache_events(caplog, "cache_redis_down")) == 1
        assert len(cache_events(caplog, "cache_redis_recovered")) == 1
        await cache.aclose()
    run(main)


def test_after_a_redis_restart_the_stale_pooled_connection_is_replaced_not_reported(
        restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="guardgate")

    async def main() -> None:
        guard = FakeGuard()
        cache = VerdictCache(restartable_redis.url, retry_after_s=30)
        await cache.score(guard, [P("before")])  # the pool holds a connection now
        await asyncio.to_thread(restartable_redis.stop)
        await asyncio.to_thread(restartable_redis.start)
        assert [s.source for s in await cache.score(guard, [P("after")])] == ["guard"]
        with restartable_redis.client() as c:
            await until(lambda: c.exists(redis_key(verdict_key(IDENTITY, P("after")))) == 1)
        assert cache.stats()["redis_errors"] == 0
        assert await cache.ready() == (True, "ok")
        await cache.aclose()
    run(main)
    assert cache_events(caplog, "cache_redis_down") == []


def test_one_slow_redis_answer_is_not_an_outage(restartable_redis: RedisServer, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="guardgate")

    async def main() -> None:
        guard = FakeGuard()
        cache = VerdictCache(restartable_redis.url, redis_timeout_s=0.1, retry_after_s=30)
        await cache.score(guard, [P("warm")])
        with restartable_redis.client() as c:
            # Writes stall past the timeout once: the write-back of this verdict times out, nothing else.
            c.execute_command("CLIENT", "PAUSE", "150", "WRITE")
            assert [s.source for s in await cache.score(guard, [P("slow")])] == ["guard"]
            await until(lambda: cache.stats()["redis_errors"] == 1)
        await asyncio.sleep(0.2)
        assert [s.source for s in await cache.score(guard, [P("warm")])] == ["local"]
        assert [s.source for s in await cache.score(guard, [P("next")])] == ["guard"]
        with restartable_redis.client() as c:
            await until(lambda: c.exists(redis_key(verdict_key(IDENTITY, P("next")))) == 1)
        assert await cache.ready() == (True, "ok")
        await cache.aclose()
    run(main)
    assert cache_events(caplog, "cache_redis_down") == []
