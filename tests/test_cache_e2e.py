"""The verdict cache end to end: openai SDK → gateway(s) → real Redis, stand-in guard and upstream."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.conftest import closed_port, serve_gateway
from tests.standins import Rule


def chat(gw, text, key="k", **kw):
    return gw.client(api_key=key).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}], **kw)


def redis_gateway(make_gateway, redis_server, policy="strictness: moderate\n", **kw):
    return make_gateway(policy, cache={"redis_url": redis_server.url, "retry_after_s": 0.2}, **kw)


def test_a_repeated_prompt_calls_the_guard_once(gateway, guard, upstream):
    first = chat(gateway, "What is a haiku?")
    assert len(guard.requests) == 2  # prompt + answer
    assert first.headers["x-guard-prompt-verdict-from"] == "guard"
    second = chat(gateway, "What is a haiku?")
    assert len(guard.requests) == 2
    assert second.headers["x-guard-prompt-verdict-from"] == "local"
    assert second.headers["x-guard-response-verdict-from"] == "local"
    assert second.headers["x-guard-prompt-risk"] == first.headers["x-guard-prompt-risk"]
    assert len(upstream.requests) == 2  # only verdicts are cached, never answers


def test_a_second_gateway_process_reuses_the_verdict(make_gateway, redis_server, guard, upstream, tmp_path):
    first = redis_gateway(make_gateway, redis_server)
    chat(first, "Tell me about tides")
    assert len(guard.requests) == 2
    # The same config, served by another process: only Redis is shared.
    port = closed_port()
    proc = serve_gateway(first.config_path, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "Tell me about tides"}])
        assert raw.parse().choices[0].message.content == "You said: Tell me about tides"
        assert raw.headers["x-guard-prompt-verdict-from"] == "redis"
        assert raw.headers["x-guard-response-verdict-from"] == "redis"
        assert len(guard.requests) == 2
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_tenants_share_one_verdict_yet_decide_differently(make_gateway, redis_server, guard, upstream):
    gw = redis_gateway(make_gateway, redis_server, files={
        "strict.yaml": "tenant: strict-co\napi_keys: [key-strict-01]\nstrictness: strict\n",
        "loose.yaml": "tenant: loose-co\napi_keys: [key-loose-001]\nstrictness: loose\n"})
    guard.rules.append(Rule("card counting", "ILG", 50))
    passed = chat(gw, "explain card counting", key="key-loose-001")
    assert passed.headers["x-guard-prompt-decision"] == "allow"
    prompt_calls = len([r for r in guard.requests if "[Assistant]" not in r["messages"][1]["content"]])
    with pytest.raises(openai.BadRequestError) as e:
        chat(gw, "explain card counting", key="key-strict-01")
    assert e.value.response.headers["x-guard-prompt-verdict-from"] == "local"
    assert e.value.response.headers["x-guard-prompt-risk"] == "50"
    assert len([r for r in guard.requests if "[Assistant]" not in r["messages"][1]["content"]]) == prompt_calls == 1


def test_20_concurrent_identical_requests_make_one_guard_call(make_gateway, redis_server, guard, upstream):
    gw = redis_gateway(make_gateway, redis_server)
    guard.delay_s = 1.0  # long enough that all 20 are waiting on the same call, even on a busy machine
    results, errors = [], []
    barrier = threading.Barrier(20)

    def one():
        try:
            barrier.wait()
            results.append(chat(gw, "the same popular question"))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 20
    assert len(guard.requests) == 2  # one prompt call, one answer call (the answers are identical)
    sources = [r.headers["x-guard-prompt-verdict-from"] for r in results]
    assert sources.count("guard") == 1 and sources.count("coalesced") == 19
    stats = gw.details()["checks"]["cache"]["stats"]
    assert stats["coalesced"] == 38 and stats["guard_calls"] == 2


def test_stopping_redis_mid_run_loses_no_request_and_the_cache_resumes(make_gateway, restartable_redis, guard,
                                                                       upstream, caplog):
    gw = redis_gateway(make_gateway, restartable_redis)
    assert chat(gw, "before the outage").parse().choices[0].finish_reason == "stop"
    with restartable_redis.client() as r:
        assert r.dbsize() == 2
    restartable_redis.stop()
    for i in range(5):  # every request still answered, scored by the guard
        assert chat(gw, f"during the outage {i}").parse().choices[0].message.content == f"You said: during the outage {i}"
    assert httpx.get(f"{gw.url}/readyz").status_code == 200
    assert gw.details()["checks"]["cache"]["status"].startswith("degraded")
    down_logs = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "cache_redis_down"]
    assert len(down_logs) == 1  # once per incident

    restartable_redis.start()
    deadline = time.monotonic() + 5
    i = 0
    while time.monotonic() < deadline:  # new verdicts reach Redis again on their own
        chat(gw, f"after the outage {i}")
        i += 1
        with restartable_redis.client() as r:
            if r.dbsize() > 0:
                break
        time.sleep(0.1)
    with restartable_redis.client() as r:
        assert r.dbsize() > 0
    assert gw.details()["checks"]["cache"]["status"] == "ok"


def test_redis_holds_no_raw_text(make_gateway, redis_server, guard, upstream):
    gw = redis_gateway(make_gateway, redis_server)
    chat(gw, "my secret recipe for soup")
    with redis_server.client() as r:
        keys = list(r.scan_iter())
        assert len(keys) == 2
        for key in keys:
            value = r.get(key)
            assert b"soup" not in key and b"soup" not in value and b"recipe" not in value
            assert 0 < r.ttl(key) <= 86400


def test_a_policy_can_bypass_the_cache(make_gateway, redis_server, guard, upstream):
    gw = redis_gateway(make_gateway, redis_server, files={
        "fresh.yaml": "tenant: fresh\napi_keys: [key-fresh-001]\nbypass_cache: true\n"})
    for _ in range(2):
        raw = chat(gw, "score me every time", key="key-fresh-001")
        assert raw.headers["x-guard-prompt-verdict-from"] == "bypass"
    assert len(guard.requests) == 4
    with redis_server.client() as r:
        assert r.dbsize() == 0


def test_guard_errors_are_never_cached(make_gateway, redis_server, guard, upstream):
    gw = redis_gateway(make_gateway, redis_server)
    guard.failure = "500"
    with pytest.raises(openai.InternalServerError):
        chat(gw, "a question asked during a guard outage")
    guard.failure = None
    raw = chat(gw, "a question asked during a guard outage")
    assert raw.headers["x-guard-prompt-verdict-from"] == "guard"


def test_unreachable_redis_never_fails_a_request(make_gateway, guard, upstream):
    gw = make_gateway(cache={"redis_url": f"redis://127.0.0.1:{closed_port()}/0"})
    assert chat(gw, "hello").parse().choices[0].message.content == "You said: hello"
    assert httpx.get(f"{gw.url}/readyz").status_code == 200
    assert gw.details()["checks"]["cache"]["status"].startswith("degraded")
