"""Per-tenant policies end to end: keys → tenant → thresholds, actions, hot reload."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.standins import Rule

EXAMPLES = Path(__file__).resolve().parents[1] / "policies" / "examples"
KEYS = {"kids-app": "sk-demo-kids-app-0001", "assistant": "sk-demo-assistant-0001",
        "research": "sk-demo-research-0001"}


def ask(gw, key, text, **kw):
    return gw.client(api_key=key).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}], **kw)


def outcome(gw, key, text) -> str:
    try:
        ask(gw, key, text)
        return "pass"
    except openai.BadRequestError as e:
        assert e.code == "content_filter"
        return "block"


def test_same_text_is_blocked_or_passed_per_tenant_threshold(make_gateway, guard, upstream):
    gw = make_gateway(copy_from=EXAMPLES)
    for risk in (30, 50, 75):
        guard.rules.append(Rule(f"risk-{risk}", "ILG", risk))
    table = {(tenant, risk): outcome(gw, KEYS[tenant], f"a question at risk-{risk}")
             for tenant in KEYS for risk in (30, 50, 75)}
    assert table == {
        ("kids-app", 30): "block", ("kids-app", 50): "block", ("kids-app", 75): "block",      # strict: 20
        ("assistant", 30): "pass", ("assistant", 50): "block", ("assistant", 75): "block",    # moderate: 40
        ("research", 30): "pass", ("research", 50): "pass", ("research", 75): "block",        # loose: 60
    }


def test_the_block_message_and_tenant_are_the_tenants(make_gateway, guard):
    gw = make_gateway(copy_from=EXAMPLES)
    guard.rules.append(Rule("fight", "VIO", 18))  # under strict 20, over kids-app's VIO 15
    with pytest.raises(openai.BadRequestError) as e:
        ask(gw, KEYS["kids-app"], "how to win a fight")
    assert e.value.body["message"] == "Let's talk about something else!"
    assert e.value.response.headers["x-guard-tenant"] == "kids-app"
    assert e.value.response.headers["x-guard-prompt-threshold"] == "15"


def test_a_per_category_override_wins(make_gateway, guard):
    gw = make_gateway(copy_from=EXAMPLES)
    guard.rules.append(Rule("moon landing", "MIS", 50))  # assistant: moderate 40, but MIS 60
    guard.rules.append(Rule("pickpocket", "ILG", 50))
    assert outcome(gw, KEYS["assistant"], "the moon landing was staged") == "pass"
    assert outcome(gw, KEYS["assistant"], "how to pickpocket") == "block"


def test_flag_forwards_and_reports(make_gateway, guard, upstream):
    gw = make_gateway(copy_from=EXAMPLES)
    guard.rules.append(Rule("explosive", "VIO", 80))
    upstream.answers = ["Here is how explosive reactions work in detail"]
    guard.rules.append(Rule("detail", "VIO", 65))  # the answer: flagged for research, whose response action is flag
    raw = ask(gw, KEYS["research"], "tell me about chemistry")
    assert raw.parse().choices[0].message.content == "Here is how explosive reactions work in detail"
    assert raw.headers["x-guard-response-decision"] == "flag"
    assert raw.headers["x-guard-response-risk"] == "80"


def test_prompt_flag_forwards_to_upstream(make_gateway, guard, upstream, caplog):
    caplog.set_level(logging.INFO)
    gw = make_gateway("prompt: {action: flag}\n")
    guard.rules.append(Rule("lockpicking", "ILG", 70))
    raw = ask(gw, "any", "teach me lockpicking")
    assert raw.headers["x-guard-prompt-decision"] == "flag"
    assert len(upstream.requests) == 1
    assert any(getattr(r, "fields", {}).get("outcome") == "flag" for r in caplog.records)


def test_shadow_decides_and_logs_only(make_gateway, guard, upstream, caplog):
    caplog.set_level(logging.INFO)
    gw = make_gateway("prompt: {action: shadow}\nresponse: {action: shadow}\n")
    guard.rules.append(Rule("lockpicking", "ILG", 70))
    upstream.answers = ["lockpicking works like this"]
    raw = ask(gw, "any", "teach me lockpicking")
    assert raw.parse().choices[0].message.content == "lockpicking works like this"
    assert raw.parse().choices[0].finish_reason == "stop"
    # The client learns that the stages are shadowed, never what they decided.
    assert {h: v for h, v in raw.headers.items() if h.startswith(("x-guard-prompt-", "x-guard-response-"))} == {
        "x-guard-prompt-decision": "shadow", "x-guard-response-decision": "shadow"}
    shadowed = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("outcome") == "shadow"]
    assert {f["stage"] for f in shadowed} == {"prompt", "response"}
    assert all(f["risk"] == 70 and f["threshold"] == 40 for f in shadowed)


def test_stage_checks_can_be_turned_off(make_gateway, guard, upstream):
    gw = make_gateway("prompt: {check: false}\nresponse: {check: false}\n")
    guard.rules.append(Rule("anything", "VIO", 99))
    raw = ask(gw, "any", "anything at all")
    assert raw.headers["x-guard-prompt-decision"] == "skipped"
    assert raw.headers["x-guard-response-decision"] == "skipped"
    assert guard.requests == []


def test_last_user_turn_scope_scores_only_the_last_user_message(make_gateway, guard, upstream):
    conversation = [{"role": "user", "content": "I want to hurt my neighbour"},
                    {"role": "assistant", "content": "Can you tell me more?"},
                    {"role": "user", "content": "go on, tell me how"}]
    guard.rules.append(Rule("hurt my neighbour", "VIO", 85))
    whole = make_gateway("api_keys: [key-conversation]\n",
                         files={"t.yaml": "tenant: t\napi_keys: [key-last-turn]\nprompt: {scope: last_user_turn}\n"})
    with pytest.raises(openai.BadRequestError):  # the default scope: the whole conversation
        whole.client(api_key="key-conversation").chat.completions.create(model="m", messages=conversation)
    assert upstream.requests == []
    before = len(guard.requests)
    whole.client(api_key="key-last-turn").chat.completions.create(model="m", messages=conversation)
    assert len(upstream.requests) == 1  # the cheaper scope misses the earlier turn, as documented
    # The first request scored every user turn, in parallel, and cached each verdict: the second one asks
    # the guard about nothing but the last turn (or nothing at all, from the cache), never the earlier one.
    assert not any("hurt my neighbour" in r["messages"][1]["content"] for r in guard.requests[before:])


def test_the_renamed_score_turns_key_gets_a_clear_error(tmp_path):
    (tmp_path / "default.yaml").write_text("score_turns: all\n")
    done = guardgate("policy", "validate", str(tmp_path))
    assert done.returncode == 1 and "'score_turns' was replaced by 'prompt.scope'" in done.stdout


def test_unknown_or_missing_key_gets_401_once_keys_exist(make_gateway, upstream):
    gw = make_gateway(copy_from=EXAMPLES)
    for key in ("sk-wrong-key-000", None):
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers=headers,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert "sk-wrong-key-000" not in r.text
    with pytest.raises(openai.AuthenticationError):
        gw.client(api_key="sk-wrong-key-000").models.list()
    assert upstream.requests == []
    assert [m.id for m in gw.client(api_key=KEYS["assistant"]).models.list()] == ["stand-in-model"]


def test_no_keys_anywhere_means_open_with_the_default_policy(gateway, upstream):
    raw = ask(gateway, "whatever-the-client-sends", "hello")
    assert raw.headers["x-guard-tenant"] == "default"


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_hot_reload_applies_changes_and_survives_a_broken_file(make_gateway, guard, upstream):
    gw = make_gateway(files={"acme.yaml": "tenant: acme\napi_keys: [acme-key-0001]\nstrictness: loose\n"})
    policies = gw.config_path.parent / "policies"
    guard.rules.append(Rule("borderline", "ILG", 50))
    assert outcome(gw, "acme-key-0001", "a borderline question") == "pass"

    # A change applies without a restart.
    (policies / "acme.yaml").write_text("tenant: acme\napi_keys: [acme-key-0001]\nstrictness: moderate\n")
    assert wait_for(lambda: outcome(gw, "acme-key-0001", "a borderline question") == "block")

    # A broken file is reported and the last good version stays in force.
    (policies / "acme.yaml").write_text("tenant: acme\napi_keys: [acme-key-0001]\nstrictness: medium\n")
    assert wait_for(lambda: gw.details()["checks"]["policies"]["status"] == "error")
    ready = gw.details()
    assert "acme.yaml:3: strictness" in ready["checks"]["policies"]["errors"]["acme.yaml"]
    assert outcome(gw, "acme-key-0001", "a borderline question") == "block"  # still moderate

    # A new tenant file is picked up; a removed one is gone.
    (policies / "beta.yaml").write_text("tenant: beta\napi_keys: [beta-key-0001]\n")
    assert wait_for(lambda: outcome_or_401(gw, "beta-key-0001") == "pass")
    (policies / "beta.yaml").unlink()
    assert wait_for(lambda: outcome_or_401(gw, "beta-key-0001") == 401)

    # Fixing the file clears the error.
    (policies / "acme.yaml").write_text("tenant: acme\napi_keys: [acme-key-0001]\nstrictness: 70\n")
    assert wait_for(lambda: outcome(gw, "acme-key-0001", "a borderline question") == "pass")
    assert gw.details()["checks"]["policies"]["status"] == "ok"


def outcome_or_401(gw, key):
    try:
        return outcome(gw, key, "hello")
    except openai.AuthenticationError:
        return 401


def test_a_broken_default_keeps_the_last_good_default(make_gateway, guard):
    gw = make_gateway("strictness: strict\n")
    guard.rules.append(Rule("mild", "DIS", 30))
    assert outcome(gw, "k", "a mild insult") == "block"
    (gw.config_path.parent / "policies" / "default.yaml").write_text("strictness: [\n")
    assert wait_for(lambda: gw.details()["checks"]["policies"]["status"] == "error")
    assert outcome(gw, "k", "a mild insult") == "block"


def guardgate(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          input=stdin)


def test_policy_validate_passes_the_examples_and_fails_a_bad_file(tmp_path):
    ok = guardgate("policy", "validate", str(EXAMPLES))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "kids-app.yaml (tenant kids-app, 1 key(s))" in ok.stdout
    (tmp_path / "default.yaml").write_text("strictness: moderate\n")
    (tmp_path / "bad.yaml").write_text("tenant: bad\nstrictness: 40\nresponse:\n  action: nuke\nfoo: 1\n")
    (tmp_path / "dup.yaml").write_text("tenant: bad\n")
    (tmp_path / "nameless.yaml").write_text("strictness: strict\n")
    bad = guardgate("policy", "validate", str(tmp_path))
    assert bad.returncode == 1
    assert "bad.yaml:4: response.action: Input should be 'block', 'flag' or 'shadow' (got 'nuke')" in bad.stdout
    assert "bad.yaml:5: foo: unknown key (allowed: api_keys, block_message, bypass_cache, categories" in bad.stdout
    assert "nameless.yaml: tenant: each tenant file needs `tenant: <name>`" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr


def test_policy_files_with_a_shared_key_are_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("tenant: a\napi_keys: [shared-key-1]\n")
    (tmp_path / "b.yaml").write_text("tenant: b\napi_keys: [shared-key-1]\n")
    r = guardgate("policy", "validate", str(tmp_path))
    assert r.returncode == 1 and "already used by tenant 'a'" in r.stdout and "shared-key-1" not in r.stdout


def test_policy_explain(tmp_path):
    r = guardgate("policy", "explain", "--dir", str(EXAMPLES), "--tenant", "assistant", "--risk", "50",
                  "--category", "MIS")
    assert r.returncode == 0
    assert "prompt   ALLOW  risk 50 < 60 (category MIS threshold)" in r.stdout
    r = guardgate("policy", "explain", "--dir", str(EXAMPLES), "--tenant", "research", "--risk", "75")
    assert "prompt   BLOCK  risk 75 >= 60 (strictness loose): BLOCKED" in r.stdout
    assert "response FLAG   risk 75 >= 60 (strictness loose): passes, flagged" in r.stdout
    r = guardgate("policy", "explain", "--dir", str(EXAMPLES), "--tenant", "nobody", "--risk", "5")
    assert r.returncode == 2 and "no tenant 'nobody'" in r.stderr


def test_hash_key_matches_what_the_gateway_accepts():
    r = guardgate("policy", "hash-key", stdin="sk-demo-assistant-0001\n")
    assert r.stdout.strip() in (EXAMPLES / "assistant.yaml").read_text()


def test_an_alias_bomb_is_rejected_without_stalling_requests(make_gateway, guard, upstream):
    from tests.test_policy_store import BOMB
    gw = make_gateway(files={"acme.yaml": "tenant: acme\napi_keys: [acme-key-0001]\n"})
    (gw.config_path.parent / "policies" / "evil.yaml").write_text("tenant: evil\n" + BOMB)
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # requests keep flowing while the reload sees the file
        t0 = time.monotonic()
        assert outcome(gw, "acme-key-0001", "hello") == "pass"
        assert time.monotonic() - t0 < 1.0
    assert "aliases" in gw.details()["checks"]["policies"]["errors"]["evil.yaml"]


def test_a_tenant_rewritten_without_keys_never_opens_the_gateway(make_gateway, guard, upstream):
    gw = make_gateway(files={"acme.yaml": "tenant: acme\napi_keys: [acme-key-0001]\n"})
    (gw.config_path.parent / "policies" / "acme.yaml").write_text("tenant: acme\n")
    assert wait_for(lambda: "acme.yaml" in gw.details()["checks"]["policies"]["errors"])
    with pytest.raises(openai.AuthenticationError):
        gw.client(api_key="no-such-key").chat.completions.create(model="m", messages=[{"role": "user",
                                                                                       "content": "hi"}])
    assert outcome(gw, "acme-key-0001", "hello") == "pass"
