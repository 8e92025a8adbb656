"""Streamed answers moderated as they stream: windowed hold-back, buffered and audit modes."""

from __future__ import annotations

import logging
import time

import httpx
import openai
import orjson
import pytest

from tests.standins import Rule

BENIGN = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. "
          "Chlorophyll in the leaves absorbs mostly red and blue light. ")
HARMFUL = "Now mix the bleach with ammonia in a closed room. "


def windowed_policy(window: int = 200, **response) -> str:
    extra = "".join(f", {k}: {v}" for k, v in response.items())
    return f"response: {{stream: windowed, window: {window}{extra}}}\n"


def stream_text(client, text="tell me", **kw):
    """Text per choice, finish reason per choice, and when each piece of text arrived (monotonic clock)."""
    texts, finish, arrivals = {}, {}, []
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                                stream=True, **kw):
        for choice in chunk.choices:
            piece = choice.delta.content or ""
            texts[choice.index] = texts.get(choice.index, "") + piece
            if piece:
                arrivals.append(time.monotonic())
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, finish, arrivals


def response_checks(guard) -> list[str]:
    return [r["messages"][1]["content"].split("\n[Assistant]: ", 1)[1]
            for r in guard.requests if "\n[Assistant]: " in r["messages"][1]["content"]]


def test_a_long_benign_answer_arrives_in_pieces_and_intact(make_gateway, guard, upstream):
    answer = BENIGN * 12  # ~1.6k characters
    upstream.answers = [answer]
    upstream.chunk_delay_s = 0.004
    gw = make_gateway(windowed_policy(200))
    texts, finish, arrivals = stream_text(gw.client())
    assert texts == {0: answer} and finish == {0: "stop"}
    # Released window by window while the upstream was still generating, not all at the end...
    assert arrivals[0] < upstream.streams[-1]["closed_at"]
    # ...and never before a check had approved it.
    first_check = min(t[2] for t in guard.timings if t[0] == "response")
    assert arrivals[0] >= first_check
    checks = response_checks(guard)
    assert len(checks) >= 4
    # Each check scores the whole answer so far; the last one the whole answer.
    assert all(answer.startswith(c) for c in checks) and checks[-1] == answer
    assert [len(c) for c in checks] == sorted(len(c) for c in checks)


def test_a_late_harmful_part_is_cut_and_none_of_its_window_is_released(make_gateway, guard, upstream):
    before = BENIGN * 5  # ~680 characters of benign text first
    answer = before + HARMFUL + BENIGN * 6
    upstream.answers = [answer]
    upstream.chunk_delay_s = 0.004
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway(windowed_policy(200))
    texts, finish, _ = stream_text(gw.client())
    released = texts.get(0, "")
    assert finish == {0: "content_filter"}
    assert "bleach" not in released and "ammonia" not in released
    assert before.startswith(released)  # only approved text, in order
    assert len(released) >= 400  # the earlier windows did reach the client
    # The upstream was closed before it finished generating.
    deadline = time.monotonic() + 5
    while "closed_at" not in upstream.streams[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.streams[-1]["completed"] is False
    assert upstream.streams[-1]["chunks"] < len(answer) // upstream.chunk_chars


def test_a_blocked_stream_ends_with_content_filter_then_done_on_the_wire(make_gateway, guard, upstream):
    upstream.answers = [BENIGN + HARMFUL + BENIGN]
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway(windowed_policy(64))
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"content-type": "application/json"},
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert orjson.loads(events[-2][6:])["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}]
    assert "ammonia" not in r.text
    assert r.headers["x-guard-stream-mode"] == "windowed"


def test_n2_cuts_only_the_harmful_choice(make_gateway, guard, upstream):
    good = BENIGN * 4
    bad = BENIGN + HARMFUL + BENIGN * 2
    upstream.answers = [good, bad]
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway(windowed_policy(100))
    texts, finish, _ = stream_text(gw.client(), n=2)
    assert texts[0] == good and finish[0] == "stop"
    assert "ammonia" not in texts.get(1, "") and finish[1] == "content_filter"
    assert bad.startswith(texts.get(1, ""))
    assert upstream.streams[-1]["completed"] is True  # choice 0 still needed the upstream


def test_tool_call_arguments_are_scored_in_a_stream(make_gateway, guard, upstream):
    upstream.tool_call = {"name": "send_email", "arguments": '{"body": "mix the bleach with ammonia"}'}
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway(windowed_policy(200))
    calls, finish = [], None
    for chunk in gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True, tools=[{"type": "function",
                                                                          "function": {"name": "send_email"}}]):
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert calls == [] and finish == "content_filter"
    assert any("send_email(" in c and "ammonia" in c for c in response_checks(guard))


