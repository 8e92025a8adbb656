"""The first minutes: what `guardgate serve` says when it starts, the overrides it refuses, every broken policy
file at once, `.yml` files, and `guardgate check` as a script uses it (exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import GatewayConfig
from gateway.policy.store import PolicyStore
from gateway.startup import summary, warnings
from gateway.yamlfile import ConfigError
from tests.conftest import ADMIN_KEY, closed_port, guardgate_command, serve_gateway
from tests.standins import Rule


def write(tmp_path: Path, config: dict, policies: dict[str, str]) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir(exist_ok=True)
    for name, text in policies.items():
        (folder / name).write_text(text)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"policies_dir": "policies", **config}))
    return path


def run_briefly(config_path: Path, env: dict | None = None) -> str:
    """Start `guardgate serve`, wait until it serves, stop it; its output."""
    proc = serve_gateway(config_path, closed_port(), env=env)
    proc.terminate()
    return proc.communicate(timeout=30)[0]


def guardgate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(guardgate_command() + list(args), capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_newcomers_start_says_what_runs_and_warns_of_each_sharp_edge(tmp_path, upstream):
    # The quick start's situation: the embedded guard, no keys anywhere, no upstream key for OpenAI.
    path = write(tmp_path, {"upstream": {"base_url": "https://api.openai.com/v1"},
                            "server": {"allow_open": True, "log_format": "text"}},
                 {"default.yaml": "strictness: moderate\n"})
    out = run_briefly(path, env={k: v for k, v in os.environ.items() if k != "UPSTREAM_API_KEY"})
    start = next(line for line in out.splitlines() if "guardgate starting" in line)
    assert "guard_backend=embedded" in start and "upstream=https://api.openai.com/v1" in start
    assert "upstream_key=none" in start and "tenants=default:0" in start and "workers=1" in start
    assert 'cache="in-process only"' in start and f"policies_dir={tmp_path / 'policies'}" in start
    assert "WARNING upstream.api_key is not set and the upstream is api.openai.com" in out
    assert "WARNING no api_keys in any policy file" in out and "the gateway is open" in out
    assert "WARNING no guard.base_url: scoring with the embedded CPU guard" in out
    assert "much weaker than FlexGuard" in out
    assert out.count("guardgate starting") == 1


def test_a_production_start_lists_guard_endpoints_tenants_and_keys_without_warnings(tmp_path, guard, upstream,
                                                                                     redis_server):
    path = write(tmp_path, {"upstream": {"base_url": f"{upstream.url}/v1", "api_key": "sk-secret-upstream"},
                            "guard": {"base_url": f"{guard.url}/v1"},
                            "cache": {"redis_url": redis_server.url},
                            "server": {"admin_key": ADMIN_KEY}},
                 {"default.yaml": "strictness: moderate\n",
                  "kids.yaml": "tenant: kids\napi_keys: [kids-key-0001, kids-key-0002]\n",
                  "lab.yml": "tenant: lab\napi_keys: [lab-key-00001]\n"})
    out = run_briefly(path)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    start = next(line for line in lines if line.get("event") == "startup")
    assert start["guard_backend"] == "flexguard" and start["guard_model"] == guard.model
    assert start["guard_endpoints"] == [f"{guard.url}/v1"]
    assert start["tenants"] == {"default": 0, "kids": 2, "lab": 1}
    assert start["upstream"] == f"{upstream.url}/v1" and start["upstream_key"] == "set"
    assert start["cache"].startswith("redis redis://") and "127.0.0.1:" in start["cache"]
    password = urlsplit(redis_server.url).password
    assert not password or password not in out
    assert not [line for line in lines if line["level"] == "warning"]
    assert "sk-secret-upstream" not in out and "kids-key-0001" not in out and ADMIN_KEY not in out


def test_each_warning_alone():
    def config(**kw) -> GatewayConfig:
        return GatewayConfig.model_validate({"upstream": {"base_url": "http://127.0.0.1:9/v1"},
                                             "guard": {"base_url": "http://127.0.0.1:8/v1"}, **kw})

    keyed = PolicyStore(Path(__file__).parents[1] / "policies" / "examples", 0).current
    assert warnings(config(), keyed, workers=1) == []
    openai_without_key = config(upstream={"base_url": "https://api.openai.com/v1"})
    assert [w.event for w in warnings(openai_without_key, keyed, workers=1)] == ["upstream_without_key"]
    assert warnings(config(upstream={"base_url": "https://api.openai.com/v1", "api_key": "sk-x"}), keyed,
                    workers=1) == []
    embedded = config(guard={})
    assert [w.event for w in warnings(embedded, keyed, workers=1)] == ["embedded_guard"]
    assert [w.event for w in warnings(config(), keyed, workers=2)] == ["workers_without_redis"]
    assert summary(config(), keyed, host="::", port=8080, workers=2)["listen"] == "http://[::]:8080"


def test_open_gateway_warning(tmp_path):
    (tmp_path / "default.yaml").write_text("strictness: moderate\n")
    policies = PolicyStore(tmp_path, 0).current
    config = GatewayConfig.model_validate({"upstream": {"base_url": "http://127.0.0.1:9/v1"},
                                           "guard": {"base_url": "http://127.0.0.1:8/v1"}})
    assert [w.event for w in warnings(config, policies, workers=1)] == ["auth_open"]


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port: Input should be less than or equal to 65535 (got '70000')"),
    (["--port", "0"], "--port: Input should be greater than or equal to 1 (got '0')"),
    (["--port", "http"], "--port: Input should be a valid integer"),
    (["--host", "http://0.0.0.0"], "--host: expected an IP address"),
    (["--host", "bad host"], "--host: expected an IP address"),
])
def test_host_and_port_overrides_are_validated_like_the_files_keys(tmp_path, args, message):
    path = write(tmp_path, {"upstream": {"base_url": "http://127.0.0.1:9/v1"}, "server": {"allow_open": True}},
                 {"default.yaml": "strictness: moderate\n"})
    r = guardgate("serve", "--config", str(path), *args)
    assert r.returncode == 2 and "configuration error" in r.stderr and message in r.stderr, r.stderr


def test_the_files_host_is_validated_too(tmp_path):
    path = write(tmp_path, {"upstream": {"base_url": "http://127.0.0.1:9/v1"}, "server": {"host": "localhost:80"}},
                 {"default.yaml": "strictness: moderate\n"})
    r = guardgate("serve", "--config", str(path))
    assert r.returncode == 2 and "server.host: expected an IP address" in r.stderr


def test_every_broken_policy_file_is_listed_at_start(tmp_path):
    path = write(tmp_path, {"upstream": {"base_url": "http://127.0.0.1:9/v1"}, "server": {"allow_open": True}},
                 {"default.yaml": "strictness: moderate\n", "a.yaml": "tenant: a\nstrictnes: loose\n",
                  "b.yml": "tenant: b\nstrictness: 300\n", "c.yaml": "tenant: [\n", "ok.yaml": "tenant: ok\n"})
    r = guardgate("serve", "--config", str(path))
    assert r.returncode == 2, r.stderr
    assert "a.yaml:2: strictnes: unknown key" in r.stderr
    assert "b.yml:2: strictness: expected strict (20), moderate (40), loose (60) or an integer" in r.stderr
    assert "c.yaml" in r.stderr and "not valid YAML" in r.stderr
    assert "ok.yaml" not in r.stderr
    with pytest.raises(ConfigError) as e:
        PolicyStore(tmp_path / "policies", 0)
    assert str(e.value).count("\n") >= 2  # one line (at least) per file


def test_yml_files_are_read_like_yaml_files(tmp_path):
    (tmp_path / "default.yml").write_text("strictness: strict\n")
    (tmp_path / "kids.yml").write_text("tenant: kids\napi_keys: [kids-key-0001]\ncategories: {SEX: 10}\n")
    (tmp_path / "notes.txt").write_text("not a policy")
    policies = PolicyStore(tmp_path, 0).current
    assert policies.default.strictness == "strict"
    assert policies.tenants["kids"].strictness == "strict"  # inherited from default.yml
    assert policies.for_api_key("kids-key-0001").tenant == "kids"
    assert policies.files == {"default.yml": "default", "kids.yml": "kids"}
    (tmp_path / "default.yaml").write_text("strictness: loose\n")
    with pytest.raises(ConfigError, match="both default.yaml and default.yml exist; keep one"):
        PolicyStore(tmp_path, 0)


def test_check_exit_codes_follow_the_tenants_decision(tmp_path, guard):
    guard.rules.append(Rule("borderline", "ILG", 30))
    guard.rules.append(Rule("pipe bomb", "VIO", 95))
    path = write(tmp_path, {"upstream": {"base_url": "http://127.0.0.1:9/v1"},
                            "guard": {"base_url": f"{guard.url}/v1"}},
                 {"default.yaml": "strictness: moderate\n",
                  "kids.yaml": "tenant: kids\napi_keys: [kids-key-0001]\nstrictness: strict\n",
                  "flagger.yaml": "tenant: flagger\napi_keys: [flag-key-0001]\nprompt: {action: flag}\n"})
    cfg = ["--config", str(path)]
    r = guardgate("check", "a borderline question", *cfg)
    assert r.returncode == 0, r.stderr  # 30 < moderate 40
    assert "decision    ALLOW: risk 30 < 40 (strictness moderate)" in r.stdout
    r = guardgate("check", "a borderline question", *cfg, "--tenant", "kids", "--json")
    assert r.returncode == 1  # 30 >= strict 20: it would be blocked
    out = json.loads(r.stdout)
    assert (out["tenant"], out["decision"], out["threshold"], out["risk"]) == ("kids", "block", 20, 30)
    assert out["text_sha256"] == __import__("hashlib").sha256(b"a borderline question").hexdigest()[:16]
    assert guardgate("check", "a pipe bomb", *cfg, "--tenant", "flagger").returncode == 0  # flagged, passes
    assert guardgate("check", "a pipe bomb", *cfg).returncode == 1
    # --policies wins over the config's folder.
    other = tmp_path / "other"
    other.mkdir()
    (other / "default.yaml").write_text("strictness: loose\n")
    (other / "lenient.yml").write_text("tenant: lenient\napi_keys: [lenient-key-01]\nstrictness: 99\n")
    assert guardgate("check", "a pipe bomb", *cfg, "--policies", str(other), "--tenant", "lenient").returncode == 0
    # 2: a usage or config error. 3: the guard could not score it.
    r = guardgate("check", "x", *cfg, "--tenant", "nobody")
    assert r.returncode == 2 and "no such tenant" in r.stderr and "kids" in r.stderr
    (other / "broken.yaml").write_text("tenant: broken\nstrictness: 300\n")
    assert guardgate("check", "x", *cfg, "--policies", str(other)).returncode == 2
    guard.failure = "500"
    r = guardgate("check", "x", *cfg)
    assert r.returncode == 3 and "could not score this" in r.stderr and "answered 503" in r.stderr


def test_check_without_a_policies_folder_uses_the_built_in_default(tmp_path):
    r = guardgate("check", "What is the capital of France?", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["policy"] == "built-in default policy" and out["decision"] == "allow" and out["threshold"] == 40


def test_a_start_with_litellm_models_names_them_and_warns_of_no_upstream_key():
    config = GatewayConfig.model_validate({
        "models": [{"name": "claude", "model": "anthropic/claude-x", "api_key": "sk-ant-secret"},
                   {"name": "claude", "model": "anthropic/claude-y"}, {"name": "local", "model": "ollama/llama3.1"}],
        "guard": {"base_url": "http://127.0.0.1:8/v1"}})
    keyed = PolicyStore(Path(__file__).parents[1] / "policies" / "examples", 0).current
    line = summary(config, keyed, host="127.0.0.1", port=8080, workers=1)
    assert line["upstream"] == "litellm (3 deployments)" and line["models"] == ["claude", "local"]
    assert "sk-ant-secret" not in str(line)
    assert warnings(config, keyed, workers=1) == []
