"""What the benchmarks share: ports, readiness, percentiles, and the stand-ins + gateway as processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
BODY = b'{"model":"m","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"What is the capital of France?"}]}'
HEADERS = {"content-type": "application/json", "authorization": "Bearer bench"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def processes(guard_delay_ms: float, extra_config: dict) -> Iterator[tuple[str, str, str]]:
    """A stand-in upstream, a stand-in guard and `guardgate serve`, each in its own process; yields their
    base URLs. `extra_config` is merged into the gateway config; its `_policy` is added to default.yaml."""
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        up_port, guard_port, gw_port = free_port(), free_port(), free_port()
        for args in (["upstream", str(up_port)], ["guard", str(guard_port), "--delay-ms", str(guard_delay_ms)]):
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.standins", *args], env=env, cwd=REPO))
        wait_ready(f"http://127.0.0.1:{up_port}/v1/models", procs[0])
        wait_ready(f"http://127.0.0.1:{guard_port}/v1/models", procs[1])
        tmp = Path(tempfile.mkdtemp(prefix="guardgate-bench-"))
        (tmp / "policies").mkdir()
        (tmp / "policies" / "default.yaml").write_text("strictness: moderate\n" + extra_config.pop("_policy", ""))
        config = {"upstream": {"base_url": f"http://127.0.0.1:{up_port}/v1", "api_key": "sk-bench"},
                  "guard": {"base_url": f"http://127.0.0.1:{guard_port}/v1"},
                  "policies_dir": "policies", "server": {"allow_open": True}, **extra_config}
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "gateway.yaml"),
                                       "--port", str(gw_port)], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_ready(f"http://127.0.0.1:{gw_port}/healthz", procs[2])
        yield f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{guard_port}", f"http://127.0.0.1:{gw_port}"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
