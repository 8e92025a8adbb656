"""`POST /v1/moderations`: OpenAI's Moderation API answered by the configured guard, through the same
moderation step (cache → guard → decide) and the same prompt-stage policy as chat completions."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.errors import ClientError, GatewayError
from gateway.guard.base import GuardInput
from gateway.moderation import Report
from gateway.pipeline import Gateway, check_json_content_type, read_body
from gateway.policy.decide import Decision

# OpenAI's categories, in its order, and the guard categories each one is read from: all of them must be
# named (a compound such as hate/threatening needs both). Self-harm, sexual/minors and violence/graphic have
# no guard category of their own (the guard folds them into VIO and SEX), so they are never set.
OPENAI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harassment": ("DIS",),
    "harassment/threatening": ("DIS", "VIO"),
    "hate": ("DIS",),
    "hate/threatening": ("DIS", "VIO"),
    "illicit": ("ILG",),
    "illicit/violent": ("ILG", "VIO"),
    "self-harm": (),
    "self-harm/intent": (),
    "self-harm/instructions": (),
    "sexual": ("SEX",),
    "sexual/minors": (),
    "violence": ("VIO",),
    "violence/graphic": (),
}
EXTENSION = "guardgate"  # the key of GuardGate's own fields in each result


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other fields are accepted and ignored
    input: StrictStr | list[StrictStr] = Field(min_length=1)
    model: StrictStr | None = None  # accepted and ignored: the configured guard answers


def parse_moderation_request(body: bytes) -> ModerationRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ClientError(400, "We could not parse the JSON body of your request. Send a JSON object with "
                               "'input'.") from None
    if not isinstance(data, dict):
        raise ClientError(400, "The request body must be a JSON object.")
    if "input" not in data:
        raise ClientError(400, "Missing required parameter: 'input'.", param="input",
                          code="missing_required_parameter")
    try:
        return ModerationRequest.model_validate(data)
    except ValidationError as e:
        param = str(e.errors(include_url=False)[0]["loc"][0])
        if param == "input":
            message = ("Invalid value for 'input': expected a string or a non-empty array of strings "
                       "(GuardGate scores text; image inputs are not accepted).")
        else:
            message = f"Invalid value for '{param}': expected a string."
        raise ClientError(400, message, param=param, code="invalid_value") from None


def result(decision: Decision | None, status: str, source: str | None = None) -> dict[str, Any]:
    """One input's result. `status` is the decision, or skipped / shadow / unscored when the client may
    not learn a verdict: then nothing is flagged and every score is 0."""
    shown = decision if status not in ("shadow", "skipped", "unscored") else None
    named = set(shown.categories) if shown else set()
    # A category scores the verdict's risk when the guard named every guard category it is read from.
    scores = {c: shown.risk / 100 if shown and needs and named.issuperset(needs) else 0.0
              for c, needs in OPENAI_CATEGORIES.items()}
    flagged = shown is not None and shown.flagged
    ext: dict[str, Any] = {"decision": status}
    if shown is not None:
        ext |= {"risk": shown.risk, "categories": sorted(shown.categories), "threshold": shown.threshold,
                "verdict_from": source}
    return {
        "flagged": flagged,
        "categories": {c: flagged and s > 0 for c, s in scores.items()},
        "category_scores": scores,
        "category_applied_input_types": {c: ["text"] for c in OPENAI_CATEGORIES},
        EXTENSION: ext,
    }


async def moderations(gateway: Gateway, request: Request) -> Response:
    try:
        report = Report(policy=gateway.authenticate(request))
    except ClientError as e:
        return e.response()
    try:
        check_json_content_type(request)
        texts = parse_moderation_request(await read_body(request, gateway.max_body_bytes)).input
        texts = [texts] if isinstance(texts, str) else texts
        policy = report.policy
        decisions: list[Decision] | None = None
        if not policy.prompt.check:
            report.skip("prompt")  # the tenant checks no prompts: nothing is asked, nothing flagged
        else:
            decisions = await gateway.moderator.judge(report, "prompt", [GuardInput("prompt", t) for t in texts],
                                                      list(range(len(texts))))
    except ClientDisconnect:
        return Response(status_code=499)
    except GatewayError as e:  # bad input, or the guard failed and the policy fails closed
        return e.response(report.headers())
    record = report.stage("prompt")
    if decisions is None:
        status = "skipped" if record.skipped else "unscored"  # unscored: the guard failed, the policy fails open
        results = [result(None, status) for _ in texts]
    else:
        shadow = policy.prompt.action == "shadow"
        results = [result(d, "shadow" if shadow else d.outcome, s) for d, s in zip(decisions, record.sources)]
    body = {"id": f"modr-{uuid.uuid4().hex}", "model": gateway.guard.identity, "results": results}
    return Response(orjson.dumps(body), media_type="application/json", headers=report.headers())
