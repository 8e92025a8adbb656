"""BingoGuard-Llama-8B served by vLLM's OpenAI-compatible chat endpoint.

One chat completion per text, with the release's template (bingoguard_template.py) and the top
logprobs of the first answer token. The answer is `safe`, or `unsafe` and a category line; the risk
comes from P(unsafe) = p(unsafe) / (p(safe) + p(unsafe)) over that first token, as the release's own
evaluator computes it. In the response stage, when the operator supplies the release's severity
rubrics, an `unsafe` answer gets a second call for its severity level (0-4), and the risk is placed in
that level's FlexGuard band by P(unsafe). The full mapping is in docs/guard_backends.md.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.guard import bingoguard_template as tpl
from gateway.guard.base import HARM_CATEGORIES, SAFE, GuardError, GuardInput, Verdict
from gateway.guard.endpoints import DEFAULT_COOLDOWN_S, RemoteGuard
from gateway.guard.sanitize import SANITIZER_VERSION, neutralise_special_tokens

DEFAULT_MODEL = "fanyin3639/bingoguard-llama-8b"
TOP_LOGPROBS = 5  # `safe` and `unsafe` are the top two whenever the model follows its format
MAX_TOKENS = 16  # "unsafe\nS10" is about five tokens; "#level: 4" about as many

_CODE = re.compile(r"^S(\d{1,2})$")
_NAMES = {name.lower(): code for code, name in tpl.CATEGORIES.items()}
_LEVEL = re.compile(r"^#?\s*level\s*:?\s*\[?\s*([0-4])\s*\]?\s*$", re.IGNORECASE)


# ------------------------------------------------------------------------------- parsing ----

def parse_label(text: str | None) -> tuple[str, tuple[str, ...]]:
    """The answer's label and BingoGuard category codes: ("safe", ()) or ("unsafe", ("S1", …)).

    Anything else, an `unsafe` without a readable category line included, is a guard error."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        raise GuardError("unparsable", "empty answer from the guard")
    label = lines[0].lower()
    if label == "safe":
        return "safe", ()
    if label != "unsafe":
        raise GuardError("unparsable", f"guard answer does not start with safe/unsafe ({len(text or '')} chars)")
    if len(lines) < 2:
        raise GuardError("unparsable", "guard answered unsafe without a category line")
    codes: list[str] = []
    for part in lines[1].split(","):
        item = part.strip().rstrip(".:").strip()
        m = _CODE.match(item.upper())
        code = f"S{int(m.group(1))}" if m else _NAMES.get(item.lower())
        if code not in tpl.CATEGORIES:
            raise GuardError("unparsable", "guard answered unsafe with an unknown category")
        if code not in codes:
            codes.append(code)
    return "unsafe", tuple(codes)


def harm_categories(codes: Sequence[str]) -> tuple[str, ...]:
    """BingoGuard codes onto the one category set, in HARM_CATEGORIES order; none: SAFE."""
    mapped = {tpl.TO_HARM_CATEGORY[c] for c in codes}
    return tuple(c for c in HARM_CATEGORIES if c in mapped) or (SAFE,)


def _token_label(token: str) -> str | None:
    t = token.strip().lower()
    # The whole word, or its first piece if a tokenizer splits it (the release's evaluator reads
    # the first token of each word too).
    if len(t) >= 2 and "unsafe".startswith(t):
        return "unsafe"
    if len(t) >= 2 and "safe".startswith(t):
        return "safe"
    return None


def p_unsafe_from_logprobs(logprobs: Any) -> float:
    """P(unsafe) from the `top_logprobs` of the first non-blank answer token, normalised over
    safe + unsafe. A missing alternative counts as 0 (it was below the listed ones)."""
    try:
        first = next(e for e in logprobs["content"] if str(e["token"]).strip())
        top = list(first["top_logprobs"]) or [first]
        p = {"safe": 0.0, "unsafe": 0.0}
        for alt in top:
            label = _token_label(str(alt["token"]))
            if label is not None:
                p[label] += math.exp(float(alt["logprob"]))
    except (KeyError, TypeError, ValueError, StopIteration, OverflowError):
        raise GuardError("unparsable", "guard answer has no logprobs for its first token") from None
    total = p["safe"] + p["unsafe"]
    if not total > 0:
        raise GuardError("unparsable", "guard's first answer token is neither safe nor unsafe")
    return p["unsafe"] / total


