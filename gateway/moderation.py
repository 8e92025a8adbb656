"""The one moderation step: texts → verdicts (cache → guard) → decisions (policy) → one request's report.

Every path (plain, each stream mode) scores through `Moderator.judge`, and every verdict header is
rendered by `Report.headers` from what the step recorded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gateway import access, metrics
from gateway.cache import VerdictCache
from gateway.errors import GatewayError, GuardUnavailable
from gateway.guard.base import SAFE, Guard, GuardError, GuardInput, Stage, reasoning_default
from gateway.policy.decide import Decision, decide
from gateway.policy.schema import Policy, Reasoning

log = logging.getLogger("guardgate")

_OUTCOME_RANK = {"allow": 0, "shadow": 1, "flag": 2, "block": 3}


def text_hash(text: str) -> str:
    """What decision lines carry instead of a scored text: the first 16 hex digits of its SHA-256 (over its
    UTF-8 bytes), so that a text someone reports can be found in the logs without the logs holding it."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _new_request_id() -> str:
    ctx = access.current()
    return ctx.request_id if ctx is not None else access.request_id_from(None)


@dataclass
class StageRecord:
    """What one stage of one request came to: its decisions, where each verdict came from, or why none."""

    decisions: list[Decision] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    error: str | None = None  # the guard error kind, when the stage failed open
    skipped: bool = False  # the policy does not check this stage


@dataclass
class Report:
    """One request: its tenant's policy, its id, and what each stage decided."""

    policy: Policy
    request_id: str = field(default_factory=_new_request_id)  # the request's X-Request-ID (see access.py)
    started: float = field(default_factory=time.monotonic)
    stages: dict[Stage, StageRecord] = field(default_factory=dict)
    media: list[str] = field(default_factory=list)  # non-text parts forwarded unscored
    blocked_choices: set[int] = field(default_factory=set)
    model: str | None = None  # as the client named it (logs only, never a metric label)
    guard_ms: float = 0.0  # time spent waiting for verdicts, all stages
    guard_errors: list[str] = field(default_factory=list)  # guard error kinds met, failing open or closed
    upstream_error: str | None = None

    def __post_init__(self) -> None:
        ctx = access.current()
        if ctx is not None:  # the access line and request metrics read this request's outcome from it
            ctx.report = self

    @property
    def tenant(self) -> str:
        return self.policy.tenant

    def stage(self, stage: Stage) -> StageRecord:
        return self.stages.setdefault(stage, StageRecord())

    def skip(self, stage: Stage) -> None:
        self.stage(stage).skipped = True

    def log_upstream_error(self, error: GatewayError, stream_mode: str | None = None) -> None:
        self.upstream_error = error.code
        if error.code not in ("upstream_timeout", "upstream_unavailable"):  # those are counted by Upstream.send
            metrics.observe_upstream_error(error.code)
        log.warning("upstream failed", extra={"fields": {
            "event": "upstream_error", "request_id": self.request_id, "tenant": self.tenant, "status": error.status,
            "code": error.code, "detail": error.message, "stream_mode": stream_mode,
            "elapsed_ms": round((time.monotonic() - self.started) * 1000, 1)}})

    def headers(self) -> dict[str, str]:
        """The x-guard-* headers for what is known now."""
        h = {"x-guard-request-id": self.request_id, "x-guard-tenant": self.tenant}
        errors = []
        for name, record in self.stages.items():
            p = f"x-guard-{name}-"
            if record.skipped:
                h[p + "decision"] = "skipped"
                continue
            if record.error:
                h[p + "decision"] = "unscored"
                errors.append(f"{name}:{record.error}")
                continue
            if not record.decisions:
                continue
            if self.policy.stage(name).action == "shadow":
                # Shadowed: the client learns that the stage is in shadow, never its verdict.
                h[p + "decision"] = "shadow"
                continue
            ds = record.decisions
            worst = max(ds, key=lambda d: (_OUTCOME_RANK[d.outcome], d.risk))
            h[p + "risk"] = str(max(d.risk for d in ds))
            h[p + "categories"] = ",".join(sorted({c for d in ds for c in d.categories if c != SAFE}) or ["SAFE"])
            h[p + "decision"] = worst.outcome
            h[p + "threshold"] = str(worst.threshold)
            # Where each verdict came from: local, redis, guard, coalesced or bypass (one per text scored).
            h[p + "verdict-from"] = ",".join(record.sources)
        if errors:
            h["x-guard-error"] = ",".join(errors)
        if self.blocked_choices:
            h["x-guard-response-blocked-choices"] = ",".join(map(str, sorted(self.blocked_choices)))
        if self.media:
            h["x-guard-non-text"] = ",".join(self.media)
        return h


