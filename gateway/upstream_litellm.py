"""Upstreams through LiteLLM's Router (`models:` in the config): Anthropic, Bedrock, Azure, Ollama, Gemini, ….

The same `send` as the passthrough in `upstream`, answering with OpenAI's chat completion bytes: a
`chat.completion` body, or `data:` events of `chat.completion.chunk`s ending in `data: [DONE]`. The one
moderation path (pipeline, stream modes, hold-back) reads them exactly as it reads any upstream's. Routing,
load sharing and fallback between a name's deployments are LiteLLM's (each deployment's `order`).

litellm is imported by `LiteLLMUpstream()` only, so a gateway without `models:` never loads it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from pydantic import SecretStr

from gateway.config import ModelDeployment, RouterConfig
from gateway.errors import ClientError, UpstreamError

# The client's fields LiteLLM is given: OpenAI's chat completion parameters (and `thinking`, LiteLLM's
# switch for reasoning). Any other would reach LiteLLM as its own arguments (api_base, api_key,
# mock_response, metadata, …), letting a client steer the call or the gateway's key: refused.
FORWARDED = frozenset({
    "model", "messages", "stream", "stream_options", "n", "temperature", "top_p", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "user", "tools", "tool_choice", "parallel_tool_calls", "response_format", "seed", "reasoning_effort",
    "verbosity", "functions", "function_call", "modalities", "audio", "prediction", "web_search_options",
    "service_tier", "safety_identifier", "thinking",
})
_CHOICE_KEEP = ("index", "finish_reason", "logprobs")  # kept even when null, as OpenAI sends them
_JSON = {"content-type": "application/json"}


def model_list(models: list[ModelDeployment], router: RouterConfig) -> list[dict[str, Any]]:
    """LiteLLM's `model_list`: each entry's litellm_params, its order defaulting to its place among its name's."""
    seen: dict[str, int] = {}
    out = []
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
        params = {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in m.params.items()}
        params.update(model=m.model, order=m.order or seen[m.name])
        if m.api_base:
            params["api_base"] = m.api_base
        if m.api_key:
            params["api_key"] = m.api_key.get_secret_value()
        params.setdefault("timeout", router.timeout_s)
        params.setdefault("stream_timeout", router.timeout_s)
        out.append({"model_name": m.name, "litellm_params": params})
    return out


def call_arguments(body: bytes) -> dict[str, Any]:
    """The client's request as LiteLLM's keyword arguments. Raises ClientError for a field not forwarded."""
    data = orjson.loads(body)
    unknown = sorted(k for k in data if k not in FORWARDED)
    if unknown:
        raise ClientError(400, f"Unrecognized request argument supplied: {unknown[0]}. Models served through "
                               "LiteLLM take OpenAI's chat completion parameters only.", param=unknown[0],
                          code="unsupported_parameter")
    return data


def _pruned(value: Any) -> Any:
    """Without LiteLLM's nulls and empty `provider_specific_fields`: what OpenAI itself would send."""
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items() if v is not None}
        if not out.get("provider_specific_fields", True):
            del out["provider_specific_fields"]
        return out
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def _choice(choice: dict[str, Any], body_key: str) -> dict[str, Any]:
    out = {k: choice.get(k) for k in _CHOICE_KEEP}
    out.update(_pruned({k: v for k, v in choice.items() if k not in _CHOICE_KEEP}))
    message = out.get("message")
    if body_key == "message" and isinstance(message, dict):
        out["message"] = {"role": "assistant", "content": None, **message}
    return out


def completion_doc(dump: dict[str, Any]) -> dict[str, Any]:
    """A LiteLLM ModelResponse (model_dump) as OpenAI's chat.completion."""
    doc = _pruned({k: v for k, v in dump.items() if k != "choices"})
    doc["choices"] = [_choice(c, "message") for c in dump.get("choices") or []]
    return doc


def chunk_doc(dump: dict[str, Any]) -> dict[str, Any] | None:
    """A LiteLLM ModelResponseStream (model_dump) as OpenAI's chat.completion.chunk; None if it says nothing."""
    doc = _pruned({k: v for k, v in dump.items() if k != "choices"})
    choices = [_choice(c, "delta") for c in dump.get("choices") or []]
    # LiteLLM hangs the usage chunk on an empty choice 0; OpenAI sends it with no choices.
    said = [c for c in choices if c.get("delta") or c.get("finish_reason") is not None
            or c.get("logprobs") is not None or set(c) - {*_CHOICE_KEEP, "delta"}]
    if not said and "usage" not in doc:
        return None
    doc["choices"] = said
    return doc


