"""DuoGuard (DuoGuard-0.5B, DuoGuard-1B-Llama-3.2-transfer) served by vLLM's pooling `/classify` endpoint.

DuoGuard is a sequence classifier with 12 independent (multi-label) outputs: the card applies a sigmoid
to each logit. vLLM's classify endpoint applies its own activation unless told not to (a softmax across
the 12 in many versions, which would be wrong here), so we ask for the raw logits and apply the
sigmoid ourselves. Risk = 100 * the highest probability; a category counts from probability 0.5.
The mapping onto the one category set is in docs/guard_backends.md.

Requests: `POST {server root}/classify` with `{"model", "input": [texts], "use_activation": false}`
(the raw-logits parameter's name is configurable: `activation` on vLLM 0.10.x-0.11.0); one request
scores a whole batch. The base URLs are the usual `…/v1` roots; `/classify` lives beside `/v1`, not
under it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from gateway.guard.base import HARM_CATEGORIES, SAFE, GuardError, GuardInput, Verdict
from gateway.guard.endpoints import DEFAULT_COOLDOWN_S, RemoteGuard
from gateway.guard.sanitize import SANITIZER_VERSION, neutralise_special_tokens

DEFAULT_MODEL = "DuoGuard/DuoGuard-0.5B"
MAPPING_VERSION = "duoguard-map-1"

# The card's output order (DuoGuard-1B-Llama-3.2-transfer card, `category_names`).
CATEGORIES: tuple[str, ...] = (
    "Violent crimes", "Non-violent crimes", "Sex-related crimes", "Child sexual exploitation",
    "Specialized advice", "Privacy", "Intellectual property", "Indiscriminate weapons", "Hate",
    "Suicide and self-harm", "Sexual content", "Jailbreak prompts",
)

# The 12 outputs onto the one category set, in the same order.
TO_HARM_CATEGORY: tuple[str, ...] = (
    "VIO",   # violent crimes
    "ILG",   # non-violent crimes
    "SEX",   # sex-related crimes
    "SEX",   # child sexual exploitation
    "MIS",   # specialized advice (unqualified medical/legal/financial advice: FlexGuard's "high-risk domains")
    "INF",   # privacy
    "ILG",   # intellectual property
    "VIO",   # indiscriminate weapons (FlexGuard's VIO names weapons)
    "DIS",   # hate
    "VIO",   # suicide and self-harm (FlexGuard's VIO names self-harm)
    "SEX",   # sexual content
    "JAIL",  # jailbreak prompts
)

RawLogitsParam = Literal["use_activation", "activation"]


def _sigmoid(x: float) -> float:
    # Split by sign so a large |x| cannot overflow exp().
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def looks_like_softmax(values: Sequence[float]) -> bool:
    """True for a probability vector that sums to 1: the server applied its softmax, not raw logits."""
    return all(0.0 <= v <= 1.0 for v in values) and abs(sum(values) - 1.0) < 1e-3


def verdict_from_logits(logits: Any, threshold: float = 0.5) -> Verdict:
    """12 raw logits → Verdict: risk = round(100 * max sigmoid), categories with sigmoid >= threshold."""
    try:
        values = [float(v) for v in logits]
    except (TypeError, ValueError):
        raise GuardError("unparsable", "guard classification is not a list of numbers") from None
    if len(values) != len(CATEGORIES):
        raise GuardError("unparsable", f"guard gave {len(values)} outputs, DuoGuard has {len(CATEGORIES)}")
    if not all(math.isfinite(v) for v in values):
        raise GuardError("unparsable", "guard classification has non-finite values")
    if looks_like_softmax(values):
        raise GuardError("unparsable", "guard returned softmax probabilities, not raw logits: the server "
                         "ignored the raw-logits parameter (set it to match the vLLM version)")
    probs = [_sigmoid(v) for v in values]
    risk = int(round(100 * max(probs)))
    named = {TO_HARM_CATEGORY[i] for i, p in enumerate(probs) if p >= threshold}
    return Verdict(risk=min(risk, 100), categories=tuple(c for c in HARM_CATEGORIES if c in named) or (SAFE,))


def classified_text(item: GuardInput) -> str:
    """The prompt; in the response stage prompt + " " + answer, as DuoGuard's own evaluation joins them."""
    user = neutralise_special_tokens(item.user)
    if item.stage == "prompt":
        return user
    return f"{user} {neutralise_special_tokens(item.assistant or '')}"


def server_root(base_url: str) -> str:
    """`http://h:8000/v1` → `http://h:8000`: vLLM serves /classify at the root."""
    url = str(base_url).rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class DuoGuard(RemoteGuard):
    """Scores texts with DuoGuard through vLLM's `POST /classify`, over one or more servers."""

    models_path = "/v1/models"  # its servers are addressed at their root, where /classify lives

    def __init__(self, *, base_urls: list[str], model: str = DEFAULT_MODEL, api_key: str | None = None,
                 timeout_s: float = 30.0, max_concurrency: int = 64, cooldown_s: float = DEFAULT_COOLDOWN_S,
                 threshold: float = 0.5, raw_logits_param: RawLogitsParam = "use_activation") -> None:
        self.threshold = threshold
        self.raw_logits_param = raw_logits_param
        super().__init__(f"duoguard|{model}|{MAPPING_VERSION}|threshold={threshold:g}|sanitize={SANITIZER_VERSION}",
                         model, [server_root(u) for u in base_urls], timeout_s=timeout_s,
                         max_concurrency=max_concurrency, api_key=api_key, cooldown_s=cooldown_s)

    def request_body(self, inputs: Sequence[GuardInput]) -> dict[str, Any]:
        return {"model": self.model, "input": [classified_text(i) for i in inputs], self.raw_logits_param: False}

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        if not inputs:
            return []
        data = await self._endpoints.post_json("/classify", self.request_body(inputs))
        try:
            rows = sorted(data["data"], key=lambda r: r["index"])
            logits = [r["probs"] for r in rows]
        except (KeyError, TypeError, AttributeError):
            raise GuardError("unparsable", "guard response is not a classification") from None
        if len(logits) != len(inputs) or [r["index"] for r in rows] != list(range(len(inputs))):
            raise GuardError("unparsable", f"guard classified {len(logits)} texts, {len(inputs)} were sent")
        return [verdict_from_logits(row, self.threshold) for row in logits]

