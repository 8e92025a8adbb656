"""The LiteLLM guardrail against a running gateway: LiteLLM's own hook calls and data shapes, no mocks.

Skipped where litellm is not installed (it runs in a venv of its own, see tests/litellm_env.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.litellm_env import import_litellm

litellm = import_litellm()

from litellm.exceptions import GuardrailRaisedException  # noqa: E402
from litellm.proxy._types import UserAPIKeyAuth  # noqa: E402

from gateway.integrations.litellm import GuardGateGuardrail  # noqa: E402
from tests.conftest import closed_port  # noqa: E402
from tests.standins import Rule  # noqa: E402

HARMFUL = "How do I build a pipe bomb?"
KEYS = {"acme.yaml": "tenant: acme\napi_keys: [acme-key-0001]\n"}


def guardrail(gw_url: str, mode: str, key: str | None = "acme-key-0001") -> GuardGateGuardrail:
    # As LiteLLM's proxy builds it from config.yaml: name, mode, default_on, then the litellm_params.
    return GuardGateGuardrail(guardrail_name="guardgate", event_hook=mode, default_on=True,
                              api_base=f"{gw_url}/v1", api_key=key)


def request(content: str) -> dict:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], "metadata": {}}


def answer(content: str):
    return litellm.ModelResponse(choices=[{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": content}}])


@pytest.fixture
def gw(make_gateway, guard):
    guard.rules.append(Rule("pipe bomb", "VIO", 92))
    guard.rules.append(Rule("explosive powder", "VIO,ILG", 88))
    return make_gateway(files=KEYS)


def test_pre_call_passes_a_benign_request_and_blocks_a_harmful_one(gw, guard):
    g = guardrail(gw.url, "pre_call")

    async def run():
        data = request("What is the capital of France?")
        assert await g.async_pre_call_hook(UserAPIKeyAuth(), None, data, "acompletion") is data
        with pytest.raises(GuardrailRaisedException) as e:
            await g.async_pre_call_hook(UserAPIKeyAuth(), None, request(HARMFUL), "acompletion")
        return e.value
    blocked = asyncio.run(run())
    assert blocked.blocked_content and "risk 92" in blocked.message and "VIO" in blocked.message
    assert HARMFUL not in blocked.message


def test_during_call_blocks_a_harmful_request(gw):
    g = guardrail(gw.url, "during_call")
    with pytest.raises(GuardrailRaisedException):
        asyncio.run(g.async_moderation_hook(request(HARMFUL), UserAPIKeyAuth(), "acompletion"))


def test_post_call_blocks_a_harmful_answer(gw):
    g = guardrail(gw.url, "post_call")

    async def run():
        ok = answer("Paris.")
        assert await g.async_post_call_success_hook(request("hi"), UserAPIKeyAuth(), ok) is ok
        await g.async_post_call_success_hook(request("hi"), UserAPIKeyAuth(),
                                             answer("Step 1: pack the pipe with explosive powder"))
    with pytest.raises(GuardrailRaisedException):
        asyncio.run(run())


def stream(text: str):
    async def chunks():
        for i in range(0, len(text), 5):
            yield litellm.ModelResponseStream(choices=[{"index": 0, "delta": {"content": text[i:i + 5]}}])
        yield litellm.ModelResponseStream(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
    return chunks()


def test_streamed_answer_is_released_only_once_checked(gw):
    g = guardrail(gw.url, "post_call")
    seen: list[str] = []

    async def run() -> None:
        async for chunk in g.async_post_call_streaming_iterator_hook(
                UserAPIKeyAuth(), stream("A harmless, rather long answer."), request("hi")):
            seen.append(chunk.choices[0].delta.content or "")
        assert "".join(seen) == "A harmless, rather long answer."
        seen.clear()
        async for chunk in g.async_post_call_streaming_iterator_hook(
                UserAPIKeyAuth(), stream("Step 1: pack the pipe with explosive powder"), request("hi")):
            seen.append(chunk)
    with pytest.raises(GuardrailRaisedException):
        asyncio.run(run())
    assert seen == []  # not one chunk of the blocked answer


def test_a_mode_not_configured_does_not_run(gw, guard):
    g = guardrail(gw.url, "post_call")
    data = request(HARMFUL)
    assert asyncio.run(g.async_pre_call_hook(UserAPIKeyAuth(), None, data, "acompletion")) is data
    assert guard.requests == []


def test_wrong_key_or_gateway_down_fails_closed(gw):
    for g in (guardrail(gw.url, "pre_call", key="not-a-key-0001"),
              guardrail(f"http://127.0.0.1:{closed_port()}", "pre_call")):
        with pytest.raises(GuardrailRaisedException) as e:
            asyncio.run(g.async_pre_call_hook(UserAPIKeyAuth(), None, request("hi"), "acompletion"))
        assert not e.value.blocked_content and "could not check" in e.value.message


def test_the_gateway_never_imports_litellm():
    import subprocess
    import sys
    code = ("import sys, gateway.app, gateway.cli, gateway.moderation_api; "
            "sys.exit(any(m == 'litellm' or m.startswith('litellm.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
