from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import yaml

from gateway.app import create_app
from gateway.config import load_config
from tests.redis_server import RedisServer, start_redis
from tests.standins import GuardBehaviour, ServerThread, UpstreamBehaviour, guard_app, upstream_app

UPSTREAM_KEY = "sk-upstream-SECRET-0123456789"
ADMIN_KEY = "admin-key-for-tests-0001"


# ----- a real Redis (our own redis-server where the binary exists; REQUIRE_REDIS=1 turns skips into failures) -----


@pytest.fixture(scope="session")
def redis_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(Path(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> Iterator[RedisServer]:
    """A running, empty Redis; running (and empty) again after the test even if the test stopped it."""
    redis_server_session.ensure_running()
    with redis_server_session.client() as c:
        c.flushdb()
    yield redis_server_session
    redis_server_session.ensure_running()
    with redis_server_session.client() as c:
        c.flushdb()


@pytest.fixture
def restartable_redis(redis_server: RedisServer) -> RedisServer:
    if not redis_server.restartable:
        pytest.skip("needs our own redis-server to stop and restart (only a shared 127.0.0.1:6379 is available)")
    return redis_server


@pytest.fixture(scope="session")
def _guard_server() -> Iterator[tuple[GuardBehaviour, ServerThread]]:
    behaviour = GuardBehaviour()
    server = ServerThread(guard_app(behaviour)).start()
    yield behaviour, server
    server.stop()


@pytest.fixture(scope="session")
def _upstream_server() -> Iterator[tuple[UpstreamBehaviour, ServerThread]]:
    behaviour = UpstreamBehaviour()
    server = ServerThread(upstream_app(behaviour)).start()
    yield behaviour, server
    server.stop()


B = TypeVar("B", bound=Any)


def fresh(pair: tuple[B, ServerThread]) -> B:
    """A session's stand-in, reset for one test, with its server's URL."""
    behaviour, server = pair
    behaviour.reset()
    behaviour.url = server.url
    return behaviour


@pytest.fixture
def guard(_guard_server) -> GuardBehaviour:
    return fresh(_guard_server)


@pytest.fixture
def upstream(_upstream_server) -> UpstreamBehaviour:
    return fresh(_upstream_server)


def guardgate_command() -> list[str]:
    """The installed `guardgate` console script, as a user runs it."""
    exe = shutil.which("guardgate", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the guardgate console script is not installed"
    return [exe]


class GatewayProcess(subprocess.Popen):
    """A `guardgate serve` whose output is read as it comes (`output()`, `communicate()`): a pipe nobody
    reads fills at 64 KB, and a server blocked on a log write can neither serve nor exit."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lines: list[str] = []
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.stdout or ()), daemon=True)
        self._drain.start()

    def output(self) -> str:
        return "".join(self.lines)

    def communicate(self, input=None, timeout=None) -> tuple[str, None]:  # noqa: A002 - Popen's signature
        self.wait(timeout)
        self._drain.join(timeout)
        return self.output(), None


def serve_gateway(config_path: Path, port: int, env: dict | None = None, timeout_s: float = 60,
                  args: tuple[str, ...] = ()) -> GatewayProcess:
    """`guardgate serve` in its own process; returns once /healthz answers. Output is captured (text)."""
    proc = GatewayProcess(guardgate_command() + ["serve", "--config", str(config_path), "--port", str(port), *args],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"guardgate serve did not start: {proc.communicate()[0][-2000:]}")
        time.sleep(0.1)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningGateway:
    def __init__(self, server: ServerThread, config_path: Path) -> None:
        self.server, self.url, self.config_path = server, server.url, config_path

    def details(self) -> dict:
        """The admin readiness view (tenants, policy errors, cache and guard stats)."""
        return httpx.get(f"{self.url}/admin/readiness", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "client-key"),
                             max_retries=0, timeout=30, **kwargs)


@pytest.fixture
def make_gateway(tmp_path, guard, upstream) -> Iterator[Callable[..., RunningGateway]]:
    """Write a config and a policies folder, start the real app on loopback, hand back its URL."""
    running: list[ServerThread] = []

    def make(policy: str = "strictness: moderate\n", *, guard_url: str | None = None,
             files: dict[str, str] | None = None, copy_from: Path | None = None, **overrides) -> RunningGateway:
        """`policy` is default.yaml; `files` adds tenant files; `copy_from` copies a policies folder."""
        policies = tmp_path / "policies"
        policies.mkdir(exist_ok=True)
        if copy_from is not None:
            for src in copy_from.glob("*.yaml"):
                shutil.copy(src, policies / src.name)
        else:
            (policies / "default.yaml").write_text(textwrap.dedent(policy))
        for name, text in (files or {}).items():
            (policies / name).write_text(textwrap.dedent(text))
        config = {
            "upstream": {"base_url": f"{upstream.url}/v1", "api_key": UPSTREAM_KEY},
            "guard": {"base_url": guard_url or f"{guard.url}/v1", "model": guard.model, "timeout_s": 2},
            "policies_dir": "policies",
            "policies_reload_s": 0.1,
            # Most tests run without keys (the auth tests add them).
            "server": {"allow_open": True, "admin_key": ADMIN_KEY},
        }
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        server = ServerThread(create_app(load_config(path))).start()
        running.append(server)
        return RunningGateway(server, path)

    yield make
    for server in running:
        server.stop()


@pytest.fixture
def gateway(make_gateway) -> RunningGateway:
    return make_gateway()


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return gateway.client()
