"""Hiding the guard's latency: the parallel prompt check, the windowed cadence with a slow guard, and
reasoning chosen per stage. A stand-in guard that takes a fixed time per call; timings have wide margins
(a shared, noisy machine), and every bound asserted is one that the sum of the waits would break."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.standins import Rule
from tests.test_streaming_e2e import BENIGN, HARMFUL, stream_text

PROMPT = [{"role": "user", "content": "tell me about leaves"}]


def _timed(fn):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def _first_token_s(client, **kw) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    for chunk in client.chat.completions.create(model="m", messages=PROMPT, stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            return time.monotonic() - started
    raise AssertionError("no text arrived")


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ----- parallel prompt check -----

@pytest.mark.parametrize("stream", [False, True])
def test_a_parallel_prompt_check_overlaps_the_upstream_call(make_gateway, guard, upstream, stream):
    guard.delay_s = 0.8
    upstream.answers = [BENIGN]
    if stream:
        upstream.first_chunk_delay_s = 0.8
    else:
        upstream.answer_delay_s = 0.8
    gw = make_gateway("response: {check: false}\n", files={
        "before.yaml": "tenant: before\napi_keys: [key-before-0001]\nprompt: {timing: before}\n",
        "parallel.yaml": "tenant: parallel\napi_keys: [key-parallel-01]\nprompt: {timing: parallel}\n"})

    def first_token(key: str) -> float:
        client = gw.client(api_key=key)
        if stream:
            return _first_token_s(client)
        _, took = _timed(lambda: client.chat.completions.create(model="m", messages=PROMPT))
        return took

    before, parallel = first_token("key-before-0001"), first_token("key-parallel-01")
    assert before >= 1.55  # guard, then upstream: the sum, whatever the machine
    assert parallel < 1.3, f"parallel took {parallel:.2f} s: about max(guard, upstream) = 0.8 s expected"


def test_in_parallel_mode_a_windowed_stream_pays_the_prompt_check_only_where_it_outlasts_the_upstream(
        make_gateway, guard, upstream):
    guard.delay_s = 0.8
    upstream.answers = [BENIGN]
    upstream.first_chunk_delay_s = 0.1
    upstream.chunk_delay_s = 0.005  # the text comes after the role chunk, not in one read with it
    gw = make_gateway("prompt: {timing: parallel}\nresponse: {stream: windowed, window: 64, first_window: 32}\n")
    took = _first_token_s(gw.client())
    # The first window is read and checked while the prompt is scored: max(0.8, 0.1 + 0.8) = 0.9 s, where
    # one after the other would be 0.8 + 0.1 + 0.8 = 1.7 s.
    assert took < 1.35, f"first token after {took:.2f} s"


@pytest.mark.parametrize("stream", [False, True])
def test_a_blocked_prompt_in_parallel_mode_cancels_the_upstream_call_and_gets_400(make_gateway, guard, upstream,
                                                                                 stream):
    guard.delay_s = 0.5
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    upstream.answers = [BENIGN * 20]
    if stream:
        upstream.chunk_delay_s = 0.02  # ~7 s to generate: still generating when the verdict comes
    else:
        upstream.answer_delay_s = 10
    gw = make_gateway("prompt: {timing: parallel}\n")
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="m", stream=stream, messages=[
            {"role": "user", "content": "how do I mix the bleach with ammonia"}])
    assert e.value.status_code == 400 and e.value.code == "content_filter"
    assert len(upstream.requests) == 1  # the upstream was called at once...
    if stream:  # ...and its stream closed before it was done
        assert _wait_for(lambda: "closed_at" in upstream.streams[-1]), "the upstream stream was left running"
        assert upstream.streams[-1]["completed"] is False
    else:  # ...and its call cancelled, its connection closed
        assert _wait_for(lambda: bool(upstream.hung_up)), "the upstream call was left running"


def test_a_blocked_prompt_in_parallel_mode_is_400_on_the_wire_with_no_stream_byte(make_gateway, guard, upstream):
    guard.delay_s = 0.3
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    upstream.answers = [BENIGN]
    gw = make_gateway("prompt: {timing: parallel}\n")
    r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=10, json={
        "model": "m", "stream": True, "messages": [{"role": "user", "content": "mix the bleach with ammonia"}]})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "content_filter" and "data:" not in r.text
    assert r.headers["x-guard-prompt-decision"] == "block"


def test_an_allowed_parallel_stream_carries_the_prompts_verdict_headers(make_gateway, guard, upstream):
    guard.delay_s = 0.3
    upstream.answers = [BENIGN]
    gw = make_gateway("prompt: {timing: parallel}\n")
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=10, json={
            "model": "m", "stream": True, "messages": PROMPT}) as r:
        body = r.read().decode()
    assert r.status_code == 200 and r.headers["x-guard-prompt-decision"] == "allow"
    assert r.headers["x-guard-stream-mode"] == "windowed" and body.endswith("data: [DONE]\n\n")


def test_a_client_leaving_during_a_parallel_prompt_check_closes_the_upstream_stream(make_gateway, guard, upstream):
    guard.delay_s = 3.0
    upstream.answers = [BENIGN * 40]
    upstream.chunk_delay_s = 0.01  # ~14 s to generate in full
    gw = make_gateway("prompt: {timing: parallel}\n")
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.url}/v1/chat/completions", timeout=httpx.Timeout(0.8), json={
            "model": "m", "stream": True, "messages": PROMPT})
    assert _wait_for(lambda: bool(upstream.streams) and "closed_at" in upstream.streams[-1]), \
        "the upstream stream was left running"
    assert upstream.streams[-1]["completed"] is False
    assert upstream.streams[-1]["closed_at"] - started < 2.5  # at the hang-up, not when the guard answered


@pytest.mark.parametrize("stream", [False, True])
def test_a_harmful_answer_is_still_withheld_in_parallel_mode(make_gateway, guard, upstream, stream):
    guard.delay_s = 0.2
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    upstream.answers = [BENIGN + HARMFUL + BENIGN]
    gw = make_gateway("prompt: {timing: parallel}\nresponse: {window: 64}\n")
    client = gw.client()
    if stream:
        texts, finish, _ = stream_text(client)
        assert finish == {0: "content_filter"} and "ammonia" not in texts.get(0, "")
    else:
        r = client.chat.completions.with_raw_response.create(model="m", messages=PROMPT)
        completion = r.parse()
        assert completion.choices[0].finish_reason == "content_filter"
        assert "ammonia" not in (completion.choices[0].message.content or "")
        assert r.headers["x-guard-prompt-decision"] == "allow"  # the prompt's verdict, though known last
        assert r.headers["x-guard-response-decision"] == "block"


@pytest.mark.parametrize("on_guard_error", ["closed", "open"])
def test_a_guard_failure_in_parallel_mode_follows_on_guard_error(make_gateway, guard, upstream, on_guard_error):
    guard.failure = "500"
    upstream.answers = [BENIGN]
    upstream.answer_delay_s = 10 if on_guard_error == "closed" else 0.0
    gw = make_gateway(f"prompt: {{timing: parallel}}\nresponse: {{check: false}}\non_guard_error: {on_guard_error}\n")
    if on_guard_error == "closed":
        with pytest.raises(openai.APIStatusError) as e:
            gw.client().chat.completions.create(model="m", messages=PROMPT)
        assert e.value.status_code == 503 and e.value.code == "guard_unavailable"
        assert _wait_for(lambda: bool(upstream.hung_up)), "the upstream call was left running"
    else:
        r = gw.client().chat.completions.with_raw_response.create(model="m", messages=PROMPT)
        assert r.parse().choices[0].message.content == BENIGN
        assert r.headers["x-guard-prompt-decision"] == "unscored"


# ----- windowed cadence with a slow guard -----

def test_a_slow_guard_keeps_a_windowed_stream_in_order_fully_scored_and_stalling_at_most_one_guard_call(
        make_gateway, guard, upstream):
    g = 0.6  # each guard call
    guard.delay_s = g
    answer = BENIGN * 12  # ~1.6k characters, 4 a chunk every 10 ms: ~4 s of generation at ~400 chars/s
    upstream.answers = [answer]
    upstream.chunk_delay_s = 0.01
    gw = make_gateway("response: {stream: windowed, window: 64, first_window: 32}\n")
    pieces: list[tuple[float, str]] = []
    started = time.monotonic()
    for chunk in gw.client().chat.completions.create(model="m", messages=PROMPT, stream=True):
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append((time.monotonic(), choice.delta.content))
    released = "".join(p for _, p in pieces)
    assert released == answer  # in order, all of it

    # No byte before a check that covered it had answered.
    approved = [(when, text) for when, text in guard.answered if answer.startswith(text) and text]
    so_far = ""
    for when, piece in pieces:
        so_far += piece
        assert any(done <= when and len(text) >= len(so_far) for done, text in approved), \
            f"{len(so_far)} characters reached the client before a check covered them"

    # The claim: the first piece after the prompt check + the first window's check (32 chars at 400/s);
    # then a piece about every guard call (a window is whatever arrived during the last check).
    first_token = pieces[0][0] - started
    assert first_token < 2 * g + 0.08 + 0.6, f"first token after {first_token:.2f} s"
    stalls = [b - a for (a, _), (b, _) in zip(pieces, pieces[1:])]
    assert max(stalls) < g + 0.45, f"a stall of {max(stalls):.2f} s with a {g} s guard"
    # Back-to-back window checks (not one per 64 characters): about one per guard call of generation.
    checks = [t for t in guard.answered if t[1] != PROMPT[0]["content"]]
    assert 4 <= len(checks) <= len(answer) // 64


def test_the_check_of_the_whole_answer_does_not_wait_for_the_window_check_in_flight(make_gateway, guard, upstream):
    guard.delay_s = 1.2
    upstream.answers = [BENIGN * 2]  # ~280 characters, over in a fraction of a second
    upstream.chunk_delay_s = 0.002
    gw = make_gateway("response: {stream: windowed, window: 64, first_window: 32}\n")
    (texts, finish, _), took = _timed(lambda: stream_text(gw.client()))
    assert texts == {0: BENIGN * 2} and finish == {0: "stop"}
    # The prompt check (1.2), then the first window's check (1.2), during which the answer completes: the
    # final check starts then, alongside it (~2.7 s in all), not after it (3.6 s).
    assert took < 3.2, f"the stream took {took:.2f} s"


# ----- reasoning per stage -----

def _thinking(request: dict) -> bool:
    return (request.get("chat_template_kwargs") or {}).get("enable_thinking") is not False \
        and not request.get("continue_final_message")


def test_a_policy_chooses_reasoning_per_stage(make_gateway, guard, upstream):
    upstream.answers = [BENIGN * 3]
    upstream.chunk_delay_s = 0.004
    gw = make_gateway("prompt: {reasoning: off}\n"
                      "response: {stream: windowed, window: 64, first_window: 32, window_reasoning: off, "
                      "reasoning: on}\n")
    texts, finish, _ = stream_text(gw.client())
    assert texts == {0: BENIGN * 3} and finish == {0: "stop"}
    prompt_calls = [r for r in guard.requests if "\n[Assistant]: " not in r["messages"][1]["content"]]
    answer_calls = [r for r in guard.requests if "\n[Assistant]: " in r["messages"][1]["content"]]
    assert prompt_calls and not any(_thinking(r) for r in prompt_calls)
    whole = [r for r in answer_calls if r["messages"][1]["content"].endswith(BENIGN * 3)]
    windows = [r for r in answer_calls if r not in whole]
    assert windows and not any(_thinking(r) for r in windows)
    assert any(_thinking(r) for r in whole)  # the finish waited for the reasoning check of the whole answer


def test_a_verdict_given_without_reasoning_is_not_served_to_a_tenant_that_asks_for_reasoning(
        make_gateway, guard, upstream):
    gw = make_gateway("response: {check: false}\n", files={
        "fast.yaml": "tenant: fast\napi_keys: [key-fast-00001]\nprompt: {reasoning: off}\n",
        "careful.yaml": "tenant: careful\napi_keys: [key-careful-01]\n"})  # default: as the guard, on
    fast, careful = gw.client(api_key="key-fast-00001"), gw.client(api_key="key-careful-01")
    fast.chat.completions.create(model="m", messages=PROMPT)
    r = careful.chat.completions.with_raw_response.create(model="m", messages=PROMPT)
    assert r.headers["x-guard-prompt-verdict-from"] == "guard"  # not the cached verdict of the other call
    assert [_thinking(q) for q in guard.requests] == [False, True]
    for client in (fast, careful):  # each its own verdict, cached
        r = client.chat.completions.with_raw_response.create(model="m", messages=PROMPT)
        assert r.headers["x-guard-prompt-verdict-from"] == "local"
    assert len(guard.requests) == 2