def parse_severity(text: str | None) -> int:
    """`#level: N` on the first line, N in 0-4. (The release's own reader falls back to 0; we do not.)"""
    lines = (text or "").strip().splitlines()
    m = _LEVEL.match(lines[0].strip()) if lines else None
    if m is None:
        raise GuardError("unparsable", "guard severity answer is not '#level: N'")
    return int(m.group(1))


def risk_from(p_unsafe: float, level: int | None) -> int:
    """Without a severity level: 100 * P(unsafe). With one: its FlexGuard band, placed by P(unsafe)."""
    p = min(max(p_unsafe, 0.0), 1.0)
    if level is None:
        return int(round(100 * p))
    low, high = tpl.SEVERITY_BANDS[level]
    return low + int(round(p * (high - low)))


def _answer(data: Any) -> tuple[str | None, Any]:
    try:
        choice = data["choices"][0]
        return choice["message"].get("content"), choice.get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise GuardError("unparsable", "guard response is not a chat completion") from None


# ------------------------------------------------------------------------------- the guard ----

class BingoGuard(RemoteGuard):
    """Scores texts with BingoGuard through `POST {base_url}/chat/completions`, over one or more servers.

    `severity_rubrics`: the release's `per_type_rubrics` (keys: tpl.SEVERITY_RUBRIC_KEYS values); with
    them, an `unsafe` answer in the response stage gets a severity call. `chat_template`: sent with
    every request (vLLM then needs --trust-request-chat-template); None relies on the server's."""

    def __init__(self, *, base_urls: list[str], model: str = DEFAULT_MODEL, api_key: str | None = None,
                 timeout_s: float = 30.0, max_concurrency: int = 64, cooldown_s: float = DEFAULT_COOLDOWN_S,
                 severity_rubrics: Mapping[str, str] | None = None, chat_template: str | None = None) -> None:
        if severity_rubrics is not None:
            missing = sorted(set(tpl.SEVERITY_RUBRIC_KEYS.values()) - set(severity_rubrics))
            if missing:
                raise ValueError(f"severity rubrics missing for: {', '.join(missing)}")
        self.severity_rubrics = dict(severity_rubrics) if severity_rubrics is not None else None
        self.chat_template = chat_template
        super().__init__(f"bingoguard|{model}|{tpl.TEMPLATE_VERSION}|severity={self.severity_rubrics is not None}"
                         f"|sanitize={SANITIZER_VERSION}", model, base_urls, timeout_s=timeout_s,
                         max_concurrency=max_concurrency, api_key=api_key, cooldown_s=cooldown_s)

    def _body(self, content: str, *, logprobs: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0.0,  # the release decodes greedily
            "max_tokens": MAX_TOKENS,
        }
        if logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        if self.chat_template is not None:
            body["chat_template"] = self.chat_template
        return body

    def request_body(self, item: GuardInput) -> dict[str, Any]:
        user = neutralise_special_tokens(item.user)
        if item.stage == "prompt":
            return self._body(tpl.prompt_task(user), logprobs=True)
        return self._body(tpl.response_task(user, neutralise_special_tokens(item.assistant or "")), logprobs=True)

    def severity_body(self, item: GuardInput, code: str) -> dict[str, Any]:
        if self.severity_rubrics is None:
            raise GuardError("unparsable", "severity asked for without severity rubrics")
        rubric = self.severity_rubrics[tpl.SEVERITY_RUBRIC_KEYS[code]]
        task = tpl.severity_task(code, rubric, neutralise_special_tokens(item.user),
                                 neutralise_special_tokens(item.assistant or ""))
        return self._body(task, logprobs=False)

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        if len(inputs) == 1:
            return [await self._score_one(inputs[0])]
        return list(await asyncio.gather(*(self._score_one(i) for i in inputs)))

    async def _score_one(self, item: GuardInput) -> Verdict:
        content, logprobs = _answer(await self._endpoints.post_json("/chat/completions", self.request_body(item)))
        label, codes = parse_label(content)
        p_unsafe = p_unsafe_from_logprobs(logprobs)
        level: int | None = None
        if item.stage == "response" and self.severity_rubrics is not None:
            if label == "safe":
                level = 0  # a safe answer stays in the benign band, as FlexGuard's SAFE does
            else:
                # Severity of the first (main) category, the one the release's rubrics are per.
                answer, _ = _answer(await self._endpoints.post_json("/chat/completions",
                                                                    self.severity_body(item, codes[0])))
                level = parse_severity(answer)
        return Verdict(risk=risk_from(p_unsafe, level), categories=harm_categories(codes))