def test_refusal_text_is_scored_like_content(make_gateway, guard, upstream):
    upstream.as_refusal = True  # the answer streams as `refusal` deltas, not `content`
    upstream.answers = ["I won't explain how to mix the bleach with ammonia."]
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway(windowed_policy(200))
    refusal, finish = "", None
    for chunk in gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True):
        for choice in chunk.choices:
            refusal += choice.delta.refusal or ""
            finish = choice.finish_reason or finish
    assert refusal == "" and finish == "content_filter"
    assert any("ammonia" in c for c in response_checks(guard))
    # And a harmless refusal comes through whole.
    guard.rules.clear()
    upstream.answers = ["I can't help with that request."]
    refusal = "".join(c.delta.refusal or "" for chunk in gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True) for c in chunk.choices)
    assert refusal == "I can't help with that request."


def test_logprobs_are_kept_in_a_stream(make_gateway, guard, upstream):
    upstream.answers = [BENIGN]
    gw = make_gateway(windowed_policy(64))
    tokens = []
    for chunk in gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True, logprobs=True):
        for choice in chunk.choices:
            if choice.logprobs and choice.logprobs.content:
                tokens += [t.token for t in choice.logprobs.content]
    assert "".join(tokens) == BENIGN


def test_refusal_is_withheld_in_a_whole_answer(make_gateway, guard, upstream):
    upstream.as_refusal = True
    upstream.answers = ["I won't explain how to mix the bleach with ammonia."]
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    choice = make_gateway().client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}]).choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.refusal is None


def test_client_disconnect_closes_the_upstream(make_gateway, guard, upstream):
    upstream.answers = [BENIGN * 40]
    upstream.chunk_delay_s = 0.01  # ~10 s to generate in full
    gw = make_gateway(windowed_policy(100))
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers={"content-type": "application/json"},
                      json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        for line in r.iter_lines():
            if '"content":"Phot' in line:
                break  # got some text: hang up
        else:
            pytest.fail("no text was released before the end")
    deadline = time.monotonic() + 5
    while "closed_at" not in upstream.streams[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "closed_at" in upstream.streams[-1], "the upstream stream was left running"
    assert upstream.streams[-1]["completed"] is False


def test_sse_details_survive_windowing(make_gateway, guard, upstream):
    upstream.answers = [BENIGN * 3]
    gw = make_gateway(windowed_policy(50))
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"content-type": "application/json"},
                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                         "stream_options": {"include_usage": True}})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0].startswith("data: ") and orjson.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert ": keep-alive" in events  # the upstream's comment is passed on
    usage = [orjson.loads(e[6:]) for e in events if e.startswith("data: {") and '"usage"' in e]
    assert usage and usage[-1]["usage"]["total_tokens"] == 12 and usage[-1]["choices"] == []
    assert events[-1] == "data: [DONE]"
    text = "".join(c["delta"].get("content") or "" for e in events if e.startswith("data: {")
                   for c in orjson.loads(e[6:])["choices"])
    assert text == BENIGN * 3


def test_upstream_breaking_mid_stream_reaches_the_sdk_as_an_error(make_gateway, guard, upstream, caplog):
    caplog.set_level(logging.INFO, logger="guardgate")
    upstream.answers = [BENIGN * 10]
    upstream.break_after_chunks = 60
    gw = make_gateway(windowed_policy(100))
    received = ""
    with pytest.raises(openai.APIError) as e:
        for chunk in gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                         stream=True):
            received += "".join(c.delta.content or "" for c in chunk.choices)
    assert "broke off" in str(e.value)
    assert (BENIGN * 10).startswith(received)
    (logged,) = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "upstream_error"]
    assert logged["code"] == "upstream_stream_error" and logged["stream_mode"] == "windowed"
    assert logged["request_id"] and logged["elapsed_ms"] > 0


def test_guard_failing_mid_stream_fails_closed(make_gateway, guard, upstream):
    upstream.answers = [BENIGN * 6]
    gw = make_gateway(windowed_policy(100))
    original = guard.answer
    guard.answer = lambda msg: "no verdict" if "[Assistant]" in msg else original(msg)
    try:
        with pytest.raises(openai.APIError) as e:
            for chunk in gw.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                             stream=True):
                assert not any(c.delta.content for c in chunk.choices)  # nothing unscored was released
    finally:
        guard.answer = original
    assert e.value.body["code"] == "guard_unavailable"