class Moderator:
    """Owns the guard and the verdict cache; decides with the request's policy and records it in the report."""

    def __init__(self, guard: Guard, cache: VerdictCache) -> None:
        self.guard, self.cache = guard, cache

    def reasoning(self, choice: Reasoning) -> bool | None:
        """A policy's reasoning choice as the guard input's switch: None where it changes nothing (the
        guard's own setting, or a guard without reasoning), so that such verdicts share one cache key."""
        default = reasoning_default(self.guard)
        if choice == "default" or default is None or (choice == "on") == default:
            return None
        return choice == "on"

    async def judge(self, report: Report, stage: Stage, inputs: Sequence[GuardInput],
                    labels: Sequence[str | int | None], *, enforce: bool = True,
                    reasoning: Reasoning = "default") -> list[Decision] | None:
        """Score and decide each input. None when the guard failed and the policy fails open; raises
        GuardUnavailable when it fails closed. `enforce=False` (audit) logs the decisions without reporting
        them to the client, who has the answer already. `reasoning`: the policy's choice for this check."""
        policy = report.policy
        switch = self.reasoning(reasoning)
        if switch is not None:
            inputs = [replace(i, reasoning=switch) for i in inputs]
        started = time.perf_counter()
        try:
            scored = await self.cache.score(self.guard, inputs, bypass=policy.bypass_cache)
        except GuardError as e:
            report.guard_ms += (time.perf_counter() - started) * 1000
            report.guard_errors.append(e.kind)
            log.warning("guard error", extra={"fields": {
                "event": "guard_error", "request_id": report.request_id, "tenant": report.tenant, "stage": stage,
                "kind": e.kind, "detail": e.detail, "on_guard_error": policy.on_guard_error}})
            if policy.on_guard_error == "closed":
                raise GuardUnavailable(stage, e.kind) from None
            if enforce:
                report.stage(stage).error = e.kind
            return None
        elapsed_ms = (time.perf_counter() - started) * 1000
        report.guard_ms += elapsed_ms
        guard_ms = round(elapsed_ms, 2)
        decisions = [decide(s.verdict, policy, stage) for s in scored]
        for label, item, d, s in zip(labels, inputs, decisions, scored):
            metrics.observe_cache_lookup(s.source)
            metrics.observe_decision(report.tenant, stage, d.outcome)
            fields = {
                "event": "decision", "request_id": report.request_id, "tenant": report.tenant, "stage": stage,
                "text": label, "risk": d.risk, "categories": list(d.categories), "threshold": d.threshold,
                "outcome": d.outcome, "enforced": enforce, "reason": d.reason, "verdict_from": s.source,
                "guard_ms": guard_ms, **_texts(item, policy.log_texts)}
            log.info("decision", extra={"fields": fields})
        if enforce:
            record = report.stage(stage)
            record.decisions += decisions
            record.sources += [s.source for s in scored]
        return decisions


def _texts(item: GuardInput, log_texts: bool) -> dict[str, str]:
    """A decision line's text fields: the scored text's hash (the answer's, in the response stage, with
    the user turn it was scored with as the context); the texts themselves only if the policy opts in."""
    scored = (item.assistant or "") if item.stage == "response" else item.user
    out = {"text_sha256": text_hash(scored)}
    if item.stage == "response":
        out["context_sha256"] = text_hash(item.user)
    if log_texts:
        out["scored_text"] = scored
        if item.stage == "response":
            out["scored_context"] = item.user
    return out
