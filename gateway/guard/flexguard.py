"""FlexGuard served by vLLM's OpenAI-compatible chat endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gateway.config import GuardConfig
from gateway.guard import flexguard_card as card
from gateway.guard.base import HARM_CATEGORIES, SAFE, GuardError, GuardInput, Verdict
from gateway.guard.endpoints import DEFAULT_COOLDOWN_S, RemoteGuard
from gateway.guard.sanitize import SANITIZER_VERSION, neutralise_special_tokens

# What Qwen3's chat template writes for enable_thinking=False; used as a prefill elsewhere.
EMPTY_THINK = "<think>\n\n</think>\n\n"


def build_guard_messages(item: GuardInput) -> list[dict[str, str]]:
    """The card's system prompt and user framing, with the texts neutralised."""
    user = neutralise_special_tokens(item.user)
    if item.stage == "prompt":
        return [
            {"role": "system", "content": card.SYSTEM_PROMPT_PROMPT},
            {"role": "user", "content": card.prompt_mode_user_message(user)},
        ]
    assistant = neutralise_special_tokens(item.assistant or "")
    return [
        {"role": "system", "content": card.SYSTEM_PROMPT_RESPONSE},
        {"role": "user", "content": card.response_mode_user_message(user, assistant)},
    ]


def parse_categories(line: str) -> tuple[str, ...] | None:
    """`SAFE` or a comma list of the card's codes; None if the line is anything else."""
    codes = [c.strip().upper() for c in line.split(",") if c.strip()]
    if not codes or any(c not in HARM_CATEGORIES and c != SAFE for c in codes):
        return None
    harms = sorted(set(c for c in codes if c != SAFE), key=HARM_CATEGORIES.index)
    return tuple(harms) if harms else (SAFE,)


def verdict_from_answer(text: str | None) -> Verdict:
    """Read the guard's answer with the card's parser; anything it cannot read is a guard error."""
    if not text:
        raise GuardError("unparsable", "empty answer from the guard")
    category_line, risk = card.parse_output(text)
    categories = parse_categories(category_line) if category_line else None
    if categories is None or risk is None:
        # Keep only the shape in the message: the guard's text may quote the user.
        raise GuardError("unparsable", f"guard answer has no CATEGORY/RISK_SCORE lines ({len(text)} chars)")
    return Verdict(risk=risk, categories=categories)


class FlexGuard(RemoteGuard):
    """Scores texts with FlexGuard through `POST {base_url}/chat/completions`, over one or more servers."""

    def __init__(self, config: GuardConfig, *, base_urls: list[str] | None = None,
                 cooldown_s: float = DEFAULT_COOLDOWN_S) -> None:
        self.config = config
        thinking = config.chat_template_kwargs.get("enable_thinking")
        super().__init__(f"flexguard|{config.model}|{card.TEMPLATE_VERSION}|thinking={thinking}"
                         f"|reasoning={config.reasoning}|sanitize={SANITIZER_VERSION}", config.model or "",
                         list(base_urls) if base_urls else config.base_urls, timeout_s=config.timeout_s,
                         max_concurrency=config.max_concurrency,
                         api_key=config.api_key.get_secret_value() if config.api_key is not None else None,
                         cooldown_s=cooldown_s)

    @property
    def reasoning_default(self) -> bool:
        """Whether the guard writes its <think> block unless an input says otherwise (`guard.reasoning`)."""
        return self.config.reasoning == "on" and self.config.chat_template_kwargs.get("enable_thinking") is not False

    def request_body(self, item: GuardInput) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": build_guard_messages(item),
            # The card's sampling parameters.
            "temperature": 0.0,
            "top_p": 0.9,
            "max_tokens": self.config.max_tokens,
            "skip_special_tokens": False,
        }
        kwargs = dict(self.config.chat_template_kwargs)
        reasoning = self.reasoning_default if item.reasoning is None else item.reasoning
        if reasoning and kwargs.get("enable_thinking") is False:
            kwargs["enable_thinking"] = True  # this input asks for reasoning that the config turned off
        if not reasoning:
            if "enable_thinking" in kwargs:
                kwargs["enable_thinking"] = False  # the template writes the empty think block itself
            else:
                # A template without the switch: start the answer after an empty think block.
                body["messages"].append({"role": "assistant", "content": EMPTY_THINK})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        return body

    async def score(self, inputs: Sequence[GuardInput]) -> list[Verdict]:
        if len(inputs) == 1:
            return [await self._score_one(inputs[0])]
        return list(await asyncio.gather(*(self._score_one(i) for i in inputs)))

    async def _score_one(self, item: GuardInput) -> Verdict:
        data = await self._endpoints.post_json("/chat/completions", self.request_body(item))
        try:
            message = data["choices"][0]["message"]
            content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise GuardError("unparsable", "guard response is not a chat completion") from None
        return verdict_from_answer(content)

