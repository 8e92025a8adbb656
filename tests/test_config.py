"""The gateway config is validated at start, with errors that name the file, the line and the key."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gateway.config import load_config
from gateway.yamlfile import ConfigError

GOOD = """\
upstream:
  base_url: https://api.openai.com/v1
  api_key: ${TEST_UPSTREAM_KEY}
guard:
  base_url: http://127.0.0.1:8000/v1
policies_dir: policies
"""


def write(tmp_path, text):
    (tmp_path / "policies").mkdir(exist_ok=True)
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_env_interpolation_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-from-env")
    config = load_config(write(tmp_path, GOOD))
    assert config.upstream.api_key.get_secret_value() == "sk-from-env"
    assert config.policies_dir == (tmp_path / "policies").resolve()
    assert "sk-from-env" not in repr(config)  # secrets stay out of reprs and logs


def test_env_default(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_UPSTREAM_KEY", raising=False)
    config = load_config(write(tmp_path, GOOD.replace("${TEST_UPSTREAM_KEY}", "${TEST_UPSTREAM_KEY:-sk-default}")))
    assert config.upstream.api_key.get_secret_value() == "sk-default"


@pytest.mark.parametrize("text,expected", [
    (GOOD.replace("guard:\n  base_url", "guard:\n  bse_url"), ["gateway.yaml:5: guard.bse_url: unknown key (allowed: api_key, backend, base_url"]),
    (GOOD.replace("guard:\n", "guard:\n  backend: duoguard\n").replace("  base_url: http://127.0.0.1:8000/v1\n", ""),
     ["guard: backend duoguard needs base_url"]),
    (GOOD.replace("guard:\n", "guard:\n  cascade: {uncertain: [70, 20]}\n"), ["guard.cascade.uncertain: expected [low, high]"]),
    (GOOD.replace("upstream:\n  base_url: https://api.openai.com/v1\n", "upstream:\n"), ["gateway.yaml:1: upstream.base_url: required key is missing"]),
    (GOOD + "server:\n  port: 99999\n", ["gateway.yaml:8: server.port: Input should be less than or equal to 65535 (got 99999)"]),
    (GOOD + "server: {log_level: loud}\n", ["server.log_level: Input should be 'debug', 'info', 'warning' or 'error' (got 'loud')"]),
    (GOOD.replace("backend", "x") + "guard2: 1\n", ["gateway.yaml:7: guard2: unknown key (allowed: cache, guard, models, policies_dir, policies_reload_s, router, server, upstream)"]),
    ("upstream: [1\n", ["gateway.yaml:2: not valid YAML"]),
    ("- a\n- b\n", ["expected a mapping of keys at the top level"]),
    (GOOD, ["gateway.yaml:3: upstream.api_key: environment variable TEST_UPSTREAM_KEY is not set"]),
])
def test_bad_configs_say_where_and_what(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("TEST_UPSTREAM_KEY", raising=False)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    for part in expected:
        assert part in str(e.value)


MODELS = """\
models:
  - name: claude
    model: anthropic/claude-sonnet-4-5
    api_key: ${TEST_ANTHROPIC_KEY}
    params: {max_tokens: 1024}
  - name: claude
    model: bedrock/anthropic.claude-sonnet-4-5-v1:0
    params:
      aws_region_name: us-east-1
      aws_secret_access_key: ${TEST_AWS_SECRET}
  - name: local
    model: ollama_chat/llama3.1
    api_base: http://127.0.0.1:11434
    order: 3
router: {num_retries: 1, cooldown_s: 0}
guard:
  base_url: http://127.0.0.1:8000/v1
"""


def test_models_instead_of_an_upstream(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-from-env")
    monkeypatch.setenv("TEST_AWS_SECRET", "aws-secret-from-env")
    config = load_config(write(tmp_path, MODELS))
    assert config.upstream is None and [m.name for m in config.models] == ["claude", "claude", "local"]
    claude, bedrock, local = config.models
    assert claude.api_key.get_secret_value() == "sk-ant-from-env" and claude.params == {"max_tokens": 1024}
    assert bedrock.params["aws_region_name"] == "us-east-1"
    assert sorted(bedrock.secrets()) == ["aws-secret-from-env"] and local.order == 3
    assert config.router.num_retries == 1 and config.router.cooldown_s == 0
    # secrets stay out of reprs, also those in params
    assert "sk-ant-from-env" not in repr(config) and "aws-secret-from-env" not in repr(config)


@pytest.mark.parametrize("text,expected", [
    (MODELS + GOOD.split("guard:")[0], ["set either upstream (one OpenAI-compatible API) or models (providers "
                                        "through LiteLLM), not both"]),
    (MODELS.replace("    params: {max_tokens: 1024}\n", "    params: {api_base: http://x}\n"),
     ["gateway.yaml:5: models.0.params: set api_base as the entry's own key, not in params"]),
    (MODELS.replace("  - name: local\n", "  - nme: local\n"), ["models.2.nme: unknown key"]),
    (MODELS.replace("    order: 3\n", "    order: 0\n"), ["models.2.order: Input should be greater than or equal to 1"]),
    ("models: []\n", ["models: List should have at least 1 item"]),
])
def test_bad_models_say_where_and_what(tmp_path, monkeypatch, text, expected):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "k")
    monkeypatch.setenv("TEST_AWS_SECRET", "s")
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "u")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    for part in expected:
        assert part in str(e.value)


def test_a_wrong_secret_value_is_not_echoed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD.replace("${TEST_UPSTREAM_KEY}", "[sk-oops-123]")))
    assert "upstream.api_key" in str(e.value) and "sk-oops-123" not in str(e.value)


def test_serve_fails_fast_on_a_bad_config(tmp_path):
    path = write(tmp_path, GOOD.replace("guard:", "gaurd:"))
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "gateway.yaml:4: gaurd: unknown key (allowed: cache, guard," in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_config_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.yaml: cannot read" in r.stderr


def test_bad_default_policy_fails_the_start(tmp_path):
    path = write(tmp_path, GOOD.replace("${TEST_UPSTREAM_KEY}", "k"))
    (tmp_path / "policies" / "default.yaml").write_text("strictness: medium\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "default.yaml:1: strictness" in r.stderr


def test_workers_default_to_one_and_must_be_at_least_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "k")
    assert load_config(write(tmp_path, GOOD)).server.workers == 1
    assert load_config(write(tmp_path, GOOD + "server:\n  workers: 4\n")).server.workers == 4
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD + "server:\n  workers: 0\n"))
    assert "server.workers" in str(e.value)


def test_serve_refuses_a_workers_count_below_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "none.yaml"),
                           "--workers", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "--workers" in done.stderr
