"""GET /metrics (Prometheus) on a running gateway: protected by the admin key, and every counter moving as
the requests it counts are served (through the openai SDK, against the loopback stand-ins)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, closed_port
from tests.standins import Rule

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
REPO = Path(__file__).resolve().parents[1]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    resp = httpx.get(f"{url}/metrics", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_need_the_admin_key_and_are_off_without_one(make_gateway):
    gw = make_gateway()
    assert httpx.get(f"{gw.url}/metrics").status_code == 401
    wrong = httpx.get(f"{gw.url}/metrics", headers={"authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert ADMIN_KEY not in wrong.text
    assert "guardgate_requests_total" in httpx.get(f"{gw.url}/metrics", headers=ADMIN).text
    off = make_gateway(server={"admin_key": None})
    resp = httpx.get(f"{off.url}/metrics", headers=ADMIN)
    assert resp.status_code == 404 and "server.admin_key" in resp.json()["error"]["message"]


def test_counters_move_for_an_allowed_a_blocked_and_a_guard_error_request(make_gateway, guard, upstream):
    gw = make_gateway()
    client = gw.client()
    guard.rules.append(Rule("pipe bomb", "VIO", 95))
    endpoint = f"{guard.url}/v1"
    before = scrape(gw.url)

    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello metrics"}])
    after_allowed = scrape(gw.url)
    assert delta(before, after_allowed, "guardgate_requests_total", tenant="default", route="chat_completions",
                 status="200", outcome="allowed") == 1
    assert delta(before, after_allowed, "guardgate_decisions_total", tenant="default", stage="prompt",
                 outcome="allow") == 1
    assert delta(before, after_allowed, "guardgate_decisions_total", stage="response", outcome="allow") == 1
    # Two texts scored (the prompt, then the answer), both misses that went to the guard.
    assert delta(before, after_allowed, "guardgate_cache_lookups_total", source="guard") == 2
    assert delta(before, after_allowed, "guardgate_guard_calls_total", backend="flexguard", endpoint=endpoint,
                 result="ok") == 2
    assert delta(before, after_allowed, "guardgate_guard_call_duration_seconds_count", backend="flexguard",
                 endpoint=endpoint) == 2
    assert delta(before, after_allowed, "guardgate_upstream_duration_seconds_count", path="/chat/completions") == 1
    assert delta(before, after_allowed, "guardgate_request_duration_seconds_count", tenant="default",
                 route="chat_completions") == 1

    # The same prompt again: its verdict comes from the in-process cache.
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello metrics"}])
    after_hit = scrape(gw.url)
    assert delta(after_allowed, after_hit, "guardgate_cache_lookups_total", source="local") == 2
    assert delta(after_allowed, after_hit, "guardgate_guard_calls_total") == 0

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a pipe bomb"}])
    after_blocked = scrape(gw.url)
    assert delta(after_hit, after_blocked, "guardgate_requests_total", route="chat_completions", status="400",
                 outcome="blocked_prompt") == 1
    assert delta(after_hit, after_blocked, "guardgate_decisions_total", stage="prompt", outcome="block") == 1
    assert delta(after_hit, after_blocked, "guardgate_upstream_duration_seconds_count") == 0  # never called

    guard.failure = "500"
    with pytest.raises(openai.InternalServerError) as e:  # the default policy fails closed: 503
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "guard is down"}])
    assert e.value.status_code == 503
    after_error = scrape(gw.url)
    assert delta(after_blocked, after_error, "guardgate_requests_total", route="chat_completions", status="503",
                 outcome="guard_error") == 1
    assert delta(after_blocked, after_error, "guardgate_guard_calls_total", backend="flexguard", endpoint=endpoint,
                 result="bad_status") == 1
    # Nothing else was counted as allowed or blocked meanwhile.
    assert delta(after_blocked, after_error, "guardgate_requests_total", outcome="allowed") == 0


def test_withheld_answers_fail_open_upstream_errors_and_unauthorized_requests_are_counted(make_gateway, guard,
                                                                                          upstream):
    gw = make_gateway("on_guard_error: open\n", files={"t.yaml": "tenant: acme\napi_keys: [acme-key-0001]\n"})
    client = gw.client(api_key="acme-key-0001")
    before = scrape(gw.url)
    guard.rules.append(Rule("the secret recipe", "ILG", 90))
    upstream.answers = ["Here is the secret recipe for it"]
    resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "tell me"}])
    assert resp.choices[0].finish_reason == "content_filter"
    upstream.answers = None

    guard.failure = "500"
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "fails open"}])
    guard.failure = None

    upstream.status = 429
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "rate limited"}])
    upstream.status = 200

    with pytest.raises(openai.AuthenticationError):
        gw.client(api_key="not-a-key").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    after = scrape(gw.url)
    counts = {o: delta(before, after, "guardgate_requests_total", route="chat_completions", outcome=o)
              for o in ("answer_withheld", "guard_error", "upstream_error", "unauthorized")}
    assert counts == {"answer_withheld": 1, "guard_error": 1, "upstream_error": 1, "unauthorized": 1}
    assert delta(before, after, "guardgate_requests_total", tenant="acme", outcome="answer_withheld") == 1
    assert delta(before, after, "guardgate_requests_total", tenant="acme", status="200", outcome="guard_error") == 1
    assert delta(before, after, "guardgate_requests_total", tenant="none", status="401") == 1
    assert delta(before, after, "guardgate_upstream_errors_total", code="http_4xx") == 1

    # The same policies (acme's key), an upstream nobody listens on.
    dead = make_gateway(upstream={"base_url": f"http://127.0.0.1:{closed_port()}/v1"})
    before = scrape(dead.url)
    with pytest.raises(openai.APIStatusError) as e:
        dead.client(api_key="acme-key-0001").chat.completions.create(model="m", messages=[{"role": "user", "content": "anyone?"}])
    assert e.value.status_code == 502
    after = scrape(dead.url)
    assert delta(before, after, "guardgate_upstream_errors_total", code="upstream_unavailable") == 1
    assert delta(before, after, "guardgate_requests_total", status="502", outcome="upstream_error") == 1


@pytest.mark.parametrize("mode", ["windowed", "buffered"])
def test_a_stream_in_flight_and_its_held_back_characters_are_gauged(make_gateway, guard, upstream, mode):
    gw = make_gateway(f"response: {{window: 400, stream: {mode}}}\n")
    upstream.answers = ["word " * 60]  # 300 characters: less than a window, so held until the end
    upstream.chunk_delay_s = 0.03
    before = scrape(gw.url)
    seen: list[tuple[float, float]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            s = scrape(gw.url)
            seen.append((value(s, "guardgate_streams_in_flight", mode="windowed"),
                         value(s, "guardgate_stream_held_chars")))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        stream = gw.client().chat.completions.create(model="m", stream=True,
                                                     messages=[{"role": "user", "content": "stream it"}])
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        done.set()
        watcher.join()
    assert text == "word " * 60
    if mode == "windowed":
        assert any(streams >= 1 and held > 0 for streams, held in seen), seen
    else:  # held whole, then sent: the stream is in flight only once it is all scored
        assert any(held > 0 for _, held in seen), seen
    after = scrape(gw.url)
    assert value(after, "guardgate_streams_in_flight") == value(before, "guardgate_streams_in_flight")
    assert value(after, "guardgate_stream_held_chars") == value(before, "guardgate_stream_held_chars")
    assert delta(before, after, "guardgate_requests_total", route="chat_completions", outcome="allowed") == 1


def test_the_grafana_dashboard_asks_only_for_metrics_the_gateway_exposes(make_gateway):
    gw = make_gateway()
    families = list(text_string_to_metric_families(httpx.get(f"{gw.url}/metrics", headers=ADMIN).text))
    exposed = set()
    for f in families:
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(f.type, [""])
        exposed |= {f.name + s for s in suffixes}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "guardgate.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for e in exprs for name in re.findall(r"guardgate_[a-z_]+", e)}
    assert used and used <= exposed, used - exposed
    # And every metric the gateway exposes has a panel.
    assert {f.name for f in families if f.name.startswith("guardgate_") and not f.name.endswith("_created")} <= {
        re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
