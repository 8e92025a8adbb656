"""A LiteLLM proxy custom guardrail equivalent to GuardGate's path, for bench/vs_litellm.py.

Runs inside LiteLLM's own venv (it imports litellm, not gateway). Before the call it asks the stand-in
guard about every message, concurrently, and after the call about the answer: the same three calls with
the same FlexGuard-card request bodies as GuardGate with its cache bypassed. A risk at or above the
threshold blocks. Written after LiteLLM's reference custom guardrail (async_pre_call_hook /
async_post_call_success_hook on CustomGuardrail, loaded as `guardrail: litellm_guardrail.StandinGuard`).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import litellm
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.llms.custom_httpx.http_handler import get_async_httpx_client, httpxSpecialProvider

_RISK = re.compile(r"\b(\d{1,3})\b")


def _risk(answer: str) -> int:
    """The card's parser in short: the last number after the category line, outside the <think> block."""
    text = re.sub(r"<think>.*?</think>\s*", "", answer, flags=re.DOTALL)
    lines = [line for line in text.splitlines() if line.strip()]
    found = _RISK.findall("\n".join(lines[1:]))
    if not found:
        raise ValueError("guard answer without a risk")
    return int(found[-1])


class StandinGuard(CustomGuardrail):
    def __init__(self, spec_path: str, threshold: int = 40, **kwargs: Any) -> None:
        with open(spec_path) as f:
            spec = json.load(f)
        self.url: str = spec["url"]
        # Request bodies as JSON text with placeholders, filled with each text JSON-escaped.
        self.prompt_body: str = spec["prompt_body"]
        self.response_body: str = spec["response_body"]
        self.threshold = threshold
        self.client = get_async_httpx_client(llm_provider=httpxSpecialProvider.GuardrailCallback)
        super().__init__(**kwargs)

    async def _score(self, body: str) -> int:
        resp = await self.client.post(self.url, data=body, headers={"content-type": "application/json"})
        return _risk(resp.json()["choices"][0]["message"]["content"])

    @staticmethod
    def _fill(template: str, **texts: str) -> str:
        for key, text in texts.items():
            template = template.replace(f"@@{key}@@", json.dumps(text)[1:-1])
        return template

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        texts = [m["content"] for m in data.get("messages") or [] if isinstance(m.get("content"), str)]
        risks = await asyncio.gather(*(self._score(self._fill(self.prompt_body, TEXT=t)) for t in texts))
        if any(r >= self.threshold for r in risks):
            raise ValueError("blocked by the guard")
        return data

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        if isinstance(response, litellm.ModelResponse):
            user = next((m["content"] for m in reversed(data.get("messages") or []) if m.get("role") == "user"), "")
            for choice in response.choices:
                content = getattr(getattr(choice, "message", None), "content", None)
                if isinstance(content, str) and content:
                    risk = await self._score(self._fill(self.response_body, USER=user, ANSWER=content))
                    if risk >= self.threshold:
                        raise ValueError("answer blocked by the guard")
        return response
