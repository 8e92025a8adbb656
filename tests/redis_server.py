"""A real Redis for tests: our own `redis-server` on a free loopback port, or else one on 127.0.0.1:6379.

Our own server can be stopped and restarted on the same port (outage tests) and requires a password (so
tests can check it never reaches a log). A shared 127.0.0.1:6379 is only used through db 15, and cannot be
stopped: tests that need that skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

PASSWORD = "gg-test-redis-pw-7f3a9c"
SHARED_URL = "redis://127.0.0.1:6379/15"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


class RedisServer:
    """One Redis the tests may use; `client()` is a plain sync redis-py client for inspecting it."""

    def __init__(self, url: str, binary: str | None = None, port: int | None = None, workdir: Path | None = None):
        self.url, self.binary, self.port, self.workdir = url, binary, port, workdir
        self.proc: subprocess.Popen | None = None

    @property
    def restartable(self) -> bool:
        return self.binary is not None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> RedisServer:
        assert self.binary and self.port and self.workdir, "only our own redis-server can be started"
        log = self.workdir / "redis.log"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--requirepass", PASSWORD, "--logfile", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not _answers_ping(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        if self.restartable and (self.proc is None or self.proc.poll() is not None):
            self.start()


def start_redis(workdir: Path) -> RedisServer:
    """Our own redis-server if the binary exists, else a live 127.0.0.1:6379; skip (or fail) without either.

    REQUIRE_REDIS=1 turns the skip into a failure, so CI cannot pass by silently skipping.
    """
    binary = shutil.which("redis-server")
    if binary:
        port = free_port()
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        return RedisServer(url, binary, port, workdir).start()
    if _answers_ping(SHARED_URL):
        return RedisServer(SHARED_URL)
    reason = "no redis-server binary and nothing answers on 127.0.0.1:6379"
    if os.environ.get("REQUIRE_REDIS") == "1":
        pytest.fail(f"REQUIRE_REDIS=1 but {reason}")
    pytest.skip(reason)
