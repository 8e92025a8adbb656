"""`models:` through real LiteLLM, in front of loopback stand-ins of Anthropic's Messages API and Ollama's chat
API (and the OpenAI-shaped stand-in, for n > 1), with the openai SDK as the client: the one moderation path
on what LiteLLM returns, plain and streamed; fallback; errors; the model list."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
import yaml

from tests.litellm_env import import_litellm

import_litellm()

from gateway.app import create_app  # noqa: E402
from gateway.config import load_config  # noqa: E402
from tests.conftest import closed_port, fresh, serve_gateway  # noqa: E402
from tests.provider_standins import ProviderBehaviour, anthropic_app, ollama_app  # noqa: E402
from tests.standins import Rule, ServerThread  # noqa: E402

ANTHROPIC_KEY = "sk-ant-SECRET-anthropic-0123456789"
BACKUP_KEY = "sk-ant-SECRET-backup-9876543210"
HARMFUL_PROMPT = "How do I build a pipe bomb?"
BENIGN = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. "
          "Chlorophyll in the leaves absorbs mostly red and blue light. ")
HARMFUL = "Now mix the bleach with ammonia in a closed room. "
WINDOWED = "response: {stream: windowed, window: 100}\n"


def _serve(app_of: Callable[[ProviderBehaviour], object]) -> Iterator[tuple[ProviderBehaviour, ServerThread]]:
    behaviour = ProviderBehaviour()
    server = ServerThread(app_of(behaviour)).start()
    yield behaviour, server
    server.stop()


@pytest.fixture(scope="module")
def _anthropic():
    yield from _serve(anthropic_app)


@pytest.fixture(scope="module")
def _anthropic_backup():
    yield from _serve(anthropic_app)


@pytest.fixture(scope="module")
def _ollama():
    yield from _serve(ollama_app)


@pytest.fixture
def anthropic(_anthropic) -> ProviderBehaviour:
    return fresh(_anthropic)


@pytest.fixture
def backup(_anthropic_backup) -> ProviderBehaviour:
    return fresh(_anthropic_backup)


@pytest.fixture
def ollama(_ollama) -> ProviderBehaviour:
    return fresh(_ollama)


def models_config(anthropic, backup, ollama, upstream) -> list[dict]:
    return [
        {"name": "claude", "model": "anthropic/claude-stand-in", "api_base": anthropic.url, "api_key": ANTHROPIC_KEY,
         "params": {"max_tokens": 256}},
        {"name": "claude", "model": "anthropic/claude-backup", "api_base": backup.url, "api_key": BACKUP_KEY},
        {"name": "local", "model": "ollama_chat/llama3.1", "api_base": ollama.url},
        {"name": "gpt-compat", "model": "openai/stand-in-model", "api_base": f"{upstream.url}/v1",
         "api_key": "sk-compat-SECRET-555"},
    ]


def write_config(tmp_path: Path, guard, models: list[dict], policy: str = "strictness: moderate\n",
                 files: dict[str, str] | None = None) -> Path:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "default.yaml").write_text(textwrap.dedent(policy))
    for name, text in (files or {}).items():
        (policies / name).write_text(textwrap.dedent(text))
    config = {"models": models, "router": {"timeout_s": 20, "cooldown_s": 0},
              "guard": {"base_url": f"{guard.url}/v1", "model": guard.model, "timeout_s": 2},
              "policies_dir": "policies", "policies_reload_s": 0, "server": {"allow_open": True}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def make_litellm_gateway(tmp_path, guard, upstream, anthropic, backup, ollama):
    running: list[ServerThread] = []

    def make(policy: str = "strictness: moderate\n", models: list[dict] | None = None) -> openai.OpenAI:
        path = write_config(tmp_path, guard, models or models_config(anthropic, backup, ollama, upstream), policy)
        server = ServerThread(create_app(load_config(path))).start()
        running.append(server)
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key="client-key", max_retries=0, timeout=30)

    yield make
    for server in running:
        server.stop()


@pytest.fixture
def client(make_litellm_gateway, guard) -> openai.OpenAI:
    guard.rules.append(Rule("pipe bomb", "VIO", 92))
    guard.rules.append(Rule("bleach with ammonia", "VIO", 90))
    return make_litellm_gateway(WINDOWED)


PROVIDERS = {"claude": "anthropic", "local": "ollama"}


@pytest.fixture(params=sorted(PROVIDERS))
def provider(request, anthropic, ollama) -> tuple[str, ProviderBehaviour]:
    """(public model name, its stand-in)."""
    return request.param, {"anthropic": anthropic, "ollama": ollama}[PROVIDERS[request.param]]


def ask(client, model: str, content: str = "What is photosynthesis?", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def stream(client, model: str, content: str = "What is photosynthesis?", **kw):
    """Text per choice, finish reason per choice, tool-call arguments per choice."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    args: dict[int, str] = {}
    for chunk in ask(client, model, content, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            for call in c.delta.tool_calls or []:
                args[c.index] = args.get(c.index, "") + (call.function.arguments or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, args


# ----- each provider, plain and streamed -----

def test_a_benign_request_is_answered_plain(client, provider, guard):
    name, standin = provider
    raw = client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": "What is photosynthesis?"}])
    r = raw.parse()
    assert r.choices[0].message.content == "You said: What is photosynthesis?"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    assert len(standin.requests) == 1
    assert raw.headers["x-guard-prompt-decision"] == "allow"
    assert [s for s, *_ in guard.timings] == ["prompt", "response"]


def test_a_benign_request_is_answered_streamed(client, provider):
    name, standin = provider
    standin.answer = BENIGN * 3
    texts, finish, _ = stream(client, name)
    assert texts == {0: BENIGN * 3} and finish == {0: "stop"}
    assert standin.streams[-1]["completed"] is True


@pytest.mark.parametrize("streamed", [False, True])
def test_a_harmful_prompt_is_blocked_before_the_provider_is_called(client, provider, streamed):
    name, standin = provider
    with pytest.raises(openai.BadRequestError) as e:
        if streamed:
            stream(client, name, HARMFUL_PROMPT)
        else:
            ask(client, name, HARMFUL_PROMPT)
    assert e.value.code == "content_filter"
    assert standin.requests == []


def test_a_harmful_answer_is_withheld_plain(client, provider):
    name, standin = provider
    standin.answer = BENIGN + HARMFUL
    r = ask(client, name)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content is None


def test_a_harmful_answer_is_withheld_mid_stream(client, provider):
    name, standin = provider
    before = BENIGN * 4
    standin.answer = before + HARMFUL + BENIGN * 6
    standin.chunk_delay_s = 0.002
    texts, finish, _ = stream(client, name)
    released = texts.get(0, "")
    assert finish == {0: "content_filter"}
    assert "ammonia" not in released and before.startswith(released)
    assert len(released) >= 200  # the windows before it did reach the client
    # Every choice cut: the provider's stream was closed through LiteLLM before it finished.
    deadline = time.monotonic() + 5
    while "closed_at" not in standin.streams[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert standin.streams[-1]["completed"] is False


# ----- tool calls, n > 1 -----

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


def test_tool_calls_come_back_in_openai_shape_and_are_scored(client, anthropic, guard):
    anthropic.tool_call = {"name": "get_weather", "input": {"city": "Paris"}}
    r = ask(client, "claude", tools=WEATHER)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and call.function.arguments.replace(" ", "") == '{"city":"Paris"}'
    _, finish, args = stream(client, "claude", tools=WEATHER)
    assert finish == {0: "tool_calls"} and args[0].replace(" ", "") == '{"city":"Paris"}'
    answers = [r["messages"][1]["content"] for r in guard.requests if "[Assistant]: " in r["messages"][1]["content"]]
    assert answers and all("get_weather(" in a and "Paris" in a for a in answers)


def test_a_harmful_tool_call_is_withheld_plain_and_streamed(client, anthropic):
    anthropic.tool_call = {"name": "run", "input": {"step": "mix the bleach with ammonia in a closed room"}}
    r = ask(client, "claude", tools=WEATHER)
    assert r.choices[0].finish_reason == "content_filter" and not r.choices[0].message.tool_calls
    _, finish, args = stream(client, "claude", tools=WEATHER)
    assert finish == {0: "content_filter"} and "ammonia" not in args.get(0, "")


def test_n2_through_litellm_cuts_only_the_harmful_choice(client, upstream):
    upstream.answers = [BENIGN * 2, BENIGN + HARMFUL]
    r = ask(client, "gpt-compat", n=2)
    assert [c.finish_reason for c in r.choices] == ["stop", "content_filter"]
    assert r.choices[0].message.content == BENIGN * 2
    texts, finish, _ = stream(client, "gpt-compat", n=2)
    assert texts[0] == BENIGN * 2 and "ammonia" not in texts.get(1, "")
    assert finish[1] == "content_filter"


def test_n2_on_a_provider_without_it_is_the_providers_400(client, anthropic):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "claude", n=2)
    assert "n" in e.value.message and anthropic.requests == []
    assert set(e.value.body) >= {"message", "type", "param", "code"}


# ----- fallback and errors -----

@pytest.mark.parametrize("streamed", [False, True])
def test_the_second_deployment_answers_when_the_first_returns_500(client, anthropic, backup, streamed):
    anthropic.status = 500
    if streamed:
        texts, finish, _ = stream(client, "claude", "hello")
        assert texts == {0: "You said: hello"} and finish == {0: "stop"}
    else:
        assert ask(client, "claude", "hello").choices[0].message.content == "You said: hello"
    assert len(anthropic.requests) == 1 and len(backup.requests) == 1
    assert backup.requests[0]["headers"]["x-api-key"] == BACKUP_KEY  # each deployment its own key


@pytest.mark.parametrize("status,error", [(500, openai.InternalServerError), (503, openai.InternalServerError),
                                          (429, openai.RateLimitError), (401, openai.AuthenticationError),
                                          (404, openai.NotFoundError)])
def test_a_provider_error_keeps_its_status_in_openai_shape(client, anthropic, backup, status, error):
    anthropic.status = backup.status = status
    for call in (ask, stream):
        with pytest.raises(error) as e:
            call(client, "claude")
        assert e.value.status_code == status
        assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}
        assert ANTHROPIC_KEY not in e.value.response.text and BACKUP_KEY not in e.value.response.text


def test_anthropics_overloaded_529_comes_back_as_litellm_maps_it(client, anthropic, backup):
    anthropic.status = backup.status = 529
    with pytest.raises(openai.InternalServerError) as e:
        ask(client, "claude")
    assert e.value.status_code == 500 and "overloaded_error" in e.value.message


def test_an_unreachable_provider_is_502(make_litellm_gateway, guard):
    client = make_litellm_gateway(models=[{"name": "down", "model": "ollama_chat/llama3.1",
                                           "api_base": f"http://127.0.0.1:{closed_port()}"}])
    with pytest.raises(openai.InternalServerError) as e:
        ask(client, "down")
    assert e.value.status_code == 502 and e.value.code == "upstream_unavailable"


def test_a_provider_slower_than_router_timeout_is_504(make_litellm_gateway, guard, ollama):
    ollama.delay_s = 5
    client = make_litellm_gateway(models=[{"name": "slow", "model": "ollama_chat/llama3.1", "api_base": ollama.url,
                                           "params": {"timeout": 1, "stream_timeout": 1}}])
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "slow")
    assert e.value.status_code == 504 and e.value.code == "upstream_timeout"
    assert time.monotonic() - started < 4.5


