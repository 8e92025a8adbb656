"""The one moderation step: texts → verdicts (cache → guard) → decisions (policy) → one request's report.

Every path (plain, each stream mode) scores through `Moderator.judge`, and every verdict header is
rendered by `Report.headers` from what the step recorded.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from gateway.cache import VerdictCache
from gateway.errors import GatewayError, GuardUnavailable
from gateway.guard.base import SAFE, Guard, GuardError, GuardInput, Stage, reasoning_default
from gateway.policy.decide import Decision, decide
from gateway.policy.schema import Policy, Reasoning

log = logging.getLogger("guardgate")

_OUTCOME_RANK = {"allow": 0, "shadow": 1, "flag": 2, "block": 3}


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
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.monotonic)
    stages: dict[Stage, StageRecord] = field(default_factory=dict)
    media: list[str] = field(default_factory=list)  # non-text parts forwarded unscored
    blocked_choices: set[int] = field(default_factory=set)

    @property
    def tenant(self) -> str:
        return self.policy.tenant

    def stage(self, stage: Stage) -> StageRecord:
        return self.stages.setdefault(stage, StageRecord())

    def skip(self, stage: Stage) -> None:
        self.stage(stage).skipped = True

    def log_upstream_error(self, error: GatewayError, stream_mode: str | None = None) -> None:
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
            log.warning("guard error", extra={"fields": {
                "event": "guard_error", "request_id": report.request_id, "tenant": report.tenant, "stage": stage,
                "kind": e.kind, "detail": e.detail, "on_guard_error": policy.on_guard_error}})
            if policy.on_guard_error == "closed":
                raise GuardUnavailable(stage, e.kind) from None
            if enforce:
                report.stage(stage).error = e.kind
            return None
        guard_ms = round((time.perf_counter() - started) * 1000, 2)
        decisions = [decide(s.verdict, policy, stage) for s in scored]
        for label, d, s in zip(labels, decisions, scored):
            log.info("decision", extra={"fields": {
                "event": "decision", "request_id": report.request_id, "tenant": report.tenant, "stage": stage,
                "text": label, "risk": d.risk, "categories": list(d.categories), "threshold": d.threshold,
                "outcome": d.outcome, "enforced": enforce, "reason": d.reason, "verdict_from": s.source,
                "guard_ms": guard_ms}})
        if enforce:
            record = report.stage(stage)
            record.decisions += decisions
            record.sources += [s.source for s in scored]
        return decisions
