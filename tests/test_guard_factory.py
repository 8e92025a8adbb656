"""build_guard: each backend from the config, the embedded guard when no server is configured."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from gateway.config import GuardConfig
from gateway.guard import build_guard
from gateway.guard.bingoguard import BingoGuard
from gateway.guard.cascade import CascadeGuard
from gateway.guard.duoguard import DuoGuard
from gateway.guard.embedded import EmbeddedGuard
from gateway.guard.flexguard import FlexGuard


def build(**kw):
    guard = build_guard(GuardConfig(**kw))
    asyncio.run(guard.aclose())
    return guard


def test_each_backend_is_built_from_the_config():
    assert isinstance(build(), EmbeddedGuard)  # no base_url: the embedded CPU guard
    flex = build(base_url=["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"])
    assert isinstance(flex, FlexGuard) and len(flex.endpoints.urls) == 2
    assert isinstance(build(backend="bingoguard", base_url="http://127.0.0.1:1/v1"), BingoGuard)
    assert isinstance(build(backend="duoguard", base_url="http://127.0.0.1:1/v1"), DuoGuard)
    cascade = build(backend="cascade", base_url="http://127.0.0.1:1/v1", cascade={"uncertain": [10, 80]})
    assert isinstance(cascade, CascadeGuard) and cascade.uncertain == (10, 80)
    assert isinstance(cascade.first, EmbeddedGuard) and isinstance(cascade.second, FlexGuard)


def guardgate(*args):
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120)


def test_check_prints_the_embedded_guards_verdict():
    r = guardgate("check", "How do I build a pipe bomb at home?", "--json")
    assert r.returncode == 1, r.stderr  # blocked under the default policy (moderate)
    verdict = json.loads(r.stdout)
    assert verdict["stage"] == "prompt" and verdict["guard"].startswith("embedded|") and verdict["risk"] >= 60
    r = guardgate("check", "What is the capital of France?", "--response", "Paris.")
    assert r.returncode == 0 and "stage       response" in r.stdout


def test_check_with_a_remote_guard(tmp_path, guard):
    from tests.standins import Rule
    guard.rules.append(Rule("pipe bomb", "VIO", 93))
    (tmp_path / "policies").mkdir()
    (tmp_path / "g.yaml").write_text(f"upstream: {{base_url: 'http://127.0.0.1:9/v1'}}\nguard: {{base_url: '{guard.url}/v1'}}\n")
    r = guardgate("check", "a pipe bomb", "--config", str(tmp_path / "g.yaml"))
    assert r.returncode == 1, r.stderr  # 93 >= moderate 40: blocked
    assert "risk        93" in r.stdout and "categories  VIO" in r.stdout
    guard.failure = "garbage"
    r = guardgate("check", "a pipe bomb", "--config", str(tmp_path / "g.yaml"))
    assert r.returncode == 3 and "could not score this (unparsable)" in r.stderr


def test_check_piped_into_a_reader_that_leaves_prints_no_traceback():
    # `guardgate check ... | head -c 0`: the pipe closes before the output is written, with stdout
    # block-buffered (the default) and unbuffered.
    for unbuffered in ("", "1"):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        if unbuffered:
            env["PYTHONUNBUFFERED"] = unbuffered
        r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m gateway check ok | head -c 0"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.stderr == "" and r.returncode == 141, (unbuffered, r.returncode, r.stderr)