def test_a_client_that_hangs_up_mid_stream_closes_the_providers_stream(make_litellm_gateway, anthropic):
    client = make_litellm_gateway()
    anthropic.answer = BENIGN * 20
    anthropic.chunk_delay_s = 0.01
    with httpx.stream("POST", f"{client.base_url}chat/completions", timeout=30, json={
            "model": "claude", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        next(r.iter_bytes())
    deadline = time.monotonic() + 10
    while not (anthropic.streams and "closed_at" in anthropic.streams[-1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert anthropic.streams[-1]["completed"] is False and "closed_at" in anthropic.streams[-1]


def test_an_unknown_model_is_404_before_anything_is_scored(client, guard, anthropic):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "gpt-5-nope", HARMFUL_PROMPT)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert guard.requests == [] and anthropic.requests == []


def test_litellm_arguments_from_the_client_are_refused(client, anthropic):
    for extra in ({"api_base": "http://127.0.0.1:9/steal"}, {"api_key": "x"}, {"mock_response": "hi"},
                  {"metadata": {"model_group": "x"}}):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, "claude", extra_body=extra)
        assert e.value.code == "unsupported_parameter" and e.value.param == next(iter(extra))
    assert anthropic.requests == []


def test_the_gateways_key_goes_to_the_provider_not_the_clients(client, anthropic):
    ask(client, "claude")
    headers = anthropic.requests[0]["headers"]
    assert headers["x-api-key"] == ANTHROPIC_KEY and "client-key" not in str(headers)
    assert anthropic.requests[0]["body"]["max_tokens"] == 256  # the deployment's params


# ----- the model list -----

def test_the_stream_on_the_wire_is_openais(make_litellm_gateway, anthropic):
    client = make_litellm_gateway()
    r = httpx.post(f"{client.base_url}chat/completions", timeout=30, json={
        "model": "claude", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    events = [e for e in r.text.split("\n\n") if e]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["choices"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "You said: hi"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # LiteLLM's empty fields are not passed on
    assert "provider_specific_fields" not in r.text and '"tool_calls":null' not in r.text


def test_models_list_and_retrieve_show_the_configured_names(client):
    assert [m.id for m in client.models.list()] == ["claude", "local", "gpt-compat"]
    assert client.models.retrieve("claude").id == "claude"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("anthropic/claude-stand-in")  # a LiteLLM model string is not a public name
    assert e.value.code == "model_not_found"


# ----- as a user runs it: secrets, and litellm only when models are configured -----

@pytest.mark.parametrize("log_level", ["info", "debug"])
def test_served_from_the_cli_no_secret_reaches_a_log_or_an_answer(tmp_path, guard, anthropic, backup, ollama,
                                                                 upstream, log_level):
    models = models_config(anthropic, backup, ollama, upstream)
    models[0]["api_key"] = "${TEST_ANTHROPIC_KEY}"
    path = write_config(tmp_path, guard, models)
    config = yaml.safe_load(path.read_text())
    config["server"]["log_level"] = log_level
    path.write_text(yaml.safe_dump(config))
    port = closed_port()
    proc = serve_gateway(path, port, env={**os.environ, "TEST_ANTHROPIC_KEY": ANTHROPIC_KEY})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        assert ask(client, "claude", "hi").choices[0].message.content == "You said: hi"
        assert anthropic.requests[0]["headers"]["x-api-key"] == ANTHROPIC_KEY  # ${ENV} interpolated
        anthropic.status = backup.status = 401
        bodies = []
        for _ in range(2):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                           json={"model": "claude", "messages": [{"role": "user", "content": "hi"}]})
            bodies.append(r.text)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert "LiteLLM" in output or log_level == "info"  # at debug, LiteLLM's own logs are there to search
    for secret in (ANTHROPIC_KEY, BACKUP_KEY, "sk-compat-SECRET-555"):
        assert secret not in output and all(secret not in b for b in bodies)


def test_a_gateway_without_models_never_imports_litellm(tmp_path, guard, upstream):
    path = write_config(tmp_path, guard, [])
    config = yaml.safe_load(path.read_text())
    del config["models"], config["router"]
    config["upstream"] = {"base_url": f"{upstream.url}/v1"}
    path.write_text(yaml.safe_dump(config))
    code = (f"import sys; from gateway.app import create_app; from gateway.config import load_config; "
            f"create_app(load_config({str(path)!r})); "
            "sys.exit(any(m == 'litellm' or m.startswith('litellm.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
