"""Logs people can use: one access line per request, a text hash on every decision line (the text itself only
for a tenant with `log_texts: true`), and request ids that go from the client to the upstream and back."""

from __future__ import annotations

import hashlib
import io
import logging
import time

import httpx
import openai
import orjson
import pytest

from gateway import logs
from tests.standins import Rule


def events(caplog, event: str) -> list[dict]:
    return [r.fields for r in caplog.records if (getattr(r, "fields", None) or {}).get("event") == event]


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wait_for(caplog, event: str, count: int) -> list[dict]:
    """The access line is written once the answer has gone out: the client may be a moment ahead of it."""
    deadline = time.monotonic() + 5
    while len(events(caplog, event)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return events(caplog, event)


def test_one_access_line_and_hashed_decision_lines_per_request_never_the_text(make_gateway, guard, caplog):
    caplog.set_level(logging.INFO)
    gw = make_gateway()
    client = gw.client()
    guard.rules.append(Rule("pipe bomb", "VIO", 95))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "a private question about tides"}])
    request_id = raw.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "a pipe bomb"}])

    access = [a for a in wait_for(caplog, "access", 2) if a["route"] == "chat_completions"]
    assert len(access) == 2
    first, second = access
    assert first["request_id"] == request_id == raw.headers["x-guard-request-id"]
    assert (first["tenant"], first["model"], first["status"], first["outcome"]) == ("default", "gpt-4o-mini", 200,
                                                                                    "allowed")
    assert (second["status"], second["outcome"]) == (400, "blocked_prompt")
    assert first["total_ms"] >= first["guard_ms"] > 0 and first["upstream_ms"] > 0
    assert second["upstream_ms"] == 0  # a blocked prompt never reaches the upstream

    decisions = events(caplog, "decision")
    mine = [d for d in decisions if d["request_id"] == request_id]
    assert [d["stage"] for d in mine] == ["prompt", "response"]
    assert mine[0]["text_sha256"] == sha16("a private question about tides")
    assert mine[1]["text_sha256"] == sha16("You said: a private question about tides")  # the answer
    assert mine[1]["context_sha256"] == sha16("a private question about tides")
    blocked = [d for d in decisions if d["request_id"] == second["request_id"]]
    assert blocked[0]["outcome"] == "block" and blocked[0]["text_sha256"] == sha16("a pipe bomb")
    # Neither text is in any line.
    everything = "\n".join(orjson.dumps(getattr(r, "fields", {}) or {}).decode() + r.getMessage()
                           for r in caplog.records)
    assert "tides" not in everything and "pipe bomb" not in everything
    assert not any("scored_text" in d for d in decisions)


def test_a_tenant_with_log_texts_gets_its_scored_texts_logged(make_gateway, caplog):
    caplog.set_level(logging.INFO)
    gw = make_gateway(files={"triage.yaml": "tenant: triage\napi_keys: [triage-key-001]\nlog_texts: true\n",
                             "quiet.yaml": "tenant: quiet\napi_keys: [quiet-key-0001]\n"})
    gw.client(api_key="triage-key-001").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "reported false positive"}])
    gw.client(api_key="quiet-key-0001").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "not for the logs"}])
    decisions = events(caplog, "decision")
    triage = [d for d in decisions if d["tenant"] == "triage"]
    assert [(d["stage"], d["scored_text"]) for d in triage] == [
        ("prompt", "reported false positive"), ("response", "You said: reported false positive")]
    assert triage[1]["scored_context"] == "reported false positive"
    quiet = [d for d in decisions if d["tenant"] == "quiet"]
    assert len(quiet) == 2 and not any("scored_text" in d or "scored_context" in d for d in quiet)
    assert "not for the logs" not in "\n".join(orjson.dumps(r.fields).decode() for r in caplog.records
                                               if getattr(r, "fields", None))


def test_the_clients_request_id_goes_upstream_and_comes_back(make_gateway, upstream, caplog):
    caplog.set_level(logging.INFO)
    gw = make_gateway()
    client = gw.client(organization="org-demo", project="proj-demo")
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Request-ID": "trace-42:abc.DEF_1", "X-Not-Allowed": "secret-ish"})
    assert raw.headers["x-request-id"] == "trace-42:abc.DEF_1"
    sent = upstream.requests[-1]["headers"]
    assert sent["x-request-id"] == "trace-42:abc.DEF_1"
    assert sent["openai-organization"] == "org-demo" and sent["openai-project"] == "proj-demo"
    assert "x-not-allowed" not in sent
    assert sent["authorization"] == "Bearer sk-upstream-SECRET-0123456789"  # never the client's key
    assert [a["request_id"] for a in wait_for(caplog, "access", 1) if a["route"] == "chat_completions"] == [
        "trace-42:abc.DEF_1"]
    assert [d["request_id"] for d in events(caplog, "decision")] == ["trace-42:abc.DEF_1"] * 2

    # An id that is too long or carries unsafe characters is replaced by a new one, used everywhere alike.
    for bad in ("x" * 129, "two words", "semi;colon", "nl%0d%0a"):
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-ID": bad})
        new = raw.headers["x-request-id"]
        assert new != bad and len(new) == 32 and int(new, 16) >= 0
        assert upstream.requests[-1]["headers"]["x-request-id"] == new == raw.headers["x-guard-request-id"]

    # Without one, the gateway makes one and still sends it upstream and back.
    raw = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
    assert raw.headers["x-request-id"] == upstream.requests[-1]["headers"]["x-request-id"]

    # Errors carry it too, and the upstream's own id is kept under another name.
    upstream.message = {"role": "assistant", "content": "fine"}
    upstream.headers = {"x-request-id": "req_upstream_own"}
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Request-ID": "mine-1"})
    assert raw.headers["x-request-id"] == "mine-1" and raw.headers["x-upstream-request-id"] == "req_upstream_own"
    bad = httpx.post(f"{gw.url}/v1/chat/completions", content=b"{not json", headers={
        "content-type": "application/json", "x-request-id": "mine-2"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "mine-2"


def test_the_forwarded_headers_are_configurable(make_gateway, upstream):
    gw = make_gateway(upstream={"forward_headers": ["X-Trace-Parent"]})
    gw.client(organization="org-demo").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Trace-Parent": "00-abc-01",
                                                                                 "X-Request-ID": "not-sent-up"})
    sent = upstream.requests[-1]["headers"]
    assert sent["x-trace-parent"] == "00-abc-01"
    assert "openai-organization" not in sent and "x-request-id" not in sent


def test_text_log_format_is_one_readable_line_per_event():
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level, writer = root.handlers[:], root.level, logs._writer
    try:
        logs.configure_logging("info", "text", stream=stream)
        logging.getLogger("guardgate").info("decision", extra={"fields": {
            "event": "decision", "request_id": "r1", "tenant": "kids-app", "stage": "prompt", "risk": 85,
            "categories": ["VIO", "ILG"], "outcome": "block", "reason": "risk 85 >= 20 (strictness strict)",
            "text_sha256": "b62e24a2f9a5648f", "scored_text": "two\nlines"}})
    finally:
        root.handlers[:], logs._writer = handlers, writer
        root.setLevel(level)
    line = stream.getvalue()
    assert line.count("\n") == 1  # a newline inside a value is escaped, never a second line
    assert " INFO    decision  request_id=r1 tenant=kids-app stage=prompt risk=85 categories=VIO,ILG outcome=block " \
           'reason="risk 85 >= 20 (strictness strict)" text_sha256=b62e24a2f9a5648f scored_text="two\\nlines"' in line