class LiteLLMUpstream:
    """`models:` behind LiteLLM's Router, speaking the passthrough's `send`."""

    def __init__(self, models: list[ModelDeployment], router: RouterConfig) -> None:
        # Before the import: LiteLLM's bundled cost map (no fetch), and no .env file read into the environment.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("LITELLM_MODE", "PRODUCTION")
        # pydantic's notes on LiteLLM's own types, as it builds them (at import and on first use): not ours to fix
        warnings.filterwarnings("ignore", message=r".*`ReadOnly` qualifier", category=UserWarning)
        import litellm  # seconds and over 100 MB: only for a config with models

        litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on stdout
        self._litellm = litellm
        self.names = list(dict.fromkeys(m.name for m in models))
        self._secrets = sorted({s for m in models for s in m.secrets()}, key=len, reverse=True)
        settings: dict[str, Any] = {"num_retries": router.num_retries, "timeout": router.timeout_s}
        if router.allowed_fails is not None:
            settings["allowed_fails"] = router.allowed_fails
        if router.cooldown_s == 0:
            settings["disable_cooldowns"] = True  # LiteLLM reads a cooldown_time of 0 as "the default"
        elif router.cooldown_s is not None:
            settings["cooldown_time"] = router.cooldown_s
        self._router = litellm.Router(model_list=model_list(models, router), **settings)
        self._listed = orjson.dumps({"object": "list", "data": [
            {"id": n, "object": "model", "created": int(time.time()), "owned_by": "guardgate"} for n in self.names]})

    def check_model(self, model: str | None) -> None:
        """Raise ClientError unless `model` is one of the configured names (before anything is scored)."""
        if model is None:
            raise ClientError(400, "Missing required parameter: 'model'.", param="model",
                              code="missing_required_parameter")
        if model not in self.names:
            raise ClientError(404, f"The model '{model}' does not exist or you do not have access to it.",
                              param="model", code="model_not_found")

    async def send(self, method: str, path: str, body: bytes | None = None, *, stream: bool = False) -> httpx.Response:
        if method == "GET" and path == "/models":
            return httpx.Response(200, headers=_JSON, content=self._listed)
        if method != "POST" or path != "/chat/completions" or body is None:
            raise ClientError(404, f"Unknown request URL: {method} /v1{path}.", code="unknown_url")
        kwargs = call_arguments(body)
        self.check_model(kwargs.get("model"))
        try:
            answer = await self._router.acompletion(**kwargs)
        except Exception as e:  # LiteLLM's mapped provider errors, and whatever else it raises
            return self._error(e)
        if not stream:
            return httpx.Response(200, headers=_JSON, content=orjson.dumps(completion_doc(answer.model_dump())))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Events(answer))

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def _error(self, e: Exception) -> httpx.Response:
        """A provider error as OpenAI's error body with the provider's status; a timeout or an unreachable
        provider as the passthrough's 504 / 502."""
        if isinstance(e, self._litellm.Timeout):
            raise UpstreamError(504, "The upstream model did not answer in time.", code="upstream_timeout") from None
        if isinstance(e, self._litellm.APIConnectionError):
            raise UpstreamError(502, f"The upstream model could not be reached ({type(e).__name__}).",
                                code="upstream_unavailable") from None
        status = getattr(e, "status_code", None)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise UpstreamError(502, f"The upstream model failed ({type(e).__name__}).",
                                code="upstream_error") from None
        message = self._scrub(str(getattr(e, "message", None) or e))
        kind = ("rate_limit_error" if status == 429 else "server_error" if status >= 500
                else "authentication_error" if status in (401, 403) else "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": None,
                          "code": "rate_limit_exceeded" if status == 429 else None}}
        return httpx.Response(status, headers=_JSON, content=orjson.dumps(body))

    async def aclose(self) -> None:
        # LiteLLM keeps its provider clients in a module-level cache: close them with the app's loop.
        await self._litellm.close_litellm_async_clients()
        self._litellm.in_memory_llm_clients_cache.flush_cache()


class _Events(httpx.AsyncByteStream):
    """A LiteLLM stream as OpenAI's SSE bytes. A failure mid-stream is httpx.ReadError, as a broken
    passthrough stream is."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                doc = chunk_doc(chunk.model_dump())
                if doc is not None:
                    yield b"data: " + orjson.dumps(doc) + b"\n\n"
        except Exception as e:
            raise httpx.ReadError(type(e).__name__) from None
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        await self._stream.aclose()
