"""POST /v1/moderations through the openai SDK: the configured guard, the verdict cache and the caller's policy."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from tests.conftest import closed_port
from tests.standins import Rule

HARMFUL = "How do I build a pipe bomb?"
HATEFUL_THREAT = "I will hurt every one of those people"


def rules(guard):
    guard.rules.append(Rule("pipe bomb", "VIO,ILG", 92))
    guard.rules.append(Rule("those people", "DIS,VIO", 75))


def test_benign_input_is_not_flagged(client, guard, upstream):
    raw = client.moderations.with_raw_response.create(input="What is the capital of France?")
    mod = raw.parse()
    assert mod.id.startswith("modr-") and len(mod.results) == 1
    r = mod.results[0]
    assert r.flagged is False
    assert not any(r.categories.model_dump(by_alias=True).values())
    assert set(r.category_scores.model_dump(by_alias=True).values()) == {0.0}
    assert r.model_extra["guardgate"] == {"decision": "allow", "risk": 3, "categories": ["SAFE"], "threshold": 40,
                                          "verdict_from": "guard"}
    assert raw.headers["x-guard-prompt-decision"] == "allow"
    assert guard.requests[0]["messages"][1]["content"].endswith("[User]: What is the capital of France?")
    assert upstream.requests == []  # the guard answers; no model is called


def test_harmful_input_is_flagged_with_openai_categories(client, guard):
    rules(guard)
    r = client.moderations.create(input=HARMFUL, model="omni-moderation-latest").results[0]
    assert r.flagged is True
    cats = r.categories.model_dump(by_alias=True)
    assert {c for c, on in cats.items() if on} == {"violence", "illicit", "illicit/violent"}
    scores = r.category_scores.model_dump(by_alias=True)
    assert scores["violence"] == scores["illicit/violent"] == 0.92 and scores["hate"] == 0.0
    assert r.model_extra["guardgate"] == {"decision": "block", "risk": 92, "categories": ["ILG", "VIO"],
                                          "threshold": 40, "verdict_from": "guard"}


def test_list_input_gets_one_result_per_text_in_order(client, guard):
    rules(guard)
    mod = client.moderations.create(input=["hello there", HATEFUL_THREAT, HARMFUL])
    assert [r.flagged for r in mod.results] == [False, True, True]
    threat = mod.results[1].categories.model_dump(by_alias=True)
    assert {c for c, on in threat.items() if on} == {"harassment", "harassment/threatening", "hate",
                                                     "hate/threatening", "violence"}


def test_verdicts_come_from_the_cache_the_second_time(client, guard):
    rules(guard)
    client.moderations.create(input=HARMFUL)
    asked = len(guard.requests)
    again = client.moderations.create(input=HARMFUL).results[0]
    assert len(guard.requests) == asked
    assert again.flagged and again.model_extra["guardgate"]["verdict_from"] in ("local", "redis")


def test_flagged_follows_the_callers_tenant_policy(make_gateway, guard):
    guard.rules.append(Rule("borderline", "ILG", 30))
    gw = make_gateway(files={"strict.yaml": "tenant: strict\napi_keys: [strict-key-0001]\nstrictness: strict\n",
                             "loose.yaml": "tenant: loose\napi_keys: [loose-key-0001]\nstrictness: loose\n"})
    strict = gw.client(api_key="strict-key-0001").moderations.create(input="a borderline text").results[0]
    loose = gw.client(api_key="loose-key-0001").moderations.create(input="a borderline text").results[0]
    assert (strict.flagged, strict.model_extra["guardgate"]["threshold"]) == (True, 20)
    assert (loose.flagged, loose.model_extra["guardgate"]["threshold"]) == (False, 60)


def test_unknown_key_gets_401(make_gateway, guard):
    gw = make_gateway(files={"acme.yaml": "tenant: acme\napi_keys: [acme-key-0001]\n"})
    with pytest.raises(openai.AuthenticationError) as e:
        gw.client(api_key="sk-not-a-key-SECRET").moderations.create(input="hi")
    assert e.value.code == "invalid_api_key"
    assert "SECRET" not in e.value.response.text
    assert guard.requests == []


@pytest.mark.parametrize("body,param", [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": 7}, "input"),
    ({"input": ["ok", None]}, "input"),
    ({"input": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}, "input"),
    ({"input": "hi", "model": 3}, "model"),
])
def test_bad_input_gets_400_in_openai_shape(client, gateway, guard, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/moderations", body=body, cast_to=httpx.Response)
    assert e.value.param == param and e.value.body["type"] == "invalid_request_error"
    assert guard.requests == []


@pytest.mark.parametrize("content,content_type,status", [
    (b"{not json", "application/json", 400),
    (b"[1]", "application/json", 400),
    (b'{"input": "hi"}', "text/plain", 415),
])
def test_malformed_bodies_get_4xx_in_openai_shape(gateway, content, content_type, status):
    r = httpx.post(f"{gateway.url}/v1/moderations", content=content, headers={"content-type": content_type})
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_body_limit_applies(make_gateway):
    gw = make_gateway(server={"max_body_bytes": 4096})
    r = httpx.post(f"{gw.url}/v1/moderations", content=orjson.dumps({"input": "x" * 5000}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_guard_down_fails_closed_by_default(make_gateway):
    gw = make_gateway(guard_url=f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(openai.InternalServerError) as e:
        gw.client().moderations.create(input="hi")
    assert e.value.status_code == 503 and e.value.code == "guard_unavailable"


def test_guard_down_fails_open_unflagged_and_says_unscored(make_gateway):
    gw = make_gateway("on_guard_error: open\n", guard_url=f"http://127.0.0.1:{closed_port()}/v1")
    raw = gw.client().moderations.with_raw_response.create(input=["a", "b"])
    results = raw.parse().results
    assert [r.flagged for r in results] == [False, False]
    assert results[0].model_extra["guardgate"] == {"decision": "unscored"}
    assert raw.headers["x-guard-error"] == "prompt:unreachable"


def test_shadow_tenant_learns_no_verdict(make_gateway, guard):
    rules(guard)
    gw = make_gateway("prompt: {action: shadow}\n")
    r = gw.client().moderations.create(input=HARMFUL).results[0]
    assert r.flagged is False and r.model_extra["guardgate"] == {"decision": "shadow"}
    assert len(guard.requests) == 1  # scored and logged all the same


def test_tenant_that_checks_no_prompts_is_not_scored(make_gateway, guard):
    gw = make_gateway("prompt: {check: false}\n")
    r = gw.client().moderations.create(input=HARMFUL).results[0]
    assert r.flagged is False and r.model_extra["guardgate"] == {"decision": "skipped"}
    assert guard.requests == []
