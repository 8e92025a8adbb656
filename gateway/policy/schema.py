"""Policy files: what a tenant's strictness is and what the gateway does with a flagged text."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, model_validator

from gateway.guard.base import HARM_CATEGORIES
from gateway.yamlfile import on_off

# The FlexGuard card's rubric thresholds (Option A).
PRESETS: dict[str, int] = {"strict": 20, "moderate": 40, "loose": 60}

Preset = Literal["strict", "moderate", "loose"]


def _check_threshold(v: object) -> object:
    if (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100) or v in PRESETS:
        return v
    raise ValueError("expected strict (20), moderate (40), loose (60) or an integer from 0 to 100")


Threshold = Annotated[Preset | int, PlainValidator(_check_threshold)]
Category = Literal["VIO", "ILG", "SEX", "INF", "DIS", "MIS", "JAIL"]
Action = Literal["block", "flag", "shadow"]
# Whether a reasoning guard (FlexGuard) writes its <think> block first. default: as `guard.reasoning` says.
# The FlexGuard card validates its scores with reasoning on; off is several times faster.
Reasoning = Annotated[Literal["default", "on", "off"], BeforeValidator(on_off)]

if set(Category.__args__) != set(HARM_CATEGORIES):  # type: ignore[attr-defined]
    raise ImportError("policy categories differ from the guard's category set")

DEFAULT_BLOCK_MESSAGE = "This request was blocked by the content policy."


def _check_api_key(key: str) -> str:
    if key.startswith("sha256:"):
        if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", key):
            raise ValueError("a hashed key is 'sha256:' followed by 64 hex digits")
    elif len(key) < 8 or any(c.isspace() for c in key):
        raise ValueError("a plain key has at least 8 characters and no spaces")
    return key


# A plain key, or "sha256:<hex>" of one, so that policy files need not hold the key itself.
ApiKey = Annotated[str, AfterValidator(_check_api_key)]


def threshold_value(t: Threshold) -> int:
    return PRESETS[t] if isinstance(t, str) else t


class StagePolicy(BaseModel):
    """Settings of one stage: the user's prompt, or the model's answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    check: bool = True
    # block: refuse / withhold. flag: forward, report in headers and logs. shadow: decide and log only.
    action: Action = "block"


class PromptStagePolicy(StagePolicy):
    """The request stage, which also says which of the request's texts are scored."""

    # conversation: every message (system, developer, user, tool; assistant turns in the response template)
    #   and the tool / schema definitions, each its own cached text. last_user_turn: only the last user
    #   message, cheaper and bypassable: harm placed anywhere else in the request is never scored.
    scope: Literal["conversation", "last_user_turn"] = "conversation"
    # before: score the prompt, then call the upstream. parallel: call the upstream at once while the prompt
    #   is scored; nothing of the answer is released before the prompt's verdict allows it, and a blocked
    #   prompt's upstream call is cancelled. The trade: the provider sees prompts that are then blocked,
    #   and may bill a cancelled generation.
    timing: Literal["before", "parallel"] = "before"
    reasoning: Reasoning = "default"


class ResponseStagePolicy(StagePolicy):
    """The answer stage, which also says how streamed answers are released."""

    # windowed: release text only after the answer so far was scored as allowed, a check every `window`
    #   characters and at the end. buffered: hold the whole answer, score, release. audit: stream at once,
    #   score afterwards, log and flag only (text is never held back: for tenants who accept that).
    stream: Literal["windowed", "buffered", "audit"] = "windowed"
    window: int = Field(400, ge=16, le=1_000_000, description="Characters of answer between two checks.")
    # The first check comes sooner (cuts the time to first token); later checks start as soon as the one in
    # flight ends and `window` new characters wait, so with a slow guard a window is what arrived meanwhile.
    first_window: int = Field(64, ge=16, le=1_000_000, description="Characters before the first check "
                              "(at most `window`).")
    # Reasoning of the checks made while the answer streams, and of the check of the whole answer (a
    # plain answer, a buffered stream, a windowed stream's last check, an audit).
    window_reasoning: Reasoning = "default"
    reasoning: Reasoning = "default"


class Policy(BaseModel):
    """A tenant's complete policy (the default policy with the tenant's overrides applied)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # Gateway API keys of this tenant: plain strings or "sha256:<64 hex>". Never logged.
    api_keys: list[ApiKey] = Field(default_factory=list)
    strictness: Threshold = "moderate"
    # Per-category thresholds; where a verdict names several, the strictest (lowest) applies.
    categories: dict[Category, Threshold] = Field(default_factory=dict)
    prompt: PromptStagePolicy = Field(default_factory=PromptStagePolicy)
    response: ResponseStagePolicy = Field(default_factory=ResponseStagePolicy)
    on_guard_error: Literal["open", "closed"] = "closed"
    block_message: str = Field(DEFAULT_BLOCK_MESSAGE, min_length=1)
    # Score every text afresh: no cached verdict is read or written for this tenant.
    bypass_cache: bool = False
    # Sensitive: decision lines carry the scored texts themselves (for triage), not only their hashes.
    log_texts: bool = False

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        if isinstance(data, dict) and "score_turns" in data:
            raise ValueError("'score_turns' was replaced by 'prompt.scope': conversation (the default) scores "
                             "every message, last_user_turn only the last user message")
        return data

    def stage(self, stage: str) -> StagePolicy:
        return self.prompt if stage == "prompt" else self.response
