"""The pure parts of the access line: which client request ids are kept, and what a request's outcome is."""

from __future__ import annotations

from gateway.access import RequestContext, outcome_of, request_id_from
from gateway.guard.base import Verdict
from gateway.moderation import Report, text_hash
from gateway.policy.decide import decide
from gateway.policy.schema import Policy


def test_a_safe_client_request_id_is_kept_and_anything_else_replaced():
    for kept in ("abc", "req_0123:4.5-6", "A" * 128, "0f8fad5b-d9cb-469f-a165-70867728950e"):
        assert request_id_from(kept) == kept
    for replaced in (None, "", "A" * 129, "-leading-dash", "sp ace", "new\nline", "quote\"", "ünïcode", "a/b"):
        new = request_id_from(replaced)
        assert new != replaced and len(new) == 32 and all(c in "0123456789abcdef" for c in new)


def report_with(policy: Policy, stage: str, risk: int) -> Report:
    report = Report(policy=policy)
    report.stage(stage).decisions.append(decide(Verdict(risk, ("VIO",) if risk > 40 else ("SAFE",)), policy, stage))
    return report


def test_outcomes():
    def outcome(route: str, status: int, report: Report | None = None, **ctx_fields) -> str:
        return outcome_of(RequestContext("r", route, report=report, **ctx_fields), status)

    flagging = Policy(prompt={"action": "flag"})
    assert outcome("chat_completions", 200, report_with(flagging, "prompt", 90)) == "flagged"
    assert outcome("chat_completions", 200, report_with(Policy(), "prompt", 3)) == "allowed"
    assert outcome("chat_completions", 400, report_with(Policy(), "prompt", 90)) == "blocked_prompt"
    # A moderation answer that flags a text is an answer, not a blocked request.
    assert outcome("moderations", 200, report_with(Policy(), "prompt", 90)) == "served"
    assert outcome("chat_completions", 503, outcome="overloaded") == "overloaded"
    assert outcome("chat_completions", 499, report_with(Policy(), "prompt", 3)) == "disconnected"
    assert outcome("chat_completions", 500) == "internal_error"
    assert outcome("chat_completions", 415, Report(policy=Policy())) == "client_error"
    assert outcome("models", 200) == "served" and outcome("models", 502) == "upstream_error"
    assert outcome("other", 404) == "client_error"


def test_the_text_hash_is_the_first_16_hex_digits_of_sha256_and_takes_lone_surrogates():
    assert text_hash("hello") == "2cf24dba5fb0a30e"
    assert len(text_hash("\ud800 broken")) == 16
