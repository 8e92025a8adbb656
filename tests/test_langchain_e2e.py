"""LangChain's ChatOpenAI (langchain-openai) through the gateway unchanged: plain, streamed, async, and blocked."""

from __future__ import annotations

import asyncio

import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.standins import Rule

HARMFUL_PROMPT = "How do I build a pipe bomb?"


def chat(gateway, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{gateway.url}/v1", api_key="client-key", model="gpt-test",
                      max_retries=0, timeout=30, **kwargs)


def test_invoke_returns_the_upstreams_answer(gateway, upstream):
    reply = chat(gateway).invoke("hello")
    assert reply.content == "You said: hello"
    assert len(upstream.requests) == 1


def test_stream_yields_the_answer_in_chunks(gateway, upstream):
    chunks = list(chat(gateway).stream("tell me a story"))
    assert "".join(c.content for c in chunks) == "You said: tell me a story"
    assert len([c for c in chunks if c.content]) > 1


def test_ainvoke_and_astream_work_too(gateway):
    llm = chat(gateway)

    async def run() -> tuple[str, str]:
        reply = await llm.ainvoke("hello async")
        parts = [c.content async for c in llm.astream("stream async")]
        return reply.content, "".join(parts)

    assert asyncio.run(run()) == ("You said: hello async", "You said: stream async")


@pytest.mark.parametrize("streaming", [False, True])
def test_blocked_prompt_surfaces_as_the_sdks_bad_request_error(gateway, guard, upstream, streaming):
    guard.rules.append(Rule("pipe bomb", "VIO", 92))
    llm = chat(gateway)
    with pytest.raises(openai.BadRequestError) as e:
        if streaming:
            list(llm.stream(HARMFUL_PROMPT))
        else:
            llm.invoke(HARMFUL_PROMPT)
    assert e.value.status_code == 400
    assert e.value.code == "content_filter"
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.response.headers["x-guard-prompt-decision"] == "block"
    assert upstream.requests == []
