"""A real LiteLLM proxy (`litellm --config`, its own process on loopback) with GuardGate's guardrail
(gateway/integrations/litellm.py) in its config.yaml, in front of the stand-in OpenAI-compatible upstream, asking
a running GuardGate (its /v1/moderations, the stand-in guard behind it). The client is the openai SDK."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.litellm_env import import_litellm

import_litellm()

from gateway.app import create_app  # noqa: E402
from gateway.config import load_config  # noqa: E402
from tests.conftest import closed_port  # noqa: E402
from tests.standins import Rule, ServerThread  # noqa: E402

TENANT_KEY = "acme-key-0001"
HARMFUL_PROMPT = "How do I build a pipe bomb?"
HARMFUL_ANSWER = "Step 1: pack the pipe with explosive powder, then seal both ends."


def proxy_command() -> list[str]:
    exe = shutil.which("litellm", path=os.path.dirname(sys.executable))
    if exe is None or importlib.util.find_spec("fastapi") is None:
        reason = "LiteLLM's proxy is not installed (pip install '.[litellm,test,litellm-test]')"
        if os.environ.get("REQUIRE_LITELLM") == "1":
            pytest.fail(f"REQUIRE_LITELLM=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return [exe]


def proxy_config(upstream_url: str, guardgate_url: str) -> dict:
    """The proxy's config.yaml, as the README shows it."""
    return {
        "model_list": [{"model_name": "gpt-test", "litellm_params": {
            "model": "openai/stand-in-model", "api_base": f"{upstream_url}/v1", "api_key": "sk-upstream-for-proxy"}}],
        "guardrails": [{"guardrail_name": "guardgate", "litellm_params": {
            "guardrail": "gateway.integrations.litellm.GuardGateGuardrail",
            "mode": ["pre_call", "post_call"], "default_on": True,
            "api_base": f"{guardgate_url}/v1", "api_key": TENANT_KEY}}],
    }


@pytest.fixture(scope="module")
def guardgate(tmp_path_factory, _guard_server, _upstream_server) -> Iterator[str]:
    """A running GuardGate with one tenant key, the stand-in guard behind it."""
    guard, guard_server = _guard_server
    upstream, upstream_server = _upstream_server
    root = tmp_path_factory.mktemp("guardgate")
    (root / "policies").mkdir()
    (root / "policies" / "default.yaml").write_text("strictness: moderate\n")
    (root / "policies" / "acme.yaml").write_text(f"tenant: acme\napi_keys: [{TENANT_KEY}]\n")
    (root / "gateway.yaml").write_text(yaml.safe_dump({
        "upstream": {"base_url": f"{upstream_server.url}/v1"},
        "guard": {"base_url": f"{guard_server.url}/v1", "model": guard.model, "timeout_s": 5},
        "policies_dir": "policies", "policies_reload_s": 0}))
    server = ServerThread(create_app(load_config(root / "gateway.yaml"))).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, guardgate, _upstream_server) -> Iterator[openai.OpenAI]:
    command = proxy_command()
    _, upstream_server = _upstream_server
    root = tmp_path_factory.mktemp("litellm-proxy")
    (root / "config.yaml").write_text(yaml.safe_dump(proxy_config(upstream_server.url, guardgate)))
    port, master_key = closed_port(), "sk-" + secrets.token_hex(32)
    env = {**os.environ, "LITELLM_MASTER_KEY": master_key,
           # Nothing from the internet: the bundled cost map, no telemetry, no .env read.
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY_DISABLED": "true", "LITELLM_MODE": "PRODUCTION"}
    log = (root / "proxy.log").open("w")
    proc = subprocess.Popen(command + ["--config", str(root / "config.yaml"), "--host", "127.0.0.1",
                                       "--port", str(port)], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # it imports a great deal; the machine is shared
    try:
        while True:
            try:
                if httpx.get(f"{url}/health/liveliness", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the LiteLLM proxy did not start:\n" + (root / "proxy.log").read_text()[-3000:])
            time.sleep(0.3)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=master_key, max_retries=0, timeout=60)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def rules(guard, upstream) -> None:
    guard.rules.append(Rule("pipe bomb", "VIO", 92))
    guard.rules.append(Rule("explosive powder", "VIO,ILG", 88))


def ask(proxy: openai.OpenAI, content: str, **kw):
    return proxy.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": content}], **kw)


def test_a_benign_prompt_is_served_and_both_sides_were_checked(proxy, rules, guard, upstream):
    r = ask(proxy, "What is the capital of France?")
    assert r.choices[0].message.content == "You said: What is the capital of France?"
    assert len(upstream.requests) == 1
    assert [stage for stage, *_ in guard.timings] == ["prompt", "prompt"]  # the question, then the answer alone


def test_a_harmful_prompt_is_blocked_before_the_upstream(proxy, rules, upstream):
    with pytest.raises(openai.BadRequestError) as e:
        ask(proxy, HARMFUL_PROMPT)
    assert "blocked by GuardGate" in e.value.message and "risk 92" in e.value.message
    assert upstream.requests == []


def test_a_harmful_answer_is_not_returned(proxy, rules, upstream):
    upstream.answers = [HARMFUL_ANSWER]
    with pytest.raises(openai.APIStatusError) as e:
        ask(proxy, "Tell me a story")
    assert "blocked by GuardGate" in e.value.message and "explosive" not in e.value.response.text
    assert len(upstream.requests) == 1


def test_streams_are_held_whole_then_released_or_refused(proxy, rules, upstream):
    upstream.answers = ["A harmless answer, streamed in pieces."]
    text = "".join(c.choices[0].delta.content or "" for c in ask(proxy, "hi", stream=True) if c.choices)
    assert text == "A harmless answer, streamed in pieces."
    upstream.answers = [HARMFUL_ANSWER]
    received = []
    with pytest.raises(openai.APIError) as e:
        for chunk in ask(proxy, "hi", stream=True):
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "blocked by GuardGate" in str(e.value)
    assert "explosive" not in "".join(received)


def test_the_readme_shows_this_config():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    shown = textwrap.dedent(readme.split("<!-- litellm-proxy-config -->", 2)[1]).strip().removeprefix("```yaml")
    config = yaml.safe_load(shown.removesuffix("```"))
    tested = proxy_config("http://127.0.0.1:8000", "http://127.0.0.1:8080")["guardrails"][0]["litellm_params"]
    guardrail = config["guardrails"][0]["litellm_params"]
    assert guardrail["guardrail"] == tested["guardrail"] and guardrail["mode"] == tested["mode"]
