"""The pure parts of the LiteLLM upstream: deployments as LiteLLM's model_list, the client's arguments, and
LiteLLM's answers in OpenAI's shape. No litellm needed (the module imports it only when constructed)."""

from __future__ import annotations

import pytest

from gateway.config import ModelDeployment, RouterConfig
from gateway.errors import ClientError
from gateway.upstream_litellm import call_arguments, chunk_doc, completion_doc, model_list


def test_deployments_of_one_name_fall_back_in_the_order_listed():
    models = [ModelDeployment(name="claude", model="anthropic/a", api_key="k1"),
              ModelDeployment(name="local", model="ollama_chat/llama3.1", api_base="http://127.0.0.1:11434"),
              ModelDeployment(name="claude", model="bedrock/b", params={"aws_secret_access_key": "s3",
                                                                         "aws_region_name": "us-east-1"}),
              ModelDeployment(name="claude", model="azure/c", order=2, params={"timeout": 5})]
    listed = model_list(models, RouterConfig(timeout_s=30))
    assert [(d["model_name"], d["litellm_params"]["order"]) for d in listed] == [
        ("claude", 1), ("local", 1), ("claude", 2), ("claude", 2)]
    assert listed[0]["litellm_params"] == {"model": "anthropic/a", "order": 1, "api_key": "k1", "timeout": 30,
                                           "stream_timeout": 30}
    assert listed[2]["litellm_params"]["aws_secret_access_key"] == "s3"  # unwrapped only here
    assert listed[3]["litellm_params"]["timeout"] == 5  # a deployment's own params win


def test_only_openais_chat_parameters_reach_litellm():
    assert call_arguments(b'{"model": "m", "messages": [], "temperature": 0.2, "tools": []}')["temperature"] == 0.2
    for field in ("api_base", "api_key", "mock_response", "metadata", "extra_headers", "custom_llm_provider"):
        with pytest.raises(ClientError) as e:
            call_arguments(b'{"model": "m", "messages": [], "%s": 1}' % field.encode())
        assert e.value.status == 400 and e.value.param == field and e.value.code == "unsupported_parameter"


def test_litellms_nulls_are_dropped_and_openais_choice_fields_kept():
    doc = completion_doc({"id": "x", "object": "chat.completion", "system_fingerprint": None, "choices": [
        {"index": 0, "finish_reason": "stop", "provider_specific_fields": {},
         "message": {"role": "assistant", "content": "hi", "tool_calls": None,
                     "provider_specific_fields": {"citations": None, "thinking_blocks": None}}}]})
    assert doc == {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": None, "message": {"role": "assistant", "content": "hi"}}]}
    # A tool call's message keeps content: null, as OpenAI's does.
    doc = completion_doc({"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "content": None, "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]})
    assert doc["choices"][0]["message"]["content"] is None and doc["choices"][0]["message"]["role"] == "assistant"


def test_a_usage_chunk_has_no_choices_and_an_empty_chunk_is_dropped():
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    empty_choice = {"index": 0, "finish_reason": None, "delta": {"content": None, "role": None}, "logprobs": None}
    assert chunk_doc({"id": "x", "choices": [empty_choice], "usage": usage}) == {"id": "x", "choices": [], "usage": usage}
    assert chunk_doc({"id": "x", "choices": [empty_choice]}) is None
    kept = chunk_doc({"id": "x", "choices": [{**empty_choice, "finish_reason": "stop"}]})
    assert kept is not None and kept["choices"][0]["finish_reason"] == "stop"