def test_buffered_mode_holds_everything_until_scored(make_gateway, guard, upstream):
    upstream.answers = [BENIGN * 4]
    upstream.chunk_delay_s = 0.003
    gw = make_gateway("response: {stream: buffered}\n")
    texts, finish, arrivals = stream_text(gw.client())
    assert texts == {0: BENIGN * 4} and finish == {0: "stop"}
    checks = [t for t in guard.timings if t[0] == "response"]
    assert len(checks) == 1
    # Nothing reached the client before the upstream had finished and the one check had answered.
    assert arrivals[0] >= upstream.streams[-1]["closed_at"] and arrivals[0] >= checks[0][2]


def test_audit_mode_streams_at_once_and_logs_the_verdict(make_gateway, guard, upstream, caplog):
    caplog.set_level(logging.INFO)
    answer = BENIGN + HARMFUL
    upstream.answers = [answer]
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway("response: {stream: audit}\n")
    guard.delay_s = 0.3
    texts, finish, arrivals = stream_text(gw.client())
    assert texts == {0: answer} and finish == {0: "stop"}  # audit never holds back
    deadline = time.monotonic() + 5
    flagged = []
    while not flagged and time.monotonic() < deadline:
        flagged = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("stage") == "response"]
        time.sleep(0.05)
    # Decided by the policy as everywhere else, and logged as not enforced: the client had the answer.
    assert flagged and flagged[0]["outcome"] == "block" and flagged[0]["risk"] == 90
    assert flagged[0]["enforced"] is False
    # The whole answer had reached the client before its check was even answered.
    (check,) = [t for t in guard.timings if t[0] == "response"]
    assert arrivals[-1] < check[2]


def test_unchecked_response_stage_streams_through(make_gateway, guard, upstream):
    upstream.answers = [BENIGN]
    gw = make_gateway("response: {check: false}\n")
    texts, _, _ = stream_text(gw.client())
    assert texts == {0: BENIGN} and response_checks(guard) == []


@pytest.mark.parametrize(("benign_after", "chunk_delay_s"), [(1, 0.0), (20, 0.002)])
def test_repeated_blocked_streams_with_cached_verdicts_never_freeze_the_gateway(make_gateway, guard, upstream,
                                                                                benign_after, chunk_delay_s):
    # The second time on, the blocking verdict comes from the cache without the guard being asked: the cut
    # of the upstream must still let the event loop turn (it once spun at 100% CPU, /healthz included).
    upstream.answers = [HARMFUL + BENIGN * benign_after]
    upstream.chunk_delay_s = chunk_delay_s
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway(windowed_policy(window=16))
    client = gw.client().with_options(timeout=5)
    for _ in range(15):
        texts, finish, _ = stream_text(client)
        assert finish == {0: "content_filter"} and "ammonia" not in texts[0]
        assert httpx.get(f"{gw.url}/healthz", timeout=2).status_code == 200
    assert all(s.get("closed_at") for s in upstream.streams)  # every upstream stream was closed


def test_the_usage_chunk_still_arrives_when_the_only_choice_is_blocked(make_gateway, guard, upstream):
    upstream.answers = [HARMFUL + BENIGN * 5]
    upstream.chunk_delay_s = 0.005  # still generating when the block comes
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    gw = make_gateway(windowed_policy(window=16))
    chunks = list(gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "tell me"}], stream=True,
        stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "content_filter"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert "ammonia" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _hang_up_after(url: str, body: dict, seconds: float) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(seconds))


def test_a_client_leaving_a_plain_request_closes_the_upstream_call(make_gateway, guard, upstream):
    upstream.answer_delay_s = 10
    gw = make_gateway()
    _hang_up_after(gw.url, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 0.5)
    deadline = time.monotonic() + 5
    while not upstream.hung_up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.hung_up, "the upstream call was left running for a client that had gone"


def test_a_client_leaving_a_buffered_stream_closes_the_upstream(make_gateway, guard, upstream):
    upstream.answers = [BENIGN * 40]
    upstream.chunk_delay_s = 0.01  # ~10 s to generate in full
    gw = make_gateway("response: {stream: buffered}\n")
    _hang_up_after(gw.url, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}, 0.5)
    deadline = time.monotonic() + 5
    while "closed_at" not in upstream.streams[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "closed_at" in upstream.streams[-1], "the upstream stream was left running"
    assert upstream.streams[-1]["completed"] is False
