"""GuardGate's guard inside a LiteLLM proxy: a `CustomGuardrail` that asks a running GuardGate's
`POST /v1/moderations` about the request's texts and about the answer, and blocks with LiteLLM's
`GuardrailRaisedException` when GuardGate flags one.

Runs inside LiteLLM's process (`pip install '.[litellm]'` from GuardGate's clone); the gateway never imports this module.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import httpx
from litellm.exceptions import GuardrailRaisedException
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.types.guardrails import GuardrailEventHooks


def _texts(value: Any) -> Iterable[str]:
    """The text of a message or answer: string content, text parts, tool-call arguments."""
    content = value.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    for key in ("reasoning_content", "refusal"):
        if isinstance(value.get(key), str):
            yield value[key]
    for call in value.get("tool_calls") or []:
        function = (call or {}).get("function") or {}
        yield from (s for s in (function.get("name"), function.get("arguments")) if isinstance(s, str))


def _as_dict(obj: Any) -> dict:
    return obj if isinstance(obj, dict) else obj.model_dump() if hasattr(obj, "model_dump") else {}


class GuardGateGuardrail(CustomGuardrail):
    """`api_base`: GuardGate's `…/v1` (default $GUARDGATE_API_BASE); `api_key`: a GuardGate tenant key (default
    $GUARDGATE_API_KEY), whose policy decides what is flagged."""

    def __init__(self, api_base: str | None = None, api_key: str | None = None, guardgate_timeout_s: float = 30,
                 **kwargs: Any) -> None:
        base = api_base or os.environ.get("GUARDGATE_API_BASE") or "http://127.0.0.1:8080/v1"
        self.moderations_url = base.rstrip("/") + "/moderations"
        key = api_key or os.environ.get("GUARDGATE_API_KEY")
        self._headers = {"authorization": f"Bearer {key}"} if key else {}
        self._timeout = guardgate_timeout_s
        self._client: httpx.AsyncClient | None = None
        super().__init__(**kwargs)

    async def _check(self, texts: list[str], what: str) -> None:
        """Raise GuardrailRaisedException if GuardGate flags any text, or cannot be asked (fail closed)."""
        texts = [t for t in texts if t]
        if not texts:
            return
        if self._client is None:  # made on first use, inside the proxy's event loop
            self._client = httpx.AsyncClient(timeout=self._timeout, headers=self._headers)
        try:
            resp = await self._client.post(self.moderations_url, json={"input": texts})
            resp.raise_for_status()
            results = resp.json()["results"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            # Fail closed: an unchecked text is never passed. GuardGate's own on_guard_error already says
            # what a guard failure behind it means; this is GuardGate itself unreachable or refusing.
            raise GuardrailRaisedException(self.guardrail_name, f"GuardGate could not check the {what} "
                                           f"({type(e).__name__}).") from None
        for result in results:
            if result.get("flagged"):
                ext = result.get("guardgate") or {}
                raise GuardrailRaisedException(
                    self.guardrail_name, f"The {what} was blocked by GuardGate (risk {ext.get('risk')}, "
                    f"categories {','.join(ext.get('categories') or [])}, threshold {ext.get('threshold')}).",
                    blocked_content=True)

    async def _check_request(self, data: dict) -> None:
        await self._check([t for m in data.get("messages") or [] if isinstance(m, dict) for t in _texts(m)],
                          "request")

    # ----- LiteLLM's hooks -----

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        """mode: pre_call — before the model is called."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.pre_call) is True:
            await self._check_request(data)
        return data

    async def async_moderation_hook(self, data: dict, user_api_key_dict: Any, call_type: Any) -> None:
        """mode: during_call — alongside the model call; the answer is dropped if this raises."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.during_call) is True:
            await self._check_request(data)

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        """mode: post_call — a whole (not streamed) answer, every choice."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.post_call) is True:
            choices = _as_dict(response).get("choices") or []
            await self._check([t for c in choices for t in _texts(c.get("message") or {})], "answer")
        return response

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any, response: Any,
                                                      request_data: dict) -> AsyncGenerator[Any, None]:
        """mode: post_call — a streamed answer, held whole until GuardGate has checked it: no chunk of an
        unchecked answer reaches the client."""
        if self.should_run_guardrail(data=request_data, event_type=GuardrailEventHooks.post_call) is not True:
            async for chunk in response:
                yield chunk
            return
        chunks: list[Any] = []
        texts: dict[int, str] = {}
        async for chunk in response:
            chunks.append(chunk)
            for c in _as_dict(chunk).get("choices") or []:
                delta = c.get("delta") or {}
                texts[c.get("index", 0)] = texts.get(c.get("index", 0), "") + "".join(_texts(delta))
        await self._check(list(texts.values()), "answer")
        for chunk in chunks:
            yield chunk
